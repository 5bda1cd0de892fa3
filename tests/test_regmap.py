"""Declarative register maps: the SDM630 built-in map, decoding, encoding and validation."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from drivers.errors import RegisterMapError
from drivers.regmap import (
    RegisterMap,
    RegisterPoint,
    builtin_map_names,
    decode_map,
    decode_point,
    encode_point,
    load_builtin_map,
    load_register_map,
)

SDM630_INPUTS = {
    "voltage_l1_v": (0, "V"),
    "voltage_l2_v": (2, "V"),
    "voltage_l3_v": (4, "V"),
    "current_l1_a": (6, "A"),
    "current_l2_a": (8, "A"),
    "current_l3_a": (10, "A"),
    "power_l1_w": (12, "W"),
    "power_l2_w": (14, "W"),
    "power_l3_w": (16, "W"),
    "apparent_power_l1_va": (18, "VA"),
    "apparent_power_l2_va": (20, "VA"),
    "apparent_power_l3_va": (22, "VA"),
    "reactive_power_l1_var": (24, "var"),
    "reactive_power_l2_var": (26, "var"),
    "reactive_power_l3_var": (28, "var"),
    "power_factor_l1": (30, ""),
    "power_factor_l2": (32, ""),
    "power_factor_l3": (34, ""),
    "power_total_w": (52, "W"),
    "apparent_power_total_va": (56, "VA"),
    "reactive_power_total_var": (60, "var"),
    "power_factor_total": (62, ""),
    "frequency_hz": (70, "Hz"),
    "import_energy_wh": (72, "Wh"),
    "export_energy_wh": (74, "Wh"),
    "current_neutral_a": (224, "A"),
    "total_energy_wh": (342, "Wh"),
}
SDM630_HOLDING = {
    "demand_period_s": 2,
    "system_type": 10,
    "network_parity_stop": 18,
    "modbus_address": 20,
    "baud_rate_code": 28,
}


def point(data_type: Any, word_order: Any = "big", scale: float = 1.0) -> RegisterPoint:
    return RegisterPoint("p", 100, "holding", data_type, word_order=word_order, scale=scale)


# ---- the built-in SDM630 map -------------------------------------------------------------


def test_sdm630_is_builtin() -> None:
    assert "sdm630" in builtin_map_names()
    m = load_builtin_map("sdm630")
    assert (m.name, m.manufacturer, m.source) == ("sdm630", "Eastron", "builtin:sdm630")
    assert "positive when importing" in m.description


def test_sdm630_points() -> None:
    m = load_builtin_map("sdm630")
    for name, (address, unit) in SDM630_INPUTS.items():
        p = m.point(name)
        assert (p.table, p.address, p.unit, p.writable) == ("input", address, unit, False), name
    for name, address in SDM630_HOLDING.items():
        p = m.point(name)
        assert (p.table, p.address, p.writable) == ("holding", address, True), name
    assert all((p.data_type, p.word_order) == ("float32", "big") for p in m.points)
    assert all(m.point(n).scale == 1000.0 for n in ("import_energy_wh", "total_energy_wh"))
    assert m.point("demand_period_s").scale == 60.0


def test_sdm630_decodes_an_image() -> None:
    m = load_builtin_map("sdm630")
    image: dict[tuple[str, int], int] = {}
    for name, value in {
        "voltage_l1_v": 230.0,
        "import_energy_wh": 12500.0,
        "power_total_w": -1500,
    }.items():
        p = m.point(name)
        image.update({(p.table, p.address + k): w for k, w in enumerate(encode_point(p, value))})
    assert (image[("input", 0)], image[("input", 1)]) == (0x4366, 0x0000)
    assert (image[("input", 72)], image[("input", 73)]) == (0x4148, 0x0000)  # 12.5 kWh
    assert decode_map(m, image, ["voltage_l1_v", "import_energy_wh", "power_total_w"]) == {
        "voltage_l1_v": 230.0,
        "import_energy_wh": 12500.0,
        "power_total_w": -1500.0,
    }
    with pytest.raises(KeyError, match=r'point "frequency_hz" of map "sdm630": input register 70'):
        decode_map(m, image, ["frequency_hz"])
    with pytest.raises(KeyError, match=r'register map "sdm630" .* has no point "nope"'):
        m.point("nope")


def test_sdm630_demand_period_writes_minutes() -> None:
    p = load_builtin_map("sdm630").point("demand_period_s")
    assert encode_point(p, 900.0) == list(struct.unpack(">2H", struct.pack(">f", 15.0)))


# ---- decode / encode ---------------------------------------------------------------------


def test_float32_hand_checked() -> None:
    p = point("float32")
    assert decode_point(p, [0x4366, 0x0000]) == 230.0
    assert encode_point(p, 230.0) == [0x4366, 0x0000]
    assert decode_point(point("float32", "little"), [0x0000, 0x4366]) == 230.0
    assert math.isnan(decode_point(p, [0x7FC0, 0x0000]))


@pytest.mark.parametrize(
    ("data_type", "word_order", "words", "value"),
    [
        ("uint16", "big", [0xFFFF], 65535),
        ("int16", "big", [0xFFFE], -2),
        ("uint32", "big", [0x0001, 0x0002], 0x0001_0002),
        ("uint32", "little", [0x0002, 0x0001], 0x0001_0002),
        ("int32", "big", [0xFFFF, 0xFFFE], -2),
        ("int32", "little", [0xFFFE, 0xFFFF], -2),
        ("float32", "big", [0xC2F6, 0xE979], -123.456),
        ("float32", "little", [0xE979, 0xC2F6], -123.456),
        ("uint64", "big", [0x0001, 0x0002, 0x0003, 0x0004], 0x0001_0002_0003_0004),
        ("uint64", "little", [0x0004, 0x0003, 0x0002, 0x0001], 0x0001_0002_0003_0004),
        ("int64", "big", [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFD], -3),
        ("int64", "little", [0xFFFD, 0xFFFF, 0xFFFF, 0xFFFF], -3),
        ("float64", "big", [0x4059, 0x0000, 0x0000, 0x0000], 100.0),
        ("float64", "little", [0x0000, 0x0000, 0x0000, 0x4059], 100.0),
    ],
)
def test_round_trip(data_type: str, word_order: str, words: list[int], value: float) -> None:
    p = point(data_type, word_order)
    assert p.count == len(words)
    assert decode_point(p, words) == pytest.approx(value, rel=1e-7)
    assert encode_point(p, value) == words
    assert decode_point(p, encode_point(p, decode_point(p, words))) == decode_point(p, words)


def test_scale_rounds_to_resolution() -> None:
    p = point("int16", scale=0.1)
    assert encode_point(p, 230.04) == [2300]
    assert decode_point(p, [2300]) == pytest.approx(230.0)
    assert encode_point(p, -0.5) == [0xFFFB]


@pytest.mark.parametrize(
    ("data_type", "value"),
    [
        ("uint16", -1),
        ("uint16", 65536),
        ("int16", 32768),
        ("int32", 2**31),
        ("uint64", -1),
        ("float32", 1e39),
        ("float64", math.inf),
        ("int16", math.nan),
    ],
)
def test_encode_out_of_range(data_type: str, value: float) -> None:
    with pytest.raises(ValueError, match='point "p"'):
        encode_point(point(data_type), value)


def test_decode_rejects_bad_words() -> None:
    with pytest.raises(ValueError, match="needs 2 words, got 1"):
        decode_point(point("float32"), [0])
    with pytest.raises(ValueError, match="not all 16-bit"):
        decode_point(point("uint16"), [65536])


# ---- maps --------------------------------------------------------------------------------

GOOD = """\
name = "meter"
manufacturer = "ACME"
model = "M1"

