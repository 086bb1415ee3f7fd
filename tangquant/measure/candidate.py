"""A bench candidate: ``NAME=KIND:PATH[,key=value...]``, checked against the engines table, or
``NAME=deploy:DIR``, what a deployment directory runs.

Parsing refuses, before any run, an unknown kind, an option the kind does not take (or ignores),
a bad value and a missing required option; :func:`resolve` then checks the model once (its
format against the kind's, its adapter directory) and keeps what the runs need.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from tangquant import deploy, draft, engines, load
from tangquant.errors import BenchError, EngineError
from tangquant.files import existing_dir

logger = logging.getLogger(__name__)
DEPLOY = "deploy"  # NAME=deploy:DIR benches what a deployment (tangquant tune --apply) runs


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    kind: str
    path: str
    options: dict

    @property
    def engine(self) -> engines.Engine:
        return engines.get(self.kind)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A candidate whose model was checked once: the file or directory its runner reads, and
    the config its context and vocabulary come from."""

    candidate: Candidate
    model: Path
    config: dict


def parse_candidate(text: str) -> Candidate:
    """``NAME=KIND:PATH[,key=value...]`` -> Candidate (the path need not exist yet)."""
    name, sep, rest = str(text).partition("=")
    kind, sep2, rest = rest.partition(":")
    if not (sep and sep2 and name.strip() and rest):
        raise BenchError(f"candidate {text!r} must look like NAME=KIND:PATH[,key=value...]")
    path, *pairs = rest.split(",")
    if kind == DEPLOY:
        return _deployed(name.strip(), path, pairs)
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not (eq and key.strip()):
            raise BenchError(f"candidate {name}: option {pair!r} must be key=value")
        options[key.strip()] = value.strip()
    try:
        options = engines.get(kind).check_options(options)
    except EngineError as exc:
        raise BenchError(f"candidate {name}: {exc}") from None
    return Candidate(name.strip(), kind, path, options)


def _deployed(name: str, path: str, pairs: list[str]) -> Candidate:
    """``NAME=deploy:DIR``: the engine, model and options a deployment chose (its ``use``)."""
    if pairs:
        raise BenchError(f"candidate {name}: a deployment's settings are its own (edit {deploy.FILE}, "
                         f"or name the engine's kind), got {','.join(pairs)}")
    choice = deploy.read(path).chosen
    logger.info("candidate %s: the deployment's %s winner, %s (at the bench's threads)", name,
                choice.workload, choice.describe())
    return Candidate(name, choice.engine, str(choice.model), dict(choice.options))


def resolve(c: Candidate) -> Resolved:
    """The loader's checks on the candidate's model, once (a bad path fails that candidate)."""
    md = load.inspect(c.path, kinds=c.engine.models)
    adapter = c.engine.adapter_option
    if adapter and c.options.get(adapter):
        existing_dir(c.options[adapter], "adapter")
    if c.options.get("draft"):  # a draft in the kind's format, with the target's tokenizer
        draft.check(md.path, load.inspect(c.options["draft"], kinds=c.engine.models, what="draft").path)
    return Resolved(c, Path(md.path), md.config)
