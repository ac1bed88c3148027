"""find, export, forget and init: what a compliance request and a new installation ask, on real
ledgers, real archives, a real simulator and real S3 servers on loopback, through the real CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import example_config, init_config_text
from daemon.compliance import parse_day
from daemon.config import load_config
from daemon.errors import ConfigError
from daemon.ledger import DAY_EXPR, LedgerDb, Ref, RunLock
from daemon.runner import RunResult, run_pipeline
from tests.conftest import REPO, SimFactory, cli_env, run_cli, write_config
from tests.s3servers import BUCKET, s3_server


async def _once(cfg: Path) -> RunResult:
    return await run_pipeline(load_config(cfg), asyncio.Event(), once=True)


async def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, *args)


def _db(cfg: Path) -> LedgerDb:
    return LedgerDb(load_config(cfg).state.path)


def _meta(time: str | None, src: str, dst: str, call_type: str, duration: int = 30) -> tuple[tuple[str, Any], ...]:
    fields = {"time": time, "call_from": f"Caller {src}<{src}>", "call_to": f"Callee {dst}<{dst}>",
              "call_type": call_type, "duration": duration}
    return tuple((k, v) for k, v in fields.items() if v is not None)


def _seed_ledger(path: Path) -> None:
    """Rows with known days and parties: the PBX's time format, an ISO time, and only a file-name date."""
    db = LedgerDb(path)
    try:
        db.enqueue([
            Ref(rec_id=1, file="a.wav", meta=_meta("03/01/2024 09:00:00", "+4930111", "2001", "Inbound")),
            Ref(rec_id=2, file="b.wav", meta=_meta("03/31/2024 23:59:59", "2002", "+4989222", "Outbound")),
            Ref(rec_id=3, file="c.wav", meta=_meta("04/01/2024 00:00:00", "+4930111", "2003", "Inbound")),
            Ref(rec_id=4, file="d.wav", meta=_meta("2024-03-15 12:00:00", "+4412345", "2001", "Inbound")),
            Ref(rec_id=5, file="20240320101010-x-+4930111-2001-Inbound.wav"),
        ], source="test", now=1.0)
    finally:
        db.close()


# ---------------------------------------------------------------- find
def test_find_filters_on_day_party_type_and_state_inclusive_dates(tmp_path: Path) -> None:
    """"All calls from +49 30 in March": the PBX's MM/DD/YYYY time, an ISO time and (no time) the file
    name's YYYYMMDD prefix all give the day; --until is inclusive; caller/callee match a part."""
    path = tmp_path / "ledger.db"
    _seed_ledger(path)
    db = LedgerDb(path, read_only=True)
    try:
        def ids(**kw: Any) -> list[int | None]:
            return [r.rec_id for r in db.search(**kw)]
        assert ids(since="2024-03-01", until="2024-03-31") == [1, 4, 5, 2]
        assert ids(since="2024-03-01", until="2024-03-31", caller="+4930") == [1]   # 5 has no call_from
        assert ids(callee="2001") == [1, 4]
        assert ids(call_type="inbound", since="2024-03-02") == [4, 3]
        assert ids(state="pending", until="2024-03-01") == [1]
        assert ids(state="done") == []
    finally:
        db.close()


def test_find_s_day_filter_is_answered_from_an_index(tmp_path: Path) -> None:
    """Index-friendly: the date range is a search of the recordings_day index, not a scan."""
    path = tmp_path / "ledger.db"
    _seed_ledger(path)
    db = LedgerDb(path, read_only=True)
    try:
        seen: list[str] = []
        db.conn.set_trace_callback(seen.append)
        list(db.search(since="2024-03-01", until="2024-03-31"))
        sql = next(s for s in seen if s.startswith("SELECT"))
        assert DAY_EXPR in sql
        plan = " ".join(str(r[3]) for r in db.conn.execute(
            f"EXPLAIN QUERY PLAN SELECT key FROM recordings WHERE ({DAY_EXPR}) >= ? AND ({DAY_EXPR}) <= ?",  # noqa: S608
            ("2024-03-01", "2024-03-31")))
        assert "USING INDEX recordings_day" in plan, plan
    finally:
        db.close()


@pytest.mark.parametrize("text", ["2024-3-1", "01/03/2024", "2024-02-30", "yesterday"])
def test_a_date_that_is_not_yyyy_mm_dd_is_a_clear_error(text: str) -> None:
    with pytest.raises(ConfigError, match="--since"):
        parse_day(text, "--since")


