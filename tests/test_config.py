"""Config: every failure mode names its key path; all problems at once; defaults; secrets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.config import DEFAULT_LAYOUT, load_config, parse_config
from daemon.errors import ConfigError
from tests.conftest import REPO, cli_env, run_cli

GOOD: dict[str, Any] = {
    "pbx": {"base_url": "https://192.0.2.10:8088", "client_id": "cid", "client_secret": "s3cret-value"},
    "archive": {"dir": "/srv/recordings"},
}


def _with(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    data = yaml.safe_load(yaml.safe_dump(base or GOOD))
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return data


_DELETE = object()


def _problems(data: Any, base_dir: Path = Path("/etc/yeastar-archiver")) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=base_dir)
    return info.value.problems


def test_minimal_config_gets_the_documented_defaults() -> None:
    cfg = parse_config(GOOD, base_dir=Path("/etc/x"))
    assert cfg.pbx.api_path == "openapi/v1.0"
    assert cfg.pbx.api_base == "https://192.0.2.10:8088/openapi/v1.0"
    assert cfg.pbx.tls.verify is True and cfg.pbx.tls.ca_file is None
    assert cfg.pbx.recording_format == "auto"
    assert cfg.pbx.requests_per_second == 5 and cfg.pbx.timeout_s == 30
    assert cfg.sources.ids == () and cfg.sources.queue_file is None
    assert cfg.archive.layout == DEFAULT_LAYOUT
    assert cfg.state.path == Path("/srv/recordings/.yeastar-archiver/ledger.db")
    assert cfg.downloads.workers == 4 and cfg.downloads.max_attempts == 8
    assert cfg.service.listen == "127.0.0.1:9464" and cfg.service.shutdown_grace_s == 20
    assert cfg.logging.format == "auto" and cfg.logging.level == "info"
    assert cfg.warnings == ()


@pytest.mark.parametrize(("path", "value", "key", "fragment"), [
    ("pbx.base_url", _DELETE, "pbx.base_url", "is required"),
    ("pbx.base_url", "ftp://pbx", "pbx.base_url", "'ftp://pbx'"),
    ("pbx.base_url", "https://", "pbx.base_url", "URL"),
    ("pbx.client_id", _DELETE, "pbx.client_id", "is required"),
    ("pbx.client_id", "  ", "pbx.client_id", "Client ID"),
    ("pbx.client_secret", _DELETE, "pbx.client_secret", "is required"),
    ("pbx.client_secret_file", "/run/secret", "pbx.client_secret", "exactly one"),
    ("pbx.recording_format", "ogg", "pbx.recording_format", "auto, wav, mp3"),
    ("pbx.requests_per_second", 0, "pbx.requests_per_second", "> 0"),
    ("pbx.timeout_s", "soon", "pbx.timeout_s", "'soon'"),
    ("pbx.tls.verify", "yes", "pbx.tls.verify", "true or false"),
    ("pbx.tls.ca_file", "/nonexistent/ca.pem", "pbx.tls.ca_file", "no such file"),
    ("pbx.colour", "blue", "pbx.colour", "unknown key"),
    ("pbx.tls.verfy", False, "pbx.tls.verfy", "unknown key"),
    ("sources.ids", [1, "x"], "sources.ids", "positive recording ids"),
    ("sources.ids", [0], "sources.ids", "positive"),
    ("sources.ids", "1727", "sources.ids", "list"),
    ("sources.discover.call_types", ["Conference"], "sources.discover.call_types", "Inbound, Outbound, Internal"),
    ("archive.dir", _DELETE, "archive.dir", "is required"),
    ("archive.layout", "{year}/{nope}", "archive.layout", "{file}"),
    ("archive.layout", "/abs/{file}", "archive.layout", "relative"),
    ("archive.layout", "../{file}", "archive.layout", "relative"),
    ("archive.layout", ".yeastar-archiver/hooks/{file}", "archive.layout", "outside .yeastar-archiver/"),
    ("archive.layout", "./.yeastar-archiver/{year}/{file}", "archive.layout", "outside .yeastar-archiver/"),
    ("downloads.workers", 0, "downloads.workers", "1 to 64"),
    ("downloads.workers", 2.5, "downloads.workers", "integer"),
    ("downloads.max_attempts", True, "downloads.max_attempts", ">= 1"),
    ("service.listen", "nohost", "service.listen", "host:port"),
    ("service.shutdown_grace_s", -1, "service.shutdown_grace_s", ">= 0"),
    ("logging.format", "xml", "logging.format", "json"),
    ("logging.level", "loud", "logging.level", "debug"),
    ("surprise", 1, "surprise", "unknown key"),
])
def test_each_bad_value_is_reported_with_its_key_path(path: str, value: Any, key: str, fragment: str) -> None:
    problems = _problems(_with(path, value))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}:"), problems
    assert fragment in problems[0]


def test_all_problems_are_reported_at_once() -> None:
    data = {"pbx": {"base_url": "nope", "client_id": "x", "client_secret": "y", "client_secret_file": "/z",
                    "timeout_s": -3}, "downloads": {"workers": 99}, "typo": 1}
    problems = _problems(data)
    keys = sorted(p.split(":")[0] for p in problems)
    assert keys == ["archive.dir", "downloads.workers", "pbx.base_url", "pbx.client_secret", "pbx.timeout_s", "typo"]


def test_top_level_that_is_not_a_mapping_is_a_problem() -> None:
    assert _problems(["a", "b"])[0].startswith("<top level>:")


def test_env_vars_expand_and_an_unset_one_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBX_HOST", "pbx.example.test")
    monkeypatch.setenv("PBX_SECRET", "from-env-secret")
    data = _with("pbx.base_url", "https://${PBX_HOST}:8088")
    data["pbx"]["client_secret"] = "${PBX_SECRET}"
    cfg = parse_config(data, base_dir=Path("/"))
    assert cfg.pbx.base_url == "https://pbx.example.test:8088"
    assert cfg.pbx.client_secret.reveal() == "from-env-secret"
    monkeypatch.delenv("PBX_HOST")
    problems = _problems(data)
    assert problems == ["pbx.base_url: environment variable ${PBX_HOST} is not set"]


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("abc123456\n")
    (tmp_path / "secret").chmod(0o600)
    data = _with("pbx.client_secret", _DELETE)
    data["pbx"]["client_secret_file"] = "secret"
    data["archive"]["dir"] = "rec"
    data["sources"] = {"queue_file": "q/queue.txt"}
    data["state"] = {"path": "state/ledger.db"}
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    cfg = load_config(cfg_file)
    assert cfg.archive.dir == tmp_path / "rec"
    assert cfg.sources.queue_file == tmp_path / "q/queue.txt"
    assert cfg.state.path == tmp_path / "state/ledger.db"
    assert cfg.pbx.client_secret.reveal() == "abc123456"
    assert cfg.warnings == ()


def test_secret_file_readable_by_others_is_exit_2_by_its_group_a_warning_and_missing_fails(tmp_path: Path) -> None:
    """Row 22: a world-readable secret file is refused; group-readable (a service group) is warned about."""
    secret = tmp_path / "secret"
    secret.write_text("abc123456")
    secret.chmod(0o644)
    data = _with("pbx.client_secret", _DELETE)
    data["pbx"]["client_secret_file"] = str(secret)
    problems = _problems(data, tmp_path)
    assert len(problems) == 1 and "pbx.client_secret_file" in problems[0] and "0644" in problems[0]
    assert "abc123456" not in problems[0]
    secret.chmod(0o640)
    cfg = parse_config(data, base_dir=tmp_path)
    assert len(cfg.warnings) == 1
    assert "pbx.client_secret_file" in cfg.warnings[0] and "0640" in cfg.warnings[0]
    secret.unlink()
    problems = _problems(data, tmp_path)
    assert problems[0].startswith("pbx.client_secret_file: cannot read the secret file")


@pytest.mark.parametrize(("path", "value", "key"), [
    ("pbx.client_secret", 987654321777, "pbx.client_secret"),                # a number, not a string
    ("pbx.base_url", "https://admin:hunter2-pass@192.0.2.10:8088", "pbx.base_url"),
    ("notify.url", "hooks.example.org/services/T00/B00/XYZsecretXYZ", "notify.url"),
])
def test_a_secret_is_never_echoed_in_a_config_problem(path: str, value: Any, key: str) -> None:
    """Low: a secret-named key's value never appears in the message; a base_url with user:pass@ is refused."""
    problems = _problems(_with(path, value))
    assert len(problems) == 1 and problems[0].startswith(key)
    assert str(value) not in problems[0] and "hunter2" not in problems[0] and "XYZsecretXYZ" not in problems[0]


