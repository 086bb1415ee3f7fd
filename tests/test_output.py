"""What the stages leave behind for people: quiet terminals, Hub-ready model cards, lm_eval tables.

One fresh Python process runs `tangquant demo`'s stages on the tiny fixture —
merge → GPTQ (INC on the whole model, as the demo) → OpenVINO export → a tiny
bench — through ``cli.main`` at the default verbosity, as a user's first run
would (every library imported for the first time in it). Its stderr may hold
only tangquant's own progress bars and log lines (the format strings of
tangquant's ``logger`` calls, read from the source), its stdout only the
stages' summaries and the bench table. The outputs' cards must parse with
``huggingface_hub.ModelCard`` and carry the Hub front matter, and lm_eval must
run the shipped tasks offline on the IR and its reference.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.register_assert_rewrite("_quantize_fixtures")

ROOT = Path(__file__).resolve().parent.parent
BASE_ID = "Qwen/Qwen1.5-0.5B-Chat"
LICENSE = {"license": "other", "license_name": "tongyi-qianwen-research",
           "license_link": "https://huggingface.co/Qwen/Qwen1.5-0.5B-Chat/blob/main/LICENSE"}
# A tqdm bar: "desc:  40%|████      | 2/5 [00:01<00:02, …]" or, without a total, "desc: 3it [00:01, …]".
BAR = re.compile(r"^[^\s:][^:]*: +(\d+%\|.*\|.*|\d+(\.\d+)?\w* \[.*)$")


def _own_log_formats() -> list[re.Pattern]:
    """One pattern per ``logger.<level>("…%s…", …)`` call in tangquant's source."""
    patterns = []
    for path in (ROOT / "tangquant").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "logger"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                parts = re.split(r"%[-+ #0]*\d*(?:\.\d+)?[sdfgr]", node.args[0].value)
                patterns.append(re.compile("^" + ".*".join(map(re.escape, parts)) + "$", re.S))
    return patterns


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir, qv_adapter_dir, calib_file):
    """The stages in one fresh process; (work dir, stdout, stderr)."""
    work = tmp_path_factory.mktemp("stages")
    base = work / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\n" + "".join(f"{k}: {v}\n" for k, v in LICENSE.items())
                                    + "---\n\n# a base\n", encoding="utf-8")
    adapter = work / "adapter"
    shutil.copytree(qv_adapter_dir, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = BASE_ID  # as LLaMA-Factory writes it after a Hub download
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    stages = [
        ["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(work / "merged")],
        ["quantize", "--model", str(work / "merged"), "--output", str(work / "gptq"), "--algo", "gptq",
         "--no-true-sequential", "--calib", str(calib_file), "--num-samples", "4", "--seq-len", "64",
         "--eval-samples", "2"],
        ["export", "--model", str(work / "gptq"), "--output", str(work / "ir")],
        ["bench", "--candidate", f"ir=ov:{work / 'ir'}", "-p", "8", "-n", "4", "-r", "1",
         "--bandwidth-mb", "8", "-t", "1", "--results", str(work / "bench")],
    ]
    code = ("import sys; from tangquant.cli import main\n"
            f"for argv in {stages!r}:\n"
            "    rc = main(argv)\n"
            "    if rc: sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, proc.stdout, proc.stderr


def test_stages_print_nothing_but_their_own_bars_and_lines(chain):
    work, out, err = chain
    formats = _own_log_formats()
    foreign = []
    for segment in re.split(r"[\r\n]", err):
        line = segment.strip()
        if not line or BAR.match(line) or any(f.match(line) for f in formats):
            continue
        foreign.append(line)
    assert not foreign, "stderr holds lines that are not tangquant's:\n" + "\n".join(foreign[:20])
    assert "calibration:" in err and "bench:" in err  # the test sees tangquant's lines at all
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"merged {work / 'merged'}") and lines[1].startswith(str(work / "gptq"))
    assert lines[2].startswith(str(work / "ir")) and lines[-1].startswith("bench: 1 ok, 0 failed")
    assert all(line.startswith("|") for line in lines[3:-1]), lines  # the bench table, nothing else


def test_every_output_card_carries_the_hub_front_matter(chain):
    from huggingface_hub import ModelCard

    work, _, _ = chain
    expected = {"merged": ("finetune", "transformers"), "gptq": ("quantized", "transformers"),
                "ir": ("quantized", "openvino")}
    for name, (relation, library) in expected.items():
        card = ModelCard.load(work / name / "README.md")  # a local file: no network
        meta = card.data.to_dict()
        assert meta["base_model"] == BASE_ID and meta["base_model_relation"] == relation, (name, meta)
        assert meta["library_name"] == library and meta["pipeline_tag"] == "text-generation"
        assert "tangquant" in meta["tags"]
        assert {k: meta.get(k) for k in LICENSE} == LICENSE, (name, meta)
        assert meta.get("quantized_by") == ("tangquant" if relation == "quantized" else None)
        assert card.text.lstrip().startswith("# ")  # the markdown body follows the front matter
    assert "gptq" in ModelCard.load(work / "gptq" / "README.md").data.tags


def test_base_model_id_overrides_and_is_checked(tmp_path, capsys, tiny_model_dir, qv_adapter_dir):
    from huggingface_hub import ModelCard

    from tangquant.cli import main

    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(qv_adapter_dir), "--output",
                 str(out), "--base-model-id", "someone/their-base"]) == 0
    assert ModelCard.load(out / "README.md").data.base_model == "someone/their-base"
    # The fixture's adapter names a local path: no Hub id, so the card has none and the log says why.
    bare = tmp_path / "bare"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(qv_adapter_dir), "--output",
                 str(bare)]) == 0
    assert "base_model" not in ModelCard.load(bare / "README.md").data.to_dict()
    assert "--base-model-id" in capsys.readouterr().err
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(qv_adapter_dir), "--output",
                 str(tmp_path / "never"), "--base-model-id", "./not/a/hub/id"]) == 2
    assert "base_model_id must be a Hugging Face Hub id" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_lm_eval_runs_offline_on_the_ir_and_its_reference(chain, capsys, tmp_path):
    from tangquant.cli import main

    work, _, _ = chain
    out = tmp_path / "tasks.json"
    rc = main(["eval", "--model", str(work / "ir"), "--reference", str(work / "merged"),
               "--tasks", "tang_couplet,tang_nextline", "--limit", "3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    rows = json.loads(out.read_text())["lm_eval"]["rows"]
    got = {(r["task"], r["metric"]) for r in rows}
    assert got == {(f"tang_{t}_{s}", m) for s in ("traditional", "simplified")
                   for t, ms in (("couplet", ("acc",)), ("nextline", ("byte_perplexity", "bits_per_byte")))
                   for m in ms}
    for r in rows:
        assert r["n"] == 3 and r["delta"] == pytest.approx(r["model"] - r["reference"], abs=1e-9)
        if r["metric"] == "byte_perplexity":
            # The INT4 IR and its fp32 source score the same couplets closely, not identically.
            assert 1 < r["reference"] < 257 and abs(r["delta"]) < 0.2 * r["reference"], r
            assert r["delta_err"] is not None and r["reference_err"] > 0
    assert "| tang_nextline_traditional | byte_perplexity ↓ | 3 |" in printed
    assert "Δ (model − reference)" in printed


NOISY = ("transformers.modeling_utils", "torch.utils._pytree", "datasets.load", "nncf",
         "optimum.exporters", "torchao", "openvino_tokenizers")
NOISE = """
import logging, sys, warnings
from tangquant.cli import _configure_logging
_configure_logging(verbose=sys.argv[1] == "-v", quiet=False)
import torch, transformers, datasets, nncf, optimum.intel  # each sets its loggers up on import
from neural_compressor.common import logger as inc_logger
inc_logger.warning("noise: INC")
for name in sys.argv[2:]:
    logging.getLogger(name).warning("noise: %s", name)
warnings.warn_explicit("noise: a TracerWarning", UserWarning, "transformers/cache_utils.py", 1,
                       module="transformers.cache_utils")
logging.getLogger("tangquant.demo").info("own: a line of ours")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_logs_are_held_back_even_after_their_import(verbose):
    """Libraries reset their loggers when imported (inside a stage, after cli.main configured
    logging); at the default verbosity none of their warnings may pass, with -v all of them."""
    proc = subprocess.run([sys.executable, "-c", NOISE, "-v" if verbose else "", *NOISY], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if not k.endswith(("_VERBOSITY", "TORCH_LOGS"))})
    assert proc.returncode == 0, proc.stderr[-2000:]
    both = proc.stderr + proc.stdout  # NNCF's own handler writes to stdout
    assert "own: a line of ours" in proc.stderr
    if verbose:
        # Each source at least once: some libraries' handlers also propagate (a second copy), and
        # whether they do depends on the environment.
        for source in ("INC", *NOISY, "a TracerWarning"):
            assert f"noise: {source}" in both, (source, both)
    else:
        assert "noise:" not in both, both
