"""Settings pieces shared by the edge's and the coordinator's configuration files."""

from __future__ import annotations

import json
import os
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker.client import BusSettings
from broker.clock import ScaledClock


class ClockSettings(BaseModel):
    """Simulated time, to follow ``wattmesh sim run``; absent = the real clock.

    Either ``file`` (the clock file ``wattmesh sim run --clock-file`` writes) or ``start``
    with ``speed`` and ``anchor_wall_ts`` (the wall time at which simulated time was start).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: Path | None = None
    start: datetime | None = None
    speed: float = Field(default=1.0, gt=0)
    anchor_wall_ts: float | None = None

    @model_validator(mode="after")
    def _one(self) -> ClockSettings:
        if (self.file is None) == (self.start is None):
            raise ValueError("give either file or start")
        return self

    def build(self) -> ScaledClock:
        """The clock described; ``ValueError`` naming ``clock.file`` if it cannot be read."""
        if self.file is not None:
            try:
                data = json.loads(self.file.read_text())
                return ScaledClock(
                    float(data["start_ts"]), float(data["speed"]), float(data["anchor_wall_ts"])
                )
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"clock.file: cannot use {self.file}: {err}") from err
        assert self.start is not None
        start = self.start if self.start.tzinfo else self.start.replace(tzinfo=UTC)
        return ScaledClock(start.timestamp(), self.speed, self.anchor_wall_ts)


def validation_lines(err: ValidationError, source: str) -> str:
    """One line per problem: ``<source>: <field path>: <message>``."""
    lines = []
    for e in err.errors():
        where = ""
        for part in e["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        lines.append(f"{source}: {where or '(top level)'}: {e['msg']}")
    return "\n".join(lines)


class BrokerConnection(BaseModel):
    """How to reach the MQTT broker: the ``[broker]`` section of a site or coordinator file.

    Secrets stay out of the file: the password comes from ``password_env`` (an environment
    variable, which must then be set) or ``password_file`` (readable by the service only).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=1883, gt=0, le=65535)
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    client_id: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    #: The listener's mount point on a many-feeders broker (``feeder/{id}/``, as
    #: ``wattmesh broker init --feeders`` writes it in credentials.toml); see
    #: ``BusSettings.mount_point``.
    mount_point: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_/-]{0,126}/$")

    def password(self) -> str | None:
        """The password from the password file or the environment; ``ValueError`` if missing."""
        if self.password_file:
            try:
                return self.password_file.read_text().strip()
            except OSError as err:
                raise ValueError(
                    f"broker.password_file: cannot read {self.password_file}: {err.strerror}"
                ) from err
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ValueError(f"broker.password_env: ${self.password_env} is not set")
            return value
        return None

    def bus_settings(
        self, *, username: str, client_id: str, password: str | None = None, max_inflight: int = 200
    ) -> BusSettings:
        """Client settings; ``username`` and ``client_id`` apply when the file gives none."""
        return BusSettings(
            host=self.host,
            port=self.port,
            username=self.username or username,
            password=password if password is not None else self.password(),
            client_id=self.client_id or client_id,
            keepalive_s=self.keepalive_s,
            ca_file=str(self.ca_file) if self.ca_file else None,
            cert_file=str(self.cert_file) if self.cert_file else None,
            key_file=str(self.key_file) if self.key_file else None,
            max_inflight=max_inflight,
            mount_point=self.mount_point,
        )


def read_toml(path: Path, error: type[ValueError]) -> dict[str, Any]:
    """A TOML file's contents; ``error`` names the file when it cannot be read or parsed."""
    try:
        return tomllib.loads(path.read_text())
    except OSError as err:
        raise error(f"{path}: cannot read: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise error(f"{path}: not valid TOML: {err}") from err
