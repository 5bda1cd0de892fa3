"""A weather forecast over real Mosquitto changes the PV forecast the coordinator publishes;
a malformed, stale or unauthorised one changes nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from broker import topics
from broker.client import BusSettings
from broker.clock import ManualClock
from broker.messages import DeviceReading, Forecast, Telemetry, WeatherForecast
from broker.mosquitto import BrokerFiles, MosquittoProcess
from coordinator import forecast as fc
from coordinator.config import parse_coordinator_config
from coordinator.service import Coordinator
from simulators.scenario import load_scenario
from tests.broker_fixtures import MqttClientFactory
from wattmesh.backtest import Engine
from wattmesh.cli import app
from wattmesh.weather import SimulatedWeatherService, WeatherCsvError, read_weather_csv

T0 = 1_782_129_600.0  # 2026-06-22 12:00 UTC, an interval boundary
SITE = "house-1"


def _coordinator(tmp_path: Path, files: BrokerFiles) -> Coordinator:
    config = parse_coordinator_config(
        {
            "coordinator": {"ledger": str(tmp_path / "ledger.sqlite")},
            "broker": {"port": files.port, "password_env": None},
        },
        "test",
    )
    return Coordinator(config, ManualClock(T0), password=files.credentials["coordinator"])


def _reading(ts: float, pv_w: float) -> Telemetry:
    meter = DeviceReading(device="meter", kind="sunspec_meter", available=True, power_w=-pv_w)
    return Telemetry(ts=ts, devices=[meter], grid_power_w=-pv_w, pv_power_w=pv_w, load_power_w=0.0)


async def _publish(client_factory: MqttClientFactory, user: str, payload: str) -> None:
    async with client_factory(user) as client:
        await client.publish(topics.WEATHER_FORECAST, payload, qos=1, retain=True)


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - the coordinator has no event for it
            await asyncio.sleep(0.02)


async def test_a_published_weather_forecast_changes_the_pv_forecast_and_bad_ones_do_not(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    mqtt_client: MqttClientFactory,
    tmp_path: Path,
) -> None:
    c = _coordinator(tmp_path, broker_files)
    where = c.config.coordinator
    async with c:
        await c.bus.wait_connected(5)
        assert isinstance(c.clock, ManualClock)
        # Two days of PV at half of a 5 kW-per-1000-W/m^2 site's clear-sky output.
        for ts in T0 - 2 * 86_400.0 + 900.0 * np.arange(192):
            c.clock.ts = float(ts)
            clear = fc.clear_sky_ghi_w_per_m2(ts, where.latitude_deg, where.longitude_deg)
            c.ingest_telemetry(SITE, _reading(float(ts), float(2.5 * clear)))
        c.clock.ts = T0
        k = int(T0 // 900)
        await c.publish_forecasts(k)
        without = c.last_forecasts[SITE]

        # The weather service says the past two days had an index of 0.5, tomorrow 1.0.
        start = T0 - 2 * 86_400.0
        index = [0.5] * 48 + [1.0] * 36
        good = WeatherForecast(ts=T0, start_ts=start, step_s=3600, sites={SITE: index})
        await _publish(mqtt_client, "weather", good.model_dump_json())
        await _until(lambda: c.stats.weather == 1)
        await c.publish_forecasts(k)
        with_weather = c.last_forecasts[SITE]

        # Refused: malformed, stale, and from a user the ACL does not let publish it.
        await _publish(mqtt_client, "weather", good.model_dump_json().replace("1.0", "1.5"))
        await _until(lambda: c.stats.weather_rejected.get("invalid") == 1)
        stale = WeatherForecast(
            ts=T0 - 86_400.0, start_ts=T0, step_s=3600, clear_sky_index=[0.1] * 24
        )
        await _publish(mqtt_client, "weather", stale.model_dump_json())
        await _until(lambda: c.stats.weather_rejected.get("stale") == 1)
        newer = WeatherForecast(ts=T0 + 1, start_ts=T0, step_s=3600, clear_sky_index=[0.1] * 24)
        await _publish(mqtt_client, SITE, newer.model_dump_json())
        await asyncio.sleep(0.5)
        await c.publish_forecasts(k)
        after = c.last_forecasts[SITE]
    times = without.start_ts + 900.0 * (np.arange(len(without.pv_power_w)) + 0.5)
    clear = fc.clear_sky_ghi_w_per_m2(times, where.latitude_deg, where.longitude_deg)
    # PV = c(t) GHI_cs / 1000 with persistence from the last reading (11:45, at 2500 W)
    # decaying to 2500 W without weather and to the weather capacity 5000 W times the index
    # with it.
    decay = np.exp(-(times - (T0 - 900.0)) / 3600.0)
    np.testing.assert_allclose(without.pv_power_w, 2.5 * clear, rtol=1e-5)
    weather = 5000.0 * fc.step_series_at(T0 - 2 * 86_400.0, 3600.0, [0.5] * 48 + [1.0] * 36, times)
    assert weather[2:] == pytest.approx(5000.0)  # 12:00-12:30: between the hours' 0.5 and 1.0
    expected = clear / 1000.0 * (weather + (2500.0 - weather) * decay)
    np.testing.assert_allclose(with_weather.pv_power_w, expected, rtol=1e-5)
    assert c.stats.weather == 1
    assert after.pv_power_w == with_weather.pv_power_w  # nothing refused changed it
    registry, labels = c.metrics_registry, {"feeder": c.feeder}
    assert registry.get_sample_value("wattmesh_weather_forecasts_total", labels) == 1
    for reason in ("invalid", "stale"):
        refused = registry.get_sample_value(
            "wattmesh_weather_forecasts_refused_total", {**labels, "reason": reason}
        )
        assert refused == 1, reason
    assert isinstance(with_weather, Forecast)


def test_a_coordinator_with_weather_off_refuses_forecasts(tmp_path: Path) -> None:
    config = parse_coordinator_config(
        {
            "coordinator": {"ledger": str(tmp_path / "ledger.sqlite")},
            "broker": {"password_env": None},
            "weather": {"enabled": False},
        },
        "test",
    )
    c = Coordinator(config, ManualClock(T0))
    good = WeatherForecast(ts=T0, start_ts=T0, step_s=3600, clear_sky_index=[0.5])
    assert not c.ingest_weather(good.model_dump_json().encode())
    assert c.stats.weather_rejected == {"off": 1}
    c.ledger.close()


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "weather.csv"
    path.write_text(text)
    return path


async def test_weather_publish_sends_a_csv_export_as_the_retained_forecast(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    mqtt_client: MqttClientFactory,
    tmp_path: Path,
) -> None:
    hour = float(time.time() // 3600 * 3600)  # the command stamps it with the wall clock
    start = datetime.fromtimestamp(hour, UTC)
    path = _csv(
        tmp_path,
        f"time,ghi_w_per_m2\n{start.isoformat()},600\n{hour + 3600:.0f},650.5\n",
    )
    result = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["weather", "publish", "--csv", str(path), "--broker-dir", str(broker_files.directory)],
    )
    assert result.exit_code == 0, result.output
    async with mqtt_client("monitor") as monitor:
        await monitor.subscribe(topics.WEATHER_FORECAST, qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(monitor.messages))
    assert isinstance(message.payload, bytes)
    got = WeatherForecast.model_validate_json(message.payload)
    assert (got.start_ts, got.step_s, got.ghi_w_per_m2) == (hour, 3600, [600.0, 650.5])
    assert got.source == "csv"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("time,clear_sky_index\n", "no rows"),
        ("when,clear_sky_index\n0,0.5\n", "needs columns"),
        ("time,clear_sky_index\n2026-06-22T10:00:00,0.5\n", "time zone"),
        ("time,clear_sky_index\n1782122400,nan\n", "not a finite number"),
        ("time,clear_sky_index\n1782122400,0.5\n1782126000,0.5\n1782126900,0.5\n", "equally"),
        ("time,clear_sky_index\n1782122400,1.5\n", "less than or equal to 1.2"),
    ],
)
def test_weather_csv_mistakes_are_refused_with_the_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(WeatherCsvError, match=message):
        read_weather_csv(_csv(tmp_path, text), issued_ts=T0)


COMMUNITY = Path(__file__).resolve().parents[1] / "config" / "scenarios" / "community.toml"


async def test_the_simulated_weather_service_reaches_the_coordinator(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    scenario = load_scenario(COMMUNITY)
    c = _coordinator(tmp_path, broker_files)
    assert isinstance(c.clock, ManualClock)
    c.clock.ts = scenario.start_ts + 7 * 3600.0  # the 06:00 run is the latest
    settings = BusSettings(
        port=broker_files.port,
        username="weather",
        password=broker_files.credentials["weather"],
        client_id="weather",
    )
    async with c, SimulatedWeatherService(scenario, c.clock, settings) as service:
        await _until(lambda: c.stats.weather == 1)
    assert service.published == 1
    (kept,) = c.weather.kept
    assert kept.ts == scenario.start_ts + 6 * 3600.0
    assert sorted(kept.sites) == ["house-1", "school", "solar-farm"]  # the sites with PV
    assert kept.area is None


def test_the_engine_feeds_the_simulated_weather_unless_switched_off(tmp_path: Path) -> None:
    scenario = load_scenario(COMMUNITY)
    runs = {}
    for on in (True, False):
        engine = Engine(
            scenario, days=0.25, ledger_path=tmp_path / f"{on}.sqlite", history_days=1.0, weather=on
        )
        start = scenario.start_ts + 6 * 3600.0
        engine._forecast(engine._site_forecasts(start, start - 960.0))
        engine._forecasts_made()
        runs[on] = (engine.weather.accepted, engine.sites["solar-farm"].forecast)
        engine.close()
    assert runs[True][0] == 5  # the runs of the day before and the one at the start
    assert runs[False][0] == 0
    with_weather, without = runs[True][1], runs[False][1]
    assert with_weather is not None
    assert without is not None
    assert not np.allclose(with_weather[1], without[1])  # the PV forecast
    np.testing.assert_array_equal(with_weather[2], without[2])  # the load forecast
