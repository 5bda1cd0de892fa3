"""SunSpec devices as found in the field, built from the SunSpec Alliance's own model code.

A :class:`FieldDevice` holds a register map made by pysunspec2 (``sunspec2.device.Model``),
independently of ``drivers/``, and can misbehave the way real devices do: refuse chosen
registers inside models (exception 2), answer "busy" (exception 6) or a gateway's
exceptions (10, 11) a few times, or stay silent at a base address. :class:`FieldServer` serves
such devices over Modbus TCP on a free port. Tests compare our drivers with pysunspec2's
client on the same server.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import sunspec2.device as sunspec_device
import sunspec2.mdef as sunspec_mdef
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

SUNS = (0x5375, 0x6E53)
END = (0xFFFF, 0)


@dataclass(frozen=True, slots=True)
class FieldModel:
    """A model to put in a field device: pysunspec2 data (a dict as ``Model(data=...)``
    takes), or raw registers after ID and L for a vendor model without a definition.

    ``drop_last`` announces a shorter length than the definition's (model 1 with L=65).
    """

    model_id: int
    data: Mapping[str, Any] | None = None
    raw: Sequence[int] | None = None
    drop_last: int = 0

    def words(self) -> list[int]:
        """ID, L and the model's registers."""
        if self.raw is not None:
            return [self.model_id, len(self.raw), *self.raw]
        model = sunspec_device.Model(model_id=self.model_id, data=dict(self.data or {}))
        data = model.get_mb()
        words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
        if self.drop_last:
            words = words[: -self.drop_last]
            words[1] -= self.drop_last
        return words


def _sample(pdef: Mapping[str, Any], rng: random.Random, counts: Mapping[str, int]) -> Any:
    """A plausible value for one point definition (pysunspec2 units: raw integers)."""
    kind, name = pdef["type"], pdef["name"]
    if name in counts:
        return counts[name]
    if "value" in pdef:
        return pdef["value"]
    if pdef.get("symbols"):
        return int(rng.choice(pdef["symbols"])["value"])
    if kind == "sunssf":
        return rng.randint(-2, 1)
    if kind == "string":
        return f"{name}-{rng.randint(0, 99)}"[: int(pdef["size"]) * 2]
    if kind == "eui48":
        return ":".join(f"{rng.randint(0, 255):02X}" for _ in range(6))
    if kind == "ipv6addr":
        return ":".join(f"{rng.randint(1, 0xFFFFFFFF):08X}" for _ in range(4))
    if kind in ("float32", "float64"):
        return float(rng.randint(1, 100_000)) / 8.0
    if kind in ("int16", "int32", "int64"):
        return rng.randint(-3000, 3000) or 1
    if kind in ("bitfield16", "bitfield32"):
        return 0
    if kind == "pad":
        return 0
    return rng.randint(1, 30000)


def sample_data(
    model_id: int, counts: Mapping[str, int] | None = None, seed: int = 0
) -> dict[str, Any]:
    """Values for every point of ``model_id`` from its definition, deterministic in ``seed``.

    ``counts`` gives the repetitions of each repeating group, by the group's name or by its
    count point's name (e.g. ``{"module": 3}`` for 160, ``{"NCrv": 2, "NPt": 4}`` for 705).
    """
    rng = random.Random(f"{model_id}-{seed}")
    counts = dict(counts or {})
    gdef = sunspec_device.get_model_def(model_id)[sunspec_mdef.GROUP]

    def fill(group: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            p["name"]: _sample(p, rng, counts)
            for p in group.get("points", ())
            if p["name"] not in ("ID", "L") or group is not gdef
        }
        for sub in group.get("groups", ()):
            count = sub.get("count")
            if count is None:
                out[sub["name"]] = fill(sub)
                continue
            n = counts.get(sub["name"], counts.get(str(count), 1))
            out[sub["name"]] = [fill(sub) for _ in range(n)]
        return out

    return fill(gdef)


@dataclass
class FieldDevice:
    """A device's SunSpec map with faults; ``requests`` counts what it was asked.

    ``refused`` are wire addresses that answer exception 2 to any read touching them.
    ``busy_answers`` / ``gateway_answers`` answer that many requests with exception 6 /
    11 before answering properly. ``silent_at`` are addresses where a read starting there
    gets no answer at all.
    """

    models: Sequence[FieldModel]
    base_address: int = 40000
    unit_id: int = 1
    refused: set[int] = field(default_factory=set)
    busy_answers: int = 0
    gateway_answers: int = 0
    silent_at: set[int] = field(default_factory=set)
    requests: int = 0
    refusals: int = 0
    words: list[int] = field(init=False)
    addresses: list[tuple[int, int]] = field(init=False)
    _hung: set[asyncio.Task[Any]] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        self.words = list(SUNS)
        self.addresses = []
        for model in self.models:
            self.addresses.append((model.model_id, self.base_address + len(self.words)))
            self.words += model.words()
        self.words += list(END)

    def address_of(self, model_id: int, nth: int = 1) -> int:
        """Wire address of the ``nth`` instance of a model's ID register."""
        return [a for m, a in self.addresses if m == model_id][nth - 1]

    def refuse(self, addresses: Iterable[int]) -> None:
        """Answer exception 2 to reads touching any of ``addresses`` from now on."""
        self.refused.update(addresses)

    def simdevice(self) -> SimDevice:
        """The pymodbus device: the map plus, where silence is wanted, a block to be silent in."""
        simdata = [SimData(self.base_address, values=list(self.words), datatype=DataType.REGISTERS)]
        for address in sorted(self.silent_at):
            if not self.base_address <= address < self.base_address + len(self.words):
                simdata.append(SimData(address, values=[0] * 8, datatype=DataType.REGISTERS))
        simdata.sort(key=lambda d: d.address)
        return SimDevice(id=self.unit_id, simdata=simdata, action=self.action)

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Inject the faults; writes are refused (a field device here is read-only)."""
        self.requests += 1
        if address in self.silent_at:
            task = asyncio.current_task()
            if task is not None:
                self._hung.add(task)
            await asyncio.Event().wait()  # never answers; cancelled when the server stops
        if self.gateway_answers > 0:
            self.gateway_answers -= 1
            return ExcCodes.GATEWAY_NO_RESPONSE
        if self.busy_answers > 0:
            self.busy_answers -= 1
            return ExcCodes.DEVICE_BUSY
        if set_values is not None:
            return ExcCodes.ILLEGAL_ADDRESS
        if any(a in self.refused for a in range(address, address + count)):
            self.refusals += 1
            return ExcCodes.ILLEGAL_ADDRESS
        return None

    def release(self) -> None:
        """Cancel requests hanging in silence."""
        for task in self._hung:
            task.cancel()
        self._hung.clear()


class FieldServer:
    """Serves field devices over Modbus TCP on a free loopback port; :attr:`url` says where."""

    def __init__(self, devices: Sequence[FieldDevice]) -> None:
        self.devices = list(devices)
        self._server: ModbusTcpServer | None = None
        self.url = ""
        self.port = 0

    async def __aenter__(self) -> FieldServer:
        server = ModbusTcpServer([d.simdevice() for d in self.devices], address=("127.0.0.1", 0))
        await server.serve_forever(background=True)
        self._server = server
        listener = server.transport
        if not isinstance(listener, asyncio.Server):
            raise TypeError("pymodbus did not open a TCP listener")
        self.port = int(listener.sockets[0].getsockname()[1])
        self.url = f"tcp://127.0.0.1:{self.port}"
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        for device in self.devices:
            device.release()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None
