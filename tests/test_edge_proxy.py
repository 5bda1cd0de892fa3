"""The gateway's Modbus TCP proxy (``[proxy]``): readers share a one-client device.

A Victron GX twin (units 100 and 227 on one TCP endpoint) is polled by the agent; a pymodbus
client reads it through the proxy. The proxy answers from the agent's polls only: the device
sees the agent's one connection and no extra request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from broker.clock import Clock, ManualClock, ScaledClock
from drivers.regmap import encode_point, load_builtin_map
from edge.agent import EdgeAgent
from edge.config import EdgeConfig, EdgeConfigError, ProxySection, parse_edge_config
from edge.proxy import ModbusProxy, ProxyError
from simulators.devices import LoadSpec, SimSite
from simulators.mapped import MapDeviceSim
from simulators.server import DeviceServer
from tests.broker_fixtures import free_port

SITE = "house-1"
NOON_TS = 1_782_043_200.0


@dataclass
class Gx:
    """A Victron GX twin served over TCP."""

    sim: MapDeviceSim
    server: DeviceServer

    @property
    def requests(self) -> int:
        """Requests the device answered, on every unit."""
        return sum(d.requests for d in self.sim.devices)

    @property
    def connections(self) -> int:
        """TCP connections open at the device now."""
        server = self.server._server
        assert server is not None
        return len(server.active_connections)

    def words(self, unit: int, address: int, count: int) -> list[int]:
        """The device's own holding registers now."""
        table = self.sim.words[(unit, "holding")]
        return [table[address + k] for k in range(count)]


@asynccontextmanager
async def victron(clock: Clock) -> AsyncIterator[Gx]:
    site = SimSite(SITE, clock, LoadSpec("household", 300.0, 4000.0), seed=1)
    sim = MapDeviceSim("gx", site, load_builtin_map("victron_gx"), pv_peak_w=3000.0)
    async with DeviceServer(sim.devices, tcp=("127.0.0.1", 0)) as server:
        yield Gx(sim, server)


def proxy_config(gx: Gx, spool: Path, **proxy: object) -> EdgeConfig:
    return parse_edge_config(
        {
            "site": {"id": SITE, "poll_interval_s": 0.001},
            "broker": {"host": "127.0.0.1", "port": free_port()},  # no broker: not needed
            "devices": [{"name": "gx", "kind": "map", "map": "victron_gx", "url": gx.server.url}],
            "spool": {"path": str(spool)},
            "market": {"enabled": False},
            "fallback": {"mode": "idle"},
            "proxy": {"port": 0, **proxy},
        },
        "test-site.toml",
    )


@asynccontextmanager
async def polled(
    gx: Gx, tmp_path: Path, **options: object
) -> AsyncIterator[tuple[EdgeAgent, ModbusProxy, AsyncModbusTcpClient]]:
    """An agent driven poll by poll (``agent.cycle()``), its proxy, and a reader on it."""
    assert isinstance(gx.sim.site.clock, ManualClock)
    agent = EdgeAgent(proxy_config(gx, tmp_path / "spool.sqlite", **options), gx.sim.site.clock)
    assert agent.proxy is not None
    try:
        async with agent.proxy as proxy:
            reader = AsyncModbusTcpClient("127.0.0.1", port=proxy.port, timeout=2, retries=0)
            await reader.connect()
            try:
                yield agent, proxy, reader
            finally:
                reader.close()
    finally:
        agent.pool.close()
        agent.outbox.close()


async def poll(agent: EdgeAgent, clock: ManualClock, seconds: float = 5.0) -> None:
    clock.advance(seconds)
    await asyncio.sleep(0.002)  # the poll interval passes on the wall clock
    await agent.cycle()


async def test_a_reader_gets_the_registers_of_the_agent_s_last_poll_and_nothing_more(
    tmp_path: Path, clock: ManualClock
) -> None:
    async with victron(clock) as gx, polled(gx, tmp_path) as (agent, proxy, reader):
        await poll(agent, clock)
        at_poll = {
            (100, 842): gx.words(100, 842, 2),  # battery power, state of charge
            (100, 2901): gx.words(100, 2901, 1),  # minimum SOC
            (227, 37): gx.words(227, 37, 1),  # the Multi's ESS setpoint
        }
        requests = gx.requests
        first = {
            (u, a): (await reader.read_holding_registers(a, count=len(w), device_id=u)).registers
            for (u, a), w in at_poll.items()
        }
        never_read = await reader.read_holding_registers(850, count=1, device_id=100)
        wrong_table = await reader.read_input_registers(842, count=2, device_id=100)
        # The battery moves; the reader sees the change only once the agent polled it.
        gx.sim.soc_pct = 80.0
        clock.advance(5.0)
        gx.sim.step(clock.now(), 5.0)
        stale = (await reader.read_holding_registers(842, count=2, device_id=100)).registers
        requests_by_reader = gx.requests - requests
        await poll(agent, clock)
        fresh = (await reader.read_holding_registers(842, count=2, device_id=100)).registers
        device_now = gx.words(100, 842, 2)
        connections = gx.connections
    assert first == at_poll
    assert never_read.isError() and never_read.exception_code == 2  # the agent never reads it
    assert wrong_table.isError() and wrong_table.exception_code == 2
    assert stale == at_poll[(100, 842)]
    assert requests_by_reader == 0  # reads through the proxy cost the device nothing
    assert fresh == device_now
    soc = load_builtin_map("victron_gx").point("battery_soc_pct")
    assert fresh[1] == encode_point(soc, 80.0)[0]
    assert connections == 1  # the agent's, shared by units 100 and 227
    assert proxy.stats.reads == 5 and proxy.stats.reads_refused == 2


