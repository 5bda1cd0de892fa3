"""``wattmesh ledger backup`` and ``restore``: consistent copies of a live ledger.

A backup is always a SQLite ledger file. From a SQLite ledger it is taken with SQLite's
online backup API from a read-only connection, so it is a consistent snapshot even while the
coordinator settles (each settlement is one transaction: a backup holds whole intervals or
none of one). It is written beside its destination first, checked (SQLite's integrity and
foreign key checks and the ledger's balance), then moved into place, so a backup file that
exists is a good one.

A restore copies a checked backup over a ledger through the same API. The ledger it replaces
is first backed up to ``LEDGER.pre-restore-<UTC time>``; a ledger that another process (a
running coordinator) has open is refused: stop the coordinator first.

From a PostgreSQL ledger (a ``postgresql://`` URL) a backup copies every row of the ledger's
tables, ids included, in one REPEATABLE READ, READ ONLY transaction (one snapshot: whole
intervals or none, while the coordinator settles on) into a new SQLite ledger file; the copy
must hold as many rows of each table as the snapshot and pass the same checks before it is
moved into place. A restore into PostgreSQL loads such a file (or any SQLite ledger of the
current schema version) into a database or schema that holds no ledger, in one transaction:
the schema, every row, the identity sequences moved past the copied ids, the row counts
checked, then one commit; the ledger is then checked for balance. An existing PostgreSQL
ledger is never replaced (drop or rename its schema with ``psql`` first).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Protocol

import typer

from coordinator.ledger import SCHEMA_VERSION, Ledger, LedgerError, create_schema
from coordinator.ledger_sql import ConnectError, LedgerConnection, PostgresConnection, connect
from wattmesh.ledger_location import (
    LEDGER_TABLES,
    PASSWORD_ENV,
    LedgerLocation,
    LedgerLocationError,
    one_line,
    open_postgres_ledger,
    parse_location,
    require_current_schema,
)

__all__ = [
    "BackupError",
    "BackupResult",
    "backup_ledger",
    "backup_postgres",
    "holders",
    "restore_ledger",
    "restore_postgres",
]

#: The ledger's tables (schema version 3), each after the tables it references: the copy
#: order. ``schema_version`` is not copied: the new schema has its row.
COPY_ORDER: Final = (
    "accounts",
    "intervals",
    "site_intervals",
    "postings",
    "entries",
    "clearings",
    "clearing_awards",
    "revisions",
    "corrections",
    "audit",
)
#: Identity columns: after a restore into PostgreSQL their sequences continue past the ids.
_IDENTITIES: Final = {"postings": "posting_id", "entries": "entry_id", "audit": "audit_id"}
#: Rows a PostgreSQL server cursor fetches at a time during a backup.
_FETCH_ROWS: Final = 10_000


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why."""


@dataclass(frozen=True, slots=True)
class BackupResult:
    """What a backup or restore wrote: the file, its size and the intervals it holds."""

    path: Path
    size_bytes: int
    settled_intervals: int
    balanced: bool


