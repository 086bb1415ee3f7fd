"""``--lm-head int4``: the output head as group-wise INT4, round-to-nearest.

The head is the largest single matrix a decoded token reads (vocab × hidden; at
INT8 about 28% of a 1.8B token's bytes). GPTQ through INC skips the lm_head,
so the head is quantized here by RTN — asymmetric, per group of
``group_size`` inputs, fp16 scales, from the checkpoint's own fp16 head (the
input embedding table where the model ties them) — and built in NNCF's
INT4_ASYM decompression layout, which OpenVINO's CPU plugin fuses into an
INT4 FullyConnected::

    Constant u4 [out, groups, g] -> Convert f16 -> Subtract (u4 zero point -> Convert)
        -> Multiply f16 scale [out, groups, 1] -> Reshape [out, in] -> Convert f32 -> MatMul

With tied embeddings the INT8 table stays for the embedding Gather (one row per
token), and the head gets its own INT4 copy.
"""

from __future__ import annotations

import logging

import numpy as np
from openvino import Type
from openvino import opset13 as ops

from tangquant.errors import ExportError
from tangquant.ov.int4 import constant

logger = logging.getLogger(__name__)

HEAD_NAMES = ("lm_head.weight", "model.embed_tokens.weight")  # own head first, then the tied table


def rtn_int4(weight: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q u8 [out, groups, g], zero points u8 [out, groups, 1], scales f16 [out, groups, 1])."""
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ExportError(f"--lm-head-group-size {group_size} does not divide the head's "
                          f"{in_f} inputs")
    w = weight.astype(np.float32).reshape(out_f, in_f // group_size, group_size)
    lo, hi = np.minimum(w.min(-1, keepdims=True), 0), np.maximum(w.max(-1, keepdims=True), 0)
    scales = np.maximum((hi - lo) / 15, 1e-8).astype(np.float16)  # rounded before use, as stored
    s32 = scales.astype(np.float32)
    zeros = np.clip(np.round(-lo / s32), 0, 15)
    q = np.clip(np.round(w / s32) + zeros, 0, 15)
    return q.astype(np.uint8), zeros.astype(np.uint8), scales


def head_matmul(ov_model):
    for op in ov_model.get_ops():
        if op.get_type_name() == "MatMul" and op.get_friendly_name().startswith("__module.lm_head/"):
            return op
    raise ExportError("the IR has no lm_head MatMul to quantize")


def head_weight(ckpt) -> np.ndarray:
    tensors = {name: t for name, t in ckpt.tensors() if name in HEAD_NAMES}
    for name in HEAD_NAMES:
        if name in tensors:
            return tensors[name].float().numpy()
    raise ExportError(f"{ckpt.path} holds neither {' nor '.join(HEAD_NAMES)}")


def replace_head(ov_model, ckpt, group_size: int) -> dict:
    """Feed the lm_head MatMul an INT4 RTN copy of the checkpoint's head; returns its metrics."""
    matmul = head_matmul(ov_model)
    if not matmul.get_attributes().get("transpose_b"):
        raise ExportError("the lm_head MatMul does not take its weight as [out, in]")
    weight = head_weight(ckpt)
    target = matmul.input(1)
    if list(target.get_partial_shape().to_shape()) != list(weight.shape):
        raise ExportError(f"the IR's lm_head is {target.get_partial_shape()}, the checkpoint's "
                          f"{list(weight.shape)}")
    q, zeros, scales = rtn_int4(weight, group_size)
    name = "lm_head.weight_int4"
    w = ops.convert(constant(q, Type.u4, name), Type.f16)
    zp = ops.convert(constant(zeros, Type.u4, f"{name}/zero_point"), Type.f16)
    dq = ops.multiply(ops.subtract(w, zp), constant(scales, Type.f16, f"{name}/scale"))
    dq = ops.reshape(dq, ops.constant(np.array(weight.shape, dtype=np.int64)), special_zero=False)
    if target.get_element_type() != Type.f16:
        dq = ops.convert(dq, target.get_element_type())
    target.replace_source_output(dq.output(0))
    err = _rtn_error(weight, q, zeros, scales)
    logger.debug("lm_head INT4 g%d: relative RMS error %.4f", group_size, err)
    return {"lm_head": "int4", "lm_head_group_size": group_size, "lm_head_method": "RTN asymmetric",
            "lm_head_rel_rms_error": round(err, 5)}


def _rtn_error(weight, q, zeros, scales) -> float:
    deq = ((q.astype(np.float32) - zeros) * scales.astype(np.float32)).reshape(weight.shape)
    return float(np.sqrt(((deq - weight) ** 2).mean() / max((weight ** 2).mean(), 1e-30)))
