"""The resilient bus client over a real Mosquitto: socket options."""

from __future__ import annotations

import asyncio
import socket

import pytest

from broker.client import BusClient, BusSettings
from broker.errors import BusUnavailable
from broker.mosquitto import BrokerFiles, MosquittoProcess
from broker.topics import site_topic


async def test_every_bus_connection_sets_tcp_nodelay(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles
) -> None:
    """Nagle's algorithm would hold a dispatch or its acknowledgement back ~40 ms: every
    connection (site and coordinator credentials alike) turns it off."""
    for user in ("house-1", "coordinator"):
        settings = BusSettings(
            port=broker_files.port, username=user, password=broker_files.credentials[user]
        )
        async with asyncio.timeout(20), BusClient(settings) as bus:
            await bus.wait_connected(5)
            sock = bus.socket()
            assert sock is not None
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert bus.socket() is None


async def test_a_burst_arrives_whole_and_in_order_and_is_acknowledged_before_return(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles
) -> None:
    """More messages than paho keeps in flight and than the window: every one is delivered,
    in order, and the broker has acknowledged them all when ``publish_burst`` returns."""
    received: list[bytes] = []
    done = asyncio.Event()
    count = 1500

    async def collect(topic: str, payload: bytes) -> None:
        received.append(payload)
        if len(received) == count:
            done.set()

    def settings(user: str) -> BusSettings:
        return BusSettings(
            port=broker_files.port, username=user, password=broker_files.credentials[user]
        )

    topic = site_topic("house-1", "award")
    async with asyncio.timeout(30):
        async with BusClient(settings("house-1"), handler=collect) as site:
            await site.subscribe(topic)
            await site.wait_connected(5)
            async with BusClient(settings("coordinator")) as coordinator:
                await coordinator.wait_connected(5)
                await asyncio.sleep(0.2)
                items = [(topic, f"award {i}".encode()) for i in range(count)]
                assert await coordinator.publish_burst(items, window=300) == count
                assert coordinator.stats.published == count
            await done.wait()
    assert received == [payload for _, payload in items]


async def test_a_burst_while_disconnected_raises_at_once() -> None:
    bus = BusClient(BusSettings(port=1))
    with pytest.raises(BusUnavailable):
        await bus.publish_burst([("wattmesh/v1/x", b"1")])
