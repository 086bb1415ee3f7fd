"""`tangquant merge`: exact against peft for every LoRA variant, and every refusal leaves nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import PROMPTS, make_adapter, tree_digest
from tangquant.cli import main
from tangquant.merge import merge

TOL = 1e-4


def _ids(tokenizer):
    import torch

    rows = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in PROMPTS[:2]]
    ids = [tokenizer(r)["input_ids"] for r in rows]
    n = min(len(i) for i in ids)
    return torch.tensor([i[:n] for i in ids])


def _logits(model_dir, ids, adapter=None, vocab=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    if vocab:
        model.resize_token_embeddings(vocab)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model.eval()(ids).logits


def _assert_exact(base, adapter, out, tokenizer):
    ids = _ids(tokenizer)
    merged = _logits(out, ids)
    ref = _logits(base, ids, adapter)
    assert (merged - ref).abs().max().item() <= TOL
    assert (merged - _logits(base, ids)).abs().max().item() > 1e-2, "the merge changed nothing"


VARIANTS = {
    "alpha_ne_r_all_linear": dict(r=4, lora_alpha=11, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rank_alpha_pattern": dict(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        rank_pattern={"layers.0.self_attn.q_proj": 4, "k_proj": 2},
        alpha_pattern={"v_proj": 7, r"layers\.1\.mlp\.down_proj": 3}),
    "embeddings": dict(target_modules=["embed_tokens", "lm_head", "q_proj"]),
    "modules_to_save": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "dora": dict(use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lora_bias": dict(lora_bias=True, target_modules=["q_proj", "v_proj"]),
    "trainable_tokens": dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 17]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_merge_matches_peft(variant, tmp_path, tiny_model_dir, tiny_tokenizer):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=7, **VARIANTS[variant])
    metrics = merge(tiny_model_dir, adapter, tmp_path / "out", dtype="fp32")
    assert metrics["tensors_merged"] >= 2
    _assert_exact(tiny_model_dir, adapter, tmp_path / "out", tiny_tokenizer)


def test_seed_adapter_cli_output_and_verify(tmp_path, tiny_model_dir, qv_adapter_dir, tiny_tokenizer,
                                           capsys):
    from safetensors import safe_open

    before = tree_digest(tiny_model_dir), tree_digest(qv_adapter_dir)
    out = tmp_path / "merged"
    rc = main(["merge", "--model", str(tiny_model_dir), "--adapter", str(qv_adapter_dir),
               "--output", str(out), "--verify", "2"])
    assert rc == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(out) in summary and "4 tensors merged" in summary and "max |Δlogit|" in summary
    assert (tree_digest(tiny_model_dir), tree_digest(qv_adapter_dir)) == before
    # Same shard names and index as the base, tokenizer and generation config beside them.
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        p.name for p in tiny_model_dir.glob("*.safetensors"))
    for name in ("model.safetensors.index.json", "tokenizer.json", "generation_config.json",
                 "chat_template.jinja"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "tangquant.json").read_text())
    assert manifest["stage"] == "merge"
    assert manifest["metrics"]["max_abs_logit_delta"] <= TOL
    assert manifest["parameters"]["lora"]["r"] == 8 and manifest["parameters"]["lora"]["lora_alpha"] == 16
    assert len(manifest["inputs"]["sha256"]["adapter/adapter_model.safetensors"]) == 64
    assert "model/model.safetensors.index.json" in manifest["inputs"]["sha256"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    _assert_exact(tiny_model_dir, qv_adapter_dir, out, tiny_tokenizer)
    # Untargeted tensors are copied bit for bit.
    shard = sorted(out.glob("*.safetensors"))[0]
    with safe_open(str(shard), "pt") as f, safe_open(str(tiny_model_dir / shard.name), "pt") as g:
        for name in f.keys():
            if "q_proj.weight" not in name and "v_proj.weight" not in name:
                assert f.get_tensor(name).equal(g.get_tensor(name)), name


def test_bf16_output(tmp_path, tiny_model_dir, qv_adapter_dir):
    import torch
    from safetensors import safe_open

    out = tmp_path / "bf16"
    merge(tiny_model_dir, qv_adapter_dir, out, dtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())


def _resized_adapter(base, out, tokenizer, extra=64):
    """An adapter trained after adding tokens: peft saves the resized embeddings beside the LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    tok = type(tokenizer).from_pretrained(base)
    tok.add_tokens(["<|tang|>", "<|poem|>"])
    vocab = model.config.vocab_size + extra
    model.resize_token_embeddings(vocab)
    peft_model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out), vocab


