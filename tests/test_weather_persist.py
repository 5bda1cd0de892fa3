"""The coordinator's weather forecasts survive a restart (coordinator/history_store.py and
WeatherStore.restore): written with the history, read back without trusting the file, a
restored store behaves as the live one did, and the demo's history file carries the simulated
weather service's runs that the engine's coordinator has at the start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from broker.clock import ManualClock
from broker.messages import WeatherForecast
from coordinator.history_store import read_histories, write_histories
from coordinator.service import Coordinator
from coordinator.weather import (
    KEEP_S,
    MAX_KEPT,
    KeptForecast,
    WeatherStore,
    kept_forecast,
    kept_problem,
)
from simulators.weather import RUN_PERIOD_S
from tests.test_coordinator import T0, _coordinator
from wattmesh import demo
from wattmesh.backtest import Engine
from wattmesh.weather import scenario_pv, simulated_forecast

LAT, LON = 48.14, 11.58
HOUR_S = 3600.0


def _store(max_age_h: float = 18.0, *, enabled: bool = True) -> WeatherStore:
    return WeatherStore(LAT, LON, max_age_h * HOUR_S, future_skew_s=30.0, enabled=enabled)


def _messages() -> list[WeatherForecast]:
    """Three runs 6 h apart: an area index, a GHI series (NaN at night once kept), and site
    series with an area's."""
    ramp = [0.1 * (i % 12) for i in range(48)]
    ghi = [600.0 * max(0.0, np.sin(np.pi * (i - 24) / 48)) for i in range(96)]
    return [
        WeatherForecast(ts=T0 - 12 * HOUR_S, start_ts=T0 - 12 * HOUR_S, step_s=3600,
                        clear_sky_index=ramp),
        WeatherForecast(ts=T0 - 6 * HOUR_S, start_ts=T0 - 6 * HOUR_S, step_s=900,
                        ghi_w_per_m2=ghi),
        WeatherForecast(ts=T0, start_ts=T0 - HOUR_S, step_s=1800, clear_sky_index=[0.7] * 40,
                        sites={"house": [0.3] * 40, "school": [1.1] * 40}),
    ]  # fmt: skip


def _live_store() -> WeatherStore:
    store = _store()
    for msg in _messages():
        assert store.offer(msg, msg.ts) is None
    return store


def _indices(store: WeatherStore, now: float) -> tuple[np.ndarray, np.ndarray]:
    names = ["house", "school", "farm"]
    history_ts = np.tile(now - 900.0 * np.arange(96, 0, -1, dtype=np.float64), (3, 1))
    times = now + 900.0 * np.arange(192, dtype=np.float64)
    got = store.snapshot(now).indices(names, history_ts, times)
    assert got is not None
    return got


def test_kept_weather_forecasts_read_back_the_same(tmp_path: Path) -> None:
    path = tmp_path / "h.npz"
    kept = _live_store().kept
    assert kept[1].area is not None
    assert np.isnan(kept[1].area).any()  # the GHI forecast's night
    write_histories(path, {}, kept)
    loaded = read_histories(path, not_before_ts=0.0, not_after_ts=T0)
    assert loaded.dropped_forecasts == 0
    assert [k.ts for k in loaded.weather] == [k.ts for k in kept]
    for got, want in zip(loaded.weather, kept, strict=True):
        assert (got.start_ts, got.step_s, sorted(got.sites)) == (
            want.start_ts,
            want.step_s,
            sorted(want.sites),
        )
        if want.area is None:
            assert got.area is None
        else:
            np.testing.assert_array_equal(got.area, want.area)  # NaN as NaN
        for name, values in want.sites.items():
            np.testing.assert_array_equal(got.sites[name], values)


@pytest.mark.parametrize("later_h", [0.0, 7.0, 20.0])
def test_a_restored_store_gives_the_same_indices_as_the_live_one(
    tmp_path: Path, later_h: float
) -> None:
    path = tmp_path / "h.npz"
    live = _live_store()
    write_histories(path, {}, live.kept)
    restored = _store()
    now = T0 + later_h * HOUR_S  # 20 h: the newest is stale, its past still counts
    loaded = read_histories(path, not_before_ts=0, not_after_ts=now)
    assert restored.restore(loaded.weather, now) == 0
    fresh = later_h < 18.0
    assert restored.snapshot(now).fresh == live.snapshot(now).fresh == fresh
    (history, ahead), (live_history, live_ahead) = _indices(restored, now), _indices(live, now)
    assert np.isfinite(live_history).any()
    assert np.isfinite(live_ahead).any() == fresh  # a stale newest is not used ahead
    np.testing.assert_array_equal(history, live_history)
    np.testing.assert_array_equal(ahead, live_ahead)
    assert restored.accepted == 0  # messages taken, not forecasts restored


