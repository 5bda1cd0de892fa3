"""Issue 11: lose no trade. Clearings survive coordinator kills, settlement waits for replayed
telemetry after a broker outage, and telemetry after settlement books a correction."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
from pathlib import Path

from broker import topics
from broker.client import BusClient, BusSettings
from broker.clock import ManualClock, ScaledClock
from broker.errors import BusUnavailable
from broker.messages import Award, Bid, BidStep, Clearing
from broker.mosquitto import BrokerFiles, MosquittoProcess
from coordinator.ledger import Ledger
from tests.test_coordinator import T0, _bus, _coordinator, _telemetry

ROOT = Path(__file__).resolve().parent.parent


async def _publish_or_keep(
    bus: BusClient, site: str, backlog: list[bytes], payload: bytes | None
) -> None:
    """Send a reading, oldest first, keeping what the broker cannot take (like the spool)."""
    if payload is not None:
        backlog.append(payload)
    while backlog:
        try:
            await bus.publish(topics.site_topic(site, "telemetry"), backlog[0])
        except BusUnavailable:
            return
        backlog.pop(0)


async def test_settlement_waits_for_telemetry_replayed_after_a_broker_outage(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    c = _coordinator(tmp_path, broker_files)
    assert isinstance(c.clock, ManualClock)
    k = int(T0 // 900)
    sites = ("site-a", "site-b")
    backlog: dict[str, list[bytes]] = {s: [] for s in sites}
    async with c:
        await c.bus.wait_connected(5)
        buses = {s: await _bus(broker_files, s, []) for s in sites}
        assert await c.clear_interval(k) is not None
        sent = 0

        async def meter(ts: int) -> None:
            nonlocal sent
            c.clock.ts = float(ts)
            for s in sites:
                reading = _telemetry(ts, 2000.0 if s == "site-a" else -1000.0)
                await _publish_or_keep(buses[s], s, backlog[s], reading.model_dump_json().encode())
                sent += 1

        for ts in range(k * 900, k * 900 + 420, 60):
            await meter(ts)
        async with asyncio.timeout(10):
            while c.stats.telemetry < sent:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await mosquitto.stop()
        for ts in range(k * 900 + 420, (k + 1) * 900 + 181, 60):
            await meter(ts)  # kept by the sites while the broker is away
        assert all(backlog[s] for s in sites)
        c.clock.ts = (k + 1) * 900 + 200.0  # past settle_delay_s, within settle_window_s
        assert c.settle_due() == 0  # the sites' meters have not reached the interval's end
        with Ledger(tmp_path / "ledger.sqlite", migrate=False) as reader:
            assert not reader.is_settled(k)
        await mosquitto.start()
        for bus in buses.values():
            await bus.wait_connected(10)
        async with asyncio.timeout(20):
            while any(backlog.values()):
                for s in sites:
                    await _publish_or_keep(buses[s], s, backlog[s], None)
                await asyncio.sleep(0.05)
            while c.stats.telemetry < sent:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        c.settle_due()  # unless the settle loop was first
        assert c.ledger.is_settled(k)
        for bus in buses.values():
            await bus.__aexit__(None, None, None)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        result = ledger.settlement(k)
        assert result is not None
        assert {s.site for s in result.sites} == set(sites)  # nobody missing
        assert [s.estimated for s in result.sites] == [False, False]
        assert result.site("site-a").metered_wh == 500  # 2 kW over 15 minutes
        assert result.site("site-b").metered_wh == -250
        assert ledger.check_balanced()


def test_telemetry_arriving_after_settlement_books_a_correction(tmp_path: Path) -> None:
    c = _coordinator(tmp_path)
    assert isinstance(c.clock, ManualClock)
    k = int(T0 // 900)
    c.clock.ts = k * 900 - 120.0
    c.ingest_telemetry("site-a", _telemetry(c.clock.ts, 1000.0))
    c.ingest_telemetry("site-b", _telemetry(c.clock.ts, 1000.0))
    asyncio.run(_clear_offline(c, k))
    late: list[float] = []
    for ts in range(k * 900, (k + 1) * 900 + 61, 60):
        c.clock.ts = float(ts)
        c.ingest_telemetry("site-a", _telemetry(ts, 1000.0))
        late.append(float(ts))  # site-b's readings are held up (a broker outage)
    c.clock.ts = (k + 1) * 900 + 120.0 + c.config.trust.settle_window_s
    assert c.settle_due() == 1  # the window has passed: site-b is settled as estimated
    settled = c.ledger.settlement(k)
    assert settled is not None
    assert settled.site("site-b").estimated
    assert "telemetry covers 0 %" in (settled.site("site-b").estimate_reason or "")
    for ts in late:  # the replay arrives
        c.ingest_telemetry("site-b", _telemetry(ts, 3000.0))
    c.settle_due()
    corrected = c.ledger.settlement(k)
    assert corrected is not None
    assert corrected.revision == 1
    assert not corrected.site("site-b").estimated
    assert corrected.site("site-b").metered_wh == 750  # 3 kW over 15 minutes
    assert c.stats.corrections == 1
    c.settle_due()  # nothing new: no second correction
    assert c.ledger.settlement(k).revision == 1  # type: ignore[union-attr]
    assert c.ledger.check_balanced()
    c.ledger.close()


async def _clear_offline(c: object, k: int) -> None:
    """Clear interval k without a broker: publishing fails, the clearing is committed."""
    from coordinator.service import Coordinator

    assert isinstance(c, Coordinator)
    await c.clear_interval(k)


# --- killing the coordinator around gate closures ---------------------------------------

SPEED = 600.0  # a 15-minute interval in 1.5 s of wall time


def _coordinator_file(tmp_path: Path, files: BrokerFiles, clock_file: Path) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(
        f"""