def _copy(source: Path, dest: Path, progress: Callable[[int, int], None] | None) -> None:
    """Copy ``source`` to ``dest`` (which may be a live ledger) with the backup API."""
    src = sqlite3.connect(source.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(dest)
        try:
            # All pages in one step, within one read transaction: a stepwise copy starts over
            # whenever the coordinator writes, and might never finish under a busy writer.
            # In WAL mode the read does not block the writer.
            src.backup(
                dst,
                pages=-1,
                progress=None if progress is None else (lambda _s, rem, tot: progress(rem, tot)),
            )
            dst.commit()
        finally:
            dst.close()
    finally:
        src.close()


def _verify(path: Path) -> BackupResult:
    """Integrity and balance of the ledger at ``path``; BackupError if it is not sound."""
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
            dangling = conn.execute("PRAGMA foreign_key_check").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as err:
        raise BackupError(f"{path}: not a readable ledger: {err}") from err
    if verdict != "ok":
        raise BackupError(f"{path}: SQLite integrity check failed: {verdict}")
    if dangling:
        raise BackupError(f"{path}: {len(dangling)} row(s) refer to rows that are not there")
    try:
        with Ledger(path, migrate=False) as ledger:
            balanced = ledger.check_balanced()
            settled = len(ledger.settled_intervals())
    except LedgerError as err:
        raise BackupError(f"{path}: not a readable ledger: {err}") from err
    if not balanced:
        raise BackupError(f"{path}: the copy does not balance")
    return BackupResult(path, path.stat().st_size, settled, balanced)


def holders(path: Path) -> list[int]:
    """Pids of other processes that have ``path`` open (Linux /proc; best effort)."""
    target = path.resolve()
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if Path(os.readlink(fd)) == target:
                        found.append(int(entry.name))
                        break
    return found


def backup_ledger(
    ledger: Path,
    dest: Path,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> BackupResult:
    """A consistent, checked copy of ``ledger`` (which may be in use) at ``dest``."""
    if dest.exists() and not overwrite:
        raise BackupError(f"{dest} exists (--force replaces it)")
    if dest.resolve() == ledger.resolve():
        raise BackupError("the backup must not be the ledger itself")
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)
    try:
        _copy(ledger, part, progress)
        result = _verify(part)
        part.replace(dest)
    except sqlite3.Error as err:
        raise BackupError(f"cannot back up {ledger}: {err}") from err
    finally:
        part.unlink(missing_ok=True)
    return BackupResult(dest, result.size_bytes, result.settled_intervals, result.balanced)


def restore_ledger(
    backup: Path, ledger: Path, *, progress: Callable[[int, int], None] | None = None
) -> tuple[BackupResult, Path | None]:
    """Replace ``ledger`` by a checked ``backup``; the replaced ledger is kept beside it.

    Returns the restored ledger's figures and where the previous ledger went (None if there
    was none). Refused while another process has ``ledger`` open.
    """
    _verify(backup)
    kept: Path | None = None
    if ledger.exists():
        others = holders(ledger)
        if others:
            raise BackupError(
                f"{ledger} is open in process(es) {', '.join(map(str, others))}: stop the "
                "coordinator before restoring"
            )
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        kept = ledger.with_name(f"{ledger.name}.pre-restore-{stamp}")
        backup_ledger(ledger, kept)
    try:
        _copy(backup, ledger, progress)
    except sqlite3.Error as err:
        raise BackupError(f"cannot restore into {ledger}: {err}") from err
    return _verify(ledger), kept


# --- PostgreSQL ---------------------------------------------------------------------------


class _Cursor(Protocol):
    """What a copy reads from: a cursor with column names that yields rows."""

    @property
    def description(self) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...

    def close(self) -> None: ...


def _counted(rows: Iterable[Any], counter: list[int]) -> Iterator[tuple[Any, ...]]:
    """The rows as tuples, counted in ``counter[0]`` as they pass."""
    for row in rows:
        counter[0] += 1
        yield tuple(row)


def _select(table: str) -> str:
    # The community and utility accounts come with every new schema.
    return f"SELECT * FROM {table}" + (" WHERE kind = 'site'" if table == "accounts" else "")


def _copy_rows(read: Callable[[str], _Cursor], dst: LedgerConnection) -> dict[str, int]:
    """Copy every row of the ledger's tables (ids included) from ``read`` into the new schema
    of ``dst``, inside the callers' transactions; the number of rows per table."""
    copied: dict[str, int] = {}
    for table in COPY_ORDER:
        rows = read(_select(table))
        columns = [str(d[0]) for d in rows.description]
        counter = [0]
        dst.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            _counted(rows, counter),
        )
        rows.close()
        copied[table] = counter[0]
    return copied


def _check_counts(dst: LedgerConnection, copied: dict[str, int], name: str) -> None:
    """Refuse a copy that does not hold every row it was given (before it is committed)."""
    for table, want in copied.items():
        count = f"SELECT COUNT(*) FROM ({_select(table)}) AS t"
        (got,) = dst.execute(count).fetchone()
        if int(got) != want:
            raise BackupError(f"{name}: the copy of {table} holds {got} of {want} row(s)")


