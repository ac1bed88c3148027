"""Environment overrides (YEASTAR_ARCHIVER_<SECTION>__<KEY>), `check`'s effective config, $STATE_DIRECTORY."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Secret, default_state_path, load_config
from daemon.effective import effective_lines, webhook_shown
from daemon.errors import ConfigError
from daemon.overrides import Override, apply_overrides, name_variables, parse_overrides
from daemon.simoptions import SimOptions
from tests.conftest import REPO, archive_files, cli_env, run_cli, simulator_subprocess, write_config

P = "YEASTAR_ARCHIVER_"


@pytest.mark.parametrize(("name", "text", "path", "value"), [
    (P + "SERVICE__LISTEN", "0.0.0.0:9464", ("service", "listen"), "0.0.0.0:9464"),
    (P + "PBX__CLIENT_SECRET_FILE", "/run/s", ("pbx", "client_secret_file"), "/run/s"),
    (P + "ARCHIVE__S3__BUCKET", "calls", ("archive", "s3", "bucket"), "calls"),
    (P + "DOWNLOADS__WORKERS", "8", ("downloads", "workers"), 8),
    (P + "PBX__TLS__VERIFY", "false", ("pbx", "tls", "verify"), False),
    (P + "SOURCES__IDS", "[1727, 1728]", ("sources", "ids"), [1727, 1728]),
    (P + "SERVICE__LISTEN", "null", ("service", "listen"), None),
    (P + "SERVICE__LISTEN", "", ("service", "listen"), None),            # YAML: empty is null
    (P + "PBX__TIMEOUT_S", "2.5", ("pbx", "timeout_s"), 2.5),
    (P + "pbx__client_id", "x", ("pbx", "client_id"), "x"),              # keys are not case-sensitive
    (P + "NOTIFY", "{url: null}", ("notify",), {"url": None}),            # a whole section, as flow YAML
    # Secrets are verbatim: YAML would drop " # x" as a comment and read "yes" as true.
    (P + "PBX__CLIENT_SECRET", "yes # not a comment", ("pbx", "client_secret"), "yes # not a comment"),
    (P + "ARCHIVE__S3__SECRET_ACCESS_KEY", "!x&*", ("archive", "s3", "secret_access_key"), "!x&*"),
    (P + "ARCHIVE__S3__ACCESS_KEY_ID", "0123", ("archive", "s3", "access_key_id"), "0123"),
    (P + "SERVICE_LISTEN", "x", ("service_listen",), "x"),                # one `_`: an unknown key, later
])
def test_parse_overrides_table(name: str, text: str, path: tuple[str, ...], value: Any) -> None:
    overrides, problems = parse_overrides({name: text, "PATH": "/bin", "YEASTAR_OTHER": "1"})
    assert problems == []
    assert overrides == [Override(name, path, value)]


@pytest.mark.parametrize(("name", "text", "problem"), [
    (P + "PBX___BASE_URL", "x", "not a config key"),
    (P + "PBX__", "x", "not a config key"),
    (P, "x", "not a config key"),
    (P + "NOTIFY__URL", "[unclosed", "not a valid YAML value; quote it (value not shown)"),
])
def test_parse_overrides_refuses_what_is_no_key_or_no_yaml_naming_the_variable(name: str, text: str,
                                                                                problem: str) -> None:
    overrides, problems = parse_overrides({name: text})
    assert overrides == []
    assert problems == [f"${name}: " + problem + ("" if "YAML" in problem else
                        " (the form is YEASTAR_ARCHIVER_<SECTION>__<KEY>, nested sections joined by __ as well)")]
    assert "unclosed" not in problems[0]


def test_the_config_path_variable_is_not_an_override() -> None:
    assert parse_overrides({"YEASTAR_ARCHIVER_CONFIG": "/etc/x.yaml"}) == ([], [])


def _o(key: str, value: Any) -> Override:
    return Override(P + key.upper().replace(".", "__"), tuple(key.split(".")), value)


@pytest.mark.parametrize(("data", "overrides", "expected"), [
    ({"service": {"listen": "127.0.0.1:1"}}, [_o("service.listen", "0.0.0.0:2")], {"service": {"listen": "0.0.0.0:2"}}),
    (None, [_o("archive.s3.bucket", "b")], {"archive": {"s3": {"bucket": "b"}}}),
    ({"archive": {"s3": None}}, [_o("archive.s3.bucket", "b")], {"archive": {"s3": {"bucket": "b"}}}),
    # The environment wins over the file's other half of an exclusive pair...
    ({"pbx": {"client_secret": "s", "client_id": "i"}}, [_o("pbx.client_secret_file", "/f")],
     {"pbx": {"client_secret_file": "/f", "client_id": "i"}}),
    ({"archive": {"s3": {"secret_access_key_file": "/f"}}}, [_o("archive.s3.secret_access_key", "k")],
     {"archive": {"s3": {"secret_access_key": "k"}}}),
    # ...but two overrides setting both are the usual "exactly one" problem.
    ({}, [_o("pbx.client_secret", "s"), _o("pbx.client_secret_file", "/f")],
     {"pbx": {"client_secret": "s", "client_secret_file": "/f"}}),
])
def test_apply_overrides_table(data: Any, overrides: list[Override], expected: Any) -> None:
    before = json.dumps(data)
    assert apply_overrides(data, overrides) == (expected, [])
    assert json.dumps(data) == before   # the file's data is not changed in place


def test_apply_overrides_into_a_section_that_is_not_a_mapping_names_the_variable() -> None:
    out, problems = apply_overrides({"pbx": {"tls": True}}, [_o("pbx.tls.verify", False)])
    assert problems == ["$YEASTAR_ARCHIVER_PBX__TLS__VERIFY: pbx.tls is not a mapping in the config file, "
                        "so pbx.tls.verify cannot be set in it"]
    assert out == {"pbx": {"tls": True}}   # left for validation to report as the file's own problem


@pytest.mark.parametrize(("problem", "named"), [
    ("service.listen: host:port such as 127.0.0.1:9464, or null to disable (got 'x')",
     "$YEASTAR_ARCHIVER_SERVICE__LISTEN: service.listen: host:port"),
    ("frob: unknown key (check the spelling)", "$YEASTAR_ARCHIVER_FROB__X: frob: unknown key"),
    ("notify.url: an http:// or https:// URL, or null", "$YEASTAR_ARCHIVER_NOTIFY: notify.url: an http"),
    ("pbx.base_url: is required", "pbx.base_url: is required"),   # not set by the environment
])
def test_name_variables_table(problem: str, named: str) -> None:
    overrides = [_o("service.listen", "x"), _o("frob.x", 1), _o("notify", {"url": 1})]
    assert name_variables([problem], overrides)[0].startswith(named)


@pytest.mark.parametrize(("state_directory", "expected"), [
    (None, "/srv/rec/.yeastar-archiver/ledger.db"),
    ("", "/srv/rec/.yeastar-archiver/ledger.db"),
    ("/var/lib/yeastar-archiver", "/var/lib/yeastar-archiver/ledger.db"),
    ("/var/lib/a:/var/lib/b", "/var/lib/a/ledger.db"),          # StateDirectory= with several: the first
    ("relative/dir", "/srv/rec/.yeastar-archiver/ledger.db"),   # not systemd's: it always sets absolute paths
])
def test_default_state_path_table(state_directory: str | None, expected: str) -> None:
    assert default_state_path(Path("/srv/rec"), state_directory) == Path(expected)


@pytest.mark.parametrize(("url", "shown"), [
    ("https://hooks.slack.com/services/T00/B00/XYZsecret", "https://hooks.slack.com/[REDACTED]"),
    ("http://10.0.0.5:8080/hook?token=abc", "http://10.0.0.5:8080/[REDACTED]"),
])
def test_webhook_shown_keeps_only_the_origin(url: str, shown: str) -> None:
    assert webhook_shown(url) == shown


def test_effective_config_masks_secrets_and_marks_keys_from_the_environment(tmp_path: Path) -> None:
    cfg_file = write_config(tmp_path, "http://127.0.0.1:9", extra={
        "notify": {"url": "https://hooks.example.org/services/T00/B00/XYZsecretXYZ"},
        "sources": {"discover": {"since": "2024-01-31"}}})
    env = {P + "PBX__CLIENT_SECRET": "env-secret-value", P + "DOWNLOADS__WORKERS": "7"}
    cfg = load_config(cfg_file, env)
    assert cfg.pbx.client_secret == Secret("env-secret-value") and cfg.pbx.client_secret_file is None
    lines = effective_lines(cfg, {"pbx.client_secret": P + "PBX__CLIENT_SECRET",
                                  "downloads.workers": P + "DOWNLOADS__WORKERS"})
    assert "pbx.client_secret: [REDACTED]  # from $YEASTAR_ARCHIVER_PBX__CLIENT_SECRET" in lines
    assert "downloads.workers: 7  # from $YEASTAR_ARCHIVER_DOWNLOADS__WORKERS" in lines
    assert "notify.url: https://hooks.example.org/[REDACTED]" in lines
    assert "sources.discover.since: '2024-01-31'" in lines
    assert "archive.s3: null" in lines and "sources.ids: []" in lines and "service.listen: null" in lines
    assert not any("secret-value" in line or "XYZsecretXYZ" in line for line in lines)


def test_a_secret_read_from_its_file_says_so(tmp_path: Path) -> None:
    """The README walk (D7): with only client_secret_file set, check showed a client_secret of its own."""
    cfg = load_config(write_config(tmp_path, "http://127.0.0.1:9"), {})   # client_secret_file only
    lines = effective_lines(cfg, {})
    assert "pbx.client_secret: [REDACTED] (read from client_secret_file)" in lines
    assert any(line.startswith("pbx.client_secret_file: ") for line in lines)


def test_check_shows_a_hook_s_program_not_its_arguments(tmp_path: Path) -> None:
    """Review V10: a hook's arguments may carry a token (an upload URL, --api-key)."""
    cfg_file = write_config(tmp_path, "http://127.0.0.1:9", extra={
        "hooks": {"on_archived": ["/usr/local/bin/upload", "--api-key", "tok-3f9a"]}})
    lines = effective_lines(load_config(cfg_file, {}), {})
    assert "hooks.on_archived: [/usr/local/bin/upload, '[REDACTED] (2 argument(s))']" in lines
    assert not any("tok-3f9a" in line for line in lines)


