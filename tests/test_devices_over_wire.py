"""Every simulator read by our drivers over real Modbus TCP and RTU, and checked by pysunspec2."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import sunspec2.modbus.client as sunspec_client

from broker.clock import ManualClock
from drivers.devices import Battery, Inverter, RegisterMapMeter, SunSpecMeter
from drivers.errors import ModbusException, SetpointRejected
from drivers.regmap import load_builtin_map
from drivers.sunspec.discovery import discover
from drivers.transport import ModbusTransport
from simulators.devices import (
    BatterySim,
    PvInverterSim,
    Sdm630MeterSim,
    SimSite,
    SimulatedDevice,
    SunSpecMeterSim,
)
from simulators.server import DeviceServer, SerialPair

WIRES = ["tcp", "rtu"]


@asynccontextmanager
async def served(device: SimulatedDevice, wire: str) -> AsyncIterator[str]:
    """Serve one device over ``wire``; yield the URL a client connects to."""
    if wire == "tcp":
        async with DeviceServer([device], tcp=("127.0.0.1", 0)) as server:
            yield server.url
    else:
        async with SerialPair() as pair, DeviceServer([device], serial_port=pair.server_end):
            yield f"rtu://{pair.client_end}?baud=9600"


def _pysunspec_scan(url: str, unit: int) -> sunspec_client.SunSpecModbusClientDevice:
    """Scan with the SunSpec Alliance's own client (synchronous: run in a thread)."""
    if url.startswith("tcp://"):
        host, port = url.removeprefix("tcp://").split(":")
        device = sunspec_client.SunSpecModbusClientDeviceTCP(
            slave_id=unit, ipaddr=host, ipport=int(port), timeout=2
        )
    else:
        path = url.removeprefix("rtu://").split("?")[0]
        device = sunspec_client.SunSpecModbusClientDeviceRTU(
            slave_id=unit, name=path, baudrate=9600, timeout=2
        )
    try:
        device.scan()
    finally:
        device.close()
    return device


def _step(point: object) -> float:
    """One scale-factor step of a pysunspec2 point (1 when it has no scale factor)."""
    sf = getattr(point, "sf_value", None)
    return 10.0**sf if isinstance(sf, int) else 1.0


@pytest.mark.parametrize("wire", WIRES)
async def test_inverter_reads_match_pysunspec2(site: SimSite, wire: str) -> None:
    pv = PvInverterSim("pv", 1, site, rated_ac_w=6000, seed=3)
    async with served(pv, wire) as url:
        async with ModbusTransport.from_url(url) as transport:
            inverter = await Inverter.connect(transport, 1)
            ours = await inverter.read()
            transport.close()  # a serial line has one master at a time
            theirs = await asyncio.to_thread(_pysunspec_scan, url, 1)
    assert inverter.map.model_ids == [1, 103, 120, 123]
    assert inverter.info.manufacturer == theirs.common[0].Mn.value == "wattmesh"
    model = theirs.models[103][0]
    assert ours.ac_power_w is not None and ours.ac_power_w > 1000  # midsummer noon
    assert ours.ac_power_w == pytest.approx(model.W.cvalue, abs=_step(model.W))
    assert ours.rated_power_w == pytest.approx(theirs.models[120][0].WRtg.cvalue)
    assert ours.frequency_hz == pytest.approx(model.Hz.cvalue, abs=_step(model.Hz))
    assert ours.status == "mppt" and model.St.value == 4
    # A lifetime yield, never 0 (which SunSpec reads as "not implemented").
    assert ours.energy_wh == pytest.approx(model.WH.cvalue) and ours.energy_wh > 6000


