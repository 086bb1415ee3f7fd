"""Which engine quantizes: tangquant's layer-by-layer driver, or the algorithm's own whole-model runner.

All three write the same GPTQ checkpoint layout into the output directory; the
whole-model paths then measure fidelity on the written checkpoint, the layer
driver in its own pass (same metrics, tested equal).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from tangquant.calib import eval_samples
from tangquant.engines import entry
from tangquant.measure.kl import fidelity
from tangquant.quant.layer_by_layer import run_layer_wise
from tangquant.quant.recipe import QuantRecipe


def quantize_and_write(model_dir: Path, tmp: Path, r: QuantRecipe, packed, held, tokenizer):
    """(counts, fidelity or None, seconds). ``tmp`` already holds config.json and the
    tokenizer, so the written checkpoint can be evaluated."""
    samples = packed.samples if packed else []
    want_eval = bool(held) and r.eval_samples > 0
    held_ids = eval_samples(held, tokenizer, r.eval_samples, r.seq_len, r.seed) if want_eval else []
    t0 = time.perf_counter()
    if r.layer_by_layer:
        counts, fid = run_layer_wise(model_dir, tmp, r, samples, held_ids, r.format_version)
        return counts, fid, time.perf_counter() - t0
    counts = entry(r.algorithm.runner)(model_dir, tmp, r, samples, r.format_version)
    seconds = time.perf_counter() - t0
    gc.collect()
    return counts, fidelity(tmp, model_dir, held_ids) if want_eval else None, seconds
