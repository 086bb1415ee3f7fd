"""llama.cpp's knobs as ``tangquant tune`` sweeps them (the ``llamacpp`` row's options).

Standard library only. The values are llama.cpp's own flags: ``repack`` (``--no-repack``), ``fa``
(``-fa``), ``ctk``/``ctv`` (``-ctk``/``-ctv``: a quantized V cache needs flash attention, which
llama.cpp's ``auto`` turns on for the CPU), and the thread count, which is the worker's (``-t``),
not an option of the row: :data:`THREADS` marks it in a setting and the search takes it out.
"""

from __future__ import annotations

from pathlib import Path

from tangquant.errors import ParameterError
from tangquant.ov.options import Axis

AXES = ("repack", "fa", "kv", "threads")
THREADS = "threads"
# llama.cpp's own values of the options (a candidate equal to them is not run).
DEFAULTS = {"repack": "1", "fa": "auto", "ctk": "f16", "ctv": "f16"}
# KV-cache bytes per element, blocks included (ggml's block sizes: q8_0 is 34 bytes per 32 values).
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
            "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}


def tune_grid(names: tuple[str, ...], threads: int, flags: set[str], cpus: int) -> list[Axis]:
    """The grid (docs/commands.md#tune) restricted to the names this engine has, in their order."""
    near = sorted({t for t in (threads - 1, threads + 1, 2 * threads) if 1 <= t <= cpus and t != threads})
    axes = {
        "repack": Axis("repack", ({}, {"repack": "0"})),
        "fa": Axis("fa", ({}, {"fa": "on"}, {"fa": "off"})),
        "kv": Axis("kv", ({}, {"ctk": "q8_0", "ctv": "q8_0"}, {"ctk": "q8_0", "ctv": "q4_0"},
                          {"ctk": "q4_0", "ctv": "q4_0"})),
        "threads": Axis("threads", ({},) + tuple({THREADS: str(t)} for t in near)),
    }
    return [axes[n] for n in names if n in axes]


def kv_bytes_per_token(config: dict, options: dict) -> float:
    """K and V bytes one token costs in llama.cpp's cache, from the model's shape and -ctk/-ctv."""
    layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    per = KV_BYTES[options.get("ctk") or "f16"] + KV_BYTES[options.get("ctv") or "f16"]
    return layers * kv_heads * head_dim * per


def context_for(config: dict, model: Path, n_seqs: int, options: dict, cache_gb: int | None = None) -> int:
    """Tokens of context for each of ``n_seqs`` llama.cpp sequences: the model's, cut to what
    ``cache_gb`` of KV cache holds (0: no cut), by default half the memory left beside the weights
    (llama.cpp allocates the whole cache when it loads)."""
    import psutil  # a dependency of tangquant itself, light

    model_ctx = int(config.get("max_position_embeddings") or 4096)
    if cache_gb == 0:
        return model_ctx
    budget = cache_gb * 2**30 if cache_gb else 0.5 * (psutil.virtual_memory().available - Path(model).stat().st_size)
    fits = int(budget // (n_seqs * kv_bytes_per_token(config, options)))
    if fits < min(256, model_ctx):
        raise ParameterError(f"the KV cache of {n_seqs} llama.cpp sequence(s) does not fit in "
                             f"{max(budget, 0) / 2**30:.1f} GB: fewer sequences, or a quantized ctk/ctv")
    return min(model_ctx, fits // 256 * 256 or fits)
