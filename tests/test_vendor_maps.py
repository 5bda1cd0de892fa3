"""Vendor register maps with battery control: the files, and the schema that checks them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from drivers.devices import MAP_METER_POINTS
from drivers.errors import RegisterMapError
from drivers.regmap import builtin_map_names, load_builtin_map, load_register_map

VENDOR_MAPS = [
    "huawei_sun2000",
    "sungrow_sh",
    "victron_gx",
    "goodwe_et",
    "eastron_sdm72d",
    "carlo_gavazzi_em24",
]
BATTERY_MAPS = ["huawei_sun2000", "sungrow_sh", "victron_gx", "goodwe_et"]
METER_MAPS = [
    "sdm630",
    "eastron_sdm72d",
    "carlo_gavazzi_em24",
    "carlo_gavazzi_em24_e1",
    "huawei_sun2000",
]
MAPS_DIR = Path(__file__).resolve().parent.parent / "drivers" / "maps"


def test_every_vendor_map_is_builtin_and_loads() -> None:
    assert set(VENDOR_MAPS) <= set(builtin_map_names())
    for name in builtin_map_names():
        assert load_builtin_map(name).name == name


@pytest.mark.parametrize("name", VENDOR_MAPS)
def test_each_vendor_map_cites_its_document_and_the_sources_it_was_checked_against(
    name: str,
) -> None:
    header = (MAPS_DIR / f"{name}.toml").read_text(encoding="utf-8").split("\nname =")[0]
    assert re.search(r"# Source: .+\"[^\"]+\"", header), "document name in quotes"
    assert re.search(r"(V\d+\.\d+|Issue \d+|[Rr]evision \d|Version \d)", header), "its version"
    assert "# Checked against" in header
    assert re.search(r"[\w.-]+/[\w.-]+ @ [0-9a-f]{40}", header), "a repository at a commit"
    assert "# Confirmed" in header
    assert "# Not confirmed" in header


@pytest.mark.parametrize("name", BATTERY_MAPS)
def test_battery_maps_describe_their_documented_control(name: str) -> None:
    regmap = load_builtin_map(name)
    assert regmap.battery is not None and regmap.battery.control is not None
    control = regmap.battery.control
    for point in control.writes:
        assert regmap.point(point).writable
    assert regmap.point(control.setpoint).unit == "W"


@pytest.mark.parametrize("name", METER_MAPS)
def test_meter_maps_carry_every_point_the_meter_facade_reads(name: str) -> None:
    points = {p.name for p in load_builtin_map(name).points}
    assert set(MAP_METER_POINTS.values()) <= points


def test_victron_points_live_in_their_services_unit_ids() -> None:
    regmap = load_builtin_map("victron_gx")
    assert regmap.unit_id == 100
    assert regmap.point("ess_power_setpoint_l1_w").unit_id == 227
    assert regmap.point("battery_soc_pct").unit_id is None  # the map's unit: the system's
    groups = regmap.unit_groups()
    assert set(groups) == {None, 227}


GOOD = """\
name = "hybrid"
manufacturer = "ACME"
model = "H1"

points = [
  { name = "soc_pct", address = 0, table = "input", data_type = "uint16", unit = "%" },
  { name = "power_w", address = 1, table = "input", data_type = "int16", unit = "W" },
  { name = "setpoint_w", address = 0, table = "holding", data_type = "uint16", unit = "W", writable = true },
  { name = "mode", address = 1, table = "holding", data_type = "uint16", writable = true },
  { name = "forced", address = 2, table = "holding", data_type = "uint16", writable = true },
  { name = "period_s", address = 3, table = "holding", data_type = "uint16", unit = "s", scale = 60, writable = true },
  { name = "status", address = 4, table = "holding", data_type = "uint16" },
]

[battery]
soc_pct = "soc_pct"
power_w = "power_w"
rated_charge_w = 3000
rated_discharge_w = 3000

