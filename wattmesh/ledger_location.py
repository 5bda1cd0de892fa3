"""Where the operator commands find a ledger: a SQLite file, a ``postgresql://`` URL, or the
coordinator file that names one (``[coordinator] ledger`` or ``ledger_url``).

A PostgreSQL ledger's password never travels in the URL (it would show in the process list
and in shell history): it comes from ``$WATTMESH_LEDGER_PASSWORD`` (or the variable the
coordinator file's ``ledger_password_env`` names), else from libpq's own sources
(``PGPASSWORD``, ``~/.pgpass``). Messages name the URL without a password and put the
driver's error on one line.

:func:`open_postgres_ledger` opens a PostgreSQL ledger for reading and refuses a database
without the ledger's tables, so a tool never creates a ledger in a stranger's database (as
:class:`~coordinator.ledger.Ledger` would).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from coordinator.config import CoordinatorConfigError, load_coordinator_config
from coordinator.ledger import SCHEMA_VERSION
from coordinator.ledger_sql import (
    ConnectError,
    LedgerConnection,
    PostgresConnection,
    is_postgres_url,
    mask_url,
)

__all__ = [
    "LEDGER_TABLES",
    "PASSWORD_ENV",
    "LedgerLocation",
    "LedgerLocationError",
    "from_config",
    "one_line",
    "open_postgres_ledger",
    "parse_location",
    "require_current_schema",
    "resolve_location",
    "schema_version",
]

#: The variable the PostgreSQL ledger's password is read from (as the coordinator's default).
PASSWORD_ENV: Final = "WATTMESH_LEDGER_PASSWORD"
#: Tables every ledger has (any schema version); one missing means "not a wattmesh ledger".
LEDGER_TABLES: Final = frozenset(
    {"schema_version", "accounts", "intervals", "site_intervals", "postings", "entries"}
)


class LedgerLocationError(Exception):
    """The ledger cannot be named or opened; the message is one line without a password."""


def one_line(err: BaseException | str) -> str:
    """An error's text on one line (libpq's messages span several)."""
    return " ".join(str(err).split())


@dataclass(frozen=True, slots=True)
class LedgerLocation:
    """A ledger: ``target`` is a SQLite file or a PostgreSQL URL without a password;
    ``password`` (PostgreSQL only) is None to leave it to libpq; ``password_env`` names the
    variable it was looked for in (for the hint when the server asks for one)."""

    target: str | Path
    password: str | None = None
    password_env: str | None = None

    @property
    def is_postgres(self) -> bool:
        """Whether the ledger is in PostgreSQL."""
        return is_postgres_url(self.target)

    @property
    def name(self) -> str:
        """The ledger in messages: the file's path, or the URL (never with a password)."""
        return mask_url(str(self.target)) if self.is_postgres else str(self.target)

    @property
    def path(self) -> Path:
        """The SQLite file (only for a file ledger)."""
        if self.is_postgres:
            raise LedgerLocationError(f"{self.name} is a PostgreSQL ledger, not a file")
        return Path(self.target)


def _password(env: str | None) -> str | None:
    return os.environ.get(env) if env else None


def parse_location(text: str | Path, *, password_env: str | None = PASSWORD_ENV) -> LedgerLocation:
    """A file path or a ``postgresql://`` URL (password from ``$password_env``).

    A URL that holds a password is refused: it would show in the process list.
    """
    if not is_postgres_url(str(text)):
        return LedgerLocation(Path(text))
    url = str(text)
    try:
        has_password = urlsplit(url).password is not None
    except ValueError as err:  # e.g. a port that is not a number
        raise LedgerLocationError(f"{mask_url(url)}: not a PostgreSQL URL ({err})") from err
    if has_password:
        raise LedgerLocationError(
            f"{mask_url(url)}: the URL must not hold the password (it shows in the process "
            f"list): set {password_env or PASSWORD_ENV} instead"
        )
    return LedgerLocation(url, _password(password_env), password_env)


def from_config(config: Path) -> LedgerLocation:
    """The ledger a coordinator file names: ``ledger_url`` (password from the variable its
    ``ledger_password_env`` names) if set, else the file ``ledger`` (next to the file)."""
    try:
        section = load_coordinator_config(config).coordinator
    except CoordinatorConfigError as err:
        raise LedgerLocationError(one_line(err)) from err
    if section.ledger_url is None:
        return LedgerLocation(section.ledger)
    env = section.ledger_password_env
    return LedgerLocation(section.ledger_url, _password(env), env)


def resolve_location(ledger: str | Path | None, config: Path | None) -> LedgerLocation:
    """The ledger given either directly (path or URL) or through ``--config``, not both."""
    if ledger is not None and config is not None:
        raise LedgerLocationError("give the ledger or --config coordinator.toml, not both")
    if ledger is not None:
        return parse_location(ledger)
    if config is not None:
        return from_config(config)
    raise LedgerLocationError(
        "give the ledger (LEDGER.sqlite or postgresql://user@host/db) or --config coordinator.toml"
    )


def open_postgres_ledger(location: LedgerLocation, *, timeout_s: float = 5.0) -> PostgresConnection:
    """A connection to a PostgreSQL database that holds a wattmesh ledger (any version).

    Raises :class:`LedgerLocationError` (one line, no password) for a missing driver, a server
    that cannot be reached or refuses the password, and a database without the ledger.
    """
    try:
        conn = PostgresConnection(
            str(location.target), busy_timeout_s=timeout_s, password=location.password
        )
    except ConnectError as err:
        message = f"{location.name}: {one_line(err)}"
        if location.password is None and "no password supplied" in message:
            message += f" (set {location.password_env or PASSWORD_ENV})"
        raise LedgerLocationError(message) from err
    try:
        missing = sorted(t for t in LEDGER_TABLES if not conn.table_exists(t))
    except conn.errors as err:
        conn.close()
        raise LedgerLocationError(f"{location.name}: cannot read: {one_line(err)}") from err
    if missing:
        conn.close()
        raise LedgerLocationError(
            f"{location.name}: not a wattmesh ledger (missing tables: {', '.join(missing)})"
        )
    return conn


def schema_version(conn: LedgerConnection) -> int | None:
    """The ledger's schema version (None if its table holds no single row)."""
    rows = conn.execute("SELECT version FROM schema_version").fetchall()
    return int(rows[0][0]) if len(rows) == 1 else None


def require_current_schema(conn: LedgerConnection, name: str) -> None:
    """Refuse a ledger of another schema version than this code writes."""
    version = schema_version(conn)
    if version != SCHEMA_VERSION:
        raise LedgerLocationError(
            f"{name}: ledger schema version {version}, this needs version {SCHEMA_VERSION} "
            "(open it once with the coordinator to migrate)"
        )
