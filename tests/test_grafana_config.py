"""Structural checks of the Grafana provisioning, the dashboards and config/compose.yaml.

Grafana cannot be installed here (it is in neither Debian, PyPI nor npm), there is no InfluxDB 2
to run Flux against, and Docker is not available: so these are structural checks, not a
rendering or query test. They check that every dashboard is valid JSON with the fields Grafana
needs (uid, title, panels with a datasource, targets and a grid position, unique ids), that
every Flux query names only measurements, fields and tags that the historian writes (its
``SCHEMA``, so the dashboards and the historian cannot drift apart), and that the provisioning
files and compose.yaml parse and point at files that exist.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]

from coordinator.historian import SCHEMA, HistorianSettings

CONFIG = Path(__file__).resolve().parent.parent / "config"
GRAFANA = CONFIG / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "wattmesh.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "wattmesh.yaml"
COMPOSE = CONFIG / "compose.yaml"
DASHBOARD_FILES = ("site.json", "market.json", "feeder.json")

MEASUREMENT = re.compile(r'\br\._measurement\s*==\s*"([^"]*)"')
FIELD = re.compile(r'\br\._field\s*==\s*"([^"]*)"')
TAG = re.compile(r'\br\.([A-Za-z][A-Za-z0-9_]*)\s*==\s*"([^"]*)"')
COLUMNS = re.compile(r"\b(?:group|keep)\(columns:\s*\[([^\]]*)\]")
TAG_VALUES = re.compile(r'schema\.tagValues\([^)]*\btag:\s*"([^"]+)"')
VARIABLE = re.compile(r"\$\{([A-Za-z0-9_]+)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
STANDARD_COLUMNS = {"_time", "_value", "_field", "_measurement", "_start", "_stop"}


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DASHBOARDS / name).read_text())
    return data


def datasource_uid() -> str:
    doc = yaml.safe_load(DATASOURCES.read_text())
    (source,) = doc["datasources"]
    uid: str = source["uid"]
    return uid


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, Flux text) of every panel target and every query variable."""
    out = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            out.append(
                (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["query"])
            )
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            out.append((f"variable {var['name']}", var["query"]))
    return out


def pipelines(flux: str) -> list[str]:
    """The query split at each ``from(``/``schema.``: one pipeline per data source read."""
    parts = re.split(r"(?=\bfrom\(bucket:|\bschema\.tagValues\()", flux)
    return [p for p in parts if "from(bucket:" in p or "schema.tagValues(" in p]


def check_pipeline(where: str, flux: str, variables: set[str]) -> list[str]:
    errors = []
    measurements = set(MEASUREMENT.findall(flux))
    if len(measurements) != 1:
        return [f"{where}: names {sorted(measurements) or 'no'} measurements; want exactly one"]
    (measurement,) = measurements
    if measurement not in SCHEMA:
        return [f"{where}: measurement {measurement!r} is not written by the historian"]
    tags, fields = SCHEMA[measurement]
    if "schema.tagValues(" in flux:
        for tag in TAG_VALUES.findall(flux):
            if tag not in tags:
                errors.append(f"{where}: {measurement} has no tag {tag!r}")
    else:
        for part in ("from(bucket: v.defaultBucket)", "range(start: v.timeRangeStart", "filter("):
            if part not in flux:
                errors.append(f"{where}: missing {part!r}")
        named = FIELD.findall(flux)
        if not named:
            errors.append(f"{where}: filters no _field")
        errors += [f"{where}: {measurement} has no field {f!r}" for f in named if f not in fields]
    for name, value in TAG.findall(flux):
        if name.startswith("_"):
            continue
        if name not in tags:
            errors.append(f"{where}: {measurement} has no tag {name!r}")
        for var in VARIABLE.findall(value):
            if (var[0] or var[1]) not in variables:
                errors.append(f"{where}: uses undefined variable {value!r}")
    for columns in COLUMNS.findall(flux):
        for column in re.findall(r'"([^"]*)"', columns):
            if column not in STANDARD_COLUMNS and column not in tags:
                errors.append(f"{where}: {measurement} has no column {column!r}")
    return errors


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_dashboard_structure(name: str) -> None:
    dashboard = load(name)
    uid = datasource_uid()
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"]), "uid: at most 40 characters"
    assert dashboard["title"].strip()
    assert isinstance(dashboard["schemaVersion"], int)
    panels = all_panels(dashboard)
    assert panels, "a dashboard without panels"
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        where = f"{name}: panel {panel.get('id')} {panel.get('title')!r}"
        assert isinstance(panel["id"], int), where
        assert panel["title"].strip(), where
        assert panel["type"] in {
            "timeseries",
            "stat",
            "state-timeline",
            "bargauge",
            "gauge",
            "table",
            "barchart",
            "row",
        }, where
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "influxdb", "uid": uid}, where
        grid = panel["gridPos"]
        assert set(grid) >= {"x", "y", "w", "h"}, where
        assert all(isinstance(grid[k], int) for k in "xywh"), where
        assert grid["w"] > 0, where
        assert grid["h"] > 0, where
        assert grid["x"] >= 0, where
        assert grid["x"] + grid["w"] <= 24, where
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{where} overlaps another panel"
        occupied |= cells
        targets = panel["targets"]
        assert targets, f"{where}: no targets"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), where
        for target in targets:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], where
            assert target["query"].strip(), where
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            assert var["datasource"] == {"type": "influxdb", "uid": uid}, var["name"]


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_every_query_names_a_measurement_field_and_tags_the_historian_writes(name: str) -> None:
    dashboard = load(name)
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    variables |= {"__interval", "__range"}  # Grafana's own
    errors: list[str] = []
    count = 0
    for where, flux in queries(dashboard):
        parts = pipelines(flux)
        if not parts:
            errors.append(f"{name}: {where}: no from(bucket: ...) or schema.tagValues(...)")
        for part in parts:
            count += 1
            errors += check_pipeline(f"{name}: {where}", part, variables)
    assert count
    assert not errors, "\n".join(errors)


