"""AutoRound through INC (``tangquant quantize --algo autoround``).

INC 3.10's ``AutoRoundConfig`` hands the model to auto-round, which tunes each
block's rounding and min/max with signed gradient descent on the calibration
samples and saves its own AutoGPTQ-format checkpoint (``export_format="auto_gptq"``).
tangquant reads the integers back from that checkpoint and writes them in the
same layout as every other algorithm (fp16 embeddings and norms from the
source, ``g_idx``, no extra tensors), so export, eval and bench see no difference.
auto-round is an optional dependency: ``pip install 'tangquant[autoround]'``.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path

import torch
from neural_compressor.torch.quantization import AutoRoundConfig, convert, prepare

from tangquant import load
from tangquant.checkpoint import iter_tensors, weight_files
from tangquant.errors import QuantizationError
from tangquant.gptq import GPTQCheckpoint, pack_layer
from tangquant.quant.recipe import QuantRecipe
from tangquant.quant.writer import write_packed

logger = logging.getLogger(__name__)


def check_available() -> None:
    if importlib.util.find_spec("auto_round") is None:
        raise QuantizationError("--algo autoround needs the auto-round package: "
                                "pip install 'tangquant[autoround]' (auto-round==0.16.1)")


def _autoround_checkpoint(model_dir: Path, recipe: QuantRecipe, samples, work: Path) -> Path:
    """Run INC's AutoRound; return the directory auto-round saved its GPTQ checkpoint in."""
    torch.manual_seed(recipe.seed)
    model = load.torch_model(model_dir)
    cfg = AutoRoundConfig(bits=recipe.bits, group_size=recipe.group_size, use_sym=recipe.use_sym,
                          iters=recipe.iters, nsamples=len(samples), seqlen=recipe.seq_len,
                          batch_size=min(8, len(samples)), seed=recipe.seed, amp=False,
                          device_map="cpu", export_format="auto_gptq", output_dir=str(work))
    prepared = prepare(model, cfg)
    with torch.no_grad():
        for s in samples:  # captured by INC and replayed to auto-round as its dataloader
            prepared(s.unsqueeze(0))
    convert(prepared)
    saved = sorted(p.parent for p in work.rglob("config.json"))
    if not saved:
        raise QuantizationError(f"auto-round wrote no checkpoint under {work}")
    return saved[0]


def run_autoround(model_dir: Path, out_dir: Path, recipe: QuantRecipe, samples, fmt: int) -> dict:
    """Quantize with AutoRound and write tangquant's GPTQ layout; return the counts."""
    check_available()
    with tempfile.TemporaryDirectory(prefix=".autoround-", dir=out_dir) as work:
        saved = _autoround_checkpoint(Path(model_dir), recipe, samples, Path(work))
        return rewrite(saved, Path(model_dir), out_dir, recipe.bits, fmt)


def rewrite(saved: Path, source_dir: Path, out_dir: Path, bits: int, fmt: int) -> dict:
    """auto-round's integers, in tangquant's layout, with every other tensor from the source."""
    layers = {name: ql for name, ql, _ in GPTQCheckpoint.open(saved).layers()}
    # Biases come from the source (auto-round does not tune them here, and its export
    # gives every layer one); they are small, so they are read up front.
    biases = {name.rpartition(".")[0]: value for path in weight_files(source_dir)
              for name, value in iter_tensors(path)
              if name.endswith(".bias") and name.rpartition(".")[0] in layers}

    def pack(name):
        ql = layers[name]
        return (pack_layer(ql.q, ql.zeros, ql.scales, ql.g_idx, bits, bias=biases.get(name),
                           format_version=fmt), ql.q.numel())

    return write_packed(source_dir, out_dir, pack, layers,
                        metadata="tangquant (Intel neural-compressor autoround)")
