"""A bench engine that exists only in a test (tests/test_bench.py adds its row to the table):
its runner answers from its option instead of timing a model, so the test can tell that bench
reached it, in a worker process, with the option the row checked."""

from __future__ import annotations

import os

from tangquant.measure.timing import summary


def run(spec: dict) -> dict:
    tps = float(spec["options"]["speed"])
    runs = [{"ttft_ms": 1000 * spec["prompt_tokens"] / (4 * tps), "tpot_ms": 1000 / tps}
            for _ in range(spec["repetitions"])]
    return {"runs": runs, **summary(runs, spec["prompt_tokens"]), "load_s": 0.0,
            "fake_runner_pid": os.getpid(), "fake_spec_path": spec["path"]}


def bytes_per_token(path, options: dict) -> dict:
    return {"bytes_per_token": 1000, "weights_bytes": 1000, "embedding_bytes_skipped": 0, "adapter_bytes": 0}
