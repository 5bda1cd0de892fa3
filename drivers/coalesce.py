"""Read coalescing: cover the registers a poll needs with the fewest Modbus read requests.

A poll asks for *spans* (table, address, count), one per point or group of points. The planner
merges spans on the same table into blocks of at most 125 registers, reading the gaps between
them when that saves a request, as long as the gap lies inside a range the device is known to
answer for (a device answers a read that touches an undefined register with an exception).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from drivers.errors import ModbusException
from drivers.transport import MAX_READ_REGISTERS, ModbusTransport, Table


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: ``count`` registers from ``address`` of ``table``."""

    table: Table
    address: int
    count: int

    @property
    def end(self) -> int:
        """One past the last register."""
        return self.address + self.count


def _segment_of(address: int, segments: Sequence[tuple[int, int]] | None) -> int:
    """Index of the readable segment (start, count) holding ``address``; -1 means anywhere."""
    if segments is None:
        return -1
    for i, (start, count) in enumerate(segments):
        if start <= address < start + count:
            return i
    raise ValueError(f"address {address} lies outside every readable range {list(segments)}")


def plan_reads(
    spans: Iterable[tuple[str, int, int]],
    *,
    max_registers: int = MAX_READ_REGISTERS,
    readable: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    max_gap: int | None = None,
) -> list[ReadBlock]:
    """The fewest read blocks covering every span.

    Greedy from the lowest address: a block grows while the next span still fits within
    ``max_registers`` of the block's start, lies in the same readable segment (when
    ``readable`` maps a table to (start, count) segments) and, if ``max_gap`` is set, leaves
    a gap of at most ``max_gap`` registers. A span is never split across requests unless it is
    itself longer than ``max_registers``. For spans no longer than ``max_registers`` this
    greedy cover is minimal.
    """
    by_table: dict[Table, list[tuple[int, int]]] = {}
    for name, first, length in spans:
        if name not in ("holding", "input"):
            raise ValueError(f"register table must be 'holding' or 'input', got {name!r}")
        table: Table = "holding" if name == "holding" else "input"
        if length <= 0:
            raise ValueError(f"span {table}:{first}+{length} has no registers")
        # A span longer than one request can carry is split into full requests.
        for offset in range(0, length, max_registers):
            by_table.setdefault(table, []).append(
                (first + offset, min(max_registers, length - offset))
            )
    blocks: list[ReadBlock] = []
    for table in sorted(by_table):
        segments = None if readable is None else readable.get(table)
        start = end = seg = -2
        for address, count in sorted(by_table[table]):
            span_end = address + count
            span_seg = _segment_of(address, segments)
            fits = (
                start >= 0
                and span_seg == seg
                and max(end, span_end) - start <= max_registers
                and (max_gap is None or address - end <= max_gap)
            )
            if fits:
                end = max(end, span_end)
                continue
            if start >= 0:
                blocks.append(ReadBlock(table, start, end - start))
            start, end, seg = address, span_end, span_seg
        if start >= 0:
            blocks.append(ReadBlock(table, start, end - start))
    return blocks


