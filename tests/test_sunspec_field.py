"""SunSpec as found in the field: our scan and drivers against pysunspec2 on the same server.

Devices are built with pysunspec2's own model code (``sunspec2.device.Model``) from the
SunSpec Alliance's definitions, served by pymodbus over TCP on loopback, and misbehave as
real devices do: refused registers inside models, busy answers, gateway exceptions, silence
at 40000. Two devices carry pysunspec2's own test device files (an IEEE 1547 DER with models
701-713, and an inverter with model 129's curves: ``sunspec2/tests/test_data/device_1547.json``
and ``inverter_123.json``, shipped with pysunspec2 1.3.7). Register dumps of real inverters
(SMA Sunny Boy 3.6, FIMER PVS) are tested the same way in tests/test_sunspec_dumps.py.
"""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from typing import Any

import pytest
import sunspec2.modbus.client as sunspec_client

from drivers.devices import Inverter
from drivers.errors import DeviceUnavailable, ModbusException
from drivers.sunspec.discovery import discover
from drivers.sunspec.models import model_def, model_layout
from drivers.transport import ModbusTransport
from simulators.sunspec_field import FieldDevice, FieldModel, FieldServer, sample_data
from wattmesh.scan import ScanResult, scan_device

VENDOR_WORDS = [0x1234, 0xFFFF, 0, 7, 0xBEEF]


def field_models() -> list[FieldModel]:
    """Models 1 (L=65), 103, 120-124, 160 (3 modules), 304, 701 (>125 registers), 705 (two
    curves of four points), 802, two 203 meters and a vendor model without a definition."""
    return [
        FieldModel(1, sample_data(1), drop_last=1),
        FieldModel(103, sample_data(103)),
        *(FieldModel(m, sample_data(m)) for m in (120, 121, 122, 123, 124)),
        FieldModel(160, sample_data(160, {"module": 3, "N": 3})),
        FieldModel(304, sample_data(304, {"incl": 2})),
        FieldModel(701, sample_data(701)),
        FieldModel(705, sample_data(705, {"NCrv": 2, "Crv": 2, "NPt": 4, "Pt": 4})),
        FieldModel(802, sample_data(802)),
        FieldModel(203, sample_data(203, seed=1)),
        FieldModel(203, sample_data(203, seed=2)),
        FieldModel(64900, raw=VENDOR_WORDS),
    ]


def pysunspec_scan(url: str, unit: int = 1, timeout_s: float = 2.0) -> Any:
    """Scan with the SunSpec Alliance's own client (synchronous: run in a thread)."""
    host, port = url.removeprefix("tcp://").split(":")
    device = sunspec_client.SunSpecModbusClientDeviceTCP(
        slave_id=unit, ipaddr=host, ipport=int(port), timeout=timeout_s
    )
    try:
        device.scan()
    finally:
        device.close()
    return device


def flatten(group: Any, prefix: str = "") -> dict[str, Any]:
    """pysunspec2's computed values by our point paths ('module[2].DCA', 'Crv[1].Pt[3].V')."""
    out: dict[str, Any] = {}
    for name, point in group.points.items():
        if (not prefix and name in ("ID", "L")) or point.pdef["type"] in ("sunssf", "pad"):
            continue
        out[prefix + name] = point.cvalue
    for name, sub in group.groups.items():
        if isinstance(sub, list):
            for i, g in enumerate(sub, start=1):
                out.update(flatten(g, f"{prefix}{name}[{i}]."))
        else:
            out.update(flatten(sub, f"{prefix}{name}."))
    return out


def theirs_by_block(device: Any) -> dict[str, dict[str, Any]]:
    """pysunspec2's models keyed as our scan keys its blocks."""
    out: dict[str, dict[str, Any]] = {}
    for model_id, instances in device.models.items():
        if not isinstance(model_id, int):
            continue
        for n, model in enumerate(instances, start=1):
            if model.model_def is None:
                continue
            name = model_def(model_id).name
            out[f"{model_id} {name}" + (f" #{n}" if n > 1 else "")] = flatten(model)
    return out


async def scan_both(device: FieldDevice) -> tuple[ScanResult, Any]:
    async with FieldServer([device]) as server:
        async with ModbusTransport.from_url(server.url, timeout_s=0.5, retries=1) as transport:
            ours = await scan_device(transport, device.unit_id)
        theirs = await asyncio.to_thread(pysunspec_scan, server.url, device.unit_id)
    return ours, theirs


