"""The one loader: any model directory to the runtime object a stage needs, with one set of checks.

:func:`inspect` tells what a directory is — an OpenVINO IR (``openvino_model.xml``),
a GPTQ checkpoint (``quantization_config`` with ``quant_method: gptq``), a
full-precision Hugging Face model, or a qwen2 GGUF (a ``.gguf`` file, or a
directory holding one and no ``config.json``) — and refuses, with one line naming the fix,
what no stage reads: a LoRA adapter directory, another quantization method, a
truncated IR, pickle-only weights without ``allow_pickle``. The loaders below
all start from it:

- :func:`torch_model`: a plain ``transformers`` model in fp32 (GPTQ layers
  dequantised exactly, GGUF tensors dequantised by gguf's own numpy code),
  optionally with a peft adapter on top;
- :func:`logits_model`: something whose ``model(input_ids=...).logits`` works,
  for fidelity measurements (an IR compiled in exact mode);
- :func:`genai_pipeline`: an openvino-genai ``LLMPipeline`` of an IR.

An ONNX Runtime GenAI directory (``genai_config.json`` beside its ``model.onnx``) is told too,
as kind ``ortgenai``: only the ``ortgenai`` bench kind reads it.

Heavy libraries are imported by the loader that needs them, so stages can
inspect a directory before paying for torch or OpenVINO.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tangquant import checkpoint, counts
from tangquant.errors import InputError, QuantizedModelError
from tangquant.files import parsing, read_json
from tangquant.gptq import GPTQCheckpoint, is_gptq
from tangquant.ortgenai import model as ortgenai_model
from tangquant.ov.ir import EXACT_CONFIG, MODEL_XML, check_ir_files, is_ir_dir

KINDS = ("ir", "gptq", "hf")
LOGIT_KINDS = KINDS + ("gguf",)  # what logits_model (eval) reads


@dataclass(frozen=True)
class ModelDir:
    """A checked model directory: its ``kind`` (ir, gptq or hf) and ``config.json``."""

    path: Path
    kind: str
    config: dict
    gptq: GPTQCheckpoint | None = None


def inspect(path, kinds: tuple[str, ...] = KINDS, allow_pickle: bool = False,
            what: str = "model directory") -> ModelDir:
    """Check ``path`` and tell what it is; refuse a kind not in ``kinds``."""
    if isinstance(path, ModelDir):
        return path
    if isinstance(path, GPTQCheckpoint):
        return ModelDir(path.path, "gptq", path.config, path)
    if is_gguf(path):
        found = _gguf_dir(path)
    elif ortgenai_model.is_model_dir(path):
        found = ModelDir(checkpoint.open_dir(path, what), "ortgenai", ortgenai_model.config(path))
    else:
        found = _model_dir(checkpoint.open_dir(path, what), kinds, allow_pickle)
    if found.kind not in kinds:
        names = {"ir": "an OpenVINO IR (tangquant export)", "gptq": "a GPTQ checkpoint",
                 "hf": "a full-precision Hugging Face model", "gguf": "a GGUF file",
                 "ortgenai": "an ONNX Runtime GenAI model directory"}
        raise InputError(f"{path} is {names[found.kind]}; this needs "
                         + " or ".join(names[k] for k in kinds))
    return found


def is_gguf(path) -> bool:
    p = Path(path)
    return (p.is_file() and p.suffix == ".gguf") or (
        p.is_dir() and not (p / "config.json").exists() and any(p.glob("*.gguf")))


def _gguf_dir(path) -> ModelDir:
    from tangquant.gguf import reader  # gguf and numpy, only for a GGUF

    f = reader.find(path)
    return ModelDir(f, "gguf", reader.config(reader.open_reader(f), f))


def _model_dir(path: Path, kinds, allow_pickle: bool) -> ModelDir:
    if kinds == ("ir",) and not is_ir_dir(path):
        raise InputError(f"{path} is not an exported OpenVINO model (no {MODEL_XML}); make one with "
                         "`tangquant export --format openvino`")
    if is_ir_dir(path):
        check_ir_files(path)  # a missing or truncated .bin gets a clear error, not OpenVINO's
        config_path = path / "config.json"
        config = read_json(config_path, "model config") if config_path.is_file() else {}
        found = ModelDir(path, "ir", config)
    else:
        config = checkpoint.load_config(path)
        if is_gptq(config):
            ckpt = GPTQCheckpoint.open(path)
            found = ModelDir(path, "gptq", ckpt.config, ckpt)
        elif config.get("quantization_config"):
            qc = config["quantization_config"]
            method = qc.get("quant_method", "an unknown method") if isinstance(qc, dict) else "an unknown method"
            raise QuantizedModelError(f"{path} is already quantized ({method}); tangquant reads "
                                      "full-precision, GPTQ and OpenVINO IR models")
        else:
            weights = checkpoint.weight_files(path, allow_pickle=allow_pickle)
            if all(w.suffix == ".safetensors" for w in weights):  # headers only: nothing loaded
                shapes = checkpoint.tensor_shapes(weights)
                counts.check_counts(config, {n: s for n, (s, _, _) in shapes.items()}, path)
            found = ModelDir(path, "hf", config)
    if found.kind == "gptq" and "gptq" not in kinds:
        raise QuantizedModelError(f"{path} is already quantized (gptq); this needs its full-precision "
                                  "(merged) model")
    return found


def torch_model(path, adapter=None, allow_pickle: bool = False, dtype=None):
    """A ``transformers`` causal LM in fp32 (or ``dtype``), GPTQ dequantised exactly, + a peft adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    md = inspect(path, kinds=("gptq", "hf", "gguf"), allow_pickle=allow_pickle)
    if md.kind == "gptq":
        model = _dequantized_model(md.gptq)
    elif md.kind == "gguf":
        model = _gguf_model(md)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(md.path), dtype=torch.float32,
                                                     trust_remote_code=False,
                                                     use_safetensors=not allow_pickle or None)
    if adapter is not None:
        from peft import PeftModel

        from tangquant import lora

        adir = checkpoint.open_dir(adapter, "adapter directory")
        lcfg, _ = lora.adapter_config(adir)  # its rank and alpha usable
        tensors, _ = lora.adapter_tensors(adir, allow_pickle)  # its files inside it, its numbers finite
        # Every tensor against the base, as merge checks it (peft would fail with a traceback).
        shapes = {name: (tuple(t.shape), t.dtype, None) for name, t in model.state_dict().items()}
        lora.plan(md.config, lcfg, tensors, shapes)
        model = PeftModel.from_pretrained(model, str(adir))
    model = model.eval()
    return model.to(dtype) if dtype is not None else model


