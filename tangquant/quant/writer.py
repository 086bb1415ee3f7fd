"""Writing INC's quantized layers as a GPTQ checkpoint (Qwen's ``*-GPTQ-Int4`` layout).

INC's ``INCWeightOnlyLinear`` (``use_optimum_format=True``) already keeps
AutoGPTQ-like buffers, but it adds a zero ``bias`` to layers that have none
and a ``scale_bf16_to_fp8`` tensor, and has no ``g_idx`` unless act-order was
used. So the integers are taken out through INC's own ``unpack()`` and packed
again with :func:`tangquant.gptq.pack_layer`; the tests prove that the
result dequantises to exactly INC's in-memory weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear
from safetensors import safe_open

from tangquant.checkpoint import ShardWriter, tensor_names, weight_files
from tangquant.errors import QuantizationError
from tangquant.gptq import pack_layer

logger = logging.getLogger(__name__)


def extract_layer(name: str, module, bits: int, group_size: int, has_bias: bool,
                  unpacked: dict | None = None) -> dict:
    """(q [out, in], zeros [groups, out], scales [groups, out], g_idx [in], bias) of one INC layer;
    ``unpacked``: those (bias aside) as the GPTQ layer driver already has them, instead of INC's
    ``unpack()`` (``gptq_block._unpacked``, tested equal)."""
    if not isinstance(module, INCWeightOnlyLinear):
        raise QuantizationError(f"INC left {name} unquantized ({type(module).__name__})")
    if not module.use_optimum_format or module.bits != bits or "int" not in module.dtype:
        raise QuantizationError(f"{name}: INC produced {module.dtype}{module.bits} "
                                f"(optimum format {module.use_optimum_format}), expected int{bits}")
    if unpacked is not None:
        return {**unpacked, "q": unpacked["q"].to(torch.int64), "bias": module.bias if has_bias else None}
    p = module.unpack()
    q = p["int_weight"].to(torch.int64)
    # INC's unpack maps a stored zero point of 2^bits (zp 0 after its -1/+1) back to 0.
    zeros = p["zp"].to(torch.int64).t().contiguous()
    scales = p["scales"].t().contiguous()
    in_features = module.in_features
    gs = group_size if group_size > 0 else in_features
    if module.g_idx is not None:
        g_idx = module.g_idx.to(torch.int64)
    else:
        g_idx = torch.arange(in_features, dtype=torch.int64) // gs
    bias = module.bias if has_bias else None
    return {"q": q, "zeros": zeros, "scales": scales, "g_idx": g_idx, "bias": bias}


def pack_module(name: str, module, bits: int, group_size: int, has_bias: bool,
                format_version: int, unpacked: dict | None = None) -> tuple[dict, int]:
    """(GPTQ tensors {qweight, qzeros, scales, g_idx[, bias]}, weight count) of one INC layer."""
    parts = extract_layer(name, module, bits, group_size, has_bias, unpacked)
    packed = pack_layer(parts["q"], parts["zeros"], parts["scales"], parts["g_idx"], bits,
                        bias=parts["bias"], format_version=format_version)
    return packed, parts["q"].numel()


def packed_bytes(packed: dict) -> int:
    return sum(packed[k].numel() * packed[k].element_size() for k in ("qweight", "qzeros", "scales"))


def _source_tensor_names(model_dir: Path) -> list[tuple[Path, str]]:
    return [(path, name) for path in weight_files(model_dir) for name in tensor_names(path)]


def _in_memory(model, name: str):
    """The model's current value of a parameter/buffer (AWQ rescales norms), or None if on meta."""
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    value = getattr(module, leaf, None)
    if value is None or not hasattr(value, "device") or value.device.type == "meta":
        return None
    return value.detach()


def as_written(value):
    """A non-quantized tensor as the checkpoint stores it: floating point in fp16."""
    return value.to(torch.float16) if value.is_floating_point() else value


def counts(layers: int, weights: int, quant_bytes: int, files) -> dict:
    """The manifest's counts; bits per weight counts qweight + qzeros + scales bytes."""
    return {"quantized_layers": layers, "quantized_weights": weights, "quantized_bytes": quant_bytes,
            "files": [f.name for f in files], "bits_per_weight": 8 * quant_bytes / max(weights, 1)}


def write_packed(source_dir: Path, out_dir: Path, pack, layers, value_for=None,
                 metadata: str = "tangquant (Intel neural-compressor)") -> dict:
    """Walk the source checkpoint and write it quantized; return the counts.

    ``pack(module_name)`` gives (GPTQ tensors, weight count) for each module in
    ``layers`` (its source ``weight`` and ``bias`` are replaced by them);
    ``value_for(name)`` may give a tensor's in-memory value instead of the source's.
    """
    writer = ShardWriter(out_dir, metadata={"quantized_by": metadata})
    quant_bytes = quant_weights = 0
    written: set[str] = set()
    handles: dict[Path, object] = {}
    try:
        for path, name in _source_tensor_names(source_dir):
            module_name, _, leaf = name.rpartition(".")
            if module_name in layers:
                if leaf == "weight":
                    packed, n_weights = pack(module_name)
                    for suffix, tensor in packed.items():
                        writer.add(f"{module_name}.{suffix}", tensor)
                    quant_bytes += packed_bytes(packed)
                    quant_weights += n_weights
                    written.add(module_name)
                continue  # the bias travels with the packed layer
            value = value_for(name) if value_for else None
            if value is None:
                if path not in handles:
                    handles[path] = safe_open(str(path), framework="pt")
                value = handles[path].get_tensor(name)
            writer.add(name, as_written(value))
        missing = sorted(set(layers) - written)
        if missing:
            raise QuantizationError(f"no source weight found for quantized layer(s) {missing[:3]}")
        files = writer.close()
    finally:
        handles.clear()
    return counts(len(written), quant_weights, quant_bytes, files)


def write_checkpoint(model, layers: dict[str, bool], source_dir: Path, out_dir: Path,
                     bits: int, group_size: int, format_version: int) -> dict:
    """Write INC's quantized model (whole-model run); return counts for the bits-per-weight figure."""
    def pack(name):
        return pack_module(name, model.get_submodule(name), bits, group_size, layers[name],
                           format_version)

    return write_packed(source_dir, out_dir, pack, layers, value_for=lambda name: _in_memory(model, name))
