"""The topic scheme (v1, docs/architecture.md s. 3): the one place topic strings are made."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

PREFIX = "wattmesh/v1"

#: Site and feeder ids: lower-case letters, digits, '-' and '_' (no MQTT wildcards or '/').
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_ID = re.compile(ID_PATTERN)

SiteTopicKind = Literal[
    "status", "telemetry", "bid", "award", "dispatch", "dispatch/ack", "reservation"
]
SITE_TOPIC_KINDS: tuple[SiteTopicKind, ...] = (
    "status",
    "telemetry",
    "bid",
    "award",
    "dispatch",
    "dispatch/ack",
    "reservation",
)
#: What a site publishes (its own topics only) and what it reads.
SITE_PUBLISHES: tuple[SiteTopicKind, ...] = ("status", "telemetry", "bid", "dispatch/ack")
SITE_READS: tuple[SiteTopicKind, ...] = ("award", "dispatch", "reservation")

MARKET_CLEARING = f"{PREFIX}/market/clearing"
#: The weather service's forecast for the community (retained; broker/messages.py
#: ``WeatherForecast``): written by the weather-service user and the operator.
WEATHER_FORECAST = f"{PREFIX}/weather/forecast"


def check_id(value: str, what: str = "site") -> str:
    """``value`` if it is a valid site or feeder id, else ``ValueError`` saying why."""
    if not _ID.match(value):
        raise ValueError(
            f"{what} id {value!r} must be 1-64 characters of a-z, 0-9, '-' and '_', "
            "starting with a letter or digit"
        )
    return value


def site_topic(site: str, kind: SiteTopicKind) -> str:
    """``wattmesh/v1/site/{site}/{kind}``."""
    if kind not in SITE_TOPIC_KINDS:
        raise ValueError(f"unknown site topic kind {kind!r}")
    return f"{PREFIX}/site/{check_id(site)}/{kind}"


def site_wildcard(kind: SiteTopicKind) -> str:
    """The subscription for ``kind`` of every site: ``wattmesh/v1/site/+/{kind}``."""
    return f"{PREFIX}/site/+/{kind}"


def forecast_topic(site: str) -> str:
    """``wattmesh/v1/forecast/{site}``."""
    return f"{PREFIX}/forecast/{check_id(site)}"


def grid_state_topic(feeder: str) -> str:
    """``wattmesh/v1/grid/{feeder}/state``."""
    return f"{PREFIX}/grid/{check_id(feeder, 'feeder')}/state"


def coordinator_status_topic(feeder: str) -> str:
    """``wattmesh/v1/coordinator/{feeder}/status``: the coordinator's health counters."""
    return f"{PREFIX}/coordinator/{check_id(feeder, 'feeder')}/status"


#: Every feeder's coordinator status.
COORDINATOR_STATUS_ALL = f"{PREFIX}/coordinator/+/status"


def bridge_state_topic(edge: str) -> str:
    """``wattmesh/v1/bridge/{edge}/state``: retained ``1`` while edge broker ``edge``'s bridge to
    the core is up, ``0`` (its will) when it drops (broker/bridge.py)."""
    return f"{PREFIX}/bridge/{check_id(edge, 'edge')}/state"


#: Every edge broker's bridge state.
BRIDGE_STATE_ALL = f"{PREFIX}/bridge/+/state"

# -- Home Assistant MQTT discovery (edge/homeassistant.py) ----------------------------------
#: Home Assistant's default discovery prefix.
HA_DISCOVERY_PREFIX = "homeassistant"
#: A discovery prefix: one or more topic levels of letters, digits, '_' and '-'.
HA_PREFIX_PATTERN = r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,3}$"
_HA_PREFIX = re.compile(HA_PREFIX_PATTERN)
#: The sensors each site announces (object ids in its discovery topics): PV power, battery
#: power, state of charge, grid exchange, last clearing price and the controller in force.
HA_OBJECTS: tuple[str, ...] = (
    "pv_power",
    "battery_power",
    "battery_soc",
    "grid_power",
    "clearing_price",
    "controller",
)


def ha_node_id(site: str) -> str:
    """The discovery node id of a site's agent: ``wattmesh-{site}``."""
    return f"wattmesh-{check_id(site)}"


def ha_discovery_topic(prefix: str, site: str, object_id: str) -> str:
    """``{prefix}/sensor/wattmesh-{site}/{object_id}/config``: a retained discovery config
    (Home Assistant's ``<discovery_prefix>/<component>/<node_id>/<object_id>/config``)."""
    if not _HA_PREFIX.match(prefix):
        raise ValueError(f"discovery prefix {prefix!r} must be topic levels of A-Z, a-z, 0-9, _, -")
    if object_id not in HA_OBJECTS:
        raise ValueError(f"unknown Home Assistant object {object_id!r}")
    return f"{prefix}/sensor/{ha_node_id(site)}/{object_id}/config"


def ha_state_topic(site: str) -> str:
    """``wattmesh/v1/site/{site}/ha/state``: the site's sensor states for Home Assistant
    (one JSON object; each sensor's ``value_template`` picks its field)."""
    return f"{PREFIX}/site/{check_id(site)}/ha/state"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """What a topic string says: its kind and the site or feeder it belongs to."""

    kind: str
    site: str | None = None
    feeder: str | None = None


def parse_topic(topic: str) -> ParsedTopic:
    """Parse a v1 topic; ``ValueError`` for anything outside the scheme."""
    if topic == MARKET_CLEARING:
        return ParsedTopic("market/clearing")
    if topic == WEATHER_FORECAST:
        return ParsedTopic("weather/forecast")
    parts = topic.split("/")
    if parts[:2] != PREFIX.split("/"):
        raise ValueError(f"topic {topic!r} is not under {PREFIX}/")
    rest = parts[2:]
    if len(rest) >= 3 and rest[0] == "site":
        kind = "/".join(rest[2:])
        if kind in SITE_TOPIC_KINDS and _ID.match(rest[1]):
            return ParsedTopic(kind, site=rest[1])
    if len(rest) == 2 and rest[0] == "forecast" and _ID.match(rest[1]):
        return ParsedTopic("forecast", site=rest[1])
    if len(rest) == 3 and rest[0] == "grid" and rest[2] == "state" and _ID.match(rest[1]):
        return ParsedTopic("grid/state", feeder=rest[1])
    if len(rest) == 3 and rest[0] == "coordinator" and rest[2] == "status" and _ID.match(rest[1]):
        return ParsedTopic("coordinator/status", feeder=rest[1])
    raise ValueError(f"topic {topic!r} is not in the v1 scheme")
