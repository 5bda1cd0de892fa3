"""An active and a standby coordinator (coordinator/standby.py) as real processes on a real
Mosquitto and a real PostgreSQL ledger: killing the active one makes the standby take the lease
and clear the next interval, and every interval is cleared once and settled once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest

from broker import topics
from broker.client import BusClient
from broker.clock import ScaledClock
from broker.errors import BusUnavailable
from broker.messages import Bid, BidStep
from broker.mosquitto import BrokerFiles, MosquittoProcess
from coordinator.config import parse_coordinator_config
from coordinator.ledger import Ledger
from coordinator.standby import LEASE_LOCK_CLASS, FeederLease, LeaseLost, StandbyError, serve
from tests.pg_fixtures import PostgresServer, psycopg_connect
from tests.test_coordinator import T0, _bus, _telemetry
from tests.test_coordinator_durability import start_coordinator

ROOT = Path(__file__).resolve().parent.parent
INTERVAL_S = 60
GATE_S = 10
SPEED = 30.0  # a 60-second interval in 2 s of wall time
_PASSWORD_ENV = "TEST_STANDBY_LEDGER_PASSWORD"


def _config(tmp_path: Path, files: BrokerFiles, url: str, clock_file: Path) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(
        f"""
[coordinator]
ledger_url = "{url}"
ledger_password_env = "{_PASSWORD_ENV}"
[broker]
port = {files.port}
password_env = "WATTMESH_COORDINATOR_PASSWORD"
[market]
interval_s = {INTERVAL_S}
gate_s = {GATE_S}
settle_delay_s = 0
[trust]
settle_window_s = 0
future_skew_s = 60
[clock]
file = "{clock_file}"
"""
    )
    return path


async def _start(
    config: Path, files: BrokerFiles, server: PostgresServer, log: Path
) -> asyncio.subprocess.Process:
    return await start_coordinator(
        config, files, log, "--standby", env={_PASSWORD_ENV: server.password}
    )


async def _run_sites(clock: ScaledClock, buses: dict[str, BusClient], stop: asyncio.Event) -> None:
    """A seller and a buyer: telemetry every 3 simulated seconds, a bid for every interval."""
    bid_for: dict[str, int] = {}
    while not stop.is_set():
        now = clock.now()
        upcoming = int(now // INTERVAL_S) + 1
        for i, (site, bus) in enumerate(buses.items()):
            with contextlib.suppress(BusUnavailable):
                reading = _telemetry(now, (-1500.0, 1200.0)[i])
                await bus.publish(topics.site_topic(site, "telemetry"), reading.model_dump_json())
                if now < upcoming * INTERVAL_S - GATE_S - 2 and bid_for.get(site) != upcoming:
                    step = BidStep(price_per_kwh=0.1 + 0.1 * i, quantity_kwh=0.02)
                    side = {"sell": [step]} if i == 0 else {"buy": [step]}
                    bid = Bid(ts=now, interval=upcoming, **side)
                    await bus.publish(topics.site_topic(site, "bid"), bid.model_dump_json())
                    bid_for[site] = upcoming
        await asyncio.sleep(0.1)


def _clearings(url: str) -> dict[int, float]:
    with psycopg_connect(url) as conn:
        return dict(conn.execute("SELECT interval, cleared_ts FROM clearings").fetchall())


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll ``condition`` (files and the database: nothing to await) until it holds."""
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