async def test_scan_finds_the_models_and_values_pysunspec2_finds() -> None:
    ours, theirs = await scan_both(FieldDevice(field_models()))
    chain = [m.id for m in ours.models]
    assert chain == [1, 103, 120, 121, 122, 123, 124, 160, 304, 701, 705, 802, 203, 203, 64900]
    # pysunspec2 keeps a model without a definition by its id only, out of its model list.
    assert chain[:-1] == [m.model_id for m in theirs.model_list]
    assert theirs.models[64900][0].model_len == len(VENDOR_WORDS)
    expected = theirs_by_block(theirs)
    ours_values = {b: {n: v for n, (v, _) in vals.items()} for b, vals in ours.values.items()}
    for block, values in expected.items():
        assert ours_values[block] == values, block
    # The things the old scan lost or crashed on:
    assert ours.models[9].length > 125  # 701 spans several requests
    assert ours_values["160 mppt"]["module[3].DCA"] == expected["160 mppt"]["module[3].DCA"]
    assert "incl[2].Inclz" in ours_values["304 inclinometer"]
    assert "Crv[2].Pt[4].Var" in ours_values["705 DERVoltVar"]
    assert ours_values["203 ac_meter_abcn"] != ours_values["203 ac_meter_abcn #2"]
    assert ours.models[0].length == 65 and "Pad" not in ours_values["1 common"]
    assert ours.raw["64900 vendor"] == VENDOR_WORDS
    assert not ours.missing


@pytest.mark.parametrize("device_file", ["device_1547.json", "inverter_123.json"])
async def test_pysunspec2s_own_test_devices_scan_the_same(device_file: str) -> None:
    text = (resources.files("sunspec2") / "tests" / "test_data" / device_file).read_text()
    models = [
        FieldModel(m["ID"], {k: v for k, v in m.items() if k not in ("ID", "L")})
        for m in json.loads(text)["models"]
        if m["ID"] != 0xFFFF
    ]
    ours, theirs = await scan_both(FieldDevice(models))
    assert [m.id for m in ours.models] == [m.model_id for m in theirs.model_list]
    ours_values = {b: {n: v for n, (v, _) in vals.items()} for b, vals in ours.values.items()}
    for block, values in theirs_by_block(theirs).items():
        assert ours_values[block] == values, block


async def test_refused_registers_are_reported_missing_and_the_rest_still_read() -> None:
    clean = FieldDevice(field_models())
    faulty = FieldDevice(field_models(), unit_id=2)
    evt1 = faulty.address_of(103) + model_def(103).point("Evt1").offset
    mppt = faulty.address_of(160)
    module2_dcv = mppt + model_layout(model_def(160), 48).get("module[2].DCV").point.offset
    vendor = faulty.address_of(64900) + 2 + 1
    faulty.refuse({evt1, module2_dcv, vendor})
    async with FieldServer([clean, faulty]) as server:
        async with ModbusTransport.from_url(server.url) as transport:
            reference = await scan_device(transport, 1)
            ours = await scan_device(transport, 2)
    assert set(ours.missing) == {"103 inverter_three_phase", "160 mppt", "64900 vendor"}
    assert ours.missing["103 inverter_three_phase"] == {
        "Evt1": "not read: the device refused its registers"
    }
    assert list(ours.missing["160 mppt"]) == ["module[2].DCV"]
    assert ours.raw["64900 vendor"] == [VENDOR_WORDS[0], None, *VENDOR_WORDS[2:]]
    for block, values in reference.values.items():
        for name, value in values.items():
            if name not in ours.missing.get(block, {}) and block != "64900 vendor":
                assert ours.values[block][name] == value, (block, name)
    assert ours.values["103 inverter_three_phase"]["Evt1"][0] is None


async def test_an_inverter_poll_survives_a_refused_register_and_later_polls_skip_it() -> None:
    models = [FieldModel(m, sample_data(m)) for m in (1, 103, 120, 123)]
    device = FieldDevice(models)
    inverter_at = device.address_of(103)
    # TmpCab lies between the points an inverter poll reads: the merged read touches it.
    device.refuse({inverter_at + model_def(103).point("TmpCab").offset})
    async with FieldServer([device]) as server:
        async with ModbusTransport.from_url(server.url) as transport:
            inverter = await Inverter.connect(transport, 1)
            first = await inverter.read()
            refusals = device.refusals
            requests = device.requests
            second = await inverter.read()
            blocks = inverter._reader.blocks
    assert first == second
    assert first.ac_power_w is not None and first.status is not None
    assert device.refusals == refusals  # the refused register is no longer asked for
    # One read per model now, and the inverter model's read split around the refused register.
    assert device.requests - requests == len(blocks) <= 3 + 2


