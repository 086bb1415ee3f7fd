"""Speculative decoding with a draft model: the pair check, greedy identity in both engines, the bench row.

The draft of the fixtures is the tiny model itself quantized another way (RTN where the target is
INC GPTQ): close to the target, so drafts are accepted often but not always, and both the accept
and the reject paths of every engine run.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from _gptq_fixtures import make_rtn_gptq

from tangquant.cli import main
from tangquant.draft import DraftError, check
from tangquant.errors import EngineError, ParameterError
from tangquant.generate import Sampling, open_generator

# Under which openvino-genai's verification of K + 1 tokens rounds exactly as one-token steps do: f32
# compute, no dynamic int8 activations, an f32 KV cache (its u8 default quantizes by blocks of tokens,
# and bf16 rounds a (K+1)-row matmul differently from a 1-row one).
EXACT_KV = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
            "KV_CACHE_PRECISION": "f32"}
ROOT = Path(__file__).resolve().parent.parent
NO_LLAMA = "llama-cpp-python is not installed (pip install 'tangquant[llamacpp]')"


@pytest.fixture(scope="session")
def draft_pair(tmp_path_factory, tiny_model_dir, gptq_dir, ov_export):
    """{ir, draft_ir, gguf, draft_gguf}: the INC-GPTQ tiny model and its RTN twin, IR and GGUF."""
    from tangquant.export import export

    out = tmp_path_factory.mktemp("draft")
    rtn = make_rtn_gptq(tiny_model_dir, out / "draft-gptq")
    export(rtn, out / "draft-ir")
    pair = {"ir": ov_export[0], "draft_ir": out / "draft-ir"}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return pair
    export(rtn, out / "draft-gguf", format="gguf")
    export(gptq_dir, out / "gguf", format="gguf")
    return {**pair, "gguf": out / "gguf", "draft_gguf": out / "draft-gguf"}


def _prompts(n: int, vocab: int = 380) -> list[list[int]]:
    return [[random.Random(s).randrange(3, vocab) for _ in range(6 + s % 5)] for s in range(n)]


@pytest.mark.fast
def test_a_draft_with_another_tokenizer_or_template_is_refused(tmp_path, tiny_tokenizer):
    from conftest import poem_texts

    from tangquant.poet.tiny import train_tokenizer

    same, other, template = tmp_path / "same", tmp_path / "other", tmp_path / "template"
    tiny_tokenizer.save_pretrained(tmp_path / "target")
    tiny_tokenizer.save_pretrained(same)
    check(tmp_path / "target", same)
    train_tokenizer(poem_texts() * 4, vocab_size=300, min_frequency=1).save_pretrained(other)
    with pytest.raises(DraftError, match=r"cannot speculate for .*: it has \d+ tokens, the target 384"):
        check(tmp_path / "target", other)
    tiny_tokenizer.save_pretrained(template)
    for f in template.glob("chat_template*"):
        f.write_text(f.read_text(encoding="utf-8").replace("assistant", "bot"), encoding="utf-8")
    with pytest.raises(DraftError, match="chat template differs"):
        check(tmp_path / "target", template)


def _bad_draft(tmp_path, ir):
    """A copy of ``ir`` whose tokenizer.json gives two tokens each other's ids."""
    bad = tmp_path / "bad-draft"
    shutil.copytree(ir, bad)
    tj = json.loads((bad / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (bad / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    return bad


def test_chat_refuses_a_mismatched_draft_in_one_line(tmp_path, capsys, ov_export, tiny_tokenizer):
    """Refused before any model loads: another vocabulary, an engine without drafts, a lone K."""
    bad = _bad_draft(tmp_path, ov_export[0])
    rc = main(["chat", "--model", str(ov_export[0]), "--draft", str(bad), "--prompt", "写一首唐诗",
               "--temperature", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("tangquant: error: the draft ")
    assert "cannot speculate" in err[0] and "token id 100" in err[0]
    # openvino-genai's speculative sampling fails: refused, not tried (chat's default is sampling).
    rc = main(["chat", "--model", str(ov_export[0]), "--draft", str(ov_export[0]), "--prompt", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "greedily only" in err[0] and "--temperature 0" in err[0]
    with pytest.raises(EngineError, match="torch engine .* has no speculative decoding"):
        open_generator(_hf(tmp_path, tiny_tokenizer), draft=bad)
    with pytest.raises(ParameterError, match="--draft-tokens needs --draft"):
        open_generator(ov_export[0], draft_tokens=3)


def _hf(tmp_path, tokenizer):
    from conftest import save_tiny_model

    return save_tiny_model(tokenizer, tmp_path / "hf")


def test_ov_greedy_is_identical_with_a_draft(draft_pair):
    """Token for token, for several K, prompts and lengths; some drafts accepted, some rejected."""
    import openvino as ov
    import openvino_genai as genai

    from tangquant.generators import speculation

    plain = open_generator(draft_pair["ir"], ov_config=EXACT_KV).pipe
    counts = {"drafted": 0, "accepted": 0}
    for k in (1, 3, 5):
        drafted = open_generator(draft_pair["ir"], ov_config=EXACT_KV, draft=draft_pair["draft_ir"],
                                 draft_tokens=k)
        for prompt in _prompts(4):
            arr = np.array([prompt], dtype=np.int64)
            inputs = genai.TokenizedInputs(ov.Tensor(arr), ov.Tensor(np.ones_like(arr)))
            cfg = genai.GenerationConfig()
            cfg.max_new_tokens = cfg.min_new_tokens = 20
            cfg.do_sample, cfg.ignore_eos = False, True
            want = list(plain.generate(inputs, cfg).tokens[0])
            cfg.num_assistant_tokens = k
            res = drafted.pipe.generate(inputs, cfg)
            assert list(res.tokens[0]) == want, (k, prompt)
            got = speculation(res)
            counts = {key: counts[key] + got[key] for key in counts}
        text = drafted.generate([{"role": "user", "content": "写一首唐诗"}],
                                Sampling(max_new_tokens=16, temperature=0.0))
        assert text == open_generator(draft_pair["ir"], ov_config=EXACT_KV).generate(
            [{"role": "user", "content": "写一首唐诗"}], Sampling(max_new_tokens=16, temperature=0.0))
        assert drafted.speculation["target_passes"] < drafted.speculation["generated"] or k == 1
    assert 0 < counts["accepted"] < counts["drafted"], counts


def test_llamacpp_greedy_is_identical_with_a_draft(draft_pair):
    pytest.importorskip("llama_cpp", reason=NO_LLAMA)
    from tangquant.gguf.reader import find
    from tangquant.gguf.runtime import Session
    from tangquant.gguf.speculative import Speculator

    target = Session(find(draft_pair["gguf"]), threads=2, n_ctx=128, n_batch=32)
    draft = Session(find(draft_pair["draft_gguf"]), threads=2, n_ctx=128, n_batch=32)
    try:
        for k in (1, 3, 5):
            spec = Speculator(target, draft, k)
            for prompt in _prompts(4):
                want = target.greedy(prompt, 20)
                assert spec.greedy(prompt, 20) == want, (k, prompt)
            assert spec.stats.tokens == 4 * 20 and spec.stats.target_passes < 4 * 20
        assert 0 < spec.stats.accepted < spec.stats.drafted
        eog = Speculator(target, draft, 4).greedy([1, 5, 9], 64, stop_at_eog=True)
        assert eog == target.greedy([1, 5, 9], 64, stop_at_eog=True)
    finally:
        target.close()
        draft.close()


def test_bench_rows_carry_acceptance_and_tokens_per_step(tmp_path, draft_pair):
    from tangquant.bench import bench

    cands = [f"ov-draft=ov:{draft_pair['ir']},draft={draft_pair['draft_ir']},draft_tokens=3"]
    if "gguf" in draft_pair:
        cands.append(f"gguf-draft=llamacpp:{draft_pair['gguf']},draft={draft_pair['draft_gguf']},draft_tokens=3")
    res = bench(candidates=cands, prompt_tokens=16, gen_tokens=24, repetitions=1, warmup=1, threads=(2,),
                results_dir=str(tmp_path / "b"), bandwidth_mb=16)
    assert res["exit_code"] == 0, [r.get("error") for r in res["records"]]
    for row in res["records"]:
        assert 0 <= row["draft_acceptance"] <= 1 and row["drafted"] > 0 and row["draft_tokens"] == 3
        assert 1 <= row["tokens_per_step"] <= 4
        assert f"{row['name']} (2 threads): draft K=3" in res["report"]
    if "gguf" in draft_pair:
        assert res["records"][1]["greedy_identical"] is True


def test_bench_refuses_a_lone_draft_tokens_and_a_mismatched_draft(tmp_path, draft_pair):
    from tangquant.bench import bench
    from tangquant.errors import BenchError

    with pytest.raises(BenchError, match="option draft_tokens needs draft"):
        bench(candidates=[f"x=ov:{draft_pair['ir']},draft_tokens=3"], results_dir=str(tmp_path))
    with pytest.raises(BenchError, match="takes no option 'draft'"):
        bench(candidates=[f"x=ov+lora:{draft_pair['ir']},adapter=a,draft=d"], results_dir=str(tmp_path))
    res = bench(candidates=[f"x=ov:{draft_pair['ir']},draft={_bad_draft(tmp_path, draft_pair['ir'])}"],
                prompt_tokens=8, gen_tokens=8, repetitions=1, results_dir=str(tmp_path / "b"), bandwidth_mb=16)
    assert res["records"][0]["status"] == "failed" and "cannot speculate" in res["records"][0]["error"]


def test_serve_with_a_draft_answers_as_without(draft_pair):
    """The continuous-batching server with --draft: the same greedy text as without one."""
    from _serve_fixtures import post_json, running_server

    ov_config = tuple(f"{k}={v}" for k, v in EXACT_KV.items())
    body = {"model": "m", "prompt": "床前明月光", "max_tokens": 24, "temperature": 0}
    texts = []
    for extra in ({}, {"draft": str(draft_pair["draft_ir"]), "draft_tokens": 3}):
        with running_server(draft_pair["ir"], model_name="m", ov_config=ov_config, **extra) as srv:
            status, _, reply = post_json(srv, "/v1/completions", body, key=None)
            assert status == 200, reply
            texts.append(reply["choices"][0]["text"])
            if extra:
                status, _, reply = post_json(srv, "/v1/completions", {**body, "temperature": 0.7}, key=None)
                assert status == 400 and "greedily only" in reply["error"]["message"]
    assert texts[0] == texts[1] and texts[0]


@pytest.mark.fast
def test_serve_settings_for_a_draft_are_checked():
    from tangquant.server.config import ServeConfig

    for kwargs, message in (({"draft_tokens": 3}, "--draft-tokens needs --draft"),
                            ({"draft": "d", "draft_tokens": 0}, "must be an integer >= 1"),
                            ({"draft": "d", "engine": "pipelines"}, "--draft needs --engine batch"),
                            ({"draft": "d", "adapter": ("a=b",)}, "cannot be combined with --adapter")):
        with pytest.raises(ParameterError, match=message):
            ServeConfig(**kwargs)


def _pipeline_recipe(path, tmp_path, tiny_model_dir, qv_adapter_dir, **extra):
    import yaml

    values = {"base": str(tiny_model_dir), "adapter": str(qv_adapter_dir), "workdir": str(tmp_path / "work"),
              "merge_dtype": "fp32", "quant_recipe": str(ROOT / "recipes" / "int4-rtn-g128.yaml"), "bench": False,
              **extra}
    path.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
    return path


def test_pipeline_draft_section(tmp_path, tiny_model_dir, qv_adapter_dir, tiny_tokenizer):
    """A draft: section: its keys become draft_* (flags override), others are refused, the draft's
    stages are planned beside the target's, and a draft with another tokenizer stops the run
    before anything is written."""
    from tangquant.errors import RecipeError
    from tangquant.pipeline import load_recipe, plan, run_pipeline

    path = _pipeline_recipe(tmp_path / "p.yaml", tmp_path, tiny_model_dir, qv_adapter_dir,
                            draft={"base": str(tiny_model_dir), "tokens": 3})
    r = load_recipe(path)
    assert (r.draft_base, r.draft_adapter, r.draft_tokens) == (str(tiny_model_dir), None, 3)
    assert load_recipe(path, draft_tokens=6).draft_tokens == 6
    with pytest.raises(RecipeError, match="draft.tokens must be an integer >= 1"):
        load_recipe(path, draft_tokens=0)
    stages = run_pipeline(path, dry_run=True)["stages"]
    assert stages == {"merge": "planned", "quantize": "planned", "export": "planned",
                      "draft-quantize": "planned", "draft-export": "planned"}
    bench = plan(load_recipe(path, bench=True))[-1][2]
    assert bench.candidates[1].endswith(f"draft={tmp_path / 'work' / 'draft' / 'int4-openvino'},draft_tokens=3")
    for section, message in (({"base": "x", "colour": "red"}, "unknown key.*draft.colour"),
                             ("x", "'draft' must be a mapping")):
        bad = _pipeline_recipe(tmp_path / "bad.yaml", tmp_path, tiny_model_dir, qv_adapter_dir, draft=section)
        with pytest.raises(RecipeError, match=message):
            load_recipe(bad)
    both = _pipeline_recipe(tmp_path / "both.yaml", tmp_path, tiny_model_dir, qv_adapter_dir,
                            draft={"base": "x"}, draft_base="y")
    with pytest.raises(RecipeError, match="draft.base and draft_base both given"):
        load_recipe(both)
    other = _hf(tmp_path, tiny_tokenizer)
    tj = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    tj["model"]["merges"] = tj["model"]["merges"][::-1]
    (other / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    mismatched = _pipeline_recipe(tmp_path / "m.yaml", tmp_path, tiny_model_dir, qv_adapter_dir,
                                  draft={"base": str(other)})
    with pytest.raises(DraftError, match="BPE merges differ"):
        run_pipeline(mismatched)
    assert not (tmp_path / "work").exists()


@pytest.mark.slow  # the target's merge → RTN → IR and the draft's RTN → IR: a minute on 2 busy cores
def test_pipeline_builds_the_draft_beside_the_target(tmp_path, tiny_model_dir, qv_adapter_dir):
    from tangquant.pipeline import run_pipeline

    path = _pipeline_recipe(tmp_path / "p.yaml", tmp_path, tiny_model_dir, qv_adapter_dir,
                            draft={"base": str(tiny_model_dir)})
    assert set(run_pipeline(path)["stages"].values()) == {"ran"}
    assert (tmp_path / "work" / "draft" / "int4-openvino" / "openvino_model.xml").is_file()
    assert set(run_pipeline(path)["stages"].values()) == {"skipped"}
    check(tmp_path / "work" / "int4-openvino", tmp_path / "work" / "draft" / "int4-openvino")


@pytest.mark.fast
def test_the_projection_is_its_formula():
    """E / (t_verify + K·t_draft) against t_target: 3 tokens per round in 30 + 4·2 ms vs 25 ms plain."""
    from tangquant.measure.speedup import expected_tokens, project, tokens_per_round

    got = project(3.0, 4, t_target_ms=25.0, t_verify_ms=30.0, t_draft_ms=2.0)
    assert got["projected_tps"] == pytest.approx(1000 * 3 / 38) and got["plain_tps"] == 40.0
    assert got["projected_speedup"] == pytest.approx(75 / 38) and got["label"] == "projection"
    assert tokens_per_round(generated=101, target_passes=26) == 4.0  # the prefill's pass and token left out
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.7, 4) == pytest.approx((1 - 0.7 ** 5) / 0.3)


@pytest.mark.fast
def test_draft_options_are_rows_of_the_engines_table():
    from tangquant import engines
    from tangquant.ov.options import split_winner, tune_grid

    for kind in ("ov", "llamacpp"):
        e = engines.get(kind)
        assert e.check_options({"draft": "d", "draft_tokens": "3"})["draft_tokens"] == "3"
        with pytest.raises(EngineError, match="option draft_tokens needs draft"):
            e.check_options({"draft_tokens": "3"})
        with pytest.raises(EngineError, match=">= 1"):
            e.check_options({"draft": "d", "draft_tokens": "0"})
    # chat and serve draft with openvino-genai; llama.cpp's draft= is the bench's, and the refusal says so
    assert engines.get("ov").has("draft") and not engines.get("torch").has("draft")
    with pytest.raises(EngineError, match="no speculative decoding .* in chat and serve; .*draft=D.gguf"):
        engines.get("llamacpp").require("draft", "--draft")
    # tune's grid: the draft axis is empty without a draft, K values with one; never in runtime_options
    assert [a.values for a in tune_grid(("draft",), 4, set(), 4)] == [({},)]
    (axis,) = tune_grid(("draft",), 4, set(), 4, draft="d")
    assert axis.needs_pa and [v.get("draft_tokens") for v in axis.values[1:]] == ["2", "3", "4", "5", "6", "8"]
    runtime, caller = split_winner({"KV_CACHE_PRECISION": "u8", "draft": "d", "draft_tokens": "4"})
    assert runtime == {"KV_CACHE_PRECISION": "u8"} and caller == {"draft": "d", "draft_tokens": "4"}


def test_chat_and_serve_refuse_a_gguf_draft_in_one_line(draft_pair, capsys):
    """llama.cpp drafts in the bench only: chat and serve on a GGUF pair say so, never ignore it."""
    if "gguf" not in draft_pair:
        pytest.skip("llama-cpp-python is not installed")
    gguf, draft = str(draft_pair["gguf"]), str(draft_pair["draft_gguf"])
    rc = main(["chat", "--model", gguf, "--draft", draft, "--prompt", "x", "--temperature", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no speculative decoding" in err[0] and "draft=" in err[0]
    rc = main(["serve", "--model", gguf, "--draft", draft, "--port", "0"])
    err2 = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err2 == err  # one refusal, from the engines table, for both commands
