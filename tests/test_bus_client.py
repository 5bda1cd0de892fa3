"""The resilient bus client over a real Mosquitto: socket options."""

from __future__ import annotations

import asyncio
import socket

from broker.client import BusClient, BusSettings
from broker.mosquitto import BrokerFiles, MosquittoProcess


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
