"""Load benchmark of `tangquant serve`: throughput and TTFT/TPOT p50/p95 at 1, 2 and 4 clients.

Random weights, speed only: the model is ``benchmarks/shapes.py``'s Qwen1.5-0.5B-Chat
shape, made INT4 either through tangquant (``quantize --algo rtn`` + ``export``) or,
if that fails, optimum-intel's own INT4 export (the result says which). For each
concurrency level a fresh ``tangquant serve`` process is started with
``--max-concurrency`` equal to the level; that many clients send streaming chat
requests (``ignore_eos`` so every reply has ``--max-tokens`` tokens) and time them:

- TTFT: the server's queue wait + openvino-genai's time to first token (the reply's
  ``timings``: a random-weight model's tokens mostly decode to no text, so the client
  cannot see its first token); the client-side time to the first text chunk is kept too
  when there is one;
- TPOT: openvino-genai's mean time per output token after the first, per request;
- latency: request sent -> last byte, seen by the client;
- throughput: all completion tokens / wall time of the level, seen by the client.

Usage::

    python benchmarks/serve_load.py --work /tmp/serve-bench [--ir DIR] [--levels 1,2,4]
        [--requests 12] [--max-tokens 64] [--screenshot benchmarks/results/serve_page.png]

Results go to ``benchmarks/results/serve_load.json`` (versions, CPU, threads, date,
load averages). Needs the project installed (and selenium + Debian's chromium-driver
for ``--screenshot``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
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
    sys.path.insert(0, str(HERE))
    import shapes

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


def start_server(ir: Path, concurrency: int, name: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tangquant", "-q", "serve", "--model", str(ir), "--port", "0",
         "--max-concurrency", str(concurrency), "--queue-size", "8",
         "--max-tokens-limit", "1024", "--timeout", "900", "--model-name", name],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(line.split("http://127.0.0.1:")[1].split()[0])


def one_request(port: int, max_tokens: int) -> dict:
    body = json.dumps({"messages": PROMPT, "max_tokens": max_tokens, "stream": True,
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


def run_level(ir: Path, level: int, requests: int, max_tokens: int,
              workers: int | None = None) -> dict:
    import psutil

    workers = workers or level
    proc, port = start_server(ir, workers, "qwen1.5-0.5b-int4-random")
    try:
        # Warm-up: every pipeline's first inference (compilation, first allocations).
        warm = [threading.Thread(target=one_request, args=(port, 8)) for _ in range(workers)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        server = psutil.Process(proc.pid)
        per_client = max(1, requests // level)
        results, errors, rss = [], [], []

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
            time.sleep(0.5)
        wall = time.perf_counter() - t0
        ttft = [r["ttft_s"] for r in results]
        tpot = [r["tpot_s"] for r in results]
        latency = [r["latency_s"] for r in results]
        client_ttft = [r["client_ttft_s"] for r in results if r["client_ttft_s"] is not None]
        tokens = sum(r["tokens"] for r in results)
        return {
            "concurrency": level, "server_max_concurrency": workers, "requests": len(results),
            "errors": errors, "max_tokens": max_tokens,
            "prompt_tokens": results[0]["prompt_tokens"] if results else None,
            "completion_tokens": tokens, "wall_s": round(wall, 2),
            "throughput_tok_s": round(tokens / wall, 2),
            "ttft_s": {"p50": round(pct(ttft, 0.5), 3), "p95": round(pct(ttft, 0.95), 3)},
            "tpot_ms": {"p50": round(1000 * pct(tpot, 0.5), 1),
                        "p95": round(1000 * pct(tpot, 0.95), 1)},
            "per_request_decode_tok_s_p50": round(1 / pct(tpot, 0.5), 2),
            "latency_s": {"p50": round(pct(latency, 0.5), 3), "p95": round(pct(latency, 0.95), 3)},
            "client_ttft_s": {"p50": round(pct(client_ttft, 0.5), 3),
                              "p95": round(pct(client_ttft, 0.95), 3)} if client_ttft else None,
            "server_rss_mib": {"start": rss[0] >> 20 if rss else None,
                               "max": max(rss) >> 20 if rss else None},
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

    proc, port = start_server(ir, 1, ir.name)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/serve-bench", help="where the model and IR go")
    parser.add_argument("--ir", help="use this IR instead of building the 0.5B shape")
    parser.add_argument("--levels", default="1,2,4")
    parser.add_argument("--requests", type=int, default=12, help="requests per level")
    parser.add_argument("--workers", type=int, help="server --max-concurrency (default: the level)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--output", default=str(HERE / "results" / "serve_load.json"))
    parser.add_argument("--screenshot", help="also save a PNG of the chat page here")
    parser.add_argument("--screenshot-ir", help="the IR the page serves for the screenshot "
                        "(default: the benchmark's)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build the model and its IR under --work, then stop")
    args = parser.parse_args()

    from tangquant.files import cpu_model, package_versions

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ir, how = (Path(args.ir), "given") if args.ir else make_ir(work)
    build_s = time.time() - t0
    print(f"IR: {ir} ({how}, {build_s:.0f} s)")
    if args.prepare_only:
        return
    levels = [run_level(ir, int(n), args.requests, args.max_tokens, args.workers)
              for n in args.levels.split(",") if n]
    for lv in levels:
        print(f"concurrency {lv['concurrency']}: {lv['throughput_tok_s']} tok/s, TTFT p50 "
              f"{lv['ttft_s']['p50']} s p95 {lv['ttft_s']['p95']} s, TPOT p50 "
              f"{lv['tpot_ms']['p50']} ms p95 {lv['tpot_ms']['p95']} ms, errors {len(lv['errors'])}")
    result = {
        "benchmark": "serve_load", "label": "random weights, speed only",
        "model": "Qwen1.5-0.5B-Chat shape (benchmarks/shapes.py), INT4" if not args.ir
        else f"given IR {ir}", "ir": str(ir),
        "ir_made_by": how, "ir_build_s": round(build_s, 1),
        "weights_bytes": (ir / "openvino_model.bin").stat().st_size,
        "command": " ".join([sys.executable, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "threads": "OpenVINO default (all cores) per pipeline"},
        "note": "shared 2-core machine: other engineers' jobs ran at the same time (see loadavg)",
        "versions": package_versions(), "levels": levels,
    }
    if levels:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {out}")
    if args.screenshot:
        screenshot(Path(args.screenshot_ir) if args.screenshot_ir else ir, Path(args.screenshot))


if __name__ == "__main__":
    main()
