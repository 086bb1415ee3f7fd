"""True-sequential GPTQ on one layer runs the block once per group, only up to that group's input."""

from __future__ import annotations

from pathlib import Path


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
        out = lbl.quantize_block(block, QuantRecipe(group_size=32), hidden, ctx, Path(tiny_model_dir))
    # sequential_groups' probe forward, then (q,k,v | o | gate,up | down): one pass per group
    assert calls["layer"] == 1 + 4 * len(hidden)
    assert calls["down_proj"] == 1 + len(hidden)  # the probe, then the down group's own pass only
    assert calls["down_proj done"] == 1  # the probe's: the down group stopped at its input
    assert not lbl._linears(out)
