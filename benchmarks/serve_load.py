"""Load benchmark of `tangquant serve`: the continuous-batching engine against the old design.

Random weights, speed only: the model is ``tangquant.poet.shapes``'s Qwen1.5-0.5B-Chat
shape, made INT4 through tangquant (``quantize --algo rtn`` + ``export``; optimum-intel's
own INT4 export if that fails; the result says which). For each concurrency level and
each engine, side by side in one run, a fresh ``tangquant serve`` process is started:

- ``batch`` (the default): one ContinuousBatchingPipeline, ``--max-num-seqs LEVEL``;
- ``pipelines`` (the old design): ``--engine pipelines --max-concurrency LEVEL``, one
  LLMPipeline (compiled model + KV cache) per sequence.

LEVEL clients then send streaming chat requests (``ignore_eos`` so every reply has
``--max-tokens`` tokens) and time them:

- TTFT: the server's queue wait + time to first token (the reply's ``timings``: a
  random-weight model's tokens mostly decode to no text, so a client cannot see its
  first token);
- TPOT: mean time per output token after the first, per request (server timings);
- throughput: all completion tokens / wall time of the level, seen by the clients;
- peak RSS of the server process, sampled every 0.25 s.

Then a fault storm on the batch engine (``--faults``): 50 streaming clients that
disconnect mid-stream, slow clients that send their body a byte at a time, bodies
over the 1 MiB limit; afterwards ``/health``, a normal request, and the RSS.

Usage::

    python benchmarks/serve_load.py --ir DIR [--levels 1,2,4,8] [--requests-per-client 3]
        [--max-tokens 64] [--engines batch,pipelines] [--faults] [--output FILE]

Results go to ``benchmarks/results/serve_load_engines.json`` (versions, CPU, threads, date,
load averages; file a run you keep under ``benchmarks/results/<date>-<machine>-<topic>/``, as
``benchmarks/results/2026-12-01-2core-epyc-serve-load-faults/`` holds the 2026-12-01 runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = [{"role": "system", "content": "你是一位唐代詩人。"},
          {"role": "user", "content": "以《春曉》為題，寫一首五言絕句，寫春天的早晨、鳥聲和落花。"}]


def make_ir(work: Path) -> tuple[Path, str]:
    """Build the 0.5B shape and its INT4 IR; return (IR dir, how it was made)."""
    from tangquant.poet import shapes

    base = work / "qwen1.5-0.5b-random"
    if not (base / "config.json").is_file():
        shapes.build_shape("0.5b", base)
    ir = work / "ir-tangquant-rtn"
    if (ir / "openvino_model.xml").is_file():
        return ir, "tangquant quantize --algo rtn + tangquant export (cached)"
    try:
        from tangquant.export import export
        from tangquant.quantize import quantize

        gptq = work / "gptq-rtn"
        if not (gptq / "config.json").is_file():
            quantize(base, gptq, algo="rtn", eval_samples=0, force=True)
        export(gptq, ir, force=True)
        return ir, "tangquant quantize --algo rtn + tangquant export"
    except Exception as exc:  # fall back to optimum-intel's own INT4 export
        print(f"tangquant path failed ({type(exc).__name__}: {exc}); using optimum-intel",
              file=sys.stderr)
    ir = work / "ir-optimum-int4"
    if not (ir / "openvino_model.xml").is_file():
        import openvino as ov
        from openvino_tokenizers import convert_tokenizer
        from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig
        from transformers import AutoTokenizer

        q = OVWeightQuantizationConfig(bits=4, sym=True, group_size=128, ratio=1.0)
        OVModelForCausalLM.from_pretrained(base, export=True, compile=False,
                                           quantization_config=q).save_pretrained(ir)
        tok = AutoTokenizer.from_pretrained(base)
        t, d = convert_tokenizer(tok, with_detokenizer=True)
        ov.save_model(t, ir / "openvino_tokenizer.xml")
        ov.save_model(d, ir / "openvino_detokenizer.xml")
        tok.save_pretrained(ir)
    return ir, "optimum-intel INT4 export (sym, group 128, ratio 1.0)"


def start_server(ir: Path, engine: str, seqs: int, name: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tangquant", "-q", "serve", "--model", str(ir), "--port", "0",
         "--engine", engine, "--max-num-seqs", str(seqs), "--queue-size", "64",
         "--max-tokens-limit", "1024", "--timeout", "900", "--model-name", name],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(line.split("http://127.0.0.1:")[1].split()[0])


_SERIAL = iter(range(1 << 62))


def one_request(port: int, max_tokens: int) -> dict:
    # A distinct first line per request: the old design's LLMPipeline caches prefixes, and
    # identical prompts would let it skip the prefill that distinct users pay.
    messages = [{"role": "system", "content": f"#{next(_SERIAL)} {PROMPT[0]['content']}"},
                PROMPT[1]]
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "stream": True,
                       "temperature": 0, "ignore_eos": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:200]!r}")
    first = None
    usage = timings = None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        usage = event.get("usage") or usage
        timings = event.get("timings") or timings
        if first is None and any(c["delta"].get("content") for c in event.get("choices", [])):
            first = time.perf_counter()
    done = time.perf_counter()
    conn.close()
    return {"ttft_s": (timings["queue_ms"] + timings["ttft_ms"]) / 1000,
            "tpot_s": timings["tpot_ms"] / 1000, "client_ttft_s": first and first - t0,
            "latency_s": done - t0, "tokens": usage["completion_tokens"],
            "prompt_tokens": usage["prompt_tokens"]}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def run_level(ir: Path, engine: str, level: int, per_client: int, max_tokens: int) -> dict:
    import psutil

    proc, port = start_server(ir, engine, level, "qwen1.5-0.5b-int4-random")
    try:
        # Warm-up: every pipeline's first inference (compilation, first allocations).
        warm = [threading.Thread(target=one_request, args=(port, 8)) for _ in range(level)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        server = psutil.Process(proc.pid)
        rss_ready = server.memory_info().rss
        results, errors, rss = [], [], [rss_ready]

        def client():
            for _ in range(per_client):
                try:
                    results.append(one_request(port, max_tokens))
                except Exception as exc:
                    errors.append(repr(exc))

        load_before = os.getloadavg()
        threads = [threading.Thread(target=client) for _ in range(level)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append(server.memory_info().rss)
            time.sleep(0.25)
        wall = time.perf_counter() - t0
        ttft = [r["ttft_s"] for r in results]
        tpot = [r["tpot_s"] for r in results]
        latency = [r["latency_s"] for r in results]
        tokens = sum(r["tokens"] for r in results)
        return {
            "engine": engine, "concurrency": level, "server_max_num_seqs": level,
            "requests": len(results), "errors": errors, "max_tokens": max_tokens,
            "prompt_tokens": results[0]["prompt_tokens"] if results else None,
            "completion_tokens": tokens, "wall_s": round(wall, 2),
            "throughput_tok_s": round(tokens / wall, 2),
            "ttft_s": {"p50": round(pct(ttft, 0.5), 3), "p99": round(pct(ttft, 0.99), 3)},
            "tpot_ms": {"p50": round(1000 * pct(tpot, 0.5), 1),
                        "p99": round(1000 * pct(tpot, 0.99), 1)},
            "latency_s": {"p50": round(pct(latency, 0.5), 3), "p99": round(pct(latency, 0.99), 3)},
            "server_rss_mib": {"ready": rss_ready >> 20, "peak": max(rss) >> 20},
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def screenshot(ir: Path, path: Path) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_serve_browser import chromium

    import tempfile

    proc, port = start_server(ir, "batch", 1, ir.name)
    with tempfile.TemporaryDirectory() as profile:
        driver = chromium(profile)
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: d.find_element(By.ID, "model-name").text != "…")
            box = driver.find_element(By.ID, "max_tokens")
            box.clear()
            box.send_keys("48")
            driver.find_element(By.ID, "prompt").send_keys(PROMPT[1]["content"])
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: "tokens/s" in d.find_element(By.ID, "stats").text)
            path.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(path))
            print("page stats:", driver.find_element(By.ID, "stats").text)
        finally:
            driver.quit()
            proc.terminate()
            proc.wait(timeout=60)


def ratios(levels: list[dict]) -> dict:
    """Throughput at each level over one client, per engine; new engine over old, per level."""
    by = {(lv["engine"], lv["concurrency"]): lv for lv in levels}
    out = {}
    for (engine, level), lv in by.items():
        one = by.get((engine, 1))
        if one:
            out[f"{engine}_x{level}_over_x1"] = round(lv["throughput_tok_s"] /
                                                      one["throughput_tok_s"], 2)
        old = by.get(("pipelines", level))
        if engine == "batch" and old:
            out[f"batch_over_pipelines_at_{level}"] = round(lv["throughput_tok_s"] /
                                                            old["throughput_tok_s"], 2)
            out[f"peak_rss_batch_over_pipelines_at_{level}"] = round(
                lv["server_rss_mib"]["peak"] / old["server_rss_mib"]["peak"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/serve-bench", help="where the model and IR go")
    parser.add_argument("--ir", help="use this IR instead of building the 0.5B shape")
    parser.add_argument("--levels", default="1,2,4,8")
    parser.add_argument("--engines", default="batch,pipelines")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--faults", action="store_true", help="also run the fault storm")
    parser.add_argument("--output", default=str(Path("tangquant-results") / "serve_load_engines.json"))
    parser.add_argument("--screenshot", help="also save a PNG of the chat page here")
    parser.add_argument("--screenshot-ir", help="the IR the page serves for the screenshot "
                        "(default: the benchmark's)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build the model and its IR under --work, then stop")
    args = parser.parse_args()

    from tangquant import host

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ir, how = (Path(args.ir), "given") if args.ir else make_ir(work)
    build_s = time.time() - t0
    print(f"IR: {ir} ({how}, {build_s:.0f} s)")
    if args.prepare_only:
        return
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    levels = []
    # Engines alternate within each level, so a change in the machine's load hits both alike.
    for n in [int(x) for x in args.levels.split(",") if x]:
        for engine in args.engines.split(","):
            lv = run_level(ir, engine, n, args.requests_per_client, args.max_tokens)
            levels.append(lv)
            print(f"{engine:9} x{n}: {lv['throughput_tok_s']} tok/s, TTFT p50 "
                  f"{lv['ttft_s']['p50']} s p99 {lv['ttft_s']['p99']} s, TPOT p50 "
                  f"{lv['tpot_ms']['p50']} ms p99 {lv['tpot_ms']['p99']} ms, peak RSS "
                  f"{lv['server_rss_mib']['peak']} MiB, errors {len(lv['errors'])}, load "
                  f"{lv['loadavg_before'][0]:.2f}", flush=True)
    result = {
        "benchmark": "serve_load", "label": "random weights, speed only",
        "model": "Qwen1.5-0.5B-Chat shape (tangquant.poet.shapes), INT4" if not args.ir
        else f"given IR {ir}", "ir": str(ir),
        "ir_made_by": how, "ir_build_s": round(build_s, 1),
        "weights_bytes": (ir / "openvino_model.bin").stat().st_size,
        "command": " ".join([sys.executable, *sys.argv]),
        "date": started, "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": host.record((*host.PACKAGES, "uvicorn", "fastapi")),
        "threads": "OpenVINO default (all cores) per pipeline",
        "note": "shared 2-core machine: other engineers' jobs ran at the same time (see loadavg)",
        "prompts": "distinct per request (a serial number first), same length",
        "levels": levels, "ratios": ratios(levels), "faults": None,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if args.faults:  # after the levels are safely written
        sys.path.insert(0, str(HERE))
        import serve_faults

        result["faults"] = serve_faults.storm_server(ir)
        print("faults:", json.dumps(result["faults"]), flush=True)
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print("ratios:", json.dumps(result["ratios"]))
    print(f"wrote {out}")
    if args.screenshot:
        screenshot(Path(args.screenshot_ir) if args.screenshot_ir else ir, Path(args.screenshot))


if __name__ == "__main__":
    main()
