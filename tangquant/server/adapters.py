"""peft LoRA adapters served on the base IR (``--adapter NAME=DIR``), checked before loading.

openvino-genai reads only ``adapter_model.safetensors`` and ignores
``adapter_config.json``, so the scale peft applies must be passed as the
adapter's alpha: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). One
alpha per adapter cannot express peft's per-module ``rank_pattern`` /
``alpha_pattern``, and DoRA, trained token rows and ``modules_to_save`` are not
a plain ``W + s*B@A``; such adapters are refused rather than served wrong. The
tensors' names and shapes are checked against the base's ``config.json`` from
the safetensors header (no tensor is loaded here), because genai would silently
skip tensors that match nothing.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import openvino_genai

from tangquant.load import model_config
from tangquant.errors import AdapterError
from tangquant.files import read_json

WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                  r"lora_(A|B)\.weight$")
# Not a plain W + s*B@A, or not expressible with one alpha: refused.
_REFUSED = ("use_dora", "use_qalora", "lora_bias", "alpha_pattern", "rank_pattern",
            "modules_to_save", "trainable_token_indices", "layer_replication",
            "target_parameters")


def _dims(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection a LoRA may target, from the base's config."""
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    kv = int(cfg.get("num_key_value_heads") or heads) * head_dim
    inter = int(cfg["intermediate_size"])
    return {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def _header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 << 20:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise AdapterError(f"{path} is not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header


def scale(raw: dict, where: str) -> float:
    """peft's scale of an adapter_config.json, after refusing what one alpha cannot express."""
    if str(raw.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{where} is a {raw.get('peft_type')!r} adapter; only LoRA can be served")
    for key in _REFUSED:
        if raw.get(key):
            raise AdapterError(f"{where} sets {key}, which openvino-genai cannot apply as "
                               "W + alpha*B@A; merge it with `tangquant merge` instead")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{where} needs an integer r >= 1 and a numeric lora_alpha")
    return float(alpha) / (math.sqrt(r) if raw.get("use_rslora") else r)


def check(adir: Path, base_config: dict) -> float:
    """Check ``adir`` against the base; return its scale."""
    adir = Path(adir)
    if not (adir / "adapter_config.json").is_file():
        raise AdapterError(f"{adir} has no adapter_config.json; is it a peft adapter directory?")
    raw = read_json(adir / "adapter_config.json", "adapter config")
    alpha = scale(raw, str(adir))
    if not (adir / WEIGHTS).is_file():
        raise AdapterError(f"{adir} has no {WEIGHTS} (pickled adapters are not served)")
    dims, layers = _dims(base_config), int(base_config["num_hidden_layers"])
    header = _header(adir / WEIGHTS)
    if not header:
        raise AdapterError(f"{adir / WEIGHTS} holds no tensors")
    for name, info in header.items():
        m = _KEY.match(name)
        if not m or m.group(3) not in dims or int(m.group(1)) >= layers:
            raise AdapterError(f"{adir}: tensor {name[:120]} matches no linear layer of the base "
                               f"({layers} layers of {', '.join(dims)})")
        fan_in, fan_out = dims[m.group(3)]
        shape = info.get("shape", [])
        want = (raw["r"], fan_in) if m.group(4) == "A" else (fan_out, raw["r"])
        if tuple(shape) != want:
            raise AdapterError(f"{adir}: {name} is {shape}, but the base needs {list(want)}; "
                               "the adapter was trained for another model")
    return alpha


def load(specs: dict[str, str], model_dir: Path, taken: tuple[str, ...]) -> dict:
    """name -> (openvino_genai.Adapter, alpha) for ``--adapter NAME=DIR`` specs."""
    base_config = model_config(model_dir)
    out = {}
    for name, path in specs.items():
        if name in taken:
            raise AdapterError(f"--adapter {name}: the name is already the base model's")
        alpha = check(Path(path), base_config)
        out[name] = (openvino_genai.Adapter(str(Path(path) / WEIGHTS)), alpha)
    return out
