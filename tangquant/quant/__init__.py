"""INT4 quantization engines behind ``tangquant quantize``: INC drivers, the GPTQ writer, the card."""
