"""The edge agent against a real Mosquitto (auth + ACL) and a simulated site over Modbus TCP."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker import topics
from broker.client import BusClient, BusSettings
from broker.clock import ScaledClock
from broker.messages import Award, Bid, Dispatch, DispatchAck, Telemetry
from broker.mosquitto import BrokerFiles, MosquittoProcess
from edge.agent import EdgeAgent
from edge.config import EdgeConfig, parse_edge_config
from simulators.devices import BatterySim, LoadSpec, PvInverterSim, SimSite, SunSpecMeterSim
from simulators.server import DeviceServer

SITE = "house-1"
NOON_TS = 1_782_043_200.0
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class House:
    """A simulated house served over Modbus TCP, and where its devices are."""

    clock: ScaledClock
    site: SimSite
    battery: BatterySim
    urls: dict[str, str]


@asynccontextmanager
async def simulated_house(speed: float = 10.0, soc_pct: float = 50.0) -> AsyncIterator[House]:
    clock = ScaledClock(NOON_TS, speed)
    site = SimSite(
        SITE,
        clock,
        LoadSpec("household", 300.0, 4000.0),
        seed=1,
        latitude_deg=48.0,
        longitude_deg=11.0,
    )
    pv = PvInverterSim("pv", 1, site, rated_ac_w=6000)
    battery = BatterySim(
        "battery", 1, site, capacity_wh=10_000, rated_power_w=5000, soc_pct=soc_pct
    )
    meter = SunSpecMeterSim("meter", 1, site, max_power_w=20_000)
    async with (
        DeviceServer([pv], tcp=("127.0.0.1", 0)) as s1,
        DeviceServer([battery], tcp=("127.0.0.1", 0)) as s2,
        DeviceServer([meter], tcp=("127.0.0.1", 0)) as s3,
    ):
        yield House(clock, site, battery, {"pv": s1.url, "battery": s2.url, "meter": s3.url})


def site_config(house: House, files: BrokerFiles, spool: Path, **sections: object) -> EdgeConfig:
    data: dict[str, object] = {
        "site": {"id": SITE, "poll_interval_s": 0.2},
        "broker": {"host": "127.0.0.1", "port": files.port},
        "devices": [
            {"name": "pv", "kind": "pv_inverter", "url": house.urls["pv"]},
            {"name": "battery", "kind": "battery", "url": house.urls["battery"]},
            {"name": "meter", "kind": "sunspec_meter", "url": house.urls["meter"]},
        ],
        "spool": {"path": str(spool)},
        "dispatch_revert_s": 30,
    }
    data.update(sections)
    return parse_edge_config(data, "test-site.toml")


@dataclass
class Observer:
    """A coordinator-credentialed subscriber to everything, with what it received."""

    bus: BusClient
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def of(self, kind: str) -> list[bytes]:
        return [p for t, p in self.messages if t == topics.site_topic(SITE, kind)]  # type: ignore[arg-type]

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self.arrived.clear()
                await self.arrived.wait()


@asynccontextmanager
async def observer(
    files: BrokerFiles, user: str = "coordinator", client_id: str = "test-observer"
) -> AsyncIterator[Observer]:
    holder: list[Observer] = []

    async def handle(topic: str, payload: bytes) -> None:
        holder[0].messages.append((topic, payload))
        holder[0].arrived.set()

    settings = BusSettings(
        port=files.port,
        username=user,
        password=files.credentials[user],
        client_id=client_id,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
    )
    async with BusClient(settings, handler=handle) as bus:
        holder.append(Observer(bus))
        await bus.subscribe(f"{topics.PREFIX}/#")
        await bus.wait_connected(5)
        yield holder[0]


def _password(files: BrokerFiles) -> str:
    return files.credentials[SITE]


async def test_telemetry_arrives_with_every_device_and_its_availability(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    async with simulated_house() as house, observer(broker_files) as obs:
        config = site_config(house, broker_files, tmp_path / "spool.sqlite")
        async with EdgeAgent(config, house.clock, password=_password(broker_files)):
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 5)
            status = obs.of("status")
    first = Telemetry.model_validate_json(obs.of("telemetry")[-1])
    assert [d.device for d in first.devices] == ["pv", "battery", "meter"]
    assert all(d.available for d in first.devices)
    assert first.pv_power_w is not None and first.pv_power_w > 1000  # midsummer noon
    assert first.battery_soc_pct == pytest.approx(50.0, abs=1.0)
    assert first.controller == "fallback"
    assert b'"online":true' in status[0]


async def test_bids_arrive_before_gate_closure_every_interval(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    market = {"interval_s": 60, "gate_s": 10, "bid_lead_s": 30}
    async with simulated_house(speed=30.0) as house, observer(broker_files) as obs:
        config = site_config(house, broker_files, tmp_path / "spool.sqlite", market=market)
        arrivals: dict[int, float] = {}

        async def note_bids() -> None:
            while True:
                await obs.arrived.wait()
                obs.arrived.clear()
                for payload in obs.of("bid"):
                    arrivals.setdefault(
                        Bid.model_validate_json(payload).interval, house.clock.now()
                    )

        async with EdgeAgent(config, house.clock, password=_password(broker_files)):
            watcher = asyncio.create_task(note_bids())
            await asyncio.sleep(7.0)  # 210 simulated seconds: three or four intervals
            watcher.cancel()
    assert len(arrivals) >= 3
    for interval, received_ts in arrivals.items():
        assert received_ts < interval * 60 - 10, f"bid for {interval} arrived after the gate"
    bids = [Bid.model_validate_json(p) for p in obs.of("bid")]
    assert all(b.buy or b.sell for b in bids)


async def _dispatch(obs: Observer, payload: str | bytes) -> DispatchAck:
    before = len(obs.of("dispatch/ack"))
    await obs.bus.publish(topics.site_topic(SITE, "dispatch"), payload)
    await obs.wait_for(lambda: len(obs.of("dispatch/ack")) > before)
    return DispatchAck.model_validate_json(obs.of("dispatch/ack")[before])


async def test_a_dispatch_moves_the_simulated_battery_and_is_acknowledged(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    async with simulated_house() as house, observer(broker_files) as obs:
        config = site_config(house, broker_files, tmp_path / "spool.sqlite")
        async with EdgeAgent(config, house.clock, password=_password(broker_files)):
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 2)
            now = house.clock.now()
            cmd = Dispatch(ts=now, battery_power_w=-3000.0, expires_ts=now + 600)
            ack = await _dispatch(obs, cmd.model_dump_json())
            soc_then = house.battery.soc_pct
            await asyncio.sleep(2.0)  # 20 simulated seconds
            soc_later = house.battery.soc_pct
    assert ack.command_id == cmd.id
    assert ack.outcome == "accepted"
    assert ack.applied_battery_power_w == -3000.0
    assert house.battery.setpoint_w == -3000.0
    # 3 kW charging at 95 % into 10 kWh: about 0.16 points per 20 s.
    assert soc_later > soc_then + 0.1


async def test_bad_dispatch_commands_get_their_outcome_and_the_agent_keeps_running(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    async with simulated_house() as house, observer(broker_files) as obs:
        config = site_config(house, broker_files, tmp_path / "spool.sqlite")
        async with EdgeAgent(config, house.clock, password=_password(broker_files)) as agent:
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 2)
            now = house.clock.now()
            expired = Dispatch(ts=now - 900, battery_power_w=1000.0, expires_ts=now - 300)
            too_big = Dispatch(ts=now, battery_power_w=20_000.0, expires_ts=now + 600)
            acks = {
                "expired": await _dispatch(obs, expired.model_dump_json()),
                "too_big": await _dispatch(obs, too_big.model_dump_json()),
                "replayed": await _dispatch(obs, too_big.model_dump_json()),
                "malformed": await _dispatch(
                    obs, b'{"id": "abcdefgh12", "battery_power_w": "a lot"}'
                ),
                "garbage": await _dispatch(obs, b"\x00not json"),
            }
            telemetry_before = len(obs.of("telemetry"))
            await obs.wait_for(lambda: len(obs.of("telemetry")) > telemetry_before + 2)
            assert agent.stats.invalid_messages  # counted, not fatal
    assert acks["expired"].outcome == "expired"
    assert acks["too_big"].outcome == "clamped"
    assert acks["too_big"].applied_battery_power_w == 5000.0
    assert "rated" in acks["too_big"].detail
    assert acks["replayed"].outcome == "duplicate"
    assert acks["malformed"].outcome == "invalid"
    assert acks["malformed"].command_id == "abcdefgh12"
    assert "battery_power_w" in acks["malformed"].detail
    assert acks["garbage"].outcome == "invalid"


async def test_when_the_coordinator_goes_silent_the_battery_returns_to_the_fallback(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    async with simulated_house(speed=20.0) as house, observer(broker_files) as obs:
        config = site_config(house, broker_files, tmp_path / "spool.sqlite")
        async with EdgeAgent(config, house.clock, password=_password(broker_files)) as agent:
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 2)
            now = house.clock.now()
            cmd = Dispatch(ts=now, battery_power_w=2500.0, expires_ts=now + 40)  # 2 s of wall
            ack = await _dispatch(obs, cmd.model_dump_json())
            assert ack.outcome == "accepted"
            assert agent.controller == "dispatch"
            await asyncio.sleep(3.0)  # the command lapses; nobody renews it
            controller = agent.controller
            setpoint = house.battery.setpoint_w
    assert controller == "fallback"
    # Self-consumption at noon: PV exceeds the load, so the battery charges instead.
    assert setpoint < 0


@pytest.mark.parametrize("reserve_soc_pct", [None, 100.0])
async def test_the_market_layer_leaves_the_peak_shaving_reserve_alone(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    tmp_path: Path,
    reserve_soc_pct: float | None,
) -> None:
    # An award to export 3 kWh in this interval (12 kW on average) asks more than the house
    # has: keeping it means discharging. A battery kept for peak shaving (reserve 100 %, not
    # offered to the market) must not be drained for it; without a reserve it is.
    fallback = {} if reserve_soc_pct is None else {"fallback": {"reserve_soc_pct": reserve_soc_pct}}
    async with simulated_house() as house, observer(broker_files) as obs:
        config = site_config(house, broker_files, tmp_path / "spool.sqlite", **fallback)
        async with EdgeAgent(config, house.clock, password=_password(broker_files)) as agent:
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 2)
            interval = int(house.clock.now() // config.market.interval_s)
            award = Award(ts=house.clock.now(), interval=interval, price_per_kwh=0.3,
                          quantity_kwh=-3.0)  # fmt: skip
            await obs.bus.publish(topics.site_topic(SITE, "award"), award.model_dump_json())
            await asyncio.sleep(1.5)  # the award arrives; a few control cycles follow
            assert interval in agent.awards
            controller, setpoint = agent.controller, house.battery.setpoint_w
    if reserve_soc_pct is None:
        # Full discharge toward the award, clipped to the rated power (the safety layer).
        assert (controller, setpoint) == ("safety", 5000.0)
    else:
        # The reserve is kept; the shortfall is imbalance.
        assert (controller, setpoint) == ("market", 0.0)


async def test_a_broker_outage_loses_no_telemetry(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    async with simulated_house(speed=10.0) as house, observer(broker_files) as obs:
        config = site_config(house, broker_files, tmp_path / "spool.sqlite")
        agent_bus = BusSettings(
            port=broker_files.port,
            username=SITE,
            password=_password(broker_files),
            client_id="edge-house-1",
            backoff_initial_s=0.5,
            backoff_max_s=1.0,
        )
        async with EdgeAgent(config, house.clock, bus_settings=agent_bus) as agent:
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 3)
            # Persist the observer's session, then kill the broker outright.
            assert mosquitto.pid is not None
            os.kill(mosquitto.pid, signal.SIGUSR1)
            await asyncio.sleep(0.3)
            await mosquitto.kill()
            outage_start = house.clock.now()
            await asyncio.sleep(3.0)  # 30 simulated seconds without a broker
            outage_end = house.clock.now()
            spooled_during = len(agent.outbox)
            await mosquitto.start()
            produced = agent.stats.telemetry_spooled
            await obs.wait_for(
                lambda: (
                    len({Telemetry.model_validate_json(p).id for p in obs.of("telemetry")})
                    >= produced
                ),
                timeout_s=15,
            )
    received = [Telemetry.model_validate_json(p) for p in obs.of("telemetry")]
    unique: dict[str, Telemetry] = {}
    for t in received:
        unique.setdefault(t.id, t)
    timestamps = [t.ts for t in unique.values()]
    assert spooled_during >= 10  # the outage really happened while sampling went on
    assert len(unique) >= produced  # everything produced before the check arrived
    assert timestamps == sorted(timestamps)  # in order, with their original timestamps
    # No hole anywhere: a sample every 0.2 s of wall time is 2 simulated seconds apart.
    gaps = [b - a for a, b in itertools.pairwise(timestamps)]
    assert max(gaps) < 6.0, f"a gap of {max(gaps):.1f} simulated seconds: samples were lost"
    assert sum(outage_start < ts < outage_end for ts in timestamps) >= 10


async def test_the_edge_process_killed_and_restarted_replays_its_spool(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    async with simulated_house(speed=1.0) as house, observer(broker_files) as obs:
        site_file = tmp_path / "house-1.toml"
        site_file.write_text(f"""