def test_a_secret_from_the_environment_is_used_exactly_as_given(tmp_path: Path) -> None:
    """Review V5: no ${VAR} expansion in a secret override: it would log in with another password, and
    an unset name would be quoted (a piece of the secret) in the error."""
    cfg_file = write_config(tmp_path, "http://127.0.0.1:9")
    cfg = load_config(cfg_file, {P + "PBX__CLIENT_SECRET": "Xy${HOME}9", P + "PBX__CLIENT_ID": "id"})
    assert cfg.pbx.client_secret == Secret("Xy${HOME}9")
    cfg = load_config(cfg_file, {P + "PBX__CLIENT_SECRET": "Xy${Zq7Tw}9"})
    assert cfg.pbx.client_secret == Secret("Xy${Zq7Tw}9")


def test_an_unset_variable_in_a_secret_of_the_file_is_reported_without_its_name(tmp_path: Path) -> None:
    import yaml
    cfg_file = write_config(tmp_path, "http://127.0.0.1:9")
    data = yaml.safe_load(cfg_file.read_text())
    data["pbx"].pop("client_secret_file")
    data["pbx"]["client_secret"] = "Ab${Zq7Tw}cd"
    cfg_file.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as caught:
        load_config(cfg_file, {})
    assert "Zq7Tw" not in str(caught.value) and "pbx.client_secret" in str(caught.value)


