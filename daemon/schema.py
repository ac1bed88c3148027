"""The config file's JSON Schema, generated from the dataclasses in ``daemon.config``, for editors.

The shipped copy is ``daemon/config.schema.json`` (``make schema`` rewrites it; a test checks it is
current). Point an editor at it with a first line ``# yaml-language-server: $schema=<path>``. It
checks key names, types, choices and what is required; ranges stay with ``load_config``, which
reports them with the fix. Where the file's shape differs from the dataclasses (a key the loader
derives, or one spelled differently) the tables below say so.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from daemon import config

SCHEMA_PATH = Path(__file__).with_name("config.schema.json")

# ${VAR} expands before a value is converted, so a number may be written as a variable.
_VAR_STRING = {"type": "string", "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*\}"}

# Dataclass fields that are no key of the file.
_NOT_KEYS = {"Config": {"source_path", "warnings"}, "DiscoverConfig": {"since_id", "since_date"}}
# Fields the dataclass requires but the file may leave out (the loader fills them in).
_OPTIONAL = {"Config": {"sources", "state", "downloads", "service", "logging"}, "PbxConfig": {"client_secret"},
             "StateConfig": {"path"}}
# Keys whose schema is not their field's type.
_KEYS: dict[str, dict[str, dict[str, Any]]] = {
    "PbxConfig": {"client_secret": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}]}},
    "StateConfig": {"path": {"anyOf": [{"type": "string"}, {"type": "null"}]}},   # null: the default place
    # A command: argv, or one string split by shell rules.
    "HooksConfig": {"on_archived": {"anyOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1},
                                              {"type": "string", "minLength": 1}, {"type": "null"}]}},
    "DiscoverConfig": {
        "since": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "format": "date"},
                            {"type": "null"}]},
        "call_types": {"type": "array", "items": {"enum": ["Inbound", "Outbound", "Internal",
                                                           "inbound", "outbound", "internal"]}},
    },
}
# Rules across keys.
_EXTRA: dict[str, dict[str, Any]] = {
    # Exactly one of the two is set (null counts as not set).
    "PbxConfig": {"oneOf": [{"required": ["client_secret"], "properties": {"client_secret": {"type": "string"}}},
                            {"required": ["client_secret_file"],
                             "properties": {"client_secret_file": {"type": "string"}}}]},
}


def _type_schema(tp: Any, descriptions: dict[str, str], path: str) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _type_schema(members[0], descriptions, path) if len(members) == 1 else {
            "anyOf": [_type_schema(m, descriptions, path) for m in members]}
        return {"anyOf": [inner, {"type": "null"}]}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is tuple:
        return {"type": "array", "items": _type_schema(typing.get_args(tp)[0], descriptions, path)}
    if dataclasses.is_dataclass(tp):
        return _object_schema(typing.cast(type, tp), descriptions, path)
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"anyOf": [{"type": "integer"}, _VAR_STRING]}
    if tp is float:
        return {"anyOf": [{"type": "number"}, _VAR_STRING]}
    if tp in (str, Path, config.Secret):
        return {"type": "string"}
    raise TypeError(f"{path}: no JSON Schema for {tp!r}")


def _object_schema(cls: type, descriptions: dict[str, str], path: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    name = cls.__name__
    properties: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        if f.name in _NOT_KEYS.get(name, ()):
            continue
        key = f"{path}.{f.name}" if path else f.name
        schema = dict(_KEYS.get(name, {}).get(f.name) or _type_schema(hints[f.name], descriptions, key))
        if f.default is not dataclasses.MISSING:
            schema["default"] = _json_default(f.default)
        elif f.default_factory is dataclasses.MISSING and f.name not in _OPTIONAL.get(name, ()):
            required.append(f.name)
        if key in descriptions:
            schema["description"] = descriptions[key]
        properties[f.name] = schema
    for key, schema in _KEYS.get(name, {}).items():
        if key not in properties:
            full = f"{path}.{key}" if path else key
            properties[key] = {**schema, **({"description": descriptions[full]} if full in descriptions else {})}
    out: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = required
    return {**out, **_EXTRA.get(name, {})}


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return value


_EXAMPLE_LINE = re.compile(r"^(?P<indent>\s*(?:#\s*)?)(?P<key>[a-z][a-z0-9_]*):(?P<value>[^#]*?)"
                           r"\s*(?:#\s*(?P<text>.*))?$")


def example_descriptions(text: str) -> dict[str, str]:
    """Dotted key -> the comment beside it in a commented example config (``config.example.yaml``)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        m = _EXAMPLE_LINE.match(line)
        if m is None:
            continue
        indent = len(m["indent"])  # where the key starts, so a commented-out block nests like a live one
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([*(k for _, k in stack), m["key"]])
        if m["text"]:
            out.setdefault(key, m["text"].strip())
        if not m["value"].strip():
            stack.append((indent, m["key"]))
    return out


def config_schema(descriptions: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a config file; ``descriptions`` by dotted key, if given."""
    body = _object_schema(config.Config, descriptions or {}, "")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "yeastar-archiver configuration",
            **body}


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":  # make schema: python -m daemon.schema config.example.yaml
    import sys
    example = Path(sys.argv[1]).read_text(encoding="utf-8") if len(sys.argv) > 1 else ""
    SCHEMA_PATH.write_text(render(config_schema(example_descriptions(example))), encoding="utf-8")
    print(f"wrote {SCHEMA_PATH.name}")
