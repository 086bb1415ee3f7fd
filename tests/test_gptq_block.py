"""True-sequential GPTQ on one layer runs the block once per group, only up to that group's input."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_each_group_runs_the_block_once_per_sample_and_stops_before_its_linears(tiny_model_dir):
    """INC's own convert ran the whole block twice per sample for every group (its Hessian pass and
    its step-2.5 output pass); here the q/k/v, o and gate/up groups never reach down_proj, and no
    group computes its own linears' outputs (the Hessian needs their input only)."""
    import torch

    from tangquant.checkpoint import TensorReader
    from tangquant.quant import layer_by_layer as lbl
    from tangquant.quant.inc import inc_workspace
    from tangquant.quant.recipe import QuantRecipe

    skeleton, rotary = lbl._skeleton(Path(tiny_model_dir))
    ctx = lbl._Context(rotary)
    block = lbl._one_layer_model(lbl._load_layer(skeleton, TensorReader(Path(tiny_model_dir)), 0))
    torch.manual_seed(0)
    hidden = [torch.randn(1, 24, skeleton.config.hidden_size) for _ in range(3)]
    calls = {"layer": 0, "down_proj": 0, "down_proj done": 0}
    layer = block.model.layers[0]
    layer.register_forward_pre_hook(lambda *_: calls.__setitem__("layer", calls["layer"] + 1))
    layer.mlp.down_proj.register_forward_pre_hook(
        lambda *_: calls.__setitem__("down_proj", calls["down_proj"] + 1))
    layer.mlp.down_proj.register_forward_hook(
        lambda *_: calls.__setitem__("down_proj done", calls["down_proj done"] + 1))
    with inc_workspace():
        out, _ = lbl.quantize_block(block, QuantRecipe(group_size=32), hidden, ctx, Path(tiny_model_dir))
    # two probes (sequential_groups', the replay plan's), then (q,k,v | o | gate,up | down): one pass each
    assert calls["layer"] == 2 + 4 * len(hidden)
    assert calls["down_proj"] == 2 + len(hidden)  # the probes, then the down group's own pass only
    assert calls["down_proj done"] == 2  # the probes': the down group stopped at its input
    assert not lbl._linears(out)


def _quantized_layer(model_dir: Path, hidden: list, replay: bool, monkeypatch):
    """Layer 0 quantized true-sequentially: (its state dict, how often its attention ran)."""
    from tangquant.checkpoint import TensorReader
    from tangquant.quant import gptq_block
    from tangquant.quant import layer_by_layer as lbl
    from tangquant.quant.inc import inc_workspace
    from tangquant.quant.recipe import QuantRecipe

    skeleton, rotary = lbl._skeleton(model_dir)
    block = lbl._one_layer_model(lbl._load_layer(skeleton, TensorReader(model_dir), 0))
    calls = []
    block.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    with monkeypatch.context() as patch:
        if not replay:
            patch.setattr(gptq_block, "_replay_plan", lambda *_: {})
        with inc_workspace():
            out, _ = lbl.quantize_block(block, QuantRecipe(group_size=32), hidden, lbl._Context(rotary), model_dir)
    return out.state_dict(), len(calls)


def test_the_later_groups_replay_the_attention_and_get_the_same_integers(tiny_model_dir, monkeypatch):
    """After o_proj is quantized, gate/up and down need only o_proj applied to the attention output
    the o group captured: the attention (q/k/v included) runs in the first two groups only, and
    every integer and scale is what running the whole attention again gives."""
    import torch

    from tangquant.quant import layer_by_layer as lbl

    torch.manual_seed(0)
    width = lbl._skeleton(Path(tiny_model_dir))[0].config.hidden_size
    hidden = [torch.randn(1, 24, width) for _ in range(3)]
    replayed, attention_runs = _quantized_layer(Path(tiny_model_dir), hidden, True, monkeypatch)
    again, attention_runs_again = _quantized_layer(Path(tiny_model_dir), hidden, False, monkeypatch)
    assert attention_runs == 2 + 2 * len(hidden)  # two probes, the q/k/v and o groups
    assert attention_runs_again == 1 + 4 * len(hidden)
    assert replayed.keys() == again.keys() and any(k.endswith("scales") for k in replayed)
    for name, tensor in replayed.items():
        assert torch.equal(tensor, again[name]), name


