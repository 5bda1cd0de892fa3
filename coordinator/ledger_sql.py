"""The ledger's two SQL engines behind one narrow connection: SQLite (a file) and PostgreSQL.

:class:`coordinator.ledger.Ledger` writes one dialect of SQL, the common part of both engines
(``?`` placeholders, ``INSERT ... ON CONFLICT DO NOTHING``, ``RETURNING``, ``CASE`` instead of
SQLite's two-argument ``MAX``). What differs lives here and nowhere else:

* placeholders: PostgreSQL's driver (psycopg 3) takes ``%s``; ``?`` is rewritten for it;
* schema DDL: the ledger's templates name ``{INT}``, ``{ID}``, ``{REAL}``, ``{TEXT}``,
  ``{JSON_CHECK}`` and ``{STRICT}``, which :meth:`LedgerConnection.ddl` fills in per engine.
  SQLite's STRICT tables store 64-bit INTEGER; PostgreSQL needs BIGINT (its INTEGER is 32
  bits), DOUBLE PRECISION for times (its REAL is 32 bits), identity columns for ids and the
  "C" collation on text so that ``ORDER BY site`` sorts by code point as SQLite (and Python's
  ``sorted``) do;
* append-only triggers: SQLite's ``RAISE(ABORT)``, a PL/pgSQL function in PostgreSQL (which
  also refuses TRUNCATE); both raise the driver's IntegrityError naming the table;
* the write lock: SQLite's ``BEGIN IMMEDIATE`` takes the database's single writer lock;
  PostgreSQL begins a READ COMMITTED transaction and takes a transaction-scoped advisory lock
  keyed on the schema, so writers of one ledger are serialised exactly as in SQLite and every
  statement after the lock sees what the previous writer committed;
* ``SUM`` of a BIGINT is NUMERIC in PostgreSQL: integral NUMERIC values are read as ``int``, so
  money stays ``int`` on both engines;
* durability: SQLite runs WAL with ``synchronous=FULL``; PostgreSQL commits are durable with its
  defaults (``fsync``, ``synchronous_commit``), which the operator's server keeps.

A ``postgresql://`` (or ``postgres://``) URL selects PostgreSQL; anything else is a SQLite file
path. psycopg is imported only for PostgreSQL, so SQLite users do not need it.
"""

from __future__ import annotations

import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "POSTGRES_SCHEMES",
    "ConnectError",
    "LedgerConnection",
    "PostgresConnection",
    "SqliteConnection",
    "connect",
    "is_postgres_url",
    "mask_url",
]

#: URL schemes that select the PostgreSQL engine.
POSTGRES_SCHEMES: Final = ("postgresql", "postgres")
#: First key of the advisory locks the ledger takes in PostgreSQL ('wmL' in ASCII); the second
#: is the hash of the schema the ledger lives in.
_WRITE_LOCK_CLASS: Final = 0x776D4C


class ConnectError(Exception):
    """The engine cannot be reached or its driver is missing; the message says which."""


class Rows(Protocol):
    """What a statement returns on both engines: a cursor to fetch from or iterate."""

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


def is_postgres_url(location: str | Path) -> bool:
    """Whether ``location`` is a PostgreSQL URL rather than a SQLite file path."""
    return isinstance(location, str) and location.split("://", 1)[0] in POSTGRES_SCHEMES


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


class LedgerConnection(ABC):
    """One connection to the ledger's database, in the common dialect (see the module docs).

    ``location`` names the database in messages (a file path, or a URL without password);
    ``errors`` are the driver's exception classes, which the ledger translates once.
    """

    engine: str
    location: str
    errors: tuple[type[Exception], ...]

    @abstractmethod
    def execute(self, sql: str, params: Sequence[object] | None = None) -> Rows:
        """Run one statement with ``?`` placeholders."""

    @abstractmethod
    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        """Run one statement once per parameter row."""

    @abstractmethod
    def begin_write(self) -> None:
        """Begin a transaction holding the ledger's write lock (one writer at a time)."""

    @property
    @abstractmethod
    def in_transaction(self) -> bool:
        """Whether a transaction is open (to roll back after an error)."""

    @abstractmethod
    def table_exists(self, name: str) -> bool:
        """Whether the ledger's schema has a table of that name."""

    @abstractmethod
    def ddl(self, template: str, **names: str) -> str:
        """A schema template with this engine's types (and any other ``names``) filled in."""

    @abstractmethod
    def append_only(self, table: str) -> tuple[str, ...]:
        """Statements that make ``table`` refuse every UPDATE and DELETE (and TRUNCATE)."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection."""

    def reconnect_if_broken(self) -> None:  # noqa: B027 - a no-op unless overridden
        """Open the connection again if the server dropped it (PostgreSQL); a no-op for a file.

        Raises :class:`ConnectError` when the server is still unreachable.
        """


_SQLITE_TYPES: Final = {
    "INT": "INTEGER",
    "ID": "INTEGER PRIMARY KEY",
    "REAL": "REAL",
    "TEXT": "TEXT",
    "JSON_CHECK": "json_valid(detail)",
    "STRICT": "STRICT",
}
_POSTGRES_TYPES: Final = {
    "INT": "BIGINT",
    "ID": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    "REAL": "DOUBLE PRECISION",
    "TEXT": 'TEXT COLLATE "C"',
    "JSON_CHECK": "(detail::jsonb) IS NOT NULL",
    "STRICT": "",
}


