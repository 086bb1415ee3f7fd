"""GGUF: the checkpoint's exact INT4 integers for llama.cpp and everything that runs GGUF.

- :mod:`tangquant.gguf.q4`: GPTQ layers as Q4_0 blocks, integers and scales unchanged;
- :mod:`tangquant.gguf.vocab`: the tokenizer as GGUF metadata;
- :mod:`tangquant.gguf.writer`: a Qwen2 GGUF file from a GPTQ checkpoint (or, for the
  llama.cpp anchor, from a full-precision model in f16);
- :mod:`tangquant.gguf.reader`: read a GGUF back, dequantised with gguf's own numpy code;
- :mod:`tangquant.gguf.build`: the export's output directory, checked before it is published.
"""
