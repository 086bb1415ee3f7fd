"""``ov_profile.py --sweep``: where the IR loses, in one budgeted call that writes as it goes.

Three parts, in this order, each measurement in its own process (a crash or a hang costs
that measurement, not the call), the budget checked before each one starts:

1. ``profile``: ``ov_profile.py`` (PERF_COUNT, decode steps only: per node type, each
   fully-connected node's effective GB/s against the read bandwidth) of every ``--models``
   IR at every ``-t`` thread count with each variant of :data:`ov_profile.VARIANTS`;
2. ``pipeline``: openvino-genai's pipeline timed by the bench's own worker with the
   stateful SDPA graph and with paged attention (``ATTENTION_BACKEND``: the continuous-batching
   path ``serve`` uses), same prompt and decode length;
3. ``layout``: a stack of decoder-sized fully-connected layers (q, k, v, o, gate, up, down at
   the ``--layout-shapes`` dimensions, random INT4 weights, built in memory) compiled in each of
   :data:`ov_profile.LAYOUTS` — i4 symmetric or u4 with zero points, group 128 or channel-wise —
   and timed on one token: the GB/s each layout's weights are read at (random weights, speed only).

``OUT/sweep.json`` (every result, the host record, the command) and ``OUT/sweep.md`` (one table
per part) are rewritten after each measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import ov_profile as prof  # noqa: E402

from tangquant import host  # noqa: E402


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def profile_one(model: Path, threads: int, props: dict, args, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p.json"
        cmd = [sys.executable, str(HERE / "ov_profile.py"), "--model", str(model), "-t", str(threads),
               "-p", str(args.prompt_tokens), "-n", str(args.steps), "--bandwidth-mb", str(args.bandwidth_mb),
               "--json", str(out), *[f"--prop={k}={v}" for k, v in props.items()]]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if not out.exists():
            tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no output"]
            return {"error": f"exit {proc.returncode}: {tail[0][:300]}"}
        s = json.loads(out.read_text())
    s["fc"] = s["fc"][:12]  # the slowest nodes; the JSON stays readable
    return s


def pipeline_one(model: Path, threads: int, backend: str, args, timeout: float) -> dict:
    from tangquant.measure.runner import run_worker

    vocab = json.loads((model / "config.json").read_text()).get("vocab_size", 256)
    spec = {"call": "tangquant.measure.runners.ov:run", "kind": "ov", "path": str(model),
            "options": {"ATTENTION_BACKEND": backend}, "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens, "repetitions": 2, "warmup": 1, "threads": threads,
            "vocab": min(int(vocab), 151643)}
    res = run_worker(spec, sys.executable, int(timeout))
    keep = ("pp_tps", "tg_tps", "tg_tps_std", "ttft_ms", "peak_rss_bytes", "error")
    return {k: res[k] for k in keep if k in res}


def fc_stack(hidden: int, inter: int, layers: int, layout: str, seed: int = 0):
    """A decoder's fully-connected layers, chained, with INT4 weights in ``layout``: Constant(i4|u4,
    [out, groups, group]) → Convert f16 → (− zero point) → × scale → Reshape → MatMul, NNCF's
    pattern, which the CPU plugin fuses into a weight-compressed FullyConnected."""
    import openvino as ov
    import openvino.opset13 as op
    from openvino.op import Constant

    rng = np.random.default_rng(seed)
    sym, channel = layout.startswith("i4"), layout.endswith("channel")

    def packed(kind, shape):
        t = ov.Tensor(kind, ov.Shape(shape))
        t.data[:] = rng.integers(0, 256, size=t.data.shape, dtype=np.uint8)
        return Constant(t)

    def fc(x, n_out, n_in):
        group = n_in if channel else 128
        shape = [n_out, n_in // group, group]
        w = op.convert(packed(ov.Type.i4 if sym else ov.Type.u4, shape), np.float16)
        if not sym:
            w = op.subtract(w, op.convert(packed(ov.Type.u4, [n_out, n_in // group, 1]), np.float16))
        scale = op.constant(rng.uniform(1e-3, 2e-3, size=(n_out, n_in // group, 1)).astype(np.float16))
        w = op.reshape(op.multiply(w, scale), op.constant(np.array([n_out, n_in], dtype=np.int64)), False)
        return op.matmul(x, op.convert(w, np.float32), False, True)

    x0 = op.parameter([1, hidden], np.float32, name="x")
    x = x0
    for _ in range(layers):
        a = op.add(op.add(fc(x, hidden, hidden), fc(x, hidden, hidden)), fc(x, hidden, hidden))
        b = fc(a, hidden, hidden)
        g = op.multiply(fc(b, inter, hidden), fc(b, inter, hidden))
        x = op.multiply(fc(g, hidden, inter), op.constant(np.float32(1e-3)))
    nbytes = layers * (4 * hidden * hidden + 3 * hidden * inter) // 2
    return ov.Model([x], [x0], f"fc-{layout}"), nbytes


def layout_one(shape: str, layout: str, threads: int, layers: int, reps: int) -> dict:
    import openvino as ov

    from tangquant.poet.shapes import qwen_config

    cfg = qwen_config(shape)
    model, nbytes = fc_stack(cfg["hidden_size"], cfg["intermediate_size"], layers, layout)
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
    req = compiled.create_infer_request()
    x = np.random.default_rng(1).standard_normal((1, cfg["hidden_size"])).astype(np.float32)
    for _ in range(3):
        req.infer({0: x})
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        req.infer({0: x})
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"weight_bytes": nbytes, "ms": med * 1e3, "gbs": nbytes / med / 1e9, "layers": layers}


def _child_layout(argv) -> int:
    shape, layout, threads, layers, reps = argv
    print(json.dumps(layout_one(shape, layout, int(threads), int(layers), int(reps))))
    return 0


def layout_in_child(shape, layout, threads, args, timeout) -> dict:
    cmd = [sys.executable, __file__, "--layout-child", shape, layout, str(threads), str(args.layout_layers),
           str(args.layout_reps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no output"]
    return {"error": f"exit {proc.returncode}: {tail[0][:300]}"}


def markdown(record: dict) -> str:
    lines = [f"# ov_profile sweep — {record['host'].get('cpu')}, {record['date']}", "",
             f"`{record['command']}`", "", "## Profile (decode steps, PERF_COUNT)", "",
             "| model | threads | variant | tg t/s | % roofline | FC GB/s | % read bw | FC ms | attention ms "
             "| other ms | runtime gap ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["profile"]:
        s = r["result"]
        if "error" in s:
            lines.append(f"| {r['model']} | {r['threads']} | {r['variant']} | {s['error']} |" + " |" * 7)
            continue
        cat = s["by_category_ms"]
        fc_ms = sum(v for k, v in cat.items() if k.startswith("FullyConnected"))
        lines.append(f"| {r['model']} | {r['threads']} | {r['variant']} | {s['tg_tps']:.2f} | "
                     f"{s['roofline_pct']:.0f}% | {s['fc_gbs']:.1f} | {100 * s['fc_gbs'] / s['read_gbs']:.0f}% | "
                     f"{fc_ms:.2f} | {cat.get('attention', 0):.2f} | {cat.get('other', 0):.2f} | "
                     f"{s['runtime_gap_ms']:.2f} |")
    lines += ["", "## Pipeline (openvino-genai, the bench's worker)", "",
              "| model | threads | ATTENTION_BACKEND | pp t/s | tg t/s | TTFT ms |", "|---|---|---|---|---|---|"]
    for r in record["pipeline"]:
        s = r["result"]
        lines.append(f"| {r['model']} | {r['threads']} | {r['backend']} | " + (
            f"{s['pp_tps']:.1f} | {s['tg_tps']:.2f} | {s['ttft_ms']:.1f} |" if "tg_tps" in s
            else f"{s.get('error')} | | |"))
    lines += ["", "## INT4 layout (fully-connected stacks, random weights, speed only)", "",
              "| shape | threads | layout | weight MB | ms/token | GB/s |", "|---|---|---|---|---|---|"]
    for r in record["layout"]:
        s = r["result"]
        lines.append(f"| {r['shape']} | {r['threads']} | {r['layout']} | " + (
            f"{s['weight_bytes'] / 1e6:.0f} | {s['ms']:.2f} | {s['gbs']:.1f} |" if "gbs" in s
            else f"{s.get('error')} | | |"))
    if record["skipped"]:
        lines += ["", "Skipped (budget): " + "; ".join(record["skipped"])]
    return "\n".join(lines) + "\n"


def sweep_main(argv) -> int:
    if argv and argv[0] == "--layout-child":
        return _child_layout(argv[1:])
    ap = argparse.ArgumentParser(description="ov_profile.py --sweep: " + __doc__.splitlines()[0])
    ap.add_argument("--sweep", required=True, type=Path, metavar="OUT")
    ap.add_argument("--models", action="append", default=[], metavar="NAME=IR")
    ap.add_argument("-t", "--threads", type=int, action="append")
    ap.add_argument("--variants", default=",".join(prof.VARIANTS))
    ap.add_argument("--backends", default=",".join(prof.BACKENDS))
    ap.add_argument("--layout-shapes", default="1.8b,7b")
    ap.add_argument("--layouts", default=",".join(prof.LAYOUTS))
    ap.add_argument("--layout-layers", type=int, default=4)
    ap.add_argument("--layout-reps", type=int, default=20)
    ap.add_argument("-p", "--prompt-tokens", type=int, default=128)
    ap.add_argument("-n", "--steps", type=int, default=32, help="profiled decode steps")
    ap.add_argument("--gen-tokens", type=int, default=64, help="pipeline decode tokens")
    ap.add_argument("--bandwidth-mb", type=int, default=1024)
    ap.add_argument("--budget-s", type=float, default=540)
    args = ap.parse_args(argv)
    budget, out = Budget(args.budget_s), args.sweep
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or [2]
    models = [m.split("=", 1) for m in args.models]
    rec = host.record()
    record = {"date": rec.pop("date"), "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "host": rec, "profile": [], "pipeline": [], "layout": [], "skipped": []}
    jobs = [("profile", dict(model=n, path=Path(p), threads=t, variant=v))
            for n, p in models for t in threads for v in args.variants.split(",")]
    jobs += [("pipeline", dict(model=n, path=Path(p), threads=t, backend=b))
             for n, p in models for t in threads for b in args.backends.split(",")]
    jobs += [("layout", dict(shape=s, threads=t, layout=lay))
             for s in args.layout_shapes.split(",") if s for t in threads for lay in args.layouts.split(",")]
    for part, job in jobs:
        left = budget.left()
        label = f"{part} " + " ".join(str(v) for k, v in job.items() if k != "path")
        if left < 20:
            record["skipped"].append(label)
            continue
        if part == "profile":
            res = profile_one(job["path"], job["threads"], prof.VARIANTS[job["variant"]], args, left)
        elif part == "pipeline":
            res = pipeline_one(job["path"], job["threads"], job["backend"], args, left)
        else:
            res = layout_in_child(job["shape"], job["layout"], job["threads"], args, left)
        record[part].append({**{k: v for k, v in job.items() if k != "path"}, "result": res})
        print(f"{label}: {res.get('error') or 'ok'}", file=sys.stderr, flush=True)
        (out / "sweep.json").write_text(json.dumps(record, indent=1, default=str))
        (out / "sweep.md").write_text(markdown(record))
    (out / "sweep.json").write_text(json.dumps(record, indent=1, default=str))
    (out / "sweep.md").write_text(markdown(record))
    print(out / "sweep.md")
    return 0


if __name__ == "__main__":
    sys.exit(sweep_main(sys.argv[1:]))
