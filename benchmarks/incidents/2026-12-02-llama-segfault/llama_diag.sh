#!/usr/bin/env bash
# Why does llama.cpp 0c1e570 built on the lent Xeon segfault loading every GGUF (2026-12-02, in
# print_info, through llama-cpp-python)? One call: build llama.cpp's own tools from the carried
# source with CMake (RelWithDebInfo), run them on a tiny GGUF with no Python in the process, then
# the same library through llama-cpp-python, each with a SIGSEGV handler (LD_PRELOAD) that prints
# the native backtrace, resolved with addr2line.
#
# Usage: llama_diag.sh GGUF OUT     (.carry/llama-cpp-python-src.tar.xz from benchmarks/xeon_pack.sh; a tiny
# GGUF from `python benchmarks/llama_probe.py WORK`, WORK/probe-gguf/*.gguf, carried as .carry/probe/tiny-Q4_0.gguf)
# Run on 2026-12-02: it found the cause (xeon-20261202-run3-llama-diag.log, beside this script in
# benchmarks/incidents/2026-12-02-llama-segfault/; the incident is closed, see README.md there).
set -u
gguf="$(realpath "$1")"; out="$(mkdir -p "$2" && cd "$2" && pwd)"; repo="$(cd "$(dirname "$0")/../../.." && pwd)"
w=/tmp/ld; rm -rf "$w"; mkdir -p "$w"; exec > >(tee -a "$out/diag.log") 2>&1
say() { echo "== $(date -u +%H:%M:%S) $*"; }
say host; uname -a; gcc --version | head -1; cmake --version | head -1; command -v python3; python3 -VV
python3 -c "import sys, sysconfig; print(sys.executable, sys.prefix, sysconfig.get_config_var('LDSHARED'))"
ldd "$(command -v python3)"; sha256sum "$gguf"; grep -m1 "model name" /proc/cpuinfo
tar -xJf "$repo/.carry/llama-cpp-python-src.tar.xz" -C "$w"; pkg="$w/llama_cpp_python-0.3.36"
cat > "$w/segv.c" <<'C'
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>
static void on_segv(int sig) {
  void *frames[64]; int n = backtrace(frames, 64);
  const char *m = "native backtrace:\n"; write(2, m, strlen(m));
  backtrace_symbols_fd(frames, n, 2); _exit(128 + sig);
}
__attribute__((constructor)) static void install(void) {
  struct sigaction sa; memset(&sa, 0, sizeof sa); sa.sa_handler = on_segv; sigaction(SIGSEGV, &sa, 0);
}
C
gcc -shared -fPIC -O1 -o "$w/segv.so" "$w/segv.c" || say "no segv handler"
# resolve "lib.so(+0xOFF)" frames of a log with addr2line
resolve() { grep -oE '[^ (]+\.so[^ (]*\(\+0x[0-9a-f]+\)' "$1" | sort -u | while read -r f; do
  lib="${f%%(*}"; off="${f##*+}"; off="${off%)}"; echo "$f -> $(addr2line -f -C -e "$lib" "$off" | tr '\n' ' ')"; done; }
say cmake; args="$(sh "$repo/.ci/llama-cmake-args" | sed 's/-DLLAVA_BUILD=OFF//')"; echo "$args"
timeout 300 cmake -S "$pkg/vendor/llama.cpp" -B "$w/b" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo $args \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF >"$w/cmake.log" 2>&1 \
  && timeout 300 cmake --build "$w/b" -j 16 --target llama-bench llama-simple >"$w/build.log" 2>&1 \
  || { tail -30 "$w/cmake.log" "$w/build.log"; say "build failed"; }
bin="$w/b/bin"; ls "$bin" | head -20
for rp in 1 0; do
  say "llama-bench --repack $rp"; LD_PRELOAD="$w/segv.so" timeout 120 "$bin/llama-bench" -m "$gguf" -p 16 -n 4 -r 1 -t 4 \
    --repack $rp >"$w/bench$rp.log" 2>&1; echo "rc=$?"; tail -25 "$w/bench$rp.log"; resolve "$w/bench$rp.log"
done
say llama-simple; LD_PRELOAD="$w/segv.so" timeout 120 "$bin/llama-simple" -m "$gguf" -n 4 hello >"$w/simple.log" 2>&1
echo "rc=$?"; tail -25 "$w/simple.log"; resolve "$w/simple.log"
say "python + the same library (llama-cpp-python 0.3.36, LLAMA_CPP_LIB_PATH)"
cat > "$w/load.py" <<'PY'
import ctypes, sys
import llama_cpp as L
print("llama_cpp", L.__file__, flush=True)
L.llama_backend_init()
p = L.llama_model_default_params(); p.use_extra_bufts = sys.argv[2] == "1"
m = L.llama_model_load_from_file(sys.argv[1].encode(), p)
print("loaded", bool(m), flush=True)
PY
for rp in 0 1; do
  LLAMA_CPP_LIB_PATH="$bin" PYTHONPATH="$pkg" LD_PRELOAD="$w/segv.so" timeout 120 python3 "$w/load.py" "$gguf" $rp \
    >"$w/py$rp.log" 2>&1; echo "repack=$rp rc=$?"; tail -25 "$w/py$rp.log"; resolve "$w/py$rp.log"
done
say "python -X importtime of llama_cpp (which libraries load before libllama)"
LLAMA_CPP_LIB_PATH="$bin" PYTHONPATH="$pkg" python3 -c "import llama_cpp, os; print(open('/proc/self/maps').read())" 2>&1 \
  | grep -oE '/[^ ]+\.so[^ ]*' | sort -u
cp "$w"/*.log "$out/" 2>/dev/null; say done
