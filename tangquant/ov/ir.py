"""The files of an OpenVINO IR directory: names, integrity, exact-mode settings and the model card.

Standard library only, so the loader and the commands can recognise and check
an IR before OpenVINO is imported; building one is :mod:`tangquant.ov.build`.
"""

from __future__ import annotations

import re
from pathlib import Path

from tangquant import card, files
from tangquant.errors import InputError, TangquantError

MODEL_XML = "openvino_model.xml"
TOKENIZER_XML = "openvino_tokenizer.xml"
DETOKENIZER_XML = "openvino_detokenizer.xml"
IR_FILES = (MODEL_XML, TOKENIZER_XML, DETOKENIZER_XML)
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
    for name in IR_FILES:
        xml = model_dir / name
        if not xml.is_file():
            raise error(f"{model_dir} is not a complete OpenVINO IR directory: {xml.name} is missing; "
                        "make one with `tangquant export --format openvino`")
        data = xml.read_bytes()
        _check_xml(xml, data, error)
        needed = max((int(o) + int(s) for o, s in _DATA_EXTENT.findall(data)), default=0)
        binary = xml.with_suffix(".bin")
        if needed and not binary.is_file():
            raise error(f"{binary} is missing; the OpenVINO IR in {model_dir} is incomplete")
        if needed and binary.stat().st_size < needed:
            raise error(f"{binary} is truncated ({binary.stat().st_size} of {needed} bytes); "
                        "copy or export the model again")


def _check_xml(path: Path, data: bytes, error: type[TangquantError]) -> None:
    """Refuse an .xml cut short or garbled (expat, no tree built), or one that declares entities
    (an IR never does; entity expansion is how a small XML asks for gigabytes)."""
    from xml.parsers import expat

    if b"<!ENTITY" in data or b"<!DOCTYPE" in data:
        raise error(f"{path} declares XML entities, which an OpenVINO IR never does; export it again")
    try:
        expat.ParserCreate().Parse(data, True)
    except expat.ExpatError as exc:
        raise error(f"{path} is not a complete XML file ({exc}); the OpenVINO IR is truncated or "
                    "corrupt: copy or export it again") from None


SERVE_API = """from tangquant import serve, tune
tune("THIS_DIR", apply=True)    # the fastest faithful runtime settings on this machine
serve("THIS_DIR", port=8000)    # OpenAI-compatible, /v1/chat/completions"""


def write_model_card(out_dir: Path, source: Path, metrics: dict, embeddings: str, lineage: dict) -> None:
    mode = metrics["int4_mode"]
    name = files.final_name(source)
    emb = "INT8 (asymmetric, per channel)" if embeddings == "int8" else "fp16"
    head = (f"Embeddings and lm_head: {emb}" if metrics.get("lm_head", embeddings) == embeddings else
            f"Embeddings: {emb}; lm_head: INT4 (round-to-nearest, asymmetric, group size "
            f"{metrics.get('lm_head_group_size')})")
    meta = card.front_matter(lineage, "quantized", card.LIBRARY["ir"], tags=("openvino", "int4", "gptq", "nncf"))
    text = f"""# {name} — OpenVINO INT4 (exact GPTQ integers)

Exported by `tangquant export --format openvino` from the GPTQ checkpoint `{name}`.

- Linear layers: INT4, {mode}, group size {metrics['group_size']}; the {metrics['int4_layers']} layers'
  integers, fp16 scales and zero points are the checkpoint's own (checked on export:
  {metrics['int4_constants_checked']} constants equal).
- {head}.
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

{card.use_section(SERVE_API, heading=False)}
## Exactness

OpenVINO's CPU defaults trade exactness for speed: bf16 inference precision on CPUs with
AMX/AVX512-bf16, and dynamic int8 quantization of activations in front of INT4 weights. To compare
against the fp32 PyTorch reference, compile with `INFERENCE_PRECISION_HINT=f32` and
`DYNAMIC_QUANTIZATION_GROUP_SIZE=0`.
"""
    card.write(out_dir, meta, text)
