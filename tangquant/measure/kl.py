"""How far a model's next-token distributions drift from a reference's: KL divergence, top-1, perplexity.

``compare`` takes per-sample log-probabilities of the two models on the same
tokens and returns the perplexity of both, the mean KL(reference || model) and
its max, and the top-1 agreement; ``logprobs`` runs any model whose
``model(input_ids=...).logits`` works (PyTorch or optimum-intel's OpenVINO
model) over the samples.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path

import torch
from tqdm import tqdm

from tangquant import checkpoint, load
from tangquant.errors import InputError, NumericalError

_PATHS = (str, Path, load.ModelDir)


def logprobs(model, samples, desc: str) -> list:
    """Per-sample next-token log-probabilities [len-1, vocab] (fp32)."""
    out = []
    with torch.no_grad():
        for s in tqdm(samples, desc=desc, unit="sample", leave=False):
            ids = s.unsqueeze(0)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            logits = torch.as_tensor(logits)[0, :-1].float()
            checkpoint.require_finite(logits, f"the logits of sample {len(out)}",
                                      f"the {desc.removeprefix('eval ')}'s output",
                                      fix="the model is broken (NaN weights?); no metric is reported")
            out.append(torch.log_softmax(logits, dim=-1))
    return out


def compare(model_lp: list, ref_lp: list, samples: list) -> dict:
    nll_m = nll_r = kld_sum = kld_max = 0.0
    agree = n = 0
    for lm, lr, s in zip(model_lp, ref_lp, samples):
        if lm.shape != lr.shape:
            raise InputError(f"the models' vocabularies differ ({lm.shape[-1]} vs {lr.shape[-1]})")
        target = s[1:].unsqueeze(1)
        nll_m -= float(lm.gather(1, target).sum())
        nll_r -= float(lr.gather(1, target).sum())
        kl = (lr.exp() * (lr - lm)).sum(dim=-1).clamp_min(0)
        kld_sum += float(kl.sum())
        kld_max = max(kld_max, float(kl.max())) if bool(kl.isfinite().all()) else math.nan
        agree += int((lm.argmax(-1) == lr.argmax(-1)).sum())
        n += lm.shape[0]
    return finite_metrics({"samples": len(samples), "tokens": n, "ppl_model": _exp(nll_m / n),
                           "ppl_reference": _exp(nll_r / n), "kld": kld_sum / n, "kld_max": kld_max,
                           "top1_agreement": agree / n})


def _exp(x: float) -> float:
    return math.exp(x) if x < 709 else math.inf  # past that, math.exp raises OverflowError


def finite_metrics(metrics: dict) -> dict:
    """``metrics``, refused when a value is NaN or infinite: such a number must never be reported."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise NumericalError(f"the fidelity metrics {', '.join(bad)} are not finite "
                             f"({', '.join(f'{k}={metrics[k]}' for k in bad)}); a model's "
                             "log-probabilities hold NaN or Inf: it is broken (NaN weights?)")
    return metrics


def merge_parts(parts: list[dict], samples: int) -> dict:
    """:func:`compare` results of pieces of the same samples, combined token-weighted."""
    n = sum(p["tokens"] for p in parts)

    def weighted(key):
        return sum(p[key] * p["tokens"] for p in parts) / n

    return finite_metrics({"samples": samples, "tokens": n,
            "ppl_model": math.exp(sum(math.log(p["ppl_model"]) * p["tokens"] for p in parts) / n),
            "ppl_reference": math.exp(sum(math.log(p["ppl_reference"]) * p["tokens"] for p in parts) / n),
            "kld": weighted("kld"), "kld_max": max(p["kld_max"] for p in parts),
            "top1_agreement": weighted("top1_agreement")})


def fidelity(model, reference, samples: list) -> dict:
    """:func:`compare` of ``model`` against ``reference`` (each a path or a loaded model).

    Given paths, the reference is run and released before the model is loaded,
    so only one model is in memory at a time.
    """
    ref = load.logits_model(reference) if isinstance(reference, _PATHS) else reference
    ref_lp = logprobs(ref, samples, "eval reference")
    del ref
    gc.collect()
    mod = load.logits_model(model) if isinstance(model, _PATHS) else model
    return compare(logprobs(mod, samples, "eval model"), ref_lp, samples)