@pytest.mark.parametrize("wire", WIRES)
async def test_battery_reads_match_pysunspec2(site: SimSite, wire: str) -> None:
    sim = BatterySim("bat", 1, site, capacity_wh=13_500, rated_power_w=5000, soc_pct=42.0)
    async with served(sim, wire) as url:
        async with ModbusTransport.from_url(url) as transport:
            battery = await Battery.connect(transport, 1)
            ours = await battery.read()
            transport.close()  # a serial line has one master at a time
            theirs = await asyncio.to_thread(_pysunspec_scan, url, 1)
    base = theirs.models[802][0]
    assert ours.soc_pct == pytest.approx(base.SoC.cvalue, abs=_step(base.SoC)) == 42.0
    assert ours.capacity_wh == pytest.approx(base.WHRtg.cvalue, abs=_step(base.WHRtg))
    assert ours.rated_charge_w == pytest.approx(base.WChaRteMax.cvalue) == 5000
    assert ours.soc_min_pct == pytest.approx(base.SoCMin.cvalue) == 5.0
    assert ours.setpoint_w == 0.0 and ours.charge_status == "holding"


@pytest.mark.parametrize("wire", WIRES)
async def test_site_meter_reads_match_pysunspec2_and_the_site_balance(
    site: SimSite, wire: str
) -> None:
    pv = PvInverterSim("pv", 1, site, rated_ac_w=6000)
    sim = SunSpecMeterSim("meter", 2, site, max_power_w=20_000)
    async with served(sim, wire) as url:
        async with ModbusTransport.from_url(url) as transport:
            meter = await SunSpecMeter.connect(transport, 2)
            ours = await meter.read()
            transport.close()  # a serial line has one master at a time
            theirs = await asyncio.to_thread(_pysunspec_scan, url, 2)
    model = theirs.models[203][0]
    assert ours.power_w == pytest.approx(model.W.cvalue, abs=_step(model.W))
    # The meter sees load - PV at the same instant: noon PV exceeds the household load.
    assert ours.power_w == pytest.approx(site.load_w - pv.ac_power_w, abs=_step(model.W))
    assert ours.power_w < 0
    assert ours.import_energy_wh == pytest.approx(model.TotWhImp.cvalue)
    assert ours.import_energy_wh > 0  # a lifetime count: 0 would read as "not implemented"
    assert all(v is not None and 220 < v < 240 for v in ours.voltage_phase_v)


@pytest.mark.parametrize("wire", WIRES)
async def test_sdm630_meter_reads_the_site_balance(
    site: SimSite, clock: ManualClock, wire: str
) -> None:
    sim = Sdm630MeterSim("sdm", 7, site)
    async with served(sim, wire) as url, ModbusTransport.from_url(url) as transport:
        meter = RegisterMapMeter(transport, 7, load_builtin_map("sdm630"))
        first = await meter.read()
        load_then_w = site.load_w
        clock.advance(3600)
        second = await meter.read()
        await meter.write("demand_period_s", 1800.0)
        with pytest.raises(SetpointRejected, match="not writable"):
            await meter.write("power_total_w", 1.0)
    assert first.power_w == pytest.approx(load_then_w, rel=1e-6)
    assert second.power_w == pytest.approx(site.load_w, rel=1e-6)  # no PV: all imported
    assert first.import_energy_wh == 0.0
    assert second.import_energy_wh == pytest.approx(first.power_w * 1.0, rel=1e-6)  # 1 h
    assert first.frequency_hz == 50.0
    assert len(meter.blocks) == 1  # every point in one request of at most 125 registers


async def test_battery_setpoint_moves_soc_the_right_way_at_the_right_rate(
    site: SimSite, clock: ManualClock
) -> None:
    sim = BatterySim("bat", 1, site, capacity_wh=10_000, rated_power_w=5000, soc_pct=50.0)
    async with served(sim, "tcp") as url, ModbusTransport.from_url(url) as transport:
        battery = await Battery.connect(transport, 1)
        assert await battery.set_power_w(-2000) == -2000  # charge 2 kW
        clock.advance(1800)
        charged = await battery.read()
        assert await battery.set_power_w(3000) == 3000  # discharge 3 kW
        clock.advance(3600)
        discharged = await battery.read()
    # 2 kW for 0.5 h at 95 % into 10 kWh: +9.5 points.
    assert charged.soc_pct == pytest.approx(59.5, abs=0.1)
    assert charged.power_w == -2000 and charged.charge_status == "charging"
    # 3 kW for 1 h drawing 3/0.95 kWh: -31.58 points.
    assert discharged.soc_pct == pytest.approx(59.5 - 3000 / 0.95 / 100, abs=0.1)
    assert discharged.power_w == 3000 and discharged.charge_status == "discharging"