async def test_find_prints_one_line_or_one_json_object_per_recording(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=6)
    # Discovery: the listing brings the call fields (config ids alone carry none).
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"discover": {"enabled": True}}})
    assert (await _once(cfg)).counts["done"] == 6
    inbound = [r for r in sim.recordings if r.call_type == "Inbound"]
    out = await _cli("find", "--call-type", "Inbound", "--json", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    found = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(f["id"] for f in found) == sorted(r.id for r in inbound)
    for f in found:
        rec = next(r for r in sim.recordings if r.id == f["id"])
        assert (f["time"], f["call_from"], f["call_to"], f["state"]) == (rec.time, rec.call_from, rec.call_to, "done")
        assert Path(f["path"]).read_bytes() == sim.content(rec)
    first = sim.recordings[0]
    text = await _cli("find", "--caller", first.call_from.split("<")[1].rstrip(">"), "-c", str(cfg))
    lines = text.stdout.splitlines()
    assert any(line.split("\t")[1:] == [first.time, first.call_from, first.call_to, f"{first.duration}s", "done"]
               for line in lines), lines
    bad = await _cli("find", "--since", "March", "-c", str(cfg))
    assert bad.returncode == 2 and "--since" in bad.stderr and "Traceback" not in bad.stderr
    bad_state = await _cli("find", "--state", "archived", "-c", str(cfg))
    assert bad_state.returncode == 2 and "--state" in bad_state.stderr


# ---------------------------------------------------------------- export
def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def test_export_copies_matching_recordings_and_sidecars_never_overwriting(start_sim: SimFactory,
                                                                                tmp_path: Path) -> None:
    sim = await start_sim(count=6)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"discover": {"enabled": True}}})
    await _once(cfg)
    archive = tmp_path / "archive"
    to = tmp_path / "out"
    out = await _cli("export", "--to", str(to), "--call-type", "Outbound", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    outbound = [r for r in sim.recordings if r.call_type == "Outbound"]
    got = _tree(to)
    audio = {k: v for k, v in got.items() if not k.endswith(".json")}
    assert sorted(audio.values()) == sorted(sim.content(r) for r in outbound)
    for rel, data in audio.items():
        assert (archive / rel).read_bytes() == data
        assert got[rel + ".json"] == (archive / (rel + ".json")).read_bytes()
    # Again: everything is there already, identical: skipped, exit 0, nothing changed.
    again = await _cli("export", "--to", str(to), "--call-type", "Outbound", "-c", str(cfg))
    assert again.returncode == 0 and f"0 copied, {len(outbound)} already there" in again.stdout
    assert _tree(to) == got
    # A different file under the name: kept, the recording goes beside it as <stem>~<id>.
    rel = next(iter(audio))
    (to / rel).write_bytes(b"someone else's file")
    third = await _cli("export", "--to", str(to), "--call-type", "Outbound", "-c", str(cfg))
    assert third.returncode == 0, third.stderr
    assert (to / rel).read_bytes() == b"someone else's file"
    twins = [p for p in (to / rel).parent.iterdir() if "~" in p.name and not p.name.endswith(".json")]
    assert len(twins) == 1 and twins[0].read_bytes() == (archive / rel).read_bytes()
    inside = await _cli("export", "--to", str(archive / "x"), "-c", str(cfg))
    assert inside.returncode == 2 and "inside archive.dir" in inside.stderr


async def test_export_checks_sha256_and_reports_what_it_cannot_export(start_sim: SimFactory, tmp_path: Path) -> None:
    """A damaged archived file is not exported (exit 1, named); a recording whose local copy was removed
    with no S3 configured is reported; the rest is exported."""
    sim = await start_sim(count=3)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]}})
    await _once(cfg)
    db = _db(cfg)
    try:
        rows = {r.rec_id: r for r in db.rows()}
        damaged, removed, good = (rows[r.id] for r in sim.recordings)
        with db.write() as c:
            c.execute("UPDATE recordings SET local_kept = 0 WHERE key = ?", (removed.key,))
    finally:
        db.close()
    archive = tmp_path / "archive"
    path = archive / str(damaged.final_path)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    (archive / str(removed.final_path)).unlink()
    to = tmp_path / "out"
    out = await _cli("export", "--to", str(to), "-c", str(cfg))
    assert out.returncode == 1
    assert f"{damaged.rec_id}: " in out.stderr and "does not hold what was archived" in out.stderr
    assert f"{removed.rec_id}: " in out.stderr and "archive.s3" in out.stderr
    assert _tree(to) == {str(good.final_path): sim.content(sim.recordings[2]),
                         f"{good.final_path}.json": (archive / f"{good.final_path}.json").read_bytes()}
    assert not [p for p in to.rglob(".*.part")]


