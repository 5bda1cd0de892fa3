"""A Modbus TCP proxy on the gateway: readers share devices that accept one client only.

Many hybrid inverters and battery systems accept a single Modbus TCP client; the agent holds
that connection. The proxy lets Home Assistant or another reader see the same registers
without a second connection and without extra device traffic: every read the agent makes is
copied into a register image per (bus, unit) (:attr:`drivers.transport.ModbusTransport.
read_observers`), and the proxy answers reads from those images alone, so a reader sees the
values of the agent's last poll (at the agent's poll rate).

- A read of registers the agent has not read answers exception 2 (illegal data address);
  while the agent cannot reach the device, exception 11 (gateway target failed to respond).
- A write answers exception 1 (illegal function) unless ``allow_writes``; then it is
  forwarded through the agent's own serialised connection, the device's exception (if any)
  is passed back, and the written words enter the image.
- Only functions 3, 4, 6 and 16 are served; any other answers exception 1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from pymodbus.constants import ExcCodes
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.errors import DriverError, ModbusException
from drivers.transport import ModbusTransport, Table

if TYPE_CHECKING:
    from pymodbus.server import ModbusTcpServer

log = logging.getLogger(__name__)

_READS = {3: "holding", 4: "input"}
_WRITES = frozenset({6, 16})
_REGISTERS = 0x10000


class ProxyError(RuntimeError):
    """The proxy cannot serve (its port is taken, its address is not this machine's)."""


class RegisterImage:
    """The words the agent last read from one unit: (table, address) -> word."""

    def __init__(self) -> None:
        self.words: dict[tuple[Table, int], int] = {}
        self.updates = 0

    def put(self, table: Table, address: int, registers: list[int]) -> None:
        """Record words read (or written) from ``address`` on."""
        for k, word in enumerate(registers):
            self.words[(table, address + k)] = word
        self.updates += 1

    def get(self, table: Table, address: int, count: int) -> list[int] | None:
        """The ``count`` words from ``address``, or None when any was never read."""
        try:
            return [self.words[(table, address + k)] for k in range(count)]
        except KeyError:
            return None


@dataclass
class ProxyTarget:
    """One unit the proxy serves: the agent's transport to its bus, and whether the agent's
    last poll of the device behind it succeeded."""

    unit: int
    transport: ModbusTransport
    available: Callable[[], bool]
    image: RegisterImage = field(default_factory=RegisterImage)

    def observe(self, unit: int, table: Table, address: int, registers: list[int]) -> None:
        """A read observer for the agent's transport: keeps this unit's image."""
        if unit == self.unit:
            self.image.put(table, address, registers)


@dataclass
class ProxyStats:
    """What the proxy answered: reads served, refused (exception), writes forwarded/refused."""

    reads: int = 0
    reads_refused: int = 0
    writes_forwarded: int = 0
    writes_refused: int = 0


class ModbusProxy:
    """A Modbus TCP server answering from the agent's register images (an async context
    manager). ``port`` 0 listens on a free port; :attr:`port` says which after start."""

    def __init__(
        self, host: str, port: int, targets: list[ProxyTarget], *, allow_writes: bool = False
    ) -> None:
        units = [t.unit for t in targets]
        if len(set(units)) != len(units):
            raise ValueError(f"proxy unit ids must differ: {units}")
        self.host = host
        self.port = port
        self.targets = targets
        self.allow_writes = allow_writes
        self.stats = ProxyStats()
        self._server: ModbusTcpServer | None = None

    def _simdevice(self, target: ProxyTarget) -> SimDevice:
        bits = [SimData(0, values=False, datatype=DataType.BITS)]

        async def action(
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            registers: list[int],
            set_values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            return await self._answer(
                target, function_code, address, count, registers, start_address, set_values
            )

        whole = [SimData(0, count=_REGISTERS, datatype=DataType.REGISTERS)]
        return SimDevice(id=target.unit, simdata=(bits, bits, whole, list(whole)), action=action)

    async def _answer(
        self,
        target: ProxyTarget,
        function_code: int,
        address: int,
        count: int,
        registers: list[int],
        start_address: int,
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if set_values is None and function_code in _READS:
            if not target.available():
                self.stats.reads_refused += 1
                return ExcCodes.GATEWAY_NO_RESPONSE
            table: Table = "input" if function_code == 4 else "holding"
            words = target.image.get(table, address, count)
            if words is None:
                self.stats.reads_refused += 1
                return ExcCodes.ILLEGAL_ADDRESS
            offset = address - start_address
            registers[offset : offset + count] = words
            self.stats.reads += 1
            return None
        if set_values is None and function_code in _WRITES:
            return None  # pymodbus reads a written register back for the answer
        if function_code not in _WRITES or set_values is None or not self.allow_writes:
            self.stats.writes_refused += function_code in _WRITES
            return ExcCodes.ILLEGAL_FUNCTION
        values = [int(v) for v in set_values]
        try:
            await target.transport.write_registers(target.unit, address, values)
        except ModbusException as err:
            self.stats.writes_refused += 1
            try:
                return ExcCodes(err.code)  # the device's own answer, passed on
            except ValueError:
                return ExcCodes.DEVICE_FAILURE
        except (DriverError, ValueError) as err:
            self.stats.writes_refused += 1
            log.info("proxy: write to unit %d at %d failed: %s", target.unit, address, err)
            return ExcCodes.GATEWAY_NO_RESPONSE
        target.image.put("holding", address, values)
        self.stats.writes_forwarded += 1
        return None

    async def start(self) -> None:
        """Observe the agent's transports and start listening."""
        from pymodbus.server import ModbusTcpServer  # noqa: PLC0415 - only a site with a proxy

        for target in self.targets:
            target.transport.read_observers.append(target.observe)
        server = ModbusTcpServer(
            [self._simdevice(t) for t in self.targets], address=(self.host, self.port)
        )
        try:
            await server.serve_forever(background=True)
        except (RuntimeError, OSError) as err:
            await self.stop()
            raise ProxyError(
                f"the Modbus proxy cannot listen on {self.host}:{self.port} (is the port in "
                "use? see [proxy] port in the site file)"
            ) from err
        self._server = server
        listener = server.transport
        if isinstance(listener, asyncio.Server) and listener.sockets:
            self.port = int(listener.sockets[0].getsockname()[1])
        log.info(
            "Modbus proxy on %s:%d for units %s (writes %s)",
            self.host,
            self.port,
            [t.unit for t in self.targets],
            "forwarded" if self.allow_writes else "refused",
        )

    async def stop(self) -> None:
        """Stop listening and stop observing."""
        for target in self.targets:
            if target.observe in target.transport.read_observers:
                target.transport.read_observers.remove(target.observe)
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None

    async def __aenter__(self) -> ModbusProxy:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
