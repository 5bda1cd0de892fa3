"""The operator commands (``wattmesh ledger ...``, ``wattmesh archive export``) on a PostgreSQL
ledger, on the throwaway server of tests/pg_fixtures.py: the same output as on SQLite for the
same settled data, the ledger named by URL or by the coordinator file, the password only from
the environment and never shown, clear one-line errors, and backups that go from PostgreSQL to
a SQLite file and back."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner, Result

from coordinator.ledger import Ledger
from tests.pg_fixtures import PostgresServer
from tests.test_archive import build_ledger
from tests.test_ledger_cli import INTERVAL_100, _write_example
from tests.test_ledger_cli_durable import AT, PRICES, _write_open_work
from wattmesh.cli import app

runner = CliRunner()
PASSWORD_ENV = "WATTMESH_LEDGER_PASSWORD"


def _tcp_url(server: PostgresServer, schema: str) -> str:
    """The schema's ledger over TCP: the server asks for the password (not in the URL)."""
    return f"{server.url()}?options={quote(f'-csearch_path={schema}', safe='')}"


def _wattmesh(*args: str | Path, password: str | None = None) -> Result:
    env = {PASSWORD_ENV: password}  # None: unset for the command
    return runner.invoke(app, [str(a) for a in args], env=env)


def _assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def twin_ledgers(postgres_server: PostgresServer, tmp_path: Path) -> tuple[Path, str]:
    """The same intervals settled (and cleared, corrected, audited) into a SQLite file and a
    PostgreSQL schema; the file and the schema's TCP URL."""
    schema = postgres_server.new_schema()
    file = tmp_path / "ledger.sqlite"
    for location in (file, postgres_server.socket_url(schema=schema)):
        _write_example(location)  # intervals 100 and 101: house and solar
        _write_open_work(location)  # cleared, unsettled, estimated, corrected, audited
    return file, _tcp_url(postgres_server, schema)


_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("report",),
    ("report", "--json"),
    ("report", "--site", "solar", "--decimals", "4", "--currency", "CHF"),
    ("check", "--at", AT),
    ("audit",),
    ("audit", "--json", "--kind", "correction"),
)


def test_report_check_and_audit_print_the_same_on_postgresql_as_on_sqlite(
    twin_ledgers: tuple[Path, str], postgres_server: PostgresServer
) -> None:
    file, url = twin_ledgers
    for command in _COMMANDS:
        on_sqlite = _wattmesh("ledger", command[0], file, *command[1:])
        on_postgres = _wattmesh(
            "ledger", command[0], url, *command[1:], password=postgres_server.password
        )
        assert on_sqlite.exit_code == 0, on_sqlite.output
        assert on_postgres.exit_code == 0, on_postgres.output
        if command != ("audit",):  # the audit table does not name the ledger
            assert url in on_postgres.stdout  # the ledger is named, as the file is
        assert on_postgres.stdout.replace(url, "LEDGER") == on_sqlite.stdout.replace(
            str(file), "LEDGER"
        ), command
        assert postgres_server.password not in on_postgres.output
    # The figures are there (not two empty outputs): the hand-checked savings of house.
    report = json.loads(_wattmesh("ledger", "report", "--json", file).stdout)
    assert {s["site"] for s in report["sites"]} >= {"house", "solar", "office"}
    assert report["balanced"] is True


def test_strict_check_fails_alike_on_both_engines(
    twin_ledgers: tuple[Path, str], postgres_server: PostgresServer
) -> None:
    file, url = twin_ledgers
    args = ("--strict", "--at", AT, "--quiet")
    on_sqlite = _wattmesh("ledger", "check", file, *args)
    on_postgres = _wattmesh("ledger", "check", url, *args, password=postgres_server.password)
    assert on_sqlite.exit_code == on_postgres.exit_code == 3
    assert on_postgres.stderr.replace(url, "LEDGER") == on_sqlite.stderr.replace(
        str(file), "LEDGER"
    )


