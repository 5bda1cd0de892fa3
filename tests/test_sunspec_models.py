"""SunSpec layouts come from the Alliance's definitions; decoding honours SFs and sentinels."""

from __future__ import annotations

import math
import struct

import pytest

from drivers.errors import SunSpecError
from drivers.sunspec.models import decode_model, encode_model, encode_point, model_def

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