def test_a_plain_bad_base_url_is_still_shown() -> None:
    assert "ftp://192.0.2.10" in _problems(_with("pbx.base_url", "ftp://192.0.2.10"))[0]


def test_tls_verify_false_is_allowed_with_a_warning() -> None:
    cfg = parse_config(_with("pbx.tls", {"verify": False}), base_dir=Path("/"))
    assert cfg.pbx.tls.verify is False
    assert any("NOT checked" in w for w in cfg.warnings)


def test_the_secret_never_shows_in_a_repr() -> None:
    cfg = parse_config(GOOD, base_dir=Path("/"))
    assert "s3cret-value" not in repr(cfg)
    assert "s3cret-value" not in str(cfg.pbx)


def test_config_example_is_valid_and_documents_every_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    text = (REPO / "config.example.yaml").read_text()
    data = yaml.safe_load(text)
    # The example shows client_secret_file commented out; point archive.dir somewhere harmless.
    cfg = parse_config(data, base_dir=tmp_path)
    assert cfg.pbx.base_url.startswith("https://")
    from dataclasses import fields

    from daemon import config as c
    for section, cls in [("pbx", c.PbxConfig), ("sources", c.SourcesConfig), ("archive", c.ArchiveConfig),
                         ("downloads", c.DownloadsConfig), ("service", c.ServiceConfig),
                         ("logging", c.LoggingConfig), ("state", c.StateConfig), ("notify", c.NotifyConfig),
                         ("tls", c.TlsConfig), ("s3", c.S3Config), ("verify", c.VerifyConfig),
                         ("hooks", c.HooksConfig)]:
        for f in fields(cls):
            assert f"  {f.name}:" in text or f"# {f.name}:" in text, f"{section}.{f.name} missing from the example"
    for f in fields(c.DiscoverConfig):
        name = "since" if f.name.startswith("since_") else f.name
        assert f"    {name}:" in text, f"sources.discover.{name} missing from the example"


def test_bad_config_exits_2_with_one_line_per_problem_and_no_traceback(tmp_path: Path) -> None:
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("pbx:\n  base_url: nope\n  client_id: x\nlogging:\n  level: loud\n")
    result = run_cli("check", "-c", str(cfg_file))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert sorted(ln.split(":")[1].strip() for ln in lines) == [
        "archive.dir", "logging.level", "pbx.base_url", "pbx.client_secret"]
    assert all(ln.startswith("config error: ") for ln in lines)
    assert "Traceback" not in result.stderr


def test_config_path_comes_from_the_environment_and_unreadable_yaml_is_exit_2(tmp_path: Path) -> None:
    cfg_file = tmp_path / "broken.yaml"
    cfg_file.write_text("pbx: [unclosed\n")
    result = run_cli("check", env=cli_env(YEASTAR_ARCHIVER_CONFIG=str(cfg_file)))
    assert result.returncode == 2
    assert "not valid YAML at line" in result.stderr
    missing = run_cli("-c", os.fspath(tmp_path / "absent.yaml"), "check")
    assert missing.returncode == 2
    assert "cannot read it" in missing.stderr
