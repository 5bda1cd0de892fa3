"""Home Assistant's MQTT discovery schema for sensors, as its documentation states it.

Written from Home Assistant's documentation (the MQTT integration's "Discovery" section and
the "MQTT Sensor" and "Sensor" integration pages), not from wattmesh's code:

- Discovery topic ``<discovery_prefix>/<component>/[<node_id>/]<object_id>/config``; node and
  object ids consist of ``[a-zA-Z0-9_-]`` only. The payload is a JSON object (a dict).
- MQTT sensor options (full names; abbreviations are only a wire shorthand): ``state_topic``
  is required; ``device`` only works with a ``unique_id``, and needs ``identifiers`` or
  ``connections``; ``availability`` (a list) and ``availability_topic`` must not be combined;
  ``state_class`` is one of measurement, measurement_angle, total, total_increasing.
- Sensor device classes and their units: ``power`` W/kW/MW/GW/TW/mW/BTU/h, ``battery`` %,
  ``enum`` has ``options`` and neither a unit nor a state class, ``monetary`` an ISO 4217
  currency and not the ``measurement`` state class; ``options`` only with ``enum``.
"""

from __future__ import annotations

import re
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

DISCOVERY_TOPIC = re.compile(
    r"^(?P<prefix>[^#+]+)/(?P<component>[a-z_]+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?"
    r"(?P<object_id>[a-zA-Z0-9_-]+)/config$"
)

#: The documented sensor device classes.
SENSOR_DEVICE_CLASSES = frozenset(
    {
        "absolute_humidity", "apparent_power", "aqi", "area", "atmospheric_pressure",
        "battery", "blood_glucose_concentration", "carbon_dioxide", "carbon_monoxide",
        "conductivity", "current", "data_rate", "data_size", "date", "distance", "duration",
        "energy", "energy_distance", "energy_storage", "enum", "frequency", "gas", "humidity",
        "illuminance", "irradiance", "moisture", "monetary", "nitrogen_dioxide",
        "nitrogen_monoxide", "nitrous_oxide", "ozone", "ph", "pm1", "pm10", "pm25",
        "power_factor", "power", "precipitation", "precipitation_intensity", "pressure",
        "reactive_energy", "reactive_power", "signal_strength", "sound_pressure", "speed",
        "sulphur_dioxide", "temperature", "timestamp", "volatile_organic_compounds",
        "volatile_organic_compounds_parts", "voltage", "volume", "volume_flow_rate",
        "volume_storage", "water", "weight", "wind_direction", "wind_speed",
    }
)  # fmt: skip

#: Units the documentation allows for the device classes wattmesh uses.
UNITS: dict[str, frozenset[str]] = {
    "power": frozenset({"mW", "W", "kW", "MW", "GW", "TW", "BTU/h"}),
    "battery": frozenset({"%"}),
    "energy": frozenset({"J", "kJ", "MJ", "GJ", "mWh", "Wh", "kWh", "MWh", "GWh", "TWh"}),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Device(_Strict):
    """The ``device`` block: ties entities to one device in the device registry."""

    identifiers: list[str] | str | None = None
    connections: list[tuple[str, str]] | None = None
    configuration_url: str | None = None
    hw_version: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    model_id: str | None = None
    name: str | None = None
    serial_number: str | None = None
    suggested_area: str | None = None
    sw_version: str | None = None
    via_device: str | None = None

    @model_validator(mode="after")
    def _identified(self) -> Self:
        if not self.identifiers and not self.connections:
            raise ValueError("a device needs identifiers or connections")
        return self


class Origin(_Strict):
    """The ``origin`` block: what published the discovery message."""

    name: str = Field(min_length=1)
    sw_version: str | None = None
    support_url: str | None = None


class Availability(_Strict):
    topic: str = Field(min_length=1)
    payload_available: str = "online"
    payload_not_available: str = "offline"
    value_template: str | None = None


class MqttSensorConfig(_Strict):
    """An MQTT sensor's discovery payload (every documented option, full names)."""

    state_topic: str = Field(min_length=1)
    availability: list[Availability] | None = None
    availability_mode: Literal["all", "any", "latest"] | None = None
    availability_template: str | None = None
    availability_topic: str | None = None
    default_entity_id: str | None = None
    device: Device | None = None
    device_class: str | None = None
    enabled_by_default: bool | None = None
    encoding: str | None = None
    entity_category: Literal["config", "diagnostic"] | None = None
    entity_picture: str | None = None
    expire_after: int | None = Field(default=None, ge=0)
    force_update: bool | None = None
    icon: str | None = None
    json_attributes_template: str | None = None
    json_attributes_topic: str | None = None
    last_reset_value_template: str | None = None
    name: str | None = None
    object_id: str | None = None
    options: list[str] | None = None
    origin: Origin | None = None
    payload_available: str | None = None
    payload_not_available: str | None = None
    platform: Literal["mqtt"] | None = None
    qos: Literal[0, 1, 2] | None = None
    state_class: Literal["measurement", "measurement_angle", "total", "total_increasing"] | None = (
        None
    )
    suggested_display_precision: int | None = Field(default=None, ge=0)
    unique_id: str | None = None
    unit_of_measurement: str | None = None
    value_template: str | None = None

    @model_validator(mode="after")
    def _documented_rules(self) -> Self:
        if self.device is not None and not self.unique_id:
            raise ValueError("device only works with a unique_id")
        if self.availability is not None and self.availability_topic is not None:
            raise ValueError("availability and availability_topic must not both be set")
        dc = self.device_class
        if dc is not None and dc not in SENSOR_DEVICE_CLASSES:
            raise ValueError(f"{dc!r} is not a sensor device class")
        if dc == "enum":
            if not self.options:
                raise ValueError("an enum sensor needs options")
            if self.unit_of_measurement is not None or self.state_class is not None:
                raise ValueError("an enum sensor has no unit and no state class")
        elif self.options is not None:
            raise ValueError("options are for enum sensors only")
        if dc in UNITS and self.unit_of_measurement not in UNITS[dc]:
            raise ValueError(f"{dc} sensors take {sorted(UNITS[dc])}")
        if dc == "monetary":
            if not re.fullmatch(r"[A-Z]{3}", self.unit_of_measurement or ""):
                raise ValueError("a monetary sensor's unit is an ISO 4217 currency")
            if self.state_class == "measurement":
                raise ValueError("a monetary sensor cannot be a measurement")
        return self