async def test_export_fetches_a_removed_local_copy_from_s3_and_verifies_it(start_sim: SimFactory,
                                                                          tmp_path: Path) -> None:
    sim = await start_sim(count=3)
    with s3_server("moto", tmp_path / "s3") as server:
        cfg = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [r.id for r in sim.recordings]},
            "archive": {"keep_local": False, "s3": server.config()}})
        assert (await _once(cfg)).counts["done"] == 3
        to = tmp_path / "out"
        out = await _cli("export", "--to", str(to), "-c", str(cfg))
        assert out.returncode == 0, out.stderr
        audio = {k: v for k, v in _tree(to).items() if not k.endswith(".json")}
        assert sorted(audio.values()) == sorted(sim.content(r) for r in sim.recordings)
        sidecars = [json.loads(v) for k, v in _tree(to).items() if k.endswith(".json")]
        assert sorted(s["sha256"] for s in sidecars) == sorted(hashlib.sha256(v).hexdigest() for v in audio.values())


# ---------------------------------------------------------------- forget
def _forgotten(cfg: Path) -> dict[str, dict[str, Any]]:
    db = _db(cfg)
    try:
        return {str(r["key"]): dict(r) for r in db.conn.execute("SELECT * FROM forgotten")}
    finally:
        db.close()


async def test_forgotten_recordings_are_never_fetched_again_by_any_source(start_sim: SimFactory,
                                                                         tmp_path: Path) -> None:
    """Config ids, the queue file (by id and by name), discovery (poll, back-fill, sweep), `enqueue`,
    `retry` and `verify` after a lost file: none brings a forgotten recording back; status counts it."""
    sim = await start_sim(count=6)
    recs = sim.recordings
    kept, erased, never, stays = recs[0], recs[1], recs[5], recs[2]
    queue = tmp_path / "queue.txt"
    queue.write_text("".join(f"{r.id}\n" for r in recs) + f"{erased.file}\n{never.file}\n")
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {
        "ids": [r.id for r in recs], "queue_file": "queue.txt",
        "discover": {"enabled": True, "interval_s": 1}}})
    # Forgotten before the ledger ever saw it: never fetched at all.
    first = await _cli("forget", str(never.id), "--reason", "erasure request #17", "-c", str(cfg))
    assert first.returncode == 0, first.stderr
    assert (await _once(cfg)).counts["done"] == 5
    archive = tmp_path / "archive"
    assert not list(archive.rglob(never.file))
    out = await _cli("forget", str(kept.id), "--reason", "no longer needed", "-c", str(cfg))
    assert out.returncode == 0 and "1 recording(s) forgotten" in out.stdout
    erase = await _cli("forget", "--erase", erased.file, "--reason", "erasure request #18", "-c", str(cfg))
    assert erase.returncode == 0, erase.stderr
    assert not list(archive.rglob(erased.file)) and not list(archive.rglob(erased.file + ".json"))
    assert (await _cli("forget", str(stays.id), "-c", str(cfg))).returncode == 0
    stays_path = next(archive.rglob(stays.file))
    kept_path = next(archive.rglob(kept.file))
    kept_path.unlink()                                        # verify must not re-queue it
    assert (await _cli("enqueue", str(erased.id), erased.file, "-c", str(cfg))).stdout.startswith("enqueue: 0 added")
    assert (await _cli("retry", "-c", str(cfg))).returncode == 0
    await _cli("verify", "-c", str(cfg))
    again = await _once(cfg)
    assert again.stats.downloaded == 0
    # Forgotten without --erase: its file stays, known to the ledger (not "untracked"), and is not verified.
    assert stays_path.read_bytes() == sim.content(stays) and again.reconcile.untracked == 0
    assert not kept_path.exists() and not list(archive.rglob(erased.file)) and not list(archive.rglob(never.file))
    status = json.loads((await _cli("status", "--json", "-c", str(cfg))).stdout)
    assert status["counts"]["done"] == 2 and status["counts"]["pending"] == 0
    db = _db(cfg)
    try:
        forgotten = {r.key for r in db.rows("forgotten")}
    finally:
        db.close()
    # The queue file's name line for `never` became a row of its own, forgotten when its name was told.
    assert forgotten - {f"file:{never.file}"} == {f"id:{r.id}" for r in (kept, erased, never, stays)}
    assert status["counts"]["forgotten"] == len(forgotten)
    record = _forgotten(cfg)
    assert record[f"id:{erased.id}"]["reason"] == "erasure request #18"
    assert record[f"id:{erased.id}"]["erased_at"] is not None
    assert "uid 0" in record[f"id:{kept.id}"]["forgotten_by"] or "uid " in record[f"id:{kept.id}"]["forgotten_by"]
    assert record[f"id:{kept.id}"]["erased_at"] is None
    # The erased row keeps its key, and nothing of the call.
    db = _db(cfg)
    try:
        row = db.get(f"id:{erased.id}")
        assert row is not None and row.state == "forgotten" and row.file is None and row.meta == {}
        assert row.final_path is None and row.sha256 is None
        dump = "\n".join(db.conn.iterdump())
    finally:
        db.close()
    for secret in (erased.file, erased.call_from, erased.call_to, erased.time):
        assert secret not in dump


