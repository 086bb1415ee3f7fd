"""Check that a model's chat template renders alike in every form tangquant ships.

MODEL is a model directory with its tokenizer files: a merged model, a GPTQ checkpoint, an
OpenVINO IR, or a GGUF export's directory (or its .gguf file). The reference is the Hugging Face
tokenizer's chat template beside it; a system prompt and two turns, and two turns without one,
are rendered through it and through each form the directory holds: openvino-genai's tokenizer (an
IR), llama.cpp (the GGUF's own template through llama-cpp-python's Jinja formatter) and ollama
(the Modelfile, rendered as ollama renders it: every earlier turn through its template). With
--adapter, the tokenizer saved beside a LoRA adapter is compared with the model's too. A
difference is an error (exit 2) naming the form and the first character that differs.
`tangquant export` runs the same check before it publishes.

Example:
  tangquant check-template work/gguf
  tangquant check-template Qwen1.5-7B-Chat --adapter saves/tang-lora
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tangquant import files, load
from tangquant.errors import ChatTemplateError, InputError

HELP = "check that the chat template renders alike in every form (HF, openvino-genai, llama.cpp, ollama)"


@dataclass(frozen=True)
class CheckTemplateParams:
    """Nothing to tune: the chats and the forms are fixed (the forms the directory holds)."""


PARAMS = CheckTemplateParams
RECIPE_FLAG = False


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", help="model directory (or a GGUF export's .gguf file)")
    parser.add_argument("--adapter", metavar="ADAPTER_DIR",
                        help="also compare the tokenizer saved beside this LoRA adapter with MODEL's")


def run(args) -> dict:
    return check_template(args.model, adapter=args.adapter)


def check_template(model, adapter=None) -> dict:
    """{forms: {form: verdict}, adapter: {...} or None, summary}; raises ChatTemplateError on a
    difference."""
    from tangquant.chatforms import sources
    from tangquant.measure import chat_forms

    path = Path(model)
    directory = path.parent if path.is_file() and path.suffix == ".gguf" else files.existing_dir(path, "model")
    if not sources.has_tokenizer(directory):
        raise InputError(f"{directory} holds no tokenizer files (tokenizer.json, tokenizer_config.json); "
                         "the Hugging Face template is the reference the forms are checked against")
    tokenizer = load.tokenizer(directory)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{directory}: the tokenizer has no chat template to check")
    report = chat_forms.compare(tokenizer, directory)
    bad = chat_forms.mismatches(report)
    against = None
    if adapter is not None:
        against = sources.compare_dirs(directory, files.existing_dir(adapter, "adapter"))
        bad += [f"the adapter's {k.replace('_', ' ')} differs: {v}" for k, v in (against or {}).items() if v]
    if bad:
        raise ChatTemplateError(f"{directory}: " + "; ".join(bad))
    forms = ", ".join(f"{form} {verdict}" for form, verdict in report.items()) or "no other form here"
    extra = "" if adapter is None else ("; the adapter's tokenizer renders alike" if against
                                        else "; the adapter holds no tokenizer")
    return {"forms": report, "adapter": against,
            "summary": f"{directory}: chat template — Hugging Face reference; {forms}{extra}"}
