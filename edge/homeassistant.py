"""Home Assistant MQTT discovery for a site (``[homeassistant]`` in the site file).

The agent announces six sensors of its site under Home Assistant's discovery prefix, one
retained config each on ``{prefix}/sensor/wattmesh-{site}/{object_id}/config`` (Home
Assistant's ``<discovery_prefix>/<component>/<node_id>/<object_id>/config``), and publishes
their states as one retained JSON object (:class:`broker.messages.HaState`) on its own
``wattmesh/v1/site/{site}/ha/state``; each config's ``value_template`` picks its field. A
null field renders as ``None``, which Home Assistant's MQTT sensor shows as unknown.

Signs and units follow docs/architecture.md: grid power (W) positive when importing, battery
power (W) positive when discharging, PV power (W), state of charge (%), the last clearing
price in currency per kWh, and the controller layer in force. Availability follows the
agent's retained status and last will (``site/{site}/status``, ``online`` true or false).

Topics come from :mod:`broker.topics`; the broker's ACL grants a site exactly these topics.
The configs are published after every (re)connect, the state every ``state_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker import topics
from broker.client import BusClient
from broker.errors import BusUnavailable
from broker.messages import Clearing, HaState

#: The controller layers, highest first (edge.policy), as the enum sensor's options.
CONTROLLERS: tuple[str, ...] = ("safety", "emergency", "dispatch", "market", "fallback")
#: The availability template: the status payload's ``online`` flag as Home Assistant's
#: default ``payload_available`` / ``payload_not_available``.
AVAILABILITY_TEMPLATE = "{{ 'online' if value_json.online else 'offline' }}"
log = logging.getLogger(__name__)

MANUFACTURER = "wattmesh"
MODEL = "wattmesh edge agent"


class HomeAssistantSection(BaseModel):
    """``[homeassistant]``: announce the site's sensors to Home Assistant (MQTT discovery).

    The broker's ACL (``wattmesh broker init --ha-discovery-prefix``) must name the same
    prefix; Home Assistant connects as the broker's monitor user (it reads, writes nothing).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="false keeps the section but announces nothing")
    discovery_prefix: str = Field(
        default=topics.HA_DISCOVERY_PREFIX,
        pattern=topics.HA_PREFIX_PATTERN,
        description="Home Assistant's discovery prefix (its MQTT integration's setting)",
    )
    device_name: str | None = Field(
        default=None, min_length=1, max_length=64, description='default "wattmesh {site}"'
    )
    currency: str = Field(
        default="EUR", pattern=r"^[A-Z]{3}$", description="ISO 4217 code of the price unit"
    )
    state_interval_s: float = Field(
        default=10.0, gt=0, le=3600, description="states are published this often (wall s)"
    )


@dataclass(frozen=True, slots=True)
class Sensor:
    """One announced sensor: its object id, display name, state field and metadata."""

    object_id: str
    name: str
    field: str
    unit: str | None
    device_class: str | None
    state_class: Literal["measurement", "total", "total_increasing"] | None
    precision: int | None = None
    options: tuple[str, ...] = ()


def sensors(currency: str) -> tuple[Sensor, ...]:
    """The six sensors, in the order of :data:`broker.topics.HA_OBJECTS`."""
    return (
        Sensor("pv_power", "PV power", "pv_power_w", "W", "power", "measurement", 0),
        Sensor(
            "battery_power",
            "Battery power (discharge +)",
            "battery_power_w",
            "W",
            "power",
            "measurement",
            0,
        ),
        Sensor(
            "battery_soc",
            "Battery state of charge",
            "battery_soc_pct",
            "%",
            "battery",
            "measurement",
            1,
        ),
        Sensor(
            "grid_power", "Grid power (import +)", "grid_power_w", "W", "power", "measurement", 0
        ),
        # Home Assistant's monetary class wants a bare currency: a price per kWh has no class.
        Sensor(
            "clearing_price",
            "Last clearing price",
            "clearing_price_per_kwh",
            f"{currency}/kWh",
            None,
            "measurement",
            4,
        ),
        Sensor("controller", "Controller", "controller", None, "enum", None, options=CONTROLLERS),
    )


