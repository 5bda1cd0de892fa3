"""Serving simulated devices over Modbus TCP and RTU, and serial pairs for RTU on one machine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from pymodbus.server import ModbusSerialServer, ModbusTcpServer

from simulators.devices import SimulatedDevice

log = logging.getLogger(__name__)


class DeviceServer:
    """A Modbus server for one or more simulated devices (several units share an RTU line).

    ``async with DeviceServer(devices, tcp=("127.0.0.1", 0))`` listens on a free port;
    :attr:`url` says where (``tcp://127.0.0.1:PORT`` or ``rtu://PATH``).
    """

    def __init__(
        self,
        devices: list[SimulatedDevice],
        *,
        tcp: tuple[str, int] | None = None,
        serial_port: str | None = None,
        baud: int = 9600,
    ) -> None:
        if (tcp is None) == (serial_port is None):
            raise ValueError("give exactly one of tcp=(host, port) or serial_port=PATH")
        ids = [d.unit_id for d in devices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"unit ids on one server must differ: {ids}")
        self.devices = devices
        self._tcp = tcp
        self._serial_port = serial_port
        self._baud = baud
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self.url = ""

    async def start(self) -> None:
        """Start listening (returns once the server accepts requests)."""
        sims = [d.simdevice() for d in self.devices]
        if self._tcp is not None:
            server: ModbusTcpServer | ModbusSerialServer = ModbusTcpServer(sims, address=self._tcp)
        else:
            server = ModbusSerialServer(sims, port=self._serial_port or "", baudrate=self._baud)
        await server.serve_forever(background=True)
        self._server = server
        if self._tcp is not None:
            listener = server.transport
            if not isinstance(listener, asyncio.Server):
                raise RuntimeError("pymodbus did not open a TCP listener")
            port = listener.sockets[0].getsockname()[1]
            self.url = f"tcp://{self._tcp[0]}:{port}"
        else:
            self.url = f"rtu://{self._serial_port}?baud={self._baud}"

    async def stop(self) -> None:
        """Stop serving and close every connection."""
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None

    async def __aenter__(self) -> DeviceServer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class SerialPair:
    """Two connected pseudo-terminals made by socat: a server on one end, a client on the other.

    A pseudo-terminal ignores the baud rate: frames cross at once.
    """

    def __init__(self, directory: str | Path | None = None, name: str = "ttyS") -> None:
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="wattmesh-pty-"))
        self.server_end = str(self.directory / f"{name}-server")
        self.client_end = str(self.directory / f"{name}-client")
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> SerialPair:
        self.directory.mkdir(parents=True, exist_ok=True)
        for end in (self.server_end, self.client_end):  # stale links of a run that crashed
            with contextlib.suppress(FileNotFoundError):
                os.unlink(end)
        socat = shutil.which("socat")
        if socat is None:
            raise RuntimeError(
                "socat is not installed: it makes the serial pairs for RTU "
                "simulation (apt-get install socat)"
            )
        self._proc = await asyncio.create_subprocess_exec(
            socat,
            f"pty,raw,echo=0,link={self.server_end}",
            f"pty,raw,echo=0,link={self.client_end}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        ends = (Path(self.server_end), Path(self.client_end))
        for _ in range(200):
            if all(os.path.exists(end) for end in ends):  # noqa: ASYNC240 - a stat, no I/O wait
                return self
            if self._proc.returncode is not None:
                break
            await asyncio.sleep(0.01)
        await self.close()
        raise RuntimeError("socat did not create the serial pair")

    async def close(self) -> None:
        """Stop socat and remove the links."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                await self._proc.wait()
        self._proc = None
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
        else:
            for end in (self.server_end, self.client_end):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(end)

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
