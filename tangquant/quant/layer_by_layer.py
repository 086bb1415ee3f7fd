"""Layer-by-layer GPTQ and RTN in bounded memory (``tangquant quantize --layer-wise``).

INC 3.10's own ``use_layer_wise`` saved no memory on the Qwen shapes (measured in
``docs/benchmarks.md``), so tangquant drives INC one decoder layer at a time instead: the layer's
weights are read from the safetensors, wrapped in a one-layer model whose
``model.layers`` INC's GPTQ recognises as the transformer stack, quantized on
the cached hidden states, written to the output shard by shard, and run to give
the next layer its inputs (through the quantized weights, as GPTQ prescribes).
Only one layer, the hidden states of the samples, the output shard being
filled (at most 1 GB) and, at the end, the LM head are ever in memory.

True-sequential GPTQ quantizes a layer in groups of linears that share an
input (q/k/v, o, gate/up, down), each calibrated with the earlier groups
already quantized. INC 3.10 also replaces the block's *input* hidden states
with its output after every group (step 2.5 of
``RAWGPTQuantizer.execute_quantization`` sits inside the loop over groups), so
here each group is calibrated on the layer's own cached inputs by INC's GPTQ
core, the block run only up to the group's input (``quant/gptq_block``).

The fidelity report is computed in the same pass: held-out samples flow
through the source layers and through the quantized layers side by side.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear
from neural_compressor.torch.quantization import convert, prepare
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from tangquant.checkpoint import ShardWriter, TensorReader
from tangquant.errors import QuantizationError
from tangquant.gptq import unpack_layer
from tangquant.quant.calibration import calibration_autocast
from tangquant.quant.clock import PhaseClock, untimed
from tangquant.quant.fidelity import streamed_fidelity
from tangquant.quant.gptq_block import quantize_groups
from tangquant.quant.inc import inc_config, inc_workspace
from tangquant.quant.recipe import QuantRecipe
from tangquant.quant.writer import as_written, counts, pack_module, packed_bytes

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _inc_errors_only():
    """INC warns on every call that it skips lm_head and resets its lm_head configs:
    here that is once per layer and group, so below --verbose only its errors pass."""
    inc = logging.getLogger("neural_compressor")

    def errors(record):
        return record.levelno >= logging.ERROR or logger.isEnabledFor(logging.DEBUG)

    inc.addFilter(errors)
    try:
        yield
    finally:
        inc.removeFilter(errors)


def _skeleton(model_dir: Path):
    """The model on the meta device (no memory) and a real rotary embedding."""
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    rotary = type(model.model.rotary_emb)(config=config)
    return model, rotary


class _OneLayer(torch.nn.Module):
    """One decoder layer as ``model.layers[0]``, where INC's GPTQ looks for the transformer stack.

    A class at module level: one defined inside a function per layer closed over its layer, and a
    class lives in a reference cycle, so every quantized layer (its fp32 weights) stayed in memory
    until the cyclic collector ran, and the peak RSS grew by about a layer per layer."""

    def __init__(self, layer):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([layer])

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None):
        out = self.model.layers[0](hidden_states, position_embeddings=position_embeddings,
                                   attention_mask=attention_mask)
        return out[0] if isinstance(out, tuple) else out


def _one_layer_model(layer):
    return _OneLayer(layer).eval()


class _Context:
    """Rotary embeddings and causal masks per sequence length, built once."""
    def __init__(self, rotary):
        self.rotary = rotary
        self._cache: dict[int, dict] = {}

    def kwargs(self, hidden) -> dict:
        n = hidden.shape[1]
        if n not in self._cache:
            pos = torch.arange(n).unsqueeze(0)
            # An explicit additive mask is causal under both sdpa and eager attention.
            mask = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]
            self._cache[n] = {"position_embeddings": self.rotary(hidden, pos), "attention_mask": mask}
        return self._cache[n]


def _load_layer(skeleton, source, index: int):
    prefix = f"model.layers.{index}."
    state = {name[len(prefix):]: source.get(name).float() for name in source.names(prefix)}
    layer = skeleton.model.layers[index]
    layer.load_state_dict(state, strict=True, assign=True)
    return layer


def _linears(module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def sequential_groups(block, hidden, ctx: _Context) -> list[list[str]]:
    """The block's linears grouped by shared input, in call order (q,k,v | o | gate,up | down).

    Each input is held until the grouping is done: compared by address only, a freed input's
    memory could come back as the next linear's (o_proj's input freed, the post-attention norm's
    output of the same size allocated there) and join two groups with different inputs."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: calls.append((n, args[0]))) for n in _linears(block)]
    try:
        with torch.no_grad():
            short = hidden[:, :8]
            block(short, **ctx.kwargs(short))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for name, x in calls:
        if groups and x.data_ptr() == last.data_ptr() and x.shape == last.shape:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    return groups


def quantize_block(block, recipe: QuantRecipe, hidden: list, ctx: _Context, model_dir: Path,
                   timed=None) -> tuple[torch.nn.Module, dict]:
    """Quantize every linear of a one-layer model with INC: (the converted model, {linear name: its
    unpacked integers} where the GPTQ path has them, else empty: ``_write_layer`` unpacks INC's).
    ``timed(phase)`` clocks the calibration forwards and GPTQ proper (``PhaseClock``)."""
    timed = timed or untimed
    if not recipe.algorithm.needs_calib:
        with timed("quantize"):
            return convert(prepare(block, inc_config(recipe, model_dir, true_sequential=False))), {}
    groups = (sequential_groups(block, hidden[0], ctx) if recipe.true_sequential
              else [_linears(block)])
    unpacked = quantize_groups(block, groups, hidden, ctx.kwargs,
                               inc_config(recipe, model_dir, true_sequential=False), shared=recipe.true_sequential,
                               bf16=recipe.compute_dtype == "bf16", timed=timed)
    left = _linears(block)
    if left:
        raise QuantizationError(f"INC left {left[:3]} unquantized")
    return block, unpacked


