"""Stop signals: Ctrl-C, SIGTERM and SIGHUP end a run the same way, from any phase.

Each becomes a KeyboardInterrupt in the main thread, so every ``finally`` runs and temporary
outputs are removed on the way out; the run exits with the shell's code, 128 + the signal's
number (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP). Two things make "any phase" hold:

- A signal that arrives while a library whose C++ calls back into Python is on the stack
  (optimum-intel's and OpenVINO's conversion, NNCF) is held until control is back in
  tangquant's own code: raised inside such a callback it became that library's RuntimeError
  (an "export failed" with exit 2), or aborted the process ("terminate called after throwing
  an instance of 'pybind11::error_already_set'", nothing cleaned). A second signal while one is
  held is raised at once.
- A library that turns the interrupt into an error of its own anyway is still reported as
  interrupted: ``signum`` says a stop signal came.

Standard library only.
"""

from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Libraries whose C++ runs Python callbacks in the main thread (model conversion and tracing).
HOLD_IN = ("optimum", "openvino", "openvino_tokenizers", "nncf")


def _module(frame) -> str:
    return str(frame.f_globals.get("__name__", ""))


def _in_library(frame) -> bool:
    """Whether a frame of a :data:`HOLD_IN` library is on the stack from ``frame`` outwards."""
    while frame is not None:
        if _module(frame).partition(".")[0] in HOLD_IN:
            return True
        frame = frame.f_back
    return False


class Stop:
    """The handler of the stop signals for one run; ``signum`` is the last one that arrived."""

    def __init__(self):
        self.signum: int | None = None
        self.held = self.traced = False
        self.previous: dict = {}

    def __call__(self, signum, frame):
        self.signum = signum
        if frame is None or self.held or not _in_library(frame):
            self.held = False
            raise KeyboardInterrupt
        self.held = True
        self._raise_when_back(frame)

    def _raise_when_back(self, frame) -> None:
        """Trace tangquant's own frames (only them: a library's lines run untraced) and raise at
        the first line that runs with no held library below it."""
        def local(f, event, arg):
            if not self.held:
                return None
            if event == "line" and not _in_library(f):
                self.held = False
                sys.settrace(None)
                raise KeyboardInterrupt
            return local

        def calls(f, event, arg):
            return local if _module(f).startswith(("tangquant", "__main__")) else None

        while frame is not None:  # frames already running get their tracer here
            if _module(frame).startswith(("tangquant", "__main__")):
                frame.f_trace = local
            frame = frame.f_back
        self.traced = True
        sys.settrace(calls)

    def install(self, signals=SIGNALS) -> "Stop":
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
                    self.previous[sig] = signal.signal(sig, self)
        return self

    def restore(self) -> None:
        if self.traced:
            sys.settrace(None)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "Ctrl-C"
