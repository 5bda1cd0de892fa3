"""The area's weather service on a many-feeders broker (broker/feeders.py, wattmesh/weather.py).

One ``weather`` user for the whole area logs in on the operator listener (no mount point) and
may publish exactly each feeder's weather forecast, ``feeder/{id}/wattmesh/v1/weather/forecast``:
the topic a feeder's coordinator reads as ``wattmesh/v1/weather/forecast`` on its own listener.
Over a real Mosquitto (feeders north and south, tests/feeders_fixtures.py); access is proved by
what subscribers receive, never by acknowledgements: forbidden messages go first, a permitted
one last over the same connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt import ProtocolVersion
from typer.testing import CliRunner, Result

from broker import topics
from broker.client import BusClient, BusSettings
from broker.clock import ManualClock
from broker.feeders import (
    FeedersBrokerFiles,
    load_feeders_broker,
    weather_topic,
    write_feeders_broker_config,
)
from broker.messages import WeatherForecast
from broker.mosquitto import MosquittoProcess, write_broker_config
from simulators.scenario import load_scenario
from tests.broker_fixtures import free_port
from tests.feeders_fixtures import two_feeders
from wattmesh.cli import app
from wattmesh.weather import SimulatedWeatherService, weather_target

COMMUNITY = Path(__file__).resolve().parents[1] / "config" / "scenarios" / "community.toml"


@pytest.fixture
def files(broker_dir: Path) -> FeedersBrokerFiles:
    return write_feeders_broker_config(broker_dir, two_feeders())


@pytest.fixture
async def broker(files: FeedersBrokerFiles) -> AsyncIterator[MosquittoProcess]:
    process = MosquittoProcess(files.conf, files.port)
    await process.start()
    try:
        yield process
    finally:
        await process.stop()
        print(f"mosquitto log:\n{process.log_tail(60)}")


def _client(files: FeedersBrokerFiles, user: str) -> aiomqtt.Client:
    """A raw MQTT 5 client on ``user``'s feeder's listener (others: the operator listener)."""
    own = files.feeder_of(user)
    return aiomqtt.Client(
        files.connect_host,
        own.port if own is not None else files.port,
        username=user,
        password=files.credentials[user],
        protocol=ProtocolVersion.V5,
        timeout=5.0,
    )


def _coordinator(files: FeedersBrokerFiles, feeder: str) -> BusSettings:
    """A feeder's coordinator's bus settings: its listener and mount point."""
    f = files.feeder(feeder)
    return BusSettings(
        host=files.connect_host,
        port=f.port,
        username=f.coordinator_user,
        password=files.credentials[f.coordinator_user],
        client_id=f.coordinator_user,
        mount_point=f.mount_point,
    )


async def _publish_csv(
    files: FeedersBrokerFiles, tmp_path: Path, index: float, *options: str
) -> Result:
    """``wattmesh weather publish`` of a two-hour area forecast with clear-sky ``index``."""
    hour = float(time.time() // 3600 * 3600)  # the command stamps it with the wall clock
    path = tmp_path / f"weather-{index}.csv"
    start = datetime.fromtimestamp(hour, UTC).isoformat()
    path.write_text(f"time,clear_sky_index\n{start},{index}\n{hour + 3600:.0f},{index}\n")
    args = ["weather", "publish", "--csv", str(path), "--broker-dir", str(files.directory)]
    return await asyncio.to_thread(CliRunner().invoke, app, [*args, *options])


async def _drain(client: aiomqtt.Client, quiet_s: float = 0.3) -> list[str]:
    """Topics of whatever arrives until ``quiet_s`` passes without a message."""
    got: list[str] = []
    with contextlib.suppress(TimeoutError):
        while True:
            async with asyncio.timeout(quiet_s):
                message = await anext(aiter(client.messages))
            got.append(message.topic.value)
    return got


async def _coordinators_read(files: FeedersBrokerFiles) -> dict[str, tuple[str, WeatherForecast]]:
    """The retained weather forecast each feeder's coordinator reads (topic, forecast), as its
    own bus client (with its listener's mount point) subscribes to it."""
    got: dict[str, tuple[str, WeatherForecast]] = {}
    arrived = asyncio.Event()

    def collect(feeder: str) -> Callable[[str, bytes], Awaitable[None]]:
        async def handle(topic: str, payload: bytes) -> None:
            got[feeder] = (topic, WeatherForecast.model_validate_json(payload))
            if len(got) == 2:
                arrived.set()

        return handle

    async with (
        BusClient(_coordinator(files, "north"), handler=collect("north")) as north,
        BusClient(_coordinator(files, "south"), handler=collect("south")) as south,
    ):
        for bus in (north, south):
            await bus.wait_connected(5)
            await bus.subscribe(topics.WEATHER_FORECAST)  # what the coordinator subscribes to
        async with asyncio.timeout(5):
            await arrived.wait()
    return got


def test_one_weather_user_for_the_area_on_the_operator_listener(
    files: FeedersBrokerFiles,
) -> None:
    assert files.weather_user == "weather"
    passwd = (files.directory / "passwd").read_text().split()
    assert "weather" in [line.split(":")[0] for line in passwd]
    for f in files.feeders:  # it cannot log in on a feeder's listener
        assert "weather" not in f.password_file.read_text()
        assert "user weather" not in f.acl_file.read_text()
    acl = (files.directory / "acl").read_text()
    block = acl[acl.index("user weather") :].split("\n\n")[0].splitlines()
    assert block[1:] == [
        "topic write feeder/north/wattmesh/v1/weather/forecast",
        "topic write feeder/south/wattmesh/v1/weather/forecast",
    ]
    assert weather_topic("north") == "feeder/north/wattmesh/v1/weather/forecast"
    assert load_feeders_broker(files.directory) == files


async def test_weather_publish_reaches_every_feeders_coordinator_or_the_feeders_named(
    broker: MosquittoProcess, files: FeedersBrokerFiles, tmp_path: Path
) -> None:
    everywhere = await _publish_csv(files, tmp_path, 0.7)
    assert everywhere.exit_code == 0, everywhere.output
    south_only = await _publish_csv(files, tmp_path, 0.3, "--feeder", "south")
    assert south_only.exit_code == 0, south_only.output
    assert "feeder/south/wattmesh/v1/weather/forecast" in south_only.output
    unknown = await _publish_csv(files, tmp_path, 0.5, "--feeder", "east")
    assert unknown.exit_code == 2
    assert "no feeder 'east'" in unknown.output
    got = await _coordinators_read(files)
    # Each coordinator reads the retained forecast on its own v1 topic; south has the newer.
    assert {feeder: topic for feeder, (topic, _) in got.items()} == {
        "north": topics.WEATHER_FORECAST,
        "south": topics.WEATHER_FORECAST,
    }
    assert got["north"][1].clear_sky_index == [0.7, 0.7]
    assert got["south"][1].clear_sky_index == [0.3, 0.3]


async def test_the_simulated_weather_service_publishes_into_every_feeder(
    broker: MosquittoProcess, files: FeedersBrokerFiles
) -> None:
    scenario = load_scenario(COMMUNITY)
    clock = ManualClock(scenario.start_ts + 7 * 3600.0)  # the 06:00 run is the latest
    settings, targets = weather_target(files.directory, "weather")
    assert targets == [weather_topic("north"), weather_topic("south")]
    async with SimulatedWeatherService(scenario, clock, settings, targets) as service:
        got = await _coordinators_read(files)
    assert service.published == 1
    for _, forecast in got.values():
        assert forecast.ts == scenario.start_ts + 6 * 3600.0
        assert sorted(forecast.sites) == ["house-1", "school", "solar-farm"]


async def test_the_weather_user_publishes_only_forecasts_and_reads_nothing_nor_may_a_site(
    broker: MosquittoProcess, files: FeedersBrokerFiles
) -> None:
    north = files.feeder("north")
    sentinel = weather_topic("south")
    got: list[str] = []
    async with (
        _client(files, "monitor") as monitor,
        _client(files, "weather") as weather,
        _client(files, "n-1") as site,
        _client(files, north.coordinator_user) as coordinator,
    ):
        await monitor.subscribe("feeder/+/wattmesh/v1/#", qos=1)
        await weather.subscribe("#", qos=1)
        await weather.subscribe("feeder/+/wattmesh/v1/#", qos=1)
        # Something the weather user could read if it could read anything (retained).
        await coordinator.publish(topics.MARKET_CLEARING, b"clearing", qos=1, retain=True)
        # A site cannot publish a weather forecast (its feeder's listener mounts it).
        await site.publish(topics.WEATHER_FORECAST, b"site-forecast", qos=1, retain=True)
        await site.publish(topics.site_topic("n-1", "status"), b"online", qos=1)
        # The weather user cannot publish anything but each feeder's forecast.
        for topic in (
            f"{north.mount_point}{topics.MARKET_CLEARING}",
            f"{north.mount_point}{topics.site_topic('n-1', 'telemetry')}",
            f"{north.mount_point}{topics.site_topic('n-1', 'dispatch')}",
            "feeder/east/wattmesh/v1/weather/forecast",  # no such feeder
            topics.WEATHER_FORECAST,  # unmounted: no coordinator reads it
        ):
            await weather.publish(topic, b"junk", qos=1)
        await weather.publish(sentinel, b"forecast", qos=1)
        async with asyncio.timeout(5):
            async for message in monitor.messages:
                got.append(message.topic.value)
                if message.topic.value == sentinel:
                    break
        read_by_weather = await _drain(weather)
    assert got == [
        f"{north.mount_point}{topics.MARKET_CLEARING}",
        f"{north.mount_point}{topics.site_topic('n-1', 'status')}",
        sentinel,
    ]
    assert read_by_weather == []  # not the clearing, not even its own forecast


def test_weather_publish_on_a_single_feeder_broker_refuses_a_feeder(broker_dir: Path) -> None:
    single = write_broker_config(broker_dir / "single", ["house-1"], port=free_port())
    csv = broker_dir / "w.csv"
    csv.write_text("time,clear_sky_index\n1782122400,0.5\n")
    result = CliRunner().invoke(
        app,
        [
            *("weather", "publish", "--csv", str(csv)),
            *("--broker-dir", str(single.directory), "--feeder", "north"),
        ],
    )
    assert result.exit_code == 2
    assert "single-feeder broker" in result.output
