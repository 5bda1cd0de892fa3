"""Every register map against its software twin (simulators.mapped) over real Modbus.

``wattmesh scan --map NAME`` reads every map's twin over TCP, one meter map over RTU on a
socat pair; each map that documents battery control drives its twin's battery through the
same facade interface as SunSpec 124/802: limit checks, read-back and the device's own
revert timeout.
"""

from __future__ import annotations

import asyncio
import json
import math
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.clock import ManualClock
from drivers.devices import Battery, BatteryDevice, MapBattery, RegisterMapMeter
from drivers.errors import SetpointRejected
from drivers.regmap import builtin_map_names, load_builtin_map
from drivers.transport import BusPool, ModbusTransport
from drivers.writeguard import WritePolicy
from simulators.devices import SimSite
from simulators.mapped import MapDeviceSim
from simulators.scenario import ScenarioError, ScenarioRunner, load_scenario, parse_scenario
from simulators.server import DeviceServer, SerialPair
from wattmesh.cli import app
from wattmesh.scan import scan_device

BATTERY_MAPS = ["huawei_sun2000", "sungrow_sh", "victron_gx", "goodwe_et"]


@asynccontextmanager
async def twin(
    site: SimSite, name: str, **kwargs: float
) -> AsyncIterator[tuple[MapDeviceSim, str]]:
    """A map's twin served over TCP on loopback: (simulator, URL)."""
    sim = MapDeviceSim(name, site, load_builtin_map(name), **kwargs)
    async with DeviceServer(sim.devices, tcp=("127.0.0.1", 0)) as server:
        yield sim, server.url


def scan_cli(*args: str) -> dict[str, object]:
    """``wattmesh scan ... --json`` in this process (run it in a thread: it has its own loop)."""
    result = CliRunner().invoke(app, ["scan", *args, "--json"])
    assert result.exit_code == 0, result.output
    parsed: dict[str, object] = json.loads(result.output)
    return parsed


@pytest.mark.parametrize("name", builtin_map_names())
async def test_every_map_scans_against_its_twin_over_tcp(site: SimSite, name: str) -> None:
    async with twin(site, name) as (sim, url):
        result = await asyncio.to_thread(scan_cli, url, "--map", name)
        regmap = sim.regmap
        values = result["values"][name]  # type: ignore[index]
        assert set(values) == {p.name for p in regmap.points}
        for p in regmap.points:
            got = values[p.name]["value"]
            assert got is not None, p.name
            assert got == pytest.approx(sim.get(p.name), rel=1e-6, abs=abs(p.scale)), p.name
            assert values[p.name]["units"] == p.unit
            if p.unit == "Wh":
                assert got > 0, f"{p.name}: an accumulator at 0 reads as not counted"
    assert result["unit"] == (regmap.unit_id or 1)


async def test_a_meter_map_scans_over_rtu_on_socat(
    site: SimSite, clock: ManualClock, serial_pair: SerialPair
) -> None:
    sim = MapDeviceSim("meter", site, load_builtin_map("eastron_sdm72d"))
    async with DeviceServer(sim.devices, serial_port=serial_pair.server_end):
        url = f"rtu://{serial_pair.client_end}?baud=9600"
        result = await asyncio.to_thread(scan_cli, url, "--map", "eastron_sdm72d", "--timeout", "2")
        values = result["values"]["eastron_sdm72d"]  # type: ignore[index]
        async with ModbusTransport.from_url(url, timeout_s=2.0) as transport:
            meter = RegisterMapMeter(transport, 1, sim.regmap)
            first = await meter.read()
            load_then_w = site.load_w
            clock.advance(3600)
            second = await meter.read()
    assert values["power_total_w"]["value"] == pytest.approx(load_then_w, rel=1e-5)
    assert first.power_w == pytest.approx(load_then_w, rel=1e-5)  # no PV, no battery here
    assert first.power_w == pytest.approx(first.power_phase_w[0] * 3, rel=1e-5)  # type: ignore[operator]
    assert first.voltage_phase_v[0] is not None and 220 < first.voltage_phase_v[0] < 240
    assert first.frequency_hz == 50.0
    # An hour at the first reading's import adds that much energy (float32: ~0.1 Wh steps).
    assert second.import_energy_wh - first.import_energy_wh == pytest.approx(  # type: ignore[operator]
        first.power_w, rel=1e-3
    )
    assert [(b.address, b.count) for b in meter.blocks] == [(0, 76)]  # at most 80 per request


