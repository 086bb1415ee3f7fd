"""The GPTQ checkpoint layout of Qwen's own ``*-GPTQ-Int4`` releases, exactly.

Per quantized ``nn.Linear`` with ``in`` inputs and ``out`` outputs, ``b`` bits
and groups of ``g`` inputs (AutoGPTQ's "gptq" v1 format)::

    qweight  int32 [in * b / 32, out]    integers packed along the input dim
    qzeros   int32 [in / g, out * b / 32] zero points minus one, packed along out
    scales   fp16  [in / g, out]
    g_idx    int32 [in]                  group of each input column
    bias     fp16  [out]                 only where the layer has a bias

and ``w[o, i] = scales[g_idx[i], o] * (q[i, o] - zeros[g_idx[i], o])``.
Format v2 (gptqmodel's "gptq_v2") stores the zero points without the minus one.
This module packs and unpacks that layout, and :class:`GPTQCheckpoint` opens a
checkpoint once (its ``config.json`` read and validated a single time) for every
stage that takes one: export, eval, chat, bench and serve. Its exact fp32
dequantisation is the reference the tests and ``eval`` compare against, so
neither gptqmodel nor IPEX is needed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tangquant import checkpoint, counts
from tangquant.errors import InputError, short
from tangquant.files import existing_dir

SUPPORTED_BITS = (2, 4, 8)
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


@dataclass
class QuantizedLinear:
    """Unpacked integers of one layer: q [out, in] in [0, 2^bits), zeros/scales [groups, out]."""

    q: "object"
    zeros: "object"
    scales: "object"
    g_idx: "object"
    bits: int

    def dequantize(self):
        import torch

        out_f, in_f = self.q.shape
        groups = self.scales.shape[0]
        size = in_f // groups if groups and in_f % groups == 0 else 0
        if size and torch.equal(self.g_idx.long(), torch.arange(in_f) // size):
            # Consecutive groups (all but act-order): the same fp32 products, without the [in, out]
            # gathers and transposes, several times faster on a 7B layer.
            q = self.q.reshape(out_f, groups, size).float()
            w = (q - self.zeros.t().float().unsqueeze(-1)) * self.scales.t().float().unsqueeze(-1)
            return w.reshape(out_f, in_f)
        g = self.g_idx.long()
        scales = self.scales.float()[g]            # [in, out]
        zeros = self.zeros.float()[g]              # [in, out]
        return ((self.q.t().float() - zeros) * scales).t().contiguous()  # [out, in]


def _pack(values, bits: int, dim: int):
    """Pack unsigned ``bits``-bit integers along ``dim`` into int32 words."""
    import torch

    per_word = 32 // bits
    v = values.to(torch.int64)
    if v.shape[dim] % per_word:
        raise ValueError(f"dimension {v.shape[dim]} is not a multiple of {per_word}")
    v = v.movedim(dim, 0)
    v = v.reshape(v.shape[0] // per_word, per_word, *v.shape[1:])
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).view(1, per_word, *([1] * (v.dim() - 2)))
    words = (v << shifts).sum(dim=1)
    # Reinterpret as signed 32-bit, as AutoGPTQ stores it.
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


def _unpack(words, bits: int, dim: int):
    if bits in (4, 8) and sys.byteorder == "little":
        return _unpack_bytes(words, bits, dim)
    import torch

    per_word = 32 // bits
    w = words.to(torch.int64).movedim(dim, 0) & 0xFFFFFFFF
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).view(1, per_word, *([1] * (w.dim() - 1)))
    v = (w.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    v = v.reshape(w.shape[0] * per_word, *w.shape[1:])
    return v.movedim(0, dim).contiguous()


def _unpack_bytes(words, bits: int, dim: int):
    """``_unpack`` for 4 and 8 bits through the words' bytes: an order of magnitude faster and
    8x less memory than int64 shifts, which made unpacking a 7B checkpoint minutes of an export."""
    import torch

    w = words.movedim(dim, 0).contiguous()
    # (flattened first: a size-1 dimension may keep any stride, which view() refuses)
    b = w.reshape(-1).view(torch.uint8).reshape(*w.shape, 4)  # little-endian: byte j holds bits 8j..8j+7
    values = torch.stack([b & 15, b >> 4], dim=-1).reshape(*w.shape, 8) if bits == 4 else b
    values = values.movedim(-1, 1).reshape(w.shape[0] * values.shape[-1], *w.shape[1:])
    return values.movedim(0, dim)  # uint8: the callers widen what needs it


def pack_layer(q, zeros, scales, g_idx, bits: int, bias=None, format_version: int = 1) -> dict:
    """Tensors for one layer. ``q`` is [out, in] unsigned; ``zeros``/``scales`` [groups, out]."""
    import torch

    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}")
    if int(q.min()) < 0 or int(q.max()) >= 2**bits:
        raise ValueError(f"integers outside [0, {2**bits})")
    stored_zeros = zeros.to(torch.int64) - (1 if format_version == 1 else 0)
    stored_zeros = stored_zeros & ((1 << bits) - 1)
    tensors = {
        "qweight": _pack(q.t(), bits, dim=0),
        "qzeros": _pack(stored_zeros, bits, dim=1),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        tensors["bias"] = bias.to(torch.float16).contiguous()
    return tensors


def unpack_layer(tensors: dict, bits: int, format_version: int = 1) -> QuantizedLinear:
    import torch

    q = _unpack(tensors["qweight"], bits, dim=0).to(torch.uint8).t().contiguous()
    zeros = _unpack(tensors["qzeros"], bits, dim=1).to(torch.int64)
    if format_version == 1:
        # v1 stores zero-1 modulo 2^bits; AutoGPTQ and gptqmodel add the one back unmasked.
        zeros = zeros + 1
    return QuantizedLinear(q=q,
                           zeros=zeros, scales=tensors["scales"], g_idx=tensors["g_idx"], bits=bits)


def quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool,
                        damp_percent: float, format_version: int = 1) -> dict:
    """``config.json``'s quantization_config, as in Qwen's GPTQ-Int4 releases."""
    return {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": damp_percent,
        "desc_act": desc_act,
        "static_groups": False,
        "sym": sym,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq" if format_version == 1 else "gptq_v2",
    }


def is_gptq(config: dict) -> bool:
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "gptq"


@dataclass(frozen=True)
class GPTQCheckpoint:
    """A GPTQ checkpoint directory, its ``config.json`` read and checked once.

    ``layers()`` streams each quantized linear (unpacked) shard by shard, so at
    most the layers of one shard are held; ``tensors()`` streams the others.
    """

    path: Path
    config: dict
    bits: int
    group_size: int
    format_version: int
    sym: bool
    desc_act: bool
    shards: tuple[Path, ...]
    layer_names: frozenset[str]

    @classmethod
    def open(cls, path) -> "GPTQCheckpoint":
        path = existing_dir(path, "GPTQ checkpoint")
        config = checkpoint.load_config(path)
        if not is_gptq(config):
            raise InputError(f"{path} is not a GPTQ checkpoint (config.json has no "
                             "quantization_config with quant_method 'gptq')")
        bits, group_size, fmt, sym, desc_act = _checked_qc(config["quantization_config"], path)
        shards = tuple(checkpoint.weight_files(path))
        shapes = checkpoint.tensor_shapes(list(shards))
        counts.check_counts(config, {n: s for n, (s, _, _) in shapes.items()}, path)
        names = {n.rpartition(".")[0] for n in shapes if n.endswith(".qweight")}
        if not names:
            raise InputError(f"{path} holds no GPTQ layers (qweight/qzeros/scales/g_idx)")
        return cls(path, config, bits, group_size, fmt, sym, desc_act, shards, frozenset(names))

    def layers(self) -> Iterator[tuple[str, QuantizedLinear, "object"]]:
        """(module name, unpacked layer, bias or None) for every quantized linear."""
        pending: dict[str, dict] = {}
        for path in self.shards:
            for name, tensor in checkpoint.iter_tensors(path):
                module, _, leaf = name.rpartition(".")
                if module in self.layer_names and (leaf in SUFFIXES or leaf == "bias"):
                    pending.setdefault(module, {})[leaf] = tensor
            # A layer may straddle two shards: yield only the complete ones.
            for module in [m for m, t in pending.items() if all(s in t for s in SUFFIXES)]:
                tensors = pending.pop(module)
                for leaf in ("scales", "bias"):
                    if leaf in tensors:
                        checkpoint.require_finite(tensors[leaf], f"{module}.{leaf}", path)
                layer = unpack_layer(tensors, self.bits, self.format_version)
                _check_layer(module, layer, tensors.get("bias"), path)
                yield module, layer, tensors.get("bias")
        if pending:
            raise InputError(f"{self.path}: layer {next(iter(pending))} lacks some of {SUFFIXES}")

    def tensors(self) -> Iterator[tuple[str, "object"]]:
        """Every tensor that is not part of a quantized layer (embeddings, norms, head)."""
        for path in self.shards:
            for name, tensor in checkpoint.iter_tensors(path):
                if name.rpartition(".")[0] not in self.layer_names:
                    checkpoint.require_finite(tensor, name, path)
                    yield name, tensor

    def dequantized_state(self) -> dict:
        """The whole model's weights in fp32, quantized layers dequantised exactly."""
        state = {}
        for module, layer, bias in self.layers():
            state[f"{module}.weight"] = layer.dequantize()
            if bias is not None:
                state[f"{module}.bias"] = bias.float()
        state.update({name: t.float() for name, t in self.tensors()})
        return state


