"""What a poem answer is measured by: its script, and whether it does what the prompt asked.

Script: traditional ratio = T / (T + S) over the Han characters, where T
counts characters that OpenCC's t2s changes (traditional forms) and S those
that its s2t changes (simplified forms).

Prompt-following, on prompts annotated with what they ask (``form``,
``title``, ``topic``; ``assets/demo/prompts.json``):

- An answer is an optional title line ``《…》`` (its first line) and a body
  (everything after it). A *line* of the body is a clause between two
  punctuation marks (，。？！；、 or a line break), the unit the corpus counts:
  a 五言绝句 is 4 lines of 5 Han characters, a 七言律诗 8 lines of 7
  (``床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。`` is a 五言绝句).
- form accuracy: the body has exactly the asked number of lines (绝句 4,
  律诗 8), each of exactly the asked number (五言 5, 七言 7) of Han characters;
- title accuracy: the title line is 《X》 for the asked X, in either script
  (both sides compared after OpenCC t2s);
- topic hit rate: the asked topic occurs in the body (not the title line),
  in either script;
- distinctness: the share of distinct answers among the answers to
  different prompts (greedy answers: a model that ignores its prompt gives
  the same poem every time).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from tangquant.errors import InputError

FORMS = {"五言绝句": (5, 4), "七言绝句": (7, 4), "五言律诗": (5, 8), "七言律诗": (7, 8)}
ASKS = ("form", "title", "topic")
LINE_SPLIT = re.compile(r"[，。？！；、,.?!;\s]+")
TITLE_LINE = re.compile(r"^《([^《》]+)》$")
HAN = re.compile(r"^[\u4e00-\u9fff\u3400-\u4dbf]+$")


@functools.lru_cache(maxsize=None)
def _converters():
    import opencc

    return opencc.OpenCC("t2s"), opencc.OpenCC("s2t")


def simplify(text: str) -> str:
    return _converters()[0].convert(text)


def script_counts(text: str) -> tuple[int, int]:
    """(T, S): Han characters that t2s changes (traditional) and that s2t changes (simplified)."""
    t2s, s2t = _converters()
    t = s = 0
    for ch in text:
        if not ("\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" or ch >= "\U00020000"):
            continue
        if t2s.convert(ch) != ch:
            t += 1
        elif s2t.convert(ch) != ch:
            s += 1
    return t, s


def traditional_ratio(texts) -> float | None:
    """T / (T + S) over all ``texts``; None when no character has a script."""
    t = s = 0
    for text in texts:
        a, b = script_counts(text)
        t, s = t + a, s + b
    return t / (t + s) if t + s else None


def split_answer(text: str) -> tuple[str | None, str]:
    """(title, body): the title inside a first line 《…》 (None if there is none) and the rest."""
    first, _, rest = text.strip().partition("\n")
    m = TITLE_LINE.match(first.strip())
    return (m.group(1), rest.strip()) if m else (None, text.strip())


def lines_of(body: str) -> list[str]:
    """The body's lines: clauses between punctuation marks or line breaks."""
    return [c for c in LINE_SPLIT.split(body) if c]


def form_of_lines(lines: list[str]) -> str | None:
    """五言绝句 / 七言绝句 / 五言律诗 / 七言律诗 when the lines have one of those shapes, else None."""
    for form, (size, count) in FORMS.items():
        if len(lines) == count and all(len(c) == size and HAN.match(c) for c in lines):
            return form
    return None


def form_ok(answer: str, form: str) -> bool:
    return form_of_lines(lines_of(split_answer(answer)[1])) == form


def title_ok(answer: str, title: str) -> bool:
    got = split_answer(answer)[0]
    return got is not None and simplify(got.strip()) == simplify(title)


def topic_ok(answer: str, topic: str) -> bool:
    return simplify(topic) in simplify(split_answer(answer)[1])


CHECKS = {"form": form_ok, "title": title_ok, "topic": topic_ok}


def follow(prompts: list[dict], answers: list[str]) -> dict:
    """Form, title and topic accuracy of ``answers[i]`` to ``prompts[i]``: {ask: {hits, asked, rate}}."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    out = {}
    for ask in ASKS:
        pairs = [(p[ask], a) for p, a in zip(prompts, answers) if ask in p]
        hits = sum(CHECKS[ask](a, want) for want, a in pairs)
        out[ask] = {"hits": hits, "asked": len(pairs), "rate": hits / len(pairs) if pairs else None}
    return out


def distinctness(answers: list[str]) -> float | None:
    """Distinct answers / answers (1.0: every prompt got its own poem)."""
    return len({a.strip() for a in answers}) / len(answers) if answers else None


def load_prompts(path) -> list[dict]:
    """The annotated held-out prompts: [{"prompt": ..., "form"?, "title"?, "topic"?, "note"?}]."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the prompt file {path}: {exc}") from None
    items = doc.get("prompts") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise InputError(f"{path} must hold {{\"prompts\": [{{\"prompt\": ...}}, ...]}}")
    for i, item in enumerate(items):
        _check_prompt(path, i, item)
    return items


def _check_prompt(path, i: int, item) -> None:
    where = f"{path}: prompt {i}"
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
        raise InputError(f"{where} needs a non-empty \"prompt\" string")
    unknown = set(item) - {"prompt", "note", *ASKS}
    if unknown:
        raise InputError(f"{where} has unknown key(s) {', '.join(sorted(unknown))}")
    if "form" in item and item["form"] not in FORMS:
        raise InputError(f"{where}: form must be one of {', '.join(FORMS)}, got {item['form']!r}")
    for key in ("title", "topic"):
        if key in item and not (isinstance(item[key], str) and HAN.match(item[key])):
            raise InputError(f"{where}: {key} must be Han characters, got {item.get(key)!r}")
        if key in item and item[key] not in item["prompt"]:
            raise InputError(f"{where}: the prompt does not name its {key} {item[key]!r}")


def summary(prompts: list[dict], greedy: list[str], sampled: list[list[str]]) -> dict:
    """Prompt-following of one model: greedy answers, sampled answers (a list per prompt), distinctness."""
    flat_prompts = [p for p, group in zip(prompts, sampled) for _ in group]
    return {"greedy": follow(prompts, greedy),
            "sampled": follow(flat_prompts, [a for group in sampled for a in group]),
            "distinct_greedy": distinctness(greedy)}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def follow_table(rows: dict) -> str:
    """Markdown: one line per model and decoding, the form/title/topic rates with their counts."""
    lines = ["| model | decoding | form accuracy | title accuracy | topic hit rate | distinct answers |",
             "|---|---|---|---|---|---|"]
    for name, s in rows.items():
        for mode in ("greedy", "sampled"):
            cells = [f"{_pct(s[mode][a]['rate'])} ({s[mode][a]['hits']}/{s[mode][a]['asked']})" for a in ASKS]
            distinct = _pct(s["distinct_greedy"]) if mode == "greedy" else ""
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + f" | {distinct} |")
    return "\n".join(lines)


def kept(candidate: dict, reference: dict) -> dict:
    """candidate's rate / reference's rate per decoding and ask (how much of the fine-tune survives)."""
    out = {}
    for mode in ("greedy", "sampled"):
        for ask in ASKS:
            a, b = candidate[mode][ask]["rate"], reference[mode][ask]["rate"]
            out[f"{ask}_{mode}"] = None if a is None or not b else a / b
    return out
