"""`tangquant quantize`: INC's integers in Qwen's GPTQ-Int4 layout, exactly, with a fidelity report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.register_assert_rewrite("_quantize_fixtures")
from _quantize_fixtures import SMALL, poem_records, run_quantize
from tangquant.cli import main

# One registration, so the session fixtures (a GPTQ and an RTN run) are shared with test_eval.py.

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WITH_BIAS = ("q_proj", "k_proj", "v_proj")


def _tensors(model_dir: Path) -> dict:
    from tangquant.checkpoint import iter_tensors, weight_files

    return {name: t for path in weight_files(model_dir) for name, t in iter_tensors(path)}


def assert_gptq_layout(out: Path, src: Path, bits=4, group_size=128, sym=True, desc_act=False,
                       complete=True):
    import torch

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["group_size"] == group_size
    assert qc["sym"] is sym and qc["desc_act"] is desc_act
    assert qc["checkpoint_format"] == ("gptq" if sym else "gptq_v2")
    tensors = _tensors(out)
    source = _tensors(src)
    n_layers = config["num_hidden_layers"]
    for i in range(n_layers):
        for lin in LINEARS:
            prefix = f"model.layers.{i}.{'self_attn' if 'proj' in lin and lin[0] in 'qkvo' else 'mlp'}.{lin}"
            out_f, in_f = source[f"{prefix}.weight"].shape
            groups = in_f // group_size
            assert f"{prefix}.weight" not in tensors
            assert tensors[f"{prefix}.qweight"].dtype == torch.int32
            assert tensors[f"{prefix}.qweight"].shape == (in_f * bits // 32, out_f)
            assert tensors[f"{prefix}.qzeros"].dtype == torch.int32
            assert tensors[f"{prefix}.qzeros"].shape == (groups, out_f * bits // 32)
            assert tensors[f"{prefix}.scales"].dtype == torch.float16
            assert tensors[f"{prefix}.scales"].shape == (groups, out_f)
            g_idx = tensors[f"{prefix}.g_idx"]
            assert g_idx.dtype == torch.int32 and g_idx.shape == (in_f,)
            if desc_act:
                assert sorted(torch.bincount(g_idx.long()).tolist()) == [group_size] * groups
            else:
                assert torch.equal(g_idx.long(), torch.arange(in_f) // group_size)
            assert (f"{prefix}.bias" in tensors) == (lin in WITH_BIAS)
            if lin in WITH_BIAS:
                assert tensors[f"{prefix}.bias"].dtype == torch.float16
    assert not any("scale_bf16_to_fp8" in n for n in tensors)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert tensors[name].dtype == torch.float16
        assert torch.equal(tensors[name], source[name].half())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "recipe.yaml", "README.md", "tangquant.json") if complete else ():
        assert (out / name).is_file(), name


def test_gptq_writes_qwen_gptq_int4_layout(gptq_dir, tiny_model_dir):
    assert_gptq_layout(gptq_dir, tiny_model_dir)
    manifest = json.loads((gptq_dir / "tangquant.json").read_text())
    m = manifest["metrics"]
    assert manifest["stage"] == "quantize" and manifest["parameters"]["algo"] == "gptq"
    assert m["quantized_layers"] == 14 and m["calibration_samples"] == 16
    # 4 bits + one fp16 scale and one 4-bit zero per 128 weights.
    assert m["bits_per_weight"] == pytest.approx(4 + 16 / 128 + 4 / 128)
    card = (gptq_dir / "README.md").read_text()
    assert f"{m['fidelity']['kld']:.6f}" in card and "group_size | 128" in card


def test_rtn_writes_the_same_layout(rtn_dir, tiny_model_dir):
    assert_gptq_layout(rtn_dir, tiny_model_dir)


def test_gptq_has_lower_kld_than_rtn_on_heldout_text(gptq_dir, rtn_dir):
    g = json.loads((gptq_dir / "tangquant.json").read_text())["metrics"]["fidelity"]
    r = json.loads((rtn_dir / "tangquant.json").read_text())["metrics"]["fidelity"]
    assert g["tokens"] == r["tokens"] > 400  # the same held-out text
    assert g["ppl_reference"] == pytest.approx(r["ppl_reference"])
    assert 0 < g["kld"] < r["kld"], (g, r)
    assert g["top1_agreement"] >= r["top1_agreement"] - 0.01


@pytest.mark.parametrize("algo,sym,act_order", [("gptq", False, True), ("awq", True, False)])
def test_reference_loader_reproduces_inc_in_memory_model(tmp_path, tiny_model_dir, calib_file,
                                                        algo, sym, act_order):
    """INC's integers are extracted exactly: the fp32 reference loader equals INC's model."""
    import torch

    from tangquant.calib import load_documents, pack
    from tangquant.checkpoint import load_config, write_config
    from tangquant.gptq import quantization_config
    from tangquant.load import tokenizer as load_tokenizer
    from tangquant.load import torch_model
    from tangquant.quant.inc import run_inc
    from tangquant.quant.recipe import QuantRecipe
    from tangquant.quant.writer import write_checkpoint
    from tangquant.recipe import resolve

    n = 4 if algo == "gptq" else 2  # AWQ's grid search is the slow part
    r = resolve(QuantRecipe, None, dict(algo=algo, use_sym=sym, act_order=act_order, seq_len=32,
                                        num_samples=n, true_sequential=False))
    samples = pack(load_documents(calib_file), load_tokenizer(tiny_model_dir), 32, n, 0).samples
    inc_model, layers = run_inc(tiny_model_dir, r, samples)
    fmt = 1 if sym else 2
    write_checkpoint(inc_model, layers, tiny_model_dir, tmp_path, 4, 128, fmt)
    write_config(tmp_path, load_config(tiny_model_dir), "float16",
                 quantization_config(4, 128, sym, act_order, 0.01, fmt))
    assert_gptq_layout(tmp_path, tiny_model_dir, sym=sym, desc_act=act_order, complete=False)
    ref = torch_model(tmp_path)
    ids = samples[0].unsqueeze(0)
    with torch.no_grad():
        inc_logits = inc_model(ids).logits  # INC dequantises (q - z) * s in fp16, then fp32
        ref_logits = ref(ids).logits
        state = ref.state_dict()
        for name in layers:
            # Bit-exact weights: INC's fp16 product is our exact fp32 product rounded to fp16.
            assert torch.equal(state[f"{name}.weight"].half(), inc_model.get_submodule(name).weight.half())
        for name, p in state.items():
            if name.rpartition(".")[0] not in layers:  # AWQ rescaled norms and biases travel too
                assert torch.equal(p, inc_model.state_dict()[name].half().float()), name
        # With the same fp16 roundings on both sides (INC's fp16 weight product; the
        # checkpoint's fp16 embeddings and norms) the two models compute the same logits.
        for name in layers:
            ref.get_submodule(name).weight.copy_(state[f"{name}.weight"].half().float())
        for p in inc_model.parameters():
            p.copy_(p.half().float())
        rounded_ref, rounded_inc = ref(ids).logits, inc_model(ids).logits
    assert torch.allclose(rounded_ref, rounded_inc, rtol=0, atol=1e-5)
    assert (ref_logits - inc_logits).abs().max() < 2e-3 * inc_logits.abs().max()
    if act_order:
        g_idx = _tensors(tmp_path)["model.layers.0.mlp.down_proj.g_idx"].long()
        assert not torch.equal(g_idx, torch.arange(256) // 128)  # a real permutation was kept


def test_inc_loads_the_checkpoint_in_huggingface_format(gptq_dir):
    import torch
    from neural_compressor.torch.quantization import load

    from tangquant.load import torch_model

    inc = load(str(gptq_dir), format="huggingface", device="cpu", torch_dtype=torch.float32)
    ref = torch_model(gptq_dir)
    ids = torch.arange(3, 60).unsqueeze(0)
    with torch.no_grad():
        a, b = inc(ids).logits, ref(ids).logits
    assert (a - b).abs().max() < 2e-3 * b.abs().max()


def _refused(capsys, argv, out: Path) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("tangquant: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
    return err


def test_refusals_exit_2_with_nothing_written(capsys, tmp_path, tiny_model_dir, gptq_dir,
                                              qv_adapter_dir, calib_file):
    out = tmp_path / "out"
    base = ["quantize", "--output", str(out)]
    model = ["--model", str(tiny_model_dir)]
    assert "already quantized" in _refused(capsys, base + ["--model", str(gptq_dir)], out)
    assert "adapter" in _refused(capsys, base + ["--model", str(qv_adapter_dir)], out)
    assert "does not divide" in _refused(capsys, base + model + ["--algo", "rtn", "--group-size", "96"], out)
    assert "bits" in _refused(capsys, base + model + ["--algo", "rtn", "--bits", "3"], out)
    assert "act-order" in _refused(capsys, base + model + ["--algo", "rtn", "--act-order"], out)
    assert "--sym" in _refused(capsys, base + model + ["--algo", "autoround", "--asym"], out)
    assert "iters" in _refused(capsys, base + model + ["--algo", "autoround", "--iters", "-1"], out)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.json").write_text("")
    (bad / "blank.txt").write_text("  \n\t\n")
    (bad / "latin1.txt").write_bytes("床前明月光".encode("big5"))
    (bad / "short.json").write_text(json.dumps(poem_records(1, 0), ensure_ascii=False))
    (bad / "odd.json").write_text(json.dumps([{"foo": 1}]))
    for name, why in [("empty.json", "empty"), ("blank.txt", "whitespace"), ("latin1.txt", "UTF-8"),
                      ("short.json", "too short"), ("odd.json", "unrecognised")]:
        assert why in _refused(capsys, base + model + ["--calib", str(bad / name)], out), name
    out.mkdir()
    (out / "keep").write_text("x")
    rc = main(base + model + ["--algo", "rtn"])
    assert rc == 2 and "--force" in capsys.readouterr().err and (out / "keep").read_text() == "x"


@pytest.mark.fast
def test_recipe_round_trip_and_flag_override(tmp_path):
    import dataclasses

    from tangquant import recipe as recipe_mod
    from tangquant.errors import ParameterError, RecipeError
    from tangquant.quant.recipe import QuantRecipe

    def resolve_recipe(path, **overrides):
        return recipe_mod.resolve(QuantRecipe, path, overrides)

    root = Path(__file__).resolve().parents[1] / "recipes"
    qwen = resolve_recipe(root / "int4-gptq-g128.yaml")
    assert (qwen.algo, qwen.bits, qwen.group_size, qwen.use_sym, qwen.act_order, qwen.percdamp) == \
        ("gptq", 4, 128, True, False, 0.01)
    for path in root.glob("int4-*.yaml"):
        resolve_recipe(path)
    r = resolve_recipe(root / "int4-gptq-g128.yaml", group_size=64, use_sym=False, percdamp=None)
    assert (r.group_size, r.use_sym, r.percdamp, r.bits) == (64, False, 0.01, 4)
    recipe_mod.save(r, tmp_path / "recipe.yaml")
    assert resolve_recipe(tmp_path / "recipe.yaml") == r
    (tmp_path / "bad.yaml").write_text("algo: gptq\ndamp: 0.01\n")
    with pytest.raises(RecipeError, match="unknown key"):
        resolve_recipe(tmp_path / "bad.yaml")
    (tmp_path / "sci.yaml").write_text("percdamp: 1e-2\n")
    with pytest.raises(RecipeError, match="0.01"):
        resolve_recipe(tmp_path / "sci.yaml")
    assert {f.name for f in dataclasses.fields(QuantRecipe)} >= {
        "bits", "group_size", "use_sym", "act_order", "percdamp", "block_size"}
    # bf16 calibration forwards exist only in the layer-by-layer driver, for calibrated algorithms
    assert resolve_recipe(root / "int4-gptq-g128-layerwise.yaml", compute_dtype="bf16").compute_dtype == "bf16"
    for bad in ({"true_sequential": False}, {"algo": "rtn", "layer_wise": True}):
        with pytest.raises(ParameterError, match="compute-dtype bf16"):
            resolve_recipe(root / "int4-gptq-g128.yaml", compute_dtype="bf16", **bad)


def test_resolved_recipe_is_saved_with_the_output(gptq_dir, calib_file):
    from tangquant.quant.recipe import QuantRecipe
    from tangquant.recipe import resolve

    saved = resolve(QuantRecipe, gptq_dir / "recipe.yaml")
    assert saved.algo == "gptq" and saved.num_samples == 16 and saved.seq_len == 64
    assert saved.calib == str(calib_file)


def test_layer_wise_rtn_writes_the_same_checkpoint(tmp_path, tiny_model_dir, rtn_dir):
    """RTN one decoder layer at a time writes exactly what INC writes on the whole model."""
    import torch

    out = tmp_path / "lw"
    assert main(["-q", "quantize", "--model", str(tiny_model_dir), "--output", str(out), "--algo", "rtn",
                 "--layer-wise", "--eval-samples", "0"]) == 0
    a, b = _tensors(out), _tensors(rtn_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((out / "tangquant.json").read_text())
    assert manifest["parameters"]["layer_wise"] is True
    assert manifest["metrics"]["driver"] == "tangquant layer by layer"


def _gptq(tiny_model_dir, out, calib_file, heldout_file, *extra) -> dict:
    run_quantize(tiny_model_dir, out, calib_file, heldout_file, "--algo", "gptq", *extra)
    return _tensors(out)


LAYER0 = [f"model.layers.0.{m}.{lin}" for m, lin in
          [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
           ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]]


def test_layer_by_layer_gptq_reproduces_inc_and_does_true_sequential_right(
        tmp_path, tiny_model_dir, calib_file, heldout_file):
    """The layer driver feeds INC the same hidden states as INC's whole-model run, and
    true-sequential calibrates o/gate/up/down on the block with the earlier groups quantized."""
    import torch

    whole = _gptq(tiny_model_dir, tmp_path / "whole", calib_file, heldout_file, "--no-true-sequential")
    flat = _gptq(tiny_model_dir, tmp_path / "flat", calib_file, heldout_file, "--no-true-sequential",
                 "--layer-wise")
    seq = _gptq(tiny_model_dir, tmp_path / "seq", calib_file, heldout_file, "--true-sequential")
    for name in LAYER0:  # layer 0 sees the embeddings in both runs: the same integers
        for leaf in ("qweight", "qzeros", "scales"):
            assert torch.equal(whole[f"{name}.{leaf}"], flat[f"{name}.{leaf}"]), name
    for name in LAYER0[:3]:  # q/k/v are the first group: nothing quantized before them
        assert torch.equal(seq[f"{name}.qweight"], flat[f"{name}.qweight"]), name
    assert not torch.equal(seq[f"{LAYER0[3]}.qweight"], flat[f"{LAYER0[3]}.qweight"])
    metrics = json.loads((tmp_path / "seq" / "tangquant.json").read_text())["metrics"]
    assert metrics["driver"] == "tangquant layer by layer"
    whole_m = json.loads((tmp_path / "whole" / "tangquant.json").read_text())["metrics"]
    assert whole_m["driver"] == "INC whole model"


def test_layer_by_layer_fidelity_equals_eval_of_the_written_checkpoint(
        tmp_path, tiny_model_dir, calib_file, heldout_file):
    """The fidelity measured in the layer-wise pass (two hidden-state streams) is what
    `tangquant eval` measures on the written checkpoint against the source."""
    from tangquant.evaluate import evaluate

    out = tmp_path / "lw"
    _gptq(tiny_model_dir, out, calib_file, heldout_file, "--layer-wise")
    inline = json.loads((out / "tangquant.json").read_text())["metrics"]["fidelity"]
    again = evaluate(out, tiny_model_dir, heldout_file, num_samples=8, seq_len=64, seed=42)
    assert inline["tokens"] == again["tokens"] and inline["kld"] > 0
    for key in ("kld", "ppl_model", "ppl_reference", "top1_agreement"):
        assert inline[key] == pytest.approx(again[key], rel=1e-3, abs=1e-7), key


def test_autoround_writes_its_integers_in_the_gptq_layout(tmp_path, tiny_model_dir, calib_file):
    """auto-round (through INC) tunes the rounding; tangquant rewrites auto-round's own
    checkpoint into its layout without changing one integer or scale."""
    import torch

    from tangquant.calib import load_documents, pack
    from tangquant.checkpoint import load_config, write_config
    from tangquant.gptq import GPTQCheckpoint, quantization_config
    from tangquant.load import tokenizer as load_tokenizer
    from tangquant.quant.autoround import _autoround_checkpoint, rewrite
    from tangquant.quant.recipe import QuantRecipe
    from tangquant.recipe import resolve

    r = resolve(QuantRecipe, None, dict(algo="autoround", iters=2, seq_len=32, num_samples=4))
    samples = pack(load_documents(calib_file), load_tokenizer(tiny_model_dir), 32, 4, 0).samples
    theirs = _autoround_checkpoint(tiny_model_dir, r, samples, tmp_path / "work")
    ours = tmp_path / "ours"
    ours.mkdir()
    counts = rewrite(theirs, tiny_model_dir, ours, 4, 1)
    write_config(ours, load_config(tiny_model_dir), "float16", quantization_config(4, 128, True, False, 0.01, 1))
    assert_gptq_layout(ours, tiny_model_dir, complete=False)
    a = {m: ql for m, ql, _ in GPTQCheckpoint.open(theirs).layers()}
    b = {m: ql for m, ql, _ in GPTQCheckpoint.open(ours).layers()}
    assert a.keys() == b.keys() and counts["quantized_layers"] == len(a) == 14
    for m in a:
        assert torch.equal(a[m].dequantize(), b[m].dequantize()), m


def test_autoround_via_the_cli_reports_fidelity(tmp_path, tiny_model_dir, calib_file, heldout_file):
    out = run_quantize(tiny_model_dir, tmp_path / "ar", calib_file, heldout_file, "--algo", "autoround",
                       "--iters", "2")
    m = json.loads((out / "tangquant.json").read_text())["metrics"]
    assert m["driver"] == "auto-round (through INC)" and m["fidelity"]["kld"] > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".autoround")]


def test_layer_wise_refuses_awq(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    err = _refused(capsys, ["quantize", "--model", str(tiny_model_dir), "--output", str(out),
                            "--algo", "awq", "--layer-wise"], out)
    assert "--layer-wise" in err


@pytest.mark.slow
def test_export_openvino_writes_the_ir_beside_the_checkpoint(tmp_path, tiny_model_dir, heldout_file):
    from tangquant.evaluate import evaluate

    out = tmp_path / "q"
    assert main(["-q", "quantize", "--model", str(tiny_model_dir), "--output", str(out), "--algo", "rtn",
                 "--eval-data", str(heldout_file), *SMALL, "--export", "openvino"]) == 0
    assert (out / "openvino" / "openvino_model.xml").is_file()
    report = json.loads((out / "tangquant.json").read_text())["metrics"]["fidelity"]
    ov = evaluate(out / "openvino", tiny_model_dir, heldout_file, num_samples=8, seq_len=64, seed=42)
    assert ov["tokens"] == report["tokens"] and ov["kld"] < 3 * report["kld"] + 1e-3
