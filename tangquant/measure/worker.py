"""One measurement in a clean process: ``python -m tangquant.measure.worker SPEC_JSON``.

``tangquant bench`` and ``tune`` start one worker per measurement, so each one's peak RSS is its
own, and the seed baseline can run in another Python (the baseline environment, where
tangquant's dependencies are not installed: this module and what it imports at the top are
standard library only). The spec names what to run: ``call`` is a ``"module:function"`` entry
point — a bench runner from the engines table, the bandwidth kernel, the fidelity gate — that
takes the spec and returns a dict. The worker prints exactly one JSON line on stdout:
``{"ok": true, ...metrics}`` or ``{"ok": false, "error": "..."}``; progress goes to stderr.

Runner spec keys: ``call``, ``kind``, ``path``, ``options``, ``prompt_tokens``, ``gen_tokens``,
``repetitions``, ``warmup``, ``threads``, ``vocab``.
"""

from __future__ import annotations

import json
import os
import sys

from tangquant import host
from tangquant.engines import entry


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec = json.loads(argv[0])
        result = entry(spec["call"])(spec)
        result.update(ok=True, peak_rss_bytes=host.peak_rss_bytes(), pid=os.getpid(),
                      worker_versions=host.package_versions())
    except Exception as exc:  # the parent reports any failure as a failed candidate
        import traceback

        traceback.print_exc(file=sys.stderr)
        msg = str(exc).strip().splitlines()
        result = {"ok": False, "error": f"{type(exc).__name__}: {msg[0] if msg else ''}"[:500]}
    # The last stdout line is the result, whatever a library printed before it.
    print("\n" + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
