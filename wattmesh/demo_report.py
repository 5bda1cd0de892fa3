"""The ``wattmesh demo`` report: what the live run cost against what the same sites would
have paid without wattmesh, billed the same way (:mod:`wattmesh.economics`).

Three alternatives over the same settled 15-minute intervals, weather, loads and tariffs:

- ours: the live run's metered energy, from its ledger;
- (i) idle: every battery idle, no market, no grid balancing;
- (ii) local: every battery under its own site's controller (self-consumption; the factory's
  keeps its peak shaving), no market, no grid balancing: what an owner would run anyway;

(i) and (ii) run on the stepped engine (:func:`wattmesh.backtest.run_backtest`) over the
demo's scenario, start and span. All three are billed in the chosen regime, with the battery
energy gained or drained valued at the last retail tariff over the site's charge efficiency.
The ledger's own figures (net cost, baseline, savings) are printed beside them with the words
and rounding of ``wattmesh ledger report``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coordinator.config import CoordinatorConfig
from coordinator.ledger import Ledger, SiteReport, to_currency
from simulators.scenario import BatteryConfig, ScenarioConfig
from wattmesh.backtest import BacktestResult, Variant, run_backtest
from wattmesh.economics import (
    Contract,
    Figures,
    SiteEnergy,
    Usage,
    figures,
    saving_pct,
    site_costs,
    usage_of,
)
from wattmesh.ledger_cli import LedgerReport, build_report

#: The currency label of the report (as ``wattmesh ledger report``'s default).
CURRENCY = "EUR"
#: The engine's step for the baselines, simulated seconds.
BASELINE_STEP_S = 60.0


class Regime(enum.StrEnum):
    """How the utility bills the community (``docs/architecture.md``, market model)."""

    a = "a"  # one connection point: the utility bills the feeder's net
    b = "b"  # energy sharing with individual meters (the EU renewable-energy community)


REGIME_NAMES = {
    Regime.a: "one connection point",
    Regime.b: "energy sharing with individual meters",
}
#: The baselines and the engine variant each runs.
BASELINES: dict[str, Variant] = {"idle": "idle", "local": "self_consumption"}
#: The alternatives, in the report's order, and how the report names them.
VARIANTS = {"ours": "ours", "idle": "(i) idle", "local": "(ii) local"}


@dataclass(frozen=True)
class Storage:
    """A site's batteries taken together: capacity (Wh), the scenario's initial SOC (%),
    capacity-weighted efficiencies."""

    capacity_wh: float
    soc_pct: float
    charge_efficiency: float
    discharge_efficiency: float


def storage_of(scenario: ScenarioConfig) -> dict[str, Storage]:
    """Each site with batteries: its batteries taken together."""
    out = {}
    for site in scenario.sites:
        mine = [d for d in site.devices if isinstance(d, BatteryConfig)]
        if not mine:
            continue
        capacity = np.array([b.capacity_wh for b in mine])
        weights = capacity / capacity.sum()
        out[site.id] = Storage(
            float(capacity.sum()),
            float(np.dot(weights, [b.soc_pct for b in mine])),
            float(np.dot(weights, [b.charge_efficiency for b in mine])),
            float(np.dot(weights, [b.discharge_efficiency for b in mine])),
        )
    return out


def soc_at(rows: list[dict[str, Any]], site: str, ts: float, storage: Storage) -> float | None:
    """The site's SOC (%) at ``ts`` from its sampled telemetry (rows of ``ts``, ``site``,
    ``soc_pct``, ``battery_w``): the sample nearest to ``ts``, moved on (or back) to ``ts`` at
    the battery power (W, + discharges) it reported then. None without a sample."""
    mine = [r for r in rows if r["site"] == site and r["soc_pct"] is not None]
    if not mine:
        return None
    row = min(mine, key=lambda r: abs(r["ts"] - ts))
    power_w = float(row["battery_w"] or 0.0)
    eta = 1.0 / storage.discharge_efficiency if power_w > 0 else storage.charge_efficiency
    change_wh = -power_w * eta * (ts - row["ts"]) / 3600.0
    return float(min(100.0, max(0.0, row["soc_pct"] + 100.0 * change_wh / storage.capacity_wh)))


def live_usage(
    ledger: Ledger,
    scenario: ScenarioConfig,
    rows: list[dict[str, Any]],
    feeder_limit_w: float,
    interval_s: float,
) -> Usage:
    """The live run as billing sees it: each site's metered energy in each settled interval
    (kWh, + imports; zero where a site was not settled), the tariffs the ledger settled at,
    and each site's stored energy from the scenario's start to the end of the last settled
    interval (from its telemetry, :func:`soc_at`)."""
    settled = ledger.settled_intervals()
    names = sorted(s.id for s in scenario.sites)
    metered = {n: np.zeros(len(settled)) for n in names}
    retail, feed_in = np.zeros(len(settled)), np.zeros(len(settled))
    for j, k in enumerate(settled):
        result = ledger.settlement(k)
        if result is None:  # pragma: no cover - listed as settled
            continue
        retail[j] = result.retail_price_micro_per_kwh / 1e6
        feed_in[j] = result.feed_in_price_micro_per_kwh / 1e6
        for s in result.sites:
            if s.site in metered:
                metered[s.site][j] = s.metered_wh / 1000.0
    storage = storage_of(scenario)
    end_ts = (settled[-1] + 1) * interval_s if settled else scenario.start_ts
    sites = {}
    for n in names:
        st = storage.get(n)
        if st is None:
            sites[n] = SiteEnergy(0.0, 0.0)
            continue
        start_kwh = st.soc_pct / 100.0 * st.capacity_wh / 1000.0
        soc = soc_at(rows, n, end_ts, st)
        end_kwh = start_kwh if soc is None else soc / 100.0 * st.capacity_wh / 1000.0
        sites[n] = SiteEnergy(start_kwh, end_kwh)
    return Usage(
        intervals=settled,
        sites=sites,
        metered_kwh=metered,
        retail_per_kwh=retail,
        feed_in_per_kwh=feed_in,
        charge_efficiency={n: storage[n].charge_efficiency if n in storage else 1.0 for n in names},
        feeder_limit_w=feeder_limit_w,
    )


def baseline_runs(
    scenario: ScenarioConfig, coordinator: CoordinatorConfig, end_ts: float
) -> dict[str, BacktestResult]:
    """(i) idle and (ii) local on the stepped engine, from the scenario's start to ``end_ts``,
    with the demo's feeder, tariffs, roles and fallbacks."""
    days = max(end_ts - scenario.start_ts, 0.0) / 86_400.0
    return {
        key: run_backtest(
            scenario, days=days, coordinator=coordinator, step_s=BASELINE_STEP_S, variant=variant
        )
        for key, variant in BASELINES.items()
    }


