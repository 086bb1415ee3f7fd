"""peft LoRA adapters served on the base IR (``--adapter NAME=DIR``), read as ``merge`` reads them.

Every adapter goes through merge's reader first (``tangquant.lora``): its files inside its
folder after symlinks, its config a valid LoRA config with a finite alpha, the whole weights
file parsed with every value finite, every tensor planned against the base's shapes (from its
``config.json``: an IR holds no Hugging Face tensors). Then what openvino-genai adds:
it reads only ``adapter_model.safetensors`` and ignores ``adapter_config.json``, so the scale
peft applies must be passed as the adapter's alpha: ``lora_alpha / r`` (``lora_alpha /
sqrt(r)`` with rsLoRA). One alpha per adapter cannot express peft's per-module
``rank_pattern`` / ``alpha_pattern``, and DoRA, trained token rows and ``modules_to_save`` are
not a plain ``W + s*B@A``; such adapters are refused rather than served wrong, and so are
tensors genai would silently skip. Any refusal is one line naming the adapter.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import openvino_genai

from tangquant import lora
from tangquant.errors import AdapterError, TangquantError, first_line
from tangquant.load import model_config

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


def base_shapes(cfg: dict) -> dict:
    """name -> (shape, dtype, file) of the base's tensors an adapter may touch, as ``lora.plan``
    takes them from a checkpoint's headers (an IR has none: they follow from its config)."""
    dims, shapes = _dims(cfg), {}
    for i in range(int(cfg["num_hidden_layers"])):
        for proj, (fan_in, fan_out) in dims.items():
            part = "self_attn" if proj[0] in "qkvo" else "mlp"
            shapes[f"model.layers.{i}.{part}.{proj}.weight"] = ((fan_out, fan_in), None, None)
    embedding = ((int(cfg["vocab_size"]), int(cfg["hidden_size"])), None, None)
    shapes["model.embed_tokens.weight"] = embedding
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = embedding
    return shapes


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
    """Check ``adir`` as merge would, then against what genai applies; return its scale."""
    lcfg, raw = lora.adapter_config(adir)  # inside its folder, a valid LoRA config, a finite alpha
    alpha = scale(raw, str(adir))
    if not (Path(adir) / WEIGHTS).is_file():
        raise AdapterError(f"{adir} has no {WEIGHTS} (pickled adapters are not served)")
    tensors, _ = lora.adapter_tensors(Path(adir), allow_pickle=False)  # all parsed, all finite
    dims, layers = _dims(base_config), int(base_config["num_hidden_layers"])
    for name, t in tensors.items():
        m = _KEY.match(name)
        if not m or m.group(3) not in dims or int(m.group(1)) >= layers:  # genai would skip it
            raise AdapterError(f"{adir}: tensor {name[:120]} matches no linear layer of the base "
                               f"({layers} layers of {', '.join(dims)})")
        fan_in, fan_out = dims[m.group(3)]
        want = (raw["r"], fan_in) if m.group(4) == "A" else (fan_out, raw["r"])
        if tuple(t.shape) != want:
            raise AdapterError(f"{adir}: {name} is {list(t.shape)}, but the base needs {list(want)}; "
                               "the adapter was trained for another model")
    lora.plan(base_config, lcfg, tensors, base_shapes(base_config))  # and everything merge checks
    return alpha


def load(specs: dict[str, str], model_dir: Path, taken: tuple[str, ...]) -> dict:
    """name -> (openvino_genai.Adapter, alpha) for ``--adapter NAME=DIR`` specs."""
    base_config = model_config(model_dir)
    out = {}
    for name, path in specs.items():
        if name in taken:
            raise AdapterError(f"--adapter {name}: the name is already the base model's")
        try:
            alpha = check(Path(path), base_config)
            out[name] = (openvino_genai.Adapter(str(Path(path) / WEIGHTS)), alpha)
        except (TangquantError, RuntimeError) as exc:  # never the base model's fault
            raise AdapterError(f"--adapter {name}={path}: {first_line(exc, 400)}") from None
    return out
