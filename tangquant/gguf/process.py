"""The parent's side of the llama.cpp process (:mod:`tangquant.gguf.child`): requests in, events out.

llama.cpp runs in a child process for ``chat`` and ``serve``, as it does for the export's check
and the bench: a segfault in llama.cpp (its CPU repacking crashed an AMX Xeon, 2026-12-02) or an
abort on a bad grammar must fail the requests it was running, never the server. When the child
dies, every request it held ends with an error naming how, and a new child loads the model; the
requests that come after run in it.

Standard library only: a writer thread sends requests (a caller never blocks on a full pipe), a
reader thread hands each event to its request's handler (called on that thread), a third logs
the child's stderr at DEBUG.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from tangquant import files
from tangquant.errors import TangquantError

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 600.0


class LlamaProcessError(TangquantError):
    """llama.cpp could not load the model, or its process cannot be restarted."""


class LlamaProcess:
    """One llama.cpp child with ``n_seqs`` sequences of ``n_ctx`` tokens each.

    ``info`` is the child's ready message (``n_ctx_seq``: the context each sequence really got;
    ``finite``: whether the logits of the ``probe`` prompt, decoded at load, were all finite).
    :meth:`submit` returns a request id; its handler receives the child's events (``queued`` or
    ``refused``, ``started``, ``tokens``, and last ``done`` with an ``error`` when it failed).
    """

    def __init__(self, path, threads: int | None = None, options: dict | None = None,
                 n_ctx: int = 2048, n_seqs: int = 1, n_batch: int = 512, probe: str | None = None):
        self.spec = {"path": str(path), "threads": threads, "options": dict(options or {}),
                     "n_ctx": int(n_ctx), "n_seqs": int(n_seqs), "n_batch": int(n_batch), "probe": probe}
        self.restarts, self.broken = 0, None
        self._cv = threading.Condition()
        self._handlers: dict[int, Callable[[dict], None]] = {}
        self._ids = itertools.count(1)
        self._outbox: collections.deque = collections.deque()
        self._closing = False
        self.proc = self._spawn()
        self._writer = threading.Thread(target=self._write, name="tangquant-llama-write", daemon=True)
        self._writer.start()

    # -- requests ------------------------------------------------------------------------------
    def submit(self, prompt: list[int], max_new: int, handler: Callable[[dict], None],
               sampling: dict | None = None, stop_ids=(), ignore_eos: bool = False,
               schema: str | None = None, logprobs: int | None = None) -> int:
        """``logprobs``: None, or how many alternatives each ``tokens`` event's log-probabilities
        carry (the child's ``logprobs`` field)."""
        msg = {"op": "start", "prompt": [int(t) for t in prompt], "max_new": int(max_new),
               "sampling": sampling or {}, "stop_ids": sorted(set(map(int, stop_ids))),
               "ignore_eos": bool(ignore_eos), "schema": schema, "logprobs": logprobs}
        with self._cv:
            if self.broken:
                raise LlamaProcessError(self.broken)
            rid = msg["id"] = next(self._ids)
            self._handlers[rid] = handler
            self._outbox.append(msg)
            self._cv.notify_all()
        return rid

    def cancel(self, rid: int) -> None:
        with self._cv:
            if rid in self._handlers:
                self._outbox.append({"op": "cancel", "id": rid})
                self._cv.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            proc = self.proc
        try:
            proc.stdin.close()  # the child ends at the end of its input
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        self._writer.join(timeout=10)

    # -- the child -------------------------------------------------------------------------------
    def _spawn(self) -> subprocess.Popen:
        env = files.child_env(**({"OMP_NUM_THREADS": str(self.spec["threads"])} if self.spec["threads"] else {}))
        proc = subprocess.Popen([sys.executable, "-m", "tangquant.gguf.child", json.dumps(self.spec)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env)
        tail: collections.deque[str] = collections.deque(maxlen=5)
        threading.Thread(target=self._log, args=(proc, tail), name="tangquant-llama-log", daemon=True).start()
        ready = self._first_line(proc)
        if not ready.get("ready"):
            proc.kill()
            proc.wait()
            why = ready.get("fatal") or _died(proc, tail)
            raise LlamaProcessError(f"llama.cpp cannot run {Path(self.spec['path']).name}: {why}")
        self.info = ready
        threading.Thread(target=self._read, args=(proc, tail), name="tangquant-llama-read",
                         daemon=True).start()
        return proc

    def _first_line(self, proc) -> dict:
        end = time.monotonic() + LOAD_TIMEOUT_S
        while time.monotonic() < end:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                return json.loads(line) if line.strip() else {}
        return {"fatal": f"no answer within {LOAD_TIMEOUT_S:.0f} s"}

    def _log(self, proc, tail) -> None:
        with proc.stderr:
            for raw in proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    tail.append(line)
                    logger.debug("llama.cpp process %d: %s", proc.pid, line)

    def _read(self, proc, tail) -> None:
        with proc.stdout:
            for line in proc.stdout:
                msg = json.loads(line)
                with self._cv:
                    final = "done" in msg or "refused" in msg
                    handler = (self._handlers.pop if final else self._handlers.get)(msg.get("id"), None)
                if handler is not None:
                    handler(msg)
        proc.wait()
        try:
            proc.stdin.close()
        except OSError:  # a write to the dead child was still buffered
            pass
        with self._cv:
            if self._closing:
                return
            pending, self._handlers = self._handlers, {}
        why = _died(proc, tail)
        logger.error("the llama.cpp process %s; %d request(s) failed with it; loading the model again",
                     why, len(pending))
        for rid, handler in pending.items():
            handler({"id": rid, "done": "cancelled", "error": f"the llama.cpp process {why}"})
        self._respawn(why)

    def _respawn(self, why: str) -> None:
        try:
            new = self._spawn()
        except LlamaProcessError as exc:
            with self._cv:
                self.broken = f"the llama.cpp process {why} and could not be restarted: {exc}"
                failed, self._handlers = self._handlers, {}
                self._cv.notify_all()
            for rid, handler in failed.items():
                handler({"id": rid, "done": "cancelled", "error": self.broken})
            return
        with self._cv:
            self.proc, self.restarts = new, self.restarts + 1
            self._cv.notify_all()

    def _write(self) -> None:
        """Send what callers queued, in order; a message for a dead child waits for the next one."""
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._outbox or self._closing)
                if self._closing:
                    return
                msg, proc = self._outbox[0], self.proc
                if msg["op"] == "start" and msg["id"] not in self._handlers:
                    self._outbox.popleft()  # it already failed with a dead child
                    continue
            try:
                proc.stdin.write((json.dumps(msg) + "\n").encode())
                proc.stdin.flush()
            except (OSError, ValueError):  # the child died (its stdin may be closed by now): the
                # reader fails its requests and starts another
                with self._cv:
                    self._cv.wait_for(lambda: self.proc is not proc or self._closing or self.broken,
                                      timeout=LOAD_TIMEOUT_S)
                    if self.broken:
                        self._outbox.clear()
                continue
            with self._cv:
                self._outbox.popleft()


def _died(proc, tail) -> str:
    code = proc.returncode
    how = f"crashed (signal {-code})" if code is not None and code < 0 else f"exited with code {code}"
    return how + (f": {tail[-1][:300]}" if tail and code and code > 0 else "")
