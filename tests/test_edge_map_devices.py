"""The edge agent with register-mapped devices (``kind = "map"``) over real Modbus TCP.

A Victron GX twin (simulators.mapped) stands in for the hybrid; its battery is commanded
through :class:`drivers.devices.MapBattery` exactly as a SunSpec battery is: the same
precedence, safety clamp and acknowledgements, every write through the write guard.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.clock import Clock, ManualClock, ScaledClock
from broker.messages import Dispatch, Status, Telemetry
from broker.mosquitto import BrokerFiles, MosquittoProcess
from drivers.devices import MapBattery
from drivers.regmap import load_builtin_map
from edge.agent import EdgeAgent, Order
from edge.config import (
    EdgeConfig,
    EdgeConfigError,
    load_edge_config,
    parse_edge_config,
    proxy_units,
)
from simulators.devices import LoadSpec, SimSite, SunSpecMeterSim
from simulators.mapped import MapDeviceSim
from simulators.server import DeviceServer
from tests.broker_fixtures import free_port
from tests.test_edge_agent import SITE, _dispatch, _password, observer

NOON_TS = 1_782_043_200.0
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class MapSite:
    """A house whose battery is a register-mapped twin, with a SunSpec grid meter."""

    site: SimSite
    sim: MapDeviceSim
    urls: dict[str, str]


@asynccontextmanager
async def map_site(clock: Clock, map_name: str) -> AsyncIterator[MapSite]:
    site = SimSite(
        SITE,
        clock,
        LoadSpec("household", 300.0, 4000.0),
        seed=1,
        latitude_deg=48.0,
        longitude_deg=11.0,
    )
    sim = MapDeviceSim("hybrid", site, load_builtin_map(map_name), pv_peak_w=1.0, soc_pct=50.0)
    meter = SunSpecMeterSim("meter", 1, site, max_power_w=20_000)
    async with (
        DeviceServer(sim.devices, tcp=("127.0.0.1", 0)) as s1,
        DeviceServer([meter], tcp=("127.0.0.1", 0)) as s2,
    ):
        yield MapSite(site, sim, {"hybrid": s1.url, "meter": s2.url})


def map_config(
    house: MapSite, port: int, spool: Path, map_name: str, **sections: object
) -> EdgeConfig:
    data: dict[str, object] = {
        "site": {"id": SITE, "poll_interval_s": 0.2, "status_interval_s": 0.2},
        "broker": {"host": "127.0.0.1", "port": port},
        "devices": [
            {"name": "hybrid", "kind": "map", "map": map_name, "url": house.urls["hybrid"]},
            {"name": "meter", "kind": "sunspec_meter", "url": house.urls["meter"]},
        ],
        "spool": {"path": str(spool)},
        "market": {"enabled": False},
        "dispatch_revert_s": 30,
    }
    data.update(sections)
    return parse_edge_config(data, "test-site.toml")


async def test_a_victron_gx_site_obeys_a_dispatch_and_is_clamped_to_its_rating(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    clock = ScaledClock(NOON_TS, 10.0)
    async with map_site(clock, "victron_gx") as house, observer(broker_files) as obs:
        config = map_config(house, broker_files.port, tmp_path / "spool.sqlite", "victron_gx")
        async with EdgeAgent(config, clock, password=_password(broker_files)) as agent:
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 2)
            now = clock.now()
            charge = Dispatch(ts=now, battery_power_w=-2000.0, expires_ts=now + 600)
            ack = await _dispatch(obs, charge.model_dump_json())
            commanded = house.sim.commanded_w()
            soc_then = house.sim.soc_pct
            await asyncio.sleep(2.0)  # 20 simulated seconds
            soc_later = house.sim.soc_pct
            too_big = Dispatch(ts=clock.now(), battery_power_w=9000.0, expires_ts=now + 600)
            clamped = await _dispatch(obs, too_big.model_dump_json())
            commanded_after = house.sim.commanded_w()
            seen = len(obs.of("telemetry"))
            await obs.wait_for(lambda: len(obs.of("telemetry")) > seen + 1)
            await obs.wait_for(
                lambda: any(
                    Status.model_validate_json(p).setpoint_writes.get("hybrid", 0) >= 2
                    for p in obs.of("status")
                )
            )
            facade = agent.pollers[0].facade
    assert ack.outcome == "accepted"
    assert ack.applied_battery_power_w == -2000.0
    assert commanded == -2000.0  # the Multi's ESS setpoint, on unit 227
    assert soc_later > soc_then + 0.05  # 2 kW into 10 kWh for 20 s: about 0.1 points
    assert clamped.outcome == "clamped"
    assert clamped.applied_battery_power_w == 4000.0  # the map's rated discharge power
    assert "rated" in clamped.detail
    assert commanded_after == 4000.0
    last = Telemetry.model_validate_json(obs.of("telemetry")[-1])
    hybrid = next(d for d in last.devices if d.device == "hybrid")
    assert hybrid.kind == "battery" and hybrid.available
    assert isinstance(facade, MapBattery)
    assert hybrid.setpoint_writes is not None and hybrid.setpoint_writes >= 2
    assert house.sim.writes == facade.writes  # each command is one write on the wire


@pytest.mark.parametrize(
    ("map_name", "expected_writes", "registers_per_write"),
    [
        # Fixed 60 s revert timeout: refreshed every 30 s. Polls at 5..200 s: the first write
        # at 5 s, refreshes at 35, 65, ... 185 s. One command: the ESS setpoint.
        ("victron_gx", 7, 1),
        # A timeout point in minutes: the agent's 30 s rounds up to 60 s, refreshed every 30 s.
        # One command: forcible mode, period, charge power, command.
        ("huawei_sun2000", 7, 4),
        # Holds setpoints until told otherwise: written once (power limit, EMS mode).
        ("goodwe_et", 1, 2),
    ],
)
async def test_a_constant_setpoint_over_many_polls_is_written_only_to_refresh_it(
    tmp_path: Path, map_name: str, expected_writes: int, registers_per_write: int
) -> None:
    clock = ManualClock(NOON_TS)
    async with map_site(clock, map_name) as house:
        config = map_config(
            house,
            free_port(),  # no broker: telemetry is spooled, control goes on
            tmp_path / "spool.sqlite",
            map_name,
            site={"id": SITE, "poll_interval_s": 0.001},
        )
        agent = EdgeAgent(config, clock, password="x")
        start = clock.now()
        order = Dispatch(ts=start, battery_power_w=-1500.0, expires_ts=start + 3600)
        agent.dispatch = Order(order, start + 3600)
        commanded = []
        try:
            for _ in range(40):  # 40 polls, 5 s apart
                clock.advance(5.0)
                await asyncio.sleep(0.002)  # the poll interval passes on the wall clock
                await agent.cycle()
                commanded.append(house.sim.commanded_w())
        finally:
            agent.pool.close()
            agent.outbox.close()
        battery = agent.pollers[0].facade
    assert isinstance(battery, MapBattery)
    assert agent.stats.cycles == 40
    assert agent.controller == "dispatch"
    assert commanded == [-1500.0] * 40  # held throughout: the device never reverted
    assert battery.writes == expected_writes
    assert battery.held.refreshes == expected_writes - 1  # every write after the first
    # What reached the device: one write request per point of each command, nothing else.
    assert house.sim.writes == expected_writes * registers_per_write


def test_a_map_device_is_checked_when_the_site_file_is_read(tmp_path: Path) -> None:
    base: dict[str, object] = {"site": {"id": SITE}}
    url = "tcp://127.0.0.1:5020"

    def parse(*devices: dict[str, object]) -> EdgeConfig:
        return parse_edge_config(base | {"devices": list(devices)}, str(tmp_path / "site.toml"))

    ok = parse({"name": "ess", "kind": "map", "map": "victron_gx", "url": url})
    assert ok.devices[0].map_unit(ok.devices[0].load_map()) == 100  # the map's unit
    given = parse({"name": "ess", "kind": "map", "map": "victron_gx", "url": url, "unit": 7})
    assert given.devices[0].map_unit(given.devices[0].load_map()) == 7
    (tmp_path / "maps").mkdir()
    local = tmp_path / "maps" / "meter.toml"
    local.write_text(
        (ROOT / "drivers/maps/eastron_sdm72d.toml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    relative = parse({"name": "m", "kind": "map", "map": "maps/meter.toml", "url": url})
    assert relative.devices[0].map == str(local)  # next to the site file
    with pytest.raises(EdgeConfigError, match=r"devices\[0\]"):
        parse({"name": "ess", "kind": "map", "url": url})
    with pytest.raises(EdgeConfigError, match=r"devices\[0\]\.map: .*cannot read"):
        parse({"name": "ess", "kind": "map", "map": "no_such_map", "url": url})
    with pytest.raises(EdgeConfigError, match="one grid meter"):
        parse(
            {"name": "m1", "kind": "map", "map": "eastron_sdm72d", "url": url},
            {"name": "m2", "kind": "sunspec_meter", "url": url},
        )
    with pytest.raises(EdgeConfigError, match='map is for kind "map"'):
        parse({"name": "b", "kind": "battery", "map": "victron_gx", "url": url})


def test_the_commented_site_file_example_is_a_valid_site_file(tmp_path: Path) -> None:
    text = (ROOT / "config" / "sites" / "house-2.toml").read_text(encoding="utf-8")
    head, marker, example = text.partition("# --- example: a register-mapped hybrid")
    assert marker
    prose, _, commented = example.partition("\n#\n")  # the settings follow a bare "#"
    assert "Uncomment" in prose
    lines = [line.removeprefix("# ") for line in commented.splitlines()]
    site = tmp_path / "house-2.toml"
    site.write_text(head + "\n".join(lines) + "\n", encoding="utf-8")
    config = load_edge_config(site)
    ess = next(d for d in config.devices if d.name == "house2-ess")
    assert ess.kind == "map" and ess.map_unit(ess.load_map()) == 100
    assert config.proxy is not None and config.proxy.allow_writes is False
    assert sorted(proxy_units(config)) == [100, 227]


async def test_a_new_setpoint_waits_for_the_map_s_minimum_write_interval(tmp_path: Path) -> None:
    # GoodWe ET: at most one write per 30 s (its map). A new order 10 s after the last write
    # is written 30 s after it, not before; the order in between is kept, not dropped.
    clock = ManualClock(NOON_TS)
    async with map_site(clock, "goodwe_et") as house:
        config = map_config(
            house,
            free_port(),
            tmp_path / "spool.sqlite",
            "goodwe_et",
            site={"id": SITE, "poll_interval_s": 0.001},
        )
        agent = EdgeAgent(config, clock, password="x")
        start = clock.now()
        first = Dispatch(ts=start, battery_power_w=-1500.0, expires_ts=start + 3600)
        agent.dispatch = Order(first, start + 3600)
        commanded: list[tuple[float, float, list[str]]] = []
        try:
            for step in range(10):  # polls 5 s apart; the first write at 5 s
                clock.advance(5.0)
                if step == 2:  # 15 s: a new order, 10 s after the first write
                    second = Dispatch(
                        ts=clock.now(), battery_power_w=-3000.0, expires_ts=start + 3600
                    )
                    agent.dispatch = Order(second, start + 3600)
                await asyncio.sleep(0.002)
                await agent.cycle()
                commanded.append((clock.now() - start, house.sim.commanded_w(), agent.deferred))
        finally:
            agent.pool.close()
            agent.outbox.close()
        battery = agent.pollers[0].facade
    assert isinstance(battery, MapBattery)
    assert [(t, w) for t, w, _ in commanded] == [
        (5.0, -1500.0),
        (10.0, -1500.0),
        (15.0, -1500.0),
        (20.0, -1500.0),
        (25.0, -1500.0),
        (30.0, -1500.0),
        (35.0, -3000.0),  # 30 s after the first write
        (40.0, -3000.0),
        (45.0, -3000.0),
        (50.0, -3000.0),
    ]
    assert [d for t, _, d in commanded if 15.0 <= t < 35.0] == [["hybrid"]] * 4
    assert commanded[-1][2] == []
    assert battery.writes == 2


async def test_a_dispatch_held_back_by_the_minimum_write_interval_is_acknowledged_so(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    # The site file stretches the GoodWe's minimum write interval to 10 minutes: the fallback
    # controller's first write at start-up holds the device's setpoint that long.
    clock = ScaledClock(NOON_TS, 10.0)
    async with map_site(clock, "goodwe_et") as house, observer(broker_files) as obs:
        config = map_config(house, broker_files.port, tmp_path / "spool.sqlite", "goodwe_et")
        devices = [d.model_copy(update={"min_write_interval_s": 600.0}) for d in config.devices]
        config = config.model_copy(update={"devices": devices})
        async with EdgeAgent(config, clock, password=_password(broker_files)) as agent:
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 2)
            now = clock.now()
            order = Dispatch(ts=now, battery_power_w=-3000.0, expires_ts=now + 600)
            ack = await _dispatch(obs, order.model_dump_json())
            commanded = house.sim.commanded_w()
            battery = agent.pollers[0].facade
    assert isinstance(battery, MapBattery)
    assert ack.outcome == "accepted"  # it will be written, not clamped
    assert "minimum write interval of hybrid" in ack.detail
    assert ack.applied_battery_power_w == commanded != -3000.0  # the fallback's, for now
    assert battery.writes == 1