[[points]]
name = "power_w"
address = 10
table = "input"
data_type = "int32"
word_order = "little"
scale = 0.1
unit = "W"

[[points]]
name = "limit_w"
address = 10
table = "holding"
data_type = "uint16"
unit = "W"
writable = true
"""


def write(tmp_path: Path, text: str, name: str = "meter.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_and_spans(tmp_path: Path) -> None:
    m = load_register_map(write(tmp_path, GOOD))
    assert isinstance(m, RegisterMap)
    assert m.source == str(tmp_path / "meter.toml")
    assert m.description == ""
    assert m.spans() == [("input", 10, 2), ("holding", 10, 1)]
    assert m.spans(["limit_w"]) == [("holding", 10, 1)]
    image = {("input", 10): 0xFFF6, ("input", 11): 0xFFFF, ("holding", 10): 500}
    assert decode_map(m, image) == {"power_w": pytest.approx(-1.0), "limit_w": 500.0}


def with_first_point(**changes: str) -> str:
    """GOOD with lines of the first point replaced: key -> new line ('' deletes)."""
    lines = GOOD.splitlines()
    for key, new in changes.items():
        i = next(i for i, line in enumerate(lines) if line.startswith(f"{key} ") and i > 4)
        lines[i] = new
    return "\n".join(lines) + "\n"


BAD = {
    "toml_syntax": (
        GOOD.replace('address = 10\ntable = "input"', 'address = = 10\ntable = "input"'),
        r"meter\.toml: invalid TOML: .*line 7",
    ),
    "missing_required": (
        with_first_point(data_type=""),
        r'meter\.toml: points\[0\] \("power_w"\): missing required field "data_type"',
    ),
    "missing_top_level": (
        GOOD.replace('manufacturer = "ACME"\n', ""),
        r'meter\.toml: missing required field "manufacturer"',
    ),
    "unknown_field": (
        with_first_point(address="adress = 10"),
        r'meter\.toml: points\[0\] \("power_w"\): unknown field "adress" '
        r'\(did you mean "address"\?\)',
    ),
    "unknown_top_level": (
        GOOD.replace("model =", "modle ="),
        r'meter\.toml: unknown field "modle"',
    ),
    "wrong_type": (
        with_first_point(address='address = "10"'),
        r'meter\.toml: points\[0\] \("power_w"\): address: expected integer, got string',
    ),
    "wrong_type_bool": (
        with_first_point(address="address = true"),
        r"meter\.toml: points\[0\] \(\"power_w\"\): address: expected integer, "
        r"got boolean",
    ),
    "negative_address": (
        with_first_point(address="address = -1"),
        r'meter\.toml: points\[0\] \("power_w"\): address -1 is outside 0\.\.65535',
    ),
    "address_too_big": (
        with_first_point(address="address = 65536"),
        r'meter\.toml: points\[0\] \("power_w"\): address 65536 is outside',
    ),
    "past_the_end": (
        with_first_point(address="address = 65535"),
        r'meter\.toml: points\[0\] \("power_w"\): address 65535 \+ count 2 runs past',
    ),
    "duplicate_name": (
        GOOD.replace('"limit_w"', '"power_w"'),
        r'meter\.toml: points\[1\] \("power_w"\): name duplicates points\[0\]',
    ),
    "overlap": (
        GOOD.replace('address = 10\ntable = "holding"', 'address = 11\ntable = "input"').replace(
            "writable = true\n", ""
        ),
        r'meter\.toml: points\[1\] \("limit_w"\): address 11 overlaps points\[0\] '
        r'\("power_w"\), input registers 10\.\.11',
    ),
    "zero_scale": (
        with_first_point(scale="scale = 0"),
        r'meter\.toml: points\[0\] \("power_w"\): scale 0\.0 must be a finite non-zero',
    ),
    "unknown_table": (
        with_first_point(table='table = "inputs"'),
        r'meter\.toml: points\[0\] \("power_w"\): table "inputs" is not one of '
        r"input, holding",
    ),
    "unknown_data_type": (
        with_first_point(data_type='data_type = "flot32"'),
        r'meter\.toml: points\[0\] \("power_w"\): data_type "flot32" is not one '
        r"of uint16, int16, uint32",
    ),
    "unknown_word_order": (
        with_first_point(word_order='word_order = "middle"'),
        r'meter\.toml: points\[0\] \("power_w"\): word_order "middle" is not '
        r"one of big, little",
    ),
    "unknown_unit": (
        with_first_point(unit='unit = "kW"'),
        r'meter\.toml: points\[0\] \("power_w"\): unit "kW" is not one of',
    ),
    "writable_input": (
        with_first_point(unit='unit = "W"\nwritable = true'),
        r'meter\.toml: points\[0\] \("power_w"\): writable: input registers',
    ),
    "not_snake_case": (
        with_first_point(name='name = "Power W"'),
        r'meter\.toml: points\[0\] \("Power W"\): name "Power W" is not snake_case',
    ),
    "no_points": (
        GOOD.split("[[points]]", maxsplit=1)[0],
        r'meter\.toml: missing required field "points"',
    ),
    "empty_points": (
        GOOD.split("[[points]]", maxsplit=1)[0] + "points = []\n",
        r"meter\.toml: points: expected non-empty array of tables, got array \[\]",
    ),
}


@pytest.mark.parametrize(("text", "match"), BAD.values(), ids=BAD.keys())
def test_bad_map(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(RegisterMapError, match=match):
        load_register_map(write(tmp_path, text))


def test_unreadable_and_unknown_builtin(tmp_path: Path) -> None:
    with pytest.raises(RegisterMapError, match=re.escape("absent.toml: cannot read")):
        load_register_map(tmp_path / "absent.toml")
    with pytest.raises(RegisterMapError, match=r'no built-in register map "nope" \(have: .*sdm630'):
        load_builtin_map("nope")
