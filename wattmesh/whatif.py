"""What-if: what a battery added, resized or removed at one site would have changed.

Runs the stepped simulation engine (:func:`wattmesh.backtest.run_backtest`) twice on the same
scenario, weather and loads, from the same start for the same number of days: once as the
scenario is, once with the site's battery changed (:func:`with_battery`), and compares them.

Units and signs: money in currency units, positive when paid (a cost); a saving is the cost as
the scenario is minus the cost with the change, so positive when the change saves. Battery
energy left at the end is valued as ``benchmarks/economics.py`` values it (the last settled
interval's retail tariff over the site's charge efficiency per kWh gained, a charge for each
kWh drained; :func:`stored_value`), and the compared cost is the settled cost minus that value.
Energy in kWh, powers in W (the feeder's peak: its largest 15-minute mean import).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field

from simulators.scenario import BatteryConfig, ScenarioConfig, ScenarioError, parse_scenario
from wattmesh import economics
from wattmesh.backtest import BacktestError, BacktestResult, run_backtest

__all__ = [
    "MAX_CAPACITY_KWH",
    "MAX_DAYS",
    "MAX_POWER_KW",
    "Outcome",
    "WhatIf",
    "WhatIfError",
    "parse_start",
    "run_whatif",
    "stored_value",
    "with_battery",
]

#: The longest run a what-if may ask for (two engine runs of about a second per day each).
MAX_DAYS = 14.0
#: The largest battery a what-if may put at a site (10 MWh) and its largest power (5 MW).
MAX_CAPACITY_KWH = 10_000.0
MAX_POWER_KW = 5_000.0
#: The highest power for a battery's capacity: 4 C (a 10 kWh battery: at most 40 kW).
MAX_C_RATE_PER_H = 4.0

WhatIfVariant = Literal["wattmesh", "self_consumption"]


class WhatIfError(ValueError):
    """A what-if that cannot run as asked; the message says which input and why."""


class Outcome(BaseModel):
    """One run: money in currency units (+ paid), energy kWh (+ imported), power W."""

    settled_cost: float = Field(description="The community's settled cost in the ledger.")
    stored_value: float = Field(description="Value of battery energy gained (- drained).")
    cost: float = Field(description="settled_cost - stored_value: what is compared.")
    site_settled_cost: float
    site_stored_value: float
    site_cost: float
    site_import_kwh: float
    site_export_kwh: float
    feeder_peak_w: float = Field(description="Largest 15-minute mean feeder import, W.")
    intervals: int = Field(description="Settled market intervals.")


class WhatIf(BaseModel):
    """A what-if's question and both runs' figures (see the module's units and signs)."""

    scenario: str
    site: str
    capacity_kwh: float = Field(description="The site's battery in the changed run (0: none).")
    power_kw: float
    soc_pct: float = Field(description="Its state of charge at the start, %.")
    start_ts: float
    start: str
    days: float
    variant: WhatIfVariant
    as_is: Outcome
    with_change: Outcome
    saving: float = Field(description="as_is.cost - with_change.cost (+: the change saves).")
    site_saving: float = Field(description="as_is.site_cost - with_change.site_cost.")
    feeder_peak_change_w: float = Field(description="with_change - as_is feeder peak, W.")


def with_battery(
    scenario: ScenarioConfig,
    site: str,
    *,
    capacity_kwh: float,
    power_kw: float,
    soc_pct: float | None = None,
) -> ScenarioConfig:
    """``scenario`` with ``site``'s battery set to ``capacity_kwh`` and ``power_kw``.

    A site without a battery gets one (``<site>-whatif-battery``, initial state of charge
    ``soc_pct``, 50 % by default, the scenario's default efficiencies); a site's one battery is
    resized (its efficiencies and state-of-charge bounds kept; its initial state of charge too
    unless ``soc_pct`` is given); ``capacity_kwh == 0`` removes it. WhatIfError for an unknown
    site, a site with more than one battery, or sizes outside the bounds.
    """
    _check_size(capacity_kwh, power_kw, soc_pct)
    sites = {s.id: s for s in scenario.sites}
    if site not in sites:
        raise WhatIfError(
            f"scenario {scenario.name!r} has no site {site!r}; it has {', '.join(sorted(sites))}"
        )
    target = sites[site]
    batteries = [d for d in target.devices if isinstance(d, BatteryConfig)]
    if len(batteries) > 1:
        names = ", ".join(b.name for b in batteries)
        raise WhatIfError(f"site {site} has {len(batteries)} batteries ({names}); give a site "
                          "with at most one")  # fmt: skip
    others = [d.model_dump() for d in target.devices if not isinstance(d, BatteryConfig)]
    devices = others
    if capacity_kwh > 0:
        if batteries:
            battery = batteries[0].model_dump()
        else:
            battery = {"name": f"{site}-whatif-battery", "kind": "battery", "soc_pct": 50.0}
        battery |= {"capacity_wh": capacity_kwh * 1000.0, "rated_power_w": power_kw * 1000.0}
        if soc_pct is not None:
            battery["soc_pct"] = soc_pct
        lo, hi = battery.get("soc_min_pct", 5.0), battery.get("soc_max_pct", 100.0)
        if not lo <= battery["soc_pct"] <= hi:
            raise WhatIfError(f"soc_pct must lie within the battery's bounds {lo:g}-{hi:g} %")
        devices = [*others, battery]
    if not devices:
        raise WhatIfError(f"site {site} would have no devices left")
    data = scenario.model_dump()
    data["sites"] = [s | {"devices": devices} if s["id"] == site else s for s in data["sites"]]
    try:
        return parse_scenario(data, f"what-if on {scenario.name}")
    except ScenarioError as err:
        raise WhatIfError(str(err)) from err


def _check_size(capacity_kwh: float, power_kw: float, soc_pct: float | None) -> None:
    if not 0 <= capacity_kwh <= MAX_CAPACITY_KWH:
        raise WhatIfError(
            f"capacity_kwh must be from 0 (no battery) to {MAX_CAPACITY_KWH:g} kWh, "
            f"got {capacity_kwh:g}"
        )
    if capacity_kwh == 0:
        return
    if not 0 < power_kw <= MAX_POWER_KW:
        raise WhatIfError(f"power_kw must be above 0 and at most {MAX_POWER_KW:g} kW, "
                          f"got {power_kw:g}")  # fmt: skip
    if power_kw > MAX_C_RATE_PER_H * capacity_kwh:
        raise WhatIfError(
            f"power_kw {power_kw:g} is more than {MAX_C_RATE_PER_H:g} times capacity_kwh "
            f"{capacity_kwh:g}: no battery charges or discharges that fast"
        )
    if soc_pct is not None and not 0 <= soc_pct <= 100:
        raise WhatIfError(f"soc_pct must be from 0 to 100 %, got {soc_pct:g}")


def stored_value(result: BacktestResult, site: str | None = None) -> float:
    """The value (currency) of the battery energy gained over the run, at the last settled
    interval's retail tariff over each site's charge efficiency per kWh (negative when
    drained): :func:`wattmesh.economics.stored_value`, for one site or (None) all."""
    if site is None:
        return economics.stored_value(result)
    return economics.site_stored_value(result, site)


def outcome(result: BacktestResult, site: str) -> Outcome:
    """One run's figures for the community and ``site``."""
    s = result.sites[site]
    value, site_value = stored_value(result), stored_value(result, site)
    return Outcome(
        settled_cost=result.total_cost,
        stored_value=value,
        cost=result.total_cost - value,
        site_settled_cost=s.net_cost,
        site_stored_value=site_value,
        site_cost=s.net_cost - site_value,
        site_import_kwh=s.import_kwh,
        site_export_kwh=s.export_kwh,
        feeder_peak_w=result.feeder_peak_w,
        intervals=result.intervals,
    )


def run_whatif(
    scenario: ScenarioConfig,
    site: str,
    *,
    capacity_kwh: float,
    power_kw: float,
    days: float,
    start: datetime | None = None,
    soc_pct: float | None = None,
    variant: WhatIfVariant = "wattmesh",
) -> WhatIf:
    """Run ``scenario`` from ``start`` (UTC; the scenario's own start when None) for ``days``
    as it is and with ``site``'s battery changed (:func:`with_battery`); both runs' figures
    and the differences. Blocking (about a second per simulated day per run): call it from a
    worker thread in async code. WhatIfError for a question outside the bounds."""
    if not 0 < days <= MAX_DAYS:
        raise WhatIfError(f"days must be above 0 and at most {MAX_DAYS:g}, got {days:g}")
    if variant not in ("wattmesh", "self_consumption"):
        raise WhatIfError(f"variant must be wattmesh or self_consumption, got {variant!r}")
    if start is not None:
        start = start if start.tzinfo else start.replace(tzinfo=UTC)
        scenario = scenario.model_copy(update={"start": start})
    changed = with_battery(
        scenario, site, capacity_kwh=capacity_kwh, power_kw=power_kw, soc_pct=soc_pct
    )
    try:
        as_is = outcome(run_backtest(scenario, days=days, variant=variant), site)
        with_change = outcome(run_backtest(changed, days=days, variant=variant), site)
    except BacktestError as err:
        raise WhatIfError(str(err)) from err
    battery = [d for s in changed.sites if s.id == site for d in s.devices]
    soc = next((d.soc_pct for d in battery if isinstance(d, BatteryConfig)), 0.0)
    return WhatIf(
        scenario=scenario.name,
        site=site,
        capacity_kwh=capacity_kwh,
        power_kw=power_kw if capacity_kwh > 0 else 0.0,
        soc_pct=soc,
        start_ts=scenario.start_ts,
        start=datetime.fromtimestamp(scenario.start_ts, UTC).isoformat(),
        days=days,
        variant=variant,
        as_is=as_is,
        with_change=with_change,
        saving=as_is.cost - with_change.cost,
        site_saving=as_is.site_cost - with_change.site_cost,
        feeder_peak_change_w=with_change.feeder_peak_w - as_is.feeder_peak_w,
    )


def parse_start(text: str) -> datetime:
    """An ISO 8601 date or time (UTC unless it says otherwise); WhatIfError when not one."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise WhatIfError(f"start {text!r} is not an ISO 8601 date or time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