async def test_killing_the_active_coordinator_makes_the_standby_clear_the_next_interval(  # noqa: PLR0915
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    postgres_server: PostgresServer,
    tmp_path: Path,
) -> None:
    schema = postgres_server.new_schema()
    url = postgres_server.url() + "?options=" + quote(f"-csearch_path={schema}", safe="")
    socket_url = postgres_server.socket_url(schema=schema)  # the test's own reads
    clock = ScaledClock(T0, SPEED)
    clock_file = tmp_path / "clock.json"
    clock_file.write_text(json.dumps(clock.to_json()))
    config = _config(tmp_path, broker_files, url, clock_file)
    logs = {name: tmp_path / f"{name}.log" for name in ("first", "second")}
    buses = {s: await _bus(broker_files, s, []) for s in ("site-a", "site-b")}
    stop = asyncio.Event()
    sites = asyncio.create_task(_run_sites(clock, buses, stop))
    first = await _start(config, broker_files, postgres_server, logs["first"])
    second: asyncio.subprocess.Process | None = None

    def active(name: str) -> bool:
        return "now the active coordinator" in logs[name].read_text(errors="replace")

    try:
        await _until(lambda: active("first"), "the first process takes the lease")
        second = await _start(config, broker_files, postgres_server, logs["second"])
        await _until(
            lambda: "standby, waiting" in logs["second"].read_text(errors="replace"),
            "the second process stands by",
        )
        await _until(lambda: len(_clearings(socket_url)) >= 2, "the active one clears")
        # Kill the active one just after it cleared an interval: the next gate is the
        # standby's to clear, an interval (2 s) later.
        seen = len(_clearings(socket_url))
        await _until(lambda: len(_clearings(socket_url)) > seen, "another clearing")
        first.send_signal(signal.SIGKILL)
        await first.wait()
        killed_ts = clock.now()
        before = _clearings(socket_url)
        assert not active("second")
        await _until(lambda: active("second"), "the standby takes the lease")
        await _until(
            lambda: sum(ts > killed_ts for ts in _clearings(socket_url).values()) >= 2,
            "the standby clears the next intervals",
        )
        cleared = _clearings(socket_url)
        last_due = max(cleared) - 1  # ended (settle_delay_s 0) by the time the last one clears

        def settled() -> bool:
            with Ledger(socket_url) as ledger:
                return all(ledger.is_settled(k) for k in cleared if k <= last_due)

        await _until(settled, "every cleared interval that ended is settled")
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await proc.wait()
        stop.set()
        await sites
        for bus in buses.values():
            await bus.__aexit__(None, None, None)

    texts = {name: log.read_text(errors="replace") for name, log in logs.items()}
    assert "Traceback" not in texts["second"], texts["second"][-3000:]
    assert second is not None and second.returncode == 0, texts["second"][-3000:]
    after = sorted(k for k, ts in cleared.items() if ts > killed_ts)
    # The standby cleared the interval right after the active one's last: none was lost.
    assert min(after) == max(before) + 1, (sorted(before), after)
    assert sorted(cleared) == list(range(min(cleared), max(cleared) + 1))
    with Ledger(socket_url) as ledger:
        assert set(ledger.settled_intervals()) <= set(cleared)
        assert all(ledger.is_settled(k) for k in cleared if k <= last_due)
        assert ledger.check_balanced()
        assert any((result := ledger.settlement(k)) is not None and result.sites for k in after), (
            "the standby settled a market with the sites in it"
        )
    with psycopg_connect(socket_url) as conn:
        (once,) = conn.execute(
            "SELECT COUNT(*) = COUNT(DISTINCT interval) FROM intervals"
        ).fetchone()
        assert once  # one settlement per interval (the primary key, checked all the same)
    # The standby never connected to the broker while the active one was alive: the broker
    # saw the coordinator's user connect twice, once per process.
    assert mosquitto.log_tail(100_000).count("u'coordinator'") == 2


async def test_one_lease_per_feeder_until_its_session_ends(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.socket_url()
    stop = asyncio.Event()
    async with (
        FeederLease(url, "feeder-x", poll_s=0.05) as first,
        FeederLease(url, "feeder-x", poll_s=0.05) as second,
        FeederLease(url, "feeder-y", poll_s=0.05) as other_feeder,
    ):
        assert await first.acquire(stop)
        assert await other_feeder.acquire(stop)  # another feeder has a lease of its own
        waiting = asyncio.create_task(second.acquire(stop))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # the standby waits while the active session lives
        # The active one's session is ended from outside (a partition the server noticed):
        # it learns that it lost the lease, and the standby gets it.
        with psycopg_connect(postgres_server.socket_url()) as admin:
            (ended,) = admin.execute(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_locks "
                "WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
                "AND classid = %s::bigint::oid "
                "AND objid = (hashtext('feeder-x')::bigint & 4294967295)::oid",
                (LEASE_LOCK_CLASS,),
            ).fetchone()
            assert ended == 1
        with pytest.raises(LeaseLost):
            await first.hold(stop)
        assert await asyncio.wait_for(waiting, 5.0)
        stop.set()
        await second.hold(stop)  # returns at once when stopping


async def test_a_standby_needs_a_postgres_ledger(tmp_path: Path) -> None:
    config = parse_coordinator_config({"coordinator": {}}, str(tmp_path / "c.toml"))
    with pytest.raises(StandbyError, match="ledger_url"):
        await serve(config, ScaledClock(T0, 1.0), asyncio.Event())
