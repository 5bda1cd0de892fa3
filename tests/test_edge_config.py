"""Site files and message schemas: mistakes name the file and the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.messages import BY_KIND, Bid, Dispatch, write_schemas
from edge.config import EdgeConfigError, load_edge_config

ROOT = Path(__file__).resolve().parent.parent
SITES = sorted((ROOT / "config" / "sites").glob("*.toml"))


@pytest.mark.parametrize("path", SITES, ids=lambda p: p.name)
def test_every_shipped_site_file_loads(path: Path) -> None:
    config = load_edge_config(path)
    assert config.site.id == path.stem
    assert config.clock is not None and config.clock.file is not None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("unit = 1", "unit = 300", 1),
            r"devices\[0\]\.unit: Input should be less than or equal to 247",
        ),
        (('kind = "battery"', 'kind = "flywheel"', 1), r"devices\[1\]\.kind: Input should be"),
        (
            ("poll_interval_s = 1.0", "poll_intervall_s = 1.0", 1),
            r"site\.poll_intervall_s: Extra inputs",
        ),
        (
            ('url = "tcp://127.0.0.1:15024"', 'url = "http://x"', 1),
            r"devices\[0\]: Value error, url must start",
        ),
        (("gate_s = 60", "gate_s = 890", 1), r"market: Value error, gate_s \+ bid_lead_s"),
    ],
)
def test_site_file_mistakes_name_the_file_and_the_field(
    tmp_path: Path, edit: tuple[str, str, int], message: str
) -> None:
    text = (ROOT / "config" / "sites" / "house-1.toml").read_text()
    old, new, count = edit
    assert old in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(old, new, count))
    with pytest.raises(EdgeConfigError, match=rf"bad\.toml: {message}"):
        load_edge_config(bad)


def test_a_missing_password_variable_is_named(tmp_path: Path) -> None:
    config = load_edge_config(ROOT / "config" / "sites" / "house-1.toml")
    os.environ.pop("WATTMESH_MQTT_PASSWORD", None)
    with pytest.raises(ValueError, match=r"\$WATTMESH_MQTT_PASSWORD is not set"):
        config.broker.password()


def test_edge_run_reports_a_bad_file_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "site.toml"
    bad.write_text("[site]\nid = 'Bad Site!'\n")
    result = subprocess.run(
        [sys.executable, "-m", "wattmesh", "edge", "run", str(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert result.returncode == 2
    assert "site.toml: site.id: String should match pattern" in result.stderr
    assert "site.toml: devices: Field required" in result.stderr
    assert "Traceback" not in result.stderr


def test_schema_command_writes_one_valid_json_schema_per_topic_kind(tmp_path: Path) -> None:
    written = write_schemas(tmp_path)
    assert len(written) == len(BY_KIND)
    bid = json.loads((tmp_path / "bid.schema.json").read_text())
    assert bid["$id"] == "wattmesh/v1/bid"
    assert bid["additionalProperties"] is False
    assert set(bid["required"]) >= {"ts", "interval"}


@pytest.mark.parametrize(
    ("model", "payload", "message"),
    [
        (
            Dispatch,
            {"ts": 100.0, "expires_ts": 50.0, "battery_power_w": 1.0},
            "expires_ts must be after ts",
        ),
        (Dispatch, {"ts": 100.0, "expires_ts": 500.0}, "needs battery_power_w or load_limit_w"),
        (
            Dispatch,
            {"ts": 100.0, "expires_ts": 500.0, "battery_power_w": 1.0, "site": "x"},
            "Extra inputs",
        ),
        (
            Bid,
            {
                "ts": 100.0,
                "interval": 1,
                "buy": [
                    {"price_per_kwh": 0.1, "quantity_kwh": 1.0},
                    {"price_per_kwh": 0.2, "quantity_kwh": 1.0},
                ],
            },
            "falling price",
        ),
        (
            Bid,
            {
                "ts": 100.0,
                "interval": 1,
                "buy": [{"price_per_kwh": 0.3, "quantity_kwh": 1.0}],
                "sell": [{"price_per_kwh": 0.2, "quantity_kwh": 1.0}],
            },
            "at or below its own buy",
        ),
        (
            Bid,
            {"ts": 100.0, "interval": 1, "buy": [{"price_per_kwh": 0.3, "quantity_kwh": -1.0}]},
            "greater than 0",
        ),
        (
            Bid,
            {"ts": 100.0, "interval": 1, "buy": [{"price_per_kwh": 500.0, "quantity_kwh": 1.0}]},
            "less than or equal to 100",
        ),
    ],
)
def test_messages_refuse_nonsense(model: type, payload: dict[str, object], message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        model.model_validate_json(json.dumps(payload))


def test_nan_and_infinity_are_refused_in_json() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Dispatch.model_validate_json('{"ts": 100, "expires_ts": 500, "battery_power_w": NaN}')
    with pytest.raises(ValidationError):
        Dispatch.model_validate_json('{"ts": 100, "expires_ts": 500, "battery_power_w": Infinity}')
