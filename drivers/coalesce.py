"""Read coalescing: cover the registers a poll needs with the fewest Modbus read requests.

A poll asks for *spans* (table, address, count), one per point or group of points. The planner
merges spans on the same table into blocks of at most 125 registers, reading the gaps between
them when that saves a request, as long as the gap lies inside a range the device is known to
answer for (a device answers a read that touches an undefined register with an exception).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

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
        """``count`` words from ``address``; ``KeyError`` when no block read them all."""
        for t, start, words in self._blocks:
            if t == table and start <= address and address + count <= start + len(words):
                return words[address - start : address - start + count]
        raise KeyError(f"registers {table}:{address}+{count} were not read")

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
