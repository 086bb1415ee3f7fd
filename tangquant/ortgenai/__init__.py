"""ONNX Runtime GenAI model directories: what ``export --format ortgenai`` writes and the ``ortgenai``
bench kind reads (``genai_config.json`` beside a decoder ``model.onnx`` and its external data).

:mod:`~tangquant.ortgenai.model` reads a directory without onnxruntime (its config, its
initializers, its weight bytes); :mod:`~tangquant.ortgenai.build` runs ONNX Runtime GenAI's own
model builder on a GPTQ checkpoint and checks what it kept; :mod:`~tangquant.ortgenai.runtime` is
the smoke test in a separate process.
"""
