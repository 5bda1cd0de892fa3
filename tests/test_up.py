"""`wattmesh init` and `wattmesh up`: a whole local stack from one folder; the demo's view."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from broker.clock import ScaledClock
from coordinator.ledger import Ledger
from edge.config import EdgeConfigError, load_edge_config
from wattmesh.demo import SiteLine, live_view
from wattmesh.up import LocalStack, UpError, free_port, init_folder, load_stack_config

ROOT = Path(__file__).resolve().parent.parent
WATTMESH = [sys.executable, "-m", "wattmesh"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120", **extra}


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory Mosquitto's own user can enter when the tests run as root."""
    path = Path(tempfile.mkdtemp(prefix="wattmesh-up-test-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def test_init_writes_a_folder_whose_sites_name_every_device_by_its_scenario_name(
    tmp_path: Path,
) -> None:
    written = init_folder(tmp_path / "mesh")
    assert tmp_path / "mesh" / "scenario.toml" in written
    config = load_stack_config(tmp_path / "mesh")
    scenario_devices = {d.name: s.id for s in config.scenario.sites for d in s.devices}
    site_devices = {d.sim: s.site.id for s in config.sites for d in s.devices}
    assert site_devices == scenario_devices
    assert all(not d.url for s in config.sites for d in s.devices)


def test_init_refuses_to_overwrite_a_folder_unless_forced(tmp_path: Path) -> None:
    init_folder(tmp_path)
    (tmp_path / "coordinator.toml").write_text("# mine\n")
    with pytest.raises(UpError, match=r"exists \(--force overwrites\)"):
        init_folder(tmp_path)
    assert (tmp_path / "coordinator.toml").read_text() == "# mine\n"
    init_folder(tmp_path, overwrite=True)
    assert "[coordinator]" in (tmp_path / "coordinator.toml").read_text()


def _without(data: dict[str, object], *keys: str) -> dict[str, object]:
    return {k: v for k, v in data.items() if k not in keys}


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "config" / "sites").glob("*.toml")))
def test_the_init_example_site_files_say_what_config_sites_say_but_for_addresses(
    tmp_path: Path, name: str
) -> None:
    init_folder(tmp_path)
    mine = tomllib.loads((tmp_path / "sites" / name).read_text())
    theirs = tomllib.loads((ROOT / "config" / "sites" / name).read_text())
    assert _without(mine, "devices", "spool") == _without(
        theirs, "devices", "spool", "broker", "clock"
    )
    assert _without(mine["spool"], "path") == _without(theirs["spool"], "path")
    assert [_without(d, "sim") | {"name": d["sim"]} for d in mine["devices"]] == [
        _without(d, "url") for d in theirs["devices"]
    ]


def test_the_init_example_coordinator_says_what_config_coordinator_says(tmp_path: Path) -> None:
    init_folder(tmp_path)
    mine = tomllib.loads((tmp_path / "coordinator.toml").read_text())
    theirs = tomllib.loads((ROOT / "config" / "coordinator.toml").read_text())
    assert _without(mine, "coordinator") == _without(theirs, "coordinator", "broker", "clock")
    assert _without(mine["coordinator"], "ledger") == _without(theirs["coordinator"], "ledger")


def test_a_site_file_naming_a_device_the_scenario_lacks_is_refused_with_file_and_field(
    tmp_path: Path,
) -> None:
    init_folder(tmp_path)
    site = tmp_path / "sites" / "house-2.toml"
    site.write_text(site.read_text().replace('sim = "house2-meter"', 'sim = "house9-meter"'))
    with pytest.raises(UpError, match=r"house-2\.toml: devices\[0\]\.sim: .*'house9-meter'"):
        load_stack_config(tmp_path)


def test_a_sim_device_outside_up_is_refused_and_a_url_still_works(tmp_path: Path) -> None:
    init_folder(tmp_path)
    site = tmp_path / "sites" / "house-2.toml"
    with pytest.raises(EdgeConfigError, match=r"only `wattmesh up` resolves; give url"):
        load_edge_config(site)
    site.write_text(
        site.read_text().replace('sim = "house2-meter"', 'url = "tcp://127.0.0.1:15027"')
    )
    assert load_edge_config(site).devices[0].url == "tcp://127.0.0.1:15027"


def _wait_for(path: Path, process: subprocess.Popen[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def _stopped(process: subprocess.Popen[str]) -> tuple[str, str]:
    """The output of a process that stops by itself; killed (and failed) if it does not."""
    try:
        return process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"did not stop on SIGINT:\n{out}\n{err}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}").exists()
        and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    )