async def test_battery_returns_to_idle_when_its_revert_timeout_lapses(
    site: SimSite, clock: ManualClock
) -> None:
    sim = BatterySim("bat", 1, site, capacity_wh=10_000, rated_power_w=5000)
    async with served(sim, "tcp") as url, ModbusTransport.from_url(url) as transport:
        battery = await Battery.connect(transport, 1)
        await battery.set_power_w(1000, revert_timeout_s=300)
        clock.advance(200)
        held = await battery.read()
        clock.advance(200)
        lapsed = await battery.read()
    assert held.setpoint_w == 1000 and held.power_w == 1000
    assert lapsed.setpoint_w == 0 and lapsed.power_w == 0


@pytest.mark.parametrize(
    ("soc_pct", "power_w", "message"),
    [
        (50.0, 6000.0, "exceeds the rated discharge power"),
        (50.0, -5001.0, "exceeds the rated charge power"),
        (5.0, 1000.0, "at its minimum"),
        (100.0, -1000.0, "at its maximum"),
        (50.0, math.nan, "not a number"),
    ],
)
async def test_setpoints_beyond_the_device_limits_are_refused_and_nothing_is_written(
    site: SimSite, soc_pct: float, power_w: float, message: str
) -> None:
    sim = BatterySim("bat", 1, site, capacity_wh=10_000, rated_power_w=5000, soc_pct=soc_pct)
    async with served(sim, "tcp") as url, ModbusTransport.from_url(url) as transport:
        battery = await Battery.connect(transport, 1)
        with pytest.raises(SetpointRejected, match=message):
            await battery.set_power_w(power_w)
        after = await battery.read()
    assert sim.writes == 0
    assert after.setpoint_w == 0


async def test_the_simulator_refuses_bad_raw_writes_with_exception_responses(
    site: SimSite,
) -> None:
    sim = BatterySim("bat", 1, site, capacity_wh=10_000, rated_power_w=5000)
    async with served(sim, "tcp") as url, ModbusTransport.from_url(url) as transport:
        smap = await discover(transport, 1)
        storage = smap.find(124)
        assert storage is not None
        with pytest.raises(ModbusException) as read_only:
            await transport.write_registers(1, storage.address + 8, [100])  # ChaState
        with pytest.raises(ModbusException) as out_of_range:
            await transport.write_registers(1, storage.address + 12, [15000])  # OutWRte 150 %
        battery = await Battery.connect(transport, 1)
        after = await battery.read()
    assert read_only.value.code == 2
    assert out_of_range.value.code == 3
    assert after.setpoint_w == 0 and after.soc_pct == 50.0


async def test_inverter_curtailment_limits_output_and_can_be_lifted(
    site: SimSite, clock: ManualClock
) -> None:
    sim = PvInverterSim("pv", 1, site, rated_ac_w=6000)
    async with served(sim, "tcp") as url, ModbusTransport.from_url(url) as transport:
        inverter = await Inverter.connect(transport, 1)
        free = await inverter.read()
        await inverter.set_curtailment_w(1500)
        clock.advance(5)
        limited = await inverter.read()
        with pytest.raises(SetpointRejected, match="outside"):
            await inverter.set_curtailment_w(7000)
        await inverter.set_curtailment_w(None)
        clock.advance(5)
        lifted = await inverter.read()
    assert free.ac_power_w is not None and free.ac_power_w > 1500
    assert limited.ac_power_w == pytest.approx(1500, abs=1) and limited.status == "throttled"
    assert limited.curtail_limit_w == pytest.approx(1500, abs=6)
    assert lifted.curtail_limit_w is None and lifted.ac_power_w > 1500  # type: ignore[operator]