[battery.control]
setpoint = "setpoint_w"
setpoint_kind = "magnitude"
mode = "mode"
mode_idle = 0
mode_charge = 1
mode_discharge = 2
prepare = { forced = 1 }
timeout = "period_s"
revert_timeout_max_s = 3600
"""


def test_a_battery_map_loads_with_its_control(tmp_path: Path) -> None:
    path = tmp_path / "hybrid.toml"
    path.write_text(GOOD, encoding="utf-8")
    spec = load_register_map(path).battery
    assert spec is not None and spec.control is not None
    assert spec.rated_charge_w == 3000.0
    assert spec.control.prepare == (("forced", 1.0),)
    assert spec.control.writes == ["forced", "period_s", "setpoint_w", "mode"]


BAD = {
    "unknown_point": (
        GOOD.replace('soc_pct = "soc_pct"', 'soc_pct = "soc"'),
        r'hybrid\.toml: battery: no point "soc" in this map',
    ),
    "setpoint_not_writable": (
        GOOD.replace('setpoint = "setpoint_w"', 'setpoint = "status"'),
        r'hybrid\.toml: battery\.control: point "status" is not writable',
    ),
    "setpoint_not_watts": (
        GOOD.replace('setpoint = "setpoint_w"', 'setpoint = "forced"'),
        r'hybrid\.toml: battery\.control: setpoint "forced" must have unit "W"',
    ),
    "magnitude_without_mode": (
        GOOD.replace('mode = "mode"\nmode_idle = 0\nmode_charge = 1\nmode_discharge = 2\n', ""),
        r'hybrid\.toml: battery\.control: setpoint_kind "magnitude" needs a mode point',
    ),
    "mode_without_values": (
        GOOD.replace("mode_charge = 1\n", ""),
        r"hybrid\.toml: battery\.control: mode needs mode_idle, mode_charge and mode_discharge",
    ),
    "misspelt_control_field": (
        GOOD.replace("setpoint_kind =", "setpoint_knd ="),
        r'hybrid\.toml: battery\.control: unknown field "setpoint_knd" '
        r'\(did you mean "setpoint_kind"\?\)',
    ),
    "unknown_kind": (
        GOOD.replace('"magnitude"', '"percent"'),
        r'hybrid\.toml: battery\.control: setpoint_kind "percent" is not one of signed, magnitude',
    ),
    "prepare_not_numbers": (
        GOOD.replace("prepare = { forced = 1 }", 'prepare = { forced = "on" }'),
        r"hybrid\.toml: battery\.control: prepare: expected table of point names to numbers",
    ),
    "timeout_and_fixed_revert": (
        GOOD.replace(
            "revert_timeout_max_s = 3600", "revert_timeout_max_s = 3600\nrevert_timeout_s = 60"
        ),
        r"hybrid\.toml: battery\.control: give either a timeout point or a fixed revert_timeout_s",
    ),
    "timeout_without_max": (
        GOOD.replace("revert_timeout_max_s = 3600\n", ""),
        r"hybrid\.toml: battery\.control: a timeout point and revert_timeout_max_s go together",
    ),
    "negative_interval": (
        GOOD + "min_write_interval_s = -1\n",
        r"hybrid\.toml: battery\.control: min_write_interval_s -1\.0 must be a finite number >= 0",
    ),
    "missing_rated": (
        GOOD.replace("rated_charge_w = 3000\n", ""),
        r'hybrid\.toml: battery: missing required field "rated_charge_w"',
    ),
    "rated_not_positive": (
        GOOD.replace("rated_charge_w = 3000", "rated_charge_w = 0"),
        r"hybrid\.toml: battery: rated_charge_w 0\.0 must be a finite number > 0",
    ),
    "direction_without_masks": (
        GOOD.replace('power_w = "power_w"\n', 'power_w = "power_w"\ndirection = "status"\n'),
        r"hybrid\.toml: battery: direction needs charging_mask and discharging_mask",
    ),
    "unit_id_out_of_range": (
        GOOD.replace(
            'table = "input", data_type = "uint16", unit = "%"',
            'table = "input", data_type = "uint16", unit = "%", unit_id = 300',
        ),
        r'hybrid\.toml: points\[0\] \("soc_pct"\): unit_id 300 is outside 0\.\.247',
    ),
    "read_size": (
        GOOD.replace('model = "H1"', 'model = "H1"\nmax_read_registers = 200'),
        r"hybrid\.toml: max_read_registers 200 is outside 1\.\.125",
    ),
}


@pytest.mark.parametrize(("text", "match"), BAD.values(), ids=BAD.keys())
def test_a_wrong_battery_map_is_refused_naming_the_table_and_field(
    tmp_path: Path, text: str, match: str
) -> None:
    path = tmp_path / "hybrid.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RegisterMapError, match=match):
        load_register_map(path)


def test_the_same_address_in_two_units_is_no_overlap(tmp_path: Path) -> None:
    text = GOOD.replace(
        '{ name = "status", address = 4, table = "holding", data_type = "uint16" },',
        '{ name = "status", address = 4, table = "holding", data_type = "uint16" },\n'
        '  { name = "other", address = 4, table = "holding", data_type = "uint16", unit_id = 9 },',
    )
    path = tmp_path / "hybrid.toml"
    path.write_text(text, encoding="utf-8")
    assert load_register_map(path).point("other").unit_id == 9
    path.write_text(text.replace("unit_id = 9", "default = 1"), encoding="utf-8")
    with pytest.raises(RegisterMapError, match=r'"other"\): address 4 overlaps'):
        load_register_map(path)


def test_the_readme_shows_a_scan_of_every_builtin_map() -> None:
    readme = (MAPS_DIR.parent.parent / "README.md").read_text(encoding="utf-8")
    for name in builtin_map_names():
        assert re.search(rf"wattmesh scan \S+ --map {name}\s", readme), name
