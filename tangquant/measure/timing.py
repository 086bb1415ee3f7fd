"""What every bench runner shares: the prompts it feeds, how its repetitions are run and summed up.

Standard library only (runners import it in the seed baseline's Python too). A run is pp (prefill
of ``-p`` random ids; TTFT) then tg (``-n − 1`` single-token steps; tpot = (total − TTFT) / (n − 1)),
after an uncounted warm-up that checks the output is complete and finite.
"""

from __future__ import annotations

import random
import statistics
import sys
import time


def log(msg: str) -> None:
    print(f"[bench_worker] {msg}", file=sys.stderr, flush=True)


def prompt_ids(vocab: int, n: int, run: int) -> list[int]:
    """Pseudo-random token ids, different for every run (tokenization is excluded, as in llama-bench).

    A new prompt each run matters: openvino-genai's default pipeline caches prefixes, and a
    repeated prompt would be served from that cache, measuring one token instead of a prefill.
    """
    rng = random.Random(1234 + run)
    return [rng.randrange(3, max(4, vocab)) for _ in range(n)]


def summary(runs: list[dict], p: int) -> dict:
    """Mean ± sd of pp and tg over ``runs`` (llama-bench's form) with the medians beside them."""
    def ms(key):
        vals = [r[key] for r in runs]
        return statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0

    pp = [p / (r["ttft_ms"] / 1000) for r in runs]
    tg = [1000 / r["tpot_ms"] for r in runs]
    out = {"pp_tps": statistics.fmean(pp), "pp_tps_std": statistics.pstdev(pp) if len(pp) > 1 else 0.0,
           "tg_tps": statistics.fmean(tg), "tg_tps_std": statistics.pstdev(tg) if len(tg) > 1 else 0.0,
           # the medians stay beside the means for noisy hosts (one slow run)
           "pp_tps_median": statistics.median(pp), "tg_tps_median": statistics.median(tg)}
    out["ttft_ms"], out["ttft_ms_std"] = ms("ttft_ms")
    out["tpot_ms"], out["tpot_ms_std"] = ms("tpot_ms")
    if any("drafted" in r for r in runs):
        out.update(speculation(runs))
    return out


def speculation(runs: list[dict]) -> dict:
    """A drafted candidate's acceptance (accepted / offered draft tokens) and tokens per target
    step (generated tokens / target forward passes, the prefill included: 1.0 without a draft),
    summed over ``runs``."""
    drafted, accepted = (sum(r.get(k, 0) for r in runs) for k in ("drafted", "accepted"))
    generated, passes = (sum(r.get(k, 0) for r in runs) for k in ("generated", "target_passes"))
    return {"draft_acceptance": accepted / drafted if drafted else None,
            "tokens_per_step": generated / passes if passes else None,
            "drafted": drafted, "accepted": accepted}


def repeat(once, spec: dict) -> tuple[list[dict], dict]:
    """``once(run, check)`` for the uncounted warm-up (checked: tokens and finite logits), then for
    each repetition; returns the timed runs and the last warm-up's result."""
    warm = max(1, spec["warmup"])
    for w in range(warm):
        checked = once(w, check=True)
    runs = []
    for i in range(spec["repetitions"]):
        runs.append(once(warm + i, check=False))
        runs[-1].pop("tokens")
        log(f"rep {i + 1}: ttft {runs[-1]['ttft_ms']:.1f} ms, tpot {runs[-1]['tpot_ms']:.2f} ms")
    return runs, checked


def check_tokens(tokens, n: int) -> None:
    if len(tokens) != n:
        raise RuntimeError(f"produced {len(tokens)} of {n} tokens (empty or short output)")


def greedy_run(prefill, step, n: int, check: bool) -> dict:
    """One timed run: ``prefill()`` (TTFT: the prompt and the first token) then ``step(token, i)``
    for the i-th single-token step until ``n`` tokens, each returning ``(token, finite)``; ``step``
    returns None when the engine ends early. The warm-up (``check``) also refuses a short output or
    non-finite logits."""
    t0 = time.perf_counter()
    token, finite = prefill()
    t1 = time.perf_counter()
    tokens, bad = [token], int(not finite)
    while len(tokens) < n:
        out = step(tokens[-1], len(tokens) - 1)
        if out is None:
            break
        tokens.append(out[0])
        bad += int(check and not out[1])
    t2 = time.perf_counter()
    check_tokens(tokens, n)
    if check and bad:
        raise RuntimeError(f"NaN/Inf logits at {bad} of {n} steps")
    return {"ttft_ms": (t1 - t0) * 1000, "tpot_ms": (t2 - t1) * 1000 / max(1, n - 1), "tokens": tokens[:16]}
