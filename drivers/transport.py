"""Async Modbus transports (TCP and RTU) over pymodbus: one serialised connection per bus.

A *bus* is a TCP endpoint or a serial line. Many unit ids share one bus, so requests on a bus
are serialised by a lock: frames for different units never interleave on an RS-485 line.
Each request has a timeout; failures that may be transient (timeouts, broken connections,
garbled frames) are retried with a capped, growing backoff after reconnecting. A connection
the device closes fails the pending request at once (not at the timeout). Exception responses
that say "try again" are retried with the same backoff: 6 (server busy) and 10, 11 (a
gateway's path unavailable, target did not respond); a gateway that keeps failing makes the
device unavailable. Other Modbus exception responses are not retried: they become
:class:`~drivers.errors.ModbusException`. Everything pymodbus raises is translated here, once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal
from urllib.parse import parse_qs, urlparse

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException as PymodbusError
from pymodbus.pdu import ExceptionResponse, ModbusPDU

from drivers.errors import DeviceUnavailable, DriverError, GatewayUnavailable, ModbusException

log = logging.getLogger(__name__)

Table = Literal["holding", "input"]
#: A callback seeing every successful read: (unit, table, address, registers).
ReadObserver = Callable[[int, Table, int, list[int]], None]

#: Most registers one Modbus read request may carry (function 3 and 4).
MAX_READ_REGISTERS = 125
#: Most registers one write-multiple request (function 16) may carry.
MAX_WRITE_REGISTERS = 123

_PARITIES = {"N", "E", "O"}

#: Exception codes worth retrying: the device is busy, or a gateway could not reach it.
BUSY_CODE = 6
GATEWAY_CODES = frozenset({10, 11})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a bus is: ``tcp://host:port`` or ``rtu:///dev/ttyUSB0?baud=9600&parity=N``."""

    scheme: Literal["tcp", "rtu"]
    host: str = ""
    port: int = 502
    device: str = ""
    baud: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Parse an endpoint URL; raise ``ValueError`` naming what is wrong."""
        parsed = urlparse(url)
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        if parsed.scheme == "tcp":
            if not parsed.hostname:
                raise ValueError(f"{url!r}: a TCP endpoint needs a host (tcp://HOST:PORT)")
            try:
                port = parsed.port or 502
            except ValueError as err:
                raise ValueError(f"{url!r}: bad port") from err
            return cls("tcp", host=parsed.hostname, port=port)
        if parsed.scheme == "rtu":
            device = parsed.netloc + parsed.path
            if not device:
                raise ValueError(
                    f"{url!r}: an RTU endpoint needs a serial device (rtu:///dev/ttyX)"
                )
            unknown = set(query) - {"baud", "parity", "stopbits", "bytesize"}
            if unknown:
                raise ValueError(f"{url!r}: unknown option(s) {', '.join(sorted(unknown))}")
            try:
                baud = int(query.get("baud", 9600))
                stopbits = int(query.get("stopbits", 1))
                bytesize = int(query.get("bytesize", 8))
            except ValueError as err:
                raise ValueError(f"{url!r}: baud, stopbits and bytesize are integers") from err
            parity = query.get("parity", "N").upper()
            if parity not in _PARITIES or stopbits not in (1, 2) or bytesize not in (7, 8):
                raise ValueError(f"{url!r}: parity must be N/E/O, stopbits 1/2, bytesize 7/8")
            return cls(
                "rtu", device=device, baud=baud, parity=parity, stopbits=stopbits, bytesize=bytesize
            )
        raise ValueError(f"{url!r}: scheme must be tcp:// or rtu://")

    def __str__(self) -> str:
        if self.scheme == "tcp":
            return f"tcp://{self.host}:{self.port}"
        return f"rtu://{self.device}?baud={self.baud}"

    @property
    def bits_per_char(self) -> int:
        """Bits one byte takes on a serial line: start + data + parity + stop."""
        return 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits


@dataclass(slots=True)
class TransportStats:
    """What crossed the wire: counted from the actual frames pymodbus sent and received."""

    requests: int = 0
    registers_read: int = 0
    registers_written: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    failures: int = 0
    reconnects: int = 0

    def reset(self) -> None:
        """Set every counter back to zero."""
        for name in self.__slots__:
            setattr(self, name, 0)

    def copy(self) -> TransportStats:
        """A snapshot of the counters."""
        return TransportStats(**{name: getattr(self, name) for name in self.__slots__})


def rtu_wire_time_s(bytes_on_wire: int, frames: int, baud: int, bits_per_char: int = 10) -> float:
    """Time RTU frames take on a serial line, s.

    Each byte takes ``bits_per_char`` bit times (10 at 8N1; 11 with parity or two stop bits) and
    each frame is followed by the 3.5 character silent interval that delimits RTU frames (fixed
    at 1.75 ms above 19200 baud, as the Modbus serial line specification says).
    """
    char_s = bits_per_char / baud
    gap_s = 3.5 * char_s if baud <= 19200 else 1.75e-3
    return bytes_on_wire * char_s + frames * gap_s


@dataclass
class ModbusTransport:
    """One serialised connection to a bus, with timeouts, retries and reconnects.

    Use as an async context manager, or call :meth:`close` when done. Connecting is lazy:
    the first request connects, and a broken connection is reopened by the next attempt.
    """

    endpoint: Endpoint
    timeout_s: float = 1.0
    retries: int = 2
    backoff_s: float = 0.05
    backoff_max_s: float = 1.0
    stats: TransportStats = field(default_factory=TransportStats)
    _client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = field(default=None, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    #: Called with (unit, table, address, registers) after every successful read (the
    #: gateway's Modbus proxy keeps its register images from them); must not raise.
    read_observers: list[ReadObserver] = field(default_factory=list, init=False)

    @classmethod
    def from_url(cls, url: str, **kwargs: float) -> ModbusTransport:
        """A transport for ``tcp://...`` or ``rtu://...``; keyword arguments as the fields."""
        return cls(Endpoint.parse(url), **kwargs)  # type: ignore[arg-type]

    async def __aenter__(self) -> ModbusTransport:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """Whether a connection is open now."""
        return self._client is not None and self._client.connected

    def close(self) -> None:
        """Close the connection (the next request reconnects)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if sending:
            self.stats.bytes_sent += len(data)
            self.stats.frames_sent += 1
        else:
            self.stats.bytes_received += len(data)
            self.stats.frames_received += 1
        return data

    def _closed(self, connected: bool) -> None:
        """pymodbus reports a connection change: a closed one fails the pending request now."""
        client = self._client
        if connected or client is None:
            return
        future = getattr(client.ctx, "response_future", None)
        if isinstance(future, asyncio.Future) and not future.done():
            future.set_exception(ConnectionResetError("the device closed the connection"))

    def _new_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        ep = self.endpoint
        if ep.scheme == "tcp":
            return AsyncModbusTcpClient(
                ep.host,
                port=ep.port,
                timeout=self.timeout_s,
                retries=0,
                reconnect_delay=0,
                trace_packet=self._trace,
                trace_connect=self._closed,
            )
        return AsyncModbusSerialClient(
            ep.device,
            baudrate=ep.baud,
            parity=ep.parity,
            stopbits=ep.stopbits,
            bytesize=ep.bytesize,
            timeout=self.timeout_s,
            retries=0,
            reconnect_delay=0,
            trace_packet=self._trace,
            trace_connect=self._closed,
        )

    async def _ensure_connected(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        if self._client is not None and self._client.connected:
            return self._client
        self.close()
        client = self._new_client()
        try:
            ok = await asyncio.wait_for(client.connect(), self.timeout_s)
        except (TimeoutError, OSError, PymodbusError) as err:
            client.close()
            raise DeviceUnavailable(f"{self.endpoint}: cannot connect: {err}") from err
        if not ok:
            client.close()
            raise DeviceUnavailable(f"{self.endpoint}: cannot connect")
        self._client = client
        self.stats.reconnects += 1
        return client

    async def _call(
        self,
        what: str,
        unit: int,
        function_code: int,
        address: int,
        count: int,
        values: list[int] | None = None,
    ) -> list[int]:
        delay_s = self.backoff_s
        last: Exception | None = None
        async with self._lock:
            for attempt in range(self.retries + 1):
                if attempt:
                    await asyncio.sleep(delay_s * (0.5 + random.random()))
                    delay_s = min(delay_s * 2.0, self.backoff_max_s)
                try:
                    client = await self._ensure_connected()
                    self.stats.requests += 1
                    # pymodbus times the answer out (timeout_s) and raises ModbusIOException.
                    response = await self._request(
                        client, unit, function_code, address, count, values
                    )
                except DeviceUnavailable as err:
                    last = err
                    self.stats.failures += 1
                    continue
                except (TimeoutError, OSError, PymodbusError) as err:
                    # A late answer could be mistaken for the next one's: start afresh.
                    last = err
                    if "No response received" in str(err):
                        last = DriverError(
                            f"no answer within {self.timeout_s} s (a slow device or gateway "
                            "may need a longer timeout: wattmesh scan --timeout)"
                        )
                    self.stats.failures += 1
                    self.close()
                    continue
                if isinstance(response, ExceptionResponse) or response.isError():
                    code = int(getattr(response, "exception_code", 0))
                    error = ModbusException(code, function_code, address, count)
                    if code == BUSY_CODE or code in GATEWAY_CODES:
                        last = error
                        self.stats.failures += 1
                        continue
                    raise error
                if values is not None:
                    self.stats.registers_written += len(values)
                    return []
                registers = list(response.registers[:count])
                if len(registers) != count:
                    self.close()
                    last = DriverError(f"short answer: {len(registers)} of {count} registers")
                    self.stats.failures += 1
                    continue
                self.stats.registers_read += count
                return registers
        attempts = f"{self.retries + 1} attempt(s)"
        if isinstance(last, ModbusException) and last.code == BUSY_CODE:
            raise ModbusException(
                last.code, function_code, address, count, f"still busy after {attempts}"
            ) from last
        if isinstance(last, ModbusException):
            raise GatewayUnavailable(
                f"{self.endpoint} unit {unit}: {what} {address}+{count}: the gateway could not "
                f"reach the device after {attempts} ({last})"
            ) from last
        raise DeviceUnavailable(
            f"{self.endpoint} unit {unit}: {what} {address}+{count} failed after {attempts}: {last}"
        ) from last

    @staticmethod
    async def _request(
        client: AsyncModbusTcpClient | AsyncModbusSerialClient,
        unit: int,
        function_code: int,
        address: int,
        count: int,
        values: list[int] | None,
    ) -> ModbusPDU:
        if function_code == 3:
            return await client.read_holding_registers(address, count=count, device_id=unit)
        if function_code == 4:
            return await client.read_input_registers(address, count=count, device_id=unit)
        if function_code == 6 and values is not None:
            return await client.write_register(address, values[0], device_id=unit)
        if function_code == 16 and values is not None:
            return await client.write_registers(address, values, device_id=unit)
        raise ValueError(f"unsupported function code {function_code}")

    async def read_registers(
        self, unit: int, address: int, count: int, table: Table = "holding"
    ) -> list[int]:
        """Read ``count`` 16-bit registers from ``address`` (0-based) of ``unit``.

        Raises :class:`DeviceUnavailable` when the device does not answer after the retries and
        :class:`ModbusException` when it answers with an exception response.
        """
        if not 1 <= count <= MAX_READ_REGISTERS:
            raise ValueError(f"count must be 1..{MAX_READ_REGISTERS}, got {count}")
        if not 0 <= address <= 0xFFFF - count + 1:
            raise ValueError(f"address {address}+{count} outside 0..65535")
        fc = 3 if table == "holding" else 4
        registers = await self._call("read", unit, fc, address, count)
        for observe in self.read_observers:
            observe(unit, table, address, registers)
        return registers

    async def write_registers(self, unit: int, address: int, values: list[int]) -> None:
        """Write holding registers: function 6 for one register, 16 for several."""
        if not 1 <= len(values) <= MAX_WRITE_REGISTERS:
            raise ValueError(f"1..{MAX_WRITE_REGISTERS} registers per write, got {len(values)}")
        if any(not 0 <= v <= 0xFFFF for v in values):
            raise ValueError(f"register values must be 0..65535: {values}")
        fc = 6 if len(values) == 1 else 16
        await self._call("write", unit, fc, address, len(values), list(values))


class BusPool:
    """One shared :class:`ModbusTransport` per bus, so devices on one line share a connection."""

    def __init__(self, timeout_s: float = 1.0, retries: int = 2) -> None:
        self._timeout_s = timeout_s
        self._retries = retries
        self._buses: dict[Endpoint, ModbusTransport] = {}

    def get(self, url: str | Endpoint) -> ModbusTransport:
        """The transport for a bus, created on first use."""
        endpoint = url if isinstance(url, Endpoint) else Endpoint.parse(url)
        if endpoint not in self._buses:
            self._buses[endpoint] = ModbusTransport(
                endpoint, timeout_s=self._timeout_s, retries=self._retries
            )
        return self._buses[endpoint]

    def close(self) -> None:
        """Close every bus."""
        for transport in self._buses.values():
            transport.close()
        self._buses.clear()
