"""``response_format``: JSON-schema and JSON-object replies through ``StructuredOutputConfig``.

openvino-genai compiles the schema with XGrammar (strict mode: no properties or
items beyond those named) inside ``step()``, and a schema XGrammar refuses
throws out of ``step()`` and leaves the shared pipeline unusable — every other
request in the batch with it. So a schema is checked here first and refused with
a 400 unless it stays inside a subset known to compile: a valid JSON Schema
(``jsonschema``'s meta-schema check) using only the keywords below, local
``$ref``s that resolve, satisfiable bounds, and regular expressions without the
constructs XGrammar's regex converter rejects (look-around, back-references,
``\\p`` classes, inline groups), finite numbers only (``NaN`` is not JSON: XGrammar's
parser refuses the whole schema), and integer bounds that are whole and within int64.
``tests/test_serve_engine.py`` runs the accepted and refused cases through the real engine.
What passes here is then compiled by the engine itself before the request is queued
(``server.grammar`` for OpenVINO, llama.cpp's grammar in its child process).
"""

from __future__ import annotations

import json
import math
import re

import jsonschema

from tangquant.server.schema import ApiError

MAX_SCHEMA_BYTES = 64 << 10
MAX_DEPTH = 32
TYPES = {"string", "integer", "number", "boolean", "null", "object", "array"}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment",
               "format", "name"}
KEYWORDS = ANNOTATIONS | {
    "type", "enum", "const", "properties", "required", "additionalProperties", "items",
    "prefixItems", "minItems", "maxItems", "anyOf", "oneOf", "$ref", "$defs", "definitions",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "pattern"}
_BAD_REGEX = re.compile(r"\(\?[^:]|\\[1-9]|\\[pPkgQEAZzb]|[*+?}]\+")
JSON_OBJECT = '{"type": "object"}'
INT64 = (-(1 << 63), (1 << 63) - 1)  # XGrammar's integer bounds are C int64


def _refuse(message: str):
    raise ApiError(400, f"response_format: {message}", "response_format", "invalid_schema")


def response_format(body: dict) -> str | None:
    """The JSON schema (text) a request's ``response_format`` asks for, or None for plain text."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        _refuse("must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                "{\"type\": \"json_schema\", \"json_schema\": {\"schema\": ...}}")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return JSON_OBJECT
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
        _refuse("json_schema.schema must be a JSON Schema object")
    text = json.dumps(spec["schema"], ensure_ascii=False)
    if len(text.encode("utf-8")) > MAX_SCHEMA_BYTES:
        _refuse(f"the schema is larger than {MAX_SCHEMA_BYTES} bytes")
    check_numbers(spec["schema"])
    check_schema(spec["schema"])
    return text


def check_numbers(schema) -> None:
    """Every number in the schema finite (a bound, a const, an enum value, a default alike).

    Python reads ``NaN``, ``Infinity`` and ``1e400`` from a request, and its JSON writer turns
    them into ``NaN``/``Infinity``, which no JSON parser in an engine reads; an integer past a
    double's range cannot be compared with one. Walked without recursion: the body may nest as
    deep as the JSON reader allows."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, float) and not math.isfinite(node):
            _refuse(f"the schema holds {node}, which is not a JSON number (NaN and infinities "
                    "are not JSON)")
        elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > 1.7e308:
            _refuse("the schema holds an integer beyond the range of a double")


def check_schema(schema) -> None:
    """Refuse (400) a schema outside the subset the engine compiles safely."""
    if schema is False:
        _refuse("the schema is false: no value matches it")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        _refuse(f"not a valid JSON Schema: {exc.message[:200]}")
    except RecursionError:
        _refuse("the schema is nested too deeply")
    _walk(schema, schema, "#", 0)


