"""INC's GPTQ ``fasterquant``: the same operations, laid out for a CPU.

INC 3.10's ``GPTQ.fasterquant`` walks a block of columns one column at a time and updates the
block's remaining columns after each: with the weight row-major every step reads and writes
strided columns and allocates a fresh product (``matmul`` of a column by a row), so at the 7B
shape the loop, not the arithmetic, is most of its time. Here the block is held transposed (a
column is a contiguous row), the update is written into one preallocated buffer, and several
linears that share one Hessian (true-sequential q/k/v, gate/up) are quantized in one call with
their rows stacked: GPTQ treats every output row on its own given the Hessian, so the stack
inverts the Hessian once and walks its columns once.

Every value is computed by the same operation on the same operands as in INC (a product of one
element by one element, a difference, INC's own quantizer), so the integers and scales are INC's
bit for bit (``tests/test_fasterquant.py`` compares them with INC's ``fasterquant``). The
variants this does not cover (act-order, hybrid order, static groups, fp8-aware, non-integer
types) run INC's own. The Hessians it takes are built in ``quant/calibration``.
"""

from __future__ import annotations

import torch


def supported(cfg: dict) -> bool:
    """Whether ``cfg`` (``gptq_block.layer_config``) is the plain GPTQ this function reproduces."""
    return (cfg["dtype"] == "int" and not cfg["act_order"] and not cfg["hybrid_order"]
            and not cfg["static_groups"] and not cfg["fp8_aware"])


def _inverse_factor(H: torch.Tensor, W: torch.Tensor, percdamp: float) -> torch.Tensor:
    """INC's dead-column fix, dampening and upper Cholesky factor of H⁻¹ (H is consumed)."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0])
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    return torch.linalg.cholesky(H, upper=True)


def fasterquant(gptq, W: torch.Tensor, blocksize: int, percdamp: float, groupsize: int):
    """(scale [rows, groups], zero [rows, groups], Q [rows, columns] dequantized) of ``W`` with
    the Hessian ``gptq.H`` (released) and ``gptq.quantizer``, as INC's ``fasterquant`` returns them."""
    quantizer = gptq.quantizer
    W = W.float()
    if not quantizer.ready():
        quantizer.find_params(W, weight=True)
    H = gptq.H
    gptq.H = None
    Hinv = _inverse_factor(H, W, percdamp)
    rows, columns = W.shape
    Q = torch.zeros_like(W)
    buf = torch.empty(min(blocksize, columns) * rows)
    scale, zero = [], []
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        n = i2 - i1
        W1 = W[:, i1:i2].t().contiguous()  # row i: column i1 + i
        Q1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(n):
            if groupsize != -1 and (i1 + i) % groupsize == 0:
                quantizer.find_params(W[:, i1 + i:i1 + i + groupsize], weight=True)
                scale.append(quantizer.scale)
                zero.append(quantizer.zero)
            w, d = W1[i], Hinv1[i, i]
            q = quantizer.quantize(w.unsqueeze(1), quantizer.scale, quantizer.zero, quantizer.maxq).flatten()
            Q1[i] = q
            err = (w - q) / d
            update = buf[:(n - i) * rows].view(n - i, rows)
            torch.mul(Hinv1[i, i:].unsqueeze(1), err.unsqueeze(0), out=update)
            W1[i:] -= update
            Err1[i] = err
        Q[:, i1:i2] = Q1.t()
        W[:, i2:] -= Err1.t().contiguous().matmul(Hinv[i1:i2, i2:])  # INC's operands, INC's layout
    if not scale:
        scale.append(quantizer.scale)
        zero.append(quantizer.zero)
    return torch.cat(scale, dim=1), torch.cat(zero, dim=1), Q
