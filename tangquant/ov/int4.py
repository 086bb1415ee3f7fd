"""The exact INT4 hand-off: a GPTQ checkpoint's integers, scales and zero points in an OpenVINO IR.

NNCF's data-free INT4 compression gives every linear layer the decompression
subgraph that OpenVINO's CPU plugin and openvino-genai fuse into INT4 matmuls::

    Constant u4|i4 [out, groups, g] -> Convert -> (Subtract zero point u4 [out, groups, 1])
        -> Multiply scale f16 [out, groups, 1] -> Reshape [out, in] -> MatMul

NNCF's own integers and scales are then replaced by the checkpoint's, so the
IR computes ``scale * (q - zero)`` with GPTQ's numbers. A symmetric checkpoint
(every zero point 2^(bits-1), as AutoGPTQ and INC write it) maps to NNCF's
INT4_SYM layout as ``i4 = q - 8`` with no zero-point constant; any other
zero points keep NNCF's INT4_ASYM layout with a u4 zero-point constant.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
from openvino import Shape, Tensor, Type
from openvino.op import Constant
from openvino import opset13 as ops

from tangquant.errors import ExportError
from tangquant.gptq import GPTQCheckpoint

logger = logging.getLogger(__name__)

INT4_BITS = 4
SYM_ZERO = 2 ** (INT4_BITS - 1)
# Names the OpenVINO PyTorch frontend gives a module's matmul, and its weight constant
# (which depends on whether optimum-intel patched a 16-bit model for tracing).
_MATMUL_NAME = re.compile(r"^__module\.(?P<module>[^/]+)/")
_WEIGHT_NAME = re.compile(
    r"^(?:self\.)?(?P<module>.+?)\.(?:_openvino_orig_weight|weight)(?:_compressed)?$")


@dataclass
class IRWeight:
    """The constants of one compressed weight in an OpenVINO model."""
    weight: object
    scale: object
    zero_point: object | None


def _single_consumer(node):
    targets = [t.get_node() for t in node.output(0).get_target_inputs()]
    return targets[0] if len(targets) == 1 else None


def _source_constant(node, skip: object):
    """The Constant feeding ``node`` on the input that does not come from ``skip``."""
    for value in node.input_values():
        src = value.get_node()
        if src is skip:
            continue
        while src.get_type_name() == "Convert":
            src = src.input_value(0).get_node()
        if src.get_type_name() == "Constant":
            return src
    return None


def find_int4_weights(ov_model) -> dict[str, IRWeight]:
    """Map module name -> its u4/i4 weight, scale and zero-point constants."""
    return find_compressed_weights(ov_model, ("u4", "i4"))


def find_compressed_weights(ov_model, types: tuple[str, ...]) -> dict[str, IRWeight]:
    """Map module name -> the constants of its weight compressed to one of ``types``."""
    found: dict[str, IRWeight] = {}
    for op in ov_model.get_ops():
        if op.get_type_name() != "Constant" or op.get_element_type().get_type_name() not in types:
            continue
        convert = _single_consumer(op)
        if convert is None or convert.get_type_name() != "Convert":
            continue
        step, zero_point = _single_consumer(convert), None
        if step is not None and step.get_type_name() == "Subtract":
            zero_point = _source_constant(step, convert)
            step, convert = _single_consumer(step), step
        if step is None or step.get_type_name() != "Multiply":
            continue
        scale = _source_constant(step, convert)
        module = _module_name(step, op)
        if scale is not None and module is not None:
            found[module] = IRWeight(op, scale, zero_point)
    return found


def _module_name(multiply, weight) -> str | None:
    """The PyTorch module a decompressed weight feeds: from its MatMul/Gather, else the constant's name."""
    node = _single_consumer(multiply)
    while node is not None and node.get_type_name() in ("Reshape", "Convert"):
        node = _single_consumer(node)
    match = None
    if node is not None and node.get_type_name() in ("MatMul", "Gather"):
        match = _MATMUL_NAME.match(node.get_friendly_name())
    match = match or _WEIGHT_NAME.match(weight.get_friendly_name())
    return match.group("module") if match else None


def unpack_nibbles(const) -> "object":
    """A u4/i4 Constant's values as an int16 numpy array of its shape (low nibble first)."""
    packed = np.asarray(const.data).view(np.uint8).reshape(-1)
    values = np.stack([packed & 15, packed >> 4], axis=-1).reshape(-1).astype(np.int16)
    shape = tuple(const.shape)
    values = values[: int(np.prod(shape))].reshape(shape)
    if const.get_element_type().get_type_name() == "i4":
        values = np.where(values >= 8, values - 16, values)
    return values