def test_the_dashboards_cover_what_the_issue_asks_for() -> None:
    def used(name: str) -> set[tuple[str, str]]:
        out = set()
        for _, flux in queries(load(name)):
            for part in pipelines(flux):
                for m in MEASUREMENT.findall(part):
                    out |= {(m, f) for f in FIELD.findall(part)}
        return out

    site = used("site.json")
    assert {
        ("site", "pv_power_w"),
        ("site", "load_power_w"),
        ("site", "battery_power_w"),
        ("site", "grid_power_w"),
        ("device", "available"),
    } <= site
    assert ("site", "battery_soc_pct") in site or ("device", "soc_pct") in site
    assert "site" in {v["name"] for v in load("site.json")["templating"]["list"]}
    market = used("market.json")
    assert {
        ("clearing", "price_per_kwh"),
        ("clearing", "retail_price_per_kwh"),
        ("clearing", "feed_in_price_per_kwh"),
        ("clearing", "volume_kwh"),
        ("award", "quantity_kwh"),
        ("settlement", "savings"),
    } <= market
    feeder = used("feeder.json")
    assert {
        ("feeder", "flow_w"),
        ("feeder", "import_limit_w"),
        ("feeder", "export_limit_w"),
        ("feeder", "mode_code"),
        ("dispatch", "battery_power_w"),
    } <= feeder
    uids = [load(n)["uid"] for n in DASHBOARD_FILES]
    assert len(set(uids)) == len(uids)


def test_the_query_checker_catches_drift() -> None:
    """The checks above would fail on a misspelt field, tag or measurement."""
    ok = (
        "from(bucket: v.defaultBucket) |> range(start: v.timeRangeStart) "
        '|> filter(fn: (r) => r._measurement == "site" and r.site == "${site}" '
        'and r._field == "pv_power_w")'
    )
    assert check_pipeline("q", ok, {"site"}) == []
    assert check_pipeline("q", ok.replace("pv_power_w", "pv_w"), {"site"})
    assert check_pipeline("q", ok.replace("r.site", "r.feeder"), {"site"})
    assert check_pipeline("q", ok.replace('== "site"', '== "sites"'), {"site"})
    assert check_pipeline("q", ok, set())  # undefined variable
    assert check_pipeline("q", ok + ' |> group(columns: ["device"])', {"site"})


