"""One record from a candidate's rounds (``tangquant bench --rounds N``).

With rounds, every candidate runs in turn, N times over, each time in a fresh process with its
own warm-up and ``-r`` repetitions. A host whose speed drifts (a shared or thermally limited
machine: ±7% between runs minutes apart on the lent Xeon) then slows every candidate alike, where
running one candidate's repetitions back to back would charge the drift to whichever ran then.
"""

from __future__ import annotations

import statistics

from tangquant.measure.timing import summary


def pool(results: list[dict], prompt_tokens: int) -> dict:
    """The worker results of one candidate's rounds as one: runs pooled, the peak RSS the largest,
    the load time the median, and each round's own means kept under ``rounds``."""
    out = dict(results[0])
    runs = [run for res in results for run in res["runs"]]
    out.update(runs=runs, **summary(runs, prompt_tokens),
               peak_rss_bytes=max(res["peak_rss_bytes"] for res in results),
               load_s=statistics.median(res["load_s"] for res in results))
    out["rounds"] = [{"pp_tps": res["pp_tps"], "tg_tps": res["tg_tps"]} for res in results]
    return out