def discovery_config(
    site: str, sensor: Sensor, section: HomeAssistantSection, software_version: str
) -> dict[str, object]:
    """One sensor's discovery config (Home Assistant's MQTT sensor options, full names)."""
    node = topics.ha_node_id(site)
    config: dict[str, object] = {
        "name": sensor.name,
        "unique_id": f"{node}-{sensor.object_id}",
        "state_topic": topics.ha_state_topic(site),
        "value_template": f"{{{{ value_json.{sensor.field} }}}}",
        "availability_topic": topics.site_topic(site, "status"),
        "availability_template": AVAILABILITY_TEMPLATE,
        "expire_after": max(60, math.ceil(3 * section.state_interval_s)),
        "device": {
            "identifiers": [node],
            "manufacturer": MANUFACTURER,
            "model": MODEL,
            "name": section.device_name or f"wattmesh {site}",
            "sw_version": software_version,
        },
        "origin": {"name": "wattmesh", "sw_version": software_version},
    }
    if sensor.unit is not None:
        config["unit_of_measurement"] = sensor.unit
    if sensor.device_class is not None:
        config["device_class"] = sensor.device_class
    if sensor.state_class is not None:
        config["state_class"] = sensor.state_class
    if sensor.precision is not None:
        config["suggested_display_precision"] = sensor.precision
    if sensor.options:
        config["options"] = list(sensor.options)
    return config


def discovery_messages(
    site: str, section: HomeAssistantSection, software_version: str
) -> list[tuple[str, bytes]]:
    """(topic, JSON) of every sensor's retained discovery config."""
    return [
        (
            topics.ha_discovery_topic(section.discovery_prefix, site, s.object_id),
            json.dumps(discovery_config(site, s, section, software_version)).encode(),
        )
        for s in sensors(section.currency)
    ]


class SnapshotView(Protocol):
    """Site totals of the agent's last poll (edge.agent.SiteSnapshot)."""

    grid_w: float | None
    pv_w: float
    battery_w: float
    soc_pct: float | None


def state_message(
    ts: float, snapshot: SnapshotView, controller: str, clearing: Clearing | None
) -> HaState:
    """The states of the six sensors at ``ts`` (signs as docs/architecture.md).

    A value the message cannot carry (not finite, or out of its range, e.g. a device that
    reports 150 %) is sent as unknown (null) rather than failing the whole message.
    """
    values: dict[str, object] = {
        "ts": ts,
        "pv_power_w": snapshot.pv_w,
        "battery_power_w": snapshot.battery_w,
        "battery_soc_pct": snapshot.soc_pct,
        "grid_power_w": snapshot.grid_w,
        "clearing_price_per_kwh": None if clearing is None else clearing.price_per_kwh,
        "clearing_interval": None if clearing is None else clearing.interval,
        "controller": controller if controller in CONTROLLERS else None,
    }
    try:
        return HaState.model_validate(values)
    except ValidationError as err:
        bad = {str(e["loc"][0]) for e in err.errors() if e["loc"]} - {"ts"}
        return HaState.model_validate({k: None if k in bad else v for k, v in values.items()})


class _Stats(Protocol):
    @property
    def cycles(self) -> int: ...


class _Clock(Protocol):
    def now(self) -> float: ...


class AgentView(Protocol):
    """What the publisher reads of a running edge agent."""

    @property
    def site(self) -> str: ...
    @property
    def bus(self) -> BusClient: ...
    @property
    def clock(self) -> _Clock: ...
    @property
    def stats(self) -> _Stats: ...
    @property
    def snapshot(self) -> SnapshotView: ...
    @property
    def controller(self) -> str: ...
    @property
    def clearing(self) -> Clearing | None: ...


async def publish_loop(
    agent: AgentView, section: HomeAssistantSection, software_version: str, stop: asyncio.Event
) -> None:
    """Announce the sensors after every (re)connect and publish their states every
    ``section.state_interval_s`` wall seconds (from the first poll cycle on) until ``stop``.

    Never raises: Home Assistant is a convenience and must not take the agent down (an
    unexpected error is logged once and the loop goes on).
    """
    announced_on = 0  # the bus's connect count when the configs were last published
    failing = False
    while not stop.is_set():
        bus = agent.bus
        if not bus.connected:
            with contextlib.suppress(TimeoutError):
                await bus.wait_connected(1.0)
            continue
        try:
            if announced_on != bus.stats.connects:
                connects = bus.stats.connects
                await bus.publish_many(
                    discovery_messages(agent.site, section, software_version), retain=True
                )
                announced_on = connects
            if agent.stats.cycles:
                state = state_message(
                    agent.clock.now(), agent.snapshot, agent.controller, agent.clearing
                )
                await bus.publish(
                    topics.ha_state_topic(agent.site),
                    state.model_dump_json().encode(),
                    retain=True,
                )
        except BusUnavailable:
            pass  # announced and published again once connected
        except Exception:
            if not failing:
                log.exception("Home Assistant states not published (logged once per episode)")
            failing = True
        else:
            failing = False
        wait_s = section.state_interval_s if agent.stats.cycles else 0.1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait_s)