def _server_cursors(conn: PostgresConnection) -> Callable[[str], _Cursor]:
    """Statements on server-side cursors (inside the open transaction): a large ledger streams
    through the copy instead of being held in memory whole."""
    names = itertools.count()

    def read(sql: str) -> _Cursor:
        cur = conn.raw.cursor(name=f"wattmesh_backup_{next(names)}")
        cur.itersize = _FETCH_ROWS
        cur.execute(sql)
        return cur

    return read


def backup_postgres(
    location: LedgerLocation, dest: Path, *, overwrite: bool = False
) -> BackupResult:
    """A consistent, checked SQLite copy at ``dest`` of the PostgreSQL ledger at ``location``
    (which may be in use): one REPEATABLE READ, READ ONLY snapshot of every table."""
    if dest.exists() and not overwrite:
        raise BackupError(f"{dest} exists (--force replaces it)")
    try:
        src = open_postgres_ledger(location)
    except LedgerLocationError as err:
        raise BackupError(str(err)) from err
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)
    errors: tuple[type[Exception], ...] = (*src.errors, sqlite3.Error, ConnectError, LedgerError)
    try:
        src.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        require_current_schema(src, location.name)
        Ledger(part).close()  # a new, empty ledger file of the current schema version
        dst = connect(part)
        try:
            dst.begin_write()
            copied = _copy_rows(_server_cursors(src), dst)
            _check_counts(dst, copied, str(dest))
            dst.execute("COMMIT")
        finally:
            dst.close()
        src.execute("COMMIT")
        result = _verify(part)
        part.replace(dest)
    except LedgerLocationError as err:
        raise BackupError(str(err)) from err
    except errors as err:
        raise BackupError(f"cannot back up {location.name}: {one_line(err)}") from err
    finally:
        src.close()
        part.unlink(missing_ok=True)
    return BackupResult(dest, result.size_bytes, result.settled_intervals, result.balanced)


