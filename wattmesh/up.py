"""``wattmesh up`` and ``wattmesh init``: a whole local stack from one config folder.

A config folder holds ``scenario.toml`` (the simulated devices), ``coordinator.toml`` and one
site file per site in ``sites/``. Site files name simulated devices by their scenario name
(``sim = "factory-meter"``) or give a real device's ``url``. ``LocalStack`` starts Mosquitto
with generated credentials (or the embedded broker), the scenario's devices, every site's edge
agent and the coordinator in one process, on one scaled clock; ``wattmesh demo`` uses the same
composition. Every piece of state goes in one directory:

- ``broker/``: Mosquitto's configuration, ``credentials.toml`` (mode 600) and persistence;
- ``ledger.sqlite``, ``spool/<site>.sqlite``, ``pty/`` (RTU links);
- ``clock.json`` (for ``--clock-file`` options) and ``ports.json`` (where everything listens,
  while it runs);
- ``resume.json``: the simulated time the last run stopped at; the next run continues there,
  so the ledger's intervals never repeat.

Ports are free ones unless ``fixed_ports``: two stacks on one machine do not collide. The
same holds for the HTTP ports a folder may switch on (the coordinator's ``[api]`` and
``[metrics]``, a site's ``[metrics]`` and ``[proxy]``): a section that leaves ``port`` out or
gives ``port = 0`` gets a free one, and a port the file names is kept (the user asked for
it; ``fixed_ports`` keeps the defaults too). ``ports.json`` says where each one listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from broker.client import BusSettings
from broker.clock import ScaledClock
from broker.embedded import EmbeddedBroker
from broker.mosquitto import MosquittoProcess, write_broker_config
from broker.settings import BrokerConnection
from coordinator.config import CoordinatorConfig, load_coordinator_config
from coordinator.service import Coordinator
from edge.agent import EdgeAgent
from edge.config import EdgeConfig, load_edge_config
from simulators.scenario import RunningDevice, ScenarioConfig, ScenarioRunner, load_scenario
from wattmesh.weather import SimulatedWeatherService

log = logging.getLogger("wattmesh.up")

_S = TypeVar("_S", bound=BaseModel)

SCENARIO_FILE = "scenario.toml"
COORDINATOR_FILE = "coordinator.toml"
SITES_DIR = "sites"
PORTS_FILE = "ports.json"
CLOCK_FILE = "clock.json"
#: The simulated time a stack stopped at: the next ``up`` on the same state continues there.
RESUME_FILE = "resume.json"


class UpError(ValueError):
    """A config folder or a stack that cannot start; the message names the file or part."""


@dataclass(frozen=True)
class StackConfig:
    """What a local stack runs: the scenario, the coordinator and the sites' agents."""

    scenario: ScenarioConfig
    coordinator: CoordinatorConfig
    sites: tuple[EdgeConfig, ...]


def load_stack_config(directory: Path) -> StackConfig:
    """Read a config folder (``scenario.toml``, ``coordinator.toml``, ``sites/*.toml``).

    ``UpError`` naming the file and field of any mistake.
    """
    if not directory.is_dir():
        raise UpError(f"{directory}: not a directory (make one with `wattmesh init {directory}`)")
    site_files = sorted((directory / SITES_DIR).glob("*.toml"))
    if not site_files:
        raise UpError(f"{directory / SITES_DIR}: no site files (*.toml)")
    try:
        scenario = load_scenario(directory / SCENARIO_FILE)
        coordinator = load_coordinator_config(directory / COORDINATOR_FILE)
        sites = tuple(load_edge_config(p, allow_sim=True) for p in site_files)
    except ValueError as err:  # ScenarioError, CoordinatorConfigError, EdgeConfigError
        raise UpError(str(err)) from err
    ids = [s.site.id for s in sites]
    if len(set(ids)) != len(ids):
        raise UpError(f"{directory / SITES_DIR}: two site files have the same site id")
    known = {d.name for s in scenario.sites for d in s.devices}
    for path, site in zip(site_files, sites, strict=True):
        for i, d in enumerate(site.devices):
            if d.sim is not None and d.sim not in known:
                raise UpError(
                    f"{path}: devices[{i}].sim: scenario {scenario.name!r} has no device "
                    f"{d.sim!r} (it has {', '.join(sorted(known))})"
                )
    return StackConfig(scenario, coordinator, sites)