async def test_a_hybrid_twin_s_own_meter_sees_its_battery(
    site: SimSite, clock: ManualClock
) -> None:
    async with twin(site, "huawei_sun2000", pv_peak_w=1.0) as (sim, url):
        async with ModbusTransport.from_url(url) as transport:
            battery = MapBattery(transport, 1, sim.regmap)
            meter = RegisterMapMeter(transport, 1, sim.regmap)
            before = await meter.read()
            await battery.set_power_w(2000)
            clock.advance(5)
            after = await meter.read()
    assert before.power_w is not None and after.power_w is not None
    assert before.power_w - after.power_w == pytest.approx(2000 + sim.pv_w - 0.0, abs=2.0)


async def hold(battery: MapBattery, clock: ManualClock, power_w: float, seconds: int) -> None:
    """Hold ``power_w`` through the write path, polling every 30 s for ``seconds``."""
    for _ in range(seconds // 30):
        clock.advance(30)
        await battery.hold_power_w(power_w, clock.now())
        await battery.read()


@pytest.mark.parametrize("name", BATTERY_MAPS)
async def test_battery_control_through_the_facade_moves_the_twin_s_soc(
    site: SimSite, clock: ManualClock, name: str
) -> None:
    async with twin(site, name, soc_pct=50.0) as (sim, url):
        async with ModbusTransport.from_url(url) as transport:
            battery = MapBattery(transport, sim.unit_id, sim.regmap)
            idle = await battery.read()
            assert await battery.set_power_w(-2000) == pytest.approx(-2000, abs=1)
            await hold(battery, clock, -2000, 1800)
            charged = await battery.read()
            assert await battery.set_power_w(1500) == pytest.approx(1500, abs=1)
            await hold(battery, clock, 1500, 1800)
            discharged = await battery.read()
            writes = sim.writes
            with pytest.raises(SetpointRejected, match="exceeds the rated discharge power"):
                await battery.set_power_w(50_000)
            assert sim.writes == writes  # refused before anything was written
            assert await battery.set_power_w(0) == 0
            stopped = await battery.read()
    capacity = sim.capacity_wh
    assert sim.regmap.battery is not None
    resolution = sim.regmap.point(sim.regmap.battery.soc_pct).scale  # 1 % on some devices
    assert idle.soc_pct == pytest.approx(50.0, abs=0.1) and idle.power_w == 0
    # 2 kW for 0.5 h at 95 % charge efficiency, read at the register's resolution.
    expected = 50.0 + 2000 * 0.5 * 0.95 / capacity * 100
    assert charged.soc_pct == pytest.approx(expected, abs=resolution / 2 + 0.01)
    assert charged.power_w == pytest.approx(-2000, abs=1) and charged.charge_status == "charging"
    assert discharged.power_w == pytest.approx(1500, abs=1)
    assert discharged.soc_pct is not None and charged.soc_pct is not None
    assert discharged.soc_pct < charged.soc_pct
    assert stopped.power_w == 0 and stopped.setpoint_w == 0
    assert battery.writes == 3 + battery.held.writes  # three direct commands, the rest held


async def test_victron_drops_a_setpoint_after_60_s_unless_it_is_refreshed(
    site: SimSite, clock: ManualClock
) -> None:
    async with twin(site, "victron_gx") as (sim, url):
        async with ModbusTransport.from_url(url) as transport:
            battery = MapBattery(transport, 100, sim.regmap)
            assert battery.revert_timeout_for(0) == 60.0
            await battery.set_power_w(1000)
            clock.advance(61)
            lapsed = await battery.read()
            held = []
            for _ in range(120):  # ten minutes of 5 s polls through the write path
                await battery.hold_power_w(1000, clock.now())
                held.append((await battery.read()).power_w)
                clock.advance(5)
    assert lapsed.power_w == 0 and lapsed.setpoint_w == 0
    assert set(held) == {1000.0}
    assert battery.held.writes == 20  # every 30 s: half the Multi's 60 s timeout


async def test_huawei_writes_the_forcible_period_as_its_revert_timeout(
    site: SimSite, clock: ManualClock
) -> None:
    async with twin(site, "huawei_sun2000") as (sim, url):
        async with ModbusTransport.from_url(url) as transport:
            battery = MapBattery(transport, 1, sim.regmap)
            await battery.set_power_w(-1000, revert_timeout_s=120)
            period = sim.get("forcible_period_s")
            clock.advance(100)
            held = await battery.read()
            clock.advance(30)
            lapsed = await battery.read()
            await battery.set_power_w(1000)  # no timeout asked: the longest period
            longest = sim.get("forcible_period_s")
            with pytest.raises(SetpointRejected, match="exceeds the device's 86400 s"):
                battery._command(1000, 90_000)
    assert period == 120.0
    assert held.power_w == -1000 and lapsed.power_w == 0 and lapsed.setpoint_w == 0
    assert longest == 86400.0


@pytest.mark.parametrize("name", ["sungrow_sh", "goodwe_et"])
async def test_a_device_that_holds_setpoints_refuses_a_revert_timeout(
    site: SimSite, name: str
) -> None:
    async with twin(site, name) as (sim, url):
        async with ModbusTransport.from_url(url) as transport:
            battery = MapBattery(transport, sim.unit_id, sim.regmap)
            with pytest.raises(SetpointRejected, match="holds setpoints until told otherwise"):
                await battery.set_power_w(1000, revert_timeout_s=300)
    assert sim.writes == 0


async def test_sungrow_ignores_a_command_unless_forced_mode_is_set(
    site: SimSite, clock: ManualClock
) -> None:
    async with twin(site, "sungrow_sh") as (sim, url):
        async with ModbusTransport.from_url(url) as transport:
            battery = MapBattery(transport, 1, sim.regmap)
            await battery.set_power_w(1000)
            regmap = sim.regmap
            mode = regmap.point("ems_mode")
            await transport.write_registers(1, mode.address, [0])  # self-consumption
            clock.advance(5)
            own = await battery.read()
    assert own.power_w == 0 and sim.commanded_w() == 0


async def test_the_write_policy_comes_from_the_map(site: SimSite) -> None:
    async with twin(site, "goodwe_et") as (sim, url):
        async with ModbusTransport.from_url(url) as transport:
            battery = MapBattery(transport, 247, sim.regmap)
            own = MapBattery(transport, 247, sim.regmap, WritePolicy(deadband_w=5.0))
    assert battery.write_policy == WritePolicy(deadband_w=100.0, min_interval_s=30.0)
    assert own.write_policy.deadband_w == 5.0
    assert not math.isnan(sim.get("battery_soc_pct"))


def test_both_battery_facades_offer_the_same_interface() -> None:
    facades: list[type[BatteryDevice]] = [Battery, MapBattery]
    for facade in facades:
        for method in ("read", "set_power_w", "hold_power_w", "revert_timeout_for"):
            assert callable(getattr(facade, method))


VENDORS = Path(__file__).resolve().parent.parent / "simulators" / "scenarios" / "vendors.toml"


async def test_the_vendor_scenario_serves_a_twin_of_every_vendor_map(clock: ManualClock) -> None:
    config = load_scenario(VENDORS).with_free_ports()
    async with ScenarioRunner(config, clock) as runner:
        assert {d.kind for d in runner.devices} == {"map"}
        found = {}
        pool = BusPool(timeout_s=2.0)
        try:
            for running in runner.devices:
                sim = running.device
                assert isinstance(sim, MapDeviceSim)
                result = await scan_device(pool.get(running.url), running.unit, sim.regmap)
                found[sim.regmap.name] = result.values[sim.regmap.name]
        finally:
            pool.close()
    assert set(found) == {
        "huawei_sun2000",
        "sungrow_sh",
        "victron_gx",
        "goodwe_et",
        "eastron_sdm72d",
        "carlo_gavazzi_em24",
    }
    assert all(v is not None for values in found.values() for v, _ in values.values())
    assert found["victron_gx"]["vebus_switch_position"][0] == 3  # served under unit 227
    victron = found["victron_gx"]
    assert victron["vebus_soc_pct"][0] == pytest.approx(victron["battery_soc_pct"][0], abs=1)
    assert found["carlo_gavazzi_em24"]["frequency_hz"][0] == 50.0  # unit 2 on the shared line


def test_a_scenario_naming_an_unknown_map_is_refused() -> None:
    text = VENDORS.read_text().replace('map = "goodwe_et"', 'map = "goodwe_xx"')
    with pytest.raises(ScenarioError, match=r"sites\[3\]\.devices\[0\].*no built-in|goodwe_xx"):
        parse_scenario(tomllib.loads(text), "vendors.toml")