@dataclass(frozen=True)
class Comparison:
    """Ours, (i) and (ii) over the intervals all three settled, billed in one regime."""

    regime: Regime
    usage: dict[str, Usage]  # by VARIANTS key
    figures: dict[str, Figures]  # community cost (stored energy valued), feeder peak
    site_costs: dict[str, dict[str, float]] | None  # regime (b): by variant, by site

    @property
    def intervals(self) -> tuple[int, ...]:
        """The intervals billed."""
        return self.usage["ours"].intervals


def compare(ours: Usage, baselines: dict[str, BacktestResult], regime: Regime) -> Comparison:
    """Bill ours and the baselines over the intervals all of them settled."""
    common = set(ours.intervals)
    for run in baselines.values():
        common &= set(run.settled)
    keep = tuple(sorted(common))
    usage = {"ours": usage_of(ours, ours.intervals, keep)}
    for key, run in baselines.items():
        usage[key] = usage_of(run, run.settled, keep)
    contract = Contract(regime.value)
    per_site = {key: site_costs(u, contract) for key, u in usage.items()}
    return Comparison(
        regime=regime,
        usage=usage,
        figures={key: figures(u, contract) for key, u in usage.items()},
        site_costs=None if regime == Regime.a else {k: v or {} for k, v in per_site.items()},
    )


