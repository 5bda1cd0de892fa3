"""Weather forecasts for the coordinator: the simulated world's weather service (for the demo and
the stepped engine) and ``wattmesh weather publish`` (any service's export, from a CSV file).

The simulated service (:func:`simulated_forecast`) forecasts each simulated site's PV clouds
(every PV inverter of the simulated world has its own seeded clouds, so the forecast is per
site, weighted by each inverter's AC rating), as :mod:`simulators.weather` describes: a run every
6 h reaching 48 h ahead, in 15-minute steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import itertools
import logging
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from pydantic import ValidationError

from broker import topics
from broker.client import BusClient, BusSettings
from broker.clock import Clock, ManualClock
from broker.errors import BrokerConfigError, BusUnavailable
from broker.feeders import is_feeders_broker, load_feeders_broker, weather_topic
from broker.messages import MAX_FORECAST_POINTS, WeatherForecast
from broker.mosquitto import load_broker_files
from simulators import weather as sim_weather
from simulators.devices import PvInverterSim
from simulators.scenario import ScenarioConfig, build_sites

log = logging.getLogger(__name__)

#: The simulated service's step [s].
STEP_S = 900


def scenario_pv(scenario: ScenarioConfig) -> dict[str, list[tuple[int, float]]]:
    """Each site's PV inverters as (cloud seed, AC rating W); sites without PV are left out."""
    out: dict[str, list[tuple[int, float]]] = {}
    for _, _, device in build_sites(scenario, ManualClock(scenario.start_ts)):
        if isinstance(device, PvInverterSim):
            out.setdefault(device.site.site_id, []).append((device.seed, device.rated_ac_w))
    return out


