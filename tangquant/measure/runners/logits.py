"""The greedy pick from one step's logits, shared by the runners that hold the logits themselves."""

from __future__ import annotations

import numpy as np


def pick(logits, check: bool) -> tuple[int, bool]:
    """(the argmax token, whether the logits are finite; only looked at when ``check``)."""
    return int(np.argmax(logits)), bool(not check or np.isfinite(logits).all())