def money_cell(amount_micro: int, decimals: int = 2) -> str:
    """Money as ``wattmesh ledger report`` prints it: rounded half up, no ``-0.00``."""
    value = to_currency(amount_micro).quantize(Decimal(1).scaleb(-decimals), ROUND_HALF_UP)
    return f"{abs(value) if value == 0 else value:,f}"


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _ledger_table(report: LedgerReport) -> Table:
    table = Table(
        title=f"Settlement, as `wattmesh ledger report` ({CURRENCY}; positive cost = the site "
        "pays; before stored energy)",
        title_justify="left",
    )
    table.add_column("site")
    for col in ("bought kWh", "sold kWh", "net cost", "baseline", "savings"):
        table.add_column(col, justify="right", no_wrap=True)
    rows: list[tuple[str, SiteReport]] = [(escape(r.site), r) for r in report.sites]
    rows.append((f"[bold]community ({len(report.all_sites)} sites)[/bold]", report.total))
    for i, (label, r) in enumerate(rows):
        table.add_row(
            label,
            f"{r.bought_wh / 1000:,.1f}",
            f"{r.sold_wh / 1000:,.1f}",
            money_cell(r.net_cost_micro),
            money_cell(r.baseline_cost_micro),
            money_cell(r.savings_micro),
            end_section=i == len(rows) - 2,
        )
    return table


def _comparison_table(c: Comparison) -> Table:
    table = Table(
        title=f"Against the same sites without wattmesh, regime ({c.regime.value}) "
        f"{REGIME_NAMES[c.regime]} ({CURRENCY}; stored energy valued)",
        title_justify="left",
    )
    table.add_column("")
    for col in ("stored kWh", *VARIANTS.values(), "vs (i) %", "vs (ii) %"):
        table.add_column(col, justify="right", no_wrap=True)

    def row(label: str, costs: dict[str, float], gained_kwh: float, last: bool) -> None:
        table.add_row(
            label,
            f"{round(gained_kwh, 1) + 0.0:+,.1f}",  # no "-0.0"
            *(f"{costs[k]:,.2f}" for k in VARIANTS),
            saving_pct(costs["ours"], costs["idle"]),
            saving_pct(costs["ours"], costs["local"]),
            end_section=last,
        )

    ours = c.usage["ours"]
    if c.site_costs is not None:
        names = sorted(ours.metered_kwh)
        for name in names:
            s = ours.sites[name]
            row(
                escape(name),
                {k: c.site_costs[k][name] for k in VARIANTS},
                s.stored_end_kwh - s.stored_start_kwh,
                name == names[-1],
            )
    gained = sum(s.stored_end_kwh - s.stored_start_kwh for s in ours.sites.values())
    row("[bold]community[/bold]", {k: c.figures[k].cost for k in VARIANTS}, gained, False)
    return table


def print_report(
    console: Console,
    report: LedgerReport,
    comparison: Comparison,
    interval_s: float,
    sampled_peak_w: float,
) -> None:
    """The report: the ledger's settlement, then ours against (i) and (ii), then the feeder."""
    billed = comparison.intervals
    if report.intervals:
        console.print(
            f"Report: {len(report.intervals)} settled interval(s), "
            f"{_utc(report.intervals[0] * interval_s)} to "
            f"{_utc((report.intervals[-1] + 1) * interval_s)} UTC",
            highlight=False,
        )
    else:
        console.print("Report: no settled interval", highlight=False)
    console.print(_ledger_table(report))
    console.print(
        "baseline: what the utility alone would have billed the site's metered energy (import "
        "at retail, export at feed-in; no trading); savings: baseline - net cost",
        highlight=False,
    )
    console.print(_comparison_table(comparison))
    console.print(
        f"{len(billed)} interval(s) billed alike for all three. ours: this run's metered "
        "energy; (i) idle: batteries idle; (ii) local: each battery under its own site's "
        "controller (self-consumption; the factory's peak shaving), which an owner would run "
        "anyway; (i) and (ii) on the stepped engine, same weather, loads and tariffs, no "
        "market. stored kWh: energy ours gained (+) or drained (-) in batteries, valued at "
        "the last retail tariff over the charge efficiency (each alternative its own). "
        f"% of the baseline's cost (+: ours cheaper), n/a where that cost is under 1 {CURRENCY}."
        + (
            ""
            if comparison.site_costs is not None
            else " Per-site lines need regime (b): behind one connection point only the "
            "feeder is billed."
        ),
        highlight=False,
    )
    f = comparison.figures
    limit_kw = comparison.usage["ours"].feeder_limit_w / 1000.0
    console.print(
        f"feeder, largest 15-minute mean import: ours {f['ours'].peak_kw:.1f} kW, (i) "
        f"{f['idle'].peak_kw:.1f} kW, (ii) {f['local'].peak_kw:.1f} kW (limit "
        f"{limit_kw:.0f} kW); energy above the limit: ours {f['ours'].above_limit_kwh:.1f} "
        f"kWh, (i) {f['idle'].above_limit_kwh:.1f}, (ii) {f['local'].above_limit_kwh:.1f}; "
        f"highest sampled flow (ours) {sampled_peak_w / 1000:.1f} kW; ledger balanced: "
        f"{'yes' if report.balanced else 'NO'}",
        highlight=False,
    )


