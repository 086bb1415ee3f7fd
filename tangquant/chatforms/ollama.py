"""An ollama ``Modelfile`` and the prompt ollama renders through it for a chat.

Read from ollama's source (``parser/parser.go``, ``template/template.go``, ``server/routes.go``):

- the chat handler puts the Modelfile's ``MESSAGE`` lines before the request's messages, and its
  ``SYSTEM`` first when the request's first message is not a system message;
- ``template.Parse`` appends ``{{ .Response }}`` to a template that names neither ``.Messages``
  nor ``.Response``;
- ``collate`` joins every system message (``\\n\\n``) into ``.System`` and merges consecutive
  messages of one role;
- a template that names ``.Messages`` is executed once, with ``.Messages`` and ``.System``;
- an old-style template (``.System``/``.Prompt``/``.Response``) is executed once per earlier turn,
  with that turn's system, prompt and response, and once more for the turn being answered, cut
  after its first ``.Response`` — so whatever follows ``{{ .Response }}`` (``<|im_end|>``) must be
  in the template for the earlier replies to be closed.
"""

from __future__ import annotations

import re

from tangquant.chatforms.goexec import execute
from tangquant.chatforms.gotemplate import Action, Branch, Field, Pipe, Struct, TemplateError, parse
from tangquant.errors import InputError

COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
            "parameter", "message", "requires")
RESPONSE = Action(Pipe([[Field(None, ("Response",))]]))


def read_modelfile(text: str) -> dict:
    """{from, template, system, parameters [(name, value)], messages [{role, content}]}, as
    ollama's parser reads a Modelfile (values bare to the end of the line, or in ``"…"`` or
    ``\"\"\"…\"\"\"`` across lines)."""
    out: dict = {"template": None, "system": None, "parameters": [], "messages": []}
    pos = 0
    command = re.compile(r"[ \t\r\n]*(?:#[^\n]*\n?|([A-Za-z]+)[ \t]+)")
    while pos < len(text):
        m = command.match(text, pos)
        if not m or m.end() == pos:
            raise InputError(f"Modelfile: cannot read {text[pos:pos + 20]!r}")
        pos = m.end()
        if not m.group(1):
            continue
        name = m.group(1).lower()
        if name not in COMMANDS:
            raise InputError(f"Modelfile: unknown command {m.group(1)!r}")
        value, pos = _value(text, pos)
        if name == "parameter":
            key, _, rest = value.partition(" ")
            out["parameters"].append((key, _unquote(rest.strip())))
        elif name == "message":
            role, _, rest = value.partition(" ")
            out["messages"].append({"role": role, "content": _unquote(rest.strip())})
        else:
            out["from" if name == "from" else name] = _unquote(value)
    if "from" not in out:
        raise InputError("Modelfile: no FROM line")
    return out


def _value(text: str, pos: int) -> tuple[str, int]:
    """The raw value starting at ``pos`` and where the next line starts."""
    for quote in ('"""', '"'):
        if text.startswith(quote, pos):
            end = text.find(quote, pos + len(quote))
            if end < 0:
                raise InputError(f"Modelfile: unterminated {quote} value")
            end += len(quote)
            nl = text.find("\n", end)
            return text[pos:end], len(text) if nl < 0 else nl + 1
    nl = text.find("\n", pos)
    nl = len(text) if nl < 0 else nl
    return text[pos:nl].strip(), nl + 1


def _unquote(s: str) -> str:
    s = s.strip()
    if s.startswith('"""') and s.endswith('"""') and len(s) >= 6:
        return s[3:-3]
    if s.startswith('"') and s.endswith('"') and len(s) >= 2:
        return s[1:-1]
    return s


def identifiers(nodes) -> set[str]:
    """The lower-cased names ollama's ``Template.Vars`` finds (fields and variables)."""
    found: set[str] = set()

    def arg(a):
        if isinstance(a, Field) and not isinstance(a.base, Pipe):  # Go's ChainNode names nothing
            found.update(n.lower() for n in ((a.base,) if a.base else ()) + a.chain)

    def walk(node):
        if isinstance(node, Action):
            for cmd in node.pipe.cmds:
                for a in cmd:
                    arg(a)
        elif isinstance(node, Branch):
            walk(Action(node.pipe))
            for child in node.body + (node.orelse or []):
                walk(child)

    for n in nodes:
        walk(n)
    return found


def collate(messages: list[dict]) -> tuple[str, list[dict]]:
    system, out = [], []
    for m in messages:
        if m["role"] == "system":
            system.append(m["content"])
        if out and out[-1]["role"] == m["role"] and m["role"] != "tool":
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    return "\n\n".join(system), out


def render(modelfile: dict, messages: list[dict]) -> str:
    """The prompt ollama's ``/api/chat`` builds from ``messages`` through the Modelfile."""
    msgs = list(modelfile.get("messages") or []) + list(messages)
    if modelfile.get("system") and messages and messages[0]["role"] != "system":
        msgs = [{"role": "system", "content": modelfile["system"]}] + msgs
    nodes = parse(modelfile.get("template") or "{{ .Prompt }}")
    names = identifiers(nodes)
    if "messages" not in names and "response" not in names:
        nodes = nodes + [RESPONSE]
    system, collated = collate(msgs)
    flags = {"Think": False, "ThinkLevel": "", "IsThinkSet": False}
    if "messages" in names:
        structs = [Struct(Role=m["role"], Content=m["content"], Thinking="", Images=[], ToolCalls=[],
                          ToolName="", ToolCallID="") for m in collated]
        return execute(nodes, {"System": system, "Messages": structs, "Tools": [], "Response": "",
                               **flags})
    return _legacy(nodes, collated, flags)


def _legacy(nodes: list, collated: list[dict], flags: dict) -> str:
    out: list[str] = []
    turn = {"System": "", "Prompt": "", "Response": ""}

    def flush():
        out.append(execute(nodes, {**turn, **flags}))
        turn.update(System="", Prompt="", Response="")

    for m in collated:
        if m["role"] == "system":
            if turn["Prompt"] or turn["Response"]:
                flush()
            turn["System"] = m["content"]
        elif m["role"] == "user":
            if turn["Response"]:
                flush()
            turn["Prompt"] = m["content"]
        elif m["role"] == "assistant":
            turn["Response"] = m["content"]
    out.append(execute(cut_after_response(nodes), {**turn, **flags}))
    return "".join(out)


def cut_after_response(nodes: list) -> list:
    """ollama's ``deleteNode``: everything after the first ``.Response`` field, walked in order."""
    cut = False

    def gone(node) -> bool:
        nonlocal cut
        if isinstance(node, Field) and node.base is None and "Response" in node.chain:
            cut = True
            return False
        return cut

    def walk_list(items):
        return [n for n in (walk(i) for i in items) if n is not None]

    def walk(node):
        if gone(node):
            return None
        if isinstance(node, Branch):
            body = walk_list(node.body)
            if node.orelse is not None and cut:
                raise TemplateError("template: ollama fails on a .Response inside an {{if}} or {{range}} "
                                    "that has an {{else}}")
            return Branch(node.kind, node.pipe, body,
                          walk_list(node.orelse) if node.orelse is not None else None)
        if isinstance(node, Action):
            cmds = [c for c in ([a for a in cmd if walk(a) is not None] for cmd in node.pipe.cmds) if c]
            return Action(Pipe(cmds, node.pipe.decl, node.pipe.assign)) if cmds else None
        return node

    return walk_list(nodes)