def simulated_forecast(
    pv: dict[str, list[tuple[int, float]]], issued_ts: float, *, step_s: int = STEP_S
) -> WeatherForecast:
    """The simulated weather service's forecast issued at ``issued_ts`` (a run time) for the
    sites ``pv`` (:func:`scenario_pv`): each site's clear-sky index, the AC-rating-weighted
    mean of its inverters' :func:`simulators.weather.forecast_clear_sky_index` at each step's
    centre."""
    steps = int(sim_weather.HORIZON_S // step_s)
    times = issued_ts + step_s * (np.arange(steps) + 0.5)
    sites = {}
    for site, inverters in sorted(pv.items()):
        rated_w = sum(r for _, r in inverters)
        index = sum(
            r * sim_weather.forecast_clear_sky_index(times, issued_ts, seed)
            for seed, r in inverters
        )
        sites[site] = [float(x) for x in np.clip(index / rated_w, 0.0, sim_weather.MAX_INDEX)]
    return WeatherForecast(
        ts=issued_ts, start_ts=issued_ts, step_s=step_s, sites=sites, source="simulated"
    )


class SimulatedWeatherService:
    """Publishes :func:`simulated_forecast` (retained) at every run time of the simulated clock,
    the latest run at once on start; ``async with`` runs it, as the weather-service user.

    ``targets`` are the topics it publishes to: ``weather/forecast``, or on a many-feeders
    broker each feeder's (:func:`weather_target`)."""

    def __init__(
        self,
        scenario: ScenarioConfig,
        clock: Clock,
        settings: BusSettings,
        targets: Sequence[str] = (topics.WEATHER_FORECAST,),
    ) -> None:
        self.pv = scenario_pv(scenario)
        self.clock = clock
        self.targets = tuple(targets)
        self.bus = BusClient(settings)
        self.published = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SimulatedWeatherService:
        await self.bus.__aenter__()
        self._task = asyncio.create_task(self._run(), name="simulated-weather")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.bus.__aexit__(None, None, None)

    async def _run(self) -> None:
        run = sim_weather.latest_run_ts(self.clock.now())
        speed = float(getattr(self.clock, "speed", 1.0))
        while True:
            if self.pv:
                payload = simulated_forecast(self.pv, run).model_dump_json()
                try:
                    await self.bus.wait_connected(10.0)
                    for topic in self.targets:
                        await self.bus.publish(topic, payload, retain=True)
                    self.published += 1
                except (BusUnavailable, TimeoutError):
                    log.warning("simulated weather: run %.0f not published", run)
            run += sim_weather.RUN_PERIOD_S
            await asyncio.sleep(max(0.0, (run - self.clock.now()) / speed))


# -- wattmesh weather publish --------------------------------------------------------------------


class WeatherCsvError(ValueError):
    """A weather CSV file that cannot be read as a forecast."""


def _time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        raise WeatherCsvError(f"time {text!r} has no time zone (give Z or +00:00)")
    return moment.timestamp()


def read_weather_csv(path: Path, *, issued_ts: float, source: str = "csv") -> WeatherForecast:
    """A forecast from a CSV file with a header ``time`` and ``clear_sky_index`` or
    ``ghi_w_per_m2`` (each row the mean of the step starting at ``time``: ISO 8601 with a time
    zone, or epoch seconds; steps equal, 60-3600 s); ``WeatherCsvError`` naming the line."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise WeatherCsvError(f"{path}: cannot read: {err}") from err
    if not rows:
        raise WeatherCsvError(f"{path}: no rows")
    columns = set(rows[0])
    kind = "clear_sky_index" if "clear_sky_index" in columns else "ghi_w_per_m2"
    if "time" not in columns or kind not in columns:
        raise WeatherCsvError(f"{path}: needs columns time and clear_sky_index or ghi_w_per_m2")
    if len(rows) > MAX_FORECAST_POINTS:
        raise WeatherCsvError(f"{path}: more than {MAX_FORECAST_POINTS} rows")
    times, values = [], []
    for line, row in enumerate(rows, start=2):
        try:
            times.append(_time(row["time"] or ""))
            value = float(row[kind] or "")
        except ValueError as err:
            raise WeatherCsvError(f"{path}:{line}: {err}") from err
        if not math.isfinite(value):
            raise WeatherCsvError(f"{path}:{line}: {kind} is not a finite number")
        values.append(value)
    steps = {round(b - a) for a, b in itertools.pairwise(times)}
    step_s = steps.pop() if len(steps) == 1 else 3600 if not steps else None
    if step_s is None:
        raise WeatherCsvError(f"{path}: the times must be equally spaced")
    try:
        return WeatherForecast.model_validate(
            {
                "ts": issued_ts,
                "start_ts": times[0],
                "step_s": step_s,
                kind: values,
                "source": source,
            }
        )
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise WeatherCsvError(f"{path}: {where + ': ' if where else ''}{first['msg']}") from err


weather_app = typer.Typer(help="Weather forecasts for the coordinator's PV forecasts.")


def weather_target(
    broker_dir: Path, user: str, feeders: Sequence[str] = ()
) -> tuple[BusSettings, list[str]]:
    """Where ``user`` publishes the weather forecast on the broker in ``broker_dir``: its bus
    settings (the password listener) and the topics. On a single-feeder broker the one
    ``weather/forecast`` topic (``feeders`` must be empty); on a many-feeders broker the
    operator listener and :func:`broker.feeders.weather_topic` of each of ``feeders`` (none:
    every feeder). ``BrokerConfigError`` for an unknown user or feeder."""
    if is_feeders_broker(broker_dir):
        area = load_feeders_broker(broker_dir)
        known = [f.id for f in area.feeders]
        unknown = [f for f in feeders if f not in known]
        if unknown:
            raise BrokerConfigError(
                f"{broker_dir} has no feeder {', '.join(map(repr, unknown))} "
                f"(its feeders: {', '.join(known)})"
            )
        host, port, credentials = area.connect_host, area.port, area.credentials
        targets = [weather_topic(f) for f in (list(dict.fromkeys(feeders)) or known)]
    else:
        files = load_broker_files(broker_dir)
        if feeders:
            raise BrokerConfigError(
                f"{broker_dir} is a single-feeder broker: it has no feeders to choose from "
                "(--feeder is for a broker written by `broker init --feeders`)"
            )
        host, port, credentials = files.connect_host, files.port, files.credentials
        targets = [topics.WEATHER_FORECAST]
    if user not in credentials:
        raise BrokerConfigError(f"no user {user!r} in {broker_dir}")
    settings = BusSettings(
        host=host, port=port, username=user, password=credentials[user], client_id=user
    )
    return settings, targets


@weather_app.command("publish")
def publish(
    csv_file: Annotated[Path, typer.Option("--csv", help="time,clear_sky_index (or ghi_w_per_m2)")],
    broker_dir: Annotated[
        Path, typer.Option(help="the broker directory (`wattmesh broker init`): its credentials")
    ],
    user: Annotated[str, typer.Option(help="the weather-service user")] = "weather",
    source: Annotated[str, typer.Option(help="the service's name, for the logs")] = "csv",
    feeder: Annotated[
        list[str] | None,
        typer.Option(
            "--feeder",
            help="on a broker written by `broker init --feeders`: publish into this feeder "
            "(repeat it for several; default every feeder)",
        ),
    ] = None,
) -> None:
    """Publish a weather service's export (a CSV file) as the retained weather forecast.

    On a many-feeders broker the same forecast goes into every feeder's topic root (or those
    given with --feeder), over one connection on the operator listener.
    """
    try:
        settings, targets = weather_target(broker_dir, user, feeder or ())
        msg = read_weather_csv(csv_file, issued_ts=datetime.now().timestamp(), source=source)
    except (BrokerConfigError, WeatherCsvError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    asyncio.run(_publish_once(settings, targets, msg.model_dump_json()))
    typer.echo(f"published {msg.steps} steps of {msg.step_s} s from {msg.start_ts:.0f}")
    if targets != [topics.WEATHER_FORECAST]:
        typer.echo(f"  to {', '.join(targets)}")


async def _publish_once(settings: BusSettings, targets: Sequence[str], payload: str) -> None:
    async with BusClient(settings) as bus:
        await bus.wait_connected(10.0)
        for topic in targets:
            await bus.publish(topic, payload, retain=True)