def init_folder(directory: Path, *, overwrite: bool = False) -> list[Path]:
    """Write the community example as a config folder for ``wattmesh up``; the files written.

    ``UpError`` if a file exists and not ``overwrite``.
    """
    example = resources.files("wattmesh") / "examples" / "community"
    files: dict[Path, str] = {
        directory / SCENARIO_FILE: (
            resources.files("simulators") / "scenarios" / "community.toml"
        ).read_text(encoding="utf-8"),
        directory / COORDINATOR_FILE: (example / COORDINATOR_FILE).read_text(encoding="utf-8"),
    }
    for entry in (example / SITES_DIR).iterdir():
        if entry.name.endswith(".toml"):
            files[directory / SITES_DIR / entry.name] = entry.read_text(encoding="utf-8")
    scenario = directory / SCENARIO_FILE
    files[scenario] = (
        "# Written by `wattmesh init`. `wattmesh up` serves these devices on free ports and\n"
        "# keeps the RTU links in its state directory: the ports and pty_dir below are for\n"
        "# `wattmesh sim run` alone.\n" + files[scenario]
    )
    existing = [p for p in files if p.exists()]
    if existing and not overwrite:
        raise UpError(f"{existing[0]} exists (--force overwrites)")
    for path, text in sorted(files.items()):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return sorted(files)


