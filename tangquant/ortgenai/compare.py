"""What ONNX Runtime GenAI's builder kept of a GPTQ checkpoint: its int4 blocks read back and compared.

Each ``MatMulNBits`` node of the decoder holds ``B`` (uint8 [N, blocks, block/2], two 4-bit
values a byte, the first in the low nibble), ``scales`` ([N·blocks]) and, when asymmetric,
``zero_points`` (uint8 [N, ⌈blocks/2⌉], packed the same way; absent means 8), and computes
``(q − zero) · scale``. The builder fuses q/k/v into one ``qkv_proj`` (rows in that order); a
node's name gives the checkpoint module(s) it came from. Every GPTQ layer must be found with the
same integers, zero points and scales (scales widened from fp16, value for value); a node no
GPTQ layer fed (the fp16 lm_head, requantized round-to-nearest by the builder) is measured
against the checkpoint's float weight and reported, never counted as kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tangquant.gptq import GPTQCheckpoint
from tangquant.ortgenai import model

# ORT module (dots) -> the checkpoint modules whose rows it stacks, for the fusions the builder makes.
FUSED = {"attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
RENAMED = {"attn.": "self_attn."}


def _nibbles(packed: np.ndarray, rows: int, count: int) -> np.ndarray:
    """[rows, count] 4-bit values from bytes holding two each, the first in the low nibble."""
    flat = packed.reshape(rows, -1)
    both = np.stack([flat & 0x0F, flat >> 4], axis=-1).reshape(rows, -1)
    return both[:, :count]


def unpack(node, arrays: dict) -> dict:
    """A MatMulNBits node's q [N, K], zero points and scales [N, blocks], and its attributes."""
    attrs = {a.name: a.i for a in node.attribute if a.name in ("K", "N", "bits", "block_size",
                                                                 "accuracy_level")}
    n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
    if attrs.get("bits", 4) != 4:
        raise ValueError(f"{node.name}: {attrs['bits']}-bit MatMulNBits, not int4")
    blocks = -(-k // block)
    q = _nibbles(arrays[node.input[1]], n, blocks * block)[:, :k]
    scales = arrays[node.input[2]].reshape(n, blocks).astype(np.float32)
    zp_name = node.input[3] if len(node.input) > 3 else ""
    zeros = _nibbles(arrays[zp_name], n, blocks) if zp_name else np.full((n, blocks), 8, np.uint8)
    return {"q": q, "zeros": zeros, "scales": scales, "attrs": attrs, "asymmetric": bool(zp_name)}


def sources(node_name: str) -> tuple[str, tuple[str, ...]]:
    """'/model/layers.3/attn/qkv_proj/MatMulNBits' -> ('model.layers.3.attn.qkv_proj',
    (checkpoint modules q_proj, k_proj, v_proj of layer 3))."""
    module = ".".join(node_name.strip("/").split("/")[:-1])
    head, _, tail = module.rpartition(".")
    parent, _, block = head.rpartition(".")
    key = f"{block}.{tail}"
    if key in FUSED:
        return module, tuple(f"{parent}.{s}" for s in FUSED[key])
    for ours, theirs in RENAMED.items():
        if key.startswith(ours):
            return module, (f"{parent}.{theirs}{key[len(ours):]}",)
    return module, (module,)


def _stack(layers: dict, names: tuple[str, ...]) -> dict | None:
    if not all(n in layers for n in names):
        return None
    parts = [layers[n] for n in names]
    return {"q": np.concatenate([p.q.numpy() for p in parts]),
            "zeros": np.concatenate([p.zeros.t().numpy() for p in parts]),
            "scales": np.concatenate([p.scales.t().float().numpy() for p in parts])}


def _float_source(module: str, floats: dict, config: dict) -> str | None:
    """The checkpoint's float tensor a builder-quantized node came from (a tied head: the embeddings)."""
    if f"{module}.weight" in floats:
        return f"{module}.weight"
    if module == "lm_head" and config.get("tie_word_embeddings") and "model.embed_tokens.weight" in floats:
        return "model.embed_tokens.weight"
    return None


def dequantized(u: dict) -> np.ndarray:
    block, k = u["attrs"]["block_size"], u["q"].shape[1]
    zeros = np.repeat(u["zeros"], block, axis=1)[:, :k].astype(np.float32)
    return (u["q"].astype(np.float32) - zeros) * np.repeat(u["scales"], block, axis=1)[:, :k]


def compare(ckpt: GPTQCheckpoint, out_dir: Path) -> dict:
    """Every MatMulNBits node against the checkpoint; {"exact": [...], "differs": [...],
    "requantized": {...}, "missing": [...], "embedding": ...}."""
    g = model.graph(out_dir)
    inits = {t.name: t for t in g.initializer}
    layers = {name: layer for name, layer, _ in ckpt.layers()}
    floats = dict(ckpt.tensors())
    report = {"exact": [], "differs": [], "requantized": {}, "missing": [], "accuracy_levels": set()}
    used = set()
    for node in (n for n in g.node if n.op_type == "MatMulNBits"):
        arrays = {i: model.array(out_dir, inits[i]) for i in node.input[1:] if i in inits}
        u = unpack(node, arrays)
        report["accuracy_levels"].add(u["attrs"].get("accuracy_level", 0))
        module, names = sources(node.name)
        want = _stack(layers, names)
        if want is not None:
            used.update(names)
            same = (u["q"].shape == want["q"].shape and np.array_equal(u["q"], want["q"])
                    and np.array_equal(u["zeros"], want["zeros"]) and np.array_equal(u["scales"], want["scales"])
                    and u["attrs"]["block_size"] == ckpt.group_size)
            report["exact" if same else "differs"].append(module)
        elif _float_source(module, floats, ckpt.config) is not None:
            src = _float_source(module, floats, ckpt.config)
            w = floats[src].float().numpy()
            d = dequantized(u) - w
            report["requantized"][module] = {
                "from": f"{src} ({str(floats[src].dtype).replace('torch.', '')})",
                "block_size": u["attrs"]["block_size"], "asymmetric": u["asymmetric"],
                "max_abs_diff": float(np.abs(d).max()),
                "relative_rms_error": float(np.sqrt((d ** 2).mean() / max((w ** 2).mean(), 1e-30)))}
        else:
            report["differs"].append(f"{module} (no checkpoint tensor named {' + '.join(names)})")
    report["missing"] = sorted(set(layers) - used)
    report["accuracy_levels"] = sorted(report["accuracy_levels"])
    report["embedding"] = _embedding(g, inits, floats, out_dir)
    return report


def _embedding(g, inits: dict, floats: dict, out_dir: Path) -> str:
    """How the input embedding table compares with the checkpoint's."""
    want = floats.get("model.embed_tokens.weight")
    on_ids = [n for n in g.node if "input_ids" in n.input[1:]]
    if any(n.op_type == "GatherBlockQuantized" for n in on_ids):
        # A tied table: the builder shares the lm_head's int4 blocks with the embedding lookup.
        return "int4, the lm_head's requantized blocks shared (GatherBlockQuantized): changed as the lm_head"
    gathers = [n for n in on_ids if n.op_type == "Gather" and n.input[0] in inits]
    if want is None or not gathers:
        return "not compared (no Gather on input_ids, or no model.embed_tokens.weight)"
    got = model.array(out_dir, inits[gathers[0].input[0]])
    ref = want.float().numpy()
    if got.shape != ref.shape:
        return f"shape {list(got.shape)} differs from the checkpoint's {list(ref.shape)}"
    diff = float(np.abs(got.astype(np.float32) - ref).max())
    return (f"equal to the checkpoint's ({got.dtype})" if diff == 0 else
            f"{got.dtype}, max |Δ| {diff:.3g} from the checkpoint's {str(want.dtype).replace('torch.', '')}")