async def test_a_write_is_refused_unless_allowed(tmp_path: Path, clock: ManualClock) -> None:
    async with victron(clock) as gx, polled(gx, tmp_path) as (agent, proxy, reader):
        await poll(agent, clock)
        writes = gx.sim.writes
        refused = await reader.write_register(2901, 200, device_id=100)  # min SOC 20 %
        min_soc = gx.sim.get("ess_min_soc_pct")
        device_writes = gx.sim.writes - writes
    assert refused.isError() and refused.exception_code == 1  # illegal function
    assert min_soc == 10.0  # the factory default, untouched
    assert device_writes == 0
    assert proxy.stats.writes_refused == 1 and proxy.stats.writes_forwarded == 0


async def test_an_allowed_write_goes_through_the_agent_s_connection(
    tmp_path: Path, clock: ManualClock
) -> None:
    async with (
        victron(clock) as gx,
        polled(gx, tmp_path, allow_writes=True) as (agent, proxy, reader),
    ):
        await poll(agent, clock)
        forwarded = await reader.write_register(2901, 200, device_id=100)  # min SOC 20 %
        read_back = await reader.read_holding_registers(2901, count=1, device_id=100)
        # The device's own refusal is passed on: 9 kW is beyond the Multi's rating.
        too_big = await reader.write_register(37, 0x10000 - 9000, device_id=227)
        min_soc = gx.sim.get("ess_min_soc_pct")
        await poll(agent, clock)
        battery_min = agent.pollers[0].reading
        connections = gx.connections
    assert not forwarded.isError()
    assert min_soc == 20.0
    assert read_back.registers == [200]
    assert too_big.isError() and too_big.exception_code == 3  # the device's "illegal value"
    assert battery_min is not None and battery_min.soc_min_pct == 20.0  # type: ignore[union-attr]
    assert connections == 1
    assert proxy.stats.writes_forwarded == 1 and proxy.stats.writes_refused == 1


async def test_the_running_agent_serves_its_proxy(tmp_path: Path) -> None:
    clock = ScaledClock(NOON_TS, 1.0)
    async with victron(clock) as gx:
        config = proxy_config(gx, tmp_path / "spool.sqlite")
        config = config.model_copy(
            update={"site": config.site.model_copy(update={"poll_interval_s": 0.1})}
        )
        async with EdgeAgent(config, clock, password="x") as agent:
            assert agent.proxy is not None
            reader = AsyncModbusTcpClient("127.0.0.1", port=agent.proxy.port, timeout=2)
            await reader.connect()
            try:
                async with asyncio.timeout(10):
                    while True:
                        if agent.pollers[0].available:
                            break
                        await asyncio.sleep(0.05)
                answer = await reader.read_holding_registers(2901, count=1, device_id=100)
            finally:
                reader.close()
            connections = gx.connections
    assert answer.registers == [100]  # ESS minimum SOC 10.0 %
    assert connections == 1


def test_the_proxy_section_is_checked_when_the_site_file_is_read(tmp_path: Path) -> None:
    url = "tcp://127.0.0.1:5020"
    devices = [
        {"name": "gx", "kind": "map", "map": "victron_gx", "url": url},
        {"name": "battery", "kind": "battery", "url": "tcp://127.0.0.1:5021", "unit": 100},
    ]

    def parse(**proxy: object) -> EdgeConfig:
        data = {"site": {"id": SITE}, "devices": devices, "proxy": proxy}
        return parse_edge_config(data, str(tmp_path / "site.toml"))

    assert parse(devices=["gx"]).proxy is not None
    assert parse(devices=["gx"]).proxy.allow_writes is False  # type: ignore[union-attr]
    with pytest.raises(EdgeConfigError, match="both answer as unit 100"):
        parse()
    with pytest.raises(EdgeConfigError, match=r"\['nope'\] are not in"):
        parse(devices=["nope"])


async def test_a_taken_port_is_named(tmp_path: Path, clock: ManualClock) -> None:
    async with victron(clock) as gx:
        host, port = gx.server.url.removeprefix("tcp://").split(":")
        config = proxy_config(gx, tmp_path / "spool.sqlite")
        taken = config.model_copy(update={"proxy": ProxySection(host=host, port=int(port))})
        agent = EdgeAgent(taken, clock)
        try:
            assert agent.proxy is not None
            with pytest.raises(ProxyError, match=rf"cannot listen on 127.0.0.1:{port}"):
                await agent.proxy.start()
            observers = agent.pool.get(gx.server.url).read_observers
        finally:
            agent.pool.close()
            agent.outbox.close()
    assert observers == []  # nothing left behind
