"""Fixtures for the quantize and eval tests: domain calibration data and quantized outputs.

The calibration and held-out texts are recombinations of the typed POEMS (so
they lie in the tiny tokenizer's domain); nothing is read from the corpus.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import POEMS

SMALL = ["--num-samples", "16", "--seq-len", "64", "--eval-samples", "8"]


def poem_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    lines = [line for _, _, ls in POEMS for line in ls]
    out = []
    for _ in range(n):
        title, author, _ = POEMS[rng.randrange(len(POEMS))]
        out.append({"title": title, "author": author, "paragraphs": rng.sample(lines, 4)})
    return out


def alpaca_records(n: int, seed: int) -> list[dict]:
    return [{"instruction": f"以《{r['title']}》为题写一首诗", "input": "",
             "output": "\n".join(r["paragraphs"])} for r in poem_records(n, seed)]


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "poems.json"
    path.write_text(json.dumps(poem_records(80, seed=1), ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def heldout_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("heldout") / "alpaca.json"
    path.write_text(json.dumps(alpaca_records(24, seed=2), ensure_ascii=False), encoding="utf-8")
    return path


def run_quantize(tiny_model_dir, out, calib_file, heldout_file, *extra) -> Path:
    from tangquant.cli import main

    rc = main(["-q", "quantize", "--model", str(tiny_model_dir), "--output", str(out),
               "--calib", str(calib_file), "--eval-data", str(heldout_file), *SMALL, *extra])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def gptq_dir(tmp_path_factory, tiny_model_dir, calib_file, heldout_file) -> Path:
    out = tmp_path_factory.mktemp("q") / "gptq"
    return run_quantize(tiny_model_dir, out, calib_file, heldout_file, "--algo", "gptq")


@pytest.fixture(scope="session")
def rtn_dir(tmp_path_factory, tiny_model_dir, calib_file, heldout_file) -> Path:
    out = tmp_path_factory.mktemp("q") / "rtn"
    return run_quantize(tiny_model_dir, out, calib_file, heldout_file, "--algo", "rtn")