def _advance(block, hidden: list, ctx: _Context) -> None:
    """Replace each sample's hidden state by the block's output, one at a time (bounded memory)."""
    with torch.no_grad():
        for i, h in enumerate(hidden):
            hidden[i] = block(h, **ctx.kwargs(h))


def _embed(weight, samples, as_written: bool = False) -> list:
    """Input hidden states from the embedding matrix; ``as_written`` rounds them to the checkpoint's
    fp16 (row by row: the same values as rounding the matrix, without a copy of it)."""
    rows = (weight[s] for s in samples)
    return [(r.to(torch.float16) if as_written else r).float().unsqueeze(0) for r in rows]


def _dequantized_block(block, packed_by_name: dict, recipe: QuantRecipe, fmt: int):
    """The block as the checkpoint holds it: dequantized linears, fp16-rounded norms."""
    for param in block.parameters():
        param.data = param.data.to(torch.float16).float()

    for name, packed in packed_by_name.items():
        ql = unpack_layer(packed, recipe.bits, fmt)
        weight = ql.dequantize()
        bias = packed.get("bias")
        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                              device="meta")
        # requires_grad (the forwards run under no_grad): autocast keeps its bf16 copy of a weight for
        # the whole calibration stream only for a leaf that requires grad, else it casts it per sample
        lin.weight = torch.nn.Parameter(weight)
        if bias is not None:
            lin.bias = torch.nn.Parameter(bias.float())
        parent, _, leaf = name.rpartition(".")
        setattr(block.get_submodule(parent), leaf, lin)
    return block


def _write_layer(writer, block, index: int, source, recipe: QuantRecipe, fmt: int, unpacked: dict) -> dict:
    """Write one quantized layer (packed linears, fp16 norms); return {wrapper name: packed}.
    ``unpacked``: {wrapper name: the linear's integers} that quantize_block already has."""
    prefix = f"model.layers.{index}."
    wrapped = "model.layers.0."
    packed_by_name, stats = {}, {"weights": 0, "bytes": 0}
    quantized = set()
    for name, module in block.named_modules():
        if name.startswith(wrapped) and isinstance(module, INCWeightOnlyLinear):
            real = prefix + name[len(wrapped):]
            packed, n = pack_module(real, module, recipe.bits, recipe.group_size,
                                    f"{real}.bias" in source.where, fmt, unpacked.get(name))
            for suffix, tensor in packed.items():
                writer.add(f"{real}.{suffix}", tensor)
            packed_by_name[name] = packed
            quantized.add(real)
            stats["weights"] += n
            stats["bytes"] += packed_bytes(packed)
    for name in source.names(prefix):
        if name.rpartition(".")[0] not in quantized:
            writer.add(name, as_written(source.get(name)))
    return {"packed": packed_by_name, **stats, "layers": len(quantized)}


def run_layer_wise(model_dir: Path, out_dir: Path, recipe: QuantRecipe, samples: list, held: list,
                   fmt: int) -> tuple[dict, dict | None]:
    """Quantize and write ``model_dir`` layer by layer; return (counts, fidelity or None)."""
    torch.manual_seed(recipe.seed)
    source = TensorReader(Path(model_dir))
    skeleton, rotary = _skeleton(Path(model_dir))
    ctx = _Context(rotary)
    embedding = source.get("model.embed_tokens.weight")  # read (and finite-checked) once: 622 M values at 7B
    calib = _embed(embedding, samples) if recipe.algorithm.needs_calib else []
    ref = _embed(embedding, held)
    quant = _embed(embedding, held, as_written=True)
    del embedding
    # 1 GB shards: the writer holds a shard's tensors until it is full, and memory is the point.
    writer = ShardWriter(out_dir, max_shard_bytes=10**9,
                         metadata={"quantized_by": "tangquant (Intel neural-compressor)"})
    totals = {"weights": 0, "bytes": 0, "layers": 0}
    clock = PhaseClock()
    n_layers = len(skeleton.model.layers)
    with inc_workspace(), _inc_errors_only():
        bar = tqdm(range(n_layers), desc=f"{recipe.algo} layer by layer", unit="layer")
        for i in bar:
            with clock("load"):
                block = _one_layer_model(_load_layer(skeleton, source, i))
            with clock("held-out"):
                _advance(block, ref, ctx)  # the source model's stream, before quantization
            block, unpacked = quantize_block(block, recipe, calib, ctx, Path(model_dir), clock)
            with clock("write"):
                written = _write_layer(writer, block, i, source, recipe, fmt, unpacked)
            for k in totals:
                totals[k] += written[k]
            with clock("advance"):
                block = _dequantized_block(block, written["packed"], recipe, fmt)
                with calibration_autocast(recipe.compute_dtype == "bf16"):
                    _advance(block, calib, ctx)
            with clock("held-out"):
                _advance(block, quant, ctx)
            skeleton.model.layers[i] = torch.nn.Identity()  # drop the layer's weights
            del block, written, unpacked
            bar.set_postfix_str(clock.next_layer(), refresh=False)
    with clock("end"):
        for name in source.names():
            if not name.startswith("model.layers."):
                writer.add(name, as_written(source.get(name)))
        files = writer.close()
        calib.clear()
        fidelity = streamed_fidelity(source, skeleton, ref, quant, held) if held else None
    return {**counts(totals["layers"], totals["weights"], totals["bytes"], files), **clock.report()}, fidelity