def _kept(ts: float, values: list[float] | None = None, **sites: list[float]) -> KeptForecast:
    area = None if values is None else np.array(values, dtype=np.float64)
    own = {name.replace("_", "-"): np.array(v, dtype=np.float64) for name, v in sites.items()}
    return KeptForecast(ts, ts, 900.0, area, own)


def test_hostile_weather_forecasts_in_the_file_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "h.npz"
    good = [0.5] * 8
    hostile = [
        _kept(T0 - 9 * 86_400.0, good),  # ended more than 8 days ago
        _kept(T0 - 5 * HOUR_S, good),  # kept
        _kept(T0 + HOUR_S, good),  # issued in the future
        _kept(T0 - 4 * HOUR_S, house=[0.5, np.nan] * 4),  # a site's index is not finite
        _kept(T0 - 4 * HOUR_S, [np.inf] * 8),  # nor the area's
        _kept(T0 - 4 * HOUR_S, [1.5] * 8),  # beyond the message's 1.2
        _kept(T0 - 4 * HOUR_S, good, **{"Bad/id": good}),  # not a site id
        _kept(T0 - 4 * HOUR_S, []),  # no steps
        KeptForecast(T0 - 4 * HOUR_S, T0 - 4 * HOUR_S, 7.0, np.array(good), {}),  # step < 60 s
        _kept(T0 - 6 * HOUR_S, good),  # issued before the one before it: out of order
        _kept(T0 - 3 * HOUR_S, [0.2] * 8, house=[0.9] * 8),  # kept
    ]
    write_histories(path, {}, hostile)
    loaded = read_histories(path, not_before_ts=0.0, not_after_ts=T0)
    assert loaded.dropped_forecasts == 6  # what no valid message makes
    store = _store()
    assert store.restore(loaded.weather, T0) == 3  # ended, the future, out of order
    assert [k.ts for k in store.kept] == [T0 - 5 * HOUR_S, T0 - 3 * HOUR_S]
    assert _store(enabled=False).restore(loaded.weather, T0) == len(loaded.weather)


def test_more_than_the_store_keeps_leaves_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "h.npz"
    runs = [_kept(T0 - RUN_PERIOD_S * i, [0.5] * 4) for i in range(MAX_KEPT + 8, 0, -1)]
    write_histories(path, {}, runs)
    store = _store()
    assert store.restore(read_histories(path, not_before_ts=0, not_after_ts=T0).weather, T0) == 8
    assert [k.ts for k in store.kept] == [k.ts for k in runs[-MAX_KEPT:]]
    assert store.kept[0].end_ts >= T0 - KEEP_S


def test_a_series_of_the_wrong_shape_or_length_is_no_kept_forecast() -> None:
    one = np.full(4, 0.5)
    assert kept_problem(T0, T0, 900.0, one, {"a": one}) is None
    assert kept_problem(T0, T0, 900.0, one.reshape(2, 2), {}) is not None
    assert kept_problem(T0, T0, 900.0, one, {"a": np.full(5, 0.5)}) is not None
    assert kept_problem(T0, T0, 900.0, None, {}) is not None
    assert kept_problem(T0, T0, 900.0, np.array(["0.5"]), {}) is not None
    assert kept_problem(T0, T0, 900.0, np.full(7 * 96 + 1, 0.5), {}) is not None
    assert kept_problem(T0, T0 - 3 * 86_400.0, 900.0, one, {}) is not None  # 2 days at most
    assert kept_problem(np.nan, T0, 900.0, one, {}) is not None


