"""Peak RSS of using 256 tokens of a 20 MB one-line calibration file (issue 18, class 5).

Each measurement runs in its own process (peak RSS from ``os.wait4``): the baseline (torch,
transformers and the demo poet's tokenizer loaded, nothing read), the way tangquant did it
before (the whole document rendered and tokenized, then cut to 256 tokens), and
``calib.load_documents`` + ``calib.pack`` now (documents cut to what the samples need before
they are tokenized). Two files: plain text (one paragraph) and alpaca JSON (one record whose
answer is the 20 MB line, rendered with the chat template). One JSON file goes to
``benchmarks/results/calib_bomb_memory.json`` (file a run you keep under
``benchmarks/results/<date>-<machine>-<topic>/``; the 2026-12-01 record is
``benchmarks/results/2026-12-01-2core-epyc-calib-bomb-memory/calib_bomb_memory.json``); a table is printed.

    python benchmarks/calib_bomb_memory.py [--mb 20] [--tokens 256]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = Path("tangquant-results") / "calib_bomb_memory.json"  # file a kept run under results/<date>-<machine>-<topic>/
TOKENIZER = ROOT / "tangquant" / "assets" / "demo" / "base"
LINE = "床前明月光疑是地上霜舉頭望明月低頭思故鄉"

CHILD = r"""
import sys
from tangquant import calib, load
mode, path, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = load.tokenizer(sys.argv[4])
if mode == "before":  # what calib.pack did until issue 18: every document rendered and tokenized whole
    doc = calib.load_documents(path)[0]
    ids = tok(calib.render(doc, tok), add_special_tokens=False)["input_ids"][:tokens]
elif mode == "now":
    ids = calib.pack(calib.load_documents(path), tok, seq_len=tokens, num_samples=1, seed=0).samples[0]
else:
    ids = list(range(tokens))
assert len(ids) == tokens, len(ids)
"""


def child(mode: str, path: Path, tokens: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(path), str(tokens), str(TOKENIZER)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    start = dt.datetime.now()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = (dt.datetime.now() - start).total_seconds()
    err = proc.stderr.read().decode(errors="replace").strip().splitlines()
    return {"mode": mode, "exit_code": os.waitstatus_to_exitcode(status), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "seconds": round(seconds, 1), "error": err[-1] if status and err else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=20, help="size of the one-line file in MB")
    ap.add_argument("--tokens", type=int, default=256, help="tokens to use from it")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tangquant import host

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        line = LINE * (args.mb * 10**6 // len(LINE.encode()))
        files = {"txt": Path(tmp) / "one-line.txt", "alpaca-json": Path(tmp) / "one-record.json"}
        files["txt"].write_text(line, encoding="utf-8")
        files["alpaca-json"].write_text(json.dumps([{"instruction": "写一首唐诗", "input": "", "output": line}],
                                                   ensure_ascii=False), encoding="utf-8")
        load_start = list(os.getloadavg())
        rows.append({"file": None, "bytes": 0, **child("baseline", files["txt"], args.tokens)})
        for kind, path in files.items():
            for mode in ("before", "now"):
                rows.append({"file": kind, "bytes": path.stat().st_size, **child(mode, path, args.tokens)})
    record = {"benchmark": "calib_bomb_memory", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "host": host.record(),
              "threads": 1,
              "loadavg_start": load_start, "loadavg_end": list(os.getloadavg()),
              "tokens_used": args.tokens, "tokenizer": "the demo poet's (tangquant/assets/demo/base)",
              "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print("| file | mode | peak RSS | seconds |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['file'] or '-'} | {r['mode']} | {r['peak_rss_bytes'] / 1e9:.2f} GB | {r['seconds']} |"
              + (f" FAILED: {r['error']}" if r["exit_code"] else ""))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