def test_a_forgotten_name_is_refused_by_events_the_queue_and_a_twin_transfer(tmp_path: Path) -> None:
    """After an erasure the ledger holds no name, only its hash: an event (name), the queue file's fast
    path, and an id row whose PBX tells the forgotten name at download are all refused."""
    name = "20240301090000-1709283600.0-+4930111-2001-Inbound.wav"
    db = LedgerDb(tmp_path / "ledger.db")
    try:
        db.enqueue([Ref(rec_id=7, file=name, meta=_meta("03/01/2024 09:00:00", "+4930111", "2001", "Inbound"))],
                   source="discover", now=1.0)
        db.forget(["id:7"], by="test", reason=None, now=2.0)
        db.erased("id:7", by="test", reason="gdpr", now=3.0, error=None, local_gone=True, copies_gone=[])
        assert db.enqueue([Ref(file=name)], source="event", now=4.0) == 0
        assert db.enqueue([Ref(file=name[:-4] + ".mp3")], source="event", now=4.0) == 0
        assert db.enqueue_many([Ref(file=name)], source="queue", now=4.0) == 0
        assert db.enqueue([Ref(rec_id=7, file=name)], source="discover", now=4.0) == 0
        # An id the ledger never knew, whose PBX name is the forgotten one: forgotten at bind time.
        db.enqueue([Ref(rec_id=8)], source="config", now=5.0)
        (row,) = db.claim(1, now=6.0, lease_s=60)
        assert db.bind_name(row.key, name) == ("gone", None)
        again = db.get("id:8")
        assert again is not None and again.state == "forgotten"
        assert db.claim(1, now=7.0, lease_s=60) == []
        assert db.retry(None, now=8.0) == 0
    finally:
        db.close()


async def test_forget_refuses_while_a_run_holds_the_ledger(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=1)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [sim.recordings[0].id]}})
    await _once(cfg)
    lock = RunLock(load_config(cfg).state.path)
    lock.acquire()
    try:
        out = await _cli("forget", str(sim.recordings[0].id), "-c", str(cfg))
    finally:
        lock.release()
    assert out.returncode == 1 and "another run/once" in out.stderr and "Traceback" not in out.stderr
    assert _forgotten(cfg) == {}


