"""SunSpec layouts come from the Alliance's definitions; decoding honours SFs and sentinels."""

from __future__ import annotations

import math
import struct

import pytest

from drivers.errors import SunSpecError
from drivers.sunspec.models import (
    PlacedPoint,
    decode_model,
    decode_points,
    encode_model,
    encode_point,
    model_def,
    model_layout,
)

REQUIRED = (
    1,
    101,
    102,
    103,
    111,
    112,
    113,
    120,
    123,
    124,
    201,
    202,
    203,
    204,
    211,
    212,
    213,
    214,
    802,
)


@pytest.mark.parametrize("model_id", REQUIRED)
def test_every_required_model_has_a_layout_matching_its_length(model_id: int) -> None:
    model = model_def(model_id)
    last = model.points[-1]
    assert model.points[0].name == "ID"
    assert model.points[1].name == "L"
    assert last.offset + last.size == model.length + 2


def test_known_offsets_match_the_sunspec_tables() -> None:
    assert model_def(103).point("W").offset == 14
    assert model_def(103).point("W_SF").offset == 15
    assert model_def(103).point("WH").type == "acc32"
    assert model_def(124).point("StorCtl_Mod").offset == 5
    assert model_def(124).point("InOutWRte_RvrtTms").writable
    assert model_def(203).point("TotWhImp").offset == 46
    assert model_def(802).point("SoC").offset == 11


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(SunSpecError, match="model 64999"):
        model_def(64999)


def _words_with(model_id: int, **raw: int) -> list[int]:
    """A model's registers all 'not implemented' but for the given raw register values."""
    model = model_def(model_id)
    words = encode_model(model, {}, {})
    for name, value in raw.items():
        words[model.point(name).offset] = value & 0xFFFF
    return words


def test_scale_factors_are_applied() -> None:
    words = _words_with(103, W=1234, W_SF=-1, Hz=5002, Hz_SF=0xFFFE)  # sf -2
    values = decode_model(model_def(103), words, ["W", "Hz"])
    assert values["W"] == pytest.approx(123.4)
    assert values["Hz"] == pytest.approx(50.02)


def test_not_implemented_sentinels_decode_as_missing_not_zero() -> None:
    model = model_def(103)
    words = _words_with(103, W=0x8000, W_SF=0, St=0xFFFF, A=0xFFFF, A_SF=0)
    values = decode_model(model, words, ["W", "St", "A", "WH"])
    assert values == {"W": None, "St": None, "A": None, "WH": None}


def test_a_scale_factor_that_is_not_implemented_leaves_the_raw_value_as_pysunspec2() -> None:
    words = _words_with(103, W=1000, W_SF=0x8000)
    assert decode_model(model_def(103), words, ["W"])["W"] == 1000


def test_float_models_read_nan_as_missing() -> None:
    model = model_def(213)
    words = encode_model(model, {"W": 1500.5, "Hz": None}, {})
    values = decode_model(model, words, ["W", "Hz"])
    assert values["W"] == pytest.approx(1500.5)
    assert values["Hz"] is None
    hi, lo = struct.unpack(">HH", struct.pack(">f", math.nan))
    assert words[model.point("Hz").offset : model.point("Hz").offset + 2] == [hi, lo]


def test_strings_decode_without_padding() -> None:
    model = model_def(1)
    words = encode_model(model, {"Mn": "wattmesh", "SN": "A-1"}, {})
    values = decode_model(model, words, ["Mn", "SN", "Md"])
    assert values == {"Mn": "wattmesh", "SN": "A-1", "Md": None}


def test_encode_then_decode_round_trips_to_one_scale_factor_step() -> None:
    model = model_def(124)
    values = {"WChaMax": 5000.0, "OutWRte": 37.5, "StorCtl_Mod": 2, "ChaState": 55.5}
    sfs = {"WChaMax_SF": 0, "InOutWRte_SF": -2, "ChaState_SF": -1}
    decoded = decode_model(model, encode_model(model, values, sfs))
    for name, value in values.items():
        assert decoded[name] == pytest.approx(value)
    assert decoded["InWRte"] is None  # not given: left not implemented


