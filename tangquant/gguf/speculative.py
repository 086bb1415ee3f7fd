"""Greedy speculative decoding with a draft model on llama.cpp's low-level API.

llama-cpp-python's ``Llama`` drafts only by prompt lookup; a draft *model* needs the
low-level calls, as llama.cpp's own ``llama-speculative`` makes them. One round:

1. the draft catches up on the tokens it has not seen (the target's last token, and any
   accepted draft token it never decoded) in one batch, then drafts ``k`` tokens greedily,
   one ``llama_decode`` each;
2. the target decodes its pending token and the ``k`` drafts in ONE batch, with logits for all
   ``k + 1`` positions (one read of its weights for up to ``k + 1`` tokens);
3. the longest prefix of drafts equal to the target's own argmax is accepted, plus the target's
   token after it (a correction, or a bonus when all ``k`` were accepted);
4. both KV caches forget the rejected positions (``llama_memory_seq_rm``).

The tokens are the target's greedy tokens by construction: each accepted draft equals the
target's argmax at its position, and the first that does not is replaced by it. (Exactly as in
one-token decoding only where the batched verification rounds like a one-token step does;
``tests/test_draft.py`` checks it on the fixtures, docs/benchmarks.md says where it was measured.)
"""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp as L
import numpy as np

from tangquant.gguf.runtime import LlamaCppError, Session


@dataclass
class Stats:
    """What a drafted generation did: counts summed over calls to :meth:`Speculator.greedy`."""

    tokens: int = 0          # tokens generated
    target_passes: int = 0   # target llama_decode calls, the prefill included
    drafted: int = 0         # draft tokens offered for verification
    accepted: int = 0        # of those, accepted
    draft_passes: int = 0    # draft llama_decode calls, its prefill and catch-ups included

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_pass(self) -> float | None:
        """Generated tokens per target forward pass (1.0 without a draft)."""
        return self.tokens / self.target_passes if self.target_passes else None

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "target_passes": self.target_passes, "drafted": self.drafted,
                "accepted": self.accepted, "draft_passes": self.draft_passes,
                "acceptance": self.acceptance, "tokens_per_pass": self.tokens_per_pass}


def _forget(session: Session, start: int) -> None:
    """Drop every KV entry at position >= ``start`` (sequence 0)."""
    if not L.llama_memory_seq_rm(L.llama_get_memory(session.ctx), 0, start, -1):
        raise LlamaCppError("llama.cpp could not trim the KV cache (a model without partial removal)")


class Speculator:
    """A target and a draft :class:`Session` (same vocabulary) drafting ``k`` tokens per round."""

    def __init__(self, target: Session, draft: Session, k: int):
        if k < 1:
            raise ValueError(f"draft tokens must be at least 1, got {k}")
        if draft.n_vocab > target.n_vocab:
            raise LlamaCppError(f"the draft's vocabulary ({draft.n_vocab}) is larger than the "
                                f"target's ({target.n_vocab})")
        self.target, self.draft, self.k = target, draft, k
        self.stats = Stats()

    def prefill(self, prompt: list[int]) -> int:
        """Both caches cleared and filled with ``prompt``; returns the target's first token."""
        self.target.clear()
        self.draft.clear()
        first = int(np.argmax(self.target.decode(prompt, 0)))
        self.draft.decode(prompt, 0)
        self._draft_past = len(prompt)
        self.stats.target_passes += 1
        self.stats.draft_passes += 1
        self.stats.tokens += 1
        return first

    def step(self, seq: list[int], budget: int) -> list[int]:
        """One round after ``seq`` (prompt + tokens so far, the last not yet decoded by the
        target): at most ``budget`` (>= 1) new tokens, the target's greedy tokens."""
        past = len(seq) - 1  # positions the target has decoded
        drafts = self._draft(seq, min(self.k, budget - 1))
        rows = self.target.decode([seq[-1]] + drafts, past, all_logits=True)
        best = np.argmax(rows, axis=1)
        m = 0
        while m < len(drafts) and drafts[m] == int(best[m]):
            m += 1
        if m < len(drafts):
            _forget(self.target, past + m + 1)
        if self._draft_past > past + m + 1:
            _forget(self.draft, past + m + 1)
            self._draft_past = past + m + 1
        new = drafts[:m] + [int(best[m])]
        self.stats.target_passes += 1
        self.stats.drafted += len(drafts)
        self.stats.accepted += m
        self.stats.tokens += len(new)
        return new

    def _draft(self, seq: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        logits = self.draft.decode(seq[self._draft_past:], self._draft_past)  # the catch-up
        self._draft_past = len(seq)
        out = [int(np.argmax(logits))]
        for _ in range(k - 1):
            logits = self.draft.decode([out[-1]], self._draft_past)
            self._draft_past += 1
            out.append(int(np.argmax(logits)))
        self.stats.draft_passes += k
        return out

    def greedy(self, prompt: list[int], n: int, stop_at_eog: bool = False, on_tokens=None) -> list[int]:
        """``n`` greedy tokens of the target after ``prompt`` (EOS ignored unless ``stop_at_eog``);
        ``on_tokens(list)`` is called with each round's new tokens (streaming)."""
        out = [self.prefill(prompt)]
        if on_tokens:
            on_tokens(out[:])
        while len(out) < n and not (stop_at_eog and self.target.eog(out[-1])):
            new = self.step(prompt + out, n - len(out))
            if stop_at_eog:
                end = next((i for i, t in enumerate(new) if self.target.eog(t)), None)
                if end is not None:
                    self.stats.tokens -= len(new) - end - 1
                    new = new[:end + 1]
            out += new
            if on_tokens:
                on_tokens(new)
        return out
