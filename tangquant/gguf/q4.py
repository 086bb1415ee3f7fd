"""GPTQ integers as GGUF Q4_0 blocks, unchanged.

A Q4_0 block (``block_q4_0`` in llama.cpp's ``ggml-common.h``) is an fp16 scale
``d`` and 32 4-bit values, ``w = d·(q − 8)``; byte ``j`` of the 16 holds element
``j`` in its low nibble and element ``j + 16`` in its high one. A symmetric GPTQ
group of ``g`` consecutive inputs (a multiple of 32) with scale ``s`` and zero
point 8 is ``g / 32`` such blocks sharing ``d = s``: the checkpoint's integers
and fp16 scales are copied, never re-quantized.
"""

from __future__ import annotations

import numpy as np
import torch

from tangquant.errors import InputError
from tangquant.gptq import QuantizedLinear

BLOCK = 32
BLOCK_BYTES = 2 + BLOCK // 2


class NotQ4_0Error(InputError):
    """A GPTQ checkpoint whose integers Q4_0 cannot hold exactly (asymmetric, act-order, odd groups)."""


def group_size(module: str, layer: QuantizedLinear) -> int:
    """The layer's consecutive group size, or one line naming the fix when Q4_0 cannot hold it."""
    n_in, n_groups = layer.q.shape[1], layer.scales.shape[0]
    if layer.bits != 4:
        raise NotQ4_0Error(f"{module}: Q4_0 holds 4-bit integers, not {layer.bits}-bit; quantize with "
                           "--bits 4")
    if n_in % n_groups or not torch.equal(layer.g_idx.long(), torch.arange(n_in) // (n_in // n_groups)):
        raise NotQ4_0Error(f"{module}: act-order (desc_act) groups are not consecutive inputs, which Q4_0 "
                           "blocks cannot hold; quantize again without --act-order")
    size = n_in // n_groups
    if size % BLOCK:
        raise NotQ4_0Error(f"{module}: group size {size} is not a multiple of Q4_0's {BLOCK}; quantize "
                           "with --group-size 32, 64, 128 or -1")
    if not bool((layer.zeros == 8).all()):
        raise NotQ4_0Error(f"{module}: asymmetric zero points (not all 8) have no Q4_0 form; quantize "
                           "again with --sym")
    return size


def pack(module: str, layer: QuantizedLinear) -> np.ndarray:
    """The layer as Q4_0 bytes, uint8 [out, in / 32 * 18] (row-major, as GGUF stores it)."""
    size = group_size(module, layer)
    out_f, in_f = layer.q.shape
    nb = in_f // BLOCK
    q = layer.q.numpy().astype(np.uint8).reshape(out_f, nb, BLOCK)
    qs = q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)
    # Each block takes its group's scale; scales are [groups, out].
    d = layer.scales.to(torch.float16).t().numpy()                    # [out, groups]
    d = np.repeat(d, size // BLOCK, axis=1).astype("<f2")             # [out, nb]
    blocks = np.concatenate([d.view(np.uint8).reshape(out_f, nb, 2), qs], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out_f, nb * BLOCK_BYTES))
