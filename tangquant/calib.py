"""Calibration and evaluation text: read, render with the chat template, pack.

Accepted files (the format is recognised from the content):

- ``.json`` holding a list of alpaca records (``instruction``/``input``/``output``,
  what ``tangquant data`` and LLaMA-Factory write), ShareGPT records
  (``conversations`` with ``from``/``value``, or ``messages`` with ``role``/``content``),
  chinese-poetry records (``title``/``author``/``paragraphs``) or ``{"text": ...}``;
- ``.jsonl`` with one such record per line;
- ``.txt``: plain text, one document per blank-line separated paragraph.

Conversations are rendered with the model's own chat template (the form the
LoRA was trained on); a poem becomes the request "以《title》为题写一首诗" and the
poem as the answer. Documents are shuffled with a fixed seed, tokenized,
concatenated and cut into samples of exactly ``seq_len`` tokens. Data with
fewer tokens than one sample is refused.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from tangquant.errors import CalibrationError
from tangquant.files import parsing, read_bounded

logger = logging.getLogger(__name__)

POEM_REQUEST = "以《{title}》为题写一首诗"
HOLDOUT_EVERY = 10  # every 10th document (after the seeded shuffle) is held out for evaluation
MAX_DATA_BYTES = 256 << 20  # 10x the whole chinese-poetry Tang corpus as alpaca JSON
# A document is cut to this many characters per token still needed before it is rendered and
# tokenized (no real token is that long), so a one-line 20 MB file costs what 256 tokens need.
CHARS_PER_TOKEN_BOUND = 16
MIN_CUT_CHARS = 1 << 16


# Used only when no calibration data is given (with a warning): famous public-domain Tang
# poems in traditional characters, in the flagship fine-tune's own domain.
BUILTIN_POEMS = (
    ("靜夜思", ("床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。")),
    ("春曉", ("春眠不覺曉，處處聞啼鳥。", "夜來風雨聲，花落知多少。")),
    ("登鸛雀樓", ("白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。")),
    ("相思", ("紅豆生南國，春來發幾枝。", "願君多采擷，此物最相思。")),
    ("江雪", ("千山鳥飛絕，萬徑人蹤滅。", "孤舟蓑笠翁，獨釣寒江雪。")),
    ("鹿柴", ("空山不見人，但聞人語響。", "返景入深林，復照青苔上。")),
    ("登樂遊原", ("向晚意不適，驅車登古原。", "夕陽無限好，只是近黃昏。")),
    ("早發白帝城", ("朝辭白帝彩雲間，千里江陵一日還。", "兩岸猿聲啼不住，輕舟已過萬重山。")),
    ("黃鶴樓送孟浩然之廣陵", ("故人西辭黃鶴樓，煙花三月下揚州。", "孤帆遠影碧空盡，唯見長江天際流。")),
    ("楓橋夜泊", ("月落烏啼霜滿天，江楓漁火對愁眠。", "姑蘇城外寒山寺，夜半鐘聲到客船。")),
    ("涼州詞", ("葡萄美酒夜光杯，欲飲琵琶馬上催。", "醉臥沙場君莫笑，古來征戰幾人回。")),
    ("清明", ("清明時節雨紛紛，路上行人欲斷魂。", "借問酒家何處有，牧童遙指杏花村。")),
    ("九月九日憶山東兄弟", ("獨在異鄉為異客，每逢佳節倍思親。", "遙知兄弟登高處，遍插茱萸少一人。")),
    ("出塞", ("秦時明月漢時關，萬里長征人未還。", "但使龍城飛將在，不教胡馬度陰山。")),
    ("憫農", ("鋤禾日當午，汗滴禾下土。", "誰知盤中餐，粒粒皆辛苦。")),
    ("登高", ("風急天高猿嘯哀，渚清沙白鳥飛回。", "無邊落木蕭蕭下，不盡長江滾滾來。",
              "萬里悲秋常作客，百年多病獨登臺。", "艱難苦恨繁霜鬢，潦倒新停濁酒杯。")),
)


@dataclass(frozen=True)
class Document:
    """One calibration document: chat messages, or plain text when ``messages`` is empty."""

    messages: tuple = ()
    text: str = ""


@dataclass
class Packed:
    samples: list  # list of 1-D LongTensors, each seq_len long (the last may be shorter for eval)
    documents: int
    tokens: int


def read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration data {path} does not exist or is not a file")
    data = read_bounded(path, "calibration data", MAX_DATA_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path} is not UTF-8 text (byte {exc.start}); "
                               "convert it to UTF-8 first") from None
    if not text.strip():
        raise CalibrationError(f"{path} is empty or holds only whitespace")
    return text.lstrip("\ufeff")


def _record_to_document(item, where: str) -> Document | None:
    if isinstance(item, str):
        return Document(text=item) if item.strip() else None
    if not isinstance(item, dict):
        raise CalibrationError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if "instruction" in item or "output" in item:
        user = "\n".join(s for s in (str(item.get("instruction") or ""), str(item.get("input") or ""))
                         if s.strip())
        msgs = []
        if item.get("system"):
            msgs.append({"role": "system", "content": str(item["system"])})
        for turn in item.get("history") or []:
            if isinstance(turn, (list, tuple)) and len(turn) == 2:
                msgs += [{"role": "user", "content": str(turn[0])},
                         {"role": "assistant", "content": str(turn[1])}]
        msgs += [{"role": "user", "content": user},
                 {"role": "assistant", "content": str(item.get("output") or "")}]
        return Document(messages=tuple(msgs)) if (user + str(item.get("output") or "")).strip() else None
    if "conversations" in item or "messages" in item:
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system", "model": "assistant"}
        turns = item.get("conversations") or item.get("messages") or []
        msgs = []
        for t in turns:
            if not isinstance(t, dict):
                raise CalibrationError(f"{where}: a conversation turn is not an object")
            role = roles.get(str(t.get("from", t.get("role", ""))))
            content = t.get("value", t.get("content"))
            if role is None or not isinstance(content, str):
                raise CalibrationError(f"{where}: unknown conversation turn {t!r:.80}")
            msgs.append({"role": role, "content": content})
        return Document(messages=tuple(msgs)) if any(m["content"].strip() for m in msgs) else None
    if "paragraphs" in item:
        poem = "\n".join(str(p) for p in item.get("paragraphs") or [])
        if not poem.strip():
            return None
        request = POEM_REQUEST.format(title=item.get("title") or "无题")
        return Document(messages=({"role": "user", "content": request},
                                  {"role": "assistant", "content": poem}))
    if "text" in item:
        return Document(text=str(item["text"])) if str(item["text"]).strip() else None
    raise CalibrationError(f"{where}: unrecognised record with keys {sorted(item)[:6]}; expected "
                           "alpaca, ShareGPT, chinese-poetry or {\"text\": ...} records")


def load_documents(path: str | Path) -> list[Document]:
    """Read a calibration/evaluation file into documents (refusing empty or malformed data)."""
    path = Path(path)
    text = read_text(path)
    if path.suffix == ".txt":
        items = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    elif path.suffix == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                with parsing(f"{path}:{n}", "JSON line", "each line must be one JSON record",
                             error=CalibrationError):
                    items.append(json.loads(line))
    else:
        with parsing(path, "calibration data", "use .txt for plain text", error=CalibrationError):
            items = json.loads(text)
        if isinstance(items, dict):
            items = [items]
    if not isinstance(items, list):
        raise CalibrationError(f"{path} must hold a list of records")
    docs = [d for i, it in enumerate(items) if (d := _record_to_document(it, f"{path} item {i}"))]
    if not docs:
        raise CalibrationError(f"{path} holds no non-empty documents")
    return docs


def builtin_documents(repeat: int = 32) -> list[Document]:
    """The built-in poems as chat documents, repeated so that they fill a few samples."""
    docs = [Document(messages=({"role": "user", "content": POEM_REQUEST.format(title=t)},
                               {"role": "assistant", "content": "\n".join(lines)}))
            for t, lines in BUILTIN_POEMS]
    return docs * repeat


def render(doc: Document, tokenizer) -> str:
    if not doc.messages:
        return doc.text
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(doc.messages), tokenize=False)
    # No template: plain "role: content" lines keep the text usable for calibration.
    return "\n".join(f"{m['role']}: {m['content']}" for m in doc.messages) + "\n"


def cut(doc: Document, limit: int) -> Document:
    """``doc`` with at most ``limit`` characters of content (later messages dropped): the rest
    lies past the tokens that will be used, and tokenizing it could cost gigabytes."""
    if not doc.messages:
        return doc if len(doc.text) <= limit else Document(text=doc.text[:limit])
    if sum(len(m["content"]) for m in doc.messages) <= limit:
        return doc
    kept, room = [], limit
    for m in doc.messages:
        if room <= 0:
            break
        kept.append({**m, "content": m["content"][:room]})
        room -= len(m["content"])
    return Document(messages=tuple(kept))


def split_documents(docs: list[Document], seed: int) -> tuple[list[Document], list[Document]]:
    """(calibration, held-out): a seeded shuffle, then every 10th document is held out."""
    order = list(docs)
    random.Random(seed).shuffle(order)
    held = [d for i, d in enumerate(order) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    calib = [d for i, d in enumerate(order) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    return calib, held


def pack(docs: list[Document], tokenizer, seq_len: int, num_samples: int, seed: int,
         allow_partial: bool = False, what: str = "calibration data") -> Packed:
    """Tokenize the rendered documents, concatenate and cut into ``seq_len`` samples.

    Calibration needs whole samples (``allow_partial=False``): fewer tokens than
    one sample is refused. Evaluation may end with one shorter sample.
    """
    import torch

    if seq_len < 2:
        raise CalibrationError(f"seq_len must be at least 2, got {seq_len}")
    if num_samples < 1:
        raise CalibrationError(f"num_samples must be at least 1, got {num_samples}")
    order = list(docs)
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    need = seq_len * num_samples
    for doc in order:
        doc = cut(doc, max(MIN_CUT_CHARS, CHARS_PER_TOKEN_BOUND * (need - len(ids))))
        ids += tokenizer(render(doc, tokenizer), add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    minimum = 2 if allow_partial else seq_len
    if len(ids) < minimum:
        raise CalibrationError(f"{what} is too short: {len(ids)} tokens, but one sample needs "
                               f"{minimum} (--seq-len {seq_len}); give more text or a smaller --seq-len")
    ids = ids[:need]
    full = len(ids) // seq_len
    samples = [torch.tensor(ids[i * seq_len:(i + 1) * seq_len]) for i in range(full)]
    if allow_partial and len(ids) % seq_len >= 2:
        samples.append(torch.tensor(ids[full * seq_len:]))
    if len(samples) < num_samples:
        logger.warning("%s gives %d sample(s) of %d tokens, fewer than the %d asked for",
                       what, len(samples), seq_len, num_samples)
    return Packed(samples=samples, documents=len(docs), tokens=sum(len(s) for s in samples))


def eval_samples(data, tokenizer, num_samples: int, seq_len: int, seed: int) -> list:
    """Held-out samples for a fidelity measurement: ``data`` is a file or a list of Documents."""
    docs = load_documents(data) if isinstance(data, (str, Path)) else list(data)
    return pack(docs, tokenizer, seq_len, num_samples, seed, allow_partial=True,
                what="evaluation data").samples
