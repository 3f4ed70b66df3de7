"""Whether today's AsyncAPI document breaks consumers of an earlier one.

`compare(old, new)` walks both documents and sorts every difference that matters to a consumer
into breaking changes and additions. Breaking:

- a channel, operation or message removed; a channel's address, parameters or a parameter's
  pattern changed; a message moved off a channel; a message's content type changed;
- in a message's headers or payload (followed through `$ref`s, `anyOf`/`oneOf`, arrays and
  maps): a field removed; a field's type changed (narrowed or widened, `null` included); a
  field that became required, or no longer is; a new required field; an enum value removed; a
  `const` changed; a constraint changed (`pattern`, `format`, lengths, bounds, item counts);
- the stream's name, its subjects or the integrators' subscription changed.

A new required field is breaking even though a consumer could ignore it: the events recorded
before it lack it, and they are delivered, replayed and served for as long as they exist. Such
a change is a new topic version (a new message). Additions: new channels, operations, messages,
optional fields, headers that are not required, and enum values. Descriptions, titles, examples,
defaults and servers may change freely.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Json = Any

CONSTRAINTS = (
    "pattern",
    "format",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
)


@dataclass
class Report:
    breaking: list[str] = field(default_factory=list)
    additions: list[str] = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        return not self.breaking


class _Missing:
    def __repr__(self) -> str:
        return "(none)"


MISSING = _Missing()


def _show(value: Json) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(_show(item) for item in value) + "]"
    return repr(value)


class _Document:
    def __init__(self, document: Mapping[str, Json]) -> None:
        self.root = document

    def resolve(self, node: Json) -> Json:
        """`node` with local `$ref`s followed (a chain of them, not a cycle)."""
        seen: set[str] = set()
        while isinstance(node, Mapping) and isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if ref in seen or not ref.startswith("#/"):
                raise ValueError(f"cannot resolve $ref {ref!r}")
            seen.add(ref)
            target: Json = self.root
            for token in ref[2:].split("/"):
                part = token.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, Mapping) or part not in target:
                    raise ValueError(f"$ref {ref!r} names nothing in the document")
                target = target[part]
            node = target
        return node

    def section(self, *path: str) -> Mapping[str, Json]:
        node: Json = self.root
        for part in path:
            node = node.get(part, {}) if isinstance(node, Mapping) else {}
        node = self.resolve(node)
        return node if isinstance(node, Mapping) else {}


JSON_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),  # before int: a bool is an int in Python
    (int, "integer"),
    (float, "number"),
    (str, "string"),
    (list, "array"),
    (dict, "object"),
)


def _json_type(value: Json) -> str:
    if value is None:
        return "null"
    return next((name for kind, name in JSON_TYPES if isinstance(value, kind)), "object")


class _Comparison:
    def __init__(self, old: Mapping[str, Json], new: Mapping[str, Json]) -> None:
        self.old = _Document(old)
        self.new = _Document(new)
        self.report = Report()
        self._visited: set[tuple[int, int]] = set()

    def breaking(self, where: str, what: str) -> None:
        self.report.breaking.append(f"{where}: {what}")

    def added(self, where: str, what: str) -> None:
        self.report.additions.append(f"{where}: {what}")

    # -- schemas ----------------------------------------------------------------------------

    def _variants(self, doc: _Document, schema: Json) -> list[Mapping[str, Json]]:
        schema = doc.resolve(schema)
        if not isinstance(schema, Mapping):
            return [{}] if schema is True else []
        for key in ("anyOf", "oneOf"):
            if key in schema and "type" not in schema:
                return [v for item in schema[key] for v in self._variants(doc, item)]
        return [schema]

    @staticmethod
    def _type(schema: Mapping[str, Json]) -> str:
        declared = schema.get("type")
        if isinstance(declared, list):
            return "|".join(sorted(str(item) for item in declared))
        if isinstance(declared, str):
            return declared
        if "const" in schema:
            return _json_type(schema["const"])
        if "properties" in schema:
            return "object"
        if "items" in schema:
            return "array"
        return "any"

    def schema(self, where: str, old: Json, new: Json) -> None:
        old_variants = self._variants(self.old, old)
        new_variants = self._variants(self.new, new)
        old_types = [self._type(v) for v in old_variants]
        new_types = [self._type(v) for v in new_variants]
        if sorted(set(old_types)) != sorted(set(new_types)):
            self.breaking(
                where,
                f"type changed from {' | '.join(sorted(set(old_types)))} "
                f"to {' | '.join(sorted(set(new_types)))}",
            )
            return
        for kind in sorted(set(old_types)):
            olds = [v for v, t in zip(old_variants, old_types, strict=True) if t == kind]
            news = [v for v, t in zip(new_variants, new_types, strict=True) if t == kind]
            if len(olds) != len(news):
                self.breaking(where, f"the {kind} alternatives changed")
                continue
            for old_variant, new_variant in zip(olds, news, strict=True):
                self._single(where, old_variant, new_variant)

    def _single(self, where: str, old: Mapping[str, Json], new: Mapping[str, Json]) -> None:
        key = (id(old), id(new))
        if key in self._visited:
            return
        self._visited.add(key)

        if old.get("const", MISSING) != new.get("const", MISSING):
            self.breaking(
                where,
                f"constant changed from {_show(old.get('const', MISSING))} "
                f"to {_show(new.get('const', MISSING))}",
            )
        if "enum" in old and "enum" in new:
            for value in old["enum"]:
                if value not in new["enum"]:
                    self.breaking(where, f"enum value {_show(value)} removed")
            for value in new["enum"]:
                if value not in old["enum"]:
                    self.added(where, f"enum value {_show(value)}")
        elif "enum" in new:
            self.breaking(where, f"now restricted to {_show(new['enum'])}")
        for constraint in CONSTRAINTS:
            if old.get(constraint) != new.get(constraint):
                self.breaking(
                    where,
                    f"{constraint} changed from {_show(old.get(constraint, MISSING))} "
                    f"to {_show(new.get(constraint, MISSING))}",
                )
        self._object(where, old, new)
        if "items" in old or "items" in new:
            self.schema(f"{where}[]", old.get("items", True), new.get("items", True))

    def _object(self, where: str, old: Mapping[str, Json], new: Mapping[str, Json]) -> None:
        old_properties: Mapping[str, Json] = old.get("properties", {})
        new_properties: Mapping[str, Json] = new.get("properties", {})
        old_required = set(old.get("required", ()))
        new_required = set(new.get("required", ()))
        prefix = f"{where}." if where else ""
        for name, schema in old_properties.items():
            path = f"{prefix}{name}"
            if name not in new_properties:
                self.breaking(path, "field removed")
                continue
            if name in old_required and name not in new_required:
                self.breaking(path, "no longer required (consumers rely on it being there)")
            elif name not in old_required and name in new_required:
                self.breaking(path, "now required (earlier events lack it): needs a new version")
            self.schema(path, schema, new_properties[name])
        for name in new_properties:
            if name in old_properties:
                continue
            if name in new_required:
                self.breaking(f"{prefix}{name}", "new required field: needs a new version")
            else:
                self.added(f"{prefix}{name}", "new optional field")
        old_map = old.get("additionalProperties")
        new_map = new.get("additionalProperties")
        if isinstance(old_map, Mapping):
            if isinstance(new_map, Mapping):
                self.schema(f"{prefix}*", old_map, new_map)
            else:
                self.breaking(f"{prefix}*", "map values are no longer described")

    # -- the document ----------------------------------------------------------------------

    def run(self) -> Report:
        self._channels()
        self._operations()
        self._messages()
        self._stream()
        return self.report

    def _channels(self) -> None:
        old_channels = self.old.section("channels")
        new_channels = self.new.section("channels")
        for channel_id, raw in old_channels.items():
            where = f"channel {channel_id}"
            old = self.old.resolve(raw)
            if channel_id not in new_channels:
                self.breaking(where, f"removed (address {old.get('address')!r})")
                continue
            new = self.new.resolve(new_channels[channel_id])
            if old.get("address") != new.get("address"):
                self.breaking(
                    where,
                    f"address changed from {old.get('address')!r} to {new.get('address')!r}",
                )
            self._parameters(where, old.get("parameters", {}), new.get("parameters", {}))
            old_messages: Mapping[str, Json] = old.get("messages", {})
            new_messages: Mapping[str, Json] = new.get("messages", {})
            for message_id in old_messages:
                if message_id not in new_messages:
                    self.breaking(where, f"message {message_id} removed from the channel")
            for message_id in new_messages:
                if message_id not in old_messages:
                    self.added(where, f"new message {message_id}")
        for channel_id, raw in new_channels.items():
            if channel_id not in old_channels:
                address = self.new.resolve(raw).get("address")
                self.added(f"channel {channel_id}", f"new channel (address {address!r})")

    def _parameters(self, where: str, old: Mapping[str, Json], new: Mapping[str, Json]) -> None:
        for name, parameter in old.items():
            if name not in new:
                self.breaking(f"{where} parameter {name}", "removed")
                continue
            old_pattern = self.old.resolve(parameter).get("x-pattern")
            new_pattern = self.new.resolve(new[name]).get("x-pattern")
            if old_pattern != new_pattern:
                self.breaking(
                    f"{where} parameter {name}",
                    f"pattern changed from {old_pattern!r} to {new_pattern!r}",
                )
        for name in new:
            if name not in old:
                self.breaking(f"{where} parameter {name}", "new parameter")

    def _operations(self) -> None:
        old_operations = self.old.section("operations")
        new_operations = self.new.section("operations")
        for operation_id, raw in old_operations.items():
            where = f"operation {operation_id}"
            if operation_id not in new_operations:
                self.breaking(where, "removed")
                continue
            old = self.old.resolve(raw)
            new = self.new.resolve(new_operations[operation_id])
            if old.get("action") != new.get("action"):
                self.breaking(
                    where, f"action changed from {old.get('action')!r} to {new.get('action')!r}"
                )
            old_channel = old.get("channel", {}).get("$ref")
            new_channel = new.get("channel", {}).get("$ref")
            if old_channel != new_channel:
                self.breaking(where, f"channel changed from {old_channel!r} to {new_channel!r}")
        for operation_id in new_operations:
            if operation_id not in old_operations:
                self.added(f"operation {operation_id}", "new operation")

    def _messages(self) -> None:
        old_messages = self.old.section("components", "messages")
        new_messages = self.new.section("components", "messages")
        for message_id, raw in old_messages.items():
            where = f"message {message_id}"
            if message_id not in new_messages:
                self.breaking(where, "removed")
                continue
            old = self.old.resolve(raw)
            new = self.new.resolve(new_messages[message_id])
            if old.get("contentType") != new.get("contentType"):
                self.breaking(
                    where,
                    f"content type changed from {old.get('contentType')!r} "
                    f"to {new.get('contentType')!r}",
                )
            self.schema(f"{where} headers", old.get("headers", True), new.get("headers", True))
            self.schema(f"{where} payload", old.get("payload", True), new.get("payload", True))
        for message_id in new_messages:
            if message_id not in old_messages:
                self.added(f"message {message_id}", "new message")

    def _stream(self) -> None:
        old = self.old.section("x-ticketflow")
        new = self.new.section("x-ticketflow")
        for key in ("name", "subjects"):
            before = old.get("stream", {}).get(key)
            after = new.get("stream", {}).get(key)
            if before != after:
                self.breaking(f"stream {key}", f"changed from {before!r} to {after!r}")
        if old.get("subscription") != new.get("subscription"):
            self.breaking(
                "subscription",
                f"changed from {old.get('subscription')!r} to {new.get('subscription')!r}",
            )


def compare(old: Mapping[str, Json], new: Mapping[str, Json]) -> Report:
    """The breaking changes and additions from the document `old` to the document `new`."""
    return _Comparison(old, new).run()
