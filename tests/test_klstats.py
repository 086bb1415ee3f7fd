"""llama.cpp's KL-divergence statistics, checked against a direct numpy computation.

The fixture is two sets of random next-token distributions over a small
vocabulary (one a perturbation of the other) and the tokens that came; every
number of the block is recomputed here from the definitions in llama.cpp's
``tools/perplexity/perplexity.cpp`` with independent numpy formulas (sample
standard deviations with ddof=1, ``np.cov``), not with the module's code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

N, VOCAB = 400, 50


pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def fixture_logprobs():
    rng = np.random.default_rng(7)
    ref = rng.normal(0, 2, (N, VOCAB))
    model = ref + rng.normal(0, 0.3, (N, VOCAB))

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ref, model = log_softmax(ref), log_softmax(model)
    # Tokens drawn from the reference, as text the reference models well would be.
    targets = np.array([rng.choice(VOCAB, p=np.exp(r)) for r in ref])
    return model.astype(np.float32), ref.astype(np.float32), targets


def _direct(model, ref, targets) -> dict:
    """The block from its definitions, in float64 numpy."""
    model, ref = model.astype(np.float64), ref.astype(np.float64)
    n = len(targets)
    nll_q = -model[np.arange(n), targets]
    nll_b = -ref[np.arange(n), targets]
    kld = (np.exp(ref) * (ref - model)).sum(-1)
    dp = np.exp(-nll_q) - np.exp(-nll_b)
    same = model.argmax(-1) == ref.argmax(-1)

    def sem(x):
        return np.std(x, ddof=1) / math.sqrt(n)

    cov = np.cov(nll_q, nll_b)[0, 1] / n  # covariance of the two means
    ln_ratio = nll_q.mean() - nll_b.mean()
    ln_ratio_err = math.sqrt(sem(nll_q) ** 2 + sem(nll_b) ** 2 - 2 * cov)
    ppl_q, ppl_b = math.exp(nll_q.mean()), math.exp(nll_b.mean())
    rms = math.sqrt((dp ** 2).mean())
    p = same.mean()
    out = {"ppl_model": ppl_q, "ppl_model_err": ppl_q * sem(nll_q),
           "ppl_reference": ppl_b, "ppl_reference_err": ppl_b * sem(nll_b),
           "ln_ppl_correlation": cov / (sem(nll_q) * sem(nll_b)),
           "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_err": ln_ratio_err,
           "ppl_ratio": math.exp(ln_ratio), "ppl_ratio_err": math.exp(ln_ratio) * ln_ratio_err,
           "ppl_diff": ppl_q - ppl_b,
           "ppl_diff_err": math.sqrt((ppl_q * sem(nll_q)) ** 2 + (ppl_b * sem(nll_b)) ** 2
                                     - 2 * ppl_q * ppl_b * cov),
           "kld": kld.mean(), "kld_err": sem(kld), "kld_max": kld.max(), "kld_min": kld.min(),
           "kld_median": np.median(kld), "dp_mean": dp.mean(), "dp_mean_err": sem(dp),
           "dp_rms": rms, "dp_rms_err": sem(dp ** 2) / (2 * rms), "dp_max": dp.max(), "dp_min": dp.min(),
           "same_top": p, "same_top_err": math.sqrt(p * (1 - p) / (n - 1))}
    srt = np.sort(kld)
    for key, frac in (("p99_9", 0.999), ("p99", 0.99), ("p95", 0.95), ("p90", 0.90), ("p10", 0.10),
                      ("p1", 0.01), ("p0_1", 0.001)):
        pos = frac * (n - 1)  # llama.cpp's percentile(): linear between neighbours
        lo = int(pos)
        out[f"kld_{key}"] = (1 - (pos - lo)) * srt[lo] + (pos - lo) * srt[min(lo + 1, n - 1)]
    out["dp_p75"] = float(np.percentile(dp, 75))
    out["dp_p25"] = float(np.percentile(dp, 25))
    return out


def _block(model, ref, targets, chunks: int = 1) -> dict:
    import torch

    from tangquant.measure.kl import token_values
    from tangquant.measure.klstats import TokenStats

    stats = TokenStats()
    for part in np.array_split(np.arange(len(targets)), chunks):
        stats.add(**token_values(torch.from_numpy(model[part]), torch.from_numpy(ref[part]),
                                 torch.from_numpy(targets[part])))
    return stats.summary(samples=chunks)


def test_block_matches_a_direct_computation(fixture_logprobs):
    model, ref, targets = fixture_logprobs
    got, want = _block(model, ref, targets), _direct(model, ref, targets)
    assert got["tokens"] == N
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    # The fixture is not degenerate: the model drifts, so every statistic is informative.
    assert 0.01 < got["kld"] < 1 and 0.3 < got["same_top"] < 1 and got["ppl_model"] > got["ppl_reference"]


def test_chunked_accumulation_equals_one_pass(fixture_logprobs):
    """The streamed fidelity pass adds chunks; the statistics must not depend on where they split."""
    model, ref, targets = fixture_logprobs
    one, many = _block(model, ref, targets), _block(model, ref, targets, chunks=7)
    for key, value in one.items():
        if key != "samples":
            assert many[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_identical_models_give_zero_kld_and_full_agreement(fixture_logprobs):
    _, ref, targets = fixture_logprobs
    m = _block(ref, ref, targets)
    assert m["kld"] == 0 and m["kld_max"] == 0 and m["kld_err"] == 0
    assert m["same_top"] == 1.0 and m["same_top_err"] == 0
    assert m["ppl_ratio"] == 1.0 and m["ln_ppl_ratio"] == 0 and m["dp_rms"] == 0 and m["dp_rms_err"] == 0


def test_few_tokens_have_no_error_bars_and_the_block_prints_like_llama_cpp(fixture_logprobs):
    from tangquant.measure.klstats import format_block

    model, ref, targets = fixture_logprobs
    few = _block(model[:5], ref[:5], targets[:5])
    assert few["kld_err"] is None and few["ppl_ratio_err"] is None and few["same_top_err"] is None
    text = "\n".join(format_block(few))
    assert "Mean    KLD:" in text and "± n/a" in text
    lines = format_block(_block(model, ref, targets))
    labels = [line.split(":")[0].rstrip() for line in lines]
    for label in ("Mean PPL(Q)", "Mean PPL(base)", "Mean ln(PPL(Q)/PPL(base))", "Mean PPL(Q)/PPL(base)",
                  "Mean PPL(Q)-PPL(base)", "Mean    KLD", "Maximum KLD", "99.9%   KLD", "99.0%   KLD",
                  "95.0%   KLD", "90.0%   KLD", "Median  KLD", "Minimum KLD", "RMS Δp", "Same top p"):
        assert labels.count(label) == 1, label
