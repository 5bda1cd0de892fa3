"""`wattmesh up` on a folder with feeders.toml: many feeders on one Mosquitto (wattmesh/up.py).

One Mosquitto laid out as `wattmesh broker init --feeders` lays it out, one coordinator per
feeder on its own listener, each site's agent on its feeder's listener and the simulated weather
service publishing into every feeder. The stack test runs the community example of `wattmesh init
--feeders` (north: solar-farm, factory, house-1; south: school, house-2) over real Mosquitto and
Modbus at 600x until each coordinator has cleared an interval with all of its sites' bids.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.clock import ScaledClock
from coordinator.ledger import Ledger
from wattmesh.cli import app
from wattmesh.up import LocalStack, UpError, init_folder, load_stack_config

ROOT = Path(__file__).resolve().parent.parent
NORTH = ("solar-farm", "factory", "house-1")
SOUTH = ("school", "house-2")


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory Mosquitto's own user can enter when the tests run as root."""
    path = Path(tempfile.mkdtemp(prefix="wattmesh-up-feeders-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def area(tmp_path: Path) -> Path:
    """The two-feeder example folder of `wattmesh init --feeders`."""
    init_folder(tmp_path / "area", feeders=True)
    return tmp_path / "area"


def _feeders_toml(north: str, south: str) -> str:
    return (
        "[operator]\nport = 1883\n\n"
        f'[[feeders]]\nid = "north"\nport = 1884\nsites = [{north}]\n\n'
        f'[[feeders]]\nid = "south"\nport = 1885\nsites = [{south}]\n'
    )


def test_init_feeders_writes_two_feeders_each_with_its_own_coordinator(area: Path) -> None:
    config = load_stack_config(area)
    assert config.feeders_file is not None
    assert [(f.spec.id, f.spec.sites) for f in config.feeders] == [
        ("north", NORTH),
        ("south", SOUTH),
    ]
    north, south = (f.coordinator for f in config.feeders)
    assert (north.coordinator.feeder, south.coordinator.feeder) == ("north", "south")
    # coordinators/south.toml is merged over coordinator.toml: its own grid limits, the rest
    # (tariff, market) shared; north is coordinator.toml as it is.
    assert (south.grid.import_limit_w, south.grid.export_limit_w) == (60_000, 60_000)
    assert north.grid.import_limit_w == config.coordinator.grid.import_limit_w == 150_000
    assert south.tariff == north.tariff == config.coordinator.tariff
    assert south.grid.act_at_pct == config.coordinator.grid.act_at_pct
    # Each keeps only its own sites' declarations.
    assert sorted(north.sites) == sorted(NORTH)
    assert sorted(south.sites) == sorted(SOUTH)
    assert config.feeder_of("school") == "south"
    assert config.feeder_of("factory") == "north"


def test_the_init_feeders_example_groups_the_sites_as_config_feeders_toml_does(area: Path) -> None:
    mine = tomllib.loads((area / "feeders.toml").read_text())
    theirs = tomllib.loads((ROOT / "config" / "feeders.toml").read_text())
    assert {f["id"]: f["sites"] for f in mine["feeders"]} == {
        f["id"]: f["sites"] for f in theirs["feeders"]
    }


def test_a_relative_tokens_file_is_beside_the_coordinator_file_that_names_it(area: Path) -> None:
    coordinator = area / "coordinator.toml"
    coordinator.write_text(coordinator.read_text() + '\n[api]\ntokens_file = "tokens.toml"\n')
    north, south = (f.coordinator for f in load_stack_config(area).feeders)
    assert north.api is not None and south.api is not None
    assert north.api.tokens_file == south.api.tokens_file == area / "tokens.toml"
    own = area / "coordinators" / "south.toml"
    own.write_text(own.read_text() + '\n[api]\ntokens_file = "south-tokens.toml"\n')
    north, south = (f.coordinator for f in load_stack_config(area).feeders)
    assert north.api is not None and south.api is not None
    assert north.api.tokens_file == area / "tokens.toml"
    assert south.api.tokens_file == area / "coordinators" / "south-tokens.toml"
    assert south.grid.import_limit_w == 60_000  # the rest of south's file still applies


def test_a_folder_without_feeders_toml_is_one_feeder_as_before(tmp_path: Path) -> None:
    init_folder(tmp_path)
    config = load_stack_config(tmp_path)
    assert config.feeders_file is None
    assert config.feeders == ()
    assert config.feeder_of("school") is None
    assert not (tmp_path / "feeders.toml").exists()
    assert not (tmp_path / "coordinators").exists()


@pytest.mark.parametrize(
    ("north", "south", "error"),
    [
        (
            '"solar-farm", "factory", "house-1", "house-9"',
            '"school", "house-2"',
            r"feeders\.toml: feeder 'north' names site 'house-9', which has no site file in "
            r"\S+/sites \(the sites: factory, house-1, house-2, school, solar-farm\)$",
        ),
        (
            '"solar-farm", "factory", "house-1"',
            '"school", "house-2", "house-1"',
            r"feeders\.toml: site 'house-1' is in feeders 'north' and 'south': a site belongs "
            r"to one feeder$",
        ),
        (
            '"solar-farm", "factory", "house-1"',
            '"house-2"',
            r"feeders\.toml: site 'school' \(\S+/sites/school\.toml\) is in no feeder: add it "
            r"to one feeder's sites$",
        ),
    ],
    ids=["site-missing", "site-in-two-feeders", "site-in-no-feeder"],
)
def test_a_feeders_file_that_does_not_partition_the_sites_is_one_line_error(
    area: Path, north: str, south: str, error: str
) -> None:
    (area / "feeders.toml").write_text(_feeders_toml(north, south))
    with pytest.raises(UpError, match=error) as caught:
        load_stack_config(area)
    assert "\n" not in str(caught.value)


def test_a_feeder_coordinator_file_must_belong_to_its_feeder(area: Path) -> None:
    own = area / "coordinators" / "south.toml"
    own.write_text("[sites.factory]\nconnection_w = 300000\n")
    with pytest.raises(UpError, match=r"south\.toml: sites\.factory: not a site of feeder "):
        load_stack_config(area)
    own.write_text('[coordinator]\nfeeder = "feeder-2"\n')
    with pytest.raises(UpError, match=r"coordinator\.feeder: 'feeder-2' is not 'south'"):
        load_stack_config(area)
    own.write_text("[grid]\nimport_limit_w = -5\n")
    with pytest.raises(UpError, match=r"south\.toml \(over coordinator\.toml\): grid\."):
        load_stack_config(area)
    own.unlink()
    (area / "coordinators" / "east.toml").write_text("")
    with pytest.raises(UpError, match=r"east\.toml: \S+feeders\.toml has no feeder 'east'"):
        load_stack_config(area)
    (area / "feeders.toml").unlink()
    with pytest.raises(UpError, match=r"coordinators: a coordinator per feeder needs "):
        load_stack_config(area)


def test_the_cli_writes_the_feeders_example_and_refuses_a_bad_one_in_one_line(
    tmp_path: Path,
) -> None:
    runner = CliRunner()
    folder = tmp_path / "area"
    init = runner.invoke(app, ["init", str(folder), "--feeders"])
    assert init.exit_code == 0, init.output
    assert "feeders.toml" in init.output
    assert "coordinators/south.toml" in init.output
    embedded = runner.invoke(app, ["up", str(folder), "--embedded-broker"])
    assert embedded.exit_code == 1
    assert "embedded broker has no listener per feeder" in embedded.output
    assert "resuming" not in embedded.output and "Traceback" not in embedded.output
    (folder / "feeders.toml").write_text(
        _feeders_toml('"solar-farm", "factory", "house-1"', '"school"')
    )
    up = runner.invoke(app, ["up", str(folder)])
    assert up.exit_code == 2
    assert "site 'house-2'" in up.output and "is in no feeder" in up.output
    assert "Traceback" not in up.output
    assert not (folder / "state").exists()  # nothing started


async def test_a_stack_that_cannot_run_its_feeders_is_refused_before_anything_starts(
    area: Path,
) -> None:
    clock = ScaledClock(load_stack_config(area).scenario.start_ts, 600.0)
    with pytest.raises(UpError, match=r"embedded broker has no listener per feeder"):
        async with LocalStack(load_stack_config(area), area / "state", clock, embedded=True):
            pass
    # A port named in the shared coordinator.toml would be every feeder's coordinator's.
    coordinator = area / "coordinator.toml"
    coordinator.write_text(coordinator.read_text() + "\n[metrics]\nport = 19108\n")
    with pytest.raises(UpError, match=r"port 19108 is both feeder 'north'.s \[metrics\] and "):
        async with LocalStack(load_stack_config(area), area / "state", clock):
            pass
    assert not (area / "state" / "broker").exists()


async def _until(condition: object, what: str, timeout_s: float = 45.0) -> None:
    """Wait until ``condition()`` holds (checked every 0.1 s)."""
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        await asyncio.sleep(0.1)


async def test_each_feeders_coordinator_clears_only_its_own_sites_and_reads_the_weather(
    reachable_dir: Path,
) -> None:
    folder = reachable_dir / "area"
    init_folder(folder, feeders=True)
    config = load_stack_config(folder)
    state = reachable_dir / "state"
    # 10:00 UTC on the scenario's Monday: PV and load, so that sites trade; the 06:00 weather
    # run is the latest and goes out at once.
    clock = ScaledClock(config.scenario.start_ts + 10 * 3600.0, 600.0)
    lines: list[str] = []
    own = {"north": set(NORTH), "south": set(SOUTH)}

    bidders: dict[str, set[str]] = {"north": set(), "south": set()}

    def cleared_everyone(feeder: str) -> bool:
        coordinator = stack.coordinators[feeder]
        for book in list(coordinator.bids.values()):
            bidders[feeder] |= set(book)
        # ``cleared`` holds an interval before its clearing is published; the summary reads
        # ``last_clearing``, set once it is.
        return coordinator.last_clearing is not None and any(
            set(c.awards_wh) == own[feeder] for c in coordinator.cleared.values()
        )

    stack = LocalStack(config, state, clock, announce=lines.append)
    async with stack:
        assert stack.coordinator is None
        assert sorted(stack.coordinators) == ["north", "south"]
        await _until(lambda: all(cleared_everyone(f) for f in own), "clearing of every site's bid")
        summary = stack.summary()
        ports = json.loads(stack.ports_file.read_text())
        status = await asyncio.to_thread(
            CliRunner().invoke,
            app,
            ["status", "--broker-dir", str(state / "broker"), "--json", "--wait", "10"],
        )
        known = {f: set(c.sites) for f, c in stack.coordinators.items()}
        weather = {f: c.stats.weather for f, c in stack.coordinators.items()}
    for feeder, sites in own.items():
        # Every site the feeder's coordinator heard from, every bid it held and every award it
        # made is its own sites': the other feeder's never reached it.
        assert known[feeder] == sites
        assert bidders[feeder] <= sites
        with Ledger(state / f"ledger-{feeder}.sqlite") as ledger:
            recorded = [ledger.clearing(k) for k in range(*_span(ledger))]
            awarded = [set(c.awards_wh) for c in recorded if c is not None]
            assert sites in awarded
            assert all(a <= sites for a in awarded)
            assert ledger.check_balanced()
        # The simulated weather service's forecast reached both coordinators.
        assert weather[feeder] >= 1
    assert not (state / "ledger.sqlite").exists()
    # Start lines, summary and ports.json name each feeder.
    assert re.match(
        r"broker: mosquitto on 127\.0\.0\.1:\d+ \(operator listener\), feeder 'north' on "
        r"127\.0\.0\.1:\d+ \(feeder/north/\), feeder 'south' on 127\.0\.0\.1:\d+ \(feeder/south/\)",
        lines[0],
    )
    assert any(
        line.startswith("coordinator: feeder 'south' on 127.0.0.1:")
        and "as coordinator-south, sites school, house-2, ledger " in line
        for line in lines
    )
    assert any(
        line.startswith("weather: ") and "into feeders north, south" in line for line in lines
    )
    assert any(
        line.startswith("edge: site 'school' (prosumer) on feeder 'south'") for line in lines
    )
    assert re.search(
        r" north: price [\d.]+/kWh, .* 3/3 sites; south: .* 2/2 sites; 5/5 sites", summary
    )
    assert {f: p["sites"] for f, p in ports["feeders"].items()} == {
        "north": list(NORTH),
        "south": list(SOUTH),
    }
    assert ports["feeders"]["south"]["mount_point"] == "feeder/south/"
    assert ports["feeders"]["south"]["ledger"] == str(state / "ledger-south.sqlite")
    assert ports["sites"]["house-2"]["feeder"] == "south"
    assert ports["broker"]["port"] not in {p["port"] for p in ports["feeders"].values()}
    # `wattmesh status --broker-dir STATE/broker` reads every feeder through the operator
    # listener, as on a broker written by `broker init --feeders`.
    assert status.exit_code == 0, status.output
    view = json.loads(status.output)
    assert {f: (r["sites_online"], r["sites_known"]) for f, r in view["feeders"].items()} == {
        "north": (3, 3),
        "south": (2, 2),
    }


def _span(ledger: Ledger) -> tuple[int, int]:
    """The range of intervals the ledger has a clearing or a settlement of."""
    intervals = [c.interval for c in ledger.unsettled_clearings()] + list(
        ledger.settled_intervals()
    )
    assert intervals, "the ledger recorded no clearing"
    return min(intervals), max(intervals) + 1
