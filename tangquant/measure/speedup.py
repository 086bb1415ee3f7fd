"""The decode speed-up a draft would give: a PROJECTION from measured parts, never a measurement.

A round of speculative decoding drafts K tokens (K draft steps), then verifies them with the
target's own next token in one target forward pass of K + 1 tokens. If a round yields E tokens on
average (the accepted drafts, plus the target's correction or bonus token), then

    decode tokens/s with the draft   =  E / (t_verify(K) + K · t_draft)
    speed-up over plain decoding     =  E · t_target / (t_verify(K) + K · t_draft)

where t_target is one plain decode step of the target (one token), t_verify(K) one target step of
K + 1 tokens and t_draft one draft step, all measured in the same engine on the same machine.
E is measured too, by the pair on its prompts (greedy: deterministic); E = tokens per round =
(generated − 1) / (target passes − 1), the prefill's pass and token left out. For comparison,
with a per-token acceptance α independent from token to token, E = (1 − α^(K+1)) / (1 − α)
(Leviathan et al., 2023): :func:`expected_tokens`.

What a projection leaves out: the draft's catch-up (its first step of a round decodes one or two
tokens, counted here as one step), the sampling and bookkeeping between passes, and any cost of
trimming the KV cache; and E transfers only where the pair accepts as the measured pair did.
"""

from __future__ import annotations


def tokens_per_round(generated: int, target_passes: int) -> float:
    """E from a drafted run's counts: tokens per verification round (prefill left out)."""
    if target_passes < 2:
        raise ValueError("a drafted run needs at least one verification round")
    return (generated - 1) / (target_passes - 1)


def expected_tokens(alpha: float, k: int) -> float:
    """E for a per-token acceptance ``alpha`` independent from token to token."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def project(e: float, k: int, t_target_ms: float, t_verify_ms: float, t_draft_ms: float) -> dict:
    """Projected decode tokens/s with a draft, plain tokens/s and their ratio (see the module)."""
    round_ms = t_verify_ms + k * t_draft_ms
    tps = 1000 * e / round_ms
    plain = 1000 / t_target_ms
    return {"k": k, "tokens_per_round": e, "round_ms": round_ms, "projected_tps": tps,
            "plain_tps": plain, "projected_speedup": tps / plain, "label": "projection"}
