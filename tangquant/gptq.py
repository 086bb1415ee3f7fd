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
This module packs and unpacks that layout and loads such a checkpoint into a
plain fp32 PyTorch model (the exact dequantising reference used by ``eval``,
the tests and the exporter), so neither gptqmodel nor IPEX is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tangquant.errors import InputError

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
    import torch

    per_word = 32 // bits
    w = words.to(torch.int64).movedim(dim, 0) & 0xFFFFFFFF
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).view(1, per_word, *([1] * (w.dim() - 1)))
    v = (w.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    v = v.reshape(w.shape[0] * per_word, *w.shape[1:])
    return v.movedim(0, dim).contiguous()


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

    q = _unpack(tensors["qweight"], bits, dim=0).t().contiguous()
    zeros = _unpack(tensors["qzeros"], bits, dim=1)
    if format_version == 1:
        # v1 stores zero-1 modulo 2^bits; AutoGPTQ and gptqmodel add the one back unmasked.
        zeros = zeros + 1
    return QuantizedLinear(q=q.to(dtype=torch.uint8),
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


def read_gptq_config(config: dict, model_dir: Path) -> tuple[int, int, int]:
    """(bits, group_size, format_version) of a GPTQ checkpoint's config, or a clear error."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "gptq":
        raise InputError(f"{model_dir} is not a GPTQ checkpoint (config.json has no "
                         "quantization_config with quant_method 'gptq')")
    bits = int(qc.get("bits", 0))
    if bits not in SUPPORTED_BITS:
        raise InputError(f"{model_dir}: GPTQ with {bits} bits is not supported ({SUPPORTED_BITS})")
    fmt = 2 if qc.get("checkpoint_format") == "gptq_v2" else 1
    return bits, int(qc.get("group_size", -1)), fmt


def iter_quantized_layers(model_dir: Path):
    """Yield (module_name, QuantizedLinear, bias or None) for every GPTQ layer in a checkpoint."""
    from tangquant.checkpoint import iter_tensors, load_config, weight_files

    model_dir = Path(model_dir)
    bits, _, fmt = read_gptq_config(load_config(model_dir), model_dir)
    pending: dict[str, dict] = {}
    for path in weight_files(model_dir):
        for name, tensor in iter_tensors(path):
            module, _, leaf = name.rpartition(".")
            if leaf in SUFFIXES or leaf == "bias":  # bias sorts before qweight in a shard
                pending.setdefault(module, {})[leaf] = tensor
    for module, tensors in pending.items():
        if all(s in tensors for s in SUFFIXES):
            yield module, unpack_layer(tensors, bits, fmt), tensors.get("bias")


def load_dequantized(model_dir: Path, dtype=None):
    """Load a GPTQ checkpoint into a plain ``AutoModelForCausalLM`` with exact fp32 weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tangquant.checkpoint import iter_tensors, weight_files

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    state = {}
    layers = {m: (ql, b) for m, ql, b in iter_quantized_layers(model_dir)}
    for module, (ql, bias) in layers.items():
        state[f"{module}.weight"] = ql.dequantize()
        if bias is not None:
            state[f"{module}.bias"] = bias.float()
    for path in weight_files(model_dir):
        for name, tensor in iter_tensors(path):
            module, _, leaf = name.rpartition(".")
            if module in layers:
                continue
            state[name] = tensor.float()
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # non-persistent buffer left on meta
    model.tie_weights()
    model.eval()
    return model.to(dtype) if dtype is not None else model