class Image(Mapping[tuple[str, int], int]):
    """The registers a poll read, kept as the blocks they arrived in.

    A mapping (table, address) -> 16-bit word; :meth:`words` slices a run out of one block.
    """

    def __init__(self) -> None:
        self._blocks: list[tuple[str, int, list[int]]] = []

    def add(self, table: str, address: int, words: list[int]) -> None:
        """Keep a block of ``words`` read from ``address`` of ``table``."""
        self._blocks.append((table, address, words))

    def words(self, table: str, address: int, count: int) -> list[int]:
        """``count`` words from ``address`` (across blocks); ``KeyError`` when any was not read."""
        for t, start, words in self._blocks:
            if t == table and start <= address and address + count <= start + len(words):
                return words[address - start : address - start + count]
        region = self.region(table, address, count)
        if any(w is None for w in region):
            raise KeyError(f"registers {table}:{address}+{count} were not read")
        return [w for w in region if w is not None]

    def region(self, table: str, address: int, count: int) -> list[int | None]:
        """``count`` words from ``address``, None for each register no block read."""
        end = address + count
        for t, start, words in self._blocks:  # the common case: one block holds it all
            if t == table and start <= address and end <= start + len(words):
                return list[int | None](words[address - start : end - start])
        out: list[int | None] = [None] * count
        for t, start, words in self._blocks:
            stop = start + len(words)
            if t != table or stop <= address or start >= end:
                continue
            lo, hi = max(start, address), min(stop, end)
            out[lo - address : hi - address] = words[lo - start : hi - start]
        return out

    def __getitem__(self, key: tuple[str, int]) -> int:
        table, address = key
        for t, start, words in self._blocks:
            if t == table and start <= address < start + len(words):
                return words[address - start]
        raise KeyError(key)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for t, start, words in self._blocks:
            for a in range(start, start + len(words)):
                yield (t, a)

    def __len__(self) -> int:
        return sum(len(words) for _, _, words in self._blocks)


#: Exception codes that mean "the device will not give these registers": a read that gets
#: one is split into smaller reads. 2 illegal data address, 3 illegal data value (some devices
#: answer so for a count that crosses a hole), 4 server device failure (some firmwares).
REFUSAL_CODES = frozenset({2, 3, 4})
#: Seconds after which the registers a device refused are asked for again.
RETRY_REFUSED_S = 3600.0


@dataclass(frozen=True, slots=True)
class Span:
    """Registers a poll needs: one point (or a run of raw registers).

    ``path`` names the units the span belongs to, coarse to fine (for SunSpec: the model
    instance, then the group instance); a refused read is split along it.
    """

    table: Table
    address: int
    count: int
    path: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        """One past the last register."""
        return self.address + self.count


def _blocks_for(
    spans: Sequence[Span],
    readable: Mapping[str, Sequence[tuple[int, int]]] | None,
    max_registers: int = MAX_READ_REGISTERS,
) -> list[tuple[ReadBlock, tuple[Span, ...]]]:
    """Plan reads for ``spans`` and say which spans each block carries."""
    blocks = plan_reads(
        [(s.table, s.address, s.count) for s in spans],
        readable=readable,
        max_registers=max_registers,
    )
    return [
        (
            b,
            tuple(
                s for s in spans if s.table == b.table and s.address < b.end and s.end > b.address
            ),
        )
        for b in blocks
    ]


def _merge_adjacent(
    plan: list[tuple[ReadBlock, tuple[Span, ...]]],
    max_registers: int = MAX_READ_REGISTERS,
) -> list[tuple[ReadBlock, tuple[Span, ...]]]:
    """Join blocks that were each read whole and touch: their union is known to be readable."""
    merged: list[tuple[ReadBlock, tuple[Span, ...]]] = []
    for block, spans in sorted(plan, key=lambda bs: (bs[0].table, bs[0].address)):
        if merged:
            last, carried = merged[-1]
            end = max(last.end, block.end)
            if (
                last.table == block.table
                and block.address <= last.end
                and end - last.address <= max_registers
            ):
                union = ReadBlock(last.table, last.address, end - last.address)
                merged[-1] = (union, carried + tuple(s for s in spans if s not in carried))
                continue
        merged.append((block, spans))
    return merged


