"""Go's text/template, the part of it that ollama's chat templates use (standard library only).

ollama renders a Modelfile's ``TEMPLATE`` with Go's text/template; tangquant checks the Modelfile it
writes by rendering it the same way (:mod:`tangquant.ollama_template`). Supported: text, comments,
``{{-``/``-}}`` trimming, field chains (``.A.B``, ``$``, ``$.A``, ``$x.A``, ``(pipeline).A``),
string, number, bool and nil literals, ``|`` pipes, ``$x := …`` and ``$x = …``, ``if``/``else if``/
``else``, ``range`` (with ``$i, $v :=``)/``else`` with ``break`` and ``continue``, ``with``/``else
with``, and the functions ``and or not eq ne lt le gt ge len index slice print printf json``
(``printf``: the verbs ``%s %d %v %q %%``). Anything else (``define``, ``template``, ``block``, other
functions, other verbs) is refused by name, never guessed.

Data: a ``dict`` is a Go map (a missing key gives nil, as ollama's ``missingkey=zero`` does for
``map[string]any``), a :class:`Struct` a Go struct (a missing field is an error).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from tangquant.errors import InputError

SPACE = " \t\r\n"
FUNCTIONS = ("and", "or", "not", "eq", "ne", "lt", "le", "gt", "ge", "len", "index", "slice", "print",
             "printf", "json")
REFUSED = ("define", "template", "block")
_TOKEN = re.compile(r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<op>:=|[()|,=])
    |(?P<var>\$[A-Za-z0-9_]*)|(?P<field>\.[A-Za-z0-9_]*)|(?P<num>[-+]?[0-9][0-9a-fA-FxX._eE+-]*)
    |(?P<ident>[A-Za-z_][A-Za-z0-9_]*))""", re.X)


class TemplateError(InputError):
    """A template this renderer cannot parse or execute (Go would fail too, or it is unsupported)."""


class Struct(dict):
    """A Go struct: its fields by name; a missing one is an execution error, not nil."""


@dataclass
class Field:
    base: object          # None: the dot; "$name": a variable; a Pipe: a parenthesised pipeline
    chain: tuple = ()


@dataclass
class Literal:
    value: object


@dataclass
class Func:
    name: str


@dataclass
class Pipe:
    cmds: list            # list of commands, each a list of operands
    decl: tuple = ()      # variables declared (:=) or assigned (=)
    assign: bool = False


@dataclass
class Action:
    pipe: Pipe


@dataclass
class Loop:
    word: str             # break, continue


@dataclass
class Branch:
    kind: str             # if, with, range
    pipe: Pipe
    body: list
    orelse: list | None = None


@dataclass
class Tokens:
    items: list
    pos: int = 0
    spaced: list = field(default_factory=list)  # whether whitespace preceded each token

    def peek(self, k: int = 0):
        i = self.pos + k
        return self.items[i] if i < len(self.items) else (None, None)

    def take(self):
        tok = self.peek()
        self.pos += 1
        return tok


def _lex(text: str) -> Tokens:
    items, spaced, pos = [], [], 0
    while pos < len(text):
        if text[pos:].strip(SPACE) == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"template: unexpected {text[pos:pos + 10]!r} in action {{{{{text}}}}}")
        kind = m.lastgroup
        items.append((kind, m.group(kind)))
        spaced.append(m.start(kind) > pos)
        pos = m.end()
    return Tokens(items, spaced=spaced)


def _split(src: str) -> list[tuple[str, str]]:
    """[("text", …), ("action", inner)…] with the trim markers applied; comments dropped."""
    out, pos = [], 0
    while True:
        i = src.find("{{", pos)
        if i < 0:
            out.append(("text", src[pos:]))
            return out
        text, j = src[pos:i], i + 2
        if src.startswith("-", j) and src[j + 1:j + 2] in tuple(SPACE):
            text, j = text.rstrip(SPACE), j + 2
        out.append(("text", text))
        k = _close(src, j)
        inner = src[j:k]
        rtrim = len(inner) >= 2 and inner[-1] == "-" and inner[-2] in SPACE
        if rtrim:
            inner = inner[:-2]
        if not inner.strip(SPACE).startswith("/*"):
            out.append(("action", inner))
        pos = k + 2
        while rtrim and pos < len(src) and src[pos] in SPACE:
            pos += 1


def _close(src: str, j: int) -> int:
    """Where the action opened before ``j`` closes (``}}`` outside quotes and comments)."""
    k, quote = j, None
    if src[j:].lstrip(SPACE).startswith("/*"):
        end = src.find("*/", j)
        k = end + 2 if end >= 0 else len(src)
    while k < len(src):
        c = src[k]
        if quote:
            if c == "\\" and quote == '"':
                k += 1
            elif c == quote:
                quote = None
        elif c in "\"`":
            quote = c
        elif src.startswith("}}", k):
            return k
        k += 1
    raise TemplateError("template: unclosed action")