class SqliteConnection(LedgerConnection):
    """A SQLite file: WAL journal, ``synchronous=FULL``, foreign keys on after the schema check.

    ``raw`` is the :class:`sqlite3.Connection` (autocommit: explicit BEGIN/COMMIT only).
    """

    engine = "sqlite"
    errors = (sqlite3.Error,)

    def __init__(self, path: Path, *, busy_timeout_s: float) -> None:
        self.location = str(path)
        try:
            self.raw = sqlite3.connect(
                path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as err:
            raise ConnectError(str(err)) from err
        try:
            mode = self.raw.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self.raw.execute("PRAGMA synchronous=FULL")
            self.raw.execute("PRAGMA foreign_keys=OFF")  # until the schema is checked/migrated
        except sqlite3.Error as err:
            self.raw.close()
            raise ConnectError(str(err)) from err
        if str(mode).lower() != "wal":
            self.raw.close()
            raise ConnectError(f"journal_mode is {mode!r}, WAL is required")

    def execute(self, sql: str, params: Sequence[object] | None = None) -> Rows:
        return self.raw.execute(sql, () if params is None else params)

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        self.raw.executemany(sql, rows)

    def begin_write(self) -> None:
        self.raw.execute("BEGIN IMMEDIATE")

    @property
    def in_transaction(self) -> bool:
        return self.raw.in_transaction

    def table_exists(self, name: str) -> bool:
        row = self.raw.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    def ddl(self, template: str, **names: str) -> str:
        return template.format(**_SQLITE_TYPES, **names)

    def append_only(self, table: str) -> tuple[str, ...]:
        return tuple(
            f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
            for verb in ("UPDATE", "DELETE")
        )

    def close(self) -> None:
        self.raw.close()


def _integral_numeric_loader() -> type[Any]:
    """A psycopg loader reading NUMERIC as ``int`` when it is integral (``SUM`` of BIGINT)."""
    from psycopg.adapt import Loader  # noqa: PLC0415 - psycopg is optional

    class IntegralNumericLoader(Loader):
        def load(self, data: Any) -> int | Decimal:
            value = Decimal(bytes(data).decode())
            return int(value) if value == value.to_integral_value() else value

    return IntegralNumericLoader


class PostgresConnection(LedgerConnection):
    """A PostgreSQL database (psycopg 3, autocommit: explicit BEGIN/COMMIT only).

    The ledger's tables live in the connection's current schema (the first of its
    ``search_path``; ``options=-csearch_path%3Dname`` in the URL chooses another). ``password``
    overrides any in the URL (libpq also reads ``PGPASSWORD`` and ``~/.pgpass``).
    """

    engine = "postgresql"

    def __init__(self, url: str, *, busy_timeout_s: float, password: str | None = None) -> None:
        self.location = mask_url(url)
        try:
            import psycopg  # noqa: PLC0415 - optional: only the PostgreSQL ledger needs it
        except ImportError as err:
            raise ConnectError(
                "the PostgreSQL ledger needs psycopg 3: pip install 'wattmesh[postgres]'"
            ) from err
        self.errors = (psycopg.Error,)
        self._url = url
        self._extra: dict[str, Any] = {"connect_timeout": max(1, round(busy_timeout_s))}
        if password is not None:
            self._extra["password"] = password
        self._pq_idle = psycopg.pq.TransactionStatus.IDLE
        self.raw: psycopg.Connection[Any] = self._open()

    def _open(self) -> psycopg.Connection[Any]:
        import psycopg  # noqa: PLC0415

        try:
            raw = psycopg.connect(self._url, autocommit=True, **self._extra)
        except psycopg.Error as err:
            raise ConnectError(f"cannot connect: {str(err).strip()}") from err
        raw.adapters.register_loader("numeric", _integral_numeric_loader())
        return raw

    def reconnect_if_broken(self) -> None:
        # A statement that found the server gone failed (and its transaction with it, on the
        # server); the next call gets a new session. Nothing is retried here.
        if self.raw.broken:
            self.raw.close()
            self.raw = self._open()

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    def execute(self, sql: str, params: Sequence[object] | None = None) -> Rows:
        if params is None:  # no placeholders: psycopg leaves '%' (e.g. in PL/pgSQL) alone
            return self.raw.execute(sql)
        return self.raw.execute(self._sql(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        with self.raw.cursor() as cur:
            cur.executemany(self._sql(sql), rows)

    def begin_write(self) -> None:
        self.raw.execute("BEGIN")
        self.raw.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))",
            (_WRITE_LOCK_CLASS,),
        )

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != self._pq_idle

    def table_exists(self, name: str) -> bool:
        row = self.raw.execute(
            "SELECT 1 FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_name = %s",
            (name,),
        ).fetchone()
        return row is not None

    def ddl(self, template: str, **names: str) -> str:
        return template.format(**_POSTGRES_TYPES, **names)

    def append_only(self, table: str) -> tuple[str, ...]:
        function = (
            "CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION '% is append-only', TG_TABLE_NAME "
            "USING ERRCODE = 'integrity_constraint_violation'; END $$"
        )
        return (
            function,
            *(
                f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                f"FOR EACH {'STATEMENT' if verb == 'TRUNCATE' else 'ROW'} "
                "EXECUTE FUNCTION ledger_append_only()"
                for verb in ("UPDATE", "DELETE", "TRUNCATE")
            ),
        )

    def close(self) -> None:
        self.raw.close()


def connect(
    location: str | Path, *, busy_timeout_s: float = 5.0, password: str | None = None
) -> LedgerConnection:
    """Open the ledger's database: a ``postgresql://`` URL or a SQLite file path.

    ``password`` is for PostgreSQL only (SQLite files have none). Raises :class:`ConnectError`
    naming the cause (driver missing, server unreachable, file unopenable).
    """
    if is_postgres_url(location):
        return PostgresConnection(str(location), busy_timeout_s=busy_timeout_s, password=password)
    if password is not None:
        raise ConnectError("a password is for a PostgreSQL ledger; a SQLite file has none")
    return SqliteConnection(Path(location), busy_timeout_s=busy_timeout_s)
