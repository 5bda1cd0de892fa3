"""The edge trusts no sender: orders judged on its own clock, hostile payloads refused and
counted, and a spool that fails (full disk, no directory) never stops the batteries' control.

Real Mosquitto (auth + ACL), real Modbus TCP to a simulated house, real SQLite on a real
(tmpfs) file system.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker import topics
from broker.messages import Dispatch, Status, Telemetry
from broker.mosquitto import BrokerFiles, MosquittoProcess
from edge.agent import EdgeAgent
from edge.config import EdgeConfig
from edge.trust import order_window
from tests.broker_fixtures import free_port
from tests.test_edge_agent import (
    ROOT,
    SITE,
    House,
    Observer,
    _dispatch,
    _password,
    observer,
    simulated_house,
    site_config,
)

IDLE = {"fallback": {"mode": "idle"}}


# -- the rule, by hand ---------------------------------------------------------------------


def test_an_order_is_judged_and_ended_on_the_receivers_clock() -> None:
    rules = {"max_skew_s": 30.0, "max_age_s": 300.0, "max_duration_s": 3600.0}
    ok = order_window(1000.0, 1600.0, 1000.0, **rules)
    assert (ok.verdict, ok.end_ts, ok.shortened) == ("ok", 1600.0, False)
    # Asked for 8000 s: ends 3600 s after receipt, not at its expires_ts.
    long = order_window(1000.0, 9000.0, 1000.0, **rules)
    assert (long.verdict, long.end_ts, long.shortened) == ("ok", 4600.0, True)
    # Stamped up to the skew ahead of the receiver: accepted, still ended from receipt.
    ahead = order_window(1030.0, 1e6, 1000.0, **rules)
    assert (ahead.verdict, ahead.end_ts) == ("ok", 4600.0)
    assert order_window(1030.5, 1700.0, 1000.0, **rules).verdict == "future"
    far = order_window(1000.0 + 3e7, 1000.0 + 3e7 + 600, 1000.0, **rules)
    assert far.verdict == "future"
    assert "ahead of this site's clock" in far.detail
    assert order_window(700.0, 1700.0, 1000.0, **rules).verdict == "ok"
    assert order_window(699.0, 1700.0, 1000.0, **rules).verdict == "stale"
    expired = order_window(100.0, 1000.0, 1000.0, **rules)
    assert (expired.verdict, expired.detail) == ("expired", "expired 0 s ago")


# -- orders over the real bus ----------------------------------------------------------------


async def test_an_order_stamped_in_the_far_future_or_long_ago_is_refused_and_the_battery_stays_idle(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    async with simulated_house() as house, observer(broker_files) as obs:
        config = site_config(house, broker_files, tmp_path / "spool.sqlite", **IDLE)
        async with EdgeAgent(config, house.clock, password=_password(broker_files)) as agent:
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 2)
            now = house.clock.now()
            year = 365 * 86400.0
            future = Dispatch(ts=now + year, battery_power_w=4000.0, expires_ts=now + year + 600)
            # Made 20,000 s ago for 22 h: still unexpired by its own times, but held up far
            # beyond max_age_s (300 real s: 3,000 simulated s at 10x).
            stale = Dispatch(ts=now - 20_000, battery_power_w=4000.0, expires_ts=now + 60_000)
            acks = [await _dispatch(obs, m.model_dump_json()) for m in (future, stale)]
            seen = len(obs.of("telemetry"))
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= seen + 3)
            controller, setpoint = agent.controller, house.battery.setpoint_w
            rejected = agent.stats.rejected["dispatch"]
    assert [a.outcome for a in acks] == ["refused", "refused"]
    assert "ahead of this site's clock" in acks[0].detail
    assert "too old" in acks[1].detail
    assert rejected == {"future": 1, "stale": 1}
    assert (controller, setpoint) == ("fallback", 0.0)


async def test_a_long_order_lapses_at_receipt_plus_the_sites_maximum(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    # 40 simulated seconds at 20x: the order asks for 600 s and is held for 40.
    async with simulated_house(speed=20.0) as house, observer(broker_files) as obs:
        config = site_config(
            house, broker_files, tmp_path / "spool.sqlite", dispatch={"max_duration_s": 40}, **IDLE
        )
        async with EdgeAgent(config, house.clock, password=_password(broker_files)) as agent:
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 2)
            now = house.clock.now()
            cmd = Dispatch(ts=now, battery_power_w=2500.0, expires_ts=now + 600)
            ack = await _dispatch(obs, cmd.model_dump_json())
            during = (agent.controller, house.battery.setpoint_w)
            # The ack is stamped after receipt: wait past receipt + 40 on the agent's clock.
            await obs.wait_for(lambda: house.clock.now() > ack.ts + 40)
            seen = len(obs.of("telemetry"))
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= seen + 3)
            after = (agent.controller, house.battery.setpoint_w)
            still_unexpired = house.clock.now() < cmd.expires_ts
    assert ack.outcome == "clamped"
    assert "40 s after receipt" in ack.detail
    assert ack.applied_battery_power_w == 2500.0
    assert during == ("dispatch", 2500.0)
    assert still_unexpired  # the order's own expiry is far away: the site's maximum ended it
    assert after == ("fallback", 0.0)


async def test_a_dispatch_nested_100000_levels_deep_is_acknowledged_invalid_and_the_agent_goes_on(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    nested = b'{"id": "deep00000001", "battery_power_w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    huge = b'{"id": "huge00000001", "reason": "' + b"x" * 300_000 + b'"}'
    bad_utf8 = b'{"id": "utf800000001", "reason": "\xff\xfe"}'
    nan = b'{"id": "nan000000001", "ts": NaN, "expires_ts": Infinity, "battery_power_w": 1}'
    async with simulated_house() as house, observer(broker_files) as obs:
        config = site_config(house, broker_files, tmp_path / "spool.sqlite", **IDLE)
        async with EdgeAgent(config, house.clock, password=_password(broker_files)) as agent:
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 2)
            acks = [await _dispatch(obs, p) for p in (nested, huge, bad_utf8, nan)]
            now = house.clock.now()
            good = Dispatch(ts=now, battery_power_w=-1500.0, expires_ts=now + 600)
            after = await _dispatch(obs, good.model_dump_json())
            seen = len(obs.of("telemetry"))
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= seen + 2)
            errors = agent.bus.stats.handler_errors
            rejected = agent.stats.rejected["dispatch"]
    assert [a.outcome for a in acks] == ["invalid"] * 4
    assert "recursion limit" in acks[0].detail
    assert acks[1].detail.startswith("too_large")
    assert acks[3].command_id == "nan000000001"
    assert rejected == {"invalid": 3, "too_large": 1}
    assert errors == 0  # nothing escaped to the bus client's last-resort handler
    assert (after.outcome, after.applied_battery_power_w) == ("accepted", -1500.0)
    assert house.battery.setpoint_w == -1500.0


def _statuses(obs: Observer) -> list[Status]:
    return [Status.model_validate_json(p) for p in obs.of("status")]


async def test_garbage_on_every_other_inbound_topic_is_counted_and_shown_in_the_status(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    async with simulated_house() as house, observer(broker_files) as obs:
        config = site_config(
            house,
            broker_files,
            tmp_path / "spool.sqlite",
            site={"id": SITE, "poll_interval_s": 0.2, "status_interval_s": 0.2},
        )
        async with EdgeAgent(config, house.clock, password=_password(broker_files)) as agent:
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 2)
            interval = int(house.clock.now() // config.market.interval_s)
            far_award = json.dumps(
                {"ts": house.clock.now(), "interval": interval + 10_000,
                 "price_per_kwh": 0.2, "quantity_kwh": 5.0}
            )  # fmt: skip
            sends = [
                (topics.site_topic(SITE, "award"), far_award),
                (topics.site_topic(SITE, "award"), b"[" * 100_000),
                (topics.forecast_topic(SITE), b"\xff" * 10),
                (topics.forecast_topic(SITE), b'{"pv_power_w": [' + b"1," * 200_000 + b"1]}"),
                (topics.grid_state_topic("feeder-1"), b'{"mode": "panic"}'),
            ]
            for topic, payload in sends:
                await obs.bus.publish(topic, payload)
            await obs.wait_for(
                lambda: any(
                    s.rejected.get("grid/state") and s.rejected.get("forecast", {}).get("too_large")
                    for s in _statuses(obs)
                )
            )
            seen = len(obs.of("telemetry"))
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= seen + 2)  # still running
            rejected = agent.stats.rejected
            awards = dict(agent.awards)
    status = _statuses(obs)[-2]  # the last online one (the last is the offline will/close)
    assert rejected == {
        "award": {"future": 1, "invalid": 1},
        "forecast": {"invalid": 1, "too_large": 1},
        "grid/state": {"invalid": 1},
    }
    assert awards == {}
    assert status.online
    assert status.rejected == rejected
    assert status.spool_state == "ok"
    assert status.telemetry_dropped == 0


# -- wattmesh dispatch on the agents' clock --------------------------------------------------


def trust_config(
    house: House, files: BrokerFiles, spool: Path, *, retry_max_s: float, **sections: object
) -> EdgeConfig:
    """``site_config`` with a quick spool retry, for the tests that break the spool."""
    config = site_config(house, files, spool, **sections)
    return config.model_copy(
        update={"spool": config.spool.model_copy(update={"retry_max_s": retry_max_s})}
    )


def _cli_dispatch(files: BrokerFiles, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "WATTMESH_OPERATOR_PASSWORD": files.credentials["operator"],
    }
    command = [sys.executable, "-m", "wattmesh", "dispatch", SITE, "--port", str(files.port)]
    return subprocess.run(
        [*command, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


async def test_wattmesh_dispatch_stamps_and_counts_on_the_clock_file_the_agents_follow(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    clock_file = tmp_path / "clock.json"
    async with simulated_house(speed=20.0) as house, observer(broker_files) as obs:
        clock_file.write_text(json.dumps(house.clock.to_json()))
        config = site_config(house, broker_files, tmp_path / "spool.sqlite", **IDLE)
        async with EdgeAgent(config, house.clock, password=_password(broker_files)) as agent:
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 2)
            # Wall time is months away from the simulated midsummer noon: refused.
            wall = await asyncio.to_thread(_cli_dispatch, broker_files, "--battery-w", "3000")
            # On the simulated clock: accepted, for 60 simulated seconds (3 s of wall time).
            sim = await asyncio.to_thread(
                _cli_dispatch,
                broker_files,
                "--battery-w",
                "3000",
                "--for",
                "60s",
                "--clock-file",
                str(clock_file),
            )
            during = (agent.controller, house.battery.setpoint_w)
            orders = [Dispatch.model_validate_json(p) for p in obs.of("dispatch")]
            await obs.wait_for(lambda: house.clock.now() > orders[-1].expires_ts)
            seen = len(obs.of("telemetry"))
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= seen + 3)
            after = (agent.controller, house.battery.setpoint_w)
    assert wall.returncode == 1, wall.stderr
    assert json.loads(wall.stdout)["outcome"] == "refused"
    assert sim.returncode == 0, sim.stderr
    assert json.loads(sim.stdout)["outcome"] == "accepted"
    assert orders[-1].expires_ts - orders[-1].ts == 60.0
    assert abs(orders[-1].ts - house.clock.now()) < 3600  # stamped in simulated time
    assert during == ("dispatch", 3000.0)
    assert after == ("fallback", 0.0)


def test_wattmesh_dispatch_with_an_unusable_clock_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "wattmesh", "dispatch", SITE, "--battery-w", "1"]
    result = subprocess.run(
        [*command, "--clock-file", str(missing)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "clock.file" in result.stderr
    assert "nope.json" in result.stderr


# -- the spool fails; the batteries do not notice -----------------------------------------


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "8m") -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``path`` (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_up(directory: Path) -> Path:
    """Write a file until the file system is full; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = 65536
        while chunk:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError:
                chunk //= 2  # nearly full: smaller writes take the last bytes
    finally:
        os.close(fd)
    return filler


