"""The IR's ``rt_info/runtime_options``: what the exporter chooses on purpose, what ``tune`` applies.

OpenVINO's core applies an IR's runtime options as compile properties unless
the caller sets the property itself, so a plain ``LLMPipeline(dir, "CPU")``,
optimum-intel and OpenVINO Model Server all obey them. optimum-intel's
exporter pins ``KV_CACHE_PRECISION=f16`` when it exports without its own
quantization (and drops the pin after its own NNCF step); tangquant calls
NNCF itself, so the export replaces the whole block with :data:`EXPORT_OPTIONS`.

Standard library only: the XML is edited as text (the block sits in the tail),
never re-serialised, so the ``.bin`` and every constant stay byte for byte.
"""

from __future__ import annotations

import re
from pathlib import Path
from xml.etree import ElementTree as ET
from xml.sax.saxutils import quoteattr

from tangquant.errors import InputError
from tangquant.files import atomic_output_file

MODEL_XML = "openvino_model.xml"
# What a tangquant export writes, and why (recorded in the manifest).
EXPORT_OPTIONS = {
    "ACTIVATIONS_SCALE_FACTOR": ("8.0", "kept from optimum-intel's LLM export: scales activations "
                                 "down under f16 inference precision (GPU) to avoid overflow; "
                                 "the CPU at bf16/f32 ignores it"),
}
# Runtime options OpenVINO 2026.4's core applies from rt_info as CPU compile properties
# (checked by tests/test_tune.py): the knobs `tune --apply` can hand to every runtime.
APPLIED_BY_CORE = ("KV_CACHE_PRECISION", "KEY_CACHE_PRECISION", "VALUE_CACHE_PRECISION",
                   "KEY_CACHE_GROUP_SIZE", "VALUE_CACHE_GROUP_SIZE",
                   "DYNAMIC_QUANTIZATION_GROUP_SIZE", "ACTIVATIONS_SCALE_FACTOR")
_BLOCK = re.compile(r"[ \t]*<runtime_options>.*?</runtime_options>[ \t]*\n?", re.S)
_KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")


def export_options() -> dict[str, str]:
    return {k: v for k, (v, _) in EXPORT_OPTIONS.items()}


def export_record() -> dict:
    """The manifest's record of what the export wrote into runtime_options and why."""
    return {"written": export_options(), "why": {k: why for k, (_, why) in EXPORT_OPTIONS.items()},
            "removed": "every other runtime option optimum-intel's exporter set (its "
                       "KV_CACHE_PRECISION=f16 pin for unquantized exports): tangquant did not "
                       "choose them; `tangquant tune --apply` writes measured ones"}


def set_on_model(ov_model, options: dict[str, str]) -> None:
    """Make an in-memory ``ov.Model``'s runtime options exactly ``options`` (before saving)."""
    ov_model.set_rt_info({k: str(v) for k, v in options.items()}, "runtime_options")


def read(model_dir: Path) -> dict[str, str]:
    """The IR's runtime options, read from the XML's tail without loading the model."""
    text, _ = _tail(Path(model_dir) / MODEL_XML)
    match = re.search(r"<runtime_options>.*?</runtime_options>", text, re.S)
    if not match:
        return {}
    return {child.tag: child.get("value", "") for child in ET.fromstring(match.group(0))}


def write(model_dir: Path, options: dict[str, str]) -> None:
    """Replace the IR's runtime options with ``options``, atomically (temp file, then rename)."""
    for key in options:
        if not _KEY.match(key):
            raise InputError(f"{key!r} is not an OpenVINO property name")
    xml = Path(model_dir) / MODEL_XML
    data = xml.read_text(encoding="utf-8")
    _, start = _tail(xml)
    head, tail = data[:start], data[start:]
    block = "".join(f"\t\t\t<{k} value={quoteattr(str(v))} />\n" for k, v in options.items())
    block = f"\t\t<runtime_options>\n{block}\t\t</runtime_options>\n" if options else ""
    if _BLOCK.search(tail):
        tail = _BLOCK.sub(lambda _: block, tail, count=1)
    elif "</rt_info>" in tail:
        tail = tail.replace("</rt_info>", block + "\t</rt_info>", 1)
    else:
        tail = tail.replace("</net>", f"\t<rt_info>\n{block}\t</rt_info>\n</net>", 1)
    # Claimed and replaced like any output: a full disk is named, a killed run's copy removed.
    with atomic_output_file(xml, force=True) as tmp:
        tmp.write_text(head + tail, encoding="utf-8")


def _tail(xml: Path) -> tuple[str, int]:
    """(the XML after ``</edges>``, its offset): the model-wide rt_info follows the edges,
    while every layer's own rt_info comes before them."""
    try:
        text = xml.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {xml}: {exc.strerror or exc}") from None
    start = text.rfind("</edges>")
    if start < 0:
        raise InputError(f"{xml} has no </edges>: not an OpenVINO IR")
    return text[start:], start
