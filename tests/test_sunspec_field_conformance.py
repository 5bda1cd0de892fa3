"""Every simulated SunSpec device, scanned by pysunspec2, conforms to the model definitions.

Each point's value must lie within what its model declares: an enum's value is one of its
symbols, a bitfield sets only declared bits, a point with a fixed value has it, a scale factor
lies within -10..10, and each model's announced length matches its definition.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from simulators.devices import BatterySim, PvInverterSim, SimSite, SunSpecDevice, SunSpecMeterSim
from simulators.server import DeviceServer
from tests.test_sunspec_field import pysunspec_scan


def violations(group: Any, path: str = "") -> list[str]:
    """What in a pysunspec2 group (and its subgroups) breaks its definition."""
    found: list[str] = []
    for name, point in group.points.items():
        pdef, value, where = point.pdef, point.value, f"{path}{name}"
        if value is None:
            continue
        symbols = {int(s["value"]) for s in pdef.get("symbols", ())}
        kind = pdef["type"]
        if kind.startswith("enum") and symbols and value not in symbols:
            found.append(f"{where}={value} is none of {sorted(symbols)}")
        if kind.startswith("bitfield") and symbols:
            mask = sum(1 << bit for bit in symbols)
            if value & ~mask:
                found.append(f"{where}={value:#x} sets bits outside {sorted(symbols)}")
        if "value" in pdef and isinstance(pdef["value"], int) and value != pdef["value"]:
            found.append(f"{where}={value}, its definition says {pdef['value']}")
        if kind == "sunssf" and not -10 <= value <= 10:
            found.append(f"{where}={value} is no scale factor")
    for name, sub in group.groups.items():
        for i, g in enumerate(sub if isinstance(sub, list) else [sub], start=1):
            found += violations(g, f"{path}{name}[{i}].")
    return found


def devices(site: SimSite) -> list[SunSpecDevice]:
    return [
        PvInverterSim("pv", 1, site, rated_ac_w=6000, seed=3),
        PvInverterSim("farm", 2, site, rated_ac_w=2_000_000),
        BatterySim("bat", 3, site, capacity_wh=13_500, rated_power_w=5000),
        SunSpecMeterSim("meter", 4, site, max_power_w=3e6),  # the farm feeds in too
    ]


async def test_pysunspec2_finds_every_point_of_every_simulator_within_its_definition(
    site: SimSite,
) -> None:
    sims = devices(site)
    async with DeviceServer(sims, tcp=("127.0.0.1", 0)) as server:
        scans = [await asyncio.to_thread(pysunspec_scan, server.url, d.unit_id) for d in sims]
    for sim, scan in zip(sims, scans, strict=True):
        assert scan.model_list, sim.name
        for model in scan.model_list:
            assert model.error_info == "", (sim.name, model.model_id, model.error_info)
            assert violations(model) == [], (sim.name, model.model_id)


@pytest.mark.parametrize(("unit", "model_id", "point"), [(1, 103, "WH"), (2, 103, "WH")])
async def test_accumulators_start_at_a_lifetime_value_not_at_not_implemented(
    site: SimSite, unit: int, model_id: int, point: str
) -> None:
    sims = devices(site)
    async with DeviceServer(sims, tcp=("127.0.0.1", 0)) as server:
        scan = await asyncio.to_thread(pysunspec_scan, server.url, unit)
    assert scan.models[model_id][0].points[point].cvalue > 0


async def test_meter_accumulators_and_battery_state_read_as_a_running_device(
    site: SimSite,
) -> None:
    sims = devices(site)
    async with DeviceServer(sims, tcp=("127.0.0.1", 0)) as server:
        battery = await asyncio.to_thread(pysunspec_scan, server.url, 3)
        meter = await asyncio.to_thread(pysunspec_scan, server.url, 4)
    assert battery.models[802][0].State.value == 3  # CONNECTED, not INITIALIZING
    assert meter.models[203][0].TotWhImp.cvalue > 0
    assert meter.models[203][0].TotWhExp.cvalue > 0
