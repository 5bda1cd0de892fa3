"""The coordinator's forecasting history survives a restart (coordinator/history_store.py):
written atomically, read back without trusting the file, and a restarted coordinator
forecasts as the one before it did."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from broker import topics
from broker.clock import ManualClock
from broker.messages import Forecast
from broker.mosquitto import BrokerFiles, MosquittoProcess
from coordinator.config import CoordinatorSection
from coordinator.history_store import (
    HistoryFileError,
    SiteHistory,
    read_histories,
    write_histories,
)
from coordinator.service import HISTORY_STEP_S, sites_forecast_w
from tests.test_coordinator import T0, _bus, _coordinator, _telemetry

DAY_S = 86_400.0


def _history(n: int, start: float, pv: float = 1000.0, load: float = 500.0) -> SiteHistory:
    ts = start + HISTORY_STEP_S * np.arange(n, dtype=np.float64)
    return SiteHistory(ts, np.full(n, pv), np.full(n, load))


def test_written_histories_read_back_the_same(tmp_path: Path) -> None:
    path = tmp_path / "h.npz"
    a = SiteHistory(np.array([10.0, 20.0, 30.0]), np.array([0.0, 5.0, np.nan]), np.ones(3))
    b = _history(4, 100.0)
    write_histories(path, {"site-b": b, "site-a": a})
    loaded = read_histories(path, not_before_ts=0.0, not_after_ts=1e6)
    assert sorted(loaded.sites) == ["site-a", "site-b"]
    got = loaded.sites["site-a"]
    np.testing.assert_array_equal(got.ts, a.ts)
    np.testing.assert_array_equal(got.pv_w, a.pv_w)  # NaN (not reported) kept as NaN
    np.testing.assert_array_equal(loaded.sites["site-b"].load_w, b.load_w)
    assert (loaded.dropped_samples, loaded.dropped_sites) == (0, 0)


def test_samples_outside_the_window_or_the_bounds_and_bad_site_ids_are_dropped(
    tmp_path: Path,
) -> None:
    path = tmp_path / "h.npz"
    ts = np.array([5.0, 10.0, 20.0, 30.0, 40.0, 50.0, np.inf])
    pv = np.array([1.0, 1.0, -3.0, 1.0, 2e9, 1.0, 1.0])  # negative and beyond MAX_POWER_W
    load = np.array([1.0, 1.0, 1.0, np.inf, 1.0, 1.0, 1.0])
    write_histories(
        path,
        {"good": SiteHistory(ts, pv, load), "Bad/../id": _history(3, 10.0)},
    )
    loaded = read_histories(path, not_before_ts=10.0, not_after_ts=45.0)
    assert list(loaded.sites) == ["good"]
    np.testing.assert_array_equal(loaded.sites["good"].ts, [10.0])  # 5 early, 50 late, inf
    assert loaded.dropped_sites == 1
    assert loaded.dropped_samples == 6 + 3


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not a zip archive at all", "not a history file"),
        (None, "format"),
    ],
)
def test_a_file_that_is_not_a_history_is_refused_with_the_reason(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    path = tmp_path / "h.npz"
    if content is None:
        with path.open("wb") as f:
            np.savez(f, format=np.array(99), sites=np.array([], dtype=np.str_))
    else:
        path.write_bytes(content)
    with pytest.raises(HistoryFileError, match=reason):
        read_histories(path, not_before_ts=0.0, not_after_ts=1.0)


def test_pickled_objects_and_inconsistent_arrays_are_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.npz"
    with pickled.open("wb") as f:
        np.savez(
            f,
            format=np.array(1),
            sites=np.array(["a"], dtype=object),  # loading it would unpickle
            counts=np.array([1]),
            ts=np.zeros(1),
            pv_w=np.zeros(1),
            load_w=np.zeros(1),
        )
    with pytest.raises(HistoryFileError):
        read_histories(pickled, not_before_ts=0.0, not_after_ts=1.0)
    short = tmp_path / "short.npz"
    with short.open("wb") as f:
        np.savez(
            f,
            format=np.array(1),
            sites=np.array(["a"]),
            counts=np.array([3]),  # three samples claimed, one given
            ts=np.zeros(1),
            pv_w=np.zeros(1),
            load_w=np.zeros(1),
        )
    with pytest.raises(HistoryFileError, match="do not match"):
        read_histories(short, not_before_ts=0.0, not_after_ts=1.0)


def test_a_write_that_fails_midway_leaves_the_last_good_file_and_no_temporary(
    tmp_path: Path,
) -> None:
    path = tmp_path / "h.npz"
    write_histories(path, {"a": _history(3, 0.0)})
    before = path.read_bytes()
    broken = SiteHistory(np.array(["x"]), np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match="could not convert"):
        write_histories(path, {"a": _history(3, 0.0), "b": broken})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["h.npz"]


def _feed_a_day(c_ts: float, c: object) -> None:
    """A day of readings from two sites, one every 15 minutes, ending at ``c_ts``."""
    for ts in np.arange(c_ts - DAY_S, c_ts, HISTORY_STEP_S):
        hour = (ts % DAY_S) / 3600.0
        pv = max(0.0, 3000.0 * np.sin((hour - 6.0) / 12.0 * np.pi))
        for site, load in (("house", 400.0 + 50 * (hour > 17)), ("school", 2000.0)):
            reading = _telemetry(float(ts), load - pv)
            reading = reading.model_copy(update={"pv_power_w": pv, "load_power_w": load})
            c.ingest_telemetry(site, reading)  # type: ignore[attr-defined]


def test_a_restarted_coordinator_forecasts_from_the_history_it_kept(tmp_path: Path) -> None:
    first = _coordinator(tmp_path)
    assert isinstance(first.clock, ManualClock)
    _feed_a_day(T0, first)
    first._fill_ghi()  # as the service does before each forecast
    assert first.save_history()
    assert first.history_path == tmp_path / "ledger.history.npz"
    first.ledger.close()

    second = _coordinator(tmp_path)
    assert sorted(second.sites) == ["house", "school"]
    times = T0 + HISTORY_STEP_S * np.arange(96, dtype=np.float64)
    where = first.config.coordinator
    forecasts = []
    for c in (first, second):
        ts, values = zip(*(c.sites[s].history.arrays() for s in ("house", "school")), strict=True)
        forecasts.append(sites_forecast_w(np.stack(ts), np.stack(values), times, where))
        assert len(ts[0]) == 96
    for before, after in zip(forecasts[0], forecasts[1], strict=True):
        np.testing.assert_allclose(after, before, rtol=1e-6)
    assert forecasts[1][0].max() > 1000.0  # the PV it learned, not an empty forecast
    # the clear-sky GHI is computed again on loading, not taken from the file
    np.testing.assert_allclose(
        second.sites["house"].history.arrays()[1][:, 2],
        first.sites["house"].history.arrays()[1][:, 2],
        rtol=1e-5,
    )
    second.ledger.close()


def test_a_damaged_history_is_set_aside_and_the_coordinator_starts_without_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "ledger.history.npz").write_bytes(b"\x00" * 100)
    c = _coordinator(tmp_path)
    assert c.sites == {}
    assert (tmp_path / "ledger.history.npz.damaged").read_bytes() == b"\x00" * 100
    _feed_a_day(T0, c)
    assert c.save_history()  # the next write does not overwrite what was set aside
    assert (tmp_path / "ledger.history.npz.damaged").exists()
    c.ledger.close()


def test_a_history_that_cannot_be_written_is_reported_and_the_coordinator_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = _coordinator(tmp_path)
    c.history_path = tmp_path / "a-file" / "history.npz"
    (tmp_path / "a-file").write_text("in the way")
    _feed_a_day(T0, c)
    assert not c.save_history()
    assert not c.save_history()
    errors = [r for r in caplog.records if "not written" in r.getMessage()]
    assert len(errors) == 1  # once per reason
    c.ingest_telemetry("house", _telemetry(T0, 100.0))
    assert c.stats.telemetry == 2 * 96 + 1
    c.ledger.close()


def test_where_the_history_is_kept() -> None:
    beside = CoordinatorSection(ledger=Path("/var/lib/wattmesh/ledger.sqlite"))
    assert beside.history_path() == Path("/var/lib/wattmesh/ledger.history.npz")
    assert CoordinatorSection(keep_history=False).history_path() is None
    postgres = CoordinatorSection(ledger_url="postgresql://wattmesh@db:5432/wattmesh")
    assert postgres.history_path() is None  # no file to put it beside: in the database
    table = postgres.history_table()
    assert table is not None and (table.url, table.feeder) == (postgres.ledger_url, "feeder-1")
    chosen = postgres.model_copy(update={"history_file": Path("/srv/h.npz")})
    assert chosen.history_path() == Path("/srv/h.npz")
    assert chosen.history_table() is None  # a file named: the file
    assert beside.history_table() is None
    assert postgres.model_copy(update={"keep_history": False}).history_table() is None


async def test_a_coordinator_stopped_over_the_bus_keeps_its_history_for_the_next(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    c = _coordinator(tmp_path, broker_files)
    assert isinstance(c.clock, ManualClock)
    c.clock.ts = T0 - DAY_S
    async with c:
        await c.bus.wait_connected(5)
        house = await _bus(broker_files, "site-a", [])
        for ts in np.arange(T0 - DAY_S, T0, HISTORY_STEP_S):
            c.clock.ts = float(ts)
            payload = _telemetry(float(ts), 800.0).model_dump_json()
            await house.publish(topics.site_topic("site-a", "telemetry"), payload)
        async with asyncio.timeout(10):
            while c.stats.telemetry < 96:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await house.__aexit__(None, None, None)
    restarted = _coordinator(tmp_path, broker_files)
    assert isinstance(restarted.clock, ManualClock)
    restarted.clock.ts = T0
    assert len(restarted.sites["site-a"].history) == 96
    got: list[tuple[str, bytes]] = []
    async with restarted:
        await restarted.bus.wait_connected(5)
        watcher = await _bus(broker_files, "site-a", got)
        await watcher.subscribe(topics.forecast_topic("site-a"))
        await restarted.publish_forecasts(int(T0 // 900))
        async with asyncio.timeout(10):
            while not got:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await watcher.__aexit__(None, None, None)
    forecast = Forecast.model_validate_json(got[0][1])
    assert forecast.load_power_w[0] == pytest.approx(800.0, rel=0.05)  # learned before the stop
