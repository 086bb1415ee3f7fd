"""The statistics ``llama-perplexity --kl-divergence`` prints, from per-token values.

llama.cpp compares a model Q with a base on the same tokens and prints three
blocks: perplexity (PPL(Q), PPL(base), their correlation, ratio, ln-ratio and
difference, each with its standard error), KL divergence (mean ± error and
percentiles) and token probability (Δp = p_Q − p_base of the token that came:
mean, percentiles, RMS; and how often both models put the same token on top).
This module computes the same numbers with the same definitions
(``tools/perplexity/perplexity.cpp``, ``kl_divergence``): a mean's error is
``sqrt((E[x²] − E[x]²) / (n − 1))`` (the sample standard deviation over
``sqrt(n)``), percentiles interpolate linearly between sorted values at
``fraction · (n − 1)``, errors propagate to first order (the ppl ratio's error
uses the covariance of the two models' per-token log-likelihoods). Two
differences, both on purpose: the KL sum runs over the whole vocabulary in
fp32 (llama.cpp drops base log-probabilities below −16 and stores them in 16
bits, which is why its minimum KLD can be negative), and an error is ``None``
for 10 tokens or fewer where llama.cpp prints 0.

:class:`TokenStats` keeps five numbers per token (33 bytes), never logits, so
a pass can stream chunks of any model size into it. numpy only.
"""

from __future__ import annotations

import math

import numpy as np

FIELDS = ("nll_model", "nll_reference", "kld", "p_diff", "same_top")
# (key suffix, label as llama.cpp prints it, fraction) of the KLD block, top to bottom.
KLD_QUANTILES = (("max", "Maximum", 1.0), ("p99_9", "99.9%  ", 0.999), ("p99", "99.0%  ", 0.99),
                 ("p95", "95.0%  ", 0.95), ("p90", "90.0%  ", 0.90), ("median", "Median ", 0.5),
                 ("p10", "10.0%  ", 0.10), ("p5", " 5.0%  ", 0.05), ("p1", " 1.0%  ", 0.01),
                 ("p0_1", " 0.1%  ", 0.001), ("min", "Minimum", 0.0))
DP_QUANTILES = KLD_QUANTILES[:5] + (("p75", "75.0%  ", 0.75),) + KLD_QUANTILES[5:6] + \
    (("p25", "25.0%  ", 0.25),) + KLD_QUANTILES[6:]
MIN_TOKENS_FOR_ERRORS = 11  # llama.cpp: "count > 10"


class TokenStats:
    """Per-token values of one model-vs-reference comparison, added chunk by chunk."""

    def __init__(self):
        self._parts: dict[str, list[np.ndarray]] = {k: [] for k in FIELDS}

    def add(self, nll_model, nll_reference, kld, p_diff, same_top) -> None:
        values = {"nll_model": nll_model, "nll_reference": nll_reference, "kld": kld,
                  "p_diff": p_diff, "same_top": same_top}
        arrays = {k: np.asarray(v, dtype=bool if k == "same_top" else np.float64).reshape(-1)
                  for k, v in values.items()}
        if len({a.shape[0] for a in arrays.values()}) != 1:
            raise ValueError("per-token arrays of different lengths")
        for k, a in arrays.items():
            self._parts[k].append(a)

    @property
    def tokens(self) -> int:
        return sum(a.shape[0] for a in self._parts["kld"])

    def values(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) if v else np.zeros(0) for k, v in self._parts.items()}

    def summary(self, samples: int) -> dict:
        return kl_statistics(**self.values(), samples=samples)


def mean_and_error(x: np.ndarray) -> tuple[float, float | None]:
    """Mean and its standard error, as llama.cpp's ``mean_and_uncertainty``."""
    n = x.shape[0]
    mean = float(x.mean())
    if n < MIN_TOKENS_FOR_ERRORS:
        return mean, None
    return mean, math.sqrt(max(float(x.var()), 0.0) / (n - 1))


def _covariance_of_means(a: np.ndarray, b: np.ndarray) -> float | None:
    """llama.cpp's ``covariance``: (E[ab] − E[a]E[b]) / (n − 1)."""
    n = a.shape[0]
    if n < MIN_TOKENS_FOR_ERRORS:
        return None
    return float(((a - a.mean()) * (b - b.mean())).mean()) / (n - 1)


def quantiles(x: np.ndarray, table=KLD_QUANTILES) -> dict[str, float]:
    """{suffix: value}; linear interpolation at fraction · (n − 1), as llama.cpp's ``percentile``."""
    fractions = [f for _, _, f in table]
    return {key: float(v) for (key, _, _), v in zip(table, np.quantile(x, fractions))}


def _scaled(err: float | None, factor: float) -> float | None:
    return None if err is None else err * factor