def parse(src: str) -> list:
    """The template's node list."""
    parser = _Parser(_split(src))
    nodes, end = parser.nodes(stop=False)
    return nodes


class _Parser:
    def __init__(self, items):
        self.items, self.i, self.ranges = items, 0, 0

    def nodes(self, stop: bool):
        out = []
        while self.i < len(self.items):
            kind, value = self.items[self.i]
            self.i += 1
            if kind == "text":
                if value:
                    out.append(value)
                continue
            toks = _lex(value)
            head = toks.peek()
            if head == (None, None):
                raise TemplateError("template: missing value for command")
            if head[0] == "ident" and head[1] in ("end", "else"):
                if not stop:
                    raise TemplateError(f"template: unexpected {{{{{head[1]}}}}}")
                toks.take()
                return out, (head[1], toks)
            if head[0] == "ident" and head[1] in REFUSED:
                raise TemplateError(f"template: {{{{{head[1]}}}}} is not supported by tangquant's renderer")
            if head[0] == "ident" and head[1] in ("break", "continue"):
                if not self.ranges:
                    raise TemplateError(f"template: {{{{{head[1]}}}}} outside {{{{range}}}}")
                out.append(Loop(head[1]))
                continue
            if head[0] == "ident" and head[1] in ("if", "with", "range"):
                toks.take()
                out.append(self.branch(head[1], toks))
                continue
            out.append(Action(_pipe(toks, decl=True)))
        if stop:
            raise TemplateError("template: unexpected EOF (an {{if}}, {{range}} or {{with}} has no {{end}})")
        return out, None

    def branch(self, kind: str, toks: Tokens) -> Branch:
        pipe = _pipe(toks, decl=True, pair=kind == "range")
        self.ranges += kind == "range"
        body, (term, rest) = self.nodes(stop=True)
        self.ranges -= kind == "range"
        orelse = None
        if term == "else":
            nxt = rest.peek()
            if nxt[0] == "ident" and nxt[1] == kind and kind in ("if", "with"):
                rest.take()
                orelse = [self.branch(kind, rest)]  # "else if": the inner branch takes the {{end}}
            else:
                if nxt != (None, None):
                    raise TemplateError(f"template: unexpected {nxt[1]!r} after else")
                orelse, (term, _) = self.nodes(stop=True)
                if term != "end":
                    raise TemplateError("template: expected end; found else")
        return Branch(kind, pipe, body, orelse)


def _pipe(toks: Tokens, decl: bool = False, pair: bool = False, close: bool = False) -> Pipe:
    names, assign = _declaration(toks, pair) if decl else ((), False)
    cmds, cmd = [], []
    while True:
        kind, value = toks.peek()
        if kind is None or (close and value == ")"):
            break
        if kind == "op" and value == "|":
            toks.take()
            if not cmd:
                raise TemplateError("template: missing command before |")
            cmds.append(cmd)
            cmd = []
            continue
        cmd.append(_operand(toks))
    if close:
        if toks.take() != ("op", ")"):
            raise TemplateError("template: unclosed left paren")
    if not cmd:
        raise TemplateError("template: missing value for command")
    cmds.append(cmd)
    return Pipe(cmds, names, assign)


def _declaration(toks: Tokens, pair: bool):
    k0, k1, k2, k3 = toks.peek(), toks.peek(1), toks.peek(2), toks.peek(3)
    if k0[0] == "var" and k1 in (("op", ":="), ("op", "=")):
        toks.pos += 2
        return (k0[1],), k1[1] == "="
    if pair and k0[0] == "var" and k1 == ("op", ",") and k2[0] == "var" and k3 == ("op", ":="):
        toks.pos += 4
        return (k0[1], k2[1]), False
    return (), False


def _operand(toks: Tokens):
    kind, value = toks.take()
    if kind == "str":
        node = Literal(ast.literal_eval(value))
    elif kind == "raw":
        node = Literal(value[1:-1])
    elif kind == "num":
        node = Literal(_number(value))
    elif kind == "ident":
        if value in ("true", "false", "nil"):
            return Literal({"true": True, "false": False, "nil": None}[value])
        if value not in FUNCTIONS:
            raise TemplateError(f"template: function {value!r} not defined (or not supported by "
                                "tangquant's renderer)")
        return Func(value)
    elif kind == "field":
        node = Field(None, (value[1:],) if value != "." else ())
    elif kind == "var":
        node = Field(value)
    elif (kind, value) == ("op", "("):
        node = Field(_pipe(toks, close=True))
    else:
        raise TemplateError(f"template: unexpected {value!r}")
    while isinstance(node, Field) and toks.peek()[0] == "field" and not toks.spaced[toks.pos] \
            and toks.peek()[1] != ".":
        node = Field(node.base, node.chain + (toks.take()[1][1:],))
    return node


def _number(text: str):
    try:
        return int(text, 0)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise TemplateError(f"template: bad number syntax: {text!r}") from None
