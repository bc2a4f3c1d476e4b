"""JSON schemas a request gives for its reply (OpenAI's `json_schema` response format, Ollama's `format`), compiled
into `Node`s that json_mode.py follows while the reply is generated. The keywords that shape a value are enforced;
those Meadow cannot enforce (a `pattern`, a `minimum`...) are refused, never ignored: a reply must match its schema."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction

import regex

TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf", "$ref",
            "minItems", "maxItems", "minLength", "maxLength", "pattern", "format", "minimum", "maximum",
            "exclusiveMinimum", "exclusiveMaximum"}
# the formats a string is held to (others are annotations, as JSON Schema's validators take them by default)
TIME = r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)"
YEAR = r"([1-9]\d{3}|0[1-9]\d\d|00[1-9]\d|000[1-9])"  # not year 0, which Python's dates refuse
DAY = r"((0[13578]|1[02])-(0[1-9]|[12]\d|3[01])|(0[469]|11)-(0[1-9]|[12]\d|30)|02-(0[1-9]|1\d|2[0-8]))"  # no 29 Feb
DATE = f"{YEAR}-{DAY}"
FORMATS = {
    "date": DATE,
    "time": TIME,
    "date-time": f"{DATE}T{TIME}",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "ipv4": r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)",
    "uri": r"[A-Za-z][A-Za-z0-9+.-]*:[^\s]+",
}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "$defs", "definitions",
               "deprecated", "readOnly", "writeOnly", "strict"}
MAX_DEPTH = 64  # schemas nested deeper are refused (they come from requests)
MAX_ALTERNATIVES = 16  # in one anyOf: the reply is read each of their ways at once


class SchemaError(ValueError):
    """A schema Meadow cannot follow; the message says where and why."""


@dataclass(eq=False)
class Node:
    """One schema, compiled: the values it allows. Objects give their declared properties in the schema's order (so
    the reply's keys come in that order, as with OpenAI's strict schemas); an object without declared properties takes
    any keys, each value matching `extra`."""

    types: frozenset[str] = TYPES
    properties: tuple[tuple[str, "Node"], ...] = ()
    required: frozenset[str] = frozenset()
    extra: "Node | None" = None  # the schema of any key's value, when no properties are declared; None: no keys
    items: "Node | None" = None
    min_items: int = 0
    max_items: int | None = None
    min_length: int = 0
    max_length: int | None = None
    patterns: tuple[regex.Pattern, ...] = ()  # a string's pattern and format, each searched in it
    lower: tuple[Fraction, bool] | None = None  # a number's minimum (value, exclusive)
    upper: tuple[Fraction, bool] | None = None
    enum: tuple[str, ...] | None = None  # the only JSON texts allowed (enum, const), compact
    any_of: tuple["Node", ...] = ()  # alternatives: the value matches one of them (the other fields unused)

    def alternatives(self) -> tuple["Node", ...]:
        return self.any_of or (self,)


def _any() -> Node:
    node = Node()
    node.extra = node.items = node
    return node


ANY = _any()  # any JSON value
OBJECT = Node(types=frozenset({"object"}), extra=ANY)  # any JSON object: JSON mode


def compile_schema(schema, where: str = "schema") -> Node:
    """The Node of a JSON schema (a dict, or True for anything), or a SchemaError naming what cannot be followed (and
    where in it, the schema itself called `where`)."""
    return _Compiler(schema).node(schema, where, 0)


class _Compiler:
    def __init__(self, root):
        self.root = root
        self.done: dict[int, Node] = {}  # by id of the schema dict: $refs may loop back

    def node(self, schema, where: str, depth: int, bare: frozenset[int] = frozenset()) -> Node:
        """`bare`: the schemas reached from here through $ref and anyOf alone (a loop among them allows nothing)."""
        if schema is True or schema == {}:
            return ANY
        if not isinstance(schema, dict):
            raise SchemaError(f"{where} must be a JSON schema (an object), not {json.dumps(schema)[:40]}")
        if id(schema) in bare:
            raise SchemaError(f"{where} refers back to itself with nothing in between")
        if id(schema) in self.done:
            return self.done[id(schema)]
        if depth > MAX_DEPTH:
            raise SchemaError(f"the schema is nested more than {MAX_DEPTH} deep")
        unknown = sorted(set(schema) - ENFORCED - ANNOTATIONS)
        if unknown:
            raise SchemaError(f"{where}: the keyword {unknown[0]!r} is not supported (no reply could be held to it)")
        if "$ref" in schema:
            self._alone(schema, "$ref", where)
            target = self._resolve(schema["$ref"], where)
            node = self.done[id(schema)] = self.node(target, f"{where}.$ref", depth + 1, bare | {id(schema)})
            return node
        node = self.done[id(schema)] = Node()  # before its parts: they may refer back to it
        if "anyOf" in schema:
            self._alone(schema, "anyOf", where)
            options = schema["anyOf"]
            if not isinstance(options, list) or not 0 < len(options) <= MAX_ALTERNATIVES:
                raise SchemaError(f"{where}: anyOf must list 1 to {MAX_ALTERNATIVES} schemas")
            nodes = [self.node(s, f"{where}.anyOf[{i}]", depth + 1, bare | {id(schema)}) for i, s in enumerate(options)]
            node.any_of = tuple(alternative for option in nodes for alternative in option.alternatives())
        else:
            self._fill(node, schema, where, depth)
        return node

    def _fill(self, node: Node, schema: dict, where: str, depth: int) -> None:
        types = schema.get("type", sorted(TYPES))
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or not types or not all(isinstance(t, str) and t in TYPES for t in types):
            raise SchemaError(f"{where}: type must be one of {sorted(TYPES)}, or a list of them")
        node.types = frozenset(types)
        if "enum" in schema or "const" in schema:
            values = schema["enum"] if "enum" in schema else [schema["const"]]
            if not isinstance(values, list):
                raise SchemaError(f"{where}: enum must be a list")
            node.enum = tuple(json.dumps(v, ensure_ascii=False) for v in values if _type_of(v) & node.types)
            if not node.enum:
                raise SchemaError(f"{where}: no value of its enum (or const) has its type")
            return
        node.min_length, node.max_length = self._bounds(schema, "minLength", "maxLength", where)
        node.patterns = self._patterns(schema, where)
        node.lower = self._limit(schema, "minimum", "exclusiveMinimum", max, where)
        node.upper = self._limit(schema, "maximum", "exclusiveMaximum", min, where)
        node.min_items, node.max_items = self._bounds(schema, "minItems", "maxItems", where)
        node.items = self.node(schema.get("items", True), f"{where}.items", depth + 1)
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        names = isinstance(required, list) and all(isinstance(name, str) for name in required)
        if not isinstance(properties, dict) or not names:
            raise SchemaError(f"{where}: properties must be an object and required a list of names")
        extra = schema.get("additionalProperties", True)
        extra = None if extra is False else self.node(extra, f"{where}.additionalProperties", depth + 1)
        missing = [name for name in required if name not in properties]
        if missing and extra is None:
            raise SchemaError(f"{where}: {missing[0]!r} is required but no such property is allowed")
        node.properties = tuple(
            [(name, self.node(s, f"{where}.properties.{name}", depth + 1)) for name, s in properties.items()]
            + [(name, extra) for name in dict.fromkeys(missing)]
        )
        node.required = frozenset(required)
        node.extra = extra if not node.properties else None  # declared properties only, when there are some

    def _alone(self, schema: dict, keyword: str, where: str) -> None:
        others = sorted(set(schema) & ENFORCED - {keyword})
        if others:
            raise SchemaError(f"{where}: {keyword} together with {others[0]!r} is not supported")

    def _resolve(self, ref, where: str):
        """A local reference: "#", "#/$defs/Name", "#/definitions/Name" (any JSON pointer into the schema)."""
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"{where}: only references into the schema itself (#/...) are supported")
        target = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"{where}: {ref!r} refers to nothing in the schema")
            target = target[part]
        return target

    @staticmethod
    def _limit(schema: dict, inclusive: str, exclusive: str, tighter, where: str) -> tuple[Fraction, bool] | None:
        """The tighter of a bound's inclusive and exclusive forms, as (value, exclusive)."""
        limits = []
        for key, strict in ((inclusive, False), (exclusive, True)):
            value = schema.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SchemaError(f"{where}: {key} must be a number")
            limits.append((Fraction(str(value)), strict))
        # at the same value the exclusive bound is the tighter one
        key = (lambda bound: bound) if tighter is max else (lambda bound: (bound[0], not bound[1]))
        return tighter(limits, key=key) if limits else None

    @staticmethod
    def _patterns(schema: dict, where: str) -> tuple[regex.Pattern, ...]:
        texts = [schema["pattern"]] if "pattern" in schema else []
        if not isinstance(schema.get("format", ""), str):
            raise SchemaError(f"{where}: format must be a name")
        if schema.get("format") in FORMATS:
            texts.append(f"^(?:{FORMATS[schema['format']]})\\Z")  # not $, which a final line break also matches
        try:
            return tuple(regex.compile(text) for text in texts)
        except (regex.error, TypeError) as e:
            raise SchemaError(f"{where}: its pattern is no regular expression ({e})") from None

    @staticmethod
    def _bounds(schema: dict, low: str, high: str, where: str) -> tuple[int, int | None]:
        least, most = schema.get(low, 0), schema.get(high)
        if not (isinstance(least, int) and least >= 0 and (most is None or isinstance(most, int) and most >= least)):
            raise SchemaError(f"{where}: {low} and {high} must be whole numbers, {low} <= {high}")
        return least, most


def _type_of(value) -> frozenset[str]:
    """The JSON schema types a Python value (parsed JSON) has."""
    if isinstance(value, bool):
        return frozenset({"boolean"})
    if isinstance(value, int):
        return frozenset({"integer", "number"})
    if isinstance(value, float):
        return frozenset({"number"} | ({"integer"} if value.is_integer() else set()))
    kinds = {str: "string", dict: "object", list: "array", type(None): "null"}
    return frozenset({kinds[type(value)]})