def restore_postgres(backup: Path, location: LedgerLocation) -> BackupResult:
    """Load a checked SQLite ledger ``backup`` into the PostgreSQL database at ``location``,
    which must hold no ledger, in one transaction; the restored ledger's figures (``path`` is
    the backup, ``size_bytes`` its size)."""
    if not location.is_postgres:
        raise BackupError(f"{location.name} is a file: restore_ledger restores into a file")
    checked = _verify(backup)
    try:
        src = sqlite3.connect(backup.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise BackupError(f"{backup}: not a readable ledger: {err}") from err
    try:
        (version,) = src.execute("SELECT version FROM schema_version").fetchone()
        if version != SCHEMA_VERSION:
            raise BackupError(
                f"{backup}: ledger schema version {version}: restore it into a SQLite file "
                f"and open that once with the coordinator to migrate it to {SCHEMA_VERSION}"
            )
        try:
            dst = connect(location.target, password=location.password)
        except ConnectError as err:
            raise BackupError(f"{location.name}: {one_line(err)}") from err
        errors: tuple[type[Exception], ...] = (*dst.errors, sqlite3.Error, LedgerError)
        try:
            dst.begin_write()  # the ledger's write lock: two restores do not interleave
            present = sorted(t for t in LEDGER_TABLES if dst.table_exists(t))
            if present:
                raise BackupError(
                    f"{location.name} already holds a ledger (tables {', '.join(present)}): "
                    "restore into a database or schema without one; drop or rename it first"
                )
            create_schema(dst)
            src.execute("BEGIN")  # one snapshot of the backup
            copied = _copy_rows(src.execute, dst)
            for table, column in _IDENTITIES.items():
                dst.execute(
                    "SELECT setval(pg_get_serial_sequence(?, ?), "
                    f"(SELECT COALESCE(MAX({column}), 0) + 1 FROM {table}), false)",
                    (table, column),
                )
            _check_counts(dst, copied, location.name)
            dst.execute("COMMIT")
        except errors as err:
            raise BackupError(f"cannot restore into {location.name}: {one_line(err)}") from err
        finally:
            with contextlib.suppress(*dst.errors):
                if dst.in_transaction:
                    dst.execute("ROLLBACK")
            dst.close()
    except sqlite3.Error as err:
        raise BackupError(f"{backup}: not a readable ledger: {err}") from err
    finally:
        src.close()
    try:
        with Ledger(location.target, migrate=False, password=location.password) as ledger:
            balanced = ledger.check_balanced()
            settled = len(ledger.settled_intervals())
    except LedgerError as err:
        raise BackupError(f"{location.name}: cannot check the restored ledger: {err}") from err
    if not balanced:
        raise BackupError(f"{location.name}: the restored ledger does not balance")
    return BackupResult(backup, checked.size_bytes, settled, balanced)


# --- commands (registered on ``wattmesh ledger`` by wattmesh.ledger_cli) ------------------


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _describe(result: BackupResult) -> str:
    return (
        f"{result.path}: {result.size_bytes / 1e6:.1f} MB, {result.settled_intervals} settled "
        f"interval(s), balanced"
    )


_LEDGER_HELP = (
    "The ledger: a SQLite file, or postgresql://user@host:port/db with the password in "
    f"${PASSWORD_ENV}."
)


def _locate(text: str) -> LedgerLocation:
    try:
        return parse_location(text)
    except LedgerLocationError as err:
        raise _fail(str(err)) from err


def backup_command(
    ledger: Annotated[str, typer.Argument(metavar="LEDGER", help=_LEDGER_HELP)],
    dest: Annotated[Path, typer.Argument(metavar="BACKUP.sqlite", help="Where the copy goes.")],
    force: Annotated[bool, typer.Option("--force", help="Replace BACKUP if it exists.")] = False,
) -> None:
    """Copy a ledger consistently, also while the coordinator runs and settles.

    A SQLite ledger is copied with SQLite's online backup API; a PostgreSQL ledger (a postgresql:// URL) is copied into a new SQLite ledger file in one REPEATABLE READ snapshot. The copy is checked (integrity, references, row counts and balance) before it is moved into place, so a backup file that exists is a good one. Exit codes: 0 done; 2 missing ledger, unreachable server, destination exists, or the copy failed its checks.
    """  # noqa: E501 - one line per paragraph: the help wraps it to the terminal
    location = _locate(ledger)
    try:
        if location.is_postgres:
            result = backup_postgres(location, dest, overwrite=force)
        else:
            if not location.path.is_file():
                raise _fail(f"{location.path}: no such file")
            result = backup_ledger(location.path, dest, overwrite=force)
    except BackupError as err:
        raise _fail(str(err)) from err
    typer.echo(f"backup {_describe(result)}")


def restore_command(
    backup: Annotated[Path, typer.Argument(metavar="BACKUP.sqlite", help="A ledger backup.")],
    ledger: Annotated[
        str,
        typer.Argument(
            metavar="LEDGER", help="The ledger to replace (or to fill). " + _LEDGER_HELP
        ),
    ],
) -> None:
    """Restore a ledger from a backup; the ledger it replaces is kept beside it.

    The backup is checked first (integrity, references and balance). A SQLite ledger is refused while another process (a running coordinator) has it open: stop it first. A PostgreSQL ledger (a postgresql:// URL) is restored only into a database or schema that holds no ledger, in one transaction; an existing one is never replaced. Exit codes: 0 done; 2 a bad backup, a ledger in use or already there, or a failed copy.
    """  # noqa: E501 - one line per paragraph: the help wraps it to the terminal
    if not backup.is_file():
        raise _fail(f"{backup}: no such file")
    location = _locate(ledger)
    try:
        if location.is_postgres:
            result = restore_postgres(backup, location)
            typer.echo(
                f"restored {location.name}: {result.settled_intervals} settled interval(s), "
                "balanced"
            )
            return
        result, kept = restore_ledger(backup, location.path)
    except BackupError as err:
        raise _fail(str(err)) from err
    if kept is not None:
        typer.echo(f"the previous ledger is kept as {kept}")
    typer.echo(f"restored {_describe(result)}")
