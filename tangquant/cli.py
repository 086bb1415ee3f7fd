"""Command-line entry point: a thin argparse layer over the command modules.

Each command module offers ``HELP``, ``PARAMS`` (its stage's parameter
dataclass, from which the flags derive), ``add_arguments(parser)`` for its
inputs and outputs, and ``run(args)``, which returns the stage's metrics with
a one-line ``summary`` (and an optional multi-line ``report``) that only this
module prints. Command modules are light: they import their engine subpackage
when they run, so ``tangquant --help`` never loads torch or OpenVINO.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import signal
import sys
import traceback
import warnings

from tqdm import tqdm

from tangquant import __version__, host, interrupt, recipe
from tangquant.errors import TangquantError, first_line, is_utf8

# Loggers that report, at import, optional kernels a CPU install lacks (torchao's CUDA .so files and
# triton, torch's pytree deprecations): noise before a user's error line; shown with -v.
IMPORT_NOISE = ("torchao", "torch.utils._pytree")
MAX_MESSAGE = 1000

# (command, module) in the order they appear in --help: the pipeline first.
COMMANDS = (
    ("data", "tangquant.data"),
    ("merge", "tangquant.merge"),
    ("quantize", "tangquant.quantize"),
    ("eval", "tangquant.evaluate"),
    ("export", "tangquant.export"),
    ("check-template", "tangquant.check_template"),
    ("bench", "tangquant.bench"),
    ("tune", "tangquant.tune"),
    ("chat", "tangquant.chat"),
    ("serve", "tangquant.serve"),
    ("ovms-repo", "tangquant.ovms_repo"),
    ("run", "tangquant.pipeline"),
    ("demo", "tangquant.demo"),
    ("clean", "tangquant.clean"),
)


# Output options, accepted before the command and after it (where the command has no flag of
# that name: `eval --json FILE` keeps its own meaning).
GLOBAL_FLAGS = ((("-v", "--verbose"), "debug logging, and third-party warnings and logs"),
                (("-q", "--quiet"), "warnings and errors only"),
                (("--json",), "print the command's result as one JSON line instead of its summary"))


class _Parser(argparse.ArgumentParser):
    """argparse, with a hint for a flag spelled with underscores (LLaMA-Factory's style)."""

    def error(self, message):
        super().error(message + underscore_hint(self, message))


def underscore_hint(parser: argparse.ArgumentParser, message: str) -> str:
    """"; did you mean --group-size?" for an unrecognized --group_size that has a hyphenated flag."""
    if "unrecognized arguments" not in message and "ambiguous option" not in message:
        return ""
    known = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                known |= set(sp._option_string_actions)
    hints = []
    for token in message.split():
        flag = token.split("=", 1)[0].rstrip(",")
        if flag.startswith("--") and "_" in flag and flag.replace("_", "-") in known:
            hints.append(flag.replace("_", "-"))
    return f"; did you mean {', '.join(dict.fromkeys(hints))}? (flags use -, recipe keys _)" if hints else ""


def _global_flags(parser, top: bool) -> None:
    for names, help_text in GLOBAL_FLAGS:
        if any(n in parser._option_string_actions for n in names):
            continue
        parser.add_argument(*names, action="store_true", help=help_text,
                            **({} if top else {"default": argparse.SUPPRESS}))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tangquant",
        description="Merge a LoRA fine-tune of a Qwen chat model, quantize it to INT4 "
        "and ship it to Intel Xeon CPUs through OpenVINO.",
    )
    parser.add_argument("--version", action="version", version=f"tangquant {__version__}")
    _global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS:
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        sp = sub.add_parser(name, help=module.HELP, description=doc,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        if getattr(module, "PARAMS", None) is not None:
            recipe.add_flags(sp, module.PARAMS, getattr(module, "RECIPE_HELP", None),
                             recipe_flag=getattr(module, "RECIPE_FLAG", True))
        _global_flags(sp, top=False)
        sp.set_defaults(_run=module.run)
    return parser


def as_json(result: dict) -> str:
    """The result as one JSON line: what is data (numbers, text, lists, paths), not the objects a
    Python caller also gets (a checkpoint)."""
    return json.dumps(_plain(result), ensure_ascii=False, separators=(",", ":"))


def _plain(value):
    if isinstance(value, dict):
        out = {str(k): _plain(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _DROP}
    if isinstance(value, (list, tuple)):
        return [v for v in (_plain(x) for x in value) if v is not _DROP]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if getattr(value, "shape", None) == () and hasattr(value, "item"):  # a numpy or torch scalar
        return _plain(value.item())
    return _DROP


_DROP = object()


# Libraries that log through their own handlers (not propagating to the root logger), so their
# level is set on them; the others are held back by the console handler's filter.
OWN_HANDLERS = ("neural_compressor", "nncf", "transformers", "datasets", "evaluate", "torch")
# Libraries that set their loggers' level again when they are imported (inside a stage, after
# cli.main has configured logging) read it from these variables then: (default, with -v).
# A value the user set is kept.
IMPORT_TIME_LEVELS = {"TORCH_LOGS": ("-torch", None), "TRANSFORMERS_VERBOSITY": ("error", "info"),
                      "DATASETS_VERBOSITY": ("error", "info"), "EVALUATE_VERBOSITY": ("error", "info")}


def _configure_logging(verbose: bool, quiet: bool) -> None:
    """tangquant's own lines at INFO (WARNING with -q, DEBUG with -v); everything else only with -v.

    Third-party warnings and logs (torch, torchao, INC, transformers, NNCF, optimum, OpenVINO,
    lm_eval) are filtered where they come from — their loggers and Python's warning filters —
    and shown, at INFO, with -v. Log lines go through tqdm so they never break a progress bar.
    """
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    floor = logging.INFO if verbose else logging.ERROR  # for third-party records
    handler = _Console()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s" if verbose else "%(message)s"))
    handler.addFilter(_Ours(floor))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in OWN_HANDLERS:
        lg = logging.getLogger(name)
        lg.setLevel(floor)
        # INC sets its logger's level again when it is first imported (later, inside a stage),
        # so a filter holds the threshold; the previous call's filter is replaced.
        for f in [f for f in lg.filters if isinstance(f, _Floor)]:
            lg.removeFilter(f)
        lg.addFilter(_Floor(floor))
    for noisy in IMPORT_NOISE:
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)
    for var, values in IMPORT_TIME_LEVELS.items():
        if values[verbose] is not None:
            os.environ.setdefault(var, values[verbose])
    if verbose:
        warnings.simplefilter("default")
    else:
        warnings.filterwarnings("ignore")  # every library's warnings (TracerWarning, deprecations) …
        warnings.filterwarnings("default", module=r"tangquant(\.|$)")  # … but tangquant's own


class _Console(logging.Handler):
    """Writes to stderr through tqdm, which clears the bars above the line and redraws them."""

    def emit(self, record) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging's own contract: never raise from emit)
            self.handleError(record)


class _Ours(logging.Filter):
    """tangquant's records at the configured level; other libraries' only from ``floor`` up."""

    def __init__(self, floor: int):
        super().__init__()
        self.floor = floor

    def filter(self, record) -> bool:
        ours = record.name == "tangquant" or record.name.startswith(("tangquant.", "__main__"))
        return ours or record.levelno >= self.floor


class _Floor(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record) -> bool:
        return record.levelno >= self.level


def _interrupt_on_sigterm() -> interrupt.Stop:
    """Treat SIGTERM like Ctrl-C so temporary outputs are cleaned up on the way out."""
    return interrupt.Stop().install((signal.SIGTERM,))


def _interrupted(stop: interrupt.Stop) -> int:
    print(f"tangquant: interrupted ({stop.name}); no partial output was kept", file=sys.stderr)
    return stop.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    bad = next((i for i, a in enumerate(argv) if not is_utf8(a)), None)
    if bad is not None:  # a surrogate-escaped byte: nothing downstream could encode it again
        _error(f"argument {bad + 1} ({ascii(argv[bad])[:60]}) is not valid UTF-8; tangquant takes "
               "UTF-8 text and paths")
        return 2
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help/--version/usage errors
        return int(exc.code or 0)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    _configure_logging(args.verbose, args.quiet)
    stop = interrupt.Stop().install()  # Ctrl-C, SIGTERM, SIGHUP: 128 + N from any phase
    try:
        result = args._run(args) or {}
        if getattr(args, "json", False) is True:
            print(as_json(result))
            return int(result.get("exit_code", 0))
        if result.get("report"):
            print(result["report"])
        if result.get("summary"):
            print(result["summary"])
        return int(result.get("exit_code", 0))
    except KeyboardInterrupt:
        return _interrupted(stop)
    except TangquantError as exc:
        if stop.signum:  # a library turned the interrupt into its own error
            return _interrupted(stop)
        _error(str(exc))
        return 2
    except Exception as exc:  # no input may end in a traceback at default verbosity
        return _interrupted(stop) if stop.signum else _unexpected(exc, args.verbose)
    finally:
        stop.restore()


def _unexpected(exc: Exception, verbose: bool) -> int:
    """One line for an error no check anticipated; the traceback with -v. Exit 1: likely a bug."""
    if verbose:
        traceback.print_exc()
    hint = "" if verbose else " (rerun with -v for the traceback)"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # a writer outside files' outputs
        _error(host.no_space(exc.filename or os.getcwd()))
        return 2
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        _error(f"{exc.strerror or first_line(exc)}{where}{hint}")
        return 2
    if isinstance(exc, MemoryError):
        _error(f"out of memory{hint}")
        return 2
    if isinstance(exc, RecursionError):
        _error(f"an input is nested too deeply to read{hint}")
        return 2
    _error(f"unexpected {type(exc).__name__}: {first_line(exc)}; this is probably a bug in "
           f"tangquant{hint}")
    return 1


def _error(message: str) -> None:
    line = " ".join(message.split())  # one line, whatever a library's message held
    if len(line) > MAX_MESSAGE:
        line = line[:MAX_MESSAGE] + "…"
    print(f"tangquant: error: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())
