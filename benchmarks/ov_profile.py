"""Where a decoded token's time goes in an OpenVINO IR: a PERF_COUNT profile of the decode steps.

Compiles the IR's ``openvino_model.xml`` on the CPU with ``PERF_COUNT`` (plus the IR's own
runtime options, which OpenVINO's core applies, and any ``--prop``), prefills ``-p`` random
token ids, steps ``-n`` decode tokens one at a time, and sums each node's ``real_time`` over
the decode steps only (a request's profiling_info is a running mean: two snapshots give the
decode steps' own), by node type (fully connected by weight precision, attention, gather,
other) and by layer. Each fully-connected node's effective GB/s (the bytes of its constant
inputs as the compiled model holds them, over its time) is set against the read bandwidth
measured here with the same threads (``tangquant.measure.roofline.read_bandwidth``). The gap
between the nodes' sum and the wall time of a step is the runtime's own per-step cost.

This is plain OpenVINO with the stateful SDPA graph; openvino-genai's default pipeline swaps
in paged attention, whose attention time this does not show.

  python benchmarks/ov_profile.py --model /tmp/q05-ov -t 2 -p 128 -n 32 --json out.json

``--sweep OUT`` (the Xeon study, one call of at most ``--budget-s`` seconds): every
``--models NAME=IR`` at every ``-t`` count, with each of ``--variants`` (OpenVINO's knobs:
precision hints, DYNAMIC_QUANTIZATION_GROUP_SIZE, KV_CACHE_PRECISION, pinning, hyper-threading;
:data:`VARIANTS`) profiled in its own process; the openvino-genai pipeline timed with the
stateful SDPA graph against paged attention / continuous batching (``ATTENTION_BACKEND``,
through the bench's own worker); and the INT4 weight layout (i4 symmetric vs u4 with zero
points, group 128 vs channel-wise) on stacks of decoder-sized fully-connected layers built in
memory at the ``--layout-shapes`` dimensions (random weights, speed only). Everything lands in
OUT as ``sweep.json`` and ``sweep.md``, written after every measurement, so a call cut short
keeps what it measured; what the budget left out is listed as skipped.

  python benchmarks/ov_profile.py --sweep OUT --models 1.8b=/w/q18-ov --models 7b=/w/q7-ov \
      -t 16 -t 8 --layout-shapes 1.8b,7b --budget-s 540
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov

ROOT = Path(__file__).resolve().parent.parent  # this checkout's tangquant, not an installed one
sys.path.insert(0, str(ROOT))
from tangquant.ov.gate import stateful_feed  # noqa: E402
WARM = 3  # the prefill and two decode steps
ATTENTION = ("ScaledDotProductAttention", "PagedAttention", "SDPA")
_LAYER = re.compile(r"layers\.(\d+)\.")


def _rt(op, key: str) -> str:
    info = op.get_rt_info()
    return info[key].astype(str) if key in info else ""


def fc_nodes(compiled) -> dict[str, dict]:
    """Fully-connected nodes of the compiled model: weight precision and constant-input bytes."""
    out = {}
    for op in compiled.get_runtime_model().get_ops():
        if not _rt(op, "layerType").startswith("FullyConnected"):
            continue
        nbytes = 0
        for i in op.inputs():
            src = i.get_source_output().get_node()
            if _rt(src, "layerType") == "Const" and i.get_partial_shape().is_static:
                numel = int(np.prod(i.get_partial_shape().to_shape())) if len(i.get_partial_shape()) else 1
                nbytes += numel * i.get_element_type().bitwidth // 8
        out[op.get_friendly_name()] = {"precision": _rt(op, "runtimePrecision"), "bytes": nbytes}
    return out


def category(node_type: str, name: str, fcs: dict) -> str:
    if name in fcs:
        return f"FullyConnected {fcs[name]['precision']}"
    if any(a in node_type for a in ATTENTION):
        return "attention"
    if node_type.startswith("Gather"):
        return "gather"
    return "other"


def layer_of(name: str) -> str:
    m = _LAYER.search(name)
    return f"layer {int(m.group(1)):02d}" if m else "lm_head" if "lm_head" in name else "outside layers"


def profile(model: Path, threads: int, prompt: int, steps: int, props: dict) -> dict:
    core = ov.Core()
    compiled = core.compile_model(str(model / "openvino_model.xml"), "CPU",
                                  {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": threads, **props})
    fcs = fc_nodes(compiled)
    names = {p.get_any_name() for p in compiled.inputs}
    req = compiled.create_infer_request()
    req.reset_state()
    rng = np.random.default_rng(0)
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    ids = rng.integers(3, min(vocab, 151643), size=(1, prompt))
    walls, past, snap = [], 0, {}
    for step in range(steps + WARM):  # the prefill and the first decode steps (kernels JIT) don't count
        n = ids.shape[1]
        feed = stateful_feed(names, ids, past)
        t0 = time.perf_counter()
        req.infer(feed)
        wall = time.perf_counter() - t0
        token = int(req.get_output_tensor(0).data[0, -1].argmax())
        past += n
        ids = np.array([[token]], dtype=np.int64)
        if step >= WARM:
            walls.append(wall)
        if step in (WARM - 1, steps + WARM - 1):
            snap[step + 1] = {p.node_name: (p.real_time.total_seconds(), p.node_type)
                              for p in req.profiling_info}
    # A request's profiling_info is each node's mean over every infer so far (measured: it falls
    # step by step after the prefill), so the decode steps' mean is recovered from two snapshots.
    w, total = WARM, steps + WARM
    per_node = {k: max(0.0, (total * t - w * snap[w].get(k, (0.0,))[0]) / steps)
                for k, (t, _) in snap[total].items()}
    return {"fcs": fcs, "per_node": per_node, "node_type": {k: v[1] for k, v in snap[total].items()},
            "wall_s": float(np.median(walls)), "wall_mean_s": float(np.mean(walls)), "options": {
                k: _shown(compiled.get_property(k)) for k in ("INFERENCE_PRECISION_HINT",
                                                              "KV_CACHE_PRECISION",
                                                              "DYNAMIC_QUANTIZATION_GROUP_SIZE")}}


def _shown(value) -> str:
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


def summarise(res: dict, read_gbs: float, bytes_per_token: int) -> dict:
    """Times per category and layer; ``runtime_gap_ms`` compares the nodes' mean with the mean
    wall time of a step (both means over the same steps)."""
    by_cat, by_layer = collections.Counter(), collections.Counter()
    for name, t in res["per_node"].items():
        by_cat[category(res["node_type"][name], name, res["fcs"])] += t
        by_layer[layer_of(name)] += t
    nodes = sum(res["per_node"].values())
    fc_rows = []
    for name, info in res["fcs"].items():
        t = res["per_node"].get(name, 0.0)
        if t > 0:
            gbs = info["bytes"] / t / 1e9
            fc_rows.append({"node": name, **info, "us": t * 1e6, "gbs": gbs,
                            "pct_read_bw": 100 * gbs / read_gbs})
    fc_bytes = sum(r["bytes"] for r in fc_rows)
    fc_time = sum(r["us"] for r in fc_rows) / 1e6
    return {"wall_ms": res["wall_s"] * 1e3, "tg_tps": 1 / res["wall_s"], "nodes_ms": nodes * 1e3,
            "runtime_gap_ms": (res["wall_mean_s"] - nodes) * 1e3, "wall_mean_ms": res["wall_mean_s"] * 1e3, "read_gbs": read_gbs,
            "bytes_per_token": bytes_per_token,
            "roofline_tps": read_gbs * 1e9 / bytes_per_token,
            "roofline_pct": 100 * (1 / res["wall_s"]) / (read_gbs * 1e9 / bytes_per_token),
            "fc_bytes": fc_bytes, "fc_gbs": fc_bytes / fc_time / 1e9 if fc_time else 0.0,
            "by_category_ms": {k: v * 1e3 for k, v in by_cat.most_common()},
            "by_layer_ms": {k: v * 1e3 for k, v in sorted(by_layer.items())},
            "fc": sorted(fc_rows, key=lambda r: -r["us"]), "options": res["options"]}


def markdown(s: dict, title: str) -> str:
    lines = [f"### {title}", "",
             f"decode step {s['wall_ms']:.2f} ms median ({s['tg_tps']:.1f} t/s), {s['wall_mean_ms']:.2f} ms "
             f"mean; nodes sum {s['nodes_ms']:.2f} ms, runtime gap {s['runtime_gap_ms']:.2f} ms; {s['bytes_per_token'] / 1e6:.1f} MB/token, read "
             f"bandwidth {s['read_gbs']:.1f} GB/s → roofline {s['roofline_tps']:.1f} t/s, "
             f"{s['roofline_pct']:.0f}% of it; FC nodes together {s['fc_gbs']:.1f} GB/s "
             f"({100 * s['fc_gbs'] / s['read_gbs']:.0f}% of read bandwidth). Options: "
             + ", ".join(f"{k}={v}" for k, v in s["options"].items()), "",
             "| node type | ms/token | share of step |", "|---|---:|---:|"]
    for k, v in s["by_category_ms"].items():
        lines.append(f"| {k} | {v:.3f} | {100 * v / s['wall_mean_ms']:.1f}% |")
    lines.append(f"| runtime gap (wall − nodes) | {s['runtime_gap_ms']:.3f} | "
                 f"{100 * s['runtime_gap_ms'] / s['wall_mean_ms']:.1f}% |")
    lines += ["", "| slowest FC nodes | precision | MB | µs | GB/s | % read bw |", "|---|---|---:|---:|---:|---:|"]
    for r in s["fc"][:8]:
        lines.append(f"| {r['node'].split('/')[0]} | {r['precision']} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['us']:.0f} | {r['gbs']:.1f} | {r['pct_read_bw']:.0f}% |")
    layers = s["by_layer_ms"]
    lines += ["", "per layer (ms/token): " + ", ".join(f"{k} {v:.2f}" for k, v in layers.items())]
    return "\n".join(lines)


# name -> OpenVINO properties, each profiled over the IR's own runtime options
VARIANTS = {
    "defaults": {},
    "f32": {"INFERENCE_PRECISION_HINT": "f32"},
    "bf16": {"INFERENCE_PRECISION_HINT": "bf16"},
    "dq0": {"DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"},
    "dq32": {"DYNAMIC_QUANTIZATION_GROUP_SIZE": "32"},
    "dq128": {"DYNAMIC_QUANTIZATION_GROUP_SIZE": "128"},
    "kv-u8": {"KV_CACHE_PRECISION": "u8"},
    "kv-f16": {"KV_CACHE_PRECISION": "f16"},
    "pin-yes": {"ENABLE_CPU_PINNING": "YES"},
    "pin-no": {"ENABLE_CPU_PINNING": "NO"},
    "ht-no": {"ENABLE_HYPER_THREADING": "NO"},
}
BACKENDS = ("SDPA", "PA")  # openvino-genai: the stateful graph, or paged attention (continuous batching)
LAYOUTS = ("i4-g128", "i4-channel", "u4-g128", "u4-channel")


def main(argv=None) -> int:
    if argv is None and "--sweep" in sys.argv:
        from ov_sweep import sweep_main  # noqa: E402 (beside this script)

        return sweep_main(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--prompt-tokens", type=int, default=128)
    ap.add_argument("-n", "--steps", type=int, default=32)
    ap.add_argument("--prop", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--bandwidth-mb", type=int, default=1024)
    ap.add_argument("--title", default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import torch

    from tangquant.measure.roofline import bytes_per_token, read_bandwidth

    torch.set_num_threads(args.threads)
    read_gbs = read_bandwidth(args.bandwidth_mb << 20)
    props = dict(p.split("=", 1) for p in args.prop)
    res = profile(args.model, args.threads, args.prompt_tokens, args.steps, props)
    s = summarise(res, read_gbs, bytes_per_token("ov", args.model, {})["bytes_per_token"])
    s.update(model=str(args.model), threads=args.threads, prompt_tokens=args.prompt_tokens,
             steps=args.steps, props=props)
    if args.json:
        args.json.write_text(json.dumps(s, indent=1))
    print(markdown(s, args.title or args.model.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