FORMATS = {"gptq": 1, "gptq_v2": 2, None: 1}


def _checked_qc(qc: dict, path: Path) -> tuple[int, int, int, bool, bool]:
    """(bits, group_size, format version, sym, desc_act), refusing values of the wrong type:
    ``bool("false")`` is True, so strings and numbers are not taken for booleans."""
    where = f"{path}/config.json: quantization_config"
    bits, group_size = qc.get("bits", 0), qc.get("group_size", -1)
    for key, value in (("bits", bits), ("group_size", group_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{where} {key} must be an integer, got {short(value)}")
    if bits not in SUPPORTED_BITS:
        raise InputError(f"{path}: GPTQ with {bits} bits is not supported ({SUPPORTED_BITS})")
    if group_size != -1 and group_size < 1:
        raise InputError(f"{where} group_size must be positive or -1, got {group_size}")
    flags = {}
    for key, default in (("sym", True), ("desc_act", False)):
        value = qc.get(key, default)
        if not isinstance(value, bool):
            raise InputError(f"{where} {key} must be true or false, got {short(value)}")
        flags[key] = value
    fmt = qc.get("checkpoint_format")
    if not isinstance(fmt, (str, type(None))) or fmt not in FORMATS:
        raise InputError(f"{where} checkpoint_format must be gptq or gptq_v2, got {short(fmt)}")
    return bits, group_size, FORMATS[fmt], flags["sym"], flags["desc_act"]


def _check_layer(module: str, layer: QuantizedLinear, bias, path: Path) -> None:
    """Shapes that fit together and group indices in range, or one line naming the layer."""
    out_f, in_f = layer.q.shape
    groups = layer.scales.shape[0] if layer.scales.dim() == 2 else -1
    ok = (layer.scales.dim() == 2 and tuple(layer.scales.shape) == (groups, out_f)
          and tuple(layer.zeros.shape) == (groups, out_f) and tuple(layer.g_idx.shape) == (in_f,)
          and (bias is None or tuple(bias.shape) == (out_f,)))
    if ok and in_f:
        ok = int(layer.g_idx.min()) >= 0 and int(layer.g_idx.max()) < groups
    if not ok:
        raise InputError(f"{path}: the GPTQ tensors of {module} do not fit together (qweight "
                         f"{[in_f * layer.bits // 32, out_f]}, scales {list(layer.scales.shape)}, "
                         f"g_idx {list(layer.g_idx.shape)}); the checkpoint is corrupt")
