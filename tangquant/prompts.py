"""Requests for a poem, phrased many ways: what ``tangquant data`` and the demo poet train on.

A request names nothing, or a poem's title, topic or form, or two of them,
and is always true to its answer: the title is the poem's own, the topic
occurs in its body, the form is the body's shape. Each kind of request has
many templates, because users do not type one phrasing; the kind, template,
topic and form name are chosen by a hash of the poem's text and a salt, so
the data is the same on every run and the same poem gets other phrasings
under another salt.

The demo's held-out prompts (``assets/demo/prompts.json``) use phrasings none
of these templates produce (请…, 来一首…吧, 作…), so they measure whether the
model follows a request or a template (a test checks that no held-out prompt
is an instance of a template here).
"""

from __future__ import annotations

import hashlib
import re

# Images of Tang poetry a topic request can name (simplified; matched in the simplified body).
TOPICS = ("明月", "春风", "秋风", "白云", "青山", "流水", "落花", "杨柳", "故乡", "归雁", "夕阳",
          "长江", "黄河", "边塞", "孤舟", "芳草", "寒山", "烟雨", "桃花", "梅花", "美酒", "离别",
          "月", "雪", "雨", "酒", "花", "山", "江", "秋", "春", "柳", "雁", "松", "竹", "梦",
          "菊", "鹤", "蝉", "霜", "琴", "钟", "灯", "舟", "楼", "泉", "溪", "草", "鸟", "猿",
          "故人", "相思", "黄昏", "西风", "白发", "秋月", "春雨", "江南", "渔", "剑", "马", "荷",
          "夜", "海", "烟", "星", "笛", "桥")
# Form names as users write them: the full name and the short one.
FORM_NAMES = {"五言绝句": ("五言绝句", "五绝"), "七言绝句": ("七言绝句", "七绝"),
              "五言律诗": ("五言律诗", "五律"), "七言律诗": ("七言律诗", "七律")}

# {title} is the poem's title, {topic} an image in its body, {form} a name of its form.
# None of them starts with 请, 来 or 作, and none uses 作 as its verb: the held-out prompts do.
TEMPLATES = {
    "plain": ("写一首唐诗", "写一首诗", "帮我写一首唐诗", "给我写一首诗", "写首诗", "能写一首唐诗吗",
              "我想读一首唐诗", "随便写一首诗", "写一首古诗", "吟一首诗", "赋诗一首", "写一首唐人风格的诗"),
    "title": ("以《{title}》为题写一首诗", "写一首题为《{title}》的诗", "题目是《{title}》，写一首诗",
              "给我写一首《{title}》", "帮我写一首以《{title}》为题的诗", "用《{title}》做题目写首诗",
              "能以《{title}》为题写一首唐诗吗", "写一首诗，题为《{title}》", "诗题：《{title}》",
              "《{title}》，写一首唐诗"),
    "topic": ("写一首关于「{topic}」的诗", "写一首以「{topic}」为主题的诗", "写一首咏{topic}的诗",
              "帮我写一首写「{topic}」的唐诗", "给我写一首和{topic}有关的诗", "写首诗，主题是「{topic}」",
              "以{topic}为主题写一首诗", "写一首诗，要写到「{topic}」"),
    "form": ("写一首{form}", "写首{form}", "帮我写一首{form}", "给我写一首{form}", "能写一首{form}吗",
             "写一首唐诗，体裁是{form}", "我想读一首{form}", "写一首{form}的唐诗", "吟一首{form}"),
    "title+form": ("以《{title}》为题写一首{form}", "写一首{form}，题为《{title}》",
                   "题目是《{title}》，写一首{form}", "帮我写一首{form}《{title}》",
                   "给我写一首题为《{title}》的{form}", "用{form}写一首《{title}》"),
    "topic+form": ("写一首关于「{topic}」的{form}", "写一首咏{topic}的{form}", "帮我写一首{form}，写「{topic}」",
                   "以「{topic}」为主题写一首{form}", "给我写一首和{topic}有关的{form}"),
    "title+topic": ("以《{title}》为题写一首关于「{topic}」的诗", "写一首题为《{title}》的诗，写到「{topic}」",
                    "帮我写一首《{title}》，主题是{topic}"),
}
TITLE_PROMPT_OK = re.compile(r"^[\u4e00-\u9fff]{1,16}$")  # a title short enough to ask for


def pick(key: str, salt: str, n: int) -> int:
    """A number in [0, n) fixed by ``key`` and ``salt`` (sha256, not Python's salted hash)."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n


def topics_in(simple_body: str) -> list[str]:
    """The TOPICS that occur in a (simplified) body, in TOPICS order."""
    return [t for t in TOPICS if t in simple_body]


def kinds_for(title: str | None, topics: list[str], form: str | None) -> list[str]:
    """The kinds of request this poem can truthfully answer."""
    has = {"title": bool(title and TITLE_PROMPT_OK.match(title)), "topic": bool(topics), "form": bool(form)}
    return [k for k in TEMPLATES if all(has[part] for part in k.split("+") if part != "plain")]


def request(key: str, title: str | None, topics: list[str], form: str | None,
            salt: str = "0") -> tuple[str, dict]:
    """(instruction, what it asks) for one poem; ``key`` is its text, ``salt`` varies the choice.

    ``title`` is in the script the instruction should show; ``topics`` and
    ``form`` are simplified, as users type them. The dict holds the keys
    ``title``/``topic``/``form`` that the instruction names.
    """
    kinds = kinds_for(title, topics, form)
    kind = kinds[pick(key, "kind" + salt, len(kinds))]
    templates = TEMPLATES[kind]
    template = templates[pick(key, "template" + salt, len(templates))]
    asks: dict = {}
    fields = {}
    if "title" in kind:
        asks["title"] = fields["title"] = title
    if "topic" in kind:
        # Prefer two-character images (明月 over 月): they say more about the poem.
        pool = [t for t in topics if len(t) > 1] or topics
        asks["topic"] = fields["topic"] = pool[pick(key, "topic" + salt, len(pool))]
    if "form" in kind:
        asks["form"] = form
        names = FORM_NAMES[form]
        fields["form"] = names[pick(key, "form" + salt, len(names))]
    return template.format(**fields), asks


def template_patterns() -> list[re.Pattern]:
    """Every template as a regular expression, to tell whether a prompt is one of them."""
    slots = {"{title}": "[^《》]+",
             "{topic}": "(?:" + "|".join(sorted(TOPICS, key=len, reverse=True)) + ")",
             "{form}": "(?:" + "|".join(n for names in FORM_NAMES.values() for n in names) + ")"}
    out = []
    for templates in TEMPLATES.values():
        for t in templates:
            parts = re.split(r"(\{title\}|\{topic\}|\{form\})", t)
            out.append(re.compile("^" + "".join(slots.get(p, re.escape(p)) for p in parts) + "$"))
    return out
