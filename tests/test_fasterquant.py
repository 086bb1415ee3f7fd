"""tangquant's fasterquant gives INC's GPTQ integers and scales bit for bit, stacked or not."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.fast


def _case(rows: int, columns: int, sym: bool, group_size: int, seed: int = 0):
    import torch
    from neural_compressor.torch.algorithms.weight_only.gptq import GPTQ
    from neural_compressor.torch.quantization import GPTQConfig

    from tangquant.quant.gptq_block import layer_config

    torch.manual_seed(seed)
    cfg = layer_config(GPTQConfig(bits=4, group_size=group_size, use_sym=sym, block_size=32))
    linear = torch.nn.Linear(columns, rows, bias=False)
    x = torch.randn(3, 40, columns) * torch.rand(columns) * 3
    x[..., 5] = 0  # a dead input channel: INC zeroes its column
    hessian = GPTQ(linear, linear.weight.data, "cpu")
    hessian.add_batch(x, None)

    def gptq():
        g = GPTQ(linear, linear.weight.data, "cpu")
        g.quantizer.configure(cfg)
        g.H, g.nsamples = hessian.H.clone(), hessian.nsamples
        return g
    return linear, cfg, gptq


@pytest.mark.parametrize("sym,group_size", [(True, 32), (False, 32), (True, -1), (False, 48)])
def test_the_integers_and_scales_are_incs(sym, group_size):
    import torch

    from tangquant.quant.fasterquant import fasterquant, supported

    linear, cfg, gptq = _case(96, 160, sym, group_size)
    assert supported(cfg)
    kw = {"blocksize": cfg["block_size"], "percdamp": cfg["percdamp"], "groupsize": group_size}
    scale, _, zero, q = gptq().fasterquant(linear.weight.data.clone(), **kw)
    ours = fasterquant(gptq(), linear.weight.data.clone(), **kw)
    assert torch.equal(ours[0], scale) and torch.equal(ours[1], zero) and torch.equal(ours[2], q)


def test_linears_sharing_a_hessian_stacked_give_each_ones_own_result():
    """q/k/v (or gate/up) in one call, rows stacked: the same values as one call per linear."""
    import torch

    from tangquant.quant.fasterquant import fasterquant

    linear, cfg, gptq = _case(64, 128, True, 32)
    others = [torch.randn(48, 128) * 0.05, torch.randn(80, 128) * 0.05]
    kw = {"blocksize": cfg["block_size"], "percdamp": cfg["percdamp"], "groupsize": 32}
    weights = [linear.weight.data] + others
    alone = [fasterquant(gptq(), w.clone(), **kw) for w in weights]
    stacked = fasterquant(gptq(), torch.cat(weights), **kw)
    sizes = [w.shape[0] for w in weights]
    for part, one in zip(zip(*(t.split(sizes) for t in stacked)), alone):
        assert all(torch.equal(a, b) for a, b in zip(part, one))


def test_act_order_is_left_to_inc():
    from neural_compressor.torch.quantization import GPTQConfig

    from tangquant.quant.fasterquant import supported
    from tangquant.quant.gptq_block import layer_config

    assert not supported(layer_config(GPTQConfig(bits=4, group_size=32, act_order=True)))


def test_a_phase_inside_another_takes_its_time_out_of_it():
    """The Hessian updates run inside the calibration forwards' hooks: clocked as their own phase,
    their seconds leave "calibration", and the layer's phases still add up to its wall time."""
    import time

    from tangquant.quant.clock import PhaseClock

    clock = PhaseClock()
    t0 = time.perf_counter()
    with clock("calibration"):
        time.sleep(0.05)
        with clock("hessians"):
            time.sleep(0.1)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    clock.next_layer()
    seconds = clock.report()["phase_seconds"]
    assert 0.09 <= seconds["hessians"] < 0.15 and 0.09 <= seconds["calibration"] < 0.15
    assert abs(sum(clock.total.values()) - wall) < 0.01
