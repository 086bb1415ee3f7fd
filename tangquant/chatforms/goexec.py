"""Executing a parsed Go text/template (:mod:`tangquant.chatforms.gotemplate`) as Go does.

Truth is Go's (false, 0, nil, and empty strings, lists and maps are false), ``and``/``or`` return
an operand and stop early, a value prints as Go's ``fmt`` prints it (nil as ``<no value>``, a list
as ``[a b]``), ``len`` counts a string's UTF-8 bytes and ``json`` escapes ``<``, ``>`` and ``&`` as
Go's encoder does. Variables live until the ``{{end}}`` of the block that declared them.
"""

from __future__ import annotations

import json
import re

from tangquant.chatforms.gotemplate import (Action, Branch, Func, Literal, Loop, Pipe, Struct,
                                            TemplateError)


def execute(nodes: list, data) -> str:
    out: list[str] = []
    _run(nodes, data, [("$", data)], out)
    return "".join(out)


def truth(value) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, Struct):
        return True
    if isinstance(value, (int, float, str, list, tuple, dict)) and not isinstance(value, bool):
        return bool(value)
    return True


def show(value) -> str:
    """fmt.Sprint of one value."""
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, int) else f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(show(v) for v in value) + "]"
    raise TemplateError(f"template: printing a {type(value).__name__} is not supported by tangquant's "
                        "renderer")


def _run(nodes: list, dot, scope: list, out: list) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Loop):
            raise _Break() if node.word == "break" else _Continue()
        elif isinstance(node, Action):
            value = _pipe(node.pipe, dot, scope)
            if not node.pipe.decl:
                out.append(show(value))
        else:
            _branch(node, dot, scope, out)


def _branch(node: Branch, dot, scope: list, out: list) -> None:
    mark = len(scope)
    try:
        if node.kind == "range":
            _range(node, dot, scope, out)
            return
        value = _pipe(node.pipe, dot, scope)
        if truth(value):
            _run(node.body, value if node.kind == "with" else dot, scope, out)
        elif node.orelse is not None:
            _run(node.orelse, dot, scope, out)
    finally:
        del scope[mark:]


def _range(node: Branch, dot, scope: list, out: list) -> None:
    value = _pipe(Pipe(node.pipe.cmds), dot, scope)
    if isinstance(value, Struct) or not isinstance(value, (list, tuple, dict, type(None))):
        raise TemplateError(f"template: range can't iterate over {show(value)}")
    pairs = sorted(value.items()) if isinstance(value, dict) else list(enumerate(value or ()))
    if not pairs:
        if node.orelse is not None:
            _run(node.orelse, dot, scope, out)
        return
    names = node.pipe.decl
    for key, item in pairs:
        mark = len(scope)
        if len(names) == 2:
            scope += [(names[0], key), (names[1], item)]
        elif names:
            scope.append((names[0], item))
        try:
            _run(node.body, item, scope, out)
        except _Continue:
            pass
        except _Break:
            return
        finally:
            del scope[mark:]


def _pipe(pipe: Pipe, dot, scope: list):
    value, first = None, True
    for cmd in pipe.cmds:
        value = _command(cmd, dot, scope, None if first else (value,))
        first = False
    if pipe.decl:
        if pipe.assign:
            _assign(scope, pipe.decl[0], value)
        else:
            scope.append((pipe.decl[-1], value))
    return value


def _assign(scope: list, name: str, value) -> None:
    for i in range(len(scope) - 1, -1, -1):
        if scope[i][0] == name:
            scope[i] = (name, value)
            return
    raise TemplateError(f"template: undefined variable: {name}")


def _command(cmd: list, dot, scope: list, piped):
    head = cmd[0]
    if isinstance(head, Func):
        return _call(head.name, cmd[1:], dot, scope, piped)
    if len(cmd) > 1 or piped is not None:
        raise TemplateError(f"template: can't give argument to non-function {cmd[0]}")
    return _value(head, dot, scope)


def _value(node, dot, scope: list):
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, Func):
        raise TemplateError(f"template: function {node.name} used as a value")
    base = node.base
    if base is None:
        value = dot
    elif isinstance(base, Pipe):
        value = _pipe(base, dot, scope)
    else:
        value = _variable(scope, base)
    for name in node.chain:
        value = _field(value, name)
    return value


