"""The poem metrics (measure/poems.py) on hand-written answers, and the requests they check (prompts.py)."""

from __future__ import annotations

import json

import pytest

from tangquant import prompts
from tangquant.errors import InputError
from tangquant.measure import poems
from tangquant.poet import demo_paths

JUEJU_5_T = "《靜夜思》\n床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"
JUEJU_5_S = "《静夜思》\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
JUEJU_7 = "《早發白帝城》\n朝辭白帝彩雲間，千里江陵一日還。\n兩岸猿聲啼不住，輕舟已過萬重山。"
LUSHI_5 = ("《春望》\n国破山河在，城春草木深。\n感时花溅泪，恨别鸟惊心。\n"
           "烽火连三月，家书抵万金。\n白头搔更短，浑欲不胜簪。")
LUSHI_7 = ("《登高》\n風急天高猿嘯哀，渚清沙白鳥飛迴。\n無邊落木蕭蕭下，不盡長江滾滾來。\n"
           "萬里悲秋常作客，百年多病獨登臺。\n艱難苦恨繁霜鬢，潦倒新停濁酒杯。")


pytestmark = pytest.mark.fast


def test_form_accuracy_counts_lines_and_characters():
    assert poems.form_ok(JUEJU_5_T, "五言绝句") and poems.form_ok(JUEJU_5_S, "五言绝句")
    assert poems.form_ok(JUEJU_7, "七言绝句") and poems.form_ok(LUSHI_5, "五言律诗")
    assert poems.form_ok(LUSHI_7, "七言律诗")
    assert not poems.form_ok(JUEJU_5_T, "七言绝句")  # right count, wrong line length
    assert not poems.form_ok(LUSHI_5, "五言绝句")  # right length, eight lines not four
    # A body without its title line, and one written on one line, are the same form.
    assert poems.form_ok("床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。", "五言绝句")
    assert not poems.form_ok("《靜夜思》\n床前明月光，疑是地上霜。\n舉頭望明月，低頭思故", "五言绝句")  # cut off
    assert not poems.form_ok("《靜夜思》\n床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。\n一二三四五，", "五言绝句")
    assert not poems.form_ok("《題》\nabcde，疑是地上霜。\n舉頭望明月，低頭思故鄉。", "五言绝句")  # not Han
    # The title's characters are not a line: a 7-character title does not make a 七言 poem.
    assert poems.lines_of(poems.split_answer(JUEJU_7)[1]) == ["朝辭白帝彩雲間", "千里江陵一日還",
                                                            "兩岸猿聲啼不住", "輕舟已過萬重山"]


def test_title_accuracy_in_either_script():
    assert poems.title_ok(JUEJU_5_T, "静夜思") and poems.title_ok(JUEJU_5_T, "靜夜思")
    assert poems.title_ok(JUEJU_5_S, "靜夜思")
    assert not poems.title_ok(JUEJU_5_T, "春晓")
    assert not poems.title_ok("床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。", "静夜思")  # no title line
    assert not poems.title_ok("《静夜思》二首\n床前明月光，疑是地上霜。", "静夜思")  # the line is not 《X》 alone
    assert not poems.title_ok("床前明月光，《静夜思》\n疑是地上霜。", "静夜思")  # not the first line


def test_topic_hit_in_the_body_in_either_script():
    assert poems.topic_ok(JUEJU_5_T, "明月") and poems.topic_ok(JUEJU_5_S, "故乡")
    assert poems.topic_ok(JUEJU_5_T, "故乡")  # asked simplified, written traditional (故鄉)
    assert poems.topic_ok(LUSHI_7, "长江")
    assert not poems.topic_ok(JUEJU_5_T, "梅花")
    assert not poems.topic_ok("《明月》\n白日依山尽，黄河入海流。", "明月")  # in the title only


def test_follow_and_distinctness():
    asked = [{"prompt": "来一首五绝吧", "form": "五言绝句"},
             {"prompt": "请以《静夜思》为题写一首七言绝句", "title": "静夜思", "form": "七言绝句"},
             {"prompt": "写一首关于明月的诗", "topic": "明月"},
             {"prompt": "来一首诗吧"}]
    answers = [JUEJU_5_T, JUEJU_5_S, JUEJU_5_T, JUEJU_5_T]
    got = poems.follow(asked, answers)
    assert got["form"] == {"hits": 1, "asked": 2, "rate": 0.5}
    assert got["title"] == {"hits": 1, "asked": 1, "rate": 1.0}
    assert got["topic"] == {"hits": 1, "asked": 1, "rate": 1.0}
    assert poems.distinctness(answers) == 0.5 and poems.distinctness([]) is None
    s = poems.summary(asked, answers, [[JUEJU_7, JUEJU_5_T]] * 4)
    assert s["sampled"]["form"] == {"hits": 2, "asked": 4, "rate": 0.5}  # one right answer to each
    assert "| base | greedy | 50.0% (1/2) | 100.0% (1/1) | 100.0% (1/1) | 50.0% |" in poems.follow_table({"base": s})
    assert poems.kept(s, s)["form_greedy"] == 1.0


def test_shipped_heldout_prompts():
    items = poems.load_prompts(demo_paths()["prompts"])
    asks = {a for p in items for a in poems.ASKS if a in p}
    assert asks == set(poems.ASKS) and len(items) >= 20
    assert any("title" in p and "form" in p for p in items)
    assert any("topic" in p and "「" not in p["prompt"] for p in items)
    # Held out from the data: no prompt is an instance of a training template, nor a calibration prompt.
    patterns = prompts.template_patterns()
    assert [p["prompt"] for p in items if any(r.match(p["prompt"]) for r in patterns)] == []
    calib = json.loads((demo_paths()["base"].parent / "calib.json").read_text(encoding="utf-8"))
    assert not {p["prompt"] for p in items} & {c["instruction"] for c in calib}
    assert all(any(r.match(c["instruction"]) for r in patterns) for c in calib)


def test_prompt_file_errors(tmp_path):
    bad = {"unknown key": {"prompt": "写诗", "metre": "五言"}, "bad form": {"prompt": "写诗", "form": "五言"},
           "title not in prompt": {"prompt": "写一首诗", "title": "春晓"}}
    for name, item in bad.items():
        path = tmp_path / "p.json"
        path.write_text(json.dumps({"prompts": [item]}, ensure_ascii=False), encoding="utf-8")
        with pytest.raises(InputError):
            poems.load_prompts(path)
    with pytest.raises(InputError):
        poems.load_prompts(tmp_path / "missing.json")


@pytest.mark.parametrize("answer", [JUEJU_5_S, JUEJU_7, LUSHI_5, LUSHI_7])
def test_every_request_is_true_to_its_answer(answer):
    """What a request names (title, topic, form), the answer has: over many salts and every kind."""
    title, body = poems.split_answer(answer)
    simple = poems.simplify(body)
    topics, form = prompts.topics_in(simple), poems.form_of_lines(poems.lines_of(body))
    kinds = set()
    for salt in range(60):
        instruction, asks = prompts.request(body, title, topics, form, salt=str(salt))
        assert poems.follow([{"prompt": instruction, **asks}], [answer]) == {
            a: ({"hits": 1, "asked": 1, "rate": 1.0} if a in asks else {"hits": 0, "asked": 0, "rate": None})
            for a in poems.ASKS}, (instruction, asks)
        assert any(r.match(instruction) for r in prompts.template_patterns())
        kinds.add(tuple(sorted(asks)))
    assert len(kinds) == 7  # plain, each one, and the three pairs
    assert prompts.request(body, title, topics, form, salt="1") == prompts.request(body, title, topics, form, salt="1")
