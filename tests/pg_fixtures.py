"""A throwaway PostgreSQL server for the tests, and the ledger store that runs a test on SQLite
and on PostgreSQL.

``postgres_server`` (session scope) runs Debian's PostgreSQL (``/usr/lib/postgresql/*/bin``,
the newest) from ``initdb`` in a temporary folder: a free TCP port on 127.0.0.1 (password,
SCRAM) and a unix socket in that folder (trust); never the system's cluster or port 5432.
PostgreSQL refuses to run as root, so as root the folder is given to the ``postgres`` system
user (the package creates it) and every server command runs through ``runuser``. The server
is stopped and the folder removed at the end of the session. It runs with ``fsync=off``: the
tests kill clients, never the server, and nothing of it outlives the session.

``ledger_store`` is parametrised over both engines: ``store.location(name)`` gives a test
the place of a new, empty ledger (a file in ``tmp_path``, or a PostgreSQL schema of its own,
reached through ``search_path`` in the URL), the same place for the same name in one test;
``store.fresh(name)`` a new one on every call (for hypothesis examples).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

_USER = "wattmesh"
_PASSWORD = "test-only-secret"
_DATABASE = "ledger_tests"


def _postgres_bin() -> Path:
    """The newest Debian PostgreSQL's bin folder."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.parent.name)],
    )
    if not found:
        pytest.fail("PostgreSQL is required for the ledger tests (apt-get install postgresql)")
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def psycopg_connect(url: str) -> Any:
    """An autocommit psycopg connection."""
    import psycopg

    return psycopg.connect(url, autocommit=True)


@dataclass
class PostgresServer:
    """A running throwaway server: ``url()`` over TCP with a password, ``socket_url()``
    over the unix socket (trust)."""

    folder: Path
    port: int
    user: str = _USER
    password: str = _PASSWORD
    _schemas: Iterator[int] = field(default_factory=itertools.count)

    def url(self, database: str = _DATABASE, *, with_password: bool = False) -> str:
        secret = f":{self.password}" if with_password else ""
        return f"postgresql://{self.user}{secret}@127.0.0.1:{self.port}/{database}"

    def socket_url(self, database: str = _DATABASE, schema: str | None = None) -> str:
        url = f"postgresql://{self.user}@/{database}?host={quote(str(self.folder), safe='')}"
        url += f"&port={self.port}"
        if schema is not None:
            url += f"&options={quote(f'-csearch_path={schema}', safe='')}"
        return url

    def admin(self, database: str = _DATABASE) -> Any:
        """An autocommit psycopg connection to ``database`` over the socket."""
        return psycopg_connect(self.socket_url(database))

    def new_schema(self) -> str:
        """A new empty schema in the test database; its name."""
        name = f"ledger_{next(self._schemas)}"
        with self.admin() as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        return name


def _run(argv: list[str], *, as_postgres: bool) -> None:
    if as_postgres:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed: {done.stdout}{done.stderr}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the session (see the module docs)."""
    bin_dir = _postgres_bin()
    as_postgres = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="wattmesh-pg-"))
    if as_postgres:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("run as root, the tests need the postgres system user to run PostgreSQL")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    pwfile = folder / "pw"
    pwfile.write_text(_PASSWORD + "\n")
    if as_postgres:
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    data = folder / "data"
    port = _free_port()
    _run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", _USER, "-E", "UTF8", "--no-sync",
         "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"],
        as_postgres=as_postgres,
    )  # fmt: skip
    options = (
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off"
    )
    _run(
        [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w",
         "-t", "60", "-o", options, "start"],
        as_postgres=as_postgres,
    )  # fmt: skip
    server = PostgresServer(folder, port)
    try:
        with server.admin("postgres") as conn:
            conn.execute(f"CREATE DATABASE {_DATABASE}")
        yield server
    finally:
        with contextlib.suppress(Exception):
            _run(
                [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                as_postgres=as_postgres,
            )
        shutil.rmtree(folder, ignore_errors=True)


class LedgerStore:
    """Where a test's ledgers live on one engine (see the module docs)."""

    def __init__(self, engine: str, tmp_path: Path, server: PostgresServer | None) -> None:
        self.engine = engine
        self._tmp = tmp_path
        self._server = server
        self._named: dict[str, str | Path] = {}
        self._recycled: dict[str, str] = {}
        self._connections: dict[str, Any] = {}
        self._count = itertools.count()

    def close(self) -> None:
        """Close the store's own connections."""
        for conn in self._connections.values():
            conn.close()

    def _connection(self, location: str) -> Any:
        if location not in self._connections:
            self._connections[location] = psycopg_connect(location)
        return self._connections[location]

    def fresh(self, name: str = "ledger") -> str | Path:
        """An empty ledger's location on every call (for hypothesis examples).

        SQLite: a new file each time. PostgreSQL: the ledger called ``name``, created the
        first time and emptied on each later call (the previous example's ledger must be
        closed): creating the schema takes about 50 ms there, so the ledger's rows are deleted
        instead, behind its back, with triggers off (``session_replication_role``, as the
        superuser). The schema version and the community and utility accounts stay, as a new
        ledger has them. Creating the schema is what ``location`` tests.
        """
        if self._server is None:
            folder = self._tmp / f"{name}-{next(self._count)}"
            folder.mkdir()
            return folder / f"{name}.db"
        if name not in self._recycled:
            self._recycled[name] = self._server.socket_url(schema=self._server.new_schema())
            return self._recycled[name]
        location = self._recycled[name]
        conn = self._connection(location)
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = "
                "current_schema() AND table_type = 'BASE TABLE' "
                "AND table_name NOT IN ('schema_version', 'accounts')"
            )
        ]
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            for table in tables:
                conn.execute(f"DELETE FROM {table}")
            conn.execute("DELETE FROM accounts WHERE kind = 'site'")
        return location

    def location(self, name: str = "ledger") -> str | Path:
        """The location of the test's ledger called ``name`` (new and empty the first time)."""
        if name not in self._named:
            self._named[name] = self.fresh(name)
        return self._named[name]

    @property
    def integrity_error(self) -> type[Exception]:
        """The driver's error for a refused write (a constraint or an append-only trigger)."""
        if self._server is None:
            return sqlite3.IntegrityError
        import psycopg

        return psycopg.IntegrityError

    def execute(self, location: str | Path, statement: str) -> list[tuple[Any, ...]]:
        """Run one statement on the ledger's database behind the ledger's back (committed)."""
        if self._server is None:
            conn = sqlite3.connect(location, isolation_level=None)
            try:
                return conn.execute(statement).fetchall()
            finally:
                conn.close()
        cur = self._connection(str(location)).execute(statement)
        return [tuple(r) for r in cur.fetchall()] if cur.description else []

    def count(self, location: str | Path, table: str) -> int:
        """How many rows ``table`` has."""
        return int(self.execute(location, f"SELECT COUNT(*) FROM {table}")[0][0])


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerStore]:
    """The test's ledgers on SQLite files, then on the throwaway PostgreSQL server."""
    server: PostgresServer | None = None
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres_server")
    store = LedgerStore(request.param, tmp_path, server)
    try:
        yield store
    finally:
        store.close()
