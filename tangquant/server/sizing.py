"""Sizing the continuous-batching engine: KV bytes per token, the cache, the IR's runtime options.

A sequence's KV cache costs, per token, layers x KV heads x head dim x 2 (keys and
values) x the bytes of the cache's element type: 0.5 MiB for Qwen1.5-7B in bf16/f16,
0.25 MiB in u8 (plus a few bytes of u8 scales, left out). The default cache is sized
from that and the memory free at start: it grows as needed while ``max_num_seqs``
full-context sequences fit in half the free memory, and is a fixed size of half the
free memory (whole GB, as OVMS takes it) otherwise, so a busy server preempts
sequences instead of exhausting the machine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import openvino as ov
import openvino_genai
import psutil

from tangquant.errors import InputError
from tangquant import load
from tangquant.files import human_size
from tangquant.ov import runtime

logger = logging.getLogger(__name__)

GB = 1 << 30
# Element types by the names OpenVINO properties use.
ELEMENT_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "u8": 1, "i8": 1, "u4": 0.5}
# Runtime options that are openvino-genai's, not the plugin's: the continuous-batching
# engine always uses paged attention, so an SDPA choice cannot apply.
GENAI_ONLY = {"ATTENTION_BACKEND"}


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    context: int

    def bytes_per_token(self, element_bytes: float) -> float:
        return self.layers * self.kv_heads * self.head_dim * 2 * element_bytes


def kv_shape(model_dir: Path) -> KVShape:
    """The attention shape from ``config.json`` (GQA heads and an explicit head_dim included)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise InputError(f"{model_dir} has no config.json: cannot size the KV cache")
    cfg = load.model_config(model_dir)
    cfg = cfg.get("text_config", cfg)
    try:
        layers, heads = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path} lacks the attention shape ({exc})") from None
    context = next((int(cfg[k]) for k in ("max_position_embeddings", "seq_length", "n_positions")
                    if isinstance(cfg.get(k), int) and cfg[k] > 0), 2048)
    return KVShape(layers, kv_heads, head_dim, context)


def runtime_options(model_dir: Path) -> dict[str, str]:
    """``rt_info/runtime_options`` of the IR (what export and ``tangquant tune`` write)."""
    return runtime.read(model_dir)


def plugin_properties(model_dir: Path, device: str, overrides: dict[str, str]) -> tuple[dict, dict]:
    """(properties for the pipeline, what was left out and why): the IR's runtime options, then
    ``overrides`` (``--ov-config``); keys the device does not know are left out, not fatal."""
    wanted = {**runtime_options(model_dir), **overrides}
    supported = set(ov.Core().get_property(device, "SUPPORTED_PROPERTIES"))
    props, skipped = {}, {}
    for key, value in wanted.items():
        if key in GENAI_ONLY:
            skipped[key] = "the continuous-batching engine always uses paged attention"
        elif key not in supported:
            skipped[key] = f"not a {device} property"
        else:
            props[key] = value
    return props, skipped


def single_thread_crash(props: dict, device: str, flags: set[str]) -> str | None:
    """Why one inference thread must not be set here, or None. OpenVINO 2026.4's CPU plugin dies
    with SIGFPE running bf16 (its default where AMX is) on one thread (measured on an AMX Xeon,
    2026-12-02; f32 on one thread, and bf16 on two, ran): a server would die at its first step."""
    if device != "CPU" or str(props.get("INFERENCE_NUM_THREADS")) != "1" or "amx_bf16" not in flags:
        return None
    if str(props.get("INFERENCE_PRECISION_HINT", "bf16")).lower() in ("f32", "float32", "float"):
        return None
    return "OpenVINO 2026.4 crashes running bf16 on one thread of an AMX CPU; all threads are used"


def kv_element_bytes(device: str, props: dict) -> tuple[str, float]:
    """The KV cache's element type (the property if set, else the device's default) and its bytes."""
    name = props.get("KV_CACHE_PRECISION")
    if name is None:
        try:
            name = str(ov.Core().get_property(device, "KV_CACHE_PRECISION"))
        except RuntimeError:
            name = "f16"
    key = {"uint8_t": "u8", "float16": "f16", "bfloat16": "bf16", "float": "f32",
           "float32": "f32", "int8_t": "i8"}.get(name.lower(), name.lower())
    return key, ELEMENT_BYTES.get(key, 2)


@dataclass(frozen=True)
class Plan:
    """The scheduler settings and the figures they came from (printed at start)."""
    scheduler: object
    kv_bytes_per_token: float
    kv_type: str
    free_bytes: int
    cache_tokens: int | None   # tokens the fixed cache holds; None when it grows as needed

    def describe(self) -> str:
        s = self.scheduler
        cache = (f"{s.cache_size} GB fixed ({self.cache_tokens} tokens)" if s.cache_size
                 else "grows as needed")
        return (f"KV cache {self.kv_bytes_per_token / (1 << 20):.3g} MiB/token ({self.kv_type}), "
                f"{cache}; {human_size(self.free_bytes)} free; "
                f"max-num-seqs {s.max_num_seqs}, max-num-batched-tokens "
                f"{s.max_num_batched_tokens}, prefix caching "
                f"{'on' if s.enable_prefix_caching else 'off'}")


def plan(shape: KVShape, kv_type: str, element_bytes: float, cfg, weights_bytes: int) -> Plan:
    """A ``SchedulerConfig`` from the flags, the default cache sized as the module says."""
    per_token = shape.bytes_per_token(element_bytes)
    free = int(psutil.virtual_memory().available)
    budget = max(0, free - weights_bytes) // 2
    sched = openvino_genai.SchedulerConfig()
    sched.max_num_seqs = cfg.max_num_seqs
    sched.enable_prefix_caching = cfg.enable_prefix_caching
    if cfg.max_num_batched_tokens:
        sched.max_num_batched_tokens = cfg.max_num_batched_tokens
    if cfg.cache_size is not None:
        sched.cache_size = cfg.cache_size
    elif cfg.max_num_seqs * shape.context * per_token <= budget and not cfg.enable_prefix_caching:
        sched.cache_size = 0
    else:
        # Prefix caching keeps blocks until the cache is full, so it needs a fixed size.
        sched.cache_size = max(1, budget // GB)
    tokens = int(sched.cache_size * GB // per_token) if sched.cache_size else None
    return Plan(sched, per_token, kv_type, free, tokens)