[coordinator]
ledger = "{tmp_path / "ledger.sqlite"}"
[broker]
port = {files.port}
password_env = "WATTMESH_COORDINATOR_PASSWORD"
[market]
interval_s = 900
gate_s = 60
settle_delay_s = 120
[trust]
settle_window_s = 600
future_skew_s = 120
[clock]
file = "{clock_file}"
"""
    )
    return path


async def start_coordinator(
    config: Path, files: BrokerFiles, log: Path, *args: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """``wattmesh coordinator run CONFIG ARGS`` in its own process, its output in ``log``;
    ``env`` adds to the broker password and this checkout on the path."""
    full_env = {
        **os.environ,
        "WATTMESH_COORDINATOR_PASSWORD": files.credentials["coordinator"],
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wattmesh", "coordinator", "run", str(config), *args,
            env=full_env, stdout=out, stderr=out,
        )  # fmt: skip


async def _run_sites(clock: ScaledClock, buses: dict[str, BusClient], stop: asyncio.Event) -> None:
    """Three sites metering every 30 simulated seconds and bidding once per interval."""
    bid_for: dict[str, int] = {}
    while not stop.is_set():
        now = clock.now()
        for i, (s, bus) in enumerate(buses.items()):
            reading = _telemetry(now, (-2000.0, 1500.0, 800.0)[i])
            with contextlib.suppress(BusUnavailable):
                await bus.publish(topics.site_topic(s, "telemetry"), reading.model_dump_json())
            upcoming = int(now // 900) + 1
            if now < upcoming * 900 - 120 and bid_for.get(s) != upcoming:
                step = BidStep(price_per_kwh=0.1 + 0.05 * i, quantity_kwh=0.3)
                bid = (
                    Bid(ts=now, interval=upcoming, sell=[step])
                    if i == 0
                    else Bid(ts=now, interval=upcoming, buy=[step])
                )
                with contextlib.suppress(BusUnavailable):
                    await bus.publish(topics.site_topic(s, "bid"), bid.model_dump_json())
                    bid_for[s] = upcoming
        await asyncio.sleep(0.05)  # 30 simulated seconds


async def _connected(mosquitto: MosquittoProcess, times: int, timeout_s: float = 60.0) -> None:
    """Wait until the coordinator has connected ``times`` times (the broker's log says so)."""
    async with asyncio.timeout(timeout_s):
        while mosquitto.log_tail(10_000).count("u'coordinator'") < times:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_killing_the_coordinator_around_gate_closures_loses_no_cleared_interval(  # noqa: PLR0915
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    rng = random.Random(11)
    clock = ScaledClock(T0 - 600.0, SPEED)
    clock_file = tmp_path / "clock.json"
    clock_file.write_text(json.dumps(clock.to_json()))
    config = _coordinator_file(tmp_path, broker_files, clock_file)
    log = tmp_path / "coordinator.log"
    published: set[int] = set()
    sites = ("site-a", "site-b", "house-1")

    async def watch(topic: str, payload: bytes) -> None:
        if topic == topics.MARKET_CLEARING:
            published.add(Clearing.model_validate_json(payload).interval)
        elif topic.endswith("/award"):
            published.add(Award.model_validate_json(payload).interval)

    operator = BusClient(
        BusSettings(
            port=broker_files.port,
            username="operator",
            password=broker_files.credentials["operator"],
            client_id="operator",
        ),
        handler=watch,
    )
    buses = {s: await _bus(broker_files, s, []) for s in sites}
    stop = asyncio.Event()

    async with operator:
        await operator.wait_connected(5)
        await operator.subscribe(topics.MARKET_CLEARING)
        await operator.subscribe(f"{topics.PREFIX}/site/+/award")
        feeder = asyncio.create_task(_run_sites(clock, buses, stop))
        proc = await start_coordinator(config, broker_files, log)
        kills = 0
        try:
            while kills < 20:
                # Kill only a coordinator that got up (connected to the broker), so that each
                # kill lands around a gate it could clear, however slow a start is here.
                await _connected(mosquitto, kills + 1)
                # A random moment within 0.4 s (wall) either side of the next gate closure.
                now = clock.now()
                gate = (int((now + 60 + 0.4 * SPEED) // 900) + 1) * 900 - 60
                moment = gate + rng.uniform(-0.4, 0.4) * SPEED
                await asyncio.sleep(max(0.0, (moment - clock.now()) / SPEED))
                if kills % 4 == 3:
                    await asyncio.sleep(0.5)  # now and then, let a restart get all the way up
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                kills += 1
                proc = await start_coordinator(config, broker_files, log)
            # Let the last one run until every published interval is due and settled.
            last = max(published)
            end = (last + 1) * 900 + 120 + 600 + 100  # settle_window_s for incomplete metering
            await asyncio.sleep(max(0.0, (end - clock.now()) / SPEED) + 1.0)
            cutoff = clock.now() - 120 - 600 - 200  # intervals ending before it are due
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
            stop.set()
            await feeder
            for bus in buses.values():
                await bus.__aexit__(None, None, None)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        unsettled = {c.interval for c in ledger.unsettled_clearings()}
        missing = {k for k in published if (k + 1) * 900 < cutoff and not ledger.is_settled(k)}
        unrecorded = {k for k in published if ledger.clearing(k) is None}
        assert ledger.check_balanced()
    assert len(published) >= 10, f"only {sorted(published)} were published"
    assert missing == set(), f"published but not settled: {sorted(missing)}; log:\n{text[-3000:]}"
    assert unrecorded == set()  # every published clearing was committed first
    assert all((k + 1) * 900 >= cutoff for k in unsettled)
