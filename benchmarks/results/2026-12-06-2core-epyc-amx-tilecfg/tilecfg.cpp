#include <immintrin.h>
#include <stdint.h>
struct cfg { uint8_t palette, start; uint8_t r0[14]; uint16_t colsb[16]; uint8_t rows[16]; };
void load() {
  alignas(64) cfg c = {};
  c.palette = 1;
  c.rows[0] = 16; c.colsb[0] = 64;
  _tile_loadconfig(&c);
}