def _variable(scope: list, name: str):
    for key, value in reversed(scope):
        if key == name:
            return value
    raise TemplateError(f"template: undefined variable: {name}")


def _field(value, name: str):
    if isinstance(value, Struct):
        if name not in value:
            raise TemplateError(f"template: can't evaluate field {name}")
        return value[name]
    if isinstance(value, dict):
        return value.get(name)  # missingkey=zero on map[string]any: nil
    raise TemplateError(f"template: can't evaluate field {name} in {show(value) if value is not None else 'nil'}")


def _call(name: str, args: list, dot, scope: list, piped):
    if name in ("and", "or"):
        nodes = list(args) + ([Literal(piped[0])] if piped else [])
        value = None
        for node in nodes:
            value = _value(node, dot, scope)
            if truth(value) != (name == "and"):
                return value
        return value
    values = [_value(a, dot, scope) for a in args] + (list(piped) if piped else [])
    return _FUNCS[name](*values)


def _eq(a, *others):
    if not others:
        raise TemplateError("template: eq: missing argument for comparison")
    return any(_compare(a, b) == 0 for b in others)


def _compare(a, b) -> int:
    num = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        if type(a) is not type(b):
            raise TemplateError("template: incompatible types for comparison")
    elif not ((isinstance(a, num) and isinstance(b, num)) or (isinstance(a, str) and isinstance(b, str))):
        raise TemplateError("template: incompatible types for comparison")
    return (a > b) - (a < b)


def _index(value, *keys):
    for key in keys:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, (list, tuple)) and isinstance(key, int) and 0 <= key < len(value):
            value = value[key]
        else:
            raise TemplateError(f"template: index out of range: {key}")
    return value


def _go_json(value) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for c, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                   ("\u2029", "\\u2029")):
        text = text.replace(c, esc)
    return text


def _sprint(*values) -> str:
    out = []
    for i, v in enumerate(values):
        if i and not isinstance(v, str) and not isinstance(values[i - 1], str):
            out.append(" ")
        out.append(show(v))
    return "".join(out)


def _len(value) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, (list, tuple, dict)):
        return len(value)
    raise TemplateError(f"template: len of {type(value).__name__}")


def _slice(value, *bounds):
    """Go's ``slice x i j``: x[i:j] (``slice x i`` is x[i:])."""
    if not isinstance(value, (str, list, tuple)) or len(bounds) > 2:
        raise TemplateError("template: slice takes a string or a list and at most two indexes")
    cut = slice(*bounds) if len(bounds) == 2 else slice(bounds[0] if bounds else 0, None)
    if isinstance(value, str):
        return value.encode("utf-8")[cut].decode("utf-8", "replace")
    return list(value[cut])


_VERB = re.compile(r"%(%|[sdvq])|%")


def _printf(fmt: str, *args) -> str:
    """fmt.Sprintf with the verbs %s %d %v %q and %%."""
    values, out = list(args), []

    def one(m):
        if m.group(1) == "%":
            return "%"
        if not m.group(1):
            raise TemplateError(f"template: printf verb in {fmt!r} is not supported by tangquant's renderer")
        if not values:
            return f"%!{m.group(1)}(MISSING)"
        v = values.pop(0)
        return json.dumps(v, ensure_ascii=False) if m.group(1) == "q" else show(v)

    out.append(_VERB.sub(one, fmt))
    if values:
        out.append("%!(EXTRA " + ", ".join(f"{type(v).__name__}={show(v)}" for v in values) + ")")
    return "".join(out)


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


_FUNCS = {
    "not": lambda v: not truth(v), "eq": _eq, "ne": lambda a, b: _compare(a, b) != 0,
    "lt": lambda a, b: _compare(a, b) < 0, "le": lambda a, b: _compare(a, b) <= 0,
    "gt": lambda a, b: _compare(a, b) > 0, "ge": lambda a, b: _compare(a, b) >= 0,
    "len": _len, "index": _index, "slice": _slice, "print": _sprint, "printf": _printf,
    "json": _go_json,
}