async def _until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.05)


async def test_a_full_disk_degrades_the_spool_while_the_battery_keeps_obeying(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    with small_filesystem(tmp_path / "disk") as disk:
        async with simulated_house() as house, observer(broker_files) as obs:
            config = trust_config(
                house,
                broker_files,
                disk / "spool.sqlite",
                site={"id": SITE, "poll_interval_s": 0.2, "status_interval_s": 0.2},
                retry_max_s=0.5,
                **IDLE,
            )
            async with EdgeAgent(config, house.clock, password=_password(broker_files)) as agent:
                await obs.wait_for(lambda: len(obs.of("telemetry")) >= 2)
                filler = fill_up(disk)
                await _until(lambda: agent.outbox.state == "degraded")
                # Full disk, broker up: telemetry goes out directly, orders still move the battery.
                direct_before = agent.outbox.direct
                seen = len(obs.of("telemetry"))
                await obs.wait_for(lambda: len(obs.of("telemetry")) >= seen + 5)
                now = house.clock.now()
                order = Dispatch(ts=now, battery_power_w=-2000.0, expires_ts=now + 600)
                ack = await _dispatch(obs, order.model_dump_json())
                writes = agent.stats.battery_writes
                await _until(lambda: agent.stats.battery_writes > writes)  # renewals go on
                setpoint_while_full = house.battery.setpoint_w
                direct_while_full = agent.outbox.direct - direct_before
                state_while_full = agent.outbox.state
                await obs.wait_for(lambda: any(s.spool_state == "degraded" for s in _statuses(obs)))
                # Space comes back: the spool is used again.
                filler.unlink()
                await _until(lambda: agent.outbox.state == "ok")
                spooled = agent.stats.telemetry_spooled
                await _until(lambda: agent.stats.telemetry_spooled >= spooled + 3)
                await obs.wait_for(lambda: _statuses(obs)[-1].spool_state == "ok")
                received = {Telemetry.model_validate_json(p).id for p in obs.of("telemetry")}
                assert agent.outbox.dropped == 0  # the broker was up all along
    assert state_while_full == "degraded"
    assert direct_while_full >= 5
    assert ack.outcome == "accepted"
    assert setpoint_while_full == -2000.0
    assert len(received) >= 10


async def test_with_a_full_disk_and_no_broker_drops_are_counted_and_control_goes_on(
    tmp_path: Path,
) -> None:
    with small_filesystem(tmp_path / "disk") as disk:
        async with simulated_house() as house:
            config = trust_config(
                house,
                _NoBroker(free_port()),  # type: ignore[arg-type]
                disk / "spool.sqlite",
                retry_max_s=0.5,
            )
            async with EdgeAgent(config, house.clock, password="x") as agent:
                await _until(lambda: agent.stats.telemetry_spooled >= 2)
                filler = fill_up(disk)
                await _until(lambda: agent.outbox.state == "degraded")
                dropped = agent.outbox.dropped
                writes = agent.stats.battery_writes
                await _until(lambda: agent.outbox.dropped >= dropped + 5)
                await _until(lambda: agent.stats.battery_writes > writes)
                controller, setpoint = agent.controller, house.battery.setpoint_w
                dropped_while_full = agent.outbox.dropped
                filler.unlink()
                await _until(lambda: agent.outbox.state == "ok")
                dropped_at_recovery = agent.outbox.dropped
                assert agent.spool is not None
                spooled = len(agent.spool)
                await _until(lambda: agent.spool is not None and len(agent.spool) >= spooled + 3)
                dropped_after = agent.outbox.dropped
    assert dropped_while_full >= 5
    # Self-consumption at noon: PV exceeds the load, the battery charges.
    assert controller == "fallback"
    assert setpoint < 0
    assert dropped_after == dropped_at_recovery  # spooled again, nothing more lost


class _NoBroker:
    """Stands in for BrokerFiles in site_config: a port nobody listens on (broker down)."""

    def __init__(self, port: int) -> None:
        self.port = port


async def test_an_agent_whose_spool_directory_cannot_exist_comes_up_degraded_and_controls(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the spool's directory should be")
    spool_path = blocker / "spool.sqlite"
    async with simulated_house() as house, observer(broker_files) as obs:
        config = trust_config(
            house,
            broker_files,
            spool_path,
            site={"id": SITE, "poll_interval_s": 0.2, "status_interval_s": 0.2},
            retry_max_s=0.5,
        )
        async with EdgeAgent(config, house.clock, password=_password(broker_files)) as agent:
            state_at_start = agent.outbox.state
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 3)  # published directly
            await _until(lambda: agent.stats.battery_writes >= 1)
            controller = agent.controller
            await obs.wait_for(lambda: any(s.spool_state == "degraded" for s in _statuses(obs)))
            # The directory becomes possible: the agent finds its spool by itself.
            blocker.unlink()
            blocker.mkdir()
            await _until(lambda: agent.outbox.state == "ok")
            await _until(lambda: spool_path.exists() and agent.stats.telemetry_spooled >= 2)
    assert state_at_start == "degraded"
    assert controller == "fallback"
    assert house.battery.setpoint_w < 0  # self-consumption: charging from the noon surplus