def test_datasource_provisioning() -> None:
    doc = yaml.safe_load(DATASOURCES.read_text())
    assert doc["apiVersion"] == 1
    (source,) = doc["datasources"]
    assert source["type"] == "influxdb"
    assert source["access"] == "proxy"
    assert source["jsonData"]["version"] == "Flux"  # InfluxDB 2 with Flux, not InfluxQL
    settings = {
        "url": source["url"],
        "organization": source["jsonData"]["organization"],
        "defaultBucket": source["jsonData"]["defaultBucket"],
        "token": source["secureJsonData"]["token"],
    }
    for key, value in settings.items():  # from the environment, never in the file
        assert re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*\}", value), f"{key}: {value!r}"


def test_dashboard_provider_provisioning() -> None:
    doc = yaml.safe_load(PROVIDERS.read_text())
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def test_compose_parses_and_has_the_three_services() -> None:
    services = compose()["services"]
    assert set(services) == {"mosquitto", "influxdb", "grafana"}
    for name, service in services.items():
        assert isinstance(service["image"], str), name
        assert ":" in service["image"], f"{name}: pin the image version"
    influx = services["influxdb"]["environment"]
    assert influx["DOCKER_INFLUXDB_INIT_MODE"] == "setup"
    for key in ("ORG", "BUCKET", "ADMIN_TOKEN", "USERNAME", "PASSWORD"):
        assert str(influx[f"DOCKER_INFLUXDB_INIT_{key}"]).startswith("${"), key
    # The broker runs the configuration `wattmesh broker init` wrote, mounted at its own path.
    mosquitto = services["mosquitto"]
    (volume,) = mosquitto["volumes"]
    host, container = _split(volume)
    assert host == container
    assert mosquitto["command"][-1] == f"{host}/mosquitto.conf"


def _split(volume: str) -> tuple[str, str]:
    """Split ``A:B`` where A and B may contain ``${VAR:-default}`` (which has a colon)."""
    depth = 0
    for i, ch in enumerate(volume):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == ":" and depth == 0:
            return volume[:i], volume[i + 1 :]
    raise AssertionError(volume)


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def test_compose_mounts_the_grafana_provisioning_that_exists() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        host, container, *_ = volume.split(":")
        mounts[container] = host
    provisioning = mounts["/etc/grafana/provisioning"]
    assert (COMPOSE.parent / provisioning).resolve() == (GRAFANA / "provisioning").resolve()
    assert (COMPOSE.parent / provisioning / "datasources" / "wattmesh.yaml").is_file()
    assert (COMPOSE.parent / provisioning / "dashboards" / "wattmesh.yaml").is_file()
    # The provider's path is where compose mounts the dashboards, and they are all there.
    path = yaml.safe_load(PROVIDERS.read_text())["providers"][0]["options"]["path"]
    dashboards = COMPOSE.parent / mounts[path]
    assert dashboards.resolve() == DASHBOARDS.resolve()
    for name in DASHBOARD_FILES:
        assert (dashboards / name).is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(path + "/")
    assert (dashboards / home.removeprefix(path + "/")).is_file()
    # Every variable the data source file reads is set for the Grafana container.
    wanted = {
        m
        for value in _strings(yaml.safe_load(DATASOURCES.read_text()))
        for m in re.findall(r"\$\{([A-Z0-9_]+)\}", value)
    }
    assert len(wanted) == 4
    assert wanted <= set(grafana["environment"])
    assert grafana["environment"]["WATTMESH_INFLUX_URL"] == "http://influxdb:8086"


def test_compose_shows_a_valid_historian_section_for_the_coordinator() -> None:
    """The commented ``[historian]`` example in compose.yaml is accepted by the historian."""
    lines = COMPOSE.read_text().splitlines()
    start = lines.index("#   [historian]")
    block = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        block.append(line.removeprefix("#   "))
    section = tomllib.loads("\n".join(block))["historian"]
    settings = HistorianSettings.from_mapping(
        section, "compose.yaml", environ={"WATTMESH_INFLUX_TOKEN": "t"}
    )
    influx = compose()["services"]["influxdb"]
    assert settings.url == "http://127.0.0.1:8086"
    assert "127.0.0.1:8086:8086" in influx["ports"]
    assert influx["environment"]["DOCKER_INFLUXDB_INIT_ORG"].endswith(f":-{settings.org}}}")
    assert influx["environment"]["DOCKER_INFLUXDB_INIT_BUCKET"].endswith(f":-{settings.bucket}}}")
