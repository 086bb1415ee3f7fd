"""`tangquant export --format openvino`: the GPTQ checkpoint's exact INT4 integers reach the IR."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _gptq_fixtures import make_rtn_gptq
from conftest import tree_digest

from tangquant.cli import main
from tangquant.errors import ExportError

# Registered as plugins (not imported names) so the session fixtures gptq_dir and ov_export
# are built once for the whole run, not once per test module.

N_LAYERS = 2 * 7  # tiny model: 2 decoder layers of 7 linears


def _read(ir_dir):
    import openvino as ov

    return ov.Core().read_model(str(ir_dir / "openvino_model.xml"))


def test_export_writes_complete_ir_and_keeps_input(ov_export, gptq_dir):
    out, rc, stdout, before = ov_export
    assert rc == 0
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and f"{N_LAYERS} INT4 layers" in lines[0]
    for name in ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml",
                 "openvino_detokenizer.xml", "config.json", "tokenizer_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos
    manifest = json.loads((out / "tangquant.json").read_text())
    assert manifest["stage"] == "export"
    assert manifest["metrics"]["int4_layers"] == N_LAYERS
    assert manifest["metrics"]["int4_constants_checked"] >= 2 * N_LAYERS
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert tree_digest(gptq_dir) == before


def test_ir_int4_constants_are_the_checkpoints_integers(ov_export, gptq_dir):
    """Read the IR with openvino and compare every INT4 weight, scale and zero point."""
    from tangquant.gptq import GPTQCheckpoint
    from tangquant.ov.int4 import find_int4_weights, unpack_nibbles

    qc = json.loads((gptq_dir / "config.json").read_text())["quantization_config"]
    assert qc["quantizer"] == "intel-neural-compressor gptq"  # INC's own GPTQ integers
    model = _read(ov_export[0])
    found = find_int4_weights(model)
    layers = list(GPTQCheckpoint.open(gptq_dir).layers())
    assert len(layers) == N_LAYERS and set(found) == {m for m, _, _ in layers}
    for module, layer, _ in layers:
        ir = found[module]
        q = layer.q.numpy().astype(np.int16)
        values = unpack_nibbles(ir.weight).reshape(q.shape)
        zeros = layer.zeros.t().numpy().astype(np.int16)                 # [out, groups]
        if ir.zero_point is None:                                        # symmetric: i4 = q - 8
            assert ir.weight.get_element_type().get_type_name() == "i4"
            assert (zeros == 8).all()
            assert np.array_equal(values + 8, q), module
        else:
            assert np.array_equal(values, q), module
            assert np.array_equal(unpack_nibbles(ir.zero_point).reshape(zeros.shape), zeros), module
        scales = np.asarray(ir.scale.data)
        assert scales.dtype == np.float16
        assert np.array_equal(scales.reshape(zeros.shape).view(np.uint16),
                              layer.scales.t().contiguous().numpy().view(np.uint16)), module
    # Embeddings and lm_head are INT8 by default.
    u8 = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "Constant"
          and op.get_element_type().get_type_name() == "u8" and len(op.shape) == 2 and op.shape[1] > 1]
    assert any("embed_tokens" in n for n in u8) and any("lm_head" in n for n in u8)


def test_verify_detects_a_changed_integer(ov_export, gptq_dir):
    from openvino import opset13 as ops

    from tangquant.ov.int4 import find_int4_weights, unpack_nibbles, verify_constants

    model = _read(ov_export[0])
    assert verify_constants(model, gptq_dir) >= 2 * N_LAYERS
    ir = next(iter(find_int4_weights(model).values()))
    values = unpack_nibbles(ir.weight)
    values.reshape(-1)[0] = 7 if values.reshape(-1)[0] != 7 else 6
    new = ops.constant(values.astype(np.int8), dtype=ir.weight.get_element_type())
    ir.weight.output(0).replace(new.output(0))
    with pytest.raises(ExportError, match="differs from the GPTQ checkpoint"):
        verify_constants(model, gptq_dir)


def _int8_dequantized(ir) -> "object":
    """An INT8 weight as the CPU plugin decompresses it in f32 mode: (u8 - zero point) * scale."""
    import torch

    q = np.asarray(ir.weight.data).astype(np.float32)
    zp = np.asarray(ir.zero_point.data).reshape(-1, 1).astype(np.float32)
    scale = np.asarray(ir.scale.data).reshape(-1, 1).astype(np.float32)
    return torch.from_numpy((q - zp) * scale)


def test_logits_match_dequantising_reference(ov_export, gptq_dir, tiny_tokenizer):
    """f32 inference, no dynamic quantization: the IR computes the exact dequantising reference.

    The reference gets the IR's own INT8 embeddings and lm_head, so the tolerance
    measures the INT4 hand-off and the arithmetic only (measured: 4e-6 on logits of
    magnitude ~0.8; 7e-3 against the reference's fp16 embeddings).
    """
    import torch
    from optimum.intel import OVModelForCausalLM

    from tangquant.load import torch_model
    from tangquant.ov.int4 import find_compressed_weights
    from tangquant.ov.ir import EXACT_CONFIG

    ref = torch_model(gptq_dir)
    int8 = find_compressed_weights(_read(ov_export[0]), ("u8",))
    assert set(int8) == {"model.embed_tokens", "lm_head"}
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(_int8_dequantized(int8["model.embed_tokens"]))
        ref.lm_head.weight.copy_(_int8_dequantized(int8["lm_head"]))
    ids = tiny_tokenizer(["床前明月光，疑是地上霜。舉頭望明月"], return_tensors="pt")
    with torch.no_grad():
        expected = ref(**ids).logits
    ir = OVModelForCausalLM.from_pretrained(ov_export[0], ov_config=EXACT_CONFIG)
    diff = (ir(**ids).logits - expected).abs().max().item()
    assert diff < 1e-4, diff
    assert expected.abs().max().item() > 0.1  # the tolerance is small against the logits


@pytest.mark.slow
def test_fp16_embeddings_greedy_text_matches_reference(tmp_path, gptq_dir, tiny_tokenizer):
    import openvino_genai
    import torch

    from tangquant.export import export
    from tangquant.load import torch_model
    from tangquant.ov.ir import EXACT_CONFIG

    ir16 = tmp_path / "ir16"
    assert export(gptq_dir, ir16, embeddings="fp16")["int4_layers"] == N_LAYERS
    types = {op.get_element_type().get_type_name() for op in _read(ir16).get_ops()
             if op.get_type_name() == "Constant" and len(op.shape) == 2 and op.shape[0] > 64}
    assert "u8" not in types and "f16" in types
    ref = torch_model(gptq_dir)
    chat = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "写一首唐诗"}],
                                              add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)
    with torch.no_grad():
        greedy = ref.generate(**chat, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    pipe = openvino_genai.LLMPipeline(str(ir16), "CPU", **EXACT_CONFIG)
    config = pipe.get_generation_config()
    config.max_new_tokens = config.min_new_tokens = 8
    config.do_sample = False
    history = openvino_genai.ChatHistory([{"role": "user", "content": "写一首唐诗"}])
    text = pipe.generate(history, config).texts[0]
    assert text == tiny_tokenizer.decode(greedy[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)


def test_llm_pipeline_generates(ov_export):
    import openvino_genai

    pipe = openvino_genai.LLMPipeline(str(ov_export[0]), "CPU")
    result = pipe.generate("写一首唐诗", max_new_tokens=8, min_new_tokens=8)
    assert isinstance(result, str) and result


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_broken_bin_gives_one_line_error(tmp_path, capsys, ov_export, gptq_dir, damage):
    from tangquant.ov.build import verify_ir

    broken = tmp_path / "broken"
    shutil.copytree(ov_export[0], broken)
    binary = broken / "openvino_model.bin"
    if damage == "truncate":
        binary.write_bytes(binary.read_bytes()[: binary.stat().st_size // 2])
    else:
        binary.unlink()
    word = "truncated" if damage == "truncate" else "missing"
    with pytest.raises(ExportError, match=word):
        verify_ir(broken, gptq_dir)
    assert main(["chat", "--model", str(broken), "--prompt", "写一首唐诗"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tangquant: error: ") and err.count("\n") == 1 and word in err


def test_refuses_non_gptq_and_existing_output(tmp_path, capsys, tiny_model_dir, gptq_dir):
    out = tmp_path / "out"
    assert main(["export", "--model", str(tiny_model_dir), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not a GPTQ checkpoint" in err and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep").write_text("x")
    assert main(["export", "--model", str(gptq_dir), "--output", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep"]
    assert main(["export", "--model", str(gptq_dir), "--output", str(gptq_dir / "ir")]) == 2
    assert not (gptq_dir / "ir").exists()


def test_refuses_act_order_groups(tmp_path, tiny_model_dir):
    """Permuted g_idx (desc_act) cannot be held by OpenVINO's consecutive groups: refused up front."""
    import torch
    from safetensors.torch import load_file, save_file

    from tangquant.export import export
    from tangquant.errors import InputError

    src = make_rtn_gptq(tiny_model_dir, tmp_path / "act", group_size=64)
    for shard in src.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in [n for n in tensors if n.endswith(".g_idx")]:
            tensors[name] = torch.flip(tensors[name], dims=[0]).contiguous()
        save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(InputError, match="act-order"):
        export(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_asymmetric_checkpoint_keeps_u4_zero_points(tmp_path, tiny_model_dir):
    from tangquant.export import export
    from tangquant.ov.int4 import find_int4_weights, verify_constants

    src = make_rtn_gptq(tiny_model_dir, tmp_path / "asym", sym=False)
    metrics = export(src, tmp_path / "ir")
    assert metrics["int4_mode"].startswith("asymmetric")
    model = _read(tmp_path / "ir")
    weights = find_int4_weights(model)
    assert len(weights) == N_LAYERS and all(w.zero_point is not None for w in weights.values())
    assert verify_constants(model, src) == 3 * N_LAYERS


def test_export_reads_the_checkpoint_config_once(tmp_path, gptq_dir, monkeypatch):
    """The GPTQ checkpoint is opened once: config.json is read one time for a whole export."""
    from tangquant import files
    from tangquant.export import export

    reads = []
    real = files.read_json

    def counting(path, what):
        if Path(path).resolve() == (gptq_dir / "config.json").resolve():
            reads.append(what)
        return real(path, what)

    for module in ("tangquant.files", "tangquant.checkpoint", "tangquant.load", "tangquant.ov.build"):
        if hasattr(__import__(module, fromlist=["x"]), "read_json"):
            monkeypatch.setattr(f"{module}.read_json", counting)
    export(gptq_dir, tmp_path / "ir")
    assert reads == ["model config"]
