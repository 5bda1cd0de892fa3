"""The coordinator's forecasting history in its PostgreSQL ledger database.

With a PostgreSQL ledger and no ``history_file``, the history (coordinator/history_store.py:
the same ``.npz`` archive a file would hold, a week of every site's PV and load and the kept
weather forecasts) is kept in the ledger's database, one row per feeder, so that a standby
coordinator on another machine (coordinator/standby.py) takes over with the forecasts the
active one had. Table ``coordinator_history``: ``feeder`` (the coordinator's feeder id; its
``.damaged`` twin holds the last content that could not be read), ``saved_ts`` (UTC epoch s,
the coordinator's clock) and ``content`` (the archive's bytes).

Each save is one statement (an upsert: the last good content stays if it fails) on a
connection of its own, opened for it and closed after, so it never shares the ledger's
connection or its transactions (a save runs in a worker thread). Reading trusts the bytes no
more than a file's: :func:`coordinator.history_store.parse_histories` checks them. An archive
is about 50 bytes a sample: some 30 KB a site for a week.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.ledger_sql import ConnectError, LedgerConnection, connect, mask_url

TABLE = "coordinator_history"
#: Serialises creating the table between coordinators sharing a database (any fixed pair).
_CREATE_LOCK = (0x77617474, 0x68697374)


class HistoryDbError(Exception):
    """The database cannot be reached, or refused the statement (the message says which)."""


@dataclass(frozen=True)
class HistoryTable:
    """Where a coordinator keeps its history in a PostgreSQL database: ``url`` (no password
    in it), ``password`` (None: libpq's own sources) and the row's ``feeder`` id."""

    url: str
    feeder: str
    password: str | None = None

    def __str__(self) -> str:
        return f"{mask_url(self.url)} ({TABLE}, feeder {self.feeder})"

    def save(self, content: bytes, saved_ts: float) -> None:
        """Store ``content`` as this feeder's history (replacing the last)."""
        self._upsert(self.feeder, content, saved_ts)

    def set_aside(self, content: bytes, saved_ts: float) -> None:
        """Keep ``content`` (which could not be read) in the ``.damaged`` row, for inspection."""
        self._upsert(f"{self.feeder}.damaged", content, saved_ts)

    def load(self) -> bytes | None:
        """This feeder's stored history, or None when there is none (no row, no table)."""
        conn = self._connect()
        try:
            if not conn.table_exists(TABLE):
                return None
            row = conn.execute(
                f"SELECT content FROM {TABLE} WHERE feeder = ?",
                (self.feeder,),
            ).fetchone()
        except conn.errors as err:
            raise HistoryDbError(str(err)) from err
        finally:
            conn.close()
        return None if row is None else bytes(row[0])

    def _upsert(self, feeder: str, content: bytes, saved_ts: float) -> None:
        conn = self._connect()
        try:
            if not conn.table_exists(TABLE):
                conn.execute("BEGIN")
                conn.execute("SELECT pg_advisory_xact_lock(?::int, ?::int)", _CREATE_LOCK)
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {TABLE} (feeder TEXT PRIMARY KEY, "
                    "saved_ts DOUBLE PRECISION NOT NULL, content BYTEA NOT NULL)"
                )
                conn.execute("COMMIT")
            conn.execute(
                f"INSERT INTO {TABLE} (feeder, saved_ts, content) VALUES (?, ?, ?) "
                "ON CONFLICT (feeder) DO UPDATE "
                "SET saved_ts = EXCLUDED.saved_ts, content = EXCLUDED.content",
                (feeder, float(saved_ts), content),
            )
        except conn.errors as err:
            raise HistoryDbError(str(err)) from err
        finally:
            conn.close()

    def _connect(self) -> LedgerConnection:
        try:
            conn = connect(self.url, password=self.password)
        except ConnectError as err:
            raise HistoryDbError(str(err)) from err
        if conn.engine != "postgresql":  # pragma: no cover - the config only makes it for one
            conn.close()
            raise HistoryDbError("not a PostgreSQL database")
        return conn
