"""Scenarios and the command line: `wattmesh sim run`, `wattmesh scan`, the demo, the README."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from broker.clock import ManualClock
from drivers.devices import Battery, Inverter, RegisterMapMeter, SunSpecMeter
from drivers.regmap import load_builtin_map
from drivers.transport import BusPool
from simulators.scenario import ScenarioError, ScenarioRunner, load_scenario, parse_scenario
from wattmesh.demo import builtin_scenario

ROOT = Path(__file__).resolve().parent.parent
COMMUNITY = ROOT / "config" / "scenarios" / "community.toml"
WATTMESH = [sys.executable, "-m", "wattmesh"]


def test_the_shipped_community_is_the_builtin_one() -> None:
    assert load_scenario(COMMUNITY).with_free_ports() == builtin_scenario()
    config = builtin_scenario()
    kinds = {s.id: sorted(d.kind for d in s.devices) for s in config.sites}
    assert kinds == {
        "solar-farm": ["pv_inverter", "sunspec_meter"],
        "factory": ["battery", "sdm630"],
        "house-1": ["battery", "pv_inverter", "sunspec_meter"],
        "house-2": ["sunspec_meter"],
        "school": ["battery", "pv_inverter", "sunspec_meter"],
    }


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["sites"][1]["devices"][0].update(capacity_wh=-1),
            r"sites\[1\]\.devices\[0\]\.capacity_wh: Input should be greater than 0",
        ),
        (
            lambda d: d["sites"][0]["devices"][0].update(rated_ac_wat=5),
            r"sites\[0\]\.devices\[0\]\.rated_ac_wat: Extra inputs are not permitted",
        ),
        (
            lambda d: d["sites"][0]["devices"][0].update(kind="windmill"),
            r"sites\[0\]\.devices\[0\]: Input tag 'windmill'",
        ),
        (lambda d: d.update(latitude_deg=123), r"latitude_deg: Input should be less"),
        (
            lambda d: d["sites"][2]["devices"][1].update(soc_pct=1),
            r"sites\[2\]\.devices\[1\]: Value error, need soc_min_pct <= soc_pct",
        ),
        (
            lambda d: d["sites"][3]["devices"][0].update(name="house1-meter"),
            r"device names must be unique; repeated: house1-meter",
        ),
    ],
)
def test_scenario_mistakes_name_the_file_and_the_field(mutate, message) -> None:  # type: ignore[no-untyped-def]
    import tomllib

    data = tomllib.loads(COMMUNITY.read_text())
    mutate(data)
    with pytest.raises(ScenarioError, match=f"^bad.toml: .*{message}"):
        parse_scenario(data, "bad.toml")


def test_a_scenario_that_is_not_toml_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("name = \n")
    with pytest.raises(ScenarioError, match=r"broken\.toml: not valid TOML.*line 1"):
        load_scenario(bad)


async def test_every_device_of_the_community_answers_through_the_drivers() -> None:
    config = builtin_scenario()
    clock = ManualClock(config.start_ts + 12 * 3600)  # noon
    async with ScenarioRunner(config, clock) as runner:
        pool = BusPool()
        found: dict[str, object] = {}
        for dev in runner.devices:
            transport = pool.get(dev.url)
            if dev.kind == "pv_inverter":
                found[dev.name] = await (await Inverter.connect(transport, dev.unit)).read()
            elif dev.kind == "battery":
                found[dev.name] = await (await Battery.connect(transport, dev.unit)).read()
            elif dev.kind == "sunspec_meter":
                found[dev.name] = await (await SunSpecMeter.connect(transport, dev.unit)).read()
            else:
                meter = RegisterMapMeter(transport, dev.unit, load_builtin_map("sdm630"))
                found[dev.name] = await meter.read()
        pool.close()
        factory = runner.sites["factory"]
    assert runner.device("factory-meter").url.startswith("rtu://")
    assert runner.device("farm-pv").url.startswith("tcp://127.0.0.1:")
    assert len(found) == 11
    assert found["farm-pv"].ac_power_w > 100_000  # type: ignore[attr-defined]
    # The factory's SDM630 sees the factory's load (Monday noon, both shifts) minus its battery.
    assert found["factory-meter"].power_w == pytest.approx(  # type: ignore[attr-defined]
        factory.load_w - factory.battery_w, rel=1e-5
    )


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}


def test_help_lists_every_subcommand() -> None:
    out = subprocess.run(
        [*WATTMESH, "--help"], capture_output=True, text=True, check=True, env=_env()
    ).stdout
    for command in ("sim", "scan", "demo"):
        assert re.search(rf"│ {command}\s", out), out


def test_sim_run_prints_a_line_per_device_then_scan_reads_one() -> None:
    proc = subprocess.Popen(
        # Free ports and RTU links in a temporary folder: another stack may hold the file's.
        [*WATTMESH, "sim", "run", str(COMMUNITY), "--quiet", "--free-ports"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(11)]
        pattern = re.compile(
            r"^(\S+) (pv_inverter|battery|sunspec_meter|sdm630) "
            r"(tcp://127\.0\.0\.1:\d+|rtu://\S+\?baud=9600) unit=(\d+)$"
        )
        parsed = {m.group(1): m for m in map(pattern.match, lines) if m}
        assert len(parsed) == 11, lines
        assert parsed["factory-meter"].group(3).startswith("rtu://")
        farm = parsed["farm-pv"].group(3)
        scan = subprocess.run(
            [*WATTMESH, "scan", farm, "--unit", "1", "--json"],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=30,
        )
        assert scan.returncode == 0, scan.stderr
        result = json.loads(scan.stdout)
        assert [m["id"] for m in result["models"]] == [1, 103, 120, 123]
        assert result["values"]["120 nameplate"]["WRtg"] == {"value": 300000.0, "units": "W"}
        rtu = parsed["factory-meter"].group(3)
        table = subprocess.run(
            [*WATTMESH, "scan", rtu, "--unit", "1", "--map", "sdm630"],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=30,
        )
        assert table.returncode == 0, table.stderr
        assert "power_total_w" in table.stdout and "Eastron" in table.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    assert proc.returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scan", "udp://x"], "scheme must be tcp:// or rtu://"),
        (["scan", "tcp://127.0.0.1:1", "--timeout", "0.2"], "cannot connect"),
        (["scan", "tcp://127.0.0.1:1", "--map", "nosuchmap.toml"], "nosuchmap.toml"),
        (["sim", "run", "/nonexistent/scenario.toml"], "cannot read"),
    ],
)
def test_cli_errors_are_one_clear_line(args: list[str], message: str) -> None:
    result = subprocess.run(
        [*WATTMESH, *args], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_the_demo_runs_a_community_to_a_report_that_matches_its_ledger(
    tmp_path: Path, broker: str
) -> None:
    from coordinator.ledger import Ledger, to_currency

    result = subprocess.run(
        [
            *WATTMESH,
            "demo",
            "--hours",
            "3",
            "--speed",
            "1440",
            "--out",
            str(tmp_path),
            "--broker",
            broker,
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "community" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["sites"]) == {"solar-farm", "factory", "house-1", "house-2", "school"}
    assert report["balanced"] is True
    assert report["settled_intervals"] >= 3 * 4 - 2  # 15-minute intervals in three hours
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.check_balanced()
        for site, figures in report["sites"].items():
            settled = ledger.site_report(site)
            assert figures["cost"] == pytest.approx(float(to_currency(settled.net_cost_micro)))
            traded = (settled.bought_wh + settled.sold_wh) / 1000.0
            assert figures["traded_kwh"] == pytest.approx(traded)
        # The feeder's peak over an interval is the largest metered net the ledger settled.
        nets = []
        for i in ledger.settled_intervals():
            settlement = ledger.settlement(i)
            assert settlement is not None
            nets.append(settlement.community_net_wh)
    assert report["feeder"]["peak_interval_import_w"]["ours"] == pytest.approx(max(nets) * 4.0)
    assert report["feeder"]["peak_interval_import_w"]["local"] > 0
    assert "feeder, largest 15-minute mean import" in result.stdout
    total = sum(f["cost"] for f in report["sites"].values())
    assert report["community"]["cost"] == pytest.approx(total)
    # The ledger's baseline (the site's metered energy billed by the utility alone): at night
    # every site imports, so every baseline cost is positive but the solar farm's is small.
    assert all(f["baseline_cost"] > 0 for f in report["sites"].values())
    with (tmp_path / "day.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["site"] for r in rows} == set(report["sites"])
    # Each sample's feeder column is the sum of its rows' grid columns (the same readings).
    samples: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        samples.setdefault(r["ts"], []).append(r)
    for sample in samples.values():
        grid_w = sum(float(r["grid_w"] or 0.0) for r in sample)
        assert all(float(r["feeder_w"]) == pytest.approx(grid_w, abs=0.1) for r in sample)
    assert (tmp_path / "day.png").read_bytes().startswith(b"\x89PNG")


def test_the_readme_example_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code is not None
    result = subprocess.run(
        [sys.executable, "-c", code.group(1)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "59.5 %"
