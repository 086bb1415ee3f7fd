"""How far a model's next-token distributions drift from a reference's, as llama.cpp measures it.

:func:`token_values` turns the log-probabilities of the two models on the same
tokens into the per-token numbers ``llama-perplexity --kl-divergence`` works
from (each model's NLL, KL(reference ‖ model), Δp of the token that came,
same top token); :func:`compare` gathers them and returns the whole block
(:mod:`tangquant.measure.klstats`); :func:`logprobs` runs any model whose
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
from tangquant.measure.klstats import TokenStats

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


def token_values(model_lp, ref_lp, targets) -> dict:
    """Per-token values of ``model_lp`` against ``ref_lp`` ([n, vocab] log-probabilities) for
    the tokens that came, ``targets`` [n]: the keyword arguments of ``TokenStats.add``."""
    if model_lp.shape != ref_lp.shape:
        raise InputError(f"the models' vocabularies differ ({model_lp.shape[-1]} vs {ref_lp.shape[-1]})")
    t = targets.reshape(-1, 1)
    nll_m = -model_lp.gather(1, t)[:, 0].double()
    nll_r = -ref_lp.gather(1, t)[:, 0].double()
    kld = (ref_lp.exp() * (ref_lp - model_lp)).sum(dim=-1)
    return {"nll_model": nll_m.numpy(), "nll_reference": nll_r.numpy(), "kld": kld.double().numpy(),
            "p_diff": (torch.exp(-nll_m) - torch.exp(-nll_r)).numpy(),
            "same_top": (model_lp.argmax(-1) == ref_lp.argmax(-1)).numpy()}


def compare(model_lp: list, ref_lp: list, samples: list) -> dict:
    """The llama.cpp KL block of per-sample log-probabilities on ``samples`` (token ids)."""
    stats = TokenStats()
    for lm, lr, s in zip(model_lp, ref_lp, samples):
        stats.add(**token_values(lm, lr, s[1:]))
    return finite_metrics(stats.summary(len(samples)))


def finite_metrics(metrics: dict) -> dict:
    """``metrics``, refused when a value is NaN or infinite: such a number must never be reported."""
    # The KL divergence first: it is the number a reader looks for.
    bad = sorted((k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)),
                 key=lambda k: not k.startswith("kld"))
    if bad:
        raise NumericalError(f"the fidelity metrics {', '.join(bad[:4])} are not finite "
                             f"({', '.join(f'{k}={metrics[k]}' for k in bad[:4])}); a model's "
                             "log-probabilities hold NaN or Inf: it is broken (NaN weights?)")
    return metrics


def fidelity(model, reference, samples: list, reference_adapter=None) -> dict:
    """:func:`compare` of ``model`` against ``reference`` (each a path or a loaded model;
    ``reference_adapter``: a peft LoRA on a reference path).

    Given paths, the reference is run and released before the model is loaded,
    so only one model is in memory at a time.
    """
    ref = (load.logits_model(reference, adapter=reference_adapter) if isinstance(reference, _PATHS)
           else reference)
    ref_lp = logprobs(ref, samples, "eval reference")
    del ref
    gc.collect()
    mod = load.logits_model(model) if isinstance(model, _PATHS) else model
    return compare(logprobs(mod, samples, "eval model"), ref_lp, samples)
