"""Chat templates in the forms tangquant ships them in, rendered the way each runtime renders them.

``gotemplate`` (Go's text/template, the part ollama's templates use), ``goexec`` (executing it),
``ollama`` (a Modelfile and ollama's chat rendering through it), ``sources`` (where a model
directory keeps its tokenizer and chat template, and how two directories' differ). Standard
library only; the runtimes themselves (transformers, openvino-genai, llama-cpp-python) are driven
from ``tangquant.measure.chat_forms``.
"""