async def test_forget_erase_deletes_the_s3_copies_and_reports_a_bucket_that_refuses(start_sim: SimFactory,
                                                                                   tmp_path: Path) -> None:
    """Every version of the object and its sidecar goes; with Object Lock retention the bucket refuses:
    exit 1, the key named, the recording stays forgotten and the erasure is marked incomplete."""
    sim = await start_sim(count=2)
    free, locked = sim.recordings
    with s3_server("moto", tmp_path / "s3", lock=True) as server:
        cfg = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [r.id for r in sim.recordings]}, "archive": {"s3": server.config()}})
        assert (await _once(cfg)).counts["done"] == 2
        client = server.client()
        until = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
        locked_key = next(k for k in server.objects() if k.endswith(locked.file))
        client.put_object_retention(Bucket=BUCKET, Key=locked_key,
                                    Retention={"Mode": "COMPLIANCE", "RetainUntilDate": until})
        ok = await _cli("forget", "--erase", str(free.id), "-c", str(cfg))
        assert ok.returncode == 0, ok.stderr
        assert not [k for k in server.objects() if free.file in k]
        versions = client.list_object_versions(Bucket=BUCKET).get("Versions", [])
        assert not [v for v in versions if free.file in v["Key"]]
        refused = await _cli("forget", "--erase", str(locked.id), "-c", str(cfg))
        assert refused.returncode == 1
        assert locked_key in refused.stderr and "Object Lock" in refused.stderr
        assert locked_key in server.objects()
        assert not list((tmp_path / "archive").rglob(locked.file))   # the local copy went
        record = _forgotten(cfg)[f"id:{locked.id}"]
        assert record["erased_at"] is None and locked_key in record["erase_error"]


# ---------------------------------------------------------------- init
def test_init_writes_a_commented_config_and_the_archive_marker_never_overwriting(tmp_path: Path) -> None:
    target = tmp_path / "etc"
    out = run_cli("init", "--dir", str(target))
    assert out.returncode == 0, out.stderr
    cfg_path = target / "config.yaml"
    text = cfg_path.read_text()
    assert text.startswith("# yaml-language-server: $schema=") and "# Written by `yeastar-archiver init`" in text
    assert cfg_path.stat().st_mode & 0o777 == 0o600
    assert (target / "archive" / ".yeastar-archiver" / "archive-id").read_text().strip()
    cfg = load_config(cfg_path)
    assert cfg.archive.dir == target / "archive"
    before = text
    again = run_cli("init", "--dir", str(target))
    assert again.returncode == 2 and str(cfg_path) in again.stderr and "never overwritten" in again.stderr
    assert cfg_path.read_text() == before
    elsewhere = run_cli("init", "--dir", str(tmp_path / "b"), "--archive-dir", str(tmp_path / "srv"))
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert load_config(tmp_path / "b" / "config.yaml").archive.dir == tmp_path / "srv"
    assert (tmp_path / "srv" / ".yeastar-archiver" / "archive-id").is_file()


def test_the_init_template_is_the_shipped_example_with_this_archive() -> None:
    example = example_config()
    assert example == (REPO / "config.example.yaml").read_text()
    text = init_config_text(example, archive_dir="/srv/x", schema_path=Path("/s.json"))
    assert text.splitlines()[0] == "# yaml-language-server: $schema=/s.json"
    assert '  dir: "/srv/x"' in text and text.count("\n") == example.count("\n") + 1


def test_the_installed_wheel_carries_the_example_config(tmp_path: Path) -> None:
    """A plain `pip install` finds config.example.yaml: it is package data in the wheel, and `init` run
    from the installed package (not this checkout) writes it."""
    out = tmp_path / "dist"
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(out)], capture_output=True, text=True, cwd=REPO,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = out / done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("daemon/config.example.yaml") == (REPO / "config.example.yaml").read_bytes()
    site = tmp_path / "site"
    # A pure-Python wheel installs by unpacking (what `pip install --target` does with it); no pip
    # needed, which a venv made by uv (test-lowest) does not have.
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    env = cli_env()
    env["PYTHONPATH"] = str(site)
    run = subprocess.run([sys.executable, "-m", "daemon", "init", "--dir", str(tmp_path / "new")], cwd=tmp_path,
                         capture_output=True, text=True, env=env, check=False, timeout=60)
    assert run.returncode == 0, run.stderr
    assert str(site) in (tmp_path / "new" / "config.yaml").read_text().splitlines()[0]


def test_sqlite_supports_the_day_index() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE recordings (time TEXT, file TEXT)")
    conn.execute(f"CREATE INDEX d ON recordings({DAY_EXPR})")
    conn.execute("INSERT INTO recordings VALUES ('12/31/2023 10:00:00', NULL), (NULL, '20240102x.wav')")
    day = f"SELECT {DAY_EXPR} FROM recordings ORDER BY 1"  # noqa: S608 - a constant
    assert [r[0] for r in conn.execute(day)] == ["2023-12-31",
                                                                                             "2024-01-02"]


@pytest.mark.parametrize("command", ["find", "export", "forget", "init"])
def test_each_new_command_s_help_gives_its_exit_codes_and_an_example(command: str) -> None:
    out = run_cli(command, "--help")
    assert out.returncode == 0 and "exit codes: 0" in out.stdout
    assert f"example: yeastar-archiver {command}" in out.stdout