def report_json(
    report: LedgerReport, comparison: Comparison, sampled_peak_w: float
) -> dict[str, Any]:
    """``report.json``: the ledger's figures per site (money as floats of currency, energy in
    kWh) and the comparison (costs with stored energy valued)."""
    ours = comparison.usage["ours"]
    sites: dict[str, dict[str, Any]] = {}
    for r in report.sites:
        s = ours.sites.get(r.site, SiteEnergy(0.0, 0.0))
        sites[r.site] = {
            "traded_kwh": (r.bought_wh + r.sold_wh) / 1000.0,
            "import_kwh": r.metered_import_wh / 1000.0,
            "export_kwh": r.metered_export_wh / 1000.0,
            "cost": float(to_currency(r.net_cost_micro)),  # the ledger's net cost
            "baseline_cost": float(to_currency(r.baseline_cost_micro)),  # utility alone
            "savings": float(to_currency(r.savings_micro)),
            "stored_start_kwh": s.stored_start_kwh,
            "stored_end_kwh": s.stored_end_kwh,
        }
        if comparison.site_costs is not None:
            sites[r.site]["costs"] = {k: comparison.site_costs[k][r.site] for k in VARIANTS}
    f = comparison.figures
    return {
        "currency": CURRENCY,
        "regime": comparison.regime.value,
        "settled_intervals": len(report.intervals),
        "billed_intervals": len(comparison.intervals),
        "balanced": report.balanced,
        "sites": sites,
        "community": {
            "cost": float(to_currency(report.total.net_cost_micro)),
            "baseline_cost": float(to_currency(report.total.baseline_cost_micro)),
            "costs": {k: f[k].cost for k in VARIANTS},
            "stored_gain_kwh": {
                k: sum(s.stored_end_kwh - s.stored_start_kwh for s in u.sites.values())
                for k, u in comparison.usage.items()
            },
        },
        "feeder": {
            "limit_w": ours.feeder_limit_w,
            "peak_interval_import_w": {k: 1000.0 * f[k].peak_kw for k in VARIANTS},
            "above_limit_kwh": {k: f[k].above_limit_kwh for k in VARIANTS},
            "sampled_peak_w": sampled_peak_w,
        },
    }


def build(
    ledger_path: Path,
    scenario: ScenarioConfig,
    rows: list[dict[str, Any]],
    coordinator: CoordinatorConfig,
    regime: Regime,
) -> tuple[LedgerReport, Comparison]:
    """Read the live run's ledger, run the baselines over its span, and compare."""
    interval_s = float(coordinator.market.interval_s)
    with Ledger(ledger_path) as ledger:
        report = build_report(ledger)
        ours = live_usage(ledger, scenario, rows, coordinator.grid.import_limit_w, interval_s)
    end_ts = (ours.intervals[-1] + 1) * interval_s if ours.intervals else scenario.start_ts
    return report, compare(ours, baseline_runs(scenario, coordinator, end_ts), regime)