def test_encoding_a_value_too_large_for_its_type_names_the_point() -> None:
    with pytest.raises(ValueError, match="W.*int16"):
        encode_point(model_def(103).point("W"), 500_000, 0)


def _placed_words(model_id: int, data: dict[str, object]) -> list[int]:
    """A model's registers as pysunspec2 builds them from ``data``."""
    import sunspec2.device as sunspec_device

    raw = sunspec_device.Model(model_id=model_id, data=data).get_mb()
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def test_repeating_groups_are_placed_by_their_count_or_by_the_model_length() -> None:
    modules = [{"ID": i, "DCA": 10 * i} for i in (1, 2, 3)]
    mppt = _placed_words(160, {"N": 3, "DCA_SF": -1, "module": modules})
    layout = model_layout(model_def(160), mppt[1], mppt)
    values, missing = decode_points(layout.data_points, mppt)
    assert [values[f"module[{i}].DCA"] for i in (1, 2, 3)] == [1.0, 2.0, 3.0]  # DCA_SF -1
    assert values["module[3].ID"] == 3 and not missing and not layout.problems
    curves = [{"ActPt": 2, "Pt": [{"V": 100 + i}, {"V": 200 + i}]} for i in (1, 2)]
    volt_var = _placed_words(705, {"NCrv": 2, "NPt": 2, "Crv": curves})
    layout = model_layout(model_def(705), volt_var[1], volt_var)
    values, _ = decode_points(layout.data_points, volt_var)
    assert values["Crv[2].Pt[2].V"] == 202 and "Crv[3].ActPt" not in values
    assert layout.problems == ()


def test_a_model_with_no_fixed_points_is_all_repeating_groups() -> None:
    incl = _placed_words(304, {"incl": [{"Inclx": 5}, {"Inclx": -7}]})
    layout = model_layout(model_def(304), incl[1], incl)
    values, _ = decode_points(layout.data_points, incl)
    assert values["incl[1].Inclx"] == 0.05 and values["incl[2].Inclx"] == -0.07  # sf -2
    assert model_def(304).span([]) == (2, 0)


def test_the_common_model_may_be_announced_with_65_registers() -> None:
    layout = model_layout(model_def(1), 65)
    assert "Pad" not in [p.name for p in layout.points]
    assert layout.problems == () and layout.beyond == ()


def test_points_beyond_a_short_announced_length_are_listed_not_misread() -> None:
    layout = model_layout(model_def(103), 30)
    assert "St" in layout.beyond and "W" not in layout.beyond
    assert any("announced length 30" in p for p in layout.problems)


@pytest.mark.parametrize(
    ("kind", "size", "value"),
    [
        ("eui48", 4, "00:1A:2B:3C:4D:5E"),
        ("ipv6addr", 8, "20010DB8:00000000:00000000:00000001"),
        ("ipaddr", 2, 0xC0A8010A),
        ("float32", 2, 1.5),
        ("int64", 4, -(2**40)),
        ("string", 4, "ab c"),
    ],
)
def test_every_point_type_decodes_as_pysunspec2_decodes_it(
    kind: str, size: int, value: object
) -> None:
    from sunspec2 import mb

    from drivers.sunspec.models import PointDef

    info = mb.point_type_info[kind]
    data = info.to_data(value, size * 2)
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    point = PlacedPoint("P", PointDef("P", 0, size, kind))
    ours = decode_points([point], words)[0]["P"]
    assert ours == info.data_to(data) == value
    unimplemented = mb.create_unimpl_value(kind, size * 2)
    blank = [int.from_bytes(unimplemented[i : i + 2], "big") for i in range(0, size * 2, 2)]
    assert decode_points([point], blank)[0]["P"] is None


def test_registers_not_read_make_a_point_missing_with_the_reason() -> None:
    model = model_def(103)
    words: list[int | None] = list(_words_with(103, W=1000, W_SF=0, Hz=50, Hz_SF=0))
    words[model.point("Hz").offset] = None
    values, missing = decode_points(model_layout(model, model.length).data_points, words)
    assert values["W"] == 1000 and values["Hz"] is None
    assert missing == {"Hz": "not read: the device refused its registers"}