async def test_a_refused_wanted_point_is_missing_with_its_reason_not_a_failed_poll() -> None:
    models = [FieldModel(m, sample_data(m)) for m in (1, 103, 120, 123)]
    device = FieldDevice(models)
    device.refuse({device.address_of(103) + model_def(103).point("Hz").offset})
    async with FieldServer([device]) as server:
        async with ModbusTransport.from_url(server.url) as transport:
            inverter = await Inverter.connect(transport, 1)
            reading = await inverter.read()
    assert reading.frequency_hz is None and reading.ac_power_w is not None
    assert inverter.missing == {"103.Hz": "not read: the device refused its registers"}


async def test_points_beyond_a_short_model_are_missing_not_misread() -> None:
    models = [FieldModel(1, sample_data(1)), FieldModel(103, sample_data(103), drop_last=14)]
    async with FieldServer([FieldDevice(models)]) as server:
        async with ModbusTransport.from_url(server.url) as transport:
            inverter = await Inverter.connect(transport, 1)
            reading = await inverter.read()
    assert reading.status is None and reading.ac_power_w is not None
    assert inverter.missing == {"103.St": "beyond the model's announced length L=36"}


async def test_busy_answers_are_retried() -> None:
    device = FieldDevice([FieldModel(1, sample_data(1))], busy_answers=2)
    async with FieldServer([device]) as server:
        async with ModbusTransport.from_url(server.url, retries=2, backoff_s=0.01) as transport:
            smap = await discover(transport, 1)
    assert smap.model_ids == [1]


async def test_a_device_that_stays_busy_says_so() -> None:
    device = FieldDevice([FieldModel(1, sample_data(1))], busy_answers=10)
    async with FieldServer([device]) as server:
        async with ModbusTransport.from_url(server.url, retries=1, backoff_s=0.01) as transport:
            with pytest.raises(ModbusException, match="busy.*still busy after 2 attempt"):
                await transport.read_registers(1, 40000, 2)


async def test_gateway_exceptions_are_retried_then_mean_unavailable_not_no_sunspec() -> None:
    flaky = FieldDevice([FieldModel(1, sample_data(1))], gateway_answers=1)
    dead = FieldDevice([FieldModel(1, sample_data(1))], unit_id=2, gateway_answers=1000)
    async with FieldServer([flaky, dead]) as server:
        async with ModbusTransport.from_url(server.url, retries=1, backoff_s=0.01) as transport:
            assert (await discover(transport, 1)).model_ids == [1]
            with pytest.raises(DeviceUnavailable, match="gateway could not reach the device"):
                await discover(transport, 2)


async def test_discovery_goes_on_to_50000_when_40000_stays_silent() -> None:
    device = FieldDevice(
        [FieldModel(1, sample_data(1)), FieldModel(103, sample_data(103))],
        base_address=50000,
        silent_at={40000},
    )
    async with FieldServer([device]) as server:
        async with ModbusTransport.from_url(server.url, timeout_s=0.3, retries=0) as transport:
            smap = await discover(transport, 1)
        theirs = await asyncio.to_thread(pysunspec_scan, server.url, 1, 0.3)
    assert smap.base_address == theirs.base_addr == 50000
    assert smap.model_ids == [1, 103]


async def test_a_silent_device_names_the_timeout_option() -> None:
    device = FieldDevice([FieldModel(1, sample_data(1))], silent_at={40000})
    async with FieldServer([device]) as server:
        async with ModbusTransport.from_url(server.url, timeout_s=0.2, retries=0) as transport:
            with pytest.raises(DeviceUnavailable, match="--timeout"):
                await transport.read_registers(1, 40000, 2)


async def test_a_register_refused_for_a_while_is_read_again_after_the_retry_interval() -> None:
    # Hz is refused (a device failing during a restart, say), then answered again: the reader
    # skips it meanwhile and asks again once RETRY_REFUSED_S has passed on its clock.
    models = [FieldModel(m, sample_data(m)) for m in (1, 103, 120, 123)]
    device = FieldDevice(models)
    hz = device.address_of(103) + model_def(103).point("Hz").offset
    device.refuse({hz})
    now = [0.0]
    async with FieldServer([device]) as server:
        async with ModbusTransport.from_url(server.url) as transport:
            inverter = await Inverter.connect(transport, 1)
            inverter._reader.reads.clock = lambda: now[0]
            first = await inverter.read()
            device.refused.clear()  # the device answers again
            now[0] = 60.0
            still_skipped = await inverter.read()
            now[0] = 3600.0
            again = await inverter.read()
    assert first.frequency_hz is None and still_skipped.frequency_hz is None
    assert again.frequency_hz is not None
    assert inverter.missing == {}
