"""Where a long quantization's time goes, phase by phase and layer by layer."""

from __future__ import annotations

import contextlib
import time
from collections import Counter

import torch


def untimed(_phase: str):
    """A clock that keeps no time (the stage functions' default)."""
    return contextlib.nullcontext()


class PhaseClock:
    """Wall seconds per phase of the layer loop, summed over layers, and each layer's total: where
    a long run's time goes (the progress bar shows the last layer's split, the metrics the sums)."""

    def __init__(self):
        self.total: Counter = Counter()
        self.layer: Counter = Counter()
        self.layers: list[float] = []
        self._open: list[list] = []  # [phase, since]: the innermost phase runs, the outer ones wait

    @contextlib.contextmanager
    def __call__(self, phase: str):
        """Clock ``phase``; a phase opened inside another takes its seconds out of the outer one
        (the Hessian updates inside the calibration forwards), so the phases add up to the wall."""
        self._pause()
        self._open.append([phase, time.perf_counter()])
        try:
            with torch.profiler.record_function(f"phase:{phase}"):  # for benchmarks/gptq_profile.py
                yield
        finally:
            self._pause()
            self._open.pop()
            if self._open:
                self._open[-1][1] = time.perf_counter()

    def _pause(self) -> None:
        if self._open:
            now = time.perf_counter()
            self.layer[self._open[-1][0]] += now - self._open[-1][1]
            self._open[-1][1] = now

    def next_layer(self) -> str:
        """Close the layer: fold it into the totals; return its split for the progress bar."""
        self.total.update(self.layer)
        self.layers.append(round(sum(self.layer.values()), 1))
        split = " ".join(f"{k} {v:.0f}s" for k, v in self.layer.items())
        self.layer = Counter()
        return split

    def report(self) -> dict:
        """The sums, phases outside the layer loop (the LM head and fidelity: "end") included."""
        return {"phase_seconds": {k: round(v, 1) for k, v in (self.total + self.layer).items()},
                "layer_seconds": self.layers}
