"""The vendor maps agree, point by point, with the public sources their headers cite.

Each table below is a list of facts read in the cited source (register numbers, tables, data
types, word order, the resolution and unit the source states, and whether the source's sign is
the opposite of wattmesh's); nothing here is taken from our own maps. The test derives what the
map must hold (scale = sign x resolution x unit conversion) and compares. A point a map adds
without a fact here fails `test_every_point_of_a_vendor_map_is_pinned_to_a_source`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from drivers.regmap import RegisterMap, load_builtin_map

MAPS = Path(__file__).resolve().parent.parent / "drivers" / "maps"


@dataclass(frozen=True)
class Fact:
    """One register as a public source gives it."""

    address: int
    table: str
    data_type: str
    resolution: float = 1.0  # per least significant bit, in ``source_unit``
    source_unit: str = ""
    word_order: str = "big"
    #: -1 when the source counts the opposite way to wattmesh (battery positive charging,
    #: grid positive exporting).
    sign: int = 1
    unit_id: int | None = None


#: Source unit -> map unit: the factor the map's scale carries on top of the resolution.
CONVERSION = {
    ("kWh", "Wh"): 1000.0,
    ("min", "s"): 60.0,
}


def _fact(
    table: str,
    address: int,
    data_type: str,
    resolution: float,
    unit: str,
    word_order: str,
    sign: int,
    unit_id: int | None,
) -> Fact:
    return Fact(address, table, data_type, resolution, unit, word_order, sign, unit_id)


def hr(
    address: int,
    data_type: str,
    resolution: float = 1.0,
    unit: str = "",
    *,
    word_order: str = "big",
    sign: int = 1,
    unit_id: int | None = None,
) -> Fact:
    """A holding register."""
    return _fact("holding", address, data_type, resolution, unit, word_order, sign, unit_id)


def ir(
    address: int,
    data_type: str,
    resolution: float = 1.0,
    unit: str = "",
    *,
    word_order: str = "big",
    sign: int = 1,
    unit_id: int | None = None,
) -> Fact:
    """An input register."""
    return _fact("input", address, data_type, resolution, unit, word_order, sign, unit_id)


# wlcrs/huawei-solar-lib @ 873c1b3b664e1eadad731cf65901dfb54749c529,
# src/huawei_solar/registers.py: U16/I32/... Register(unit, gain, address); resolution = 1/gain.
# Signs from evcc-io/evcc @ b29b49e3056ead3c99ff1f4711b2bb17083114b0,
# templates/definition/meter/huawei-sun2000-hybrid.yaml (scale -1 on 37113, 37132-37136, 37765).
HUAWEI = {
    "rated_power_w": hr(30073, "uint32", 1, "W"),
    "pv_power_w": hr(32064, "int32", 1, "W"),
    "inverter_voltage_l1_v": hr(32069, "uint16", 0.1, "V"),
    "ac_power_w": hr(32080, "int32", 1, "W"),
    "inverter_frequency_hz": hr(32085, "uint16", 0.01, "Hz"),
    "device_status": hr(32089, "uint16"),
    "pv_energy_wh": hr(32106, "uint32", 0.01, "kWh"),
    "voltage_l1_v": hr(37101, "int32", 0.1, "V"),
    "voltage_l2_v": hr(37103, "int32", 0.1, "V"),
    "voltage_l3_v": hr(37105, "int32", 0.1, "V"),
    "power_total_w": hr(37113, "int32", 1, "W", sign=-1),
    "frequency_hz": hr(37118, "int16", 0.01, "Hz"),
    "export_energy_wh": hr(37119, "int32", 0.01, "kWh"),
    "import_energy_wh": hr(37121, "int32", 0.01, "kWh"),
    "power_l1_w": hr(37132, "int32", 1, "W", sign=-1),
    "power_l2_w": hr(37134, "int32", 1, "W", sign=-1),
    "power_l3_w": hr(37136, "int32", 1, "W", sign=-1),
    "battery_capacity_wh": hr(37758, "uint32", 1, "Wh"),
    "battery_soc_pct": hr(37760, "uint16", 0.1, "%"),
    "battery_running_status": hr(37762, "uint16"),
    "battery_power_w": hr(37765, "int32", 1, "W", sign=-1),
    "max_charge_power_w": hr(47075, "uint32", 1, "W"),
    "max_discharge_power_w": hr(47077, "uint32", 1, "W"),
    "charge_cutoff_soc_pct": hr(47081, "uint16", 0.1, "%"),
    "discharge_cutoff_soc_pct": hr(47082, "uint16", 0.1, "%"),
    "forcible_period_s": hr(47083, "uint16", 1, "min"),
    "working_mode": hr(47086, "uint16"),
    "forcible_command": hr(47100, "uint16"),
    "forcible_setting_mode": hr(47246, "uint16"),
    # The library gives these no unit; evcc writes watts to them.
    "forcible_charge_power_w": hr(47247, "uint32", 1, "W"),
    "forcible_discharge_power_w": hr(47249, "uint32", 1, "W"),
}

# mkaiser/Sungrow-SHx-Inverter-Modbus-Home-Assistant @ 63beec6770e8275670cdf01437cb305817f32988,
# modbus_sungrow.yaml ("address: N # reg N+1"; swap: word = low word first; grid frequency
# 5241 at 0.01 Hz). Export power's sign: evcc-io/evcc @
# b29b49e3056ead3c99ff1f4711b2bb17083114b0, templates/definition/meter/sungrow-hybrid.yaml.
SUNGROW = {
    "nominal_power_w": ir(5000, "uint16", 100, "W"),
    "pv_power_w": ir(5016, "uint32", 1, "W", word_order="little"),
    "inverter_voltage_l1_v": ir(5018, "uint16", 0.1, "V"),
    "inverter_frequency_hz": ir(5241, "uint16", 0.01, "Hz"),
    "running_state": ir(13000, "uint16"),
    "pv_energy_wh": ir(13002, "uint32", 0.1, "kWh", word_order="little"),
    "grid_power_w": ir(13009, "int32", 1, "W", word_order="little", sign=-1),
    "battery_voltage_v": ir(13019, "uint16", 0.1, "V"),
    "battery_power_w": ir(13021, "int16", 1, "W"),
    "battery_soc_pct": ir(13022, "uint16", 0.1, "%"),
    "battery_soh_pct": ir(13023, "uint16", 0.1, "%"),
    "ac_power_w": ir(13033, "int32", 1, "W", word_order="little"),
    "ems_mode": hr(13049, "uint16"),
    "charge_command": hr(13050, "uint16"),
    "charge_power_w": hr(13051, "uint16", 1, "W"),
    "soc_max_pct": hr(13057, "uint16", 0.1, "%"),
    "soc_min_pct": hr(13058, "uint16", 0.1, "%"),
}

# victronenergy/dbus-modbustcp attributes.csv (service, path, ..., register, type, scale factor),
# read in Energy-Solutions-UK/dbus_modbustcp @ ed85451d3ea64610dfc5b9685df6fc31d3514599;
# resolution = 1 / scale factor. Unit ids from unitid2di.csv (227: Cerbo GX VE.Bus port).
# Battery power's sign: evcc-io/evcc victron-energy.yaml (scale -1 on 842).
VEBUS = 227
VICTRON = {
    "vebus_input_voltage_l1_v": hr(3, "uint16", 0.1, "V", unit_id=VEBUS),
    "vebus_input_frequency_hz": hr(9, "int16", 0.01, "Hz", unit_id=VEBUS),
    "vebus_soc_pct": hr(30, "uint16", 0.1, "%", unit_id=VEBUS),
    "vebus_switch_position": hr(33, "uint16", unit_id=VEBUS),
    "ess_power_setpoint_l1_w": hr(37, "int16", 1, "W", sign=-1, unit_id=VEBUS),
    "ess_disable_charge": hr(38, "uint16", unit_id=VEBUS),
    "ess_disable_feed_in": hr(39, "uint16", unit_id=VEBUS),
    "consumption_l1_w": hr(817, "uint16", 1, "W"),
    "consumption_l2_w": hr(818, "uint16", 1, "W"),
    "consumption_l3_w": hr(819, "uint16", 1, "W"),
    "grid_l1_w": hr(820, "int16", 1, "W"),
    "grid_l2_w": hr(821, "int16", 1, "W"),
    "grid_l3_w": hr(822, "int16", 1, "W"),
    "battery_voltage_v": hr(840, "uint16", 0.1, "V"),
    "battery_current_a": hr(841, "int16", 0.1, "A", sign=-1),
    "battery_power_w": hr(842, "int16", 1, "W", sign=-1),
    "battery_soc_pct": hr(843, "uint16", 1, "%"),
    "battery_state": hr(844, "uint16"),
    "pv_power_w": hr(850, "uint16", 1, "W"),
    "ess_grid_setpoint_w": hr(2700, "int16", 1, "W"),
    "ess_min_soc_pct": hr(2901, "uint16", 0.1, "%"),
    "ess_mode": hr(2902, "uint16"),
}

# marcelblijleven/goodwe @ 66dfcdd9cd947bfd799f2bddb40b4e05ba9db6f6, goodwe/et.py (sensor
# classes in goodwe/sensor.py: Voltage /10 unsigned, Frequency /100 signed, PowerS int16,
# Power4S int32, Power4 uint32, Energy4 uint32 /10 kWh). 35140 is positive exporting (const.py
# GRID_IN_OUT_MODES; house consumption = PV + battery - 35140).
GOODWE = {
    "pv1_voltage_v": hr(35103, "uint16", 0.1, "V"),
    "inverter_voltage_l1_v": hr(35121, "uint16", 0.1, "V"),
    "inverter_frequency_hz": hr(35123, "int16", 0.01, "Hz"),
    "ac_power_w": hr(35138, "int16", 1, "W"),
    "grid_power_w": hr(35140, "int16", 1, "W", sign=-1),
    "battery_voltage_v": hr(35180, "uint16", 0.1, "V"),
    "battery_power_w": hr(35182, "int32", 1, "W"),
    "pv_energy_wh": hr(35191, "uint32", 0.1, "kWh"),
    "pv_power_w": hr(35301, "uint32", 1, "W"),
    "battery_soc_pct": hr(37007, "uint16", 1, "%"),
    "work_mode": hr(47000, "uint16"),
    "ems_mode": hr(47511, "uint16"),
    "ems_power_limit_w": hr(47512, "uint16", 1, "W"),
}

# Eastron, "SDM72DM-V2 User Manual" V1.1 (2021), as shipped in nmakel/sdm_modbus @
# fead352846b36ff8ca9f89c1491ee047ab2b55d1, documents/sdm72d-m-v2-manual_v1.1.pdf: input
# registers 30001 + address, holding 40001 + address, every value a float, energies in kWh.
EASTRON = {
    "voltage_l1_v": ir(0x00, "float32", 1, "V"),
    "voltage_l2_v": ir(0x02, "float32", 1, "V"),
    "voltage_l3_v": ir(0x04, "float32", 1, "V"),
    "current_l1_a": ir(0x06, "float32", 1, "A"),
    "current_l2_a": ir(0x08, "float32", 1, "A"),
    "current_l3_a": ir(0x0A, "float32", 1, "A"),
    "power_l1_w": ir(0x0C, "float32", 1, "W"),
    "power_l2_w": ir(0x0E, "float32", 1, "W"),
    "power_l3_w": ir(0x10, "float32", 1, "W"),
    "power_total_w": ir(0x34, "float32", 1, "W"),
    "frequency_hz": ir(0x46, "float32", 1, "Hz"),
    "import_energy_wh": ir(0x48, "float32", 1, "kWh"),
    "export_energy_wh": ir(0x4A, "float32", 1, "kWh"),
    "total_energy_wh": ir(0x156, "float32", 1, "kWh"),
    "modbus_address": hr(0x14, "float32"),
    "baud_rate_code": hr(0x1C, "float32"),
}

# volkszaehler/mbmd @ fb8f9c22f1210740ac89064fb55610613bba3f78,
# meters/rs485/carlogavazzi-em24.go (RS-485 EM24 DIN): function 4, 32-bit values word-swapped,
# V /10, A /1000, W /10, Hz /10 (16 bit), kWh /10.
EM24 = {
    "voltage_l1_v": ir(0x00, "int32", 0.1, "V", word_order="little"),
    "voltage_l2_v": ir(0x02, "int32", 0.1, "V", word_order="little"),
    "voltage_l3_v": ir(0x04, "int32", 0.1, "V", word_order="little"),
    "current_l1_a": ir(0x0C, "int32", 0.001, "A", word_order="little"),
    "current_l2_a": ir(0x0E, "int32", 0.001, "A", word_order="little"),
    "current_l3_a": ir(0x10, "int32", 0.001, "A", word_order="little"),
    "power_l1_w": ir(0x12, "int32", 0.1, "W", word_order="little"),
    "power_l2_w": ir(0x14, "int32", 0.1, "W", word_order="little"),
    "power_l3_w": ir(0x16, "int32", 0.1, "W", word_order="little"),
    "power_total_w": ir(0x28, "int32", 0.1, "W", word_order="little"),
    "frequency_hz": ir(0x37, "int16", 0.1, "Hz"),
    "import_energy_wh": ir(0x42, "int32", 0.1, "kWh", word_order="little"),
    "export_energy_wh": ir(0x5C, "int32", 0.1, "kWh", word_order="little"),
}

# volkszaehler/mbmd, same commit, meters/rs485/carlogavazzi-em24_e1.go, and nmakel/sdm_modbus @
# fead352846b36ff8ca9f89c1491ee047ab2b55d1, src/sdm_modbus/carlogavazzi.py class EM24 (Ethernet
# EM24 E1; VA sys and var sys from sdm_modbus only).
EM24_E1 = {
    **{name: fact for name, fact in EM24.items() if fact.address < 0x2E},
    "apparent_power_total_va": ir(0x2A, "int32", 0.1, "VA", word_order="little"),
    "reactive_power_total_var": ir(0x2C, "int32", 0.1, "var", word_order="little"),
    "frequency_hz": ir(0x33, "int16", 0.1, "Hz"),
    "import_energy_wh": ir(0x34, "int32", 0.1, "kWh", word_order="little"),
    "export_energy_wh": ir(0x4E, "int32", 0.1, "kWh", word_order="little"),
}

SOURCES: dict[str, dict[str, Fact]] = {
    "huawei_sun2000": HUAWEI,
    "sungrow_sh": SUNGROW,
    "victron_gx": VICTRON,
    "goodwe_et": GOODWE,
    "eastron_sdm72d": EASTRON,
    "carlo_gavazzi_em24": EM24,
    "carlo_gavazzi_em24_e1": EM24_E1,
}

CASES = [(m, p) for m, facts in SOURCES.items() for p in facts]


def expected_scale(fact: Fact, map_unit: str) -> float:
    """The scale a map must carry to turn the source's raw value into wattmesh's unit and sign."""
    same = fact.source_unit in ("", map_unit)
    factor = 1.0 if same else CONVERSION[(fact.source_unit, map_unit)]
    return fact.sign * fact.resolution * factor


@pytest.mark.parametrize(("map_name", "point"), CASES)
def test_each_point_matches_its_cited_source(map_name: str, point: str) -> None:
    fact = SOURCES[map_name][point]
    regmap = load_builtin_map(map_name)
    p = regmap.point(point)
    assert (p.address, p.table, p.data_type) == (fact.address, fact.table, fact.data_type)
    if p.count > 1:  # word order means nothing for one register
        assert p.word_order == fact.word_order
    assert p.scale == pytest.approx(expected_scale(fact, p.unit), rel=1e-12)
    if fact.source_unit:
        assert fact.source_unit == p.unit or (fact.source_unit, p.unit) in CONVERSION
    assert (p.unit_id or regmap.unit_id) == (fact.unit_id or regmap.unit_id)


@pytest.mark.parametrize("map_name", sorted(SOURCES))
def test_every_point_of_a_vendor_map_is_pinned_to_a_source(map_name: str) -> None:
    names = {p.name for p in load_builtin_map(map_name).points}
    assert names == set(SOURCES[map_name])


@pytest.mark.parametrize("map_name", sorted(SOURCES))
def test_each_map_header_names_the_sources_it_was_checked_against(map_name: str) -> None:
    header = (MAPS / f"{map_name}.toml").read_text(encoding="utf-8").split("\nname =")[0]
    assert "# Checked against" in header
    assert re.search(r"[\w.-]+/[\w.-]+ @ [0-9a-f]{40}", header), "a repository at a commit"
    assert "# Confirmed" in header and "# Not confirmed" in header


def _control(regmap: RegisterMap) -> tuple[object, ...]:
    assert regmap.battery is not None and regmap.battery.control is not None
    c = regmap.battery.control
    return (c.mode_idle, c.mode_charge, c.mode_discharge, dict(c.prepare))


def test_huawei_forcible_command_values_match_the_library() -> None:
    # register_values.py: StorageForcibleChargeDischarge STOP 0, CHARGE 1, DISCHARGE 2;
    # StorageForcibleChargeDischargeTargetMode TIME 0.
    assert _control(load_builtin_map("huawei_sun2000")) == (0, 1, 2, {"forcible_setting_mode": 0})


def test_sungrow_forced_mode_commands_match_the_home_assistant_config() -> None:
    # modbus_sungrow.yaml: EMS mode "Forced mode": 2; command 0xAA charge, 0xBB discharge,
    # 0xCC stop; power flow status bit 1 charging, bit 2 discharging.
    regmap = load_builtin_map("sungrow_sh")
    assert _control(regmap) == (0xCC, 0xAA, 0xBB, {"ems_mode": 2})
    assert regmap.battery is not None
    assert (regmap.battery.charging_mask, regmap.battery.discharging_mask) == (0x2, 0x4)


def test_goodwe_ems_modes_match_the_library() -> None:
    # goodwe/inverter.py EMSMode: BATTERY_STANDBY 8, CHARGE_BATTERY 11, DISCHARGE_BATTERY 12.
    assert _control(load_builtin_map("goodwe_et")) == (8, 11, 12, {})


def test_victron_control_is_the_signed_ac_in_setpoint_of_the_vebus_service() -> None:
    regmap = load_builtin_map("victron_gx")
    assert regmap.battery is not None and regmap.battery.control is not None
    control = regmap.battery.control
    assert (control.setpoint, control.setpoint_kind) == ("ess_power_setpoint_l1_w", "signed")
    assert regmap.unit_id == 100  # unitid2di.csv: 100 is the GX's own services
