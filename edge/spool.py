"""Store-and-forward spool: outgoing messages kept on disk while the broker is away.

While the MQTT link is down the edge appends every outgoing telemetry message here; once the
link is back it replays them oldest first with their original ``ts``::

    with Spool(path) as spool:
        spool.append(topic, payload, ts)          # link down (or spool not yet empty)
        ...
        batch = spool.peek(100)                   # link up: publish in seq order
        for message in batch:
            await publish(message.topic, message.payload)   # QoS 1, wait for the PUBACK
        spool.ack(batch[-1].seq)                  # only then remove them

To keep the order, the agent routes new messages through the spool for as long as it is not
empty, not straight to the broker.

Storage: one SQLite file (stdlib ``sqlite3``). Every ``append`` is its own transaction, so a
message is on disk when ``append`` returns. ``seq`` starts at 1 and grows by one per appended
message; it is never reused, also not after the spool was emptied and reopened. Removals only
ever take the oldest messages (``ack`` and the bounds), so the spooled seqs are one contiguous
range and ``len(spool) == appended_total - replayed_total - dropped`` holds at all times.

Bounds: ``max_messages`` and ``max_bytes``, where a message's bytes are its UTF-8 topic plus
its payload (SQLite's own overhead, a few dozen bytes a row plus free pages, comes on top, so
the file may grow somewhat past ``max_bytes``; free pages are reused, the file does not shrink).
When an append would exceed a bound, the OLDEST messages are deleted in the same transaction:
for telemetry the newest readings are worth the most. They are counted in ``dropped``, which is
persisted, and a warning is logged once per episode (when dropping starts), not per message. A
single message larger than ``max_bytes`` is refused with ``ValueError``.

Durability: WAL journal with ``synchronous=NORMAL``. A commit is a ``write()`` to the WAL file,
not an ``fsync``: once ``append`` returns, the message is in the operating system's page cache
and survives the edge process being killed (SIGKILL, OOM killer, crash) -- recovery replays the
WAL at the next open. On power loss or a kernel crash, the transactions committed since the last
checkpoint (at most ~4 MiB of WAL, typically well under a second of telemetry) may be lost, so
recent appends vanish and recent acks are undone (those messages are replayed again, which
receivers tolerate: they are idempotent on ``id``); the file itself stays consistent, given
storage that honours ``fsync``. ``synchronous=FULL`` would close that window at the price of an
``fsync`` per append (milliseconds on a Raspberry Pi's SD card), which cannot sustain 2,000
single appends/s; telemetry is not worth that, and the gateway's own power loss loses the
readings it could not take anyway.

Corrupt file at start-up: the gateway must keep running, so a file that SQLite reports as not
a database or malformed (or that fails ``PRAGMA quick_check``) is moved aside to
``<name>.corrupt-<epoch seconds>`` (with its ``-wal``/``-shm`` files), a warning is logged,
and a new empty spool starts (``recover_corrupt=False`` raises :class:`SpoolCorrupt`
instead). The messages in the old file are not counted as dropped: they cannot be read. A file
that is a valid SQLite database but not a spool, a spool used by another process, and an
unreadable file or directory are not corrupt: they raise :class:`SpoolError` naming the path,
because moving them would hide a configuration mistake.

Concurrency: a ``Spool`` is NOT thread-safe. Use it from one thread (the event loop's);
``sqlite3`` refuses use from another thread. Calls are short enough to need no executor: an
append takes about 5 microseconds (median; ~25 when the spool is full and drops), but about once
every 1,000 commits SQLite checkpoints the WAL into the file, which includes an ``fsync``: a few
milliseconds on a desktop SSD, more on an SD card. The file is locked exclusively while open
(``locking_mode=EXCLUSIVE``), so a second process (a second agent for the same site) gets a
:class:`SpoolError`, and inspecting a live spool with the ``sqlite3`` shell needs the agent
stopped.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["Spool", "SpoolCorrupt", "SpoolError", "SpooledMessage"]

logger = logging.getLogger(__name__)

#: ``PRAGMA application_id`` of a spool file ("WMSP"), so a foreign database is recognised.
APPLICATION_ID = 0x574D5350
#: ``PRAGMA user_version``: the schema version of the spool file.
SCHEMA_VERSION = 1

_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
#: How long opening waits for another process's lock on the file, s.
_LOCK_TIMEOUT_S = 0.25
#: The WAL file is truncated back to this size after a checkpoint, bytes.
_JOURNAL_SIZE_LIMIT_B = 8 * 2**20

_SCHEMA = (
    "CREATE TABLE messages ("
    " seq INTEGER PRIMARY KEY,"
    " topic TEXT NOT NULL,"
    " ts REAL NOT NULL,"
    " size INTEGER NOT NULL,"  # before the payload: reading it never touches overflow pages
    " payload BLOB NOT NULL)",
    "CREATE TABLE meta ("
    " id INTEGER PRIMARY KEY CHECK (id = 1),"
    " last_seq INTEGER NOT NULL,"
    " dropped INTEGER NOT NULL,"
    " replayed_total INTEGER NOT NULL)",
    "INSERT INTO meta (id, last_seq, dropped, replayed_total) VALUES (1, 0, 0, 0)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_INSERT = "INSERT INTO messages (seq, topic, ts, size, payload) VALUES (?, ?, ?, ?, ?)"
_UPDATE_META = "UPDATE meta SET last_seq = ?, dropped = ?, replayed_total = ? WHERE id = 1"
_OLDEST_SIZES = "SELECT seq, size FROM messages ORDER BY seq"
_DELETE_UP_TO = "DELETE FROM messages WHERE seq <= ?"
_PEEK = "SELECT seq, topic, payload, ts FROM messages ORDER BY seq LIMIT ?"
_COUNT_UP_TO = "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE seq <= ?"


class SpoolError(Exception):
    """The spool file cannot be opened, read or written. ``path`` names the file."""

    def __init__(self, path: Path, message: str) -> None:
        self.path = path
        super().__init__(f"spool {path}: {message}")


class SpoolCorrupt(SpoolError):
    """The spool file is damaged (not a database, malformed, fails its integrity check).

    At start-up the file is moved aside unless ``recover_corrupt=False``; raised while running,
    the agent can close the spool and open it again to get that recovery.
    """


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    """One spooled message."""

    seq: int
    """Monotonically increasing from 1, never reused; defines the replay order."""
    topic: str
    payload: bytes
    ts: float
    """The original timestamp, UTC epoch seconds."""


def _is_corruption(err: sqlite3.Error) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _is_busy(err: sqlite3.Error) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in (_SQLITE_BUSY, _SQLITE_LOCKED)


class Spool:
    """A bounded, persistent FIFO of outgoing messages (see the module docstring).

    Args:
        path: the SQLite file; it and its parent directories are created if missing.
        max_messages: at most this many messages are kept (>= 1).
        max_bytes: at most this many topic plus payload bytes are kept (>= 1).
        recover_corrupt: move a corrupt file aside and start empty (default), or raise
            :class:`SpoolCorrupt`.

    Raises:
        SpoolError: the file cannot be created, opened or locked, or is not a spool.
        ValueError: a bound is below 1.
    """

    def __init__(
        self,
        path: str | Path,
        max_messages: int = 100_000,
        max_bytes: int = 256 * 2**20,
        *,
        recover_corrupt: bool = True,
    ) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError(
                f"spool bounds must be at least 1, got max_messages={max_messages}, "
                f"max_bytes={max_bytes}"
            )
        self._path = Path(path)
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._conn: sqlite3.Connection | None = None
        self._quarantined: Path | None = None
        self._count = 0
        self._bytes = 0
        self._last_seq = 0
        self._dropped = 0
        self._replayed = 0
        self._dropping = False
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SpoolError(self._path, f"cannot create its directory: {err}") from err
        try:
            self._conn = self._open()
        except SpoolCorrupt as err:
            if not recover_corrupt:
                raise
            self._quarantined = self._quarantine()
            logger.warning(
                "spool %s is corrupt (%s); moved it to %s and started an empty spool",
                self._path,
                err.__cause__ or err,
                self._quarantined,
            )
            self._conn = self._open()
        if self._count > max_messages or self._bytes > max_bytes:  # reopened with lower bounds
            try:
                with self._transaction() as conn:
                    dropped, freed = self._trim(conn, self._count, self._bytes)
            except sqlite3.Error as err:
                self.close()
                raise self._error("trim to its bounds", err) from err
            self._count -= dropped
            self._bytes -= freed
            self._dropped_oldest(dropped)

    # -- opening -------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        """Connect and prepare the file; errors are translated here, once."""
        try:
            conn = sqlite3.connect(self._path, timeout=_LOCK_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as err:
            raise self._error("open", err) from err
        try:
            self._prepare(conn)
        except sqlite3.Error as err:
            conn.close()
            raise self._error("open", err) from err
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Configure the connection, create or check the schema, load the counters."""
        # Exclusive before the first access: one process owns the file, and no -shm file.
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SpoolError(self._path, f"cannot switch to WAL mode (journal_mode={mode})")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT_B}")
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = int(conn.execute("SELECT COUNT(*) FROM sqlite_schema").fetchone()[0])
        if app_id == 0 and version == 0 and tables == 0:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("COMMIT")
        elif app_id != APPLICATION_ID:
            raise SpoolError(self._path, "is an SQLite database but not a wattmesh spool")
        elif version != SCHEMA_VERSION:
            raise SpoolError(
                self._path,
                f"has spool schema version {version}, this code reads {SCHEMA_VERSION}",
            )
        else:
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise SpoolCorrupt(
                    self._path, "fails its integrity check: " + "; ".join(problems[:3])
                )
        meta = conn.execute(
            "SELECT last_seq, dropped, replayed_total FROM meta WHERE id = 1"
        ).fetchone()
        if meta is None:
            raise SpoolCorrupt(self._path, "has lost its meta row")
        count, nbytes, max_seq = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(seq), 0) FROM messages"
        ).fetchone()
        self._count = int(count)
        self._bytes = int(nbytes)
        self._last_seq = max(int(meta[0]), int(max_seq))
        self._dropped = int(meta[1])
        self._replayed = int(meta[2])

    def _quarantine(self) -> Path:
        """Move the corrupt file and its WAL aside; returns the new name of the file."""
        stamp = int(time.time())
        target = self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
        n = 0
        while target.exists():
            n += 1
            target = self._path.with_name(f"{self._path.name}.corrupt-{stamp}-{n}")
        try:
            for suffix in ("-wal", "-shm", "-journal"):
                sidecar = self._path.with_name(self._path.name + suffix)
                if sidecar.exists():
                    sidecar.rename(target.with_name(target.name + suffix))
            self._path.rename(target)
        except OSError as err:
            raise SpoolError(self._path, f"is corrupt and cannot be moved aside: {err}") from err
        return target

    def _error(self, action: str, err: sqlite3.Error) -> SpoolError:
        """Translate an sqlite3 error, once."""
        if _is_corruption(err):
            return SpoolCorrupt(self._path, f"is corrupt ({action} failed: {err})")
        if _is_busy(err):
            return SpoolError(self._path, f"is in use by another process ({action}: {err})")
        return SpoolError(self._path, f"cannot {action}: {err}")

    # -- helpers -------------------------------------------------------------------------

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise SpoolError(self._path, "is closed")
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._live()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")  # may fail too (disk full): then nothing is kept
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _check(self, topic: str, payload: bytes, ts: float) -> int:
        """Validate one message; returns its size in bytes."""
        if not isinstance(topic, str) or not isinstance(payload, bytes):
            raise TypeError(
                f"spool messages are (str, bytes, float), got topic {type(topic).__name__}, "
                f"payload {type(payload).__name__}"
            )
        if not math.isfinite(ts):
            raise ValueError(f"message ts must be finite, got {ts!r}")
        size = len(payload) + (len(topic) if topic.isascii() else len(topic.encode()))
        if size > self._max_bytes:
            raise ValueError(
                f"message of {size} bytes on {topic!r} exceeds the spool's max_bytes "
                f"{self._max_bytes}"
            )
        return size

    def _trim(self, conn: sqlite3.Connection, count: int, nbytes: int) -> tuple[int, int]:
        """Delete the oldest messages until ``count``/``nbytes`` fit the bounds.

        Runs inside the caller's transaction and writes the new ``dropped`` total to ``meta``;
        the caller updates the in-memory counters (:meth:`_dropped_oldest`) after the commit.
        Returns (messages dropped, bytes freed).
        """
        excess_n = count - self._max_messages
        excess_b = nbytes - self._max_bytes
        dropped = freed = 0
        cutoff = 0
        cursor = conn.execute(_OLDEST_SIZES)
        try:
            for seq, size in cursor:
                if dropped >= excess_n and freed >= excess_b:
                    break
                dropped += 1
                freed += int(size)
                cutoff = int(seq)
        finally:
            cursor.close()
        if dropped:
            conn.execute(_DELETE_UP_TO, (cutoff,))
            conn.execute(_UPDATE_META, (self._last_seq, self._dropped + dropped, self._replayed))
        return dropped, freed

    def _dropped_oldest(self, dropped: int) -> None:
        """Count messages the bounds forced out; log when an episode of dropping starts."""
        if not dropped:
            return
        self._dropped += dropped
        if not self._dropping:
            self._dropping = True
            logger.warning(
                "spool %s is full (max_messages=%d, max_bytes=%d): dropping the oldest "
                "messages, %d dropped so far",
                self._path,
                self._max_messages,
                self._max_bytes,
                self._dropped,
            )

    # -- the API ---------------------------------------------------------------------------

    def append(self, topic: str, payload: bytes, ts: float) -> int:
        """Spool one message; returns its seq. It is on disk when this returns.

        Over a bound, the oldest messages are dropped (and counted) in the same transaction.

        Raises:
            ValueError: ``ts`` is not finite, or the message alone exceeds ``max_bytes``.
            TypeError: ``topic`` is not a str or ``payload`` not bytes.
            SpoolError: the write failed (:class:`SpoolCorrupt` if the file is damaged).
        """
        size = self._check(topic, payload, ts)
        conn = self._live()
        seq = self._last_seq + 1
        count = self._count + 1
        nbytes = self._bytes + size
        dropped = freed = 0
        try:
            if count <= self._max_messages and nbytes <= self._max_bytes:
                conn.execute(_INSERT, (seq, topic, ts, size, payload))  # autocommit: 1 txn
            else:
                with self._transaction():
                    conn.execute(_INSERT, (seq, topic, ts, size, payload))
                    dropped, freed = self._trim(conn, count, nbytes)
        except sqlite3.Error as err:
            raise self._error("append", err) from err
        self._last_seq = seq
        self._count = count - dropped
        self._bytes = nbytes - freed
        self._dropped_oldest(dropped)
        return seq

    def append_many(self, items: Iterable[tuple[str, bytes, float]]) -> int:
        """Spool many ``(topic, payload, ts)`` messages in one transaction, all or none.

        Returns the seq of the last one (the current last seq if ``items`` is empty). Raises
        like :meth:`append`, before anything is written if a message is invalid.
        """
        batch = list(items)
        if not batch:
            return self._last_seq
        sizes = [self._check(topic, payload, ts) for topic, payload, ts in batch]
        conn = self._live()
        first = self._last_seq + 1
        count = self._count + len(batch)
        nbytes = self._bytes + sum(sizes)
        rows = [
            (first + i, topic, ts, size, payload)
            for i, ((topic, payload, ts), size) in enumerate(zip(batch, sizes, strict=True))
        ]
        last = first + len(batch) - 1
        dropped = freed = 0
        try:
            with self._transaction():
                conn.executemany(_INSERT, rows)
                if count > self._max_messages or nbytes > self._max_bytes:
                    dropped, freed = self._trim(conn, count, nbytes)
        except sqlite3.Error as err:
            raise self._error("append", err) from err
        self._last_seq = last
        self._count = count - dropped
        self._bytes = nbytes - freed
        self._dropped_oldest(dropped)
        return last

    def peek(self, limit: int = 100) -> list[SpooledMessage]:
        """Up to ``limit`` of the oldest messages, oldest first; nothing is removed."""
        if limit < 0:
            raise ValueError(f"peek limit must be >= 0, got {limit}")
        conn = self._live()
        try:
            rows = conn.execute(_PEEK, (limit,)).fetchall()
        except sqlite3.Error as err:
            raise self._error("read", err) from err
        return [SpooledMessage(seq, topic, payload, ts) for seq, topic, payload, ts in rows]

    def ack(self, up_to_seq: int) -> int:
        """Remove the messages with ``seq <= up_to_seq`` (published); returns how many.

        Messages already dropped by the bounds or acked before are not counted again.

        Raises:
            ValueError: ``up_to_seq`` is beyond the last seq ever appended.
            SpoolError: the write failed.
        """
        if up_to_seq > self._last_seq:
            raise ValueError(
                f"ack up to seq {up_to_seq}, but the last seq appended is {self._last_seq}"
            )
        try:
            with self._transaction() as conn:
                count, freed = conn.execute(_COUNT_UP_TO, (up_to_seq,)).fetchone()
                removed = int(count)
                if removed:
                    conn.execute(_DELETE_UP_TO, (up_to_seq,))
                    conn.execute(
                        _UPDATE_META, (self._last_seq, self._dropped, self._replayed + removed)
                    )
        except sqlite3.Error as err:
            raise self._error("ack", err) from err
        if removed:
            self._count -= removed
            self._bytes -= int(freed)
            self._replayed += removed
            if self._dropping:
                self._dropping = False
                logger.info(
                    "spool %s is draining again; %d messages dropped in total",
                    self._path,
                    self._dropped,
                )
        return removed

    def __len__(self) -> int:
        """Messages in the spool."""
        return self._count

    @property
    def path(self) -> Path:
        """The spool file."""
        return self._path

    @property
    def bytes_used(self) -> int:
        """Topic plus payload bytes of the spooled messages (what ``max_bytes`` bounds)."""
        return self._bytes

    @property
    def dropped(self) -> int:
        """Messages forced out by the bounds, in total over the file's life (persisted)."""
        return self._dropped

    @property
    def quarantined(self) -> Path | None:
        """Where a corrupt file found at start-up was moved, or None."""
        return self._quarantined

    def stats(self) -> dict[str, int]:
        """``messages``, ``bytes``, ``dropped``, ``appended_total``, ``replayed_total``.

        Totals are over the file's life; ``messages == appended_total - replayed_total -
        dropped``.
        """
        return {
            "messages": self._count,
            "bytes": self._bytes,
            "dropped": self._dropped,
            "appended_total": self._last_seq,
            "replayed_total": self._replayed,
        }

    def close(self) -> None:
        """Close the file (checkpointing the WAL into it); idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error as err:
                raise self._error("close", err) from err

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Spool({str(self._path)!r}, messages={self._count}, bytes={self._bytes}, "
            f"dropped={self._dropped})"
        )
