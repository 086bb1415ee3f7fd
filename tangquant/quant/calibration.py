"""The calibration's arithmetic: the forwards' bf16 autocast and the Hessians they feed.

The default (fp32) feeds each sample's input to INC's ``GPTQ.add_batch`` arithmetic, bit for bit,
with XᵀX written into a buffer reused from sample to sample. ``--compute-dtype bf16`` runs the
forwards' matmuls in bf16 and builds the Hessians ``BATCH_TOKENS`` tokens at a time from bf16
products with fp32 sums (oneDNN's bf16 fpmath mode, AMX's tiles where the CPU has them).
"""

from __future__ import annotations

import contextlib
import math

import torch


# --compute-dtype bf16's Hessian updates take this many tokens at a time (8 samples of 512): enough
# for a full-speed matmul and few passes over a Hessian; at 7B's down_proj the batch is 180 MB.
BATCH_TOKENS = 4096


def calibration_autocast(bf16: bool):
    """The calibration forwards' matmuls in bf16 when asked (autocast keeps norms, softmax and the
    residual stream in fp32)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def _fp32():
    """Autocast off: a bf16 calibration forward must not reach the Hessian update (autocast would
    round its sums, not only its operands, to bf16)."""
    return torch.autocast("cpu", enabled=False)


class Feed:
    """A group's inputs into its GPTQ objects' Hessians: sample by sample with INC's fp32 update
    (``add_batch``, INC's Hessian bit for bit), or, with ``bf16``, about ``BATCH_TOKENS`` tokens at
    a time with bf16 products and fp32 sums (``add_samples``)."""

    def __init__(self, bf16: bool, timed):
        self.bf16, self.timed = bf16, timed
        self.products: dict[int, torch.Tensor] = {}
        self.pending: dict[int, tuple] = {}

    def __call__(self, gptq, x) -> None:
        if not self.bf16:
            with self.timed("hessians"), _fp32():
                add_batch(gptq, x, self.products)
            return
        queue = self.pending.setdefault(id(gptq), (gptq, []))[1]
        queue.append(x)
        if sum(t.numel() // t.shape[-1] for t in queue) >= BATCH_TOKENS:
            self._add(gptq, queue)

    def flush(self) -> None:
        for gptq, queue in self.pending.values():
            if queue:
                self._add(gptq, queue)

    def _add(self, gptq, queue: list) -> None:
        with self.timed("hessians"), _fp32():
            add_samples(gptq, queue, self.products)
        queue.clear()


def add_batch(gptq, inp, products: dict) -> None:
    """INC's ``GPTQ.add_batch`` for a linear's input, the same operations in the same order, with
    XᵀX written into a buffer reused from sample to sample (``products``, by width): a fresh
    Hessian-sized product per sample is a fresh mapping to fault in (485 MB at 7B's down_proj)."""
    if inp.dim() == 2:
        inp = inp.unsqueeze(0)
    n = inp.shape[0]
    inp = inp.reshape(-1, inp.shape[-1]).t()
    gptq.H *= gptq.nsamples / (gptq.nsamples + n)
    gptq.nsamples += n
    inp = math.sqrt(2 / gptq.nsamples) * inp.float()
    product = _buffer(products, inp.shape[0])
    torch.matmul(inp, inp.t(), out=product)
    gptq.H += product


def _buffer(products: dict, width: int) -> torch.Tensor:
    """The XᵀX buffer of this width, made once (``products``: by width, for one group's pass)."""
    if width not in products:
        products[width] = torch.empty(width, width)
    return products[width]


@contextlib.contextmanager
def bf16_products():
    """fp32 matmuls computed from bf16-rounded operands with fp32 sums and an fp32 result: oneDNN's
    bf16 "fpmath" mode (``torch.backends.mkldnn.matmul.fp32_precision``), which runs them on AMX's
    bf16 tiles. oneDNN keeps its fp32 kernels where the CPU has no AMX, so there nothing changes."""
    settings = torch.backends.mkldnn.matmul
    before = settings.fp32_precision
    settings.fp32_precision = "bf16"
    try:
        yield
    finally:
        settings.fp32_precision = before


def add_samples(gptq, inputs: list, products: dict) -> None:
    """INC's Hessian update for ``inputs`` (one tensor per sample) taken together, as INC's
    ``add_batch`` takes a batch: H ← H·n/(n+k) + 2/(n+k)·XᵀX over the k samples' tokens, XᵀX a
    plain matmul with bf16 products (``bf16_products``) into a buffer reused by width (a plain
    product is what oneDNN runs on AMX; the scaled, accumulating form is left to torch)."""
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs]).float()
    product = _buffer(products, x.shape[1])
    with bf16_products():
        torch.matmul(x.t(), x, out=product)
    total = gptq.nsamples + len(inputs)
    gptq.H.mul_(gptq.nsamples / total).add_(product, alpha=2 / total)
    gptq.nsamples = total
