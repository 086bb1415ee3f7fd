"""A draft model fit to speculate for a target: the same tokenizer and the same chat template.

Speculative decoding hands the draft's token ids to the target as they are, and the draft
reads the target's prompt ids: a draft whose ids mean other text (another vocabulary, other
merges, other special tokens) proposes tokens the target rejects, and one with another chat
template was trained to continue prompts it never sees. Either way it costs time and says
nothing, so :func:`check` refuses it with one line before any model is loaded. ``pipeline``
(the draft's base against the target's), ``bench`` (a ``draft=`` candidate option), ``chat``
and ``serve`` (``--draft``) call it.

What is compared, read from the files (standard library; ``gguf`` only for a GGUF): the
token ↔ id table with the added tokens, the BPE merges, the chat template. An OpenVINO IR
directory is read through the ``tokenizer.json`` beside it (``tangquant export`` copies it);
without one, its ``openvino_tokenizer``/``openvino_detokenizer`` files must be identical.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from tangquant.errors import InputError
from tangquant.files import read_json

DEFAULT_TOKENS = 4  # K, the draft tokens per target step, when none is given (genai's own is 5)
# openvino-genai 2026.4.1's speculative *sampling* fails after tens of tokens ("content_length <=
# prompt_ids.size() + m_generated_ids.size()" in sequence_group.cpp; the pipeline then stops drafting):
# with a draft, the ov engine decodes greedily only, and says so.
GREEDY_ONLY = ("a draft model decodes greedily only (temperature 0): openvino-genai 2026.4's "
               "speculative sampling fails")
_PAD = re.compile(r"^\[PAD(\d+)\]$")  # the GGUF export's filler rows past the tokenizer's ids
_OV_TOKENIZER = ("openvino_tokenizer.xml", "openvino_tokenizer.bin", "openvino_detokenizer.xml",
                 "openvino_detokenizer.bin")


class DraftError(InputError):
    """A draft model that cannot speculate for its target (tokenizer or chat template differ)."""


@dataclass(frozen=True)
class Vocabulary:
    """What a model's token ids mean: its tokens by id, merges and chat template (or a digest of
    OpenVINO tokenizer files, when that is all there is)."""

    where: str
    tokens: tuple[tuple[int, str], ...] | None   # (id, token), by id
    merges: tuple[str, ...] | None
    chat_template: str | None
    digest: str | None = None


def read(path) -> Vocabulary:
    """The vocabulary of a model directory (HF, GPTQ, IR) or a GGUF file (or a directory of one)."""
    p = Path(path)
    ggufs = sorted(p.glob("*.gguf")) if p.is_dir() and not (p / "config.json").is_file() else []
    if (p.is_file() and p.suffix == ".gguf") or len(ggufs) == 1:
        return _from_gguf(p if p.is_file() else ggufs[0])
    if not p.is_dir():
        raise DraftError(f"draft check: {p} is neither a model directory nor a .gguf file")
    if (p / "tokenizer.json").is_file():
        return _from_hf(p)
    if all((p / name).is_file() for name in _OV_TOKENIZER):
        h = hashlib.sha256()
        for name in _OV_TOKENIZER:
            h.update((p / name).read_bytes())
        return Vocabulary(str(p), None, None, None, h.hexdigest())
    raise DraftError(f"draft check: {p} has no tokenizer files (tokenizer.json, or OpenVINO's "
                     "openvino_tokenizer/detokenizer)")


def _from_hf(p: Path) -> Vocabulary:
    tj = read_json(p / "tokenizer.json", "tokenizer")
    model = tj.get("model") or {}
    by_id = {int(i): str(t) for t, i in (model.get("vocab") or {}).items()}
    by_id.update({int(a["id"]): str(a["content"]) for a in tj.get("added_tokens") or []})
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or [])
    return Vocabulary(str(p), tuple(sorted(by_id.items())), merges, _hf_template(p))


def _hf_template(p: Path) -> str | None:
    if (p / "chat_template.jinja").is_file():
        return (p / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (p / name).is_file():
            template = read_json(p / name, "tokenizer config").get("chat_template")
            if isinstance(template, list):  # named templates: the default one
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            if template:
                return str(template)
    return None


def _from_gguf(f: Path) -> Vocabulary:
    import gguf

    try:
        reader = gguf.GGUFReader(str(f))
    except (ValueError, OSError, KeyError) as exc:
        raise DraftError(f"draft check: {f} is not a readable GGUF ({exc})") from None

    def field(key):
        value = reader.get_field(key)
        return None if value is None else value.contents()

    tokens = [(i, str(t)) for i, t in enumerate(field("tokenizer.ggml.tokens") or [])
              if not (_PAD.match(str(t)) and _PAD.match(str(t)).group(1) == str(i))]
    return Vocabulary(str(f), tuple(tokens), tuple(field("tokenizer.ggml.merges") or []),
                      field("tokenizer.chat_template"))


def difference(target: Vocabulary, draft: Vocabulary) -> str | None:
    """What differs, in a few words, or None when the draft can speculate for the target."""
    if (target.digest is None) != (draft.digest is None):
        return "one has tokenizer.json and the other only OpenVINO tokenizer files"
    if target.digest is not None:
        return None if target.digest == draft.digest else "its OpenVINO tokenizer files differ"
    if target.tokens != draft.tokens:
        if len(target.tokens) != len(draft.tokens):
            return f"it has {len(draft.tokens)} tokens, the target {len(target.tokens)}"
        (i, mine), (j, theirs) = next((a, b) for a, b in zip(draft.tokens, target.tokens) if a != b)
        if i != j:
            return f"its token ids run differently from the target's from id {min(i, j)} on"
        return f"token id {i} is {mine[:20]!r} in it, {theirs[:20]!r} in the target"
    if target.merges != draft.merges:
        return "its BPE merges differ (the same text would become other ids)"
    if not draft.chat_template:
        return "it has no chat template"
    if (target.chat_template or "").strip() != draft.chat_template.strip():
        return "its chat template differs"
    return None


def check(target, draft) -> None:
    """Refuse, in one line, a ``draft`` whose tokenizer or chat template differs from ``target``'s."""
    why = difference(read(target), read(draft))
    if why:
        raise DraftError(f"the draft {draft} cannot speculate for {target}: {why}; a draft needs the "
                         "target's own tokenizer and chat template (e.g. Qwen1.5-0.5B-Chat for "
                         "Qwen1.5-7B-Chat)")
