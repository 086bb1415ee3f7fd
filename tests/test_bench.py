"""`tangquant bench`: a well-formed table and JSONL on the tiny model, failures reported as failures."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from tangquant.bench import KINDS, MARKER, bench, parse_candidate
from tangquant.cli import main
from tangquant.errors import BenchError

SMALL = {"prompt_tokens": 16, "gen_tokens": 4, "repetitions": 1, "threads": (2,),
         "bandwidth_mb": 32}
FIELDS = ("date", "command", "cpu", "cores", "git_sha", "versions", "loadavg_start", "loadavg_end",
          "flags", "name", "kind", "path", "options", "threads", "bandwidth", "status", "error",
          "ratio_pp", "ratio_tg")
OK_FIELDS = ("pp_tps", "pp_tps_std", "tg_tps", "tg_tps_std", "pp_tps_median", "tg_tps_median", "ttft_ms",
             "ttft_ms_std", "tpot_ms", "peak_rss_bytes", "size_bytes", "bytes_per_token", "weights_bytes", "load_s",
             "roofline_tps", "roofline_pct", "runs", "worker_versions")


@pytest.fixture(scope="module")
def tiny_ir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model through the real pipeline: RTN INT4 GPTQ checkpoint -> OpenVINO IR."""
    from tangquant.export import export
    from tangquant.quantize import quantize

    root = tmp_path_factory.mktemp("bench")
    quantize(tiny_model_dir, root / "gptq", algo="rtn", group_size=128)
    export(root / "gptq", root / "ir")
    return root / "ir"


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with one NaN weight: it loads and runs, but its logits are NaN."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("nan") / "model"
    shutil.copytree(tiny_model_dir, out)
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"][0] = float("nan")
            save_file(tensors, shard, metadata={"format": "pt"})
            return out
    raise AssertionError("no model.norm.weight in the tiny model")


def test_bench_table_jsonl_and_failures(tiny_ir, tiny_model_dir, qv_adapter_dir, nan_model_dir,
                                        tmp_path, capsys):
    results = tmp_path / "results"
    plot = tmp_path / "bench.png"
    result = bench([f"merged=ov:{tiny_ir}", f"lora=ov+lora:{tiny_ir},adapter={qv_adapter_dir}",
                    f"ref=torch:{tiny_model_dir},dtype=fp32", f"nan=torch:{nan_model_dir},dtype=fp32",
                    f"missing=ov:{tmp_path / 'nowhere'}"],
                   results_dir=str(results), plot=str(plot), **SMALL)
    records = result["records"]
    by_name = {r["name"]: r for r in records}
    assert [r["status"] for r in records] == ["ok", "ok", "ok", "failed", "failed"]
    assert "does not exist" in by_name["missing"]["error"]
    assert "NaN" in by_name["nan"]["error"]
    for r in records:
        assert all(k in r for k in FIELDS), [k for k in FIELDS if k not in r]
        if r["status"] == "ok":
            assert all(k in r for k in OK_FIELDS), [k for k in OK_FIELDS if k not in r]
            assert r["pp_tps"] > 0 and r["tg_tps"] > 0 and r["peak_rss_bytes"] > 0
            assert 0 < r["bytes_per_token"] <= r["weights_bytes"] + r["adapter_bytes"]
            assert r["roofline_tps"] == pytest.approx(r["bandwidth"]["gbs"] * 1e9 / r["bytes_per_token"])
        else:
            assert "pp_tps" not in r and r["ratio_tg"] is None  # never a speed for a failure
    assert by_name["merged"]["ratio_tg"] == 1.0 and by_name["ref"]["ratio_pp"] > 0
    # GenAI ignores adapter_config.json: the bench passes lora_alpha / r (16 / 8) itself.
    assert by_name["lora"]["lora_alpha_scale"] == 2.0
    assert by_name["lora"]["adapter_bytes"] > 0
    # Same base IR, greedy decoding: the runtime adapter must change what the model writes.
    assert len(by_name["merged"]["warmup_tokens"]) == 4
    assert by_name["lora"]["warmup_tokens"] != by_name["merged"]["warmup_tokens"]
    assert by_name["merged"]["flags"] == {"prompt_tokens": 16, "gen_tokens": 4, "repetitions": 1,
                                          "rounds": 1, "warmup": 1}

    lines = (results / "bench.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(l)["name"] for l in lines] == ["merged", "lora", "ref", "nan", "missing"]
    out = result["report"] + "\n" + result["summary"]
    table = [l for l in out.splitlines() if l.startswith("|")]
    assert table[0].startswith("| candidate | kind | threads | pp16 t/s | tg4 t/s |")
    assert len(table) == 2 + 5 and all(l.count("|") == table[0].count("|") for l in table)
    assert "FAILED" in table[5] and "FAILED" in table[6] and "FAILED" not in "".join(table[2:5])
    assert "3 ok, 2 failed" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rounds_interleave_the_candidates_and_pool_their_runs(tiny_ir, tmp_path, caplog):
    """--rounds 2: merged, lora, merged, lora (each a fresh process); one row per candidate whose
    figures are those of all its runs, and a failure in any round fails the row."""
    import logging
    import statistics

    caplog.set_level(logging.INFO, logger="tangquant.measure.runner")
    result = bench([f"a=ov:{tiny_ir}", f"b=ov:{tiny_ir},KV_CACHE_PRECISION=f16", f"gone=ov:{tmp_path / 'no'}"],
                   results_dir=str(tmp_path / "r.jsonl"), rounds=2, **{**SMALL, "repetitions": 2})
    order = [m.split(" at ")[0] for m in caplog.messages if " threads, round " in m]
    assert order == ["a", "b", "a", "b"]
    a, b, gone = result["records"]
    for r in (a, b):
        assert r["flags"]["rounds"] == 2 and len(r["runs"]) == 4 and len(r["rounds"]) == 2
        tg = [1000 / run["tpot_ms"] for run in r["runs"]]
        assert r["tg_tps"] == pytest.approx(statistics.fmean(tg))
        assert r["tg_tps_median"] == pytest.approx(statistics.median(tg))
        assert min(x["tg_tps"] for x in r["rounds"]) <= r["tg_tps"] <= max(x["tg_tps"] for x in r["rounds"])
    assert gone["status"] == "failed" and gone["error"].startswith("round 1: ") and "tg_tps" not in gone
    assert not list(tmp_path.glob("*.partial"))  # written records replace the rounds' checkpoint


def test_a_run_killed_before_its_records_leaves_each_round_on_disk(tiny_ir, tmp_path, monkeypatch):
    """A lent machine taken back mid-run: the rounds that finished are in the .partial file."""
    import importlib

    bench_mod = importlib.import_module("tangquant.bench")  # (tangquant.bench is the API's function)

    def killed(rows):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench_mod, "add_ratios", killed)  # dies after the sweep, before the records
    with pytest.raises(KeyboardInterrupt):
        bench([f"a=ov:{tiny_ir}"], results_dir=str(tmp_path / "r.jsonl"), rounds=2, **SMALL)
    assert not (tmp_path / "r.jsonl").exists()
    (partial,) = tmp_path.glob("r.jsonl.*.partial")
    head, *rounds = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines()]
    assert head["partial_of"] == str(tmp_path / "r.jsonl") and head["flags"]["rounds"] == 2
    assert [(r["name"], r["round"]) for r in rounds] == [("a", 1), ("a", 2)]
    assert all(r["tg_tps"] > 0 and r["runs"] for r in rounds)