def test_resized_vocabulary(tmp_path, tiny_model_dir, tiny_tokenizer):
    adapter, vocab = _resized_adapter(tiny_model_dir, tmp_path / "resized", tiny_tokenizer)
    out = tmp_path / "out"
    metrics = merge(tiny_model_dir, adapter, out, dtype="fp32", verify=1)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab
    assert "<|tang|>" in (out / "tokenizer.json").read_text()
    assert metrics["max_abs_logit_delta"] <= TOL
    # Without the fine-tuning tokenizer the new rows would be unusable: refused.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (adapter / name).unlink()
    _refused(["--model", str(tiny_model_dir), "--adapter", str(adapter)], tmp_path,
             "holds no tokenizer", [tiny_model_dir, adapter])


# --- refusals -------------------------------------------------------------------------------


def _refused(args, tmp_path, message, inputs, capsys=None, output=None):
    import io
    from contextlib import redirect_stderr

    before = [tree_digest(p) for p in inputs]
    out = Path(output or tmp_path / "refused-out")
    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(["merge", *args, "--output", str(out)])
    # A progress bar may have been drawn (and cleared with \r) before the error line.
    text = err.getvalue().split("\r")[-1].strip()
    assert rc == 2, text
    assert text.startswith("tangquant: error: ") and "\n" not in text and message in text, text
    assert output is not None or not out.exists()
    assert not any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir())
    assert [tree_digest(p) for p in inputs] == before
    return text


def _copy_adapter(src, dst, edit_tensors=None, edit_config=None):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(str(dst / "adapter_model.safetensors"))
        tensors = edit_tensors(tensors) or tensors
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "adapter_model.safetensors"))
    if edit_config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        edit_config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def test_shape_mismatch_names_tensor_shapes_and_base(tmp_path, tiny_model_dir, qv_adapter_dir):
    import torch

    bad = _copy_adapter(qv_adapter_dir, tmp_path / "bad", edit_tensors=lambda t: t.update(
        {f"{Q0}.lora_B.weight": torch.randn(64, 8)}))
    text = _refused(["--model", str(tiny_model_dir), "--adapter", str(bad)], tmp_path,
                    "model.layers.0.self_attn.q_proj.weight", [tiny_model_dir, bad])
    assert "[64, 128]" in text and "[128, 128]" in text and str(tiny_model_dir) in text


def test_no_lora_key_matches(tmp_path, tiny_model_dir, qv_adapter_dir):
    def rename(t):
        return {k.replace("model.layers.", "transformer.h."): v for k, v in t.items()}

    bad = _copy_adapter(qv_adapter_dir, tmp_path / "llama", edit_tensors=rename)
    _refused(["--model", str(tiny_model_dir), "--adapter", str(bad)], tmp_path,
             "no LoRA key of the adapter matches the base", [tiny_model_dir, bad])


def test_half_a_lora_pair(tmp_path, tiny_model_dir, qv_adapter_dir):
    bad = _copy_adapter(qv_adapter_dir, tmp_path / "half",
                        edit_tensors=lambda t: {k: v for k, v in t.items() if k != f"{Q0}.lora_B.weight"})
    _refused(["--model", str(tiny_model_dir), "--adapter", str(bad)], tmp_path,
             "half a LoRA pair", [tiny_model_dir, bad])


def test_nan_after_merge_leaves_nothing(tmp_path, tiny_model_dir, qv_adapter_dir):
    def poison(t):
        t[f"{Q0}.lora_B.weight"][3, 1] = float("nan")

    bad = _copy_adapter(qv_adapter_dir, tmp_path / "nan", edit_tensors=poison)
    # Refused when the adapter is read, before any shard is merged.
    _refused(["--model", str(tiny_model_dir), "--adapter", str(bad)], tmp_path,
             f"{Q0}.lora_B.weight in {bad / 'adapter_model.safetensors'} holds 1 NaN or Inf", [tiny_model_dir, bad])


