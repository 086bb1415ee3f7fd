"""The layer-by-layer driver's fidelity pass: KL statistics from final hidden states.

The driver runs the held-out samples through the source layers (``ref``) and
the quantized ones (``quant``) as it goes; only the final norm and LM head
(read from the source) are applied here, ``chunk`` positions at a time, so a
7B vocabulary's logits are never held for a whole sample, and only the
per-token values (:class:`~tangquant.measure.klstats.TokenStats`) are kept. The
result is the block ``tangquant eval`` reports on the written checkpoint.
"""

from __future__ import annotations

import torch

from tangquant.measure.kl import finite_metrics, token_values
from tangquant.measure.klstats import TokenStats


def _heads(source, skeleton) -> list:
    """[(final norm, LM head)] as stored in the source, then rounded to fp16 as the checkpoint holds them."""
    def norm(weight):
        n = type(skeleton.model.norm)(skeleton.config.hidden_size, eps=skeleton.config.rms_norm_eps)
        n.weight.data = weight.float()
        return n

    w_norm = source.get("model.norm.weight")
    head = source.get("lm_head.weight" if "lm_head.weight" in source.where else "model.embed_tokens.weight")
    return [(norm(w_norm), head), (norm(w_norm.to(torch.float16)), head.to(torch.float16))]


def _logits(hidden, weight, rows: int = 16384):
    """``hidden @ weight.T`` in fp32, upcasting ``rows`` vocabulary rows at a time: a 7B
    head in fp32 is 2.5 GB, in its stored 16 bits half that."""
    return torch.cat([hidden @ weight[v:v + rows].float().t() for v in range(0, weight.shape[0], rows)],
                     dim=-1)


def streamed_fidelity(source, skeleton, ref: list, quant: list, held: list, chunk: int = 128) -> dict:
    """``measure.kl.compare``'s block from final hidden states (``source``: a TensorReader)."""
    stats = TokenStats()
    with torch.no_grad():
        heads = _heads(source, skeleton)
        for r, q, ids in zip(ref, quant, held):
            for a in range(0, len(ids) - 1, chunk):
                b = min(a + chunk, len(ids) - 1)
                lps = [torch.log_softmax(_logits(norm(h[:, a:b])[0], w), dim=-1)
                       for (norm, w), h in zip(heads, (r, q))]
                stats.add(**token_values(lps[1], lps[0], ids[a + 1:b + 1]))
    return finite_metrics(stats.summary(len(held)))
