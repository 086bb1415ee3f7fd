"""One chat rendered through every form tangquant ships, each the way its runtime renders it.

The reference is the Hugging Face tokenizer's ``apply_chat_template`` (the files beside the model).
Against it: openvino-genai's ``Tokenizer`` of an IR (the template openvino-genai finds there),
llama.cpp (the GGUF's own ``tokenizer.chat_template`` through llama-cpp-python's
``Jinja2ChatFormatter``, with the GGUF's BOS/EOS text, as ``Llama`` builds it) and ollama (the
``Modelfile`` through :mod:`tangquant.chatforms.ollama`). Two conversations: a system prompt and
two turns, and two turns without one (where a template's default system prompt shows). A form
whose runtime is not installed is reported as skipped, with the reason.
"""

from __future__ import annotations

import logging
from importlib.util import find_spec
from pathlib import Path

from tangquant import load
from tangquant.chatforms import ollama
from tangquant.chatforms.sources import CONVERSATIONS, first_difference, render

logger = logging.getLogger(__name__)

def openvino(ir_dir: Path):
    import openvino_genai

    tok = openvino_genai.Tokenizer(str(ir_dir))
    return lambda messages: tok.apply_chat_template(messages, add_generation_prompt=True)


def llama_cpp(gguf_path: Path):
    """llama-cpp-python's formatter for the GGUF's own template (as ``Llama.__init__`` makes it)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from tangquant.gguf import reader

    r = reader.open_reader(gguf_path)
    template = reader.field(r, "tokenizer.chat_template")
    if not template:
        return None
    tokens = reader.field(r, "tokenizer.ggml.tokens") or []

    def text(key: str) -> str:
        i = reader.field(r, key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

    fmt = Jinja2ChatFormatter(template=template, eos_token=text("tokenizer.ggml.eos_token_id"),
                              bos_token=text("tokenizer.ggml.bos_token_id"))
    return lambda messages: fmt(messages=messages).prompt


def modelfile(path: Path):
    parsed = ollama.read_modelfile(path.read_text(encoding="utf-8"))
    return lambda messages: ollama.render(parsed, messages)


def forms(model_dir: Path) -> dict:
    """{form: render(messages) or a reason it is skipped} for what ``model_dir`` holds."""
    model_dir = Path(model_dir)
    found: dict = {}
    if (model_dir / "openvino_tokenizer.xml").is_file():
        found["openvino-genai"] = openvino(model_dir)
    ggufs = sorted(model_dir.glob("*.gguf"))
    if ggufs:
        found["llama.cpp"] = (llama_cpp(ggufs[0]) or "skipped: the GGUF holds no chat template"
                              ) if find_spec("llama_cpp") else \
            "skipped: llama-cpp-python is not installed (pip install 'tangquant[llamacpp]')"
    if (model_dir / "Modelfile").is_file():
        found["ollama"] = modelfile(model_dir / "Modelfile")
    return found


def compare(tokenizer, model_dir: Path) -> dict:
    """{form: "same" | "skipped: …" | "differs (conversation) at …"} against the HF template."""
    if not getattr(tokenizer, "chat_template", None):
        return {}
    reference = {name: render(tokenizer, msgs) for name, msgs in CONVERSATIONS.items()}
    out = {}
    for form, rendered_by in forms(model_dir).items():
        if isinstance(rendered_by, str):
            out[form] = rendered_by
            continue
        out[form] = "same"
        for name, msgs in CONVERSATIONS.items():
            got = rendered_by(msgs)
            if got != reference[name]:
                out[form] = f"differs ({name}) {first_difference(got, reference[name])}"
                break
    return out


def check(model_dir: Path, tokenizer=None) -> dict:
    """:func:`compare` with the tokenizer files of ``model_dir`` (or ``tokenizer``)."""
    tok = tokenizer if tokenizer is not None else load.tokenizer(model_dir)
    return compare(tok, Path(model_dir))


def mismatches(report: dict) -> list[str]:
    return [f"{form} {verdict}" for form, verdict in report.items() if verdict.startswith("differs")]