[site]
id = "{SITE}"
poll_interval_s = 0.2

[broker]
port = {broker_files.port}
password_env = "TEST_MQTT_PASSWORD"

[[devices]]
name = "pv"
kind = "pv_inverter"
url = "{house.urls["pv"]}"

[[devices]]
name = "battery"
kind = "battery"
url = "{house.urls["battery"]}"

[[devices]]
name = "meter"
kind = "sunspec_meter"
url = "{house.urls["meter"]}"

[spool]
path = "spool.sqlite"

[clock]
start = 2026-06-21T12:00:00Z
speed = 1.0
anchor_wall_ts = {house.clock.anchor_wall_ts}
""")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TEST_MQTT_PASSWORD": "wrong"}
        command = [sys.executable, "-m", "wattmesh", "edge", "run", str(site_file)]
        # First run with a wrong password: the broker refuses it, telemetry piles up (it keeps
        # retrying instead of giving up after a few refusals).
        first = subprocess.Popen(
            [*command, "--give-up-after", "0"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        await asyncio.sleep(3.0)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        from edge.spool import Spool

        with Spool(tmp_path / "spool.sqlite") as spool:
            pending = [m.payload for m in spool.peek(10_000)]
        assert len(pending) >= 5
        assert obs.of("telemetry") == []
        # The second run has the right password and replays what the first one spooled.
        env["TEST_MQTT_PASSWORD"] = broker_files.credentials[SITE]
        second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= len(pending) + 3, timeout_s=20)
        finally:
            second.send_signal(signal.SIGINT)
            _, stderr = second.communicate(timeout=15)
        # A clean stop says offline (retained), before the process exits.
        await obs.wait_for(lambda: b'"online":false' in obs.of("status")[-1], timeout_s=5)
    received = obs.of("telemetry")
    assert received[: len(pending)] == pending  # replayed first, in order, byte for byte
    assert second.returncode == 0, stderr.decode()