def test_the_coordinator_file_names_the_ledger_and_the_password_variable(
    twin_ledgers: tuple[Path, str], postgres_server: PostgresServer, tmp_path: Path
) -> None:
    file, url = twin_ledgers
    on_postgres = tmp_path / "postgres.toml"
    on_postgres.write_text(
        f'[coordinator]\nledger_url = "{url}"\nledger_password_env = "SITE_LEDGER_PW"\n'
    )
    on_file = tmp_path / "file.toml"
    on_file.write_text('[coordinator]\nledger = "ledger.sqlite"\n')  # next to the file
    by_config = runner.invoke(
        app,
        ["ledger", "report", "--json", "--config", str(on_postgres)],
        env={"SITE_LEDGER_PW": postgres_server.password, PASSWORD_ENV: None},
    )
    by_file = _wattmesh("ledger", "report", "--json", "--config", on_file)
    assert by_config.exit_code == 0, by_config.output
    assert by_file.exit_code == 0, by_file.output
    assert json.loads(by_config.stdout)["ledger"] == url
    assert json.loads(by_file.stdout)["ledger"] == str(file)
    assert {**json.loads(by_config.stdout), "ledger": ""} == {
        **json.loads(by_file.stdout),
        "ledger": "",
    }
    # The variable the file names is the one read: without it the server refuses.
    unset = runner.invoke(
        app,
        ["ledger", "check", "--config", str(on_postgres)],
        env={"SITE_LEDGER_PW": None, PASSWORD_ENV: postgres_server.password},
    )
    _assert_one_line_error(unset, 2, url, "no password supplied", "(set SITE_LEDGER_PW)")
    both = _wattmesh("ledger", "audit", file, "--config", on_file)
    _assert_one_line_error(both, 2, "not both")
    neither = _wattmesh("ledger", "report")
    _assert_one_line_error(neither, 2, "--config coordinator.toml")


def test_server_and_password_errors_are_one_line_and_never_show_the_password(
    twin_ledgers: tuple[Path, str], postgres_server: PostgresServer
) -> None:
    _, url = twin_ledgers
    secret = postgres_server.password
    wrong = _wattmesh("ledger", "report", url, password="wrong-secret-42")
    _assert_one_line_error(wrong, 2, url, "password authentication failed")
    assert "wrong-secret-42" not in wrong.output
    missing = _wattmesh("ledger", "check", url)
    _assert_one_line_error(missing, 2, url, "no password supplied", f"(set {PASSWORD_ENV})")
    dead = url.replace(f":{postgres_server.port}/", ":1/")
    unreachable = _wattmesh("ledger", "audit", dead, password=secret)
    _assert_one_line_error(unreachable, 2, dead, "cannot connect")
    with_password = postgres_server.url(with_password=True)
    in_url = _wattmesh("ledger", "report", with_password)
    _assert_one_line_error(in_url, 2, ":***@", PASSWORD_ENV)
    for result in (wrong, missing, unreachable, in_url):
        assert secret not in result.output


def test_without_psycopg_the_commands_say_what_to_install(
    twin_ledgers: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = twin_ledgers
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    result = _wattmesh("ledger", "report", url, password="x")
    _assert_one_line_error(result, 2, url, "psycopg", "wattmesh[postgres]")


def test_a_database_without_a_ledger_is_refused_and_left_empty(
    postgres_server: PostgresServer,
) -> None:
    schema = postgres_server.new_schema()
    url = _tcp_url(postgres_server, schema)
    for command in ("report", "check", "audit"):
        result = _wattmesh("ledger", command, url, password=postgres_server.password)
        _assert_one_line_error(result, 2, url, "not a wattmesh ledger")
    with postgres_server.admin() as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
        ).fetchall()
    assert tables == []


