"""The config's JSON Schema: generated from the dataclasses, shipped current, and in agreement with the loader."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from daemon.cli import DEMO_OPTIONS, write_demo_config
from daemon.config import parse_config
from daemon.errors import ConfigError
from daemon.schema import SCHEMA_PATH, config_schema, example_descriptions, render
from tests.conftest import REPO, write_config

EXAMPLE = REPO / "config.example.yaml"


def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_the_shipped_schema_is_the_generated_one() -> None:
    """`make schema` rewrites it; a dataclass change without it fails here."""
    generated = render(config_schema(example_descriptions(EXAMPLE.read_text())))
    assert SCHEMA_PATH.read_text() == generated


def test_the_schema_ships_inside_the_package() -> None:
    shipped = resources.files("daemon") / "config.schema.json"
    assert json.loads(shipped.read_text())["title"] == "yeastar-archiver configuration"


def test_the_example_config_validates_and_points_editors_at_the_schema() -> None:
    assert EXAMPLE.read_text().splitlines()[0] == "# yaml-language-server: $schema=daemon/config.schema.json"
    assert (EXAMPLE.parent / "daemon" / "config.schema.json").is_file()
    _validator().validate(yaml.safe_load(EXAMPLE.read_text()))


def test_every_key_of_the_schema_is_documented_in_the_example() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())

    def leaves(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for key, sub in node.get("properties", {}).items():
            full = f"{path}.{key}" if path else key
            out += leaves(sub, full) if sub.get("type") == "object" else [(full, sub)]
        return out
    assert [key for key, sub in leaves(schema, "") if "description" not in sub] == []


def test_configs_the_project_writes_validate(tmp_path: Path) -> None:
    validator = _validator()
    validator.validate(yaml.safe_load(write_config(tmp_path, "http://127.0.0.1:1", extra={
        "sources": {"ids": [1, 2], "discover": {"enabled": True, "since": 1700, "call_types": ["Inbound"]}},
        "notify": {"url": "http://127.0.0.1:2/hook"}}).read_text()))
    demo = write_demo_config(tmp_path / "demo", "http://127.0.0.1:1", DEMO_OPTIONS, ids=[1000])
    validator.validate(yaml.safe_load(demo.read_text()))


BASE: dict[str, Any] = {"pbx": {"base_url": "https://192.0.2.1:8088", "client_id": "a", "client_secret": "b"},
                        "archive": {"dir": "/srv/recordings"}}


def _with(section: str, **values: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(BASE))
    data.setdefault(section, {}).update(values)
    return data


@pytest.mark.parametrize("data", [
    _with("pbx", base_urll="https://typo"),                       # an unknown key
    _with("pbx", client_secret_file="/run/secret"),               # both secrets
    {"pbx": {"base_url": "https://x", "client_id": "a"}, "archive": {"dir": "/a"}},   # neither
    {"pbx": BASE["pbx"]},                                          # no archive.dir
    _with("pbx", recording_format="ogg"),
    _with("downloads", workers="many"),
    _with("logging", level="loud"),
    _with("sources", ids="1727"),
    _with("sources", discover={"call_types": ["Conference"]}),
    _with("service", shutdown_grace="20"),
])
def test_what_the_schema_refuses_the_loader_refuses_too(data: dict[str, Any]) -> None:
    assert not _validator().is_valid(data)
    with pytest.raises(ConfigError):
        parse_config(data, base_dir=Path("/"))


@pytest.mark.parametrize("data", [
    BASE,
    _with("pbx", client_secret_file=None),                        # null is "not set"
    _with("downloads", workers="${WORKERS}"),                     # a variable where a number goes
    _with("service", listen=None),
    _with("sources", discover={"since": "2024-01-31"}),
])
def test_what_the_loader_accepts_the_schema_accepts(data: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERS", "3")
    assert _validator().is_valid(data), list(_validator().iter_errors(data))
    parse_config(data, base_dir=Path("/"))