def _save_raw(path: Path, **weather: np.ndarray) -> None:
    history = {
        "format": np.array(1),
        "sites": np.array(["house"]),
        "counts": np.array([2]),
        "ts": np.array([T0 - 900.0, T0]),
        "pv_w": np.zeros(2),
        "load_w": np.ones(2),
    }
    with path.open("wb") as f:
        np.savez(f, **history, **weather)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "broken",
    [
        {"weather_area": np.zeros(5)},  # four steps announced
        {"weather_area": np.zeros((1, 4))},
        {"weather_steps": np.array([-4])},
        {"weather_sites": np.array(["a", "b"])},  # no site series announced
        {"weather_step_s": np.array(["900"])},
        {"weather_ts": None},  # missing
        {  # fits, but gives a site twice: that forecast is dropped
            "weather_site_counts": np.array([2]),
            "weather_sites": np.array(["a", "a"]),
            "weather_site_values": np.full(8, 0.5),
        },
    ],
)
def test_weather_arrays_that_do_not_fit_drop_the_weather_not_the_history(
    tmp_path: Path, broken: dict[str, np.ndarray | None]
) -> None:
    path = tmp_path / "h.npz"
    weather = {
        "weather_ts": np.array([T0]),
        "weather_start_ts": np.array([T0]),
        "weather_step_s": np.array([900.0]),
        "weather_steps": np.array([4]),
        "weather_has_area": np.array([True]),
        "weather_site_counts": np.array([0]),
        "weather_area": np.full(4, 0.5),
        "weather_sites": np.array([], dtype=np.str_),
        "weather_site_values": np.zeros(0),
    }
    _save_raw(path, **weather)
    assert len(read_histories(path, not_before_ts=0, not_after_ts=T0).weather) == 1
    fields = {k: v for k, v in {**weather, **broken}.items() if v is not None}
    _save_raw(path, **fields)
    loaded = read_histories(path, not_before_ts=0, not_after_ts=T0)
    assert (loaded.weather, loaded.dropped_forecasts) == ([], 1)
    np.testing.assert_array_equal(loaded.sites["house"].load_w, [1.0, 1.0])
    _save_raw(path)  # a file written before the weather was kept
    loaded = read_histories(path, not_before_ts=0, not_after_ts=T0)
    assert (loaded.weather, loaded.dropped_forecasts, len(loaded.sites)) == ([], 0, 1)


def test_a_restarted_coordinator_has_the_weather_forecasts_it_kept(tmp_path: Path) -> None:
    first = _coordinator(tmp_path)
    assert isinstance(first.clock, ManualClock)
    for msg in _messages():
        first.clock.ts = msg.ts
        assert first.ingest_weather(msg.model_dump_json().encode())
    assert first.save_history()
    first.ledger.close()

    second = _coordinator(tmp_path)  # its clock at T0; no broker message
    assert (second.stats.weather, second.stats.weather_restored) == (0, 3)
    for got, want in zip(_indices(second.weather, T0), _indices(first.weather, T0), strict=True):
        np.testing.assert_array_equal(got, want)
    second.ledger.close()

    config = second.config.model_copy(
        update={"weather": second.config.weather.model_copy(update={"enabled": False})}
    )
    off = Coordinator(config, ManualClock(T0))
    assert (off.weather.kept, off.stats.weather_restored) == ([], 0)
    assert off.save_history()  # and so written without them
    history = read_histories(off.history_path or Path(), not_before_ts=0, not_after_ts=T0)
    assert history.weather == []
    off.ledger.close()


def test_the_demo_starts_with_the_weather_runs_the_engine_has(tmp_path: Path) -> None:
    scenario = demo.builtin_scenario()
    start = scenario.start_ts
    path = demo.seed_history(scenario, tmp_path, 1.0)
    loaded = read_histories(path, not_before_ts=start - 86_400.0, not_after_ts=start)
    issued = [k.ts for k in loaded.weather]
    first = start - 86_400.0 - (start - 86_400.0) % RUN_PERIOD_S
    assert issued == list(np.arange(first, start - start % RUN_PERIOD_S, RUN_PERIOD_S))
    want = kept_forecast(simulated_forecast(scenario_pv(scenario), issued[-1]), 0.0, 0.0)
    np.testing.assert_array_equal(loaded.weather[-1].sites["solar-farm"], want.sites["solar-farm"])
    # the demo's coordinator, once the live service's run at the start came, holds the engine's
    config = demo._coordinator_config(scenario, tmp_path, 1, 0.1, 1200.0)
    store = WeatherStore(
        config.coordinator.latitude_deg,
        config.coordinator.longitude_deg,
        config.weather.max_age_h * HOUR_S,
        config.trust.future_skew_s,
    )
    store.restore(loaded.weather, start)
    live_run = start - start % RUN_PERIOD_S
    assert store.offer(simulated_forecast(scenario_pv(scenario), live_run), start) is None
    engine = Engine(scenario, days=0.01, ledger_path=tmp_path / "e.sqlite", history_days=1.0)
    try:
        assert [k.ts for k in engine.weather.kept] == [k.ts for k in store.kept]
        for got, want_k in zip(store.kept, engine.weather.kept, strict=True):
            for name, values in want_k.sites.items():
                np.testing.assert_array_equal(got.sites[name], values)
    finally:
        engine.close()
    assert not demo.seed_history(scenario, tmp_path, 0.0).exists()