def test_two_stacks_run_at_once_with_their_state_in_one_folder_each_and_stop_on_ctrl_c(
    reachable_dir: Path,
) -> None:
    folder = reachable_dir / "mesh"
    init = subprocess.run(
        [*WATTMESH, "init", str(folder)], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert init.returncode == 0, init.stderr
    states = [reachable_dir / "a", reachable_dir / "b"]
    processes = [
        subprocess.Popen(
            [
                *WATTMESH,
                "up",
                str(folder),
                "--state",
                str(state),
                "--speed",
                "300",
                "--summary-every",
                "1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            start_new_session=True,  # its own process group, as a terminal's job
        )
        for state in states
    ]
    try:
        for state, process in zip(states, processes, strict=True):
            _wait_for(state / "ports.json", process)
        ports = [json.loads((s / "ports.json").read_text()) for s in states]
        listening = [
            {p["broker"]["port"]} | {d["url"] for d in p["devices"].values()} for p in ports
        ]
        assert not listening[0] & listening[1]  # no port and no RTU link shared
        assert len(ports[0]["devices"]) == 11
        time.sleep(6)  # 30 simulated minutes: two market intervals
    finally:
        # Ctrl-C as a terminal sends it (to the process group), and a plain SIGINT.
        os.killpg(processes[0].pid, signal.SIGINT)
        processes[1].send_signal(signal.SIGINT)
        outputs = [_stopped(p) for p in processes]
    for process, (out, err), state, port in zip(processes, outputs, states, ports, strict=True):
        assert process.returncode == 0, err
        assert "Traceback" not in err
        assert "lost the broker" not in err  # the broker stopped after its clients
        lines = out.splitlines()
        assert lines[0].startswith("broker: mosquitto on 127.0.0.1:")
        assert sum(line.startswith("simulator: ") for line in lines) == 11
        assert sum(line.startswith("edge: site ") for line in lines) == 5
        assert any(line.startswith("coordinator: feeder 'feeder-1'") for line in lines)
        assert any("5/5 sites reporting" in line for line in lines)
        assert lines[-1] == "stopped"
        assert not _alive(port["broker"]["pid"])  # no orphan Mosquitto
        assert not (state / "ports.json").exists()
        assert (state / "broker" / "credentials.toml").exists()
        assert {p.name for p in (state / "spool").iterdir()} >= {
            f"{s}.sqlite" for s in ("solar-farm", "factory", "house-1", "house-2", "school")
        }
        assert json.loads((state / "clock.json").read_text())["speed"] == 300
        # The next run on this state continues where this one stopped.
        scenario_start = json.loads((state / "clock.json").read_text())["start_ts"]
        assert json.loads((state / "resume.json").read_text())["sim_ts"] > scenario_start + 600
        with Ledger(state / "ledger.sqlite") as ledger:
            assert ledger.settled_intervals() or ledger.unsettled_clearings()
            assert ledger.check_balanced()
    assert sorted(p.name for p in folder.iterdir()) == [
        "coordinator.toml",
        "scenario.toml",
        "sites",
    ]


def test_up_says_what_is_wrong_with_a_folder_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [*WATTMESH, "up", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert "not a directory (make one with `wattmesh init" in result.stderr
    assert "Traceback" not in result.stderr


def _render(width: int) -> list[str]:
    sites = [
        SiteLine("solar-farm", -298_400.0, 301_200.0, None, None),
        SiteLine("factory", 149_900.0, None, -100_000.0, 100.0),
        SiteLine("house-1", 12_300.0, 6_000.0, 5_000.0, 40.0),
        SiteLine("house-2", 3_500.0, None, None, None),
        SiteLine("school", -40_000.0, 40_000.0, -30_000.0, 55.0),
    ]
    view = live_view(
        1_782_086_400.0,
        0.5,
        "market: price 0.123/kWh, traded 1234.5 kWh",
        "feeder: +149.9 kW of 150 kW (constrained)",
        sites,
    )
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(view)
    return console.export_text().splitlines()


def test_the_live_view_fits_80_columns_with_every_column_whole() -> None:
    lines = _render(80)
    assert all(len(line) <= 80 for line in lines)
    assert "…" not in "\n".join(lines)
    header = next(line for line in lines if line.lstrip().startswith("site"))
    assert header.split() == ["site", "grid", "kW", "PV", "kW", "battery", "kW", "SOC", "%"]
    progress = next(i for i, line in enumerate(lines) if "━" in line)
    assert lines[progress].startswith("Mon 00:00 UTC")  # time and bar share a line ...
    assert "site" not in lines[progress]  # ... and the table's header is not on it
    assert lines[progress].rstrip().endswith("50 %")
    factory = next(line for line in lines if line.startswith("factory"))
    assert factory.split() == ["factory", "+149.9", "—", "-100.0", "100"]
    solar = next(line for line in lines if line.startswith("solar-farm"))
    assert solar.split() == ["solar-farm", "-298.4", "301.2", "—", "—"]


def test_the_demo_leaves_no_temporary_directory_behind(reachable_dir: Path) -> None:
    tmp = reachable_dir / "tmp"
    tmp.mkdir()
    tmp.chmod(0o777)
    result = subprocess.run(
        [*WATTMESH, "demo", "--hours", "0.5", "--speed", "1440", "--sites", "2"],
        capture_output=True,
        text=True,
        env=_env(TMPDIR=str(tmp)),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "community" in result.stdout  # the report
    assert "--out DIR keeps its files" in result.stdout
    assert list(tmp.iterdir()) == []


def test_a_demo_too_short_to_settle_an_interval_says_so_and_fails(reachable_dir: Path) -> None:
    tmp = reachable_dir / "tmp"
    tmp.mkdir()
    tmp.chmod(0o777)
    result = subprocess.run(
        [*WATTMESH, "demo", "--hours", "0.1", "--speed", "1440", "--sites", "2"],
        capture_output=True,
        text=True,
        env=_env(TMPDIR=str(tmp), COLUMNS="200"),
        timeout=120,
    )
    assert result.returncode == 1
    assert "no interval was settled in 0.1 simulated hours" in result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert list(tmp.iterdir()) == []


def _get(url: str, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


def test_two_stacks_from_init_folders_with_api_and_metrics_on_get_free_http_ports(
    reachable_dir: Path,
) -> None:
    """[api] with ``port = 0`` and [metrics] without a port get free ones; a named port stays."""
    named = free_port()
    folders, tokens = [], []
    for name in ("one", "two"):
        folder = reachable_dir / name
        init_folder(folder)
        coordinator = folder / "coordinator.toml"
        coordinator.write_text(
            coordinator.read_text() + '\n[api]\nport = 0\n\n[metrics]\nhost = "127.0.0.1"\n'
        )
        add = subprocess.run(
            [*WATTMESH, "api", "token", "add", str(folder / "api-tokens.toml"),
             "--name", "viewer", "--role", "viewer"],
            capture_output=True, text=True, env=_env(), timeout=60, check=True,
        )  # fmt: skip
        tokens.append(add.stdout.strip())
        site = folder / "sites" / "house-1.toml"
        port_line = f"port = {named}\n" if name == "one" else ""
        site.write_text(site.read_text() + f"\n[metrics]\n{port_line}")
        folders.append(folder)
    processes = [
        subprocess.Popen(
            [*WATTMESH, "up", str(folder), "--speed", "300", "--summary-every", "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            start_new_session=True,
        )
        for folder in folders
    ]
    try:
        for folder, process in zip(folders, processes, strict=True):
            _wait_for(folder / "state" / "ports.json", process)
        ports = [json.loads((f / "state" / "ports.json").read_text()) for f in folders]
        urls = [
            [p["coordinator"]["api"], p["coordinator"]["metrics"], p["sites"]["house-1"]["metrics"]]
            for p in ports
        ]
        assert all(url is not None for both in urls for url in both)
        assert not set(urls[0]) & set(urls[1])  # no HTTP port shared
        assert ":8080/" not in str(urls) and ":9108/" not in str(urls)
        assert urls[0][2] == f"http://127.0.0.1:{named}/metrics"  # the port the file named
        assert ports[0]["sites"]["house-2"] == {"metrics": None, "proxy": None}
        for (api, coordinator_metrics, house_metrics), token in zip(urls, tokens, strict=True):
            assert json.loads(_get(f"{api}/whoami", token))["role"] == "viewer"
            assert "wattmesh_" in _get(coordinator_metrics)
            assert 'site="house-1"' in _get(house_metrics)
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGINT)
        outputs = [_stopped(p) for p in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        coordinator_line = next(line for line in out.splitlines() if line.startswith("coord"))
        assert ", api http://127.0.0.1:" in coordinator_line
        assert ", metrics http://127.0.0.1:" in coordinator_line


async def test_a_fresh_stack_starts_its_coordinator_with_the_simulated_history_once(
    tmp_path: Path,
) -> None:
    """``history_days``: a coordinator without a history file starts with its sites' simulated
    past and the weather runs over it (as the demo's and the engine's do); a state that has
    one keeps it."""
    folder = tmp_path / "mesh"
    init_folder(folder)
    config = load_stack_config(folder)
    state = tmp_path / "state"
    history = state / "ledger.history.npz"
    lines: list[str] = []
    clock = ScaledClock(config.scenario.start_ts, 600.0)
    stack = LocalStack(config, state, clock, embedded=True, history_days=1.0, announce=lines.append)
    async with stack:
        c = stack.coordinator
        assert c is not None
        sites = sorted(s.site.id for s in config.sites)
        assert sorted(c.sites) == sites
        assert all(len(c.sites[name].history) >= 90 for name in sites)  # a day at 15 min
        assert c.stats.weather_restored >= 4  # the 6-hourly runs over that day
    assert [line for line in lines if line.startswith("history: 1 day(s) of 5")]
    assert history.exists()  # rewritten on the clean stop, with what it ran on
    lines.clear()
    again = LocalStack(config, state, clock, embedded=True, history_days=1.0, announce=lines.append)
    async with again:
        pass
    assert not [line for line in lines if line.startswith("history:")]  # kept, not re-seeded