def test_cli_reports_failed_candidate(tmp_path, capsys):
    jsonl = tmp_path / "runs.jsonl"
    code = main(["bench", "--candidate", f"gone=torch:{tmp_path / 'none'}", "-p", "8", "-n", "2",
                 "-r", "1", "-t", "1", "--results", str(jsonl), "--bandwidth-mb", "16"])
    assert code == 1
    rec = json.loads(jsonl.read_text(encoding="utf-8"))
    assert rec["status"] == "failed" and rec["threads"] == 1 and rec["flags"]["gen_tokens"] == 2
    assert "| gone | torch | 1 | FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [
    ("noequals", "NAME=KIND:PATH"),
    ("a=gguf:/x", "unknown kind"),
    ("a=ov+lora:/x", "needs adapter"),
    ("a=torch:/x,dtype=int3", "dtype"),
    ("a=ov:/x,novalue", "key=value"),
])
@pytest.mark.fast
def test_malformed_candidates_are_refused(text, message):
    with pytest.raises(BenchError, match=message):
        parse_candidate(text)


@pytest.mark.fast
def test_candidate_options_and_recipe(tmp_path, capsys):
    c = parse_candidate("m=ov:/models/ir,KV_CACHE_PRECISION=u8,ENABLE_CPU_PINNING=true")
    assert (c.name, c.kind, c.path) == ("m", "ov", "/models/ir")
    assert c.options == {"KV_CACHE_PRECISION": "u8", "ENABLE_CPU_PINNING": "true"}
    assert set(KINDS) == {"ov", "ov+lora", "torch-gptq+lora", "torch", "llamacpp", "iklcpp", "ortgenai"}
    recipe = tmp_path / "bench.yaml"
    recipe.write_text("candidates: []\nprompt_tokens: 8\nunknown_key: 1\n", encoding="utf-8")
    with pytest.raises(Exception, match="unknown_key"):
        bench(params=str(recipe), results_dir=str(tmp_path))
    recipe.write_text("candidates: []\nprompt_tokens: 8\n", encoding="utf-8")
    with pytest.raises(BenchError, match="no candidate"):
        bench(params=str(recipe), results_dir=str(tmp_path))


