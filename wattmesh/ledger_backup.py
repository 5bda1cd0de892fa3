"""``wattmesh ledger backup`` and ``restore``: consistent copies of a live ledger.

A backup is taken with SQLite's online backup API from a read-only connection, so it is a
consistent snapshot even while the coordinator settles (each settlement is one transaction: a
backup holds whole intervals or none of one). It is written beside its destination first,
checked (SQLite's integrity check and the ledger's balance), then moved into place, so a
backup file that exists is a good one.

A restore copies a checked backup over a ledger through the same API. The ledger it replaces
is first backed up to ``LEDGER.pre-restore-<UTC time>``; a ledger that another process (a
running coordinator) has open is refused: stop the coordinator first.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from coordinator.ledger import Ledger, LedgerError

__all__ = ["BackupError", "BackupResult", "backup_ledger", "holders", "restore_ledger"]


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
        finally:
            conn.close()
    except sqlite3.Error as err:
        raise BackupError(f"{path}: not a readable ledger: {err}") from err
    if verdict != "ok":
        raise BackupError(f"{path}: SQLite integrity check failed: {verdict}")
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


# --- commands (registered on ``wattmesh ledger`` by wattmesh.ledger_cli) ------------------


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _describe(result: BackupResult) -> str:
    return (
        f"{result.path}: {result.size_bytes / 1e6:.1f} MB, {result.settled_intervals} settled "
        f"interval(s), balanced"
    )


def backup_command(
    ledger: Annotated[Path, typer.Argument(metavar="LEDGER.sqlite", help="The ledger to copy.")],
    dest: Annotated[Path, typer.Argument(metavar="BACKUP.sqlite", help="Where the copy goes.")],
    force: Annotated[bool, typer.Option("--force", help="Replace BACKUP if it exists.")] = False,
) -> None:
    """Copy a ledger consistently, also while the coordinator runs and settles.

    Uses SQLite's online backup API; the copy is checked (integrity and balance) before it is moved into place, so a backup file that exists is a good one. Exit codes: 0 done; 2 missing ledger, destination exists, or the copy failed its checks.
    """  # noqa: E501 - one line per paragraph: the help wraps it to the terminal
    if not ledger.is_file():
        raise _fail(f"{ledger}: no such file")
    try:
        result = backup_ledger(ledger, dest, overwrite=force)
    except BackupError as err:
        raise _fail(str(err)) from err
    typer.echo(f"backup {_describe(result)}")


def restore_command(
    backup: Annotated[Path, typer.Argument(metavar="BACKUP.sqlite", help="A ledger backup.")],
    ledger: Annotated[Path, typer.Argument(metavar="LEDGER.sqlite", help="The ledger to replace.")],
) -> None:
    """Restore a ledger from a backup; the ledger it replaces is kept beside it.

    The backup is checked first (integrity and balance). Refused while another process (a running coordinator) has the ledger open: stop it first. Exit codes: 0 done; 2 a bad backup, a ledger in use, or a failed copy.
    """  # noqa: E501 - one line per paragraph: the help wraps it to the terminal
    if not backup.is_file():
        raise _fail(f"{backup}: no such file")
    try:
        result, kept = restore_ledger(backup, ledger)
    except BackupError as err:
        raise _fail(str(err)) from err
    if kept is not None:
        typer.echo(f"the previous ledger is kept as {kept}")
    typer.echo(f"restored {_describe(result)}")
