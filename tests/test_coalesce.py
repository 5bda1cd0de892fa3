"""Read coalescing: the fewest requests that cover the points, never past readable ranges."""

from __future__ import annotations

import pytest

from drivers.coalesce import Image, ReadBlock, plan_reads


def test_adjacent_and_nearby_spans_merge_into_one_request() -> None:
    blocks = plan_reads([("holding", 10, 2), ("holding", 12, 1), ("holding", 40, 2)])
    assert blocks == [ReadBlock("holding", 10, 32)]


def test_a_block_never_exceeds_125_registers() -> None:
    blocks = plan_reads([("holding", 0, 2), ("holding", 123, 2), ("holding", 124, 2)])
    assert blocks == [ReadBlock("holding", 0, 125), ReadBlock("holding", 124, 2)]


def test_points_are_never_split_across_requests() -> None:
    blocks = plan_reads([("input", 0, 2), ("input", 124, 2)])
    assert blocks == [ReadBlock("input", 0, 2), ReadBlock("input", 124, 2)]


def test_tables_are_planned_separately() -> None:
    blocks = plan_reads([("input", 0, 2), ("holding", 0, 2), ("input", 4, 2)])
    assert blocks == [ReadBlock("holding", 0, 2), ReadBlock("input", 0, 6)]


def test_long_spans_are_split_into_full_requests() -> None:
    blocks = plan_reads([("holding", 1000, 300)])
    assert blocks == [
        ReadBlock("holding", 1000, 125),
        ReadBlock("holding", 1125, 125),
        ReadBlock("holding", 1250, 50),
    ]


def test_gaps_outside_readable_segments_are_not_read() -> None:
    readable = {"holding": [(0, 10), (20, 10)]}
    blocks = plan_reads([("holding", 2, 2), ("holding", 22, 2)], readable=readable)
    assert blocks == [ReadBlock("holding", 2, 2), ReadBlock("holding", 22, 2)]


def test_max_gap_limits_merging() -> None:
    spans = [("holding", 0, 1), ("holding", 5, 1), ("holding", 50, 1)]
    assert plan_reads(spans, max_gap=10) == [
        ReadBlock("holding", 0, 6),
        ReadBlock("holding", 50, 1),
    ]


def test_greedy_cover_is_minimal_for_many_scattered_points() -> None:
    spans = [("holding", a, 2) for a in range(0, 1000, 7)]
    blocks = plan_reads(spans)
    covered = {a for b in blocks for a in range(b.address, b.end)}
    assert all(a in covered and a + 1 in covered for _, a, _ in spans)
    # Registers 0..995 must be read and a request carries at most 125: no cover has fewer
    # than ceil(996 / 125) = 8 requests, and the greedy plan reaches that bound.
    assert len(blocks) == 8


@pytest.mark.parametrize("bad", [("coils", 0, 1), ("holding", 0, 0)])
def test_bad_spans_are_refused(bad: tuple[str, int, int]) -> None:
    with pytest.raises(ValueError, match="table|no registers"):
        plan_reads([bad])


def test_an_image_gives_words_across_the_blocks_of_a_long_span() -> None:
    image = Image()
    image.add("holding", 1000, list(range(125)))
    image.add("holding", 1125, list(range(125, 200)))
    assert image.words("holding", 1120, 10) == list(range(120, 130))
    assert image.region("holding", 1198, 4) == [198, 199, None, None]
    with pytest.raises(KeyError, match="not read"):
        image.words("holding", 1198, 4)
