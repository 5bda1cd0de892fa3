"""Benchmark the coordinator's forecasts against persistence and seasonal-naive baselines.

Run: ``python benchmarks/forecast_skill.py``. Truth comes from :mod:`simulators.physics` for
the community of ``config/scenarios/community.toml`` (48.14 N, 11.58 E, local time UTC+1):

- ``solar-farm``: office load 800-3000 W, PV 340 kWp DC / 300 kW AC;
- ``factory``: factory load 40-180 kW (day classes weekday / Saturday / Sunday);
- ``house-1``: household load 250-4500 W, PV 6.9 kWp DC / 6 kW AC;
- ``house-2``: household load 200-3500 W.

PV is ``pv_ac_power_w(clear-sky GHI * cloud_index(ts, seed))`` (default cloud statistics: mean
clear-sky index about 0.78, std 0.25, clouds changing within an hour); loads are
``load_power_w`` with their seeded noise. For every seed, start date and issue time, each
forecaster sees the last 7 days at 15-min steps and forecasts the next 24 h at 15-min steps;
MAE is taken over all forecast points of all runs. Issue times cover every weekday of a week (so
Mondays and weekends are in), at 00:00 and 12:00 UTC, in three seasons.

Price: time-of-use retail 0.32 per kWh 07:00-22:00 local, 0.22 otherwise; feed-in 0.08. There is
no auction here, so the "realised" price is the rule the market's price follows when bids do not
set it: retail when the community imports, feed-in when it exports
(``price_forecast_per_kwh(true net load, band=0)``). Ours applies the same rule to our forecast
net load (sum of our load forecasts minus our PV forecasts); the baselines apply persistence and
seasonal-naive to the realised price history.

Skill = 1 - MAE_ours / MAE_baseline (> 0: ours is better). Exits 1 unless ours beats both
baselines for PV and load (the issue's goal).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from numpy.typing import NDArray

from coordinator.forecast import (
    DAY_CLASSES_WEEKDAY_SATURDAY_SUNDAY,
    DAY_CLASSES_WEEKDAY_WEEKEND,
    community_net_load_w,
    load_forecast_w,
    mae,
    persistence_forecast,
    price_forecast_per_kwh,
    pv_forecast_w,
    seasonal_naive_forecast,
)
from simulators.physics import (
    LoadProfile,
    clear_sky_ghi_w_per_m2,
    cloud_index,
    load_power_w,
    pv_ac_power_w,
)

LATITUDE_DEG = 48.14
LONGITUDE_DEG = 11.58
UTC_OFFSET_H = 1.0
STEP_S = 900.0
DAY_S = 86_400.0
HISTORY_DAYS = 7
HORIZON_S = DAY_S
SEEDS = (1, 2, 3, 4, 5)
START_DATES = ((2026, 3, 16), (2026, 6, 22), (2026, 9, 14))  # Mondays in three seasons
ISSUE_HOURS_UTC = (0.0, 12.0)
RETAIL_PEAK_PER_KWH = 0.32
RETAIL_OFFPEAK_PER_KWH = 0.22
FEED_IN_PER_KWH = 0.08
PRICE_BAND_W = 20_000.0

Array = NDArray[np.float64]


@dataclass(frozen=True)
class Site:
    name: str
    profile: LoadProfile
    base_w: float
    peak_w: float
    day_classes: tuple[int, ...]
    rated_dc_w: float = 0.0
    rated_ac_w: float = 0.0


SITES = (
    Site("solar-farm", "office", 800.0, 3_000.0, DAY_CLASSES_WEEKDAY_WEEKEND, 340e3, 300e3),
    Site("factory", "factory", 40e3, 180e3, DAY_CLASSES_WEEKDAY_SATURDAY_SUNDAY),
    Site("house-1", "household", 250.0, 4_500.0, DAY_CLASSES_WEEKDAY_WEEKEND, 6_900.0, 6_000.0),
    Site("house-2", "household", 200.0, 3_500.0, DAY_CLASSES_WEEKDAY_WEEKEND),
)


def true_pv_w(site: Site, ts: Array, seed: int) -> Array:
    """Simulated PV AC power [W] of a site."""
    ghi = clear_sky_ghi_w_per_m2(ts, LATITUDE_DEG, LONGITUDE_DEG) * cloud_index(ts, seed)
    return pv_ac_power_w(ghi, site.rated_dc_w, site.rated_ac_w)


def true_load_w(site: Site, ts: Array, seed: int, index: int) -> Array:
    """Simulated load [W] of a site."""
    return load_power_w(
        ts, site.profile, site.base_w, site.peak_w, seed * 100 + index, UTC_OFFSET_H
    )


def retail_per_kwh(ts: Array) -> Array:
    """Time-of-use retail tariff [per kWh]: peak 07:00-22:00 local time."""
    hour = ((ts / 3600.0 + UTC_OFFSET_H) % 24.0).astype(np.float64)
    peak = (hour >= 7.0) & (hour < 22.0)
    return np.where(peak, RETAIL_PEAK_PER_KWH, RETAIL_OFFPEAK_PER_KWH).astype(np.float64)


def realised_price_per_kwh(net_load_w: Array, ts: Array) -> Array:
    """The price rule without bids: retail when importing, feed-in when exporting."""
    return price_forecast_per_kwh(net_load_w, retail_per_kwh(ts), FEED_IN_PER_KWH)


@dataclass
class Scores:
    forecast: dict[str, list[Array]]
    truth: list[Array]

    def add(self, truth: Array, **forecasts: Array) -> None:
        self.truth.append(truth)
        for name, values in forecasts.items():
            self.forecast.setdefault(name, []).append(values)

    def mae(self, name: str) -> float:
        return mae(np.concatenate(self.forecast[name]), np.concatenate(self.truth))


def new_scores() -> Scores:
    return Scores({}, [])


def run() -> dict[str, Scores]:
    scores = {"PV": new_scores(), "load": new_scores(), "price": new_scores()}
    for seed in SEEDS:
        for year, month, day in START_DATES:
            start = datetime(year, month, day, tzinfo=UTC).timestamp()
            for day_index in range(7):
                for issue_hour in ISSUE_HOURS_UTC:
                    issue = start + day_index * DAY_S + issue_hour * 3600.0
                    one_issue(scores, seed, issue)
    return scores


def one_issue(scores: dict[str, Scores], seed: int, issue_ts: float) -> None:
    hist_ts = issue_ts - HISTORY_DAYS * DAY_S + STEP_S * np.arange(HISTORY_DAYS * DAY_S / STEP_S)
    fc_ts = issue_ts + STEP_S * np.arange(HORIZON_S / STEP_S)
    loads: dict[str, list[Array]] = {"truth": [], "hist": [], "ours": []}
    pvs: dict[str, list[Array]] = {"truth": [], "hist": [], "ours": []}
    for index, site in enumerate(SITES):
        hist = true_load_w(site, hist_ts, seed, index)
        truth = true_load_w(site, fc_ts, seed, index)
        ours = load_forecast_w(
            hist_ts, hist, fc_ts, utc_offset_h=UTC_OFFSET_H, day_classes=site.day_classes
        )
        scores["load"].add(
            truth / site.peak_w,
            ours=ours / site.peak_w,
            persistence=persistence_forecast(hist_ts, hist, fc_ts) / site.peak_w,
            seasonal_naive=seasonal_naive_forecast(hist_ts, hist, fc_ts) / site.peak_w,
        )
        for key, values in (("truth", truth), ("hist", hist), ("ours", ours)):
            loads[key].append(values)
        if site.rated_ac_w > 0.0:
            pv_seed = seed * 100 + index
            hist_pv = true_pv_w(site, hist_ts, pv_seed)
            truth_pv = true_pv_w(site, fc_ts, pv_seed)
            ours_pv = pv_forecast_w(
                hist_ts, hist_pv, fc_ts, LATITUDE_DEG, LONGITUDE_DEG, rated_w=site.rated_ac_w
            )
            scores["PV"].add(
                truth_pv / site.rated_ac_w,
                ours=ours_pv / site.rated_ac_w,
                persistence=persistence_forecast(hist_ts, hist_pv, fc_ts) / site.rated_ac_w,
                seasonal_naive=seasonal_naive_forecast(hist_ts, hist_pv, fc_ts) / site.rated_ac_w,
            )
            for key, values in (("truth", truth_pv), ("hist", hist_pv), ("ours", ours_pv)):
                pvs[key].append(values)
    net = {key: community_net_load_w(loads[key], pvs[key]) for key in loads}
    hist_price = realised_price_per_kwh(net["hist"], hist_ts)
    scores["price"].add(
        realised_price_per_kwh(net["truth"], fc_ts),
        ours=price_forecast_per_kwh(net["ours"], retail_per_kwh(fc_ts), FEED_IN_PER_KWH),
        ours_band=price_forecast_per_kwh(
            net["ours"], retail_per_kwh(fc_ts), FEED_IN_PER_KWH, balance_band_w=PRICE_BAND_W
        ),
        persistence=persistence_forecast(hist_ts, hist_price, fc_ts),
        seasonal_naive=seasonal_naive_forecast(hist_ts, hist_price, fc_ts),
    )


def main() -> int:
    t0 = time.perf_counter()
    scores = run()
    elapsed_s = time.perf_counter() - t0
    n_runs = len(SEEDS) * len(START_DATES) * 7 * len(ISSUE_HOURS_UTC)
    print(
        f"{n_runs} forecast runs ({len(SEEDS)} seeds x {len(START_DATES)} weeks x 7 days x "
        f"{len(ISSUE_HOURS_UTC)} issue times), {HISTORY_DAYS} d history, 24 h horizon at "
        f"{STEP_S / 60:.0f} min; {elapsed_s:.1f} s"
    )
    units = {
        "PV": "MAE / AC rating",
        "load": "MAE / peak load",
        "price": "MAE per kWh",
    }
    print()
    print(
        f"{'target':<7} {'unit':<16} {'ours':>8} {'persist.':>9} {'seas.naive':>10} "
        f"{'skill vs persist.':>18} {'skill vs s.naive':>17}  beats both"
    )
    all_beat = True
    for target in ("PV", "load", "price"):
        s = scores[target]
        names = ["ours", "ours_band"] if target == "price" else ["ours"]
        persistence = s.mae("persistence")
        naive = s.mae("seasonal_naive")
        for name in names:
            ours = s.mae(name)
            label = target if name == "ours" else f"{target}*"
            beats = ours < persistence and ours < naive
            if target != "price":
                all_beat = all_beat and beats
            print(
                f"{label:<7} {units[target]:<16} {ours:8.4f} {persistence:9.4f} {naive:10.4f} "
                f"{1 - ours / persistence:18.1%} {1 - ours / naive:17.1%}  "
                f"{'yes' if beats else 'NO'}"
            )
    print()
    print(
        f"price*: with balance_band_w = {PRICE_BAND_W / 1e3:.0f} kW (a blend near balance; "
        "band 0 is the MAE-optimal step)"
    )
    verdict = "ours beats both baselines for PV and load" if all_beat else "goal NOT met"
    print(f"goal (issue): {verdict}")
    return 0 if all_beat else 1


if __name__ == "__main__":
    sys.exit(main())
