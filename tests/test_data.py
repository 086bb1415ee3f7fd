"""`tangquant data`: chinese-poetry layout in, LLaMA-Factory alpaca data out.

The corpus is typed here (conftest's POEMS plus a few broken ones), never read
from the real chinese-poetry checkout.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from conftest import POEMS, tree_digest
from tangquant.cli import main
from tangquant.data import data, form_of, is_clean, make_pair
from tangquant.measure import poems
from tangquant.prompts import FORM_NAMES, template_patterns
from tangquant.measure.poems import traditional_ratio

BROKEN = [
    {"title": "殘句", "author": "佚名", "paragraphs": ["□□明月光，疑是地上霜。"]},  # garbled
    {"title": "不齊", "author": "佚名", "paragraphs": ["白日依山盡，黃河流。"]},  # unbalanced couplet
    {"title": "空", "author": "佚名", "paragraphs": []},  # empty
    {"title": "注", "author": "佚名", "paragraphs": ["春眠不覺曉（一作春眠），處處聞啼鳥。"]},  # annotation
]


def write_corpus(root, poems, per_file=5):
    folder = root / "全唐诗"
    folder.mkdir(parents=True)
    items = [{"title": t, "author": a, "paragraphs": list(p), "id": str(i)} for i, (t, a, p) in enumerate(poems)]
    items += BROKEN
    for n, start in enumerate(range(0, len(items), per_file)):
        (folder / f"poet.tang.{n * 1000}.json").write_text(
            json.dumps(items[start:start + per_file], ensure_ascii=False), encoding="utf-8")
    (root / "authors.tang.json").write_text("[]", encoding="utf-8")
    return root


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "chinese-poetry", POEMS)


def read_splits(out):
    return {s: json.loads((out / f"tang_{s}.json").read_text(encoding="utf-8")) for s in ("train", "eval", "calib")}


@pytest.mark.fast
def test_alpaca_files_and_dataset_info(corpus, tmp_path):
    result = data(corpus, tmp_path / "out", eval_fraction=0.25, calib_fraction=0.25)
    out = tmp_path / "out"
    patterns = template_patterns()
    info = json.loads((out / "dataset_info.json").read_text(encoding="utf-8"))
    assert set(info) == {"tang", "tang_eval", "tang_calib"}
    for name, entry in info.items():
        path = out / entry["file_name"]
        assert entry["formatting"] == "alpaca"
        assert entry["columns"] == {"prompt": "instruction", "query": "input", "response": "output"}
        assert entry["file_sha1"] == hashlib.sha1(path.read_bytes()).hexdigest()
        records = json.loads(path.read_text(encoding="utf-8"))
        for rec in records:
            assert set(rec) == {"instruction", "input", "output"}
            # Convention of issue 17: the request is one of prompts.py's phrasings, and every
            # answer opens with its 《title》 line (before, title requests got the body alone).
            assert any(r.match(rec["instruction"]) for r in patterns), rec["instruction"]
            assert re.match(r"^《[^《》\n]+》\n[^《]", rec["output"]), rec["output"]
    # 12 typed poems, 4 of them the simplified twins of traditional ones: 8 kept; 4 broken dropped.
    stats = result["stats"]
    assert stats == {"read": 16, "empty": 1, "garbled": 3, "duplicate": 4, "kept": 8}
    assert sum(result["counts"].values()) == 8
    manifest = json.loads((out / "tangquant.json").read_text(encoding="utf-8"))
    assert manifest["stage"] == "data" and manifest["metrics"]["kept"] == 8


@pytest.mark.fast
def test_splits_are_disjoint_and_deterministic(corpus, tmp_path):
    data(corpus, tmp_path / "a", eval_fraction=0.3, calib_fraction=0.2)
    a = read_splits(tmp_path / "a")
    outputs = {s: {r["output"].split("\n", 1)[-1] for r in recs} for s, recs in a.items()}
    assert all(outputs.values()), "every split should get some poems at these fractions"
    assert not (outputs["train"] & outputs["eval"] or outputs["train"] & outputs["calib"]
                or outputs["eval"] & outputs["calib"])
    # The same poems in other files and another order give the same splits (hash of the text).
    other = write_corpus(tmp_path / "shuffled", list(reversed(POEMS[:8])), per_file=3)
    data(other, tmp_path / "b", eval_fraction=0.3, calib_fraction=0.2)
    assert read_splits(tmp_path / "b") == a
    # Another seed is another split of the same poems.
    data(corpus, tmp_path / "c", eval_fraction=0.3, calib_fraction=0.2, seed=1)
    c = read_splits(tmp_path / "c")
    assert sorted(r["output"] for s in c.values() for r in s) != [] and c != a


@pytest.mark.fast
def test_script_conversion(corpus, tmp_path):
    data(corpus, tmp_path / "t", eval_fraction=0.0, calib_fraction=0.0)
    data(corpus, tmp_path / "s", script="simplified", eval_fraction=0.0, calib_fraction=0.0)
    t, s = read_splits(tmp_path / "t")["train"], read_splits(tmp_path / "s")["train"]
    assert len(t) == len(s) == 8
    assert traditional_ratio(r["output"] for r in t) > 0.9
    assert traditional_ratio(r["output"] for r in s) == 0.0
    assert any("举头望明月" in r["output"] for r in s)


@pytest.mark.fast
def test_max_samples_and_refusals(corpus, tmp_path):
    result = data(corpus, tmp_path / "m", max_samples=3, eval_fraction=0.0, calib_fraction=0.0)
    assert result["counts"]["train"] == 3
    before = tree_digest(tmp_path / "m")
    assert main(["data", "--poetry", str(corpus), "--output", str(tmp_path / "m")]) == 2
    assert tree_digest(tmp_path / "m") == before  # an existing output is kept without --force
    assert main(["data", "--poetry", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "--poetry", str(empty), "--output", str(tmp_path / "y")]) == 2
    assert main(["data", "--poetry", str(corpus), "--output", str(tmp_path / "z"),
                 "--eval-fraction", "0.7", "--calib-fraction", "0.4"]) == 2
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


@pytest.mark.fast
def test_cleaning_rules():
    assert is_clean(["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"])
    assert not is_clean(["床前明月光，疑是地上霜"])  # no closing punctuation
    assert not is_clean(["床前明月光，疑是霜。"])
    assert not is_clean(["床前明月光，疑是地上霜。", "abc，def。"])
    assert form_of(["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]) == "五言绝句"
    assert form_of(["朝辭白帝彩雲間，千里江陵一日還。", "兩岸猿聲啼不住，輕舟已過萬重山。"]) == "七言绝句"
    assert form_of(["床前明月光，疑是地上霜。"]) is None


@pytest.mark.fast
def test_requests_match_their_answers(corpus, tmp_path):
    """Whatever a request names (a title, a topic, a form) is true of its answer, in both scripts."""
    for script in ("traditional", "simplified"):
        data(corpus, tmp_path / script, script=script, eval_fraction=0.0, calib_fraction=0.0)
        for rec in read_splits(tmp_path / script)["train"]:
            title, body = poems.split_answer(rec["output"])
            q = poems.simplify(rec["instruction"])
            if "《" in q:
                assert f"《{poems.simplify(title)}》" in q, rec
            for form, names in FORM_NAMES.items():
                if any(n in q for n in names):
                    assert poems.form_ok(rec["output"], form), rec
            topic = re.search(r"「(.+)」", q)
            if topic:
                assert poems.topic_ok(rec["output"], topic.group(1)), rec


@pytest.mark.fast
def test_untitled_poem_gets_a_title_line():
    poem = {"title": "靈隱寺”", "author": "", "paragraphs": ["床前明月光，疑是地上霜。"],
            "body": "床前明月光，疑是地上霜。"}
    pair = make_pair(poem, 0.5, lambda s: s, lambda s: s)
    assert pair["output"] == "《无题》\n床前明月光，疑是地上霜。"


@pytest.mark.fast
def test_lm_eval_tasks_are_rebuilt_from_the_eval_split(corpus, tmp_path):
    """`--lm-eval-items`: both tasks in both scripts, only held-out poems, distractors of the same form."""
    from tangquant.lmtasks import halves

    result = data(corpus, tmp_path / "d", eval_fraction=0.9, calib_fraction=0.0, lm_eval_items=20)
    tasks = tmp_path / "d" / "lm_eval"
    held = "\n\n".join(r["output"] for r in read_splits(tmp_path / "d")["eval"])
    by_body = {"\n".join(lines): lines for _, _, lines in POEMS}
    counts = result["counts"]["lm_eval"]
    assert set(counts) == {f"tang_{t}_{s}" for t in ("nextline", "couplet") for s in ("traditional", "simplified")}
    read = {name: [json.loads(l) for l in (tasks / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
            for name in counts}
    assert all(len(read[n]) == counts[n] > 0 for n in counts)
    for row in read["tang_nextline_traditional"]:
        body = row["context"].split("\n", 1)[1] + row["target"]
        assert body in held, row  # a held-out poem, cut at a couplet
    for row in read["tang_couplet_traditional"]:
        gold = row["choices"][row["label"]]
        assert len(set(row["choices"])) == 4 and len({len(c) for c in row["choices"]}) == 1, row
        lines = next(ls for body, ls in by_body.items() if body in held and any(
            halves(c) and row["context"].endswith(halves(c)[0]) and halves(c)[1] == gold for c in ls))
        assert len(lines[0]) == 12  # 五言: the one 七言 poem has no same-form distractors, so no item
    assert traditional_ratio(r["context"] for r in read["tang_couplet_simplified"]) == 0.0
    # lm_eval indexes the directory: the four tasks and the two groups.
    from lm_eval.tasks import TaskManager

    names = set(TaskManager(include_path=str(tasks), include_defaults=False).all_tasks)
    assert set(counts) | {"tang_nextline", "tang_couplet"} <= names