def constant(values, dtype, name: str):
    """A Constant of ``values`` (integers in range for u4/i4) of ``dtype``, named ``name``.

    u4/i4 are packed here, low nibble first: ``opset13.constant`` builds a packed type from
    ``values.tolist()``, a Python int per weight, minutes and gigabytes for a 7B model."""
    if dtype not in (Type.u4, Type.i4):
        return ops.constant(values, dtype=dtype, name=name)
    flat = values.reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, flat.dtype)])
    tensor = Tensor(dtype, Shape(list(values.shape)))
    packed = np.asarray(tensor.data).view(np.uint8).reshape(-1)
    packed[:] = ((flat[0::2] & 15) | ((flat[1::2] & 15) << 4)).astype(np.uint8)
    node = Constant(tensor, shared_memory=False)
    node.set_friendly_name(name)
    return node


def expected_arrays(layer, ir: IRWeight) -> dict[str, "object"]:
    """The checkpoint's numbers in the IR's layout: {"weight", "scale", "zero_point"?}."""
    q = layer.q.numpy().astype(np.int16)                      # [out, in]
    zeros = layer.zeros.t().numpy().astype(np.int16)          # [out, groups]
    scales = layer.scales.t().contiguous().numpy()            # [out, groups] fp16
    out = {}
    if ir.zero_point is None:
        if not (zeros == SYM_ZERO).all():
            raise ExportError("the IR is symmetric INT4 but the checkpoint's zero points are not all "
                              f"{SYM_ZERO}; export it with asymmetric INT4")
        out["weight"] = (q - SYM_ZERO).reshape(tuple(ir.weight.shape))
    else:
        out["weight"] = q.reshape(tuple(ir.weight.shape))
        out["zero_point"] = zeros.reshape(tuple(ir.zero_point.shape))
    out["scale"] = scales.reshape(tuple(ir.scale.shape))
    return out


def _check_layer(layer, ir: IRWeight, module: str, bits: int) -> None:
    if bits != INT4_BITS:
        raise ExportError(f"{module}: only 4-bit GPTQ can be exported to OpenVINO INT4 (got {bits} bits)")
    if layer.q.numel() != _numel(ir.weight.shape):
        raise ExportError(f"{module}: the IR weight {list(ir.weight.shape)} does not match the "
                          f"checkpoint's {list(layer.q.shape)}")
    if layer.scales.numel() != _numel(ir.scale.shape):
        raise ExportError(f"{module}: the IR has {_numel(ir.scale.shape)} scales, the checkpoint "
                          f"{layer.scales.numel()}; the group sizes differ")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _missing(layers: set[str], done: set[str]) -> None:
    missing = sorted(layers - done)
    if missing:
        raise ExportError(f"{len(missing)} GPTQ layer(s) have no INT4 weight in the IR "
                          f"(first: {missing[0]}); the export cannot keep them exact")


def _open(ckpt) -> GPTQCheckpoint:
    return ckpt if isinstance(ckpt, GPTQCheckpoint) else GPTQCheckpoint.open(ckpt)


def replace_constants(ov_model, ckpt) -> int:
    """Put the checkpoint's integers, scales and zero points into ``ov_model``; return layers done."""
    ckpt = _open(ckpt)
    found = find_int4_weights(ov_model)
    done = set()
    for module, layer, _bias in ckpt.layers():
        ir = found.get(module)
        if ir is None:
            continue
        _check_layer(layer, ir, module, layer.bits)
        arrays = expected_arrays(layer, ir)
        for key, values in arrays.items():
            old = getattr(ir, key)
            dtype = old.get_element_type()
            if key == "zero_point" and values.max() > 15:
                # AutoGPTQ v1 reads a stored zero of -1 as 16, which u4 cannot hold.
                dtype = Type.u8
            new = constant(values, dtype, old.get_friendly_name())
            old.output(0).replace(new.output(0))
        done.add(module)
    _missing(ckpt.layer_names, done)
    return len(done)


def verify_constants(ov_model, ckpt) -> int:
    """Assert every INT4 constant of ``ov_model`` equals the checkpoint's; return constants checked.

    The IR is compared with the checkpoint itself, not with what :func:`replace_constants`
    computed, so a fault anywhere in the hand-off or in saving shows here.
    """
    ckpt = _open(ckpt)
    found = find_int4_weights(ov_model)
    checked, seen = 0, set()
    for module, layer, _bias in ckpt.layers():
        ir = found.get(module)
        if ir is None:
            continue
        _check_layer(layer, ir, module, layer.bits)
        for key, values in expected_arrays(layer, ir).items():
            const = getattr(ir, key)
            if const.get_element_type().get_type_name() in ("u4", "i4"):
                actual = unpack_nibbles(const)
            else:
                actual = np.asarray(const.data).reshape(values.shape)
            if key == "scale":
                same = actual.dtype == values.dtype and np.array_equal(actual.view(np.uint16),
                                                                        values.view(np.uint16))
            else:
                same = np.array_equal(actual.astype(np.int16), values)
            if not same:
                raise ExportError(f"the IR's {key} of {module} differs from the GPTQ checkpoint's")
            checked += 1
        seen.add(module)
    _missing(ckpt.layer_names, seen)
    return checked
