"""The facades on SunSpec devices as found in the field (built by pysunspec2, served over TCP).

A PV-only inverter that announces an empty storage model 124 is no battery; model 123's
factory default (limit enabled at 0 %) is no 0 W curtailment.
"""

from __future__ import annotations

from typing import Any

import pytest

from broker.clock import ManualClock
from drivers.devices import Battery, Inverter
from drivers.errors import SunSpecError
from drivers.transport import ModbusTransport
from simulators.devices import PvInverterSim, SimSite
from simulators.server import DeviceServer
from simulators.sunspec_field import FieldDevice, FieldModel, FieldServer, sample_data


def inverter_models(controls: dict[str, Any], storage: dict[str, Any] | None) -> list[FieldModel]:
    """Models 1, 103, 120 (WRtg 5000 W), 123 with ``controls`` and, unless None, 124."""
    nameplate = {**sample_data(120), "WRtg": 5000, "WRtg_SF": 0}
    models = [
        FieldModel(1, sample_data(1)),
        FieldModel(103, sample_data(103)),
        FieldModel(120, nameplate),
        FieldModel(123, {**sample_data(123), **controls}),
    ]
    if storage is not None:
        models.append(FieldModel(124, storage))
    return models


async def read_inverter(models: list[FieldModel]) -> float | None:
    async with FieldServer([FieldDevice(models)]) as server:
        async with ModbusTransport.from_url(server.url, timeout_s=0.5) as transport:
            inverter = await Inverter.connect(transport, 1)
            return (await inverter.read()).curtail_limit_w


async def test_model_123_factory_default_enabled_at_0_pct_reads_as_no_limit() -> None:
    controls = {"WMaxLim_Ena": 1, "WMaxLimPct": 0, "WMaxLimPct_SF": -1}
    assert await read_inverter(inverter_models(controls, None)) is None


async def test_model_123_enabled_limit_above_0_pct_reads_in_watts() -> None:
    controls = {"WMaxLim_Ena": 1, "WMaxLimPct": 500, "WMaxLimPct_SF": -1}  # 50.0 %
    assert await read_inverter(inverter_models(controls, None)) == pytest.approx(2500.0)


async def test_model_123_disabled_limit_reads_as_no_limit() -> None:
    controls = {"WMaxLim_Ena": 0, "WMaxLimPct": 500, "WMaxLimPct_SF": -1}
    assert await read_inverter(inverter_models(controls, None)) is None


@pytest.mark.parametrize(
    "storage", [{}, {"WChaMax": 0, "WChaMax_SF": 0}], ids=["unimplemented", "zero"]
)
async def test_battery_refuses_a_pv_inverter_whose_model_124_is_empty(
    storage: dict[str, Any],
) -> None:
    device = FieldDevice(inverter_models({"WMaxLim_Ena": 0}, storage))
    async with FieldServer([device]) as server:
        async with ModbusTransport.from_url(server.url, timeout_s=0.5) as transport:
            with pytest.raises(SunSpecError, match="model 124 at 40[0-9]+ is empty"):
                await Battery.connect(transport, 1)


async def test_battery_refuses_a_device_without_model_124() -> None:
    device = FieldDevice(inverter_models({"WMaxLim_Ena": 0}, None))
    async with FieldServer([device]) as server:
        async with ModbusTransport.from_url(server.url, timeout_s=0.5) as transport:
            with pytest.raises(SunSpecError, match="no storage model 124"):
                await Battery.connect(transport, 1)


async def test_battery_accepts_a_model_124_with_a_charge_rate() -> None:
    storage = {**sample_data(124), "WChaMax": 5000, "WChaMax_SF": 0}
    device = FieldDevice(
        [*inverter_models({"WMaxLim_Ena": 0}, storage), FieldModel(802, sample_data(802))]
    )
    async with FieldServer([device]) as server:
        async with ModbusTransport.from_url(server.url, timeout_s=0.5) as transport:
            battery = await Battery.connect(transport, 1)
            assert battery.map.find(124) is not None


async def test_a_0_w_curtailment_written_by_the_facade_reads_back_as_0_w(
    site: SimSite, clock: ManualClock
) -> None:
    sim = PvInverterSim("pv", 1, site, rated_ac_w=6000)
    async with DeviceServer([sim], tcp=("127.0.0.1", 0)) as server:
        async with ModbusTransport.from_url(server.url) as transport:
            inverter = await Inverter.connect(transport, 1)
            await inverter.set_curtailment_w(0.0)
            clock.advance(5)
            stopped = await inverter.read()
            await inverter.set_curtailment_w(None)
            lifted = await inverter.read()
    assert stopped.curtail_limit_w == 0.0 and stopped.ac_power_w == 0
    assert lifted.curtail_limit_w is None