def rtu_over_tcp(config: ScenarioConfig) -> tuple[ScenarioConfig, list[str]]:
    """The scenario with pseudo-terminal RTU devices moved to TCP (when socat is missing),
    and their names."""
    moved: list[str] = []
    new_sites = []
    for site in config.sites:
        devices = []
        for d in site.devices:
            if d.transport == "rtu" and not d.serial:
                moved.append(d.name)
                d = d.model_copy(update={"transport": "tcp"})  # noqa: PLW2901
            devices.append(d)
        new_sites.append(site.model_copy(update={"devices": devices}))
    return config.model_copy(update={"sites": new_sites}), moved


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalBroker:
    """Mosquitto with per-site credentials and ACL in ``directory``, or the embedded broker
    (MQTT 3.1.1, no access control). ``directory=None``: a temporary one, removed at the end.

    ``settings(user, client_id)`` gives each participant its client settings.
    """

    def __init__(
        self,
        sites: Sequence[str],
        *,
        embedded: bool = False,
        directory: Path | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.sites = list(sites)
        self.embedded = embedded
        self.directory = directory
        self.host = host
        self.port = port or free_port(host)
        self.credentials_file: Path | None = None
        self.pid: int | None = None
        self._stack = contextlib.AsyncExitStack()
        self._credentials: dict[str, str] = {}

    async def __aenter__(self) -> LocalBroker:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        if self.embedded:
            await self._stack.enter_async_context(EmbeddedBroker(self.port, self.host))
            return
        directory = self.directory
        if directory is None:
            # The files go where Mosquitto's own user can reach them (as root it drops to it).
            directory = Path(tempfile.mkdtemp(prefix="wattmesh-broker-"))
            self._stack.callback(shutil.rmtree, directory, ignore_errors=True)
            directory.chmod(0o755)
        directory.mkdir(parents=True, exist_ok=True)
        files = write_broker_config(
            directory, self.sites, port=self.port, host=self.host, overwrite=True
        )
        self._credentials = files.credentials
        self.credentials_file = files.credentials_file
        process = await self._stack.enter_async_context(MosquittoProcess(files.conf, files.port))
        self.pid = process.pid

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def settings(self, user: str, client_id: str, max_inflight: int = 200) -> BusSettings:
        """How ``user`` connects."""
        if self.embedded:
            return BusSettings(
                host=self.host,
                port=self.port,
                client_id=client_id,
                protocol=4,
                max_inflight=max_inflight,
            )
        return BusSettings(
            host=self.host,
            port=self.port,
            username=user,
            password=self._credentials[user],
            client_id=client_id,
            max_inflight=max_inflight,
        )


def _free_unless_named(section: _S | None, fixed_ports: bool) -> _S | None:
    """``section`` with ``port = 0`` (a free one) unless the file named a port of its own.

    A section's port left out of the file (pydantic's ``model_fields_set``) or given as 0 is
    free; a named port is kept, and ``fixed_ports`` keeps the default as well.
    """
    if section is None or fixed_ports or "port" in section.model_fields_set:
        return section
    return section.model_copy(update={"port": 0})


def resolve_devices(site: EdgeConfig, running: Mapping[str, RunningDevice]) -> EdgeConfig:
    """``site`` with every ``sim`` device's url set to where the scenario serves it."""
    devices = []
    for d in site.devices:
        if d.sim is not None:
            if d.sim not in running:
                raise UpError(f"site {site.site.id!r}: no running simulated device {d.sim!r}")
            d = d.model_copy(update={"url": running[d.sim].url})  # noqa: PLW2901
        devices.append(d)
    return site.model_copy(update={"devices": devices})


@dataclass
class LocalStack:
    """Broker, simulators, edge agents and coordinator as one async context manager.

    Everything runs on ``clock``; the state goes in ``state``; ``announce`` gets one line per
    component as it starts. Entering writes ``clock.json`` and ``ports.json`` to ``state``.
    """

    config: StackConfig
    state: Path
    clock: ScaledClock
    embedded: bool = False
    fixed_ports: bool = False
    broker_in_state: bool = True
    coordinator_max_inflight: int = 1000
    announce: Callable[[str], None] = lambda _line: None
    broker: LocalBroker | None = None
    runner: ScenarioRunner | None = None
    coordinator: Coordinator | None = None
    weather: SimulatedWeatherService | None = None
    agents: list[EdgeAgent] = field(default_factory=list)
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def ports_file(self) -> Path:
        """Where the stack says where everything listens."""
        return self.state / PORTS_FILE

    async def __aenter__(self) -> LocalStack:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        watchdog = asyncio.create_task(_cancel_stuck_connections(), name="up-stop-watchdog")
        try:
            await self._stack.aclose()
        finally:
            watchdog.cancel()
            self.ports_file.unlink(missing_ok=True)

    async def _start(self) -> None:
        cfg = self.config
        self.state.mkdir(parents=True, exist_ok=True)
        sites = [s.site.id for s in cfg.sites]
        broker_port = cfg.coordinator.broker.port if self.fixed_ports else None
        self.broker = LocalBroker(
            sites,
            embedded=self.embedded,
            directory=self.state / "broker" if self.broker_in_state else None,
            port=broker_port,
        )
        await self._stack.enter_async_context(self.broker)
        kind = "embedded (MQTT 3.1.1, no access control)" if self.embedded else "mosquitto"
        credentials = self.broker.credentials_file
        self.announce(
            f"broker: {kind} on {self.broker.host}:{self.broker.port}"
            + (f", credentials {credentials}" if credentials else "")
        )
        scenario = cfg.scenario if self.fixed_ports else cfg.scenario.with_free_ports()
        if scenario.pty_dir is None:
            scenario = scenario.model_copy(update={"pty_dir": str(self.state / "pty")})
        self.runner = await self._stack.enter_async_context(ScenarioRunner(scenario, self.clock))
        for dev in self.runner.devices:
            self.announce(f"simulator: {dev.line()} (site {dev.site})")
        (self.state / CLOCK_FILE).write_text(json.dumps(self.clock.to_json()))
        coordinator_cfg = self._coordinator_config()
        self.coordinator = Coordinator(
            coordinator_cfg,
            self.clock,
            bus_settings=self.broker.settings(
                "coordinator", "wattmesh-coordinator", max_inflight=self.coordinator_max_inflight
            ),
        )
        await self._stack.enter_async_context(self.coordinator)
        endpoints = "".join(
            f", {name} {url}" for name, url in self._coordinator_endpoints().items() if url
        )
        self.announce(
            f"coordinator: feeder {coordinator_cfg.coordinator.feeder!r}, ledger "
            f"{coordinator_cfg.coordinator.ledger}{endpoints}"
        )
        if coordinator_cfg.weather.enabled:  # the simulated world's weather service
            self.weather = SimulatedWeatherService(
                scenario, self.clock, self.broker.settings("weather", "weather")
            )
            await self._stack.enter_async_context(self.weather)
            self.announce(
                "weather: simulated forecasts of each site's clouds every 6 h "
                "(off: [weather] enabled = false)"
            )
        running = {d.name: d for d in self.runner.devices}
        for site in cfg.sites:
            edge = self._edge_config(resolve_devices(site, running))
            agent = EdgeAgent(
                edge,
                self.clock,
                bus_settings=self.broker.settings(edge.site.id, f"wattmesh-edge-{edge.site.id}"),
            )
            await self._stack.enter_async_context(agent)
            self.agents.append(agent)
            endpoints = "".join(
                f", {name} {url}" for name, url in _agent_endpoints(agent).items() if url
            )
            self.announce(
                f"edge: site {edge.site.id!r} ({edge.site.role}), "
                f"{', '.join(d.name for d in edge.devices)}, spool {edge.spool.path}{endpoints}"
            )
        self._write_ports()

    def _coordinator_config(self) -> CoordinatorConfig:
        assert self.broker is not None
        c = self.config.coordinator
        return c.model_copy(
            update={
                "coordinator": c.coordinator.model_copy(
                    update={"ledger": self.state / "ledger.sqlite"}
                ),
                "broker": BrokerConnection(
                    host=self.broker.host, port=self.broker.port, username="coordinator"
                ),
                "clock": None,
                "api": _free_unless_named(c.api, self.fixed_ports),
                "metrics": _free_unless_named(c.metrics, self.fixed_ports),
            }
        )

    def _coordinator_endpoints(self) -> dict[str, str | None]:
        """Where the coordinator's HTTP API and metrics listen (None: not configured)."""
        assert self.coordinator is not None
        c = self.coordinator
        api = f"http://{c.api.host}:{c.api.port}/api/v1" if c.api is not None else None
        metrics = c.metrics
        return {
            "api": api,
            "metrics": f"http://{metrics.host}:{metrics.port}/metrics" if metrics else None,
        }

    def _edge_config(self, site: EdgeConfig) -> EdgeConfig:
        assert self.broker is not None
        return site.model_copy(
            update={
                "broker": BrokerConnection(host=self.broker.host, port=self.broker.port),
                "spool": site.spool.model_copy(
                    update={"path": self.state / "spool" / f"{site.site.id}.sqlite"}
                ),
                "clock": None,
                "metrics": _free_unless_named(site.metrics, self.fixed_ports),
                "proxy": _free_unless_named(site.proxy, self.fixed_ports),
            }
        )

    def ports(self) -> dict[str, Any]:
        """Where everything listens, as ``ports.json`` has it."""
        assert self.broker is not None
        assert self.runner is not None
        return {
            "pid": os.getpid(),
            "broker": {
                "host": self.broker.host,
                "port": self.broker.port,
                "kind": "embedded" if self.embedded else "mosquitto",
                "pid": self.broker.pid,
                "credentials": str(self.broker.credentials_file)
                if self.broker.credentials_file
                else None,
            },
            "devices": {
                d.name: {"site": d.site, "kind": d.kind, "url": d.url, "unit": d.unit}
                for d in self.runner.devices
            },
            "coordinator": self._coordinator_endpoints(),
            "sites": {a.site: _agent_endpoints(a) for a in self.agents},
            "clock_file": str(self.state / CLOCK_FILE),
            "ledger": str(self.state / "ledger.sqlite"),
        }

    def _write_ports(self) -> None:
        tmp = self.ports_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.ports(), indent=2))
        tmp.replace(self.ports_file)

    def summary(self) -> str:
        """One line: simulated time, the last clearing, the feeder, the sites reporting."""
        assert self.coordinator is not None
        c = self.coordinator
        when = datetime.fromtimestamp(self.clock.now(), UTC).strftime("%a %H:%M UTC")
        clearing = c.last_clearing
        market = (
            f"price {clearing.price_per_kwh:.3f}/kWh, {clearing.volume_kwh:.1f} kWh traded"
            if clearing
            else "no clearing yet"
        )
        reporting = sum(1 for s in c.sites.values() if s.latest is not None)
        return (
            f"{when}: {market}; feeder {c.flow_w / 1000:+.1f} kW ({c.mode}); "
            f"{reporting}/{len(self.config.sites)} sites reporting"
        )