def test_quantized_base_refused_with_fix(tmp_path, tiny_model_dir, qv_adapter_dir):
    base = tmp_path / "gptq"
    shutil.copytree(tiny_model_dir, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (base / "config.json").write_text(json.dumps(cfg))
    _refused(["--model", str(base), "--adapter", str(qv_adapter_dir)], tmp_path,
             "merge into the full-precision base", [base, qv_adapter_dir])


def test_pickles_refused_unless_allowed(tmp_path, tiny_model_dir, qv_adapter_dir, tiny_tokenizer):
    import torch
    from safetensors.torch import load_file

    base = tmp_path / "binbase"
    shutil.copytree(tiny_model_dir, base, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = {}
    for shard in tiny_model_dir.glob("*.safetensors"):
        state.update(load_file(str(shard)))
    torch.save(state, base / "pytorch_model.bin")
    adapter = tmp_path / "binadapter"
    shutil.copytree(qv_adapter_dir, adapter, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(str(qv_adapter_dir / "adapter_model.safetensors")), adapter / "adapter_model.bin")
    _refused(["--model", str(base), "--adapter", str(qv_adapter_dir)], tmp_path,
             "--allow-pickle", [base, qv_adapter_dir])
    _refused(["--model", str(tiny_model_dir), "--adapter", str(adapter)], tmp_path,
             "--allow-pickle", [tiny_model_dir, adapter])
    out = tmp_path / "fromp"
    merge(base, adapter, out, allow_pickle=True)
    assert (out / "model.safetensors").is_file()
    _assert_exact(tiny_model_dir, qv_adapter_dir, out, tiny_tokenizer)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(peft_type="IA3"), "only LoRA"),
    (lambda c: c.update(target_modules=["k_proj"]), "do not select"),
    (lambda c: c.update(alora_invocation_tokens=[1, 2]), "LoRA variant alora_invocation_tokens"),
    (lambda c: c.update(r=4), "rank-4 pair"),
])
def test_unsupported_adapter_configs(change, message, tmp_path, tiny_model_dir, qv_adapter_dir):
    bad = _copy_adapter(qv_adapter_dir, tmp_path / "cfg", edit_config=change)
    _refused(["--model", str(tiny_model_dir), "--adapter", str(bad)], tmp_path, message,
             [tiny_model_dir, bad])


def test_outputs_refused(tmp_path, tiny_model_dir, qv_adapter_dir):
    args = ["--model", str(tiny_model_dir), "--adapter", str(qv_adapter_dir)]
    inputs = [tiny_model_dir, qv_adapter_dir]
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    _refused(args, tmp_path, "already exists", inputs, output=existing)
    assert (existing / "keep.txt").read_text() == "precious"
    inside = tiny_model_dir / "merged"
    _refused(args, tmp_path, "inside the input", inputs, output=inside)
    assert not inside.exists()


