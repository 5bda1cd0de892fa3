"""Home Assistant MQTT discovery: the messages against Home Assistant's documented schema
(tests/ha_discovery_schema.py), their templates rendered with Jinja2 as Home Assistant does,
the site file's section, and a running agent announcing over a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import jinja2
import pytest
from pydantic import ValidationError

from broker import topics
from broker.messages import Clearing, HaState, Status
from broker.mosquitto import BrokerFiles, MosquittoProcess
from edge.agent import SOFTWARE_VERSION, EdgeAgent, SiteSnapshot
from edge.config import EdgeConfigError, parse_edge_config
from edge.homeassistant import (
    CONTROLLERS,
    HomeAssistantSection,
    discovery_messages,
    state_message,
)
from tests.broker_fixtures import MqttClientFactory
from tests.ha_discovery_schema import DISCOVERY_TOPIC, MqttSensorConfig
from tests.test_edge_agent import NOON_TS, SITE, observer, simulated_house, site_config

_JINJA = jinja2.Environment(autoescape=False)


def render(template: str, payload: bytes) -> str:
    """A Home Assistant value template applied to an MQTT payload (``value_json``)."""
    return _JINJA.from_string(template).render(value_json=json.loads(payload))


def test_every_discovery_message_validates_against_home_assistants_sensor_schema() -> None:
    section = HomeAssistantSection(discovery_prefix="ha/disc", currency="CHF")
    messages = discovery_messages("house-1", section, "0.1.0")
    configs = [MqttSensorConfig.model_validate(json.loads(p)) for _, p in messages]
    matches = [DISCOVERY_TOPIC.match(t) for t, _ in messages]
    assert all(m is not None for m in matches)
    assert [(m["prefix"], m["component"], m["node_id"]) for m in matches if m] == [
        ("ha/disc", "sensor", "wattmesh-house-1")
    ] * 6
    assert tuple(m["object_id"] for m in matches if m) == topics.HA_OBJECTS
    assert len({c.unique_id for c in configs}) == 6
    assert {c.state_topic for c in configs} == {"wattmesh/v1/site/house-1/ha/state"}
    assert {c.availability_topic for c in configs} == {"wattmesh/v1/site/house-1/status"}
    assert all(c.device and c.device.identifiers == ["wattmesh-house-1"] for c in configs)
    by_id = {m["object_id"]: c for m, c in zip(matches, configs, strict=True) if m}
    assert (by_id["grid_power"].device_class, by_id["grid_power"].unit_of_measurement) == (
        "power",
        "W",
    )
    assert by_id["battery_soc"].device_class == "battery"
    assert by_id["clearing_price"].unit_of_measurement == "CHF/kWh"
    assert by_id["controller"].options == list(CONTROLLERS)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"unit_of_measurement": "kWh"}, "power sensors take"),
        ({"device_class": "enum"}, "enum sensor needs options"),
        ({"device_class": "price"}, "not a sensor device class"),
        ({"state_class": "average"}, "state_class"),
        ({"unique_id": None}, "only works with a unique_id"),
        ({"availability": [{"topic": "x"}]}, "must not both be set"),
        ({"device": {"name": "no identifiers"}}, "identifiers or connections"),
        ({"colour": "red"}, "Extra inputs"),
        ({"state_topic": None}, "state_topic"),
    ],
)
def test_the_schema_fixture_refuses_what_home_assistants_documentation_forbids(
    change: dict[str, object], why: str
) -> None:
    _, payload = discovery_messages("house-1", HomeAssistantSection(), "0.1.0")[0]
    config = {**json.loads(payload), **change}
    with pytest.raises(ValidationError, match=why):
        MqttSensorConfig.model_validate({k: v for k, v in config.items() if v is not None})


def test_value_templates_pick_each_state_with_its_sign_and_availability_follows_status() -> None:
    """Importing 1.5 kW while charging the battery at 2 kW (battery power -2000 W: + is
    discharging); a null becomes 'None', which Home Assistant's MQTT sensor shows as unknown."""
    snapshot = SiteSnapshot(grid_w=1500.0, pv_w=800.0, battery_w=-2000.0, soc_pct=61.5)
    clearing = Clearing(ts=NOON_TS, interval=1_979_000, price_per_kwh=0.1834, volume_kwh=3.0)
    state = state_message(NOON_TS, snapshot, "market", clearing).model_dump_json().encode()
    messages = discovery_messages("house-1", HomeAssistantSection(), "0.1.0")
    rendered = {
        t.split("/")[-2]: render(json.loads(p)["value_template"], state) for t, p in messages
    }
    assert rendered == {
        "pv_power": "800.0",
        "battery_power": "-2000.0",
        "battery_soc": "61.5",
        "grid_power": "1500.0",
        "clearing_price": "0.1834",
        "controller": "market",
    }
    unknown = state_message(NOON_TS, SiteSnapshot(), "fallback", None).model_dump_json().encode()
    template = json.loads(messages[3][1])["value_template"]
    assert render(template, unknown) == "None"
    availability = json.loads(messages[0][1])["availability_template"]
    for online, shown in ((True, "online"), (False, "offline")):
        status = Status(ts=NOON_TS, online=online).model_dump_json().encode()
        assert render(availability, status) == shown


