"""A bench candidate: ``NAME=KIND:PATH[,key=value...]`` (the kinds are described in ``tangquant.bench``)."""

from __future__ import annotations

import dataclasses

from tangquant.errors import BenchError

KINDS = ("ov", "ov+lora", "torch-gptq+lora", "torch", "llamacpp")


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    kind: str
    path: str
    options: dict


def parse_candidate(text: str) -> Candidate:
    """``NAME=KIND:PATH[,key=value...]`` -> Candidate (the path need not exist yet)."""
    name, sep, rest = str(text).partition("=")
    kind, sep2, rest = rest.partition(":")
    if not (sep and sep2 and name.strip() and rest):
        raise BenchError(f"candidate {text!r} must look like NAME=KIND:PATH[,key=value...]")
    if kind not in KINDS:
        raise BenchError(f"candidate {name}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    path, *pairs = rest.split(",")
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not (eq and key.strip()):
            raise BenchError(f"candidate {name}: option {pair!r} must be key=value")
        options[key.strip()] = value.strip()
    if kind == "ov+lora" and "adapter" not in options:
        raise BenchError(f"candidate {name}: kind ov+lora needs adapter=DIR")
    if options.get("dtype", "bf16") not in ("bf16", "fp16", "fp32"):
        raise BenchError(f"candidate {name}: dtype must be bf16, fp16 or fp32")
    return Candidate(name.strip(), kind, path, options)
