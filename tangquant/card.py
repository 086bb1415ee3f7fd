"""Model cards (``README.md``) with Hugging Face Hub front matter, for every output that is a model.

The YAML block at the top is what the Hub reads to list a model under its
base: ``base_model`` (a Hub id), ``base_model_relation``, ``library_name``,
``pipeline_tag``, ``tags``, ``license`` (with ``license_name``/``license_link``
for ``other``) and ``quantized_by``. :func:`lineage` finds the base and its
licence for a stage's input: ``--base-model-id`` first, then the front
matter of a card tangquant wrote (so merge → quantize → export carry them
along), then, for a merge, the adapter's ``base_model_name_or_path`` and the
base directory's own card. A base that is only a local path is not a Hub id
and is left out, with one warning naming the flag. Standard library + PyYAML.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from tangquant.errors import ParameterError

logger = logging.getLogger(__name__)

CARD = "README.md"
# The label of every model built from a real shape with random weights (tangquant.poet.shapes):
# carried in its config, card and GGUF description, and into every figure measured on it.
RANDOM_WEIGHTS = "random weights — speed only"
# The Hub's relations: a LoRA folded into its base is a fine-tune of it ("merge" is for merges of
# several models, "adapter" for adapter repos); quantize, export and GGUF outputs are "quantized".
RELATIONS = ("adapter", "merge", "quantized", "finetune")
LIBRARY = {"hf": "transformers", "gptq": "transformers", "ir": "openvino", "gguf": "gguf"}
LICENSE_KEYS = ("license", "license_name", "license_link")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(text) -> bool:
    """``org/name`` as the Hub spells repository ids (a local path like ``./a/b`` is not one)."""
    return isinstance(text, str) and bool(_HUB_ID.match(text)) and ".." not in text \
        and not Path(text).expanduser().exists()


def hub_id_of(path) -> str | None:
    """``org/name`` of a Hugging Face cache snapshot (``models--org--name/snapshots/REV``), else None."""
    if path is None:
        return None
    root = Path(path).resolve()
    repo = root.parent.parent.name
    if root.parent.name == "snapshots" and repo.startswith("models--") and repo.count("--") >= 2:
        return repo[len("models--"):].replace("--", "/", 1)
    return None


def check_base_model_id(text: str | None) -> None:
    """For ``__post_init__``: refuse a --base-model-id that is not a Hub id."""
    if text is not None and not _HUB_ID.match(text):
        raise ParameterError(f"base_model_id must be a Hugging Face Hub id like Qwen/Qwen1.5-7B-Chat, "
                             f"got {text!r}")


def read_front_matter(path) -> dict:
    """The YAML front matter of a card (a ``README.md`` or the directory holding one); {} if none."""
    import yaml

    path = Path(path)
    path = path / CARD if path.is_dir() else path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def lineage(source, base_model_id: str | None = None, adapter_base: str | None = None) -> dict:
    """{base_model, license…} of a stage whose input is the model directory ``source``.

    ``adapter_base`` is a merge's adapter ``base_model_name_or_path``; ``source`` is then the
    base itself, whose own card gives the licence.
    """
    meta = read_front_matter(source) if source is not None else {}
    ours = "tangquant" in (meta.get("tags") or [])
    out = {k: meta[k] for k in LICENSE_KEYS if meta.get(k)}
    if base_model_id:
        out["base_model"] = base_model_id
    elif ours and meta.get("base_model"):
        out["base_model"] = meta["base_model"]
    elif adapter_base and is_hub_id(adapter_base):
        out["base_model"] = adapter_base
    elif not ours and hub_id_of(source):  # a Hub id resolved from the local cache
        out["base_model"] = hub_id_of(source)
    elif not ours:  # (a card of ours without one: the stage that wrote it said so)
        found = adapter_base or (source and Path(source).name)
        logger.info("model card: no base_model (%s is not a Hugging Face Hub id); --base-model-id "
                    "ORG/NAME lists the output under its base on the Hub", found)
    return out


def front_matter(lineage_: dict, relation: str, library: str, tags=()) -> dict:
    """The card's metadata, in the order the Hub's editor writes it."""
    if relation not in RELATIONS:
        raise ValueError(f"base_model_relation {relation!r} is not one of {RELATIONS}")
    meta = {}
    if lineage_.get("base_model"):
        meta.update(base_model=lineage_["base_model"], base_model_relation=relation)
    meta.update(library_name=library, pipeline_tag="text-generation",
                tags=list(dict.fromkeys(["tangquant", *tags])))
    meta.update({k: lineage_[k] for k in LICENSE_KEYS if lineage_.get(k)})
    if relation == "quantized":
        meta["quantized_by"] = "tangquant"
    return meta


def use_section(api: str, heading: bool = True) -> str:
    """How to publish an output on the Hub and use it from tangquant's Python API (``api``: a snippet
    whose ``THIS_DIR`` is the directory)."""
    head = "## Use\n\n" if heading else ""
    return f"""{head}Publish it on the Hugging Face Hub (the front matter above lists it under its base model):

```sh
hf upload ORG/NAME THIS_DIR .
```

From Python, with tangquant:

```python
{api.strip()}
```
"""


def render(meta: dict, body: str) -> str:
    import yaml

    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"---\n{head}---\n\n{body.lstrip()}"


def write(out_dir, meta: dict, body: str) -> Path:
    """Write ``out_dir/README.md``: the front matter, then the markdown ``body``."""
    path = Path(out_dir) / CARD
    path.write_text(render(meta, body), encoding="utf-8")
    return path
