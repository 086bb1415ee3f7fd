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
    assert replayed.keys() == again.keys() and any(k.endswith("qweight") for k in replayed)
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


def test_a_bf16_calibration_forward_leaves_the_hessian_in_fp32(tiny_model_dir):
    """compute_dtype bf16 runs the block's matmuls under a bf16 autocast; INC's Hessian update must
    stay outside it: the o group's Hessian is exactly the fp32 2/n·ΣXᵀX of the inputs it captured
    (a bf16 product would miss it by ~1e-3 relative), and those inputs did come from bf16 matmuls;
    the buffered update gives what INC's add_batch gives."""
    import torch

    from tangquant.checkpoint import TensorReader
    from tangquant.quant import gptq_block
    from tangquant.quant import layer_by_layer as lbl
    from tangquant.quant.inc import inc_config, inc_workspace
    from tangquant.quant.recipe import QuantRecipe

    recipe = QuantRecipe(group_size=32, layer_wise=True, compute_dtype="bf16")
    skeleton, rotary = lbl._skeleton(Path(tiny_model_dir))
    ctx = lbl._Context(rotary)
    block = lbl._one_layer_model(lbl._load_layer(skeleton, TensorReader(Path(tiny_model_dir)), 0))
    torch.manual_seed(0)
    hidden = [torch.randn(1, 24, skeleton.config.hidden_size) for _ in range(3)]
    name = "model.layers.0.self_attn.o_proj"
    with inc_workspace():
        cfg = gptq_block.layer_config(inc_config(recipe, Path(tiny_model_dir), true_sequential=False))
        kept = []
        gptqs = gptq_block._hessians(block, [name], hidden, ctx.kwargs, cfg, True, [], kept,
                                     lambda: lbl._calibration_dtype(recipe))
    assert kept[0].dtype == torch.bfloat16  # the attention's output came from a bf16 matmul
    x = torch.cat([k.reshape(-1, k.shape[-1]).double() for k in kept])
    expected = 2 / len(kept) * x.T @ x
    assert gptqs[name].H.dtype == torch.float32
    torch.testing.assert_close(gptqs[name].H.double(), expected, rtol=1e-5, atol=1e-5)
    incs = gptq_block._gptq(block.get_submodule(name), cfg)  # and INC's own add_batch, bit for bit
    for k in kept:
        incs.add_batch(k, None)
    assert torch.equal(incs.H, gptqs[name].H)


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
    later groups' forwards the weight it sets: INC's unpack() and recover() give the same."""
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
        incs = extract_layer(name, module, 4, 32, True)
        ours = extract_layer(name, module, 4, 32, True, parts)
        for key in ("q", "zeros", "scales", "g_idx", "bias"):
            assert ours[key].dtype == incs[key].dtype and torch.equal(ours[key], incs[key]), (name, key)
        if not name.endswith("down_proj"):  # the last group: never run again, never recovered
            assert torch.equal(module.weight, module.recover().float()), name