def test_the_layer_driver_leaves_no_layer_to_the_cycle_collector(tmp_path, tiny_model_dir):
    """Each quantized layer is freed when the driver drops it: a layer kept alive by a reference
    cycle waits for the cyclic collector, and at 7B the peak RSS grew by a layer's fp32 weights
    per layer."""
    import gc

    import torch

    from tangquant.quant import layer_by_layer as lbl
    from tangquant.quant.recipe import QuantRecipe

    vocab = lbl._skeleton(Path(tiny_model_dir))[0].config.vocab_size
    torch.manual_seed(0)
    samples = [torch.randint(0, vocab, (32,)) for _ in range(3)]
    (tmp_path / "q").mkdir()
    gc.collect()
    gc.disable()
    try:
        lbl.run_layer_wise(Path(tiny_model_dir), tmp_path / "q", QuantRecipe(group_size=32), samples,
                           samples[:1], 1)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, (torch.nn.Module, torch.Tensor))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


def _o_group_hessian(model_dir: Path, bf16: bool, n: int):
    """(the o group's GPTQ object, the inputs it captured) from n samples of 24 tokens."""
    import torch

    from tangquant.checkpoint import TensorReader
    from tangquant.quant import gptq_block
    from tangquant.quant import layer_by_layer as lbl
    from tangquant.quant.inc import inc_config, inc_workspace
    from tangquant.quant.recipe import QuantRecipe

    recipe = QuantRecipe(group_size=32, layer_wise=True, compute_dtype="bf16" if bf16 else "fp32")
    skeleton, rotary = lbl._skeleton(model_dir)
    ctx = lbl._Context(rotary)
    block = lbl._one_layer_model(lbl._load_layer(skeleton, TensorReader(model_dir), 0))
    torch.manual_seed(0)
    hidden = [torch.randn(1, 24, skeleton.config.hidden_size) for _ in range(n)]
    name = "model.layers.0.self_attn.o_proj"
    with inc_workspace():
        cfg = gptq_block.layer_config(inc_config(recipe, model_dir, true_sequential=False))
        kept = []
        gptqs = gptq_block._hessians(block, [name], hidden, ctx.kwargs, cfg, True, [], kept, bf16)
    return gptqs[name], kept, cfg


def test_the_fp32_hessian_is_incs_bit_for_bit(tiny_model_dir):
    """The default (fp32) calibration feeds each sample to INC's update as INC does: the buffered
    product gives INC's own add_batch's Hessian bit for bit."""
    import torch

    from tangquant.quant import gptq_block

    gptq, kept, cfg = _o_group_hessian(Path(tiny_model_dir), False, 3)
    assert kept[0].dtype == torch.float32
    inc = gptq_block._gptq(gptq.layer, cfg)
    for k in kept:
        inc.add_batch(k, None)
    assert gptq.nsamples == inc.nsamples == 3
    assert torch.equal(inc.H, gptq.H)


def test_a_bf16_calibration_gives_the_hessian_of_its_inputs_from_bf16_products(tiny_model_dir, monkeypatch):
    """compute_dtype bf16: the forwards' matmuls in bf16 (the attention's output the o group reads
    comes from one), the Hessian fed BATCH_TOKENS at a time with bf16 products and fp32 sums:
    2/n·ΣXᵀX over every sample (none left in a partial batch), in fp32, within bf16's rounding of
    the operands; oneDNN's matmul precision is back to what it was."""
    import torch

    from tangquant.quant import calibration

    monkeypatch.setattr(calibration, "BATCH_TOKENS", 2 * 24)  # 5 samples: two full batches and one left over
    before = torch.backends.mkldnn.matmul.fp32_precision
    gptq, kept, _ = _o_group_hessian(Path(tiny_model_dir), True, 5)
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    assert kept[0].dtype == torch.bfloat16
    x = torch.cat([k.reshape(-1, k.shape[-1]).double() for k in kept])
    expected = 2 / len(kept) * x.T @ x
    assert gptq.H.dtype == torch.float32 and gptq.nsamples == 5
    scale = expected.abs().max()
    assert (gptq.H.double() - expected).abs().max() / scale < 2 ** -7  # bf16 operands: 8 significant bits


def test_the_groups_follow_the_inputs_not_reused_addresses(tiny_model_dir):
    """q/k/v | o | gate,up | down, every time: compared by address alone, o_proj's freed input
    came back as the post-attention norm's output now and then, and gate/up joined o_proj's group
    (calibrated on the attention's output instead of their own input)."""
    import torch

    from tangquant.checkpoint import TensorReader
    from tangquant.quant import layer_by_layer as lbl

    skeleton, rotary = lbl._skeleton(Path(tiny_model_dir))
    ctx = lbl._Context(rotary)
    block = lbl._one_layer_model(lbl._load_layer(skeleton, TensorReader(Path(tiny_model_dir)), 0))
    hidden = torch.randn(1, 24, skeleton.config.hidden_size)
    want = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    for _ in range(40):
        groups = lbl.sequential_groups(block, hidden, ctx)
        assert [[n.rpartition(".")[2] for n in g] for g in groups] == want


