"""Pieces of an OpenVINO IR directory beside the model: integrity, tokenizers, configs, card.

Used by ``export`` (to build and check the directory) and ``chat`` (to refuse a
broken one with a clear message before OpenVINO reads it).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from tangquant.errors import InputError, TangquantError
from tangquant import files
from tangquant.files import read_json, write_json

logger = logging.getLogger(__name__)

MODEL_XML = "openvino_model.xml"
TOKENIZER_XML = "openvino_tokenizer.xml"
DETOKENIZER_XML = "openvino_detokenizer.xml"
IM_END = "<|im_end|>"
# Settings under which the IR computes what the fp32 PyTorch reference computes: the CPU
# plugin otherwise runs bf16 on AMX/AVX512-bf16 CPUs and quantizes activations to int8
# dynamically in front of INT4 weights.
EXACT_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
_DATA_EXTENT = re.compile(rb'offset="(\d+)"\s+size="(\d+)"')


def is_ir_dir(path: Path) -> bool:
    return (Path(path) / MODEL_XML).is_file()


def check_ir_files(model_dir: Path, error: type[TangquantError] = InputError) -> None:
    """Refuse an IR whose .bin is missing or shorter than its .xml says, before OpenVINO reads it."""
    model_dir = Path(model_dir)
    for xml in [model_dir / MODEL_XML, model_dir / TOKENIZER_XML, model_dir / DETOKENIZER_XML]:
        if not xml.is_file():
            raise error(f"{model_dir} is not a complete OpenVINO IR directory: {xml.name} is missing")
        needed = max((int(o) + int(s) for o, s in _DATA_EXTENT.findall(xml.read_bytes())), default=0)
        binary = xml.with_suffix(".bin")
        if needed and not binary.is_file():
            raise error(f"{binary} is missing; the OpenVINO IR in {model_dir} is incomplete")
        if needed and binary.stat().st_size < needed:
            raise error(f"{binary} is truncated ({binary.stat().st_size} of {needed} bytes); "
                        "copy or export the model again")


def write_tokenizers(src_dir: Path, out_dir: Path) -> None:
    """openvino_tokenizer/detokenizer.xml (with the chat template) from the HF tokenizer."""
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(src_dir, trust_remote_code=False)
    if not hf.chat_template:
        raise InputError(f"the tokenizer in {src_dir} has no chat template")
    tok, detok = convert_tokenizer(hf, with_detokenizer=True)
    ov.save_model(tok, str(out_dir / TOKENIZER_XML))
    ov.save_model(detok, str(out_dir / DETOKENIZER_XML))


def fix_generation_config(src_dir: Path, out_dir: Path) -> list[int]:
    """generation_config.json whose eos ids include <|im_end|>; returns the eos ids."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(src_dir, trust_remote_code=False)
    im_end = hf.convert_tokens_to_ids(IM_END)
    if im_end is None or im_end == hf.unk_token_id:
        raise InputError(f"the tokenizer in {src_dir} has no {IM_END} token (not a ChatML chat model)")
    path = out_dir / "generation_config.json"
    src = Path(src_dir) / "generation_config.json"
    config = read_json(src, "generation config") if src.is_file() else {}
    eos = config.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if im_end not in eos:
        eos.insert(0, im_end)
    config["eos_token_id"] = eos
    config.setdefault("pad_token_id", hf.pad_token_id)
    write_json(path, config)
    return eos


def smoke_generate(model_dir: Path, prompt: str = "写一首唐诗", max_new_tokens: int = 1) -> str:
    """Compile the IR with openvino-genai and generate; an ExportError if it does not run."""
    from tangquant.errors import ExportError

    import openvino_genai

    try:
        pipe = openvino_genai.LLMPipeline(str(model_dir), "CPU")
        config = pipe.get_generation_config()
        config.max_new_tokens = max_new_tokens
        config.do_sample = False
        return str(pipe.generate(prompt, config))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"the exported IR in {model_dir} does not run in openvino-genai: {first}") from None


def write_model_card(out_dir: Path, source: Path, metrics: dict, embeddings: str) -> None:
    mode = metrics["int4_mode"]
    name = files.final_name(source)
    text = f"""# {name} — OpenVINO INT4 (exact GPTQ integers)

Exported by `tangquant export --format openvino` from the GPTQ checkpoint `{name}`.

- Linear layers: INT4, {mode}, group size {metrics['group_size']}; the {metrics['int4_layers']} layers'
  integers, fp16 scales and zero points are the checkpoint's own (checked on export:
  {metrics['int4_constants_checked']} constants equal).
- Embeddings and lm_head: {"INT8 (asymmetric, per channel)" if embeddings == "int8" else "fp16"}.
- Stateful (KV cache inside the model); tokenizer and detokenizer as OpenVINO models; ChatML chat
  template; generation stops at `<|im_end|>`.

## Use

```python
import openvino_genai
pipe = openvino_genai.LLMPipeline("MODEL_DIR", "CPU")  # this directory
print(pipe.generate("写一首唐诗", max_new_tokens=64))
```

or `OVModelForCausalLM.from_pretrained("MODEL_DIR")` (optimum-intel), or
`tangquant chat --model MODEL_DIR`.

## Exactness

OpenVINO's CPU defaults trade exactness for speed: bf16 inference precision on CPUs with
AMX/AVX512-bf16, and dynamic int8 quantization of activations in front of INT4 weights. To compare
against the fp32 PyTorch reference, compile with `INFERENCE_PRECISION_HINT=f32` and
`DYNAMIC_QUANTIZATION_GROUP_SIZE=0`.
"""
    (out_dir / "README.md").write_text(text, encoding="utf-8")
