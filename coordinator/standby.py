"""An active coordinator and standbys for one feeder, elected by a PostgreSQL advisory lock.

Every coordinator of a feeder runs :func:`serve` with the same file, whose ledger is in
PostgreSQL (``[coordinator] ledger_url``). Each opens a lease connection and asks the server
for a session-level advisory lock keyed on the feeder (``pg_try_advisory_lock``, every
``poll_s``): the one that gets it is the active coordinator, the others wait as standbys and
touch neither the bus nor the ledger. PostgreSQL releases the lock the moment the holder's
session ends, so when the active process dies (killed, crashed, its machine gone and its TCP
session timed out) a standby gets the lock within ``poll_s`` and starts a
:class:`~coordinator.service.Coordinator`, which does what a restarted one does: it loads the
cleared but unsettled intervals from the ledger, settles them, sends their awards again, and
clears from the next open gate. Its MQTT client id is the coordinator's, so it also resumes the
dead one's persistent session and gets the bids queued for it meanwhile. A standby never
connects to the broker before it holds the lock (the broker binds the id to the user: a second
connection would throw the active one off).

Nothing is cleared twice or lost, and this does not rest on the lock alone: the ledger commits
each interval's clearing once (its primary key; a second ``record_clearing`` gets the stored
one back, and the coordinator publishes that, as after a restart), and settles each interval
once (the same for ``settle_cleared``), so even two coordinators that both believe they are
active (a partition between the active one and the database) publish one clearing per
interval and book one settlement. The active one checks its lease connection every
``poll_s`` and stops its coordinator when the connection is gone (:class:`LeaseLost`), then
goes back to waiting as a standby.

``python -m coordinator.standby FILE`` runs it (SIGTERM/SIGINT stop it cleanly); the broker
password comes from ``[broker] password_env``, the ledger's from ``ledger_password_env``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

from broker.clock import Clock, WallClock
from coordinator.config import CoordinatorConfig, load_coordinator_config
from coordinator.ledger_sql import mask_url

if TYPE_CHECKING:
    from broker.client import BusSettings

__all__ = ["LEASE_LOCK_CLASS", "FeederLease", "LeaseLost", "StandbyError", "main", "serve"]

log = logging.getLogger(__name__)

#: First key of the feeder lease's advisory lock ('wmS'); the second is the feeder's hash.
LEASE_LOCK_CLASS: Final = 0x776D53


class StandbyError(Exception):
    """A standby cannot run: no PostgreSQL ledger, or psycopg is missing."""


class LeaseLost(StandbyError):
    """The active coordinator's lease connection broke: it is no longer the active one."""


class FeederLease:
    """The feeder's lease: a session-level advisory lock on one dedicated connection.

    ``async with FeederLease(url, feeder)`` connects; :meth:`acquire` waits for the lock;
    :meth:`hold` watches the connection while the lock is held. Leaving the block closes the
    connection, which releases the lock.
    """

    def __init__(
        self, url: str, feeder: str, *, password: str | None = None, poll_s: float = 0.2
    ) -> None:
        self.url = url
        self.feeder = feeder
        self.poll_s = poll_s
        self._password = password
        self._conn: Any = None

    async def __aenter__(self) -> Self:
        try:
            import psycopg  # noqa: PLC0415 - optional: only a PostgreSQL ledger has a lease
        except ImportError as err:
            raise StandbyError(
                "a standby needs psycopg 3: pip install 'wattmesh[postgres]'"
            ) from err
        extra: dict[str, Any] = {"connect_timeout": max(1, round(5 * self.poll_s))}
        if self._password is not None:
            extra["password"] = self._password
        try:
            self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, **extra)
        except psycopg.Error as err:
            raise LeaseLost(f"cannot reach {mask_url(self.url)}: {str(err).strip()}") from err
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    async def _ask(self, sql: str, params: tuple[object, ...] = ()) -> object:
        import psycopg  # noqa: PLC0415

        try:
            async with asyncio.timeout(5 * self.poll_s + 1.0):
                cur = await self._conn.execute(sql, params)
                row = await cur.fetchone()
        except (psycopg.Error, TimeoutError) as err:
            raise LeaseLost(f"lease connection to {mask_url(self.url)} lost: {err}") from err
        return None if row is None else row[0]

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this process holds the feeder's lock (True) or ``stop`` is set (False)."""
        while not stop.is_set():
            if await self._ask(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (LEASE_LOCK_CLASS, self.feeder)
            ):
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_s)
        return False

    async def hold(self, stop: asyncio.Event) -> None:
        """Check every ``poll_s`` that the lease connection is alive; return when ``stop`` is
        set. A session-level lock is held until its session ends, so a live connection is a
        held lease. Raises :class:`LeaseLost` when the connection breaks or does not answer.
        """
        while not stop.is_set():
            await self._ask("SELECT 1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_s)


async def serve(
    config: CoordinatorConfig,
    clock: Clock,
    stop: asyncio.Event,
    *,
    password: str | None = None,
    bus_settings: BusSettings | None = None,
    poll_s: float = 0.2,
    on_active: Callable[[], None] | None = None,
) -> None:
    """Run the feeder's coordinator whenever this process holds the lease, until ``stop``.

    Waits as a standby, runs a :class:`~coordinator.service.Coordinator` while active, and
    waits again after losing the lease (``poll_s`` between tries). ``on_active`` is called
    each time this process becomes the active one. Raises :class:`StandbyError` when the file
    has no PostgreSQL ledger or psycopg is missing.
    """
    from coordinator.service import Coordinator  # noqa: PLC0415 - the service is heavy

    section = config.coordinator
    if section.ledger_url is None:
        raise StandbyError("a standby needs a PostgreSQL ledger: set [coordinator] ledger_url")
    env = section.ledger_password_env
    ledger_password = os.environ.get(env) if env else None
    while not stop.is_set():
        try:
            async with FeederLease(
                section.ledger_url, section.feeder, password=ledger_password, poll_s=poll_s
            ) as lease:
                log.info("feeder %r: standby, waiting for the lease", section.feeder)
                if not await lease.acquire(stop):
                    return
                log.info("feeder %r: took the lease, now the active coordinator", section.feeder)
                if on_active is not None:
                    on_active()
                async with Coordinator(config, clock, password=password, bus_settings=bus_settings):
                    await lease.hold(stop)
        except LeaseLost as err:
            log.warning("feeder %r: %s; standing by again", section.feeder, err)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_s)


def main(argv: list[str] | None = None) -> int:
    """``python -m coordinator.standby FILE``: serve as active or standby until a signal."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m coordinator.standby COORDINATOR.toml", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = load_coordinator_config(args[0])
        clock: Clock = config.clock.build() if config.clock else WallClock()
        password = config.broker.password()
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, clock, stop, password=password)

    try:
        asyncio.run(run())
    except StandbyError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