def test_an_override_is_validated_like_the_file_and_the_problem_names_the_variable(tmp_path: Path) -> None:
    cfg_file = write_config(tmp_path, "http://127.0.0.1:9")
    with pytest.raises(ConfigError) as caught:
        load_config(cfg_file, {P + "DOWNLOADS__WORKERS": "0", P + "SERVICE__LISTEN": "nowhere"})
    assert caught.value.problems == [
        "$YEASTAR_ARCHIVER_DOWNLOADS__WORKERS: downloads.workers: an integer from 1 to 64 (got 0)",
        "$YEASTAR_ARCHIVER_SERVICE__LISTEN: service.listen: host:port such as 127.0.0.1:9464, "
        "or null to disable (got 'nowhere')",
    ]


# ---------------------------------------------------------------- real subprocesses
def test_check_with_overrides_shows_the_effective_config_and_logs_in_with_them(tmp_path: Path) -> None:
    """The file names a wrong PBX and a wrong secret; the environment fixes both, and check says so."""
    cfg = write_config(tmp_path, "http://127.0.0.1:9", secret="wrong-secret-in-the-file",
                       extra={"sources": {"ids": [1000]}})
    (tmp_path / "env_secret").write_text(SimOptions.client_secret + "\n")
    (tmp_path / "env_secret").chmod(0o600)
    with simulator_subprocess("--count", "2") as base_url:
        result = run_cli("check", "-c", str(cfg), env=cli_env(**{
            P + "PBX__BASE_URL": base_url,
            P + "PBX__CLIENT_SECRET_FILE": str(tmp_path / "env_secret"),
            P + "SERVICE__LISTEN": "0.0.0.0:9464"}))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"  pbx.base_url: {base_url}  # from $YEASTAR_ARCHIVER_PBX__BASE_URL" in out
    assert f"  pbx.client_secret_file: {tmp_path / 'env_secret'}  # from $YEASTAR_ARCHIVER_PBX__CLIENT_SECRET_FILE" \
        in out
    assert "  pbx.client_secret: [REDACTED] (read from client_secret_file)\n" in out
    assert "  service.listen: 0.0.0.0:9464  # from $YEASTAR_ARCHIVER_SERVICE__LISTEN" in out
    assert "  archive.min_free_bytes: 0\n" in out                     # from the file: not marked
    assert f"check: OK: logged in to {base_url}" in out
    assert SimOptions.client_secret not in out + result.stderr


