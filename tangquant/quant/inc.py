"""Driving Intel neural-compressor (3.x torch API) to compute the INT4 integers.

INC's converted model holds ``INCWeightOnlyLinear`` modules with the integers,
zero points, scales and (for act-order) the channel permutation; the
checkpoint is then written by :mod:`tangquant.quant.writer`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from neural_compressor.common import options
from neural_compressor.torch.quantization import AWQConfig, GPTQConfig, RTNConfig, convert, prepare
from tqdm import tqdm

from tangquant import load
from tangquant.engines import entry
from tangquant.errors import QuantizationError
from tangquant.quant.recipe import QuantRecipe
from tangquant.quant.writer import write_checkpoint

logger = logging.getLogger(__name__)


def linear_layers(model) -> dict[str, bool]:
    """{name: has_bias} of the decoder's nn.Linear layers INC quantizes (not lm_head)."""
    return {name: m.bias is not None for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name != "lm_head" and ".layers." in f".{name}"}


def qwen2_absorb_layers(config) -> dict:
    """Where AWQ folds its input scales in a Qwen2 block.

    INC finds these by jit-tracing the model, which fails on transformers 4.57's Qwen2
    (it then silently skips the scale search), so they are given explicitly.
    """
    layers = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
              "mlp.up_proj": ("mlp.down_proj",)}
    if config.num_key_value_heads == config.num_attention_heads:
        layers["self_attn.v_proj"] = ("self_attn.o_proj",)  # v's rows map 1:1 onto o's inputs
    return layers


@contextlib.contextmanager
def layer_progress(model, desc: str):
    """A tqdm bar over decoder layers, advanced when INC first runs each layer.

    INC reports its per-layer progress only through INFO logging, which the CLI
    silences, so forward pre-hooks on the decoder layers stand in for it.
    """
    layers = model.model.layers
    bar = tqdm(total=len(layers), desc=desc, unit="layer", leave=False)
    seen: set[int] = set()

    def hook(index):
        def pre(_module, _args):
            if index not in seen:
                seen.add(index)
                bar.n = max(bar.n, index)
                bar.refresh()
        return pre

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield bar
        bar.n = len(layers)
        bar.refresh()
    finally:
        for h in handles:
            h.remove()
        bar.close()


def _calibrate(model, samples) -> None:
    with torch.no_grad():
        for s in tqdm(samples, desc="calibration forwards", unit="sample", leave=False):
            model(s.unsqueeze(0))


@contextlib.contextmanager
def inc_workspace():
    """Point INC's workspace at a private temporary directory, removed afterwards.

    INC otherwise creates ``./nc_workspace/<time>/`` in the current directory on import
    and keeps its layer-wise weight pickles there. Its global ``options`` object is the
    only place to say so.
    """
    path = tempfile.mkdtemp(prefix="tangquant-inc-")
    options.workspace = path
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def inc_config(recipe: QuantRecipe, model_dir: Path | None = None, true_sequential: bool | None = None,
               model=None):
    """INC's config for ``recipe``, with every parameter set explicitly (INC's own names), from
    the algorithm's own builder (``ALGORITHMS[...].config``).

    The layer-by-layer driver does true-sequential itself, group by group, and passes
    ``true_sequential=False``; it also names ``model_dir`` (a local directory, else INC
    asks the Hub for ""). AWQ reads where to fold its scales from ``model``'s config.
    """
    algorithm = recipe.algorithm
    if algorithm.config is None:
        raise QuantizationError(f"INC's weight-only configs do not drive {recipe.algo!r} here")
    common = dict(bits=recipe.bits, use_sym=recipe.use_sym, group_size=recipe.group_size)
    return entry(algorithm.config)(recipe, common, model_dir=model_dir, true_sequential=true_sequential,
                                   model=model)


def rtn_config(recipe: QuantRecipe, common: dict, **_) -> RTNConfig:
    return RTNConfig(**common)


def gptq_config(recipe: QuantRecipe, common: dict, model_dir: Path | None = None,
                true_sequential: bool | None = None, **_) -> GPTQConfig:
    extra = {"model_path": str(model_dir)} if model_dir is not None else {}
    return GPTQConfig(**common, act_order=recipe.act_order, percdamp=recipe.percdamp,
                      block_size=recipe.block_size,
                      true_sequential=recipe.true_sequential if true_sequential is None else true_sequential,
                      **extra)


def awq_config(recipe: QuantRecipe, common: dict, model=None, **_) -> AWQConfig:
    # folding=True: scales are folded into the previous layer only, never as an extra
    # Mul module, so every quantized layer stays a plain GPTQ-layout linear.
    absorb = qwen2_absorb_layers(model.config) if model is not None else None
    return AWQConfig(**common, folding=True, use_auto_scale=True, use_auto_clip=True,
                     absorb_layer_dict=absorb)


def run_inc(model_dir: Path, recipe: QuantRecipe, samples):
    """Quantize the whole model with INC; return (converted model, {layer: has_bias})."""
    algorithm = recipe.algorithm
    with inc_workspace():
        torch.manual_seed(recipe.seed)
        model = load.torch_model(model_dir)
        layers = linear_layers(model)
        if not algorithm.needs_calib:
            return convert(prepare(model, inc_config(recipe, model=model))), layers
        example = {"example_inputs": samples[0].unsqueeze(0)} if algorithm.example_inputs else {}
        model = prepare(model, inc_config(recipe, model=model), **example)
        _calibrate(model, samples)
        with layer_progress(model, f"{algorithm.label} per layer"):
            model = convert(model)
        return model, layers


def run_whole_model(model_dir: Path, out_dir: Path, recipe: QuantRecipe, samples, fmt: int) -> dict:
    """INC on the whole model, written in the GPTQ layout into ``out_dir``; returns the counts."""
    qmodel, layers = run_inc(model_dir, recipe, samples)
    return write_checkpoint(qmodel, layers, model_dir, out_dir, recipe.bits, recipe.group_size, fmt)