def interval_flow_kw(
    usage: Usage, interval_s: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The feeder's mean flow (kW, + imports) in each billed interval, and the intervals'
    starts (s since the epoch)."""
    names = sorted(usage.metered_kwh)
    if not names or not usage.intervals:
        return np.zeros(0), np.zeros(0)
    kwh = np.sum([usage.metered_kwh[n] for n in names], axis=0)
    return np.asarray(usage.intervals, dtype=np.float64) * interval_s, kwh * 3600.0 / interval_s


def plot(
    path: Path,
    rows: list[dict[str, Any]],
    comparison: Comparison,
    coordinator: CoordinatorConfig,
    title: str,
) -> Path:
    """The day as a PNG: the feeder's flow (ours sampled and per interval, (ii)'s per
    interval, both limits), the clearing price and tariffs, each battery's SOC; time of day
    (UTC) on the x axis."""
    import matplotlib as mpl  # noqa: PLC0415 - only when writing the plot

    mpl.use("Agg")
    import matplotlib.dates as mdates  # noqa: PLC0415
    import matplotlib.pyplot as plt  # noqa: PLC0415

    def when(ts: float) -> datetime:
        return datetime.fromtimestamp(ts, UTC)

    interval_s = float(coordinator.market.interval_s)
    grid = coordinator.grid
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 9.5), sharex=True)
    fig.suptitle(title)
    feeder: dict[float, float] = {}
    price: dict[float, float] = {}
    soc: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        feeder[row["ts"]] = row["feeder_w"] / 1000.0
        if row["price_per_kwh"] is not None:
            price[row["ts"]] = row["price_per_kwh"]
        if row["soc_pct"] is not None:
            soc.setdefault(row["site"], []).append((row["ts"], row["soc_pct"]))
    ax1.plot(
        [when(t) for t in feeder], list(feeder.values()), lw=0.8, alpha=0.6, label="ours, sampled"
    )
    for key, style in (("ours", "-"), ("local", "--")):
        starts, kw = interval_flow_kw(comparison.usage[key], interval_s)
        if len(starts):
            ax1.step(
                [when(t) for t in [*starts, starts[-1] + interval_s]],
                [*kw, kw[-1]],
                where="post",
                ls=style,
                label=f"{VARIANTS[key]}, 15-minute mean",
            )
    ax1.axhline(grid.import_limit_w / 1000.0, color="red", ls=":", label="import limit")
    ax1.axhline(-grid.export_limit_w / 1000.0, color="darkred", ls=":", label="export limit")
    ax1.axhline(0.0, color="grey", lw=0.5)
    ax1.axhspan(-grid.export_limit_w / 1000.0, 0.0, color="green", alpha=0.05)
    ax1.text(
        0.01,
        -5.0,
        "export (negative)",
        transform=ax1.get_yaxis_transform(),
        va="top",
        color="green",
    )
    ax1.set_ylabel("feeder flow, kW (+ import, - export)")
    ax1.legend(loc="upper right", fontsize="small", ncols=2)
    if price:
        ax2.step(
            [when(t) for t in price], list(price.values()), where="post", label="clearing price"
        )
    if feeder:
        first, last = min(feeder) // interval_s * interval_s, max(feeder) + interval_s
        tariff_ts = np.arange(first, last, interval_s)
        tariffs = np.array(
            [coordinator.tariff.at(t, coordinator.coordinator.utc_offset_h) for t in tariff_ts]
        )
        for column, style, label in ((0, "--", "retail tariff"), (1, ":", "feed-in tariff")):
            ax2.step(
                [when(t) for t in tariff_ts],
                tariffs[:, column],
                where="post",
                ls=style,
                label=label,
            )
    ax2.set_ylabel(f"price, {CURRENCY}/kWh")
    ax2.legend(loc="upper right", fontsize="small")
    for name, points in sorted(soc.items()):
        ax3.plot([when(t) for t, _ in points], [s for _, s in points], label=name)
    ax3.set_ylabel("battery SOC, %")
    ax3.set_xlabel("time of day, UTC")
    ax3.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=UTC))  # type: ignore[no-untyped-call]
    if soc:
        ax3.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
