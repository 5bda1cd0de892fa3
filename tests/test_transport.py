"""Modbus transports over real wires: TCP on loopback and RTU through socat pseudo-terminals."""

from __future__ import annotations

import asyncio
import socket

import pytest

from drivers.devices import Battery, Inverter, SunSpecMeter
from drivers.errors import DeviceUnavailable, ModbusException
from drivers.transport import BusPool, Endpoint, ModbusTransport, rtu_wire_time_s
from simulators.devices import BatterySim, PvInverterSim, SimSite, SunSpecMeterSim
from simulators.server import DeviceServer, SerialPair


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://127.0.0.1:1502", Endpoint("tcp", host="127.0.0.1", port=1502)),
        ("tcp://meter.local", Endpoint("tcp", host="meter.local", port=502)),
        (
            "rtu:///dev/ttyUSB0?baud=19200&parity=e",
            Endpoint("rtu", device="/dev/ttyUSB0", baud=19200, parity="E"),
        ),
    ],
)
def test_endpoint_urls_parse(url: str, expected: Endpoint) -> None:
    assert Endpoint.parse(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("udp://1.2.3.4", "scheme"),
        ("tcp://:502", "host"),
        ("rtu://", "serial device"),
        ("rtu:///dev/ttyUSB0?baud=fast", "integers"),
        ("rtu:///dev/ttyUSB0?speed=9600", "unknown option"),
        ("rtu:///dev/ttyUSB0?parity=X", "parity"),
    ],
)
def test_bad_endpoint_urls_are_refused_with_the_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Endpoint.parse(url)


def test_rtu_wire_time_counts_bits_and_frame_gaps() -> None:
    # 213 bytes at 9600 baud 8N1 (10 bits each) plus two 3.5-character gaps.
    assert rtu_wire_time_s(213, 2, 9600, 10) == pytest.approx((213 * 10 + 2 * 35) / 9600)


async def test_a_device_that_is_not_there_raises_device_unavailable() -> None:
    transport = ModbusTransport.from_url(f"tcp://127.0.0.1:{_free_port()}", timeout_s=0.3)
    async with transport:
        with pytest.raises(DeviceUnavailable, match="cannot connect"):
            await transport.read_registers(1, 40000, 2)
    assert transport.stats.failures == transport.retries + 1


async def test_a_serial_port_that_does_not_exist_raises_device_unavailable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    transport = ModbusTransport.from_url(f"rtu://{tmp_path}/ttyNONE", timeout_s=0.3, retries=0)
    async with transport:
        with pytest.raises(DeviceUnavailable):
            await transport.read_registers(1, 0, 2)


async def test_exception_responses_carry_their_code(site: SimSite) -> None:
    pv = PvInverterSim("pv", 1, site, rated_ac_w=5000)
    async with DeviceServer([pv], tcp=("127.0.0.1", 0)) as server:
        async with ModbusTransport.from_url(server.url) as transport:
            with pytest.raises(ModbusException) as info:
                await transport.read_registers(1, 100, 10)  # nothing lives at 100
            assert info.value.code == 2
            assert "illegal data address" in str(info.value)
            # The device keeps answering after an exception response.
            assert await transport.read_registers(1, 40000, 2) == [0x5375, 0x6E53]


async def test_a_device_that_stops_answering_mid_run_recovers(site: SimSite) -> None:
    pv = PvInverterSim("pv", 1, site, rated_ac_w=5000)
    async with DeviceServer([pv], tcp=("127.0.0.1", 0)) as server:
        transport = ModbusTransport.from_url(server.url, timeout_s=0.2, retries=1)
        async with transport:
            inverter = await Inverter.connect(transport, 1)
            before = await inverter.read()
            pv.go_silent()
            with pytest.raises(DeviceUnavailable, match="2 attempt"):
                await inverter.read()
            pv.resume()
            after = await inverter.read()
    assert before.rated_power_w == after.rated_power_w == 5000
    assert transport.stats.reconnects >= 2  # the timed-out connection was replaced


async def test_units_on_one_rtu_line_share_it_without_interleaving(
    site: SimSite, serial_pair: SerialPair
) -> None:
    pv = PvInverterSim("pv", 1, site, rated_ac_w=5000)
    battery = BatterySim("bat", 2, site, capacity_wh=10_000, rated_power_w=5000)
    meter = SunSpecMeterSim("meter", 3, site)
    async with DeviceServer([pv, battery, meter], serial_port=serial_pair.server_end):
        pool = BusPool(timeout_s=1.0)
        url = f"rtu://{serial_pair.client_end}?baud=9600"
        line = pool.get(url)
        assert pool.get(url) is line
        inverter = await Inverter.connect(line, 1)
        bat = await Battery.connect(line, 2)
        met = await SunSpecMeter.connect(line, 3)
        readings = await asyncio.gather(*[d.read() for d in (inverter, bat, met) for _ in range(5)])
        pool.close()
    assert all(r.rated_power_w == 5000 for r in readings[0:5])  # type: ignore[union-attr]
    assert all(r.capacity_wh == 10_000 for r in readings[5:10])  # type: ignore[union-attr]
    assert all(r.frequency_hz == 50.0 for r in readings[10:15])  # type: ignore[union-attr]
    assert line.stats.failures == 0
    assert line.stats.frames_sent == line.stats.frames_received == line.stats.requests


async def test_a_device_that_dies_in_the_middle_of_a_multi_request_poll_recovers(
    site: SimSite,
) -> None:
    from wattmesh.scan import scan_device

    pv = PvInverterSim("pv", 1, site, rated_ac_w=5000)
    async with DeviceServer([pv], tcp=("127.0.0.1", 0)) as server:
        transport = ModbusTransport.from_url(server.url, timeout_s=0.2, retries=1)
        async with transport:
            first = await scan_device(transport, 1)  # discovery + the whole map
            requests_per_scan = pv.requests
            pv.go_silent(after_requests=requests_per_scan - 1)  # the last read hangs
            with pytest.raises(DeviceUnavailable):
                await scan_device(transport, 1)
            pv.resume()
            again = await scan_device(transport, 1)
    assert requests_per_scan >= 6  # marker, five model headers, then several blocks
    assert first.values["120 nameplate"] == again.values["120 nameplate"]


async def test_a_connection_the_device_closes_fails_the_request_at_once_not_at_the_timeout() -> (
    None
):
    async def close_on_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(12)
        writer.close()

    server = await asyncio.start_server(close_on_request, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with (
        server,
        ModbusTransport.from_url(
            f"tcp://127.0.0.1:{port}", timeout_s=30.0, retries=1, backoff_s=0.01
        ) as transport,
    ):
        with pytest.raises(DeviceUnavailable, match="closed the connection"):
            await transport.read_registers(1, 40000, 2)
    assert transport.stats.reconnects == 2  # each attempt saw the close, none waited 30 s