def _perplexity(nll_m: np.ndarray, nll_r: np.ndarray) -> dict:
    lm, em = mean_and_error(nll_m)
    lr, er = mean_and_error(nll_r)
    cov = _covariance_of_means(nll_m, nll_r)
    ppl_m, ppl_r = math.exp(lm), math.exp(lr)
    out = {"ppl_model": ppl_m, "ppl_model_err": _scaled(em, ppl_m),
           "ppl_reference": ppl_r, "ppl_reference_err": _scaled(er, ppl_r),
           "ln_ppl_correlation": None, "ln_ppl_ratio": lm - lr, "ln_ppl_ratio_err": None,
           "ppl_ratio": math.exp(lm - lr), "ppl_ratio_err": None, "ppl_diff": ppl_m - ppl_r,
           "ppl_diff_err": None}
    if cov is None:
        return out
    if em and er:
        out["ln_ppl_correlation"] = cov / (em * er)
    ln_err = math.sqrt(max(em * em + er * er - 2 * cov, 0.0))
    out["ln_ppl_ratio_err"] = ln_err
    out["ppl_ratio_err"] = out["ppl_ratio"] * ln_err
    diff_var = (ppl_m * em) ** 2 + (ppl_r * er) ** 2 - 2 * ppl_m * ppl_r * cov
    out["ppl_diff_err"] = math.sqrt(max(diff_var, 0.0))
    return out


def kl_statistics(nll_model, nll_reference, kld, p_diff, same_top, samples: int) -> dict:
    """Every number of llama.cpp's three blocks, under flat JSON keys (fractions, not percent)."""
    n = int(np.asarray(kld).shape[0])
    if n == 0:
        raise ValueError("no tokens to compare")
    kld, p_diff = np.asarray(kld, np.float64), np.asarray(p_diff, np.float64)
    out = {"samples": samples, "tokens": n,
           **_perplexity(np.asarray(nll_model, np.float64), np.asarray(nll_reference, np.float64))}
    out["kld"], out["kld_err"] = mean_and_error(kld)
    out.update({f"kld_{k}": v for k, v in quantiles(kld).items()})
    out["dp_mean"], out["dp_mean_err"] = mean_and_error(p_diff)
    out.update({f"dp_{k}": v for k, v in quantiles(p_diff, DP_QUANTILES).items()})
    mse, mse_err = mean_and_error(p_diff * p_diff)
    out["dp_rms"] = math.sqrt(mse)
    out["dp_rms_err"] = None if mse_err is None else 0.0 if mse == 0 else 0.5 / out["dp_rms"] * mse_err
    same = float(np.asarray(same_top, bool).mean())
    out["same_top"] = same
    out["same_top_err"] = math.sqrt(same * (1 - same) / (n - 1)) if n >= MIN_TOKENS_FOR_ERRORS else None
    out["top1_agreement"] = same  # the name tangquant used before the llama.cpp block
    return out


def _pm(value: float, err: float | None, fmt: str, err_fmt: str | None = None) -> str:
    shown = format(value, fmt)
    return f"{shown} ± {'n/a' if err is None else format(err, err_fmt or fmt)}"


def format_block(m: dict) -> list[str]:
    """The three blocks as llama-perplexity prints them (Q = model, base = reference)."""
    pct = lambda x: 100.0 * x  # noqa: E731
    cor = m.get("ln_ppl_correlation")
    lines = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {_pm(m['ppl_model'], m['ppl_model_err'], '10.6f')}",
             f"Mean PPL(base)                : {_pm(m['ppl_reference'], m['ppl_reference_err'], '10.6f')}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {'n/a' if cor is None else format(100 * cor, '6.2f') + '%'}",
             f"Mean ln(PPL(Q)/PPL(base))     : {_pm(m['ln_ppl_ratio'], m['ln_ppl_ratio_err'], '10.6f')}",
             f"Mean PPL(Q)/PPL(base)         : {_pm(m['ppl_ratio'], m['ppl_ratio_err'], '10.6f')}",
             f"Mean PPL(Q)-PPL(base)         : {_pm(m['ppl_diff'], m['ppl_diff_err'], '10.6f')}",
             "", "====== KL divergence statistics ======",
             f"Mean    KLD: {_pm(m['kld'], m['kld_err'], '10.6f')}"]
    lines += [f"{label} KLD: {m['kld_' + key]:10.6f}" for key, label, _ in KLD_QUANTILES]
    lines += ["", "====== Token probability statistics ======",
              f"Mean    Δp: {_pm(pct(m['dp_mean']), _scaled(m['dp_mean_err'], 100), '6.3f', '5.3f')} %"]
    lines += [f"{label} Δp: {pct(m['dp_' + key]):6.3f}%" for key, label, _ in DP_QUANTILES]
    lines += [f"RMS Δp    : {_pm(pct(m['dp_rms']), _scaled(m['dp_rms_err'], 100), '6.3f', '5.3f')} %",
              f"Same top p: {_pm(pct(m['same_top']), _scaled(m['same_top_err'], 100), '6.3f', '5.3f')} %"]
    return lines
