"""The clean export (no accidental runtime pins) and `tangquant tune` on the tiny IR."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from tangquant.cli import main


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, ov_export):
    """`tune --apply` with a zero KLD bound (only identical greedy tokens pass) over the KV axis."""
    ir, rc, _, _ = ov_export
    assert rc == 0
    work = tmp_path_factory.mktemp("tune") / "ir"
    shutil.copytree(ir, work)
    results = work.parent / "tune.jsonl"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["tune", "--model", str(work), "-t", "1", "--axes", "kv", "-p", "8", "-n", "4",
                   "-r", "1", "--fidelity-prompts", "2", "--fidelity-steps", "16",
                   "--kld-bound", "0", "--budget", "10m", "--results", str(results), "--apply"])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    return work, rc, out.getvalue(), rows


def _prop(compiled, key: str) -> str:
    value = compiled.get_property(key)
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


def test_fresh_export_has_no_kv_cache_pin(ov_export):
    import openvino as ov

    from tangquant.ov import runtime

    ir = ov_export[0]
    options = ov.Core().read_model(str(ir / "openvino_model.xml")).get_rt_info()["runtime_options"]
    assert "KV_CACHE_PRECISION" not in options
    assert set(options) == set(runtime.EXPORT_OPTIONS)
    record = json.loads((ir / "tangquant.json").read_text())["parameters"]["runtime_options"]
    assert record["written"] == runtime.export_options() and set(record["why"]) == set(record["written"])


def test_runtime_options_reach_the_compiled_model(tmp_path, ov_export):
    """The keys `tune --apply` counts on the core to apply, written as tune writes them."""
    import openvino as ov
    import openvino_genai

    from tangquant.ov import runtime

    ir = tmp_path / "ir"
    shutil.copytree(ov_export[0], ir)
    size = (ir / "openvino_model.bin").stat().st_size
    wanted = {"KEY_CACHE_PRECISION": "u4", "VALUE_CACHE_PRECISION": "u8",
              "DYNAMIC_QUANTIZATION_GROUP_SIZE": "64"}
    runtime.write(ir, {**runtime.export_options(), **wanted})
    assert runtime.read(ir) == {**runtime.export_options(), **wanted}
    assert (ir / "openvino_model.bin").stat().st_size == size
    compiled = ov.Core().compile_model(str(ir / "openvino_model.xml"), "CPU")
    assert _prop(compiled, "KEY_CACHE_PRECISION") == "u4"
    assert _prop(compiled, "VALUE_CACHE_PRECISION") == "u8"
    assert _prop(compiled, "DYNAMIC_QUANTIZATION_GROUP_SIZE") == "64"
    assert openvino_genai.LLMPipeline(str(ir), "CPU").generate("写一首唐诗", max_new_tokens=2)


def test_tune_apply_writes_exactly_the_winner(tuned):
    import openvino as ov
    import openvino_genai

    from tangquant.ov import options, runtime

    ir, rc, stdout, rows = tuned
    assert rc == 0, stdout
    assert "| axis | setting | pp t/s | tg t/s | fidelity | verdict |" in stdout
    winners = [r for r in rows if r.get("verdict", "").startswith("winner")]
    assert len(winners) == 1 and winners[0]["fidelity"]["passes"]
    in_ir, _ = options.split_winner(winners[0]["options"])
    assert runtime.read(ir) == {**runtime.export_options(), **in_ir}
    manifest = json.loads((ir / "tangquant.json").read_text())
    assert manifest["tune"]["runtime_options"] == runtime.read(ir)
    compiled = ov.Core().compile_model(str(ir / "openvino_model.xml"), "CPU")
    for key, value in in_ir.items():
        assert _prop(compiled, key) == value
    assert openvino_genai.LLMPipeline(str(ir), "CPU").generate("写一首唐诗", max_new_tokens=2)


def test_gate_rejects_settings_that_change_the_greedy_output(tuned):
    rows = tuned[3]
    measured = [r for r in rows if r.get("fidelity")]
    skipped = [r for r in rows if r.get("verdict") == "the default here (not run)"]
    assert len(measured) + len(skipped) == 5  # the defaults and the four KV settings
    differ = [r for r in measured if not r["fidelity"]["identical"]]
    assert differ, "expected a 4-bit KV cache to change a greedy token of the tiny model"
    for r in differ:
        assert r["fidelity"]["kld"] > 0
        assert r["axis"] == "baseline" or r["verdict"] == "rejected (fidelity)"


def test_second_apply_needs_force(tuned, capsys):
    ir = tuned[0]
    rc = main(["tune", "--model", str(ir), "--axes", "kv", "--apply", "--results",
               str(ir.parent / "again.jsonl")])
    assert rc == 2 and "--force" in capsys.readouterr().err


@pytest.mark.fast
@pytest.mark.parametrize("text,seconds", [("300", 300), ("90s", 90), ("5m", 300), ("1.5h", 5400)])
def test_budget(text, seconds):
    from tangquant.tune import budget_seconds

    assert budget_seconds(text) == seconds


@pytest.mark.fast
def test_bad_parameters_are_refused(capsys, tmp_path):
    assert main(["tune", "--model", str(tmp_path), "--axes", "kv,bogus"]) == 2
    assert "--axes" in capsys.readouterr().err
    assert main(["tune", "--model", str(tmp_path), "--budget", "soon"]) == 2


def test_quantize_export_tune(tmp_path, tiny_model_dir):
    """`quantize --export openvino --tune`: the IR is tuned and applied at the end (a 1 s budget
    runs the defaults only, so the IR keeps the export's runtime options)."""
    from tangquant.ov import runtime

    out = tmp_path / "q"
    assert main(["-q", "quantize", "--model", str(tiny_model_dir), "--output", str(out), "--algo", "rtn",
                 "--eval-samples", "0", "--export", "openvino", "--tune", "--tune-budget", "1s"]) == 0
    rows = [json.loads(line) for line in (out / "tune.jsonl").read_text().splitlines()]
    assert rows[0]["verdict"].startswith("winner")
    assert all(r["verdict"] in ("skipped (budget)", "the default here (not run)") for r in rows[1:])
    assert json.loads((out / "openvino" / "tangquant.json").read_text())["tune"]
    assert runtime.read(out / "openvino") == runtime.export_options()


def test_tune_needs_export(tmp_path, tiny_model_dir, capsys):
    assert main(["quantize", "--model", str(tiny_model_dir), "--output", str(tmp_path / "q"),
                 "--algo", "rtn", "--tune"]) == 2
    assert "--export openvino" in capsys.readouterr().err


def _row(pp, tg, passes=True):
    return {"pp_tps": pp, "tg_tps": tg, "fidelity": {"passes": passes}}


@pytest.mark.fast
def test_a_decode_gain_that_costs_the_prefill_is_not_kept():
    """The 7B tune of 2026-12-03 on the lent Xeon: f32 decoded 28.18 t/s against bf16's 27.28
    and prefilled 204.7 against 770.9; that is not a faster chat."""
    from tangquant.measure.search import KEPT, verdict

    best, floor = _row(770.9, 27.28), 0.9 * 729.3  # the defaults prefilled 729.3 t/s
    assert verdict(_row(204.7, 28.18), best, floor) == "slower prefill (204.7 t/s, under 656.4)"
    assert verdict(_row(204.7, 28.18), best, 0.0) == KEPT
    assert verdict(_row(700.0, 28.18), best, floor) == KEPT
    assert verdict(_row(900.0, 27.50), best, floor) == "not faster"  # under the 2% decode gain
    assert verdict(_row(100.0, 20.0), _row(770.9, 27.28, passes=False), floor) == KEPT
    assert main(["tune", "--model", ".", "--min-prefill-ratio", "1.5"]) == 2


class StubClock:
    """Measurements with a stubbed clock: each engine's prefill and decode rates (t/s) give the
    runs' TTFT and time per token; a 4-bit OpenVINO key cache is faster and unfaithful; llama.cpp's
    q8_0 K/V cache decodes 10% faster and passes the gate."""

    RATES = {"ov": (4000.0, 20.0), "llamacpp": (100.0, 25.0)}  # OpenVINO prefills, llama.cpp decodes

    def __init__(self):
        self.calls = []

    def reference(self, ir, texts):
        return [[1, 2, 3]] * len(texts), {"KV_CACHE_PRECISION": "u8"}

    def speed(self, side, options, threads, prompt_tokens, gen_tokens):
        self.calls.append((side.kind, dict(options), prompt_tokens, gen_tokens))
        pp, tg = self.RATES[side.kind]
        tg *= 1.10 if options.get("ctk") == "q8_0" and options.get("ctv") == "q8_0" else 1.0
        tg *= 1.5 if options.get("KEY_CACHE_PRECISION") == "u4" else 1.0
        return {"runs": [{"ttft_ms": prompt_tokens / pp * 1000, "tpot_ms": 1000 / tg}] * 3}

    def fidelity(self, side, options, threads, prompts):
        bad = options.get("KEY_CACHE_PRECISION") == "u4" or options.get("ctv") == "q4_0"
        return {"kld": 0.3 if bad else 1e-5, "genai_identical": not bad, "steps": 16,
                "greedy_first_diff": [0 if bad else None] * len(prompts)}


@pytest.mark.fast
def test_tune_picks_the_faster_engine_per_workload_with_a_stubbed_clock(tmp_path):
    """OpenVINO prefills 40× faster, llama.cpp decodes 1.4× faster: pp512+tg128 goes to OpenVINO,
    pp32+tg256 to llama.cpp with its kept q8_0 cache; the deployment file runs the latter."""
    import importlib

    from tangquant import deploy, load
    from tangquant.measure import finals

    tune = importlib.import_module("tangquant.tune")  # the module (tangquant.tune is the stage function)

    ir, gguf = tmp_path / "poet" / "ir", tmp_path / "poet" / "gguf" / "m.gguf"
    ir.mkdir(parents=True)
    gguf.parent.mkdir()
    (ir / "openvino_model.xml").write_text("<net><edges></edges></net>")
    gguf.write_bytes(b"GGUF")
    p = tune.TuneParams(threads=2, axes=("kv",), confirm=1, budget="1h")
    clock = StubClock()
    sides, bests, rows, confirmations, races = tune._search(
        load.ModelDir(ir, "ir", {}), load.ModelDir(gguf, "gguf", {}), p, clock)
    assert races["pp512+tg128"]["winner"] == "ov" and races["pp32+tg256"]["winner"] == "llamacpp"
    assert bests["llamacpp"]["options"] == {"ctk": "q8_0", "ctv": "q8_0"}
    assert not bests["ov"]["options"]  # the u4 key cache decodes faster but fails the gate
    assert any(r["verdict"] == "rejected (fidelity)" and r["engine"] == "ov" for r in rows)
    # Each race ran both engines' best settings at the workload's own shape.
    assert ("llamacpp", {"ctk": "q8_0", "ctv": "q8_0"}, 32, 256) in clock.calls
    assert ("ov", {}, 512, 128) in clock.calls
    ov, llama = races["pp32+tg256"]["rows"]
    assert llama["request_s"] == pytest.approx(32 / 100 + 255 / 27.5)
    assert ov["vs_winner"] == pytest.approx((32 / 4000 + 255 / 20) / (32 / 100 + 255 / 27.5))
    plan = tune._deployment(tmp_path / "poet", p, sides, bests, races, "t.jsonl")
    d = deploy.read(deploy.write(tmp_path / "poet", plan))
    assert d.chosen.engine == "llamacpp" and d.chosen.model == gguf.resolve()
    assert d.chosen.options == {"ctk": "q8_0", "ctv": "q8_0"} and d.chosen.threads == 2
    assert d.choices["pp512+tg128"].engine == "ov" and d.choices["pp512+tg128"].model == ir.resolve()
    assert "**winner**" in finals.table(races)


@pytest.mark.fast
def test_workloads_are_checked():
    from tangquant.measure.finals import Workload

    assert Workload.parse("pp32+tg256") == Workload.parse("32+256") == Workload(32, 256)
    assert main(["tune", "--model", ".", "--workloads", "512+128", "--deploy-for", "32+256"]) == 2
    assert main(["tune", "--model", ".", "--workloads", "512x128"]) == 2


@pytest.mark.slow  # two engines' searches, gates and races on 2 cores: ~2 min
def test_tune_races_the_ir_and_the_gguf_and_deploys_the_winner(tmp_path, ov_export, tiny_gguf, capsys):
    """Real runs: both engines searched and gated against the IR's exact mode, each workload raced
    side by side; the deployment runs each workload's faster engine by the records' medians, and
    chat answers through it."""
    from tangquant import deploy

    ir = tmp_path / "poet" / "ir"
    shutil.copytree(ov_export[0], ir)
    results = tmp_path / "tune.jsonl"
    rc = main(["tune", "--model", str(ir), "--gguf", str(tiny_gguf), "-t", "1", "--axes", "kv",
               "-p", "16", "-n", "8", "-r", "2", "--confirm", "1", "--workloads", "64+16,8+64",
               "--deploy-for", "8+64", "--kld-bound", "0.01", "--budget", "20m",
               "--results", str(results), "--apply"])
    out = capsys.readouterr().out
    assert rc == 0, out
    records = [json.loads(line) for line in results.read_text().splitlines()]
    gates = {r["engine"]: r["fidelity"] for r in records if r.get("axis") == "baseline"}
    assert gates["llamacpp"]["engine"] == "llamacpp" and gates["llamacpp"]["steps"] == 16
    races = {r["workload"]: r for r in records if r.get("axis") == "workload"}
    assert set(races) == {"pp64+tg16", "pp8+tg64"}
    d = deploy.read(tmp_path / "poet")  # beside the IR, by default
    assert d.use == "pp8+tg64"
    for name, race in races.items():
        timed = {row["engine"]: row["request_s"] for row in race["rows"]}
        assert set(timed) == {"ov", "llamacpp"} and min(timed.values()) > 0
        assert race["winner"] == min(timed, key=timed.get) == d.choices[name].engine
    assert "| workload | engine |" in out and f"deployment {tmp_path / 'poet' / deploy.FILE}" in out
    assert main(["chat", "--model", str(tmp_path / "poet"), "--prompt", "写诗", "--max-new-tokens", "4"]) == 0
