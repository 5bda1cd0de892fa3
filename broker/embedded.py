"""An embedded MQTT broker (amqtt, pure Python) for the demo on machines without Mosquitto.

It speaks MQTT 3.1.1 only, accepts anonymous clients and enforces no ACL: it is for trying
wattmesh on one machine, never for a deployment (use Mosquitto, `wattmesh broker init`).
Clients connect with ``BusSettings(protocol=4)``.
"""

from __future__ import annotations

import logging
from types import TracebackType

from amqtt.broker import Broker

from broker.errors import BrokerProcessError


class EmbeddedBroker:
    """``async with EmbeddedBroker(port)``: an in-process broker on ``host:port``."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self._broker: Broker | None = None

    async def __aenter__(self) -> EmbeddedBroker:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
                },
            }
        )
        try:
            await broker.start()
        except Exception as err:
            raise BrokerProcessError(
                f"the embedded broker could not listen on {self.host}:{self.port}: {err}"
            ) from err
        self._broker = broker
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
