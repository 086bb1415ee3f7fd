"""The OpenVINO option vocabulary: which candidate keys are plugin properties, which only
openvino-genai reads, how their string values become typed ones, and the grid ``tune`` sweeps.

One module for everything that knows OpenVINO's names, shared by the bench runner, the fidelity
gate, ``tune`` and ``serve``. Standard library only at import (openvino-genai is imported by
:func:`scheduler_config`, which needs it).
"""

from __future__ import annotations

from dataclasses import dataclass

from tangquant.errors import InputError, short

# Options of the ov kinds that are tangquant's own, not OpenVINO properties (engines.ENGINES).
OWN_KEYS = ("device", "adapter", "alpha", "lora_mode", "dtype", "cache_size", "enable_prefix_caching",
            "draft", "draft_tokens")
# Options only openvino-genai reads (not CPU plugin properties; never written into runtime_options).
GENAI_KEYS = ("ATTENTION_BACKEND", "cache_size", "enable_prefix_caching", "draft", "draft_tokens")
SCHEDULER_KEYS = ("cache_size", "enable_prefix_caching")
# The CPU plugin's defaults of these keys are read on the machine (a candidate equal to them is not run).
DEFAULT_KEYS = ("KV_CACHE_PRECISION", "KEY_CACHE_PRECISION", "VALUE_CACHE_PRECISION",
                "DYNAMIC_QUANTIZATION_GROUP_SIZE", "INFERENCE_PRECISION_HINT")


def value(text):
    """Option values arrive as strings; OpenVINO wants typed hints for a few keys."""
    if isinstance(text, str) and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if isinstance(text, str) and text.lstrip("-").isdigit():
        return int(text)
    return text


def properties(options: dict, plugin_only: bool = False) -> dict:
    """The OpenVINO properties among a candidate's options, typed; with ``plugin_only`` also
    without the openvino-genai-only keys (for a plain ``Core.compile_model``)."""
    skip = OWN_KEYS + (GENAI_KEYS if plugin_only else ())
    return {k: value(v) for k, v in options.items() if k not in skip}


def scheduler_config(options: dict):
    """openvino-genai's SchedulerConfig from the ``cache_size`` (GB) and ``enable_prefix_caching``
    options (``tangquant tune`` sweeps them), or None when neither is given."""
    if not any(k in options for k in SCHEDULER_KEYS):
        return None
    import openvino_genai as genai

    sched = genai.SchedulerConfig()
    if "cache_size" in options:
        sched.cache_size = int(options["cache_size"])
    if "enable_prefix_caching" in options:
        sched.enable_prefix_caching = str(options["enable_prefix_caching"]).strip().lower() in (
            "1", "true", "yes", "on")
    return sched


def pipeline_properties(options: dict) -> dict:
    """What ``LLMPipeline(path, device, **props)`` takes for a candidate: its properties and,
    when it sets one, the scheduler."""
    props = properties(options)
    sched = scheduler_config(options)
    if sched is not None:
        props["scheduler_config"] = sched
    return props


def check_values(device: str, props: dict[str, str], where) -> None:
    """Refuse a property value ``device`` does not take, asked of OpenVINO itself (a throwaway
    ``Core``: its plugin, once created, checks each ``set_property`` at once), so nothing
    writes a value a runtime would refuse later (OVMS at its start, for ``ovms-repo``)."""
    import openvino as ov

    core = ov.Core()
    core.get_property(device, "SUPPORTED_PROPERTIES")  # creates the plugin
    for key, text in props.items():
        try:
            core.set_property(device, {key: text})
        except RuntimeError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()
                     and not line.startswith(("Exception from", "Check '"))]
            why = " ".join(lines)[:300] or "refused"
            raise InputError(f"{where}: {key}={short(text)} is not a value the {device} device "
                             f"takes ({why})") from None


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple[dict, ...]   # each tried on top of the best so far; {} is the default
    needs_pa: bool = False     # scheduler settings exist only on the paged-attention backend


AXES = ("kv", "dq", "precision", "attention", "threads", "scheduler", "draft")
DRAFT_TOKENS = (2, 3, 4, 5, 6, 8)  # K tried when tune is given a draft (off, the default, is {})


def tune_grid(names: tuple[str, ...], threads: int, flags: set[str], cpus: int,
              draft: str | None = None) -> list[Axis]:
    """The documented grid (docs/commands.md#tune), restricted to ``names``; with a ``draft``
    model, speculative decoding off (the default) or on with each K of ``DRAFT_TOKENS``."""
    precisions = [{"INFERENCE_PRECISION_HINT": "f32"}]
    if flags & {"avx512_bf16", "amx_bf16"}:
        precisions.append({"INFERENCE_PRECISION_HINT": "bf16"})
    near = sorted({t for t in (threads - 1, threads + 1, 2 * threads) if 1 <= t <= cpus and t != threads})
    axes = {
        "kv": Axis("kv", ({}, {"KV_CACHE_PRECISION": "f16"}, {"KV_CACHE_PRECISION": "u8"},
                          {"KEY_CACHE_PRECISION": "u8", "VALUE_CACHE_PRECISION": "u4"},
                          {"KEY_CACHE_PRECISION": "u4", "VALUE_CACHE_PRECISION": "u4"})),
        "dq": Axis("dq", ({},) + tuple({"DYNAMIC_QUANTIZATION_GROUP_SIZE": str(g)} for g in (0, 32, 64, 128))),
        "precision": Axis("precision", ({},) + tuple(precisions)),
        "attention": Axis("attention", ({}, {"ATTENTION_BACKEND": "SDPA"})),
        "threads": Axis("threads", ({},) + tuple({"INFERENCE_NUM_THREADS": str(t)} for t in near)),
        "scheduler": Axis("scheduler", ({}, {"enable_prefix_caching": "false"}, {"cache_size": "1"}),
                          needs_pa=True),
        # Speculative decoding runs on the paged-attention pipeline only (openvino-genai 2026.4).
        "draft": Axis("draft", ({},) + tuple({"draft": str(draft), "draft_tokens": str(k)}
                                             for k in (DRAFT_TOKENS if draft else ())), needs_pa=True),
    }
    return [axes[n] for n in names if n in axes]  # the names other engines sweep are theirs


def split_winner(options: dict) -> tuple[dict, dict]:
    """(what goes into runtime_options, what only a caller can set: genai options, threads)."""
    runtime = {k: v for k, v in options.items() if k not in GENAI_KEYS + ("INFERENCE_NUM_THREADS",)}
    caller = {k: v for k, v in options.items() if k not in runtime}
    return runtime, caller