def _agent_endpoints(agent: EdgeAgent) -> dict[str, str | None]:
    """Where an agent's metrics and Modbus proxy listen (None: not configured)."""
    metrics, proxy = agent.metrics, agent.proxy
    return {
        "metrics": f"http://{metrics.host}:{metrics.port}/metrics" if metrics else None,
        "proxy": f"tcp://{proxy.host}:{proxy.port}" if proxy else None,
    }


async def _cancel_stuck_connections(every_s: float = 1.0) -> None:
    """While a stack stops: cancel again any bus connection task that outlived its cancel.

    Python 3.11's ``asyncio.wait_for`` can swallow a cancellation that arrives just as the
    awaited call finishes (fixed in 3.12). A bus connection task cancelled at that moment (a
    handler publishing a dispatch acknowledgement with a timeout) runs on, and the agent or
    coordinator that owns it waits for it forever. Seen as a hang on Ctrl-C.
    """
    while True:
        await asyncio.sleep(every_s)
        for task in asyncio.all_tasks():
            if task.get_name() == "mqtt-connection" and task.cancelling() and not task.done():
                log.debug("cancelling a bus connection task again: %r", task)
                task.cancel()


def stop_on_signals() -> asyncio.Event:
    """An event set by Ctrl-C or SIGTERM (inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_up(
    config: StackConfig,
    state: Path,
    *,
    speed: float | None = None,
    embedded: bool = False,
    fixed_ports: bool = False,
    summary_every_s: float = 10.0,
    say: Callable[[str], None] = print,
) -> None:
    """Run a local stack until Ctrl-C or SIGTERM; ``say`` gets each component's start line
    and a summary line every ``summary_every_s`` wall seconds."""
    stop = stop_on_signals()
    if shutil.which("socat") is None:
        scenario, moved = rtu_over_tcp(config.scenario)
        if moved:
            config = StackConfig(scenario, config.coordinator, config.sites)
            say(
                f"socat is not installed: serving {', '.join(moved)} over TCP instead of RTU "
                "(apt-get install socat for the serial wire)"
            )
    resume = state / RESUME_FILE
    start_ts = config.scenario.start_ts
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        start_ts = max(start_ts, float(json.loads(resume.read_text())["sim_ts"]))
    if start_ts > config.scenario.start_ts:
        when = datetime.fromtimestamp(start_ts, UTC).strftime("%Y-%m-%d %H:%M UTC")
        say(f"resuming at {when}, where this state's last run stopped (--state NEW starts afresh)")
    clock = ScaledClock(start_ts, speed or config.scenario.speed)
    stack = LocalStack(
        config, state, clock, embedded=embedded, fixed_ports=fixed_ports, announce=say
    )
    async with stack:
        say(
            f"wattmesh up: {len(config.sites)} site(s) at {clock.speed:g}x; state in {state}, "
            f"ports in {stack.ports_file}; Ctrl-C stops."
        )
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), summary_every_s)
            if not stop.is_set():
                say(stack.summary())
        say("stopping")
        resume.write_text(json.dumps({"sim_ts": clock.now()}))
    say("stopped")