def test_once_archives_the_ids_an_override_names(tmp_path: Path) -> None:
    with simulator_subprocess("--count", "3") as base_url:
        cfg = write_config(tmp_path, base_url)      # no source in the file
        result = run_cli("once", "-c", str(cfg), env=cli_env(**{P + "SOURCES__IDS": "[1000, 1002]",
                                                                P + "LOGGING__LEVEL": "debug"}))
    assert result.returncode == 0, result.stderr
    assert len(archive_files(tmp_path / "archive")) == 2
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    said = [(e["key"], e["variable"]) for e in events if e["event"] == "config.override"]
    assert said == [("logging.level", P + "LOGGING__LEVEL"), ("sources.ids", P + "SOURCES__IDS")]
    assert not any("1002]" in str(e) for e in events if e["event"] == "config.override")   # never the value


def test_an_unknown_override_is_exit_2_naming_the_variable(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "http://127.0.0.1:9")
    for command in ("check", "once"):
        result = run_cli(command, "-c", str(cfg), env=cli_env(**{P + "SERVICE__LISTNE": "0.0.0.0:1",
                                                                 P + "SERVICE_LISTEN": "0.0.0.0:1"}))
        assert result.returncode == 2, result.stderr
        assert "config error: $YEASTAR_ARCHIVER_SERVICE__LISTNE: service.listne: unknown key" in result.stderr
        assert "config error: $YEASTAR_ARCHIVER_SERVICE_LISTEN: service_listen: unknown key" in result.stderr
        assert "Traceback" not in result.stderr


def test_the_config_path_variable_keeps_working_beside_overrides(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "http://127.0.0.1:9")
    result = run_cli("check", env=cli_env(YEASTAR_ARCHIVER_CONFIG=str(cfg), **{P + "DOWNLOADS__WORKERS": "3"}))
    assert "  downloads.workers: 3  # from $YEASTAR_ARCHIVER_DOWNLOADS__WORKERS" in result.stdout, result.stderr
    assert "config error" not in result.stderr


def test_once_under_systemd_keeps_the_ledger_in_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with simulator_subprocess("--count", "1") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000]}})
        env = cli_env(STATE_DIRECTORY=f"{state}:{tmp_path / 'second'}")
        result = run_cli("once", "-c", str(cfg), env=env)
        assert result.returncode == 0, result.stderr
        status = run_cli("status", "--json", "-c", str(cfg), env=env)
    assert (state / "ledger.db").is_file()
    assert not (tmp_path / "archive" / ".yeastar-archiver" / "ledger.db").exists()
    assert json.loads(status.stdout)["counts"]["done"] == 1


def test_the_image_listens_on_every_interface_through_an_override(tmp_path: Path) -> None:
    """The runtime stage's ENV, read from the Dockerfile, is a valid override: the EXPOSEd port answers,
    and `health` (the HEALTHCHECK) asks it on loopback."""
    from daemon.cli import livez_url
    runtime = (REPO / "Dockerfile").read_text().rsplit("FROM ", 1)[1]
    env = dict(re.findall(r"^ENV (YEASTAR_ARCHIVER_SERVICE__LISTEN)=(\S+)$", runtime, flags=re.MULTILINE))
    cfg = load_config(write_config(tmp_path, "http://127.0.0.1:9"), env)
    assert cfg.service.listen == "0.0.0.0:9464"
    assert livez_url(cfg.service.listen) == "http://127.0.0.1:9464/livez"
