"""The what-if's modified scenarios, its bounds, and its valuation of stored energy (the MCP
tool that runs a whole what-if is tested through the SDK's client in test_mcp.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulators.scenario import BatteryConfig, ScenarioConfig, load_scenario
from wattmesh.backtest import run_backtest
from wattmesh.whatif import WhatIfError, parse_start, run_whatif, stored_value, with_battery

ROOT = Path(__file__).resolve().parent.parent
COMMUNITY = ROOT / "config" / "scenarios" / "community.toml"


@pytest.fixture(scope="module")
def community() -> ScenarioConfig:
    return load_scenario(COMMUNITY)


def _batteries(scenario: ScenarioConfig, site: str) -> list[BatteryConfig]:
    return [
        d for s in scenario.sites if s.id == site for d in s.devices if isinstance(d, BatteryConfig)
    ]


def test_a_battery_is_added_where_there_is_none_resized_where_there_is_one_or_removed(
    community: ScenarioConfig,
) -> None:
    added = with_battery(community, "house-2", capacity_kwh=10, power_kw=5)
    resized = with_battery(community, "house-1", capacity_kwh=20, power_kw=8, soc_pct=70)
    removed = with_battery(community, "house-1", capacity_kwh=0, power_kw=0)

    [new] = _batteries(added, "house-2")
    assert (new.name, new.capacity_wh, new.rated_power_w, new.soc_pct) == (
        "house-2-whatif-battery", 10_000.0, 5000.0, 50.0,
    )  # fmt: skip
    [old] = _batteries(community, "house-1")
    [bigger] = _batteries(resized, "house-1")
    assert (bigger.name, bigger.capacity_wh, bigger.rated_power_w, bigger.soc_pct) == (
        old.name, 20_000.0, 8000.0, 70.0,
    )  # fmt: skip
    assert bigger.charge_efficiency == old.charge_efficiency
    assert bigger.soc_min_pct == old.soc_min_pct
    assert _batteries(removed, "house-1") == []
    assert [d.name for s in removed.sites if s.id == "house-1" for d in s.devices] == [
        "house1-pv", "house1-meter",
    ]  # fmt: skip
    # Nothing else changes, and the scenario itself is left as it was.
    for changed, site in ((added, "house-2"), (resized, "house-1"), (removed, "house-1")):
        assert [s for s in changed.sites if s.id != site] == [
            s for s in community.sites if s.id != site
        ]
    assert _batteries(community, "house-2") == []


@pytest.mark.parametrize(
    ("site", "kwargs", "message"),
    [
        ("house-9", {"capacity_kwh": 10, "power_kw": 5}, "no site 'house-9'"),
        ("house-2", {"capacity_kwh": -1, "power_kw": 5}, "capacity_kwh must be from 0"),
        ("house-2", {"capacity_kwh": 20_000, "power_kw": 5}, "to 10000 kWh"),
        ("house-2", {"capacity_kwh": 10, "power_kw": 0}, "power_kw must be above 0"),
        ("house-2", {"capacity_kwh": 10, "power_kw": 50}, "more than 4 times"),
        ("house-2", {"capacity_kwh": 10, "power_kw": 5, "soc_pct": 150}, "soc_pct must be"),
        ("house-2", {"capacity_kwh": 10, "power_kw": 5, "soc_pct": 2}, "bounds 5-100 %"),
    ],
)
def test_a_battery_outside_the_bounds_is_refused_with_the_reason(
    community: ScenarioConfig, site: str, kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(WhatIfError, match=message):
        with_battery(community, site, **kwargs)


@pytest.mark.parametrize(("days", "message"), [(0.0, "days must be above 0"), (15.0, "at most 14")])
def test_a_run_longer_than_two_weeks_or_of_no_time_is_refused_before_simulating(
    community: ScenarioConfig, days: float, message: str
) -> None:
    with pytest.raises(WhatIfError, match=message):
        run_whatif(community, "house-2", capacity_kwh=10, power_kw=5, days=days)


def test_a_start_must_be_an_iso_date_and_is_taken_as_utc() -> None:
    assert parse_start("2026-06-22").isoformat() == "2026-06-22T00:00:00+00:00"
    assert parse_start("2026-06-22T06:00:00+02:00").utcoffset() is not None
    with pytest.raises(WhatIfError, match="not an ISO 8601"):
        parse_start("last week")


def test_stored_energy_is_valued_as_the_economics_benchmark_values_it(
    community: ScenarioConfig,
) -> None:
    from wattmesh.economics import stored_value as economics_stored_value

    result = run_backtest(community, days=0.25)
    per_site = {name: stored_value(result, name) for name in result.sites}
    assert stored_value(result) == pytest.approx(economics_stored_value(result), abs=1e-9)
    assert sum(per_site.values()) == pytest.approx(stored_value(result), abs=1e-9)
    assert per_site["house-2"] == 0.0  # no battery there
    assert per_site["house-1"] != 0.0  # its battery moved over six hours


def test_the_mcp_tool_description_states_the_engine_bounds() -> None:
    from wattmesh.mcp_server import WHAT_IF
    from wattmesh.whatif import MAX_DAYS

    assert f"at most {MAX_DAYS:g})" in WHAT_IF