def _walk(node, root, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        _refuse(f"the schema is nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, bool):
        return
    unknown = sorted(set(node) - KEYWORDS)
    if unknown:
        _refuse(f"{where}: keyword {unknown[0]!r} is not supported (supported: "
                f"{', '.join(sorted(KEYWORDS - ANNOTATIONS))})")
    types = node.get("type", [])
    types = {types} if isinstance(types, str) else set(types)
    for key in ("enum", "anyOf", "oneOf"):
        if key in node and not node[key]:
            _refuse(f"{where}: {key} must not be empty")
    if "$ref" in node:
        _resolve(node["$ref"], root, where)
    _check_bounds(node, types, where)
    if "pattern" in node:
        _check_pattern(node["pattern"], where)
    _check_counts(node, where)
    for key in ("properties", "$defs", "definitions"):
        for name, sub in (node.get(key) or {}).items():
            _walk(sub, root, f"{where}/{key}/{name}", depth + 1)
    for key in ("anyOf", "oneOf", "prefixItems"):
        for i, sub in enumerate(node.get(key) or []):
            _walk(sub, root, f"{where}/{key}/{i}", depth + 1)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _walk(node[key], root, f"{where}/{key}", depth + 1)


def _resolve(ref, root, where: str) -> None:
    if ref == "#":
        return
    match = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref)
    if not match or not isinstance(root, dict) or match.group(2) not in (root.get(match.group(1))
                                                                         or {}):
        _refuse(f"{where}: $ref {ref[:80]!r} must name an entry of this schema's $defs")


def _check_bounds(node: dict, types: set, where: str) -> None:
    low = max((v for v in (node.get("minimum"), node.get("exclusiveMinimum")) if v is not None),
              default=-math.inf)
    high = min((v for v in (node.get("maximum"), node.get("exclusiveMaximum")) if v is not None),
               default=math.inf)
    if "integer" in types:
        _check_integer_bounds(node, where)
    if types == {"integer"} and low != -math.inf and high != math.inf:
        lo = math.floor(low) + 1 if "exclusiveMinimum" in node and low == node["exclusiveMinimum"] \
            else math.ceil(low)
        hi = math.ceil(high) - 1 if "exclusiveMaximum" in node and high == node["exclusiveMaximum"] \
            else math.floor(high)
        if lo > hi:
            _refuse(f"{where}: no integer lies within the bounds")
    if low > high or (low == high and ("exclusiveMinimum" in node or "exclusiveMaximum" in node)):
        _refuse(f"{where}: the minimum is above the maximum")
    if node.get("minLength", 0) > node.get("maxLength", math.inf):
        _refuse(f"{where}: minLength is above maxLength")


def _check_integer_bounds(node: dict, where: str) -> None:
    """XGrammar writes an integer's bounds as C int64: whole numbers, within its range."""
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        value = node.get(key)
        if value is None:
            continue
        if value != math.floor(value):
            _refuse(f"{where}: {key} of an integer must be a whole number, got {value}")
        if not INT64[0] <= value <= INT64[1]:
            _refuse(f"{where}: {key} of an integer must lie within the 64-bit range "
                    f"[-2^63, 2^63-1]")


def _check_counts(node: dict, where: str) -> None:
    """XGrammar's strict mode: no items beyond ``prefixItems`` unless ``items`` allows them."""
    low, high = node.get("minItems", 0), node.get("maxItems", math.inf)
    if low > high:
        _refuse(f"{where}: minItems is above maxItems")
    if low and node.get("items") in (None, False) and low > len(node.get("prefixItems") or []):
        _refuse(f"{where}: minItems needs an 'items' schema")


def _check_pattern(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        _refuse(f"{where}: pattern is not a valid regular expression ({exc})")
    if _BAD_REGEX.search(pattern):
        _refuse(f"{where}: pattern uses look-around, back-references, inline groups, \\p "
                "classes, anchors other than ^ and $, or possessive quantifiers, which are "
                "not supported")


def refuse_tools(body: dict) -> None:
    """Tool calls need a parser for the model's tool format; there is none yet."""
    if body.get("tools"):
        raise ApiError(400, "tools are not supported by this server (no tool-call parser for "
                       "this model)", "tools", "unsupported_value")
    if body.get("tool_choice") not in (None, "none"):
        raise ApiError(400, "tool_choice is not supported by this server", "tool_choice",
                       "unsupported_value")
