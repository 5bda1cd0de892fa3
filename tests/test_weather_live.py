"""A weather forecast over real Mosquitto changes the PV forecast the coordinator publishes;
a malformed, stale or unauthorised one changes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from broker import topics
from broker.clock import ManualClock
from broker.messages import DeviceReading, Forecast, Telemetry, WeatherForecast
from broker.mosquitto import BrokerFiles, MosquittoProcess
from coordinator import forecast as fc
from coordinator.config import parse_coordinator_config
from coordinator.service import Coordinator
from tests.broker_fixtures import MqttClientFactory

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