def test_act_order_runs_incs_own_fasterquant_on_a_copy_of_the_shared_hessian(tiny_model_dir):
    """INC's fasterquant (act-order: not tangquant's) edits its Hessian in place, so each linear of a
    shared group gets its own copy: q/k/v come out as with one Hessian each (not true-sequential)."""
    import torch

    from tangquant.checkpoint import TensorReader
    from tangquant.quant import layer_by_layer as lbl
    from tangquant.quant.inc import inc_workspace
    from tangquant.quant.recipe import QuantRecipe

    skeleton, rotary = lbl._skeleton(Path(tiny_model_dir))
    torch.manual_seed(0)
    hidden = [torch.randn(1, 24, skeleton.config.hidden_size) for _ in range(3)]
    out = {}
    for seq in (True, False):
        block = lbl._one_layer_model(lbl._load_layer(lbl._skeleton(Path(tiny_model_dir))[0],
                                                     TensorReader(Path(tiny_model_dir)), 0))
        recipe = QuantRecipe(group_size=32, act_order=True, use_sym=False, true_sequential=seq)
        with inc_workspace():
            out[seq], _ = lbl.quantize_block(block, recipe, hidden, lbl._Context(rotary), Path(tiny_model_dir))
    for name in ("q_proj", "k_proj", "v_proj"):
        a, b = (out[s].model.layers[0].self_attn.get_submodule(name) for s in (True, False))
        assert a.g_idx is not None and torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("sym,act_order", [(True, False), (False, False), (False, True)])
def test_the_integers_at_hand_are_what_incs_unpack_and_recover_give(tiny_model_dir, sym, act_order):
    """The writer takes the integers, zero points and scales the driver already has, and the
    later groups' forwards the weight it sets: INC's pack() then unpack() and recover() of them
    give the same (plain groups skip INC's pack: the driver never reads its qweight, and they have
    none left to read unset; act-order's keeps INC's own)."""
    import torch

    from tangquant.checkpoint import TensorReader
    from tangquant.quant import layer_by_layer as lbl
    from tangquant.quant.inc import inc_workspace
    from tangquant.quant.recipe import QuantRecipe
    from tangquant.quant.writer import extract_layer

    skeleton, rotary = lbl._skeleton(Path(tiny_model_dir))
    block = lbl._one_layer_model(lbl._load_layer(skeleton, TensorReader(Path(tiny_model_dir)), 0))
    torch.manual_seed(0)
    hidden = [torch.randn(1, 24, skeleton.config.hidden_size) for _ in range(2)]
    recipe = QuantRecipe(group_size=32, use_sym=sym, act_order=act_order)
    with inc_workspace():
        out, unpacked = lbl.quantize_block(block, recipe, hidden, lbl._Context(rotary), Path(tiny_model_dir))
    assert len(unpacked) == 7
    for name, parts in unpacked.items():
        module = out.get_submodule(name)
        assert hasattr(module, "qweight") == act_order, name
        inc = module if act_order else _inc_packed(module, parts, sym)
        incs = extract_layer(name, inc, 4, 32, True)
        ours = extract_layer(name, module, 4, 32, True, parts)
        for key in ("q", "zeros", "scales", "g_idx"):
            assert ours[key].dtype == incs[key].dtype and torch.equal(ours[key], incs[key]), (name, key)
        assert (ours["bias"] is None) == (incs["bias"] is None), name
        if ours["bias"] is not None:
            assert torch.equal(ours["bias"].half(), incs["bias"].half()), name
        if not name.endswith("down_proj"):  # the last group: never run again, never recovered
            assert torch.equal(module.weight, inc.recover().float()), name


def _inc_packed(module, parts: dict, sym: bool):
    """INC's own module packed, by INC's pack(), with the integers, zero points and scales of
    ``parts`` (signed integers for a symmetric layer, as INC's GPTQ gives them)."""
    import torch
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear

    inc = INCWeightOnlyLinear(module.in_features, module.out_features, dtype="int", bits=4, group_size=32,
                              zp=not sym, bias=module.bias is not None, g_idx=False, device="cpu")
    ints = parts["q"].to(torch.int32) - (8 if sym else 0)
    zero = None if sym else parts["zeros"].t().float()
    inc.pack(ints, parts["scales"].t().float(), zero, module.bias, scale_bf16_to_fp8=None, g_idx=None)
    return inc