def test_a_value_the_state_cannot_carry_is_sent_as_unknown_not_dropped() -> None:
    """A battery reporting 150 % or a meter reading NaN must not stop the other states."""
    snapshot = SiteSnapshot(grid_w=math.nan, pv_w=500.0, battery_w=-100.0, soc_pct=150.0)
    state = state_message(NOON_TS, snapshot, "no-such-layer", None)
    assert (state.grid_power_w, state.battery_soc_pct, state.controller) == (None, None, None)
    assert (state.pv_power_w, state.battery_power_w) == (500.0, -100.0)


def test_homeassistant_section_is_off_unless_configured_and_checked(tmp_path: Path) -> None:
    base: dict[str, object] = {
        "site": {"id": "house-1"},
        "devices": [{"name": "m", "kind": "sdm630", "url": "tcp://127.0.0.1:1502"}],
    }
    assert parse_edge_config(base, "site.toml").homeassistant is None
    on = parse_edge_config({**base, "homeassistant": {}}, "site.toml").homeassistant
    assert on == HomeAssistantSection(enabled=True, discovery_prefix="homeassistant")
    with pytest.raises(EdgeConfigError, match=r"site.toml: homeassistant.discovery_prefix"):
        parse_edge_config({**base, "homeassistant": {"discovery_prefix": "ha/#"}}, "site.toml")
    with pytest.raises(EdgeConfigError, match=r"homeassistant.currency"):
        parse_edge_config({**base, "homeassistant": {"currency": "euro"}}, "site.toml")


async def test_a_running_agent_announces_retained_configs_and_publishes_its_states(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    mqtt_client: MqttClientFactory,
    tmp_path: Path,
) -> None:
    """Over the generated ACL: the site's own credentials publish the discovery configs and
    states; Home Assistant's user (the monitor) receives them, the configs retained."""
    clearing = Clearing(ts=NOON_TS, interval=1_979_048, price_per_kwh=0.2125, volume_kwh=4.0)
    async with mqtt_client("coordinator") as coordinator:
        await coordinator.publish(
            topics.MARKET_CLEARING, clearing.model_dump_json(), qos=1, retain=True
        )
    state_topic = topics.ha_state_topic(SITE)
    async with simulated_house() as house, observer(broker_files, "monitor", "ha") as obs:
        await obs.bus.subscribe("homeassistant/#")
        config = site_config(
            house, broker_files, tmp_path / "spool.sqlite", homeassistant={"state_interval_s": 0.3}
        )
        async with EdgeAgent(config, house.clock, password=broker_files.credentials[SITE]):
            await obs.wait_for(
                lambda: (
                    sum(t == state_topic for t, _ in obs.messages) >= 3
                    and sum(t.startswith("homeassistant/") for t, _ in obs.messages) >= 6
                )
            )
    announced = {t: p for t, p in obs.messages if t.startswith("homeassistant/")}
    assert announced == dict(discovery_messages(SITE, HomeAssistantSection(), SOFTWARE_VERSION))
    for payload in announced.values():
        MqttSensorConfig.model_validate(json.loads(payload))
    states = [HaState.model_validate_json(p) for t, p in obs.messages if t == state_topic]
    last = states[-1]
    assert last.pv_power_w is not None and last.pv_power_w > 1000  # midsummer noon
    assert last.battery_soc_pct == pytest.approx(50.0, abs=1.0)
    assert last.grid_power_w is not None
    assert last.clearing_price_per_kwh == 0.2125
    assert last.clearing_interval == clearing.interval
    assert last.controller in CONTROLLERS
    assert len({s.id for s in states}) == len(states)
    # Home Assistant started later: the configs and the last state are retained.
    async with asyncio.timeout(10), mqtt_client("monitor") as later:
        await later.subscribe("homeassistant/#", qos=1)
        await later.subscribe(state_topic, qos=1)
        retained = [await anext(later.messages) for _ in range(7)]
    assert all(m.retain for m in retained)
    assert {m.topic.value for m in retained} == {*announced, state_topic}