def test_forget_by_id_also_forgets_a_row_for_it_by_name(tmp_path: Path) -> None:
    """A recording can have two rows for a while (its id, and its name from an event): forget by id
    forgets both, so that the name row is not archived (or exported) under the other key."""
    cfg = write_config(tmp_path, "https://127.0.0.1:9")
    db = _db(cfg)
    try:
        with db.write() as c:
            c.execute("INSERT INTO recordings (key, rec_id, file, state) VALUES ('id:9', 9, 'n.wav', 'pending')")
            c.execute("INSERT INTO recordings (key, rec_id, file, state) VALUES ('file:n.mp3', NULL, 'n.mp3', "
                      "'pending')")
    finally:
        db.close()
    out = run_cli("forget", "9", "-c", str(cfg))
    assert out.returncode == 0 and "2 recording(s) forgotten" in out.stdout, out.stderr
    assert set(_forgotten(cfg)) == {"id:9", "file:n.mp3"}


def test_erasing_a_row_keyed_by_its_name_keeps_only_the_name_s_hash(tmp_path: Path) -> None:
    """A recording known only by its file name (the queue, an event): after the erasure the ledger no
    longer holds the name (it holds phone numbers), yet the name is still refused, and forgetting it
    again changes nothing."""
    name = "20240301090000-1709283600.0-+4930111-2001-Inbound.wav"
    db = LedgerDb(tmp_path / "ledger.db")
    try:
        db.enqueue([Ref(file=name)], source="event", now=1.0)
        assert db.forget([f"file:{name}"], by="test", reason="gdpr", now=2.0) == [f"file:{name}"]
        db.erased(f"file:{name}", by="test", reason=None, now=3.0, error=None, local_gone=True, copies_gone=[])
        assert "+4930111" not in "\n".join(db.conn.iterdump())
        assert [r.state for r in db.rows()] == ["forgotten"]
        assert db.enqueue([Ref(file=name)], source="event", now=4.0) == 0
        assert db.enqueue_many([Ref(file=name)], source="queue", now=4.0) == 0
        assert db.forget([f"file:{name}"], by="test", reason=None, now=5.0) == []
        (record,) = db.conn.execute("SELECT * FROM forgotten").fetchall()
        assert record["reason"] == "gdpr" and record["erased_at"] == 3.0
    finally:
        db.close()


def test_the_first_forget_request_stays_on_record_and_the_eraser_is_recorded_beside_it(tmp_path: Path) -> None:
    """An audit reads who asked to forget, when and why: neither a second request nor the erasure
    rewrites it; the erasure adds who erased."""
    db = LedgerDb(tmp_path / "ledger.db")
    try:
        db.enqueue([Ref(rec_id=7)], source="config", now=1.0)
        assert db.forget(["id:7"], by="alice (uid 1001)", reason="gdpr art. 17", now=2.0) == ["id:7"]
        assert db.forget(["id:7"], by="bob (uid 1002)", reason="again", now=3.0) == []
        db.erased("id:7", by="carol (uid 1003)", reason="ticket 42", now=4.0, error=None, local_gone=True,
                  copies_gone=[])
        record = db.forgotten_record("id:7")
        assert record is not None
        assert (record["forgotten_by"], record["forgotten_at"], record["reason"]) == \
            ("alice (uid 1001)", 2.0, "gdpr art. 17")
        assert (record["erased_by"], record["erased_at"]) == ("carol (uid 1003)", 4.0)
    finally:
        db.close()


def test_a_ledger_made_before_erased_by_existed_gets_the_column(tmp_path: Path) -> None:
    import sqlite3
    path = tmp_path / "ledger.db"
    LedgerDb(path).close()
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE forgotten DROP COLUMN erased_by")   # as an older version made it
    conn.commit()
    conn.close()
    db = LedgerDb(path)
    try:
        db.enqueue([Ref(rec_id=8)], source="config", now=1.0)
        db.forget(["id:8"], by="alice", reason=None, now=2.0)
        db.erased("id:8", by="carol", reason=None, now=3.0, error=None, local_gone=True, copies_gone=[])
        record = db.forgotten_record("id:8")
        assert record is not None and record["erased_by"] == "carol" and record["forgotten_by"] == "alice"
    finally:
        db.close()