def test_archive_export_of_a_postgresql_ledger_equals_the_export_of_the_same_sqlite_ledger(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    schema = postgres_server.new_schema()
    file = tmp_path / "ledger.sqlite"
    for location in (file, postgres_server.socket_url(schema=schema)):
        build_ledger(location)  # settled, corrected, estimated, cleared-only intervals
    url = _tcp_url(postgres_server, schema)
    span = ("--from", "2026-06-22", "--to", "2026-06-24")
    from_file = _wattmesh("archive", "export", tmp_path / "a", "--ledger", file, *span)
    from_postgres = _wattmesh(
        "archive", "export", tmp_path / "b", "--ledger", url, *span,
        password=postgres_server.password,
    )  # fmt: skip
    # No telemetry server given: the ledger parts are written, and the exit code says so.
    assert from_file.exit_code == from_postgres.exit_code == 3, from_postgres.output
    assert from_postgres.stdout.replace("/b\n", "/a\n") == from_file.stdout
    assert "settlements: 0 row(s)" not in from_postgres.stdout
    parts = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.parquet"))
    assert len(parts) == 6  # three datasets, two days
    assert parts == sorted(
        p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.parquet")
    )
    for part in parts:
        want = pq.read_table(tmp_path / "a" / part)
        got = pq.read_table(tmp_path / "b" / part)
        assert got.schema == want.schema, part
        assert got.to_pylist() == want.to_pylist(), part
    # The coordinator file names the PostgreSQL ledger too; a wrong password is one line.
    config = tmp_path / "coordinator.toml"
    config.write_text(f'[coordinator]\nledger_url = "{url}"\n')
    by_config = _wattmesh(
        "archive", "export", tmp_path / "c", "--config", config, *span, password="nope-77"
    )
    _assert_one_line_error(by_config, 2, url, "password authentication failed")
    assert "nope-77" not in by_config.output


def _same_json(ledger_a: str | Path, ledger_b: str | Path, *args: str, password: str) -> None:
    """``ledger_a`` and ``ledger_b`` give the same ``--json`` document but for its name."""
    a = _wattmesh("ledger", *args[:1], ledger_a, *args[1:], password=password)
    b = _wattmesh("ledger", *args[:1], ledger_b, *args[1:], password=password)
    assert a.exit_code == 0, a.output
    assert b.exit_code == 0, b.output
    assert {**json.loads(a.stdout), "ledger": ""} == {**json.loads(b.stdout), "ledger": ""}


def test_a_postgresql_backup_is_a_sqlite_ledger_that_restores_into_an_empty_schema(
    twin_ledgers: tuple[Path, str], postgres_server: PostgresServer, tmp_path: Path
) -> None:
    file, url = twin_ledgers
    secret = postgres_server.password
    backup = tmp_path / "backup.sqlite"
    done = _wattmesh("ledger", "backup", url, backup, password=secret)
    assert done.exit_code == 0, done.output
    assert f"backup {backup}: " in done.stdout and "balanced" in done.stdout
    assert backup.read_bytes()[:16] == b"SQLite format 3\x00"
    # The copy holds what the PostgreSQL ledger holds (audit ids included).
    for args in (("report", "--json"), ("audit", "--json")):
        _same_json(backup, file, *args, password=secret)
    # Into an empty schema, in one transaction; the ledger settles on from there.
    schema = postgres_server.new_schema()
    target = _tcp_url(postgres_server, schema)
    restored = _wattmesh("ledger", "restore", backup, target, password=secret)
    assert restored.exit_code == 0, restored.output
    with Ledger(file, migrate=False) as twin:
        settled = len(twin.settled_intervals())
    assert restored.stdout == f"restored {target}: {settled} settled interval(s), balanced\n"
    for args in (("report", "--json"), ("audit", "--json")):
        _same_json(target, file, *args, password=secret)
    with Ledger(postgres_server.socket_url(schema=schema)) as ledger:
        ledger.settle_interval(102, **INTERVAL_100)  # new ids after the copied ones
        ledger.audit("dispatch", "operator", {"site": "house"}, 1_765_000_000.0)
        assert ledger.check_balanced()
    # An existing PostgreSQL ledger is never replaced; a backup never overwrites unasked.
    again = _wattmesh("ledger", "restore", backup, target, password=secret)
    _assert_one_line_error(again, 2, target, "already holds a ledger")
    over = _wattmesh("ledger", "backup", url, backup, password=secret)
    _assert_one_line_error(over, 2, "exists (--force replaces it)")
    # A refused password is one line, and leaves no file behind.
    refused = _wattmesh("ledger", "backup", url, tmp_path / "no.sqlite", password="nope-31")
    _assert_one_line_error(refused, 2, url, "password authentication failed")
    dead = target.replace(f":{postgres_server.port}/", ":1/")
    unreachable = _wattmesh("ledger", "restore", backup, dead, password=secret)
    _assert_one_line_error(unreachable, 2, dead, "cannot connect")
    assert not list(tmp_path.glob("no.sqlite*"))
    assert "nope-31" not in refused.output and secret not in unreachable.output
    # The same backup restores into a SQLite file as well.
    as_file = tmp_path / "restored.sqlite"
    assert _wattmesh("ledger", "restore", backup, as_file).exit_code == 0
    _same_json(as_file, file, "report", "--json", password=secret)


def test_backups_of_a_postgresql_ledger_taken_while_it_settles_hold_whole_intervals(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    schema = postgres_server.new_schema()
    url = _tcp_url(postgres_server, schema)
    stop = threading.Event()
    settled: list[int] = []

    def writer() -> None:  # a coordinator stand-in: one interval after another
        with Ledger(postgres_server.socket_url(schema=schema)) as ledger:
            k = 1000
            while not stop.is_set():
                sites = {f"site-{i}": (i % 5 - 2) * 0.75 for i in range(20)}
                metered = {s: q + 0.125 * (k % 3) for s, q in sites.items()}
                ledger.settle_interval(k, **{**PRICES, "awards_kwh": sites, "metered_kwh": metered})
                settled.append(k)
                k += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        counts = []
        for i in range(3):
            while len(settled) < 5 * (i + 1):
                assert thread.is_alive(), "the writer died"
                stop.wait(0.01)
            backup = tmp_path / f"backup-{i}.sqlite"
            done = _wattmesh("ledger", "backup", url, backup, password=postgres_server.password)
            assert done.exit_code == 0, done.output
            with Ledger(backup, migrate=False) as copy:
                assert copy.check_balanced()  # every interval whole
                intervals = copy.settled_intervals()
                counts.append(len(intervals))
                assert intervals == tuple(range(1000, 1000 + len(intervals)))
        assert thread.is_alive()  # the writer settled on throughout
    finally:
        stop.set()
        thread.join(timeout=60)
    assert counts == sorted(counts) and counts[0] >= 5
