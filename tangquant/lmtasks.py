"""lm-evaluation-harness tasks built from held-out Tang poems (chinese-poetry, MIT licence).

Two tasks, each in traditional and simplified script (the fine-tune's point is
the script), both plain text in the form ``《title》`` + couplets, one per line:

- ``tang_nextline_{traditional,simplified}``: the title and the first couplets
  of a poem as context, the next couplet as target; scored as byte perplexity
  and bits per byte of the target (lm_eval's ``word_perplexity`` counts
  whitespace-separated words, meaningless for Chinese).
- ``tang_couplet_{traditional,simplified}``: the context and the first half of
  a couplet; four candidate second halves — the poem's own and three from
  other held-out poems of the same form (五言/七言, 绝句/律诗), given the
  same final punctuation so that only the words differ; accuracy.

``write_task_dir`` writes the JSONL data, the task and group YAML and the
loader (``utils.py``, copied from the shipped set) into a directory that both
``tangquant eval --tasks`` and plain ``lm_eval --include_path DIR`` read. The
shipped set (``tangquant/assets/lm_eval``) is what ``tangquant data
--lm-eval-items 100`` writes for the corpus' eval split; items are drawn by a
hash of each poem, so a rebuild is deterministic. Standard library + OpenCC.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "lm_eval"
SCRIPTS = ("traditional", "simplified")
TASKS = ("tang_nextline", "tang_couplet")
CHOICES = 4
_ENDS = "，。？！；、"


def halves(paragraph: str) -> tuple[str, str] | None:
    """A couplet's two halves, each with its punctuation ("床前明月光，", "疑是地上霜。")."""
    cut = [i for i, ch in enumerate(paragraph) if ch in _ENDS]
    if len(cut) != 2 or cut[1] != len(paragraph) - 1:
        return None
    return paragraph[:cut[0] + 1], paragraph[cut[0] + 1:]


def _rng(poem: dict, seed: int, what: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}\x00{what}\x00{poem['body']}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _heading(poem: dict) -> str:
    title = poem["title"].split(" ")[0]
    return f"《{title}》\n" if title else ""


def nextline_item(poem: dict, seed: int) -> dict | None:
    couplets = poem["paragraphs"]
    if len(couplets) < 2:
        return None
    k = _rng(poem, seed, "nextline").randrange(1, len(couplets))
    return {"title": poem["title"], "author": poem["author"],
            "context": _heading(poem) + "\n".join(couplets[:k]) + "\n", "target": couplets[k]}


def couplet_item(poem: dict, pool: list[dict], seed: int) -> dict | None:
    """One multiple-choice item, or None when the poem or its form has too few couplets."""
    rng = _rng(poem, seed, "couplet")
    usable = [i for i, c in enumerate(poem["paragraphs"]) if halves(c)]
    if not usable:
        return None
    k = rng.choice(usable)
    first, second = halves(poem["paragraphs"][k])
    end = second[-1]
    own = {h[1][:-1] for c in poem["paragraphs"] if (h := halves(c))}
    candidates = sorted({h[1][:-1] for other in pool if other["body"] != poem["body"]
                         for c in other["paragraphs"] if (h := halves(c))
                         and len(h[1]) == len(second)} - own)
    if len(candidates) < CHOICES - 1:
        return None
    choices = [second] + [c + end for c in rng.sample(candidates, CHOICES - 1)]
    order = list(range(CHOICES))
    rng.shuffle(order)
    return {"title": poem["title"], "author": poem["author"],
            "context": _heading(poem) + "".join(line + "\n" for line in poem["paragraphs"][:k]) + first,
            "choices": [choices[i] for i in order], "label": order.index(0)}


def build_items(poems: list[dict], n: int, seed: int, form_of) -> dict[str, list[dict]]:
    """Up to ``n`` items per task, traditional (the corpus' script), from regular-form poems."""
    regular = [p for p in poems if form_of(p["paragraphs"])]
    by_form: dict[str, list[dict]] = {}
    for p in regular:
        by_form.setdefault(form_of(p["paragraphs"]), []).append(p)
    ordered = sorted(regular, key=lambda p: hashlib.sha256(f"{seed}\x00{p['body']}".encode()).digest())
    items = {"tang_nextline": [], "tang_couplet": []}
    for poem in ordered:
        if len(items["tang_nextline"]) < n and (it := nextline_item(poem, seed)):
            items["tang_nextline"].append(it)
        if len(items["tang_couplet"]) < n and (
                it := couplet_item(poem, by_form[form_of(poem["paragraphs"])], seed)):
            items["tang_couplet"].append(it)
    return items