def _safetensors(path: Path, tensors: dict) -> None:
    """A safetensors header with the given shapes (bf16); the data is zeros."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


@pytest.mark.fast
def test_bytes_per_token_reads_one_embedding_row_unless_tied(tmp_path):
    from tangquant.measure.roofline import bytes_per_token

    untied, tied = tmp_path / "untied", tmp_path / "tied"
    for d, names in ((untied, ("model.embed_tokens.weight", "lm_head.weight")),
                     (tied, ("model.embed_tokens.weight",))):
        d.mkdir()
        _safetensors(d / "model.safetensors", {**{n: (100, 8) for n in names},
                                               "model.layers.0.mlp.up_proj.weight": (16, 8)})
    u = bytes_per_token("torch", untied, {"dtype": "bf16"})
    assert u["weights_bytes"] == 2 * (100 * 8 * 2) + 16 * 8 * 2
    assert u["bytes_per_token"] == 100 * 8 * 2 + 8 * 2 + 16 * 8 * 2  # lm_head + one row + mlp
    t = bytes_per_token("torch", tied, {"dtype": "fp32"})
    assert t["bytes_per_token"] == t["weights_bytes"] == (100 * 8 + 16 * 8) * 4


def test_ir_roofline_skips_the_embedding_table(tiny_ir):
    from tangquant.measure.roofline import bytes_per_token, ir_weight_bytes

    w = ir_weight_bytes(tiny_ir)
    assert w["embedding_rows"] == json.loads((tiny_ir / "config.json").read_text())["vocab_size"]
    assert 0 < w["embedding_bytes"] < w["weights_bytes"]
    b = bytes_per_token("ov", tiny_ir, {})
    assert b["bytes_per_token"] == w["weights_bytes"] - w["embedding_bytes"] + \
        w["embedding_bytes"] // w["embedding_rows"]


@pytest.mark.slow
def test_seed_baseline_environment(tiny_model_dir, qv_adapter_dir, tmp_path):
    """The baseline venv loads tangquant's GPTQ checkpoint unchanged and runs it with the adapter."""
    from tangquant.measure.runner import DEFAULT_BASELINE_PYTHON, ROOT as _ROOT
    from tangquant.quantize import quantize

    python = _ROOT / DEFAULT_BASELINE_PYTHON
    if not python.is_file():
        pytest.skip("benchmarks/baseline/setup.sh has not been run")
    quantize(tiny_model_dir, tmp_path / "gptq", algo="rtn", group_size=128)
    (rec,) = bench([f"seed=torch-gptq+lora:{tmp_path / 'gptq'},adapter={qv_adapter_dir}"],
                   results_dir=str(tmp_path), **SMALL)["records"]
    assert rec["status"] == "ok", rec["error"]
    assert rec["worker_versions"]["gptqmodel"] == "5.6.12" and rec["lora_modules"] == 4
    assert any("QuantLinear" in k for k in rec["kernels"])
    assert MARKER not in json.dumps(rec)


def test_a_new_engine_is_a_row_and_a_runner(tiny_ir, tmp_path, monkeypatch):
    """Adding an engine takes one row in the engines table and one runner module: bench checks
    its options, resolves its model, counts its bytes and reaches its runner in a worker."""
    import os

    from tangquant import engines

    row = engines.Engine("fake", "a test's runtime", ("ir",), "_fake_engine:run", "_fake_engine:bytes_per_token",
                         "an engine that exists only in this test",
                         options=(engines.Option("speed", "float", "the t/s it reports", minimum=1),))
    monkeypatch.setitem(engines.ENGINES, "fake", row)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the worker imports the runner
    with pytest.raises(BenchError, match="speed"):
        bench([f"x=fake:{tiny_ir},speed=fast"], results_dir=str(tmp_path), **SMALL)
    with pytest.raises(BenchError, match="takes no option 'repack'"):
        bench([f"x=fake:{tiny_ir},speed=50,repack=1"], results_dir=str(tmp_path), **SMALL)
    (rec,) = bench([f"x=fake:{tiny_ir},speed=50"], results_dir=str(tmp_path), **SMALL)["records"]
    assert rec["status"] == "ok" and rec["kind"] == "fake", rec.get("error")
    assert rec["fake_runner_pid"] != os.getpid() and rec["fake_spec_path"] == str(tiny_ir.resolve())
    assert rec["tg_tps"] == pytest.approx(50) and rec["pp_tps"] == pytest.approx(200)
    assert rec["bytes_per_token"] == 1000


@pytest.mark.fast
@pytest.mark.parametrize("text, message", [
    ("a=ov:/x,lora_mode=dynamic", "takes no option 'lora_mode'"),      # ignored by ov: refused
    ("a=ov:/x,cache_size=abc", "cache_size"),
    ("a=llamacpp:/x.gguf,repack=banana", "repack"),
    ("a=ov+lora:/x,adapter=/a,alpha=nan", "alpha"),
    ("a=torch:/x,KV_CACHE_PRECISION=u8", "takes no option"),           # an OpenVINO key on torch
])
def test_options_a_kind_does_not_take_are_refused_when_parsed(text, message):
    with pytest.raises(BenchError, match=message):
        parse_candidate(text)