class SpanReader:
    """Reads a fixed set of spans every poll with the fewest requests, surviving refusals.

    The first plan merges spans across gaps (within ``readable``). When a read is refused
    (an exception in :data:`REFUSAL_CODES`), its spans are read again split by the first
    level of their paths (per model), then the next (per group), then point by point (in
    halves, so that the points around a refused register are still read together).
    A span refused on its own is remembered with the reason and skipped by later polls,
    and the plan that worked replaces the refused one, so a refusal costs extra requests
    only once; every ``retry_refused_s`` (of ``clock``, monotonic seconds) the refused spans
    are asked for again, so a refusal that was transient (a device failure, exception 4,
    during a restart) does not hide a point for the reader's life.
    """

    def __init__(
        self,
        spans: Sequence[Span],
        readable: Mapping[str, Sequence[tuple[int, int]]] | None = None,
        max_registers: int = MAX_READ_REGISTERS,
        *,
        retry_refused_s: float = RETRY_REFUSED_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spans = tuple(spans)
        self.readable = readable
        self.max_registers = max_registers
        self.retry_refused_s = retry_refused_s
        self.clock = clock
        #: Spans the device refused, with the reason (they are not read until the retry).
        self.refused: dict[Span, str] = {}
        self._retry_at = math.inf
        self._plan = _blocks_for(self.spans, readable, max_registers)

    @property
    def blocks(self) -> list[ReadBlock]:
        """The read requests one poll makes now."""
        return [b for b, _ in self._plan]

    async def read(self, transport: ModbusTransport, unit: int) -> Image:
        """One poll: every span not refused. Other errors propagate."""
        if self.refused and self.clock() >= self._retry_at:
            self.refused.clear()  # ask for them again; still refused: split once more
            self._plan = _blocks_for(self.spans, self.readable, self.max_registers)
        image = Image()
        plan: list[tuple[ReadBlock, tuple[Span, ...]]] = []
        changed = False
        for block, spans in self._plan:
            try:
                words = await transport.read_registers(
                    unit, block.address, block.count, block.table
                )
            except ModbusException as err:
                if err.code not in REFUSAL_CODES:
                    raise
                changed = True
                plan += await self._split(transport, unit, spans, 0, image, err)
                continue
            image.add(block.table, block.address, words)
            plan.append((block, spans))
        if changed:
            self._plan = _merge_adjacent(plan, self.max_registers)
            self._retry_at = self.clock() + self.retry_refused_s
        return image

    async def _split(
        self,
        transport: ModbusTransport,
        unit: int,
        spans: tuple[Span, ...],
        level: int,
        image: Image,
        err: ModbusException,
    ) -> list[tuple[ReadBlock, tuple[Span, ...]]]:
        """Read ``spans`` in parts one level finer; returns the blocks that worked."""
        if len(spans) == 1:
            self.refused[spans[0]] = f"refused by the device (Modbus exception {err.code}: " + (
                f"{ModbusException.NAMES.get(err.code, 'unknown')})"
            )
            return []
        deepest = max(len(s.path) for s in spans)
        parts: dict[tuple[int, ...], list[Span]] = {}
        if level < deepest:
            for s in spans:
                parts.setdefault(s.path[: level + 1], []).append(s)
            if len(parts) == 1:
                return await self._split(transport, unit, spans, level + 1, image, err)
        else:  # point by point, by halves: a refused register costs O(log n) extra reads
            ordered = sorted(spans, key=lambda s: (s.table, s.address))
            half = len(ordered) // 2
            parts = {(0,): ordered[:half], (1,): ordered[half:]}
        worked: list[tuple[ReadBlock, tuple[Span, ...]]] = []
        for part in parts.values():
            for block, carried in _blocks_for(part, self.readable, self.max_registers):
                try:
                    words = await transport.read_registers(
                        unit, block.address, block.count, block.table
                    )
                except ModbusException as sub_err:
                    if sub_err.code not in REFUSAL_CODES:
                        raise
                    worked += await self._split(transport, unit, carried, level + 1, image, sub_err)
                    continue
                image.add(block.table, block.address, words)
                worked.append((block, carried))
        return worked


async def read_blocks(transport: ModbusTransport, unit: int, blocks: Iterable[ReadBlock]) -> Image:
    """Read every block from ``unit`` and return the register image."""
    image = Image()
    for block in blocks:
        image.add(
            block.table,
            block.address,
            await transport.read_registers(unit, block.address, block.count, block.table),
        )
    return image