def _convert(item: dict, convert) -> dict | None:
    out = {k: convert(v) if isinstance(v, str) else [convert(c) for c in v] if isinstance(v, list) else v
           for k, v in item.items()}
    if "choices" in out and len(set(out["choices"])) != len(out["choices"]):
        return None  # two candidates became one string in this script
    return out


def _yaml(task: str, script: str) -> str:
    name = f"{task}_{script}"
    head = (f"task: {name}\ntag: [tang]\ncustom_dataset: !function utils.load\n"
            f"dataset_kwargs:\n  data_file: {name}.jsonl\ntest_split: test\n"
            "doc_to_text: context\ntarget_delimiter: \"\"\n")
    if task == "tang_nextline":
        body = ("output_type: loglikelihood\ndoc_to_target: target\n"
                "process_results: !function utils.process_nextline\nmetric_list:\n"
                "  - metric: byte_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
                "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")
    else:
        body = ("output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n"
                "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return head + body + "metadata:\n  version: 1.0\n"


def _group_yaml(task: str) -> str:
    subtasks = "".join(f"  - {task}_{s}\n" for s in SCRIPTS)
    text = f"group: {task}\ntask:\n{subtasks}"
    if task == "tang_couplet":
        text += "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
    return text + "metadata:\n  version: 1.0\n"


def write_task_dir(out: Path, items: dict[str, list[dict]], t2s, source: str) -> dict[str, int]:
    """Write the tasks into the existing directory ``out``; returns {task name: items}."""
    out = Path(out)
    counts = {}
    for task, rows in items.items():
        for script in SCRIPTS:
            convert = t2s if script == "simplified" else (lambda s: s)
            converted = [r for r in (_convert(x, convert) for x in rows) if r is not None]
            name = f"{task}_{script}"
            with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for i, row in enumerate(converted):
                    f.write(json.dumps({"id": i, **row}, ensure_ascii=False) + "\n")
            (out / f"{name}.yaml").write_text(_yaml(task, script), encoding="utf-8")
            counts[name] = len(converted)
        (out / f"_{task}.yaml").write_text(_group_yaml(task), encoding="utf-8")
    shutil.copy2(ASSET_DIR / "utils.py", out / "utils.py")
    (out / "README.md").write_text(_readme(counts, source), encoding="utf-8")
    return counts


def foreign_code(task_dir: Path) -> list[Path]:
    """The files of ``task_dir`` through which lm_eval would run code tangquant did not write:
    every YAML that is not one :func:`write_task_dir` writes (its ``!function`` hooks import the
    folder's Python, its prompts are Jinja templates, which can reach Python too) and a
    ``utils.py`` that is not the shipped one. Empty for a set tangquant wrote."""
    ours = {"utils.py": (ASSET_DIR / "utils.py").read_bytes()}
    for task in TASKS:
        ours[f"_{task}.yaml"] = _group_yaml(task).encode()
        ours.update({f"{task}_{s}.yaml": _yaml(task, s).encode() for s in SCRIPTS})
    found = []
    for path in sorted(Path(task_dir).rglob("*")):
        if path.suffix not in (".yaml", ".yml") and path.name != "utils.py":
            continue
        want = ours.get(path.relative_to(task_dir).as_posix())
        try:
            same = want is not None and path.read_bytes() == want
        except OSError:
            same = False
        if not same:
            found.append(path)
    return found


def _readme(counts: dict[str, int], source: str) -> str:
    rows = "".join(f"| `{name}` | {n} |\n" for name, n in counts.items())
    return f"""# Tang-poem tasks for lm-evaluation-harness

Built by `tangquant data --lm-eval-items N` from {source}.
Poems: [chinese-poetry](https://github.com/chinese-poetry/chinese-poetry) (MIT licence,
Copyright (c) 2016 JackeyGao), 全唐诗; only poems of the held-out (eval) split, so a model
fine-tuned on `tangquant data`'s train split with the same seed has not seen them.

| task | items |
|---|---|
{rows}
Groups: `tang_nextline`, `tang_couplet` (both scripts). Run them with
`tangquant eval --model IR --reference MERGED --tasks tang_couplet,tang_nextline`, or with plain
lm_eval: `lm_eval --model hf --model_args pretrained=MODEL --include_path THIS_DIR --tasks tang_couplet`.
"""