def test_tied_embeddings_with_embedding_lora_refused(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(tiny_model_dir, tmp_path / "emb", target_modules=["embed_tokens", "q_proj"])
    base = tmp_path / "tied"
    shutil.copytree(tiny_model_dir, base)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shard = base / index["weight_map"].pop("lm_head.weight")
    tensors = load_file(str(shard))
    tensors.pop("lm_head.weight")
    if tensors:
        save_file(tensors, str(shard), metadata={"format": "pt"})
    else:
        shard.unlink()
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((base / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (base / "config.json").write_text(json.dumps(cfg))
    _refused(["--model", str(base), "--adapter", str(adapter)], tmp_path, "ties lm_head",
             [base, adapter])


# --- tangquant.poet.shapes (the shape-true random models the benchmarks build on) ---------------


def _shapes_module():
    from tangquant.poet import shapes

    return shapes


@pytest.mark.fast
def test_shapes_match_qwen15_parameter_counts():
    import math

    shapes = _shapes_module()
    counts = {s: sum(math.prod(shape) for _, shape in shapes.tensor_shapes(shapes.qwen_config(s)))
              for s in shapes.SHAPES}
    # 1.8B and 7B match Qwen's published sizes (1.84B, 7.72B); 0.5B is tied (no lm_head copy).
    assert round(counts["1.8b"] / 1e9, 2) == 1.84 and round(counts["7b"] / 1e9, 2) == 7.72
    assert round(counts["0.5b"] / 1e9, 3) == 0.464
    cfg = shapes.qwen_config("7b")
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (4096, 11008, 32)
    assert cfg["vocab_size"] == 151936 and cfg["rope_theta"] == 1e6 and not cfg["tie_word_embeddings"]


def test_a_cut_of_a_shape_keeps_its_widths_and_only_its_first_layers(tmp_path):
    """``--layers N``: the shape's widths and vocabulary with N decoder layers (a per-layer benchmark's
    model), a config transformers reads as such."""
    import json

    from safetensors import safe_open
    from transformers import AutoConfig

    shapes = _shapes_module()
    out = shapes.build_shape("0.5b", tmp_path / "cut", layers=1)
    config = AutoConfig.from_pretrained(out)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (1, 1024, 2816)
    assert json.loads((out / "config.json").read_text())["max_window_layers"] == 1
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        layers = {k.split(".")[2] for k in f.keys() if k.startswith("model.layers.")}
    assert layers == {"0"}


def test_shapes_streamed_safetensors_and_adapter(tmp_path, tiny_model_dir):
    import torch
    from safetensors import safe_open

    shapes = _shapes_module()
    entries = [("a.weight", (300, 7)), ("b.norm.weight", (7,)), ("c.bias", (5,))]
    path = tmp_path / "x.safetensors"
    shapes._write_safetensors(path, entries, "bf16", seed=1, std=0.02)
    with safe_open(str(path), "pt") as f:
        a, norm = f.get_tensor("a.weight"), f.get_tensor("b.norm.weight")
        assert a.dtype == torch.bfloat16 and tuple(a.shape) == (300, 7)
        assert 0.015 < a.float().std() < 0.025 and (norm.float() - 1).abs().max() < 0.2
    # The random adapter loads in peft and changes the model.
    adapter = shapes.build_adapter(tiny_model_dir, tmp_path / "lora")
    assert "speed only" in (adapter / "README.md").read_text()
    out = tmp_path / "merged"
    assert merge(tiny_model_dir, adapter, out, verify=1)["max_abs_logit_delta"] <= TOL


def test_shapes_random_gptq_is_a_symmetric_checkpoint_tangquant_exports(tmp_path, capsys):
    """The speed runs' INT4 stand-in: the GPTQ layout quantize writes (zero points 8, integers
    over all of 0..15), which the GGUF export takes as exact Q4_0 and llama.cpp runs."""
    from tangquant.export import export
    from tangquant.gptq import GPTQCheckpoint

    shapes = _shapes_module()
    config = {**shapes.qwen_config("0.5b"), "hidden_size": 256, "intermediate_size": 512,  # k-quant rows
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2048}
    ckpt = GPTQCheckpoint.open(shapes.build_gptq(config, tmp_path / "gptq"))
    assert (ckpt.bits, ckpt.group_size, ckpt.sym, ckpt.desc_act) == (4, 128, True, False)
    assert len(ckpt.layer_names) == 2 * 7
    for _, layer, _ in ckpt.layers():
        assert (layer.zeros == 8).all() and int(layer.q.min()) == 0 and int(layer.q.max()) == 15
    res = export(ckpt, tmp_path / "gguf", format="gguf")
    assert res["q4_0_tensors_exact"] == 14
    # measure.anchor --from-gguf: llama-quantize's tensor types from tangquant's file (speed rows).
    pytest.importorskip("llama_cpp")
    import json

    from tangquant.measure import anchor
    assert anchor.main(["--from-gguf", str(tmp_path / "gguf" / res["file"]), "--output", str(tmp_path / "a")]) == 0
    made = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["files"]
    assert set(made) == {"q4_0", "q4_k_m"} and made["q4_0"]["path"].endswith("/" + res["file"])
    assert made["q4_0"]["tensor_types"]["Q4_0"] == 14 and "Q6_K" in made["q4_0"]["tensor_types"]
    assert {"Q4_K", "Q6_K"} <= set(made["q4_k_m"]["tensor_types"]) and "Q4_0" not in made["q4_k_m"]["tensor_types"]