def _dequantized_model(ckpt: GPTQCheckpoint):
    """A plain ``AutoModelForCausalLM`` holding the checkpoint's exact fp32 weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(ckpt.path, trust_remote_code=False)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return _from_state(config, ckpt.dequantized_state())


def _gguf_model(md: ModelDir):
    """A plain Qwen2 model holding a GGUF's tensors as gguf's dequantiser gives them, in fp32."""
    from transformers import Qwen2Config

    from tangquant.gguf import reader

    _, state = reader.state_dict(md.path)
    return _from_state(Qwen2Config(**md.config), state)


def _from_state(config, state: dict):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # non-persistent buffer left on meta
    model.tie_weights()
    return model.eval()


def logits_model(path, adapter=None):
    """A model for fidelity: HF, GPTQ or GGUF in fp32 (+ adapter), or an IR in exact mode (f32, no
    dynamic quantization), all answering ``model(input_ids=..., attention_mask=...).logits``."""
    md = inspect(path, kinds=LOGIT_KINDS)
    if md.kind != "ir":
        return torch_model(md, adapter=adapter)
    if adapter is not None:
        raise InputError("an adapter applies to Hugging Face models, not to an OpenVINO IR")
    from optimum.intel import OVModelForCausalLM

    with parsing(md.path, "OpenVINO IR", "export it again with `tangquant export`"):
        return OVModelForCausalLM.from_pretrained(str(md.path), ov_config=EXACT_CONFIG, compile=True,
                                                  trust_remote_code=False)


def genai_pipeline(path, device: str = "CPU", **properties):
    """openvino-genai's ``LLMPipeline`` of an IR (``properties``: OpenVINO properties, adapters)."""
    import openvino_genai

    md = inspect(path, kinds=("ir",))
    with parsing(md.path, "OpenVINO IR", "export it again with `tangquant export`"):
        return openvino_genai.LLMPipeline(str(md.path), device, **properties)


def tokenizer(path):
    """The Hugging Face tokenizer of a model directory (remote code never runs)."""
    from transformers import AutoTokenizer

    gguf_file = None
    if isinstance(path, ModelDir) and path.kind == "gguf":
        # The files tangquant's GGUF export puts beside it, else the vocabulary inside the GGUF
        # (what llama-quantize's files hold), which transformers reads with gguf's own reader.
        if not (path.path.parent / "tokenizer_config.json").is_file():
            gguf_file = path.path.name
        path = path.path.parent
    elif isinstance(path, ModelDir):
        path = path.path
    path = Path(path)
    checkpoint.check_contained(path)
    # The tokenizers library raises a bare Exception on a malformed tokenizer.json.
    with parsing(path, "the tokenizer files in", "copy them again from the model they belong to"):
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, gguf_file=gguf_file)


def model_config(path) -> dict:
    """A model directory's ``config.json`` (an adapter directory refused with the fix), for the
    readers that need its shape only (the server's KV sizing, an adapter's base, the demo)."""
    return checkpoint.load_config(Path(path))


def context_length(config: dict) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` and its other names), if known."""
    for key in ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None

