"""``wattmesh up`` and ``wattmesh init``: a whole local stack from one config folder.

A config folder holds ``scenario.toml`` (the simulated devices), ``coordinator.toml`` and one
site file per site in ``sites/``. Site files name simulated devices by their scenario name
(``sim = "factory-meter"``) or give a real device's ``url``. ``LocalStack`` starts Mosquitto
with generated credentials (or the embedded broker), the scenario's devices, every site's edge
agent and the coordinator in one process, on one scaled clock; ``wattmesh demo`` uses the same
composition.

A folder with ``feeders.toml`` (the feeders file of ``wattmesh broker init --feeders``: each
feeder's id, port, coordinator user and sites) runs many feeders on one Mosquitto laid out as
that command lays it out (``broker.feeders.write_feeders_broker_config``): one listener per
feeder with ``mount_point feeder/<id>/``, one coordinator per feeder on its listener as its own
user, each site's agent on its feeder's listener, and the simulated weather service on the
operator listener publishing into every feeder (``wattmesh.weather.weather_target``). Each
feeder's coordinator file is ``coordinator.toml`` with ``coordinators/<id>.toml`` merged over it
table by table when that file exists; its ``[coordinator] feeder`` is the feeder's id and its
``[sites.*]`` are its own sites'. Every site file's site is in exactly one feeder, and every
feeder's sites have site files (:func:`load_stack_config` says which is not, before anything
starts). Every piece of state goes in one directory:

- ``broker/``: Mosquitto's configuration, ``credentials.toml`` (mode 600) and persistence;
- ``ledger.sqlite`` (many feeders: ``ledger-<id>.sqlite`` each), ``spool/<site>.sqlite``,
  ``pty/`` (RTU links);
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
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from broker.client import BusSettings
from broker.clock import ScaledClock
from broker.embedded import EmbeddedBroker
from broker.errors import BrokerConfigError
from broker.feeders import (
    FeedersBrokerFiles,
    FeedersFile,
    FeederSpec,
    load_feeders_file,
    write_feeders_broker_config,
)
from broker.mosquitto import MosquittoProcess, write_broker_config
from broker.settings import BrokerConnection, read_toml
from coordinator.config import (
    CoordinatorConfig,
    load_coordinator_config,
    parse_coordinator_config,
)
from coordinator.history_store import write_histories
from coordinator.service import Coordinator
from edge.agent import EdgeAgent
from edge.config import EdgeConfig, load_edge_config
from simulators.scenario import RunningDevice, ScenarioConfig, ScenarioRunner, load_scenario
from wattmesh.weather import SimulatedWeatherService, weather_target

log = logging.getLogger("wattmesh.up")

_S = TypeVar("_S", bound=BaseModel)

SCENARIO_FILE = "scenario.toml"
COORDINATOR_FILE = "coordinator.toml"
SITES_DIR = "sites"
#: Many feeders on one broker: the feeders file (``broker init --feeders``'s format) ...
FEEDERS_FILE = "feeders.toml"
#: ... and each feeder's own coordinator settings, ``coordinators/<id>.toml`` (optional).
COORDINATORS_DIR = "coordinators"
PORTS_FILE = "ports.json"
CLOCK_FILE = "clock.json"
#: The simulated time a stack stopped at: the next ``up`` on the same state continues there.
RESUME_FILE = "resume.json"


class UpError(ValueError):
    """A config folder or a stack that cannot start; the message names the file or part."""


EMBEDDED_FEEDERS = (
    f"the embedded broker has no listener per feeder: a folder with {FEEDERS_FILE} runs on "
    "Mosquitto (leave out --embedded-broker)"
)


@dataclass(frozen=True)
class FeederConfig:
    """One feeder of a many-feeders folder: its entry in ``feeders.toml`` (id, port,
    coordinator user, sites) and its coordinator's settings."""

    spec: FeederSpec
    coordinator: CoordinatorConfig


@dataclass(frozen=True)
class StackConfig:
    """What a local stack runs: the scenario, the coordinator and the sites' agents; with a
    feeders file, one coordinator per feeder on one broker laid out by ``feeders``."""

    scenario: ScenarioConfig
    #: The coordinator (many feeders: ``coordinator.toml``, the default of every feeder's).
    coordinator: CoordinatorConfig
    sites: tuple[EdgeConfig, ...]
    #: ``feeders.toml`` (None: one feeder, the single-feeder broker) ...
    feeders_file: FeedersFile | None = None
    #: ... and each of its feeders' coordinator, in the file's order.
    feeders: tuple[FeederConfig, ...] = ()

    def feeder_of(self, site: str) -> str | None:
        """The feeder ``site`` belongs to; None in a single-feeder folder."""
        return next((f.spec.id for f in self.feeders if site in f.spec.sites), None)


def load_stack_config(directory: Path) -> StackConfig:
    """Read a config folder (``scenario.toml``, ``coordinator.toml``, ``sites/*.toml``, and
    for many feeders ``feeders.toml`` with optional ``coordinators/<id>.toml``).

    ``UpError`` naming the file and field of any mistake, one line each.
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
    config = StackConfig(scenario, coordinator, sites)
    if (directory / FEEDERS_FILE).exists():
        return _with_feeders(directory, config, dict(zip(ids, site_files, strict=True)))
    if (directory / COORDINATORS_DIR).is_dir():
        raise UpError(
            f"{directory / COORDINATORS_DIR}: a coordinator per feeder needs "
            f"{directory / FEEDERS_FILE} (which feeder has which sites)"
        )
    return config


def _with_feeders(
    directory: Path, config: StackConfig, site_files: Mapping[str, Path]
) -> StackConfig:
    """``config`` with the folder's feeders file and each feeder's coordinator."""
    path = directory / FEEDERS_FILE
    try:
        spec = load_feeders_file(path)
    except BrokerConfigError as err:
        raise UpError(str(err)) from err
    ids = [f.id for f in spec.feeders]
    if len(set(ids)) != len(ids):
        raise UpError(f"{path}: feeder ids must be unique: {', '.join(sorted(ids))}")
    owner: dict[str, str] = {}
    for f in spec.feeders:
        if f.ingest_workers:
            raise UpError(
                f"{path}: feeder {f.id!r}: ingest_workers is for `wattmesh broker init "
                "--feeders`; `wattmesh up` ingests in each coordinator's own process"
            )
        for site in f.sites:
            if site not in site_files:
                raise UpError(
                    f"{path}: feeder {f.id!r} names site {site!r}, which has no site file in "
                    f"{directory / SITES_DIR} (the sites: {', '.join(sorted(site_files))})"
                )
            if site in owner:
                raise UpError(
                    f"{path}: site {site!r} is in feeders {owner[site]!r} and {f.id!r}: "
                    "a site belongs to one feeder"
                )
            owner[site] = f.id
    for site, site_file in site_files.items():
        if site not in owner:
            raise UpError(
                f"{path}: site {site!r} ({site_file}) is in no feeder: add it to one feeder's sites"
            )
    own_files = sorted((directory / COORDINATORS_DIR).glob("*.toml"))
    for own in own_files:
        if own.stem not in ids:
            raise UpError(
                f"{own}: {path} has no feeder {own.stem!r} (its feeders: {', '.join(ids)})"
            )
    base = read_toml(directory / COORDINATOR_FILE, UpError)
    feeders = tuple(FeederConfig(f, _feeder_coordinator(directory, base, f)) for f in spec.feeders)
    return replace(config, feeders_file=spec, feeders=feeders)


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` on top, table by table: a table merges into the same table, any
    other value (also an array of tables) replaces the one in ``base``."""
    out = dict(base)
    for key, value in over.items():
        below = out.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            out[key] = _merged(below, value)
        else:
            out[key] = value
    return out


def _feeder_coordinator(
    directory: Path, base: Mapping[str, Any], feeder: FeederSpec
) -> CoordinatorConfig:
    """``feeder``'s coordinator: ``coordinator.toml`` (``base``) with ``coordinators/<id>.toml``
    merged over it if that exists; its ``feeder`` is the feeder's id, and of the ``[sites.*]``
    only the feeder's own are kept (its own file may declare only those)."""
    own = directory / COORDINATORS_DIR / f"{feeder.id}.toml"
    data: dict[str, Any] = dict(base)
    source = str(directory / COORDINATOR_FILE)
    anchor = directory  # a relative api.tokens_file is beside the file that names it
    if own.exists():
        over = read_toml(own, UpError)
        section = over.get("coordinator")
        named = section.get("feeder") if isinstance(section, dict) else None
        if named is not None and named != feeder.id:
            raise UpError(
                f"{own}: coordinator.feeder: {named!r} is not {feeder.id!r}, the feeder this "
                f"file is for (leave it out: {FEEDERS_FILE} names the feeder)"
            )
        declared = over.get("sites")
        for site in declared if isinstance(declared, dict) else ():
            if site not in feeder.sites:
                raise UpError(
                    f"{own}: sites.{site}: not a site of feeder {feeder.id!r} "
                    f"(its sites: {', '.join(feeder.sites)})"
                )
        data = _merged(base, over)
        source = f"{own} (over {COORDINATOR_FILE})"
        api_section = over.get("api")
        if isinstance(api_section, dict) and "tokens_file" in api_section:
            anchor = own.parent
    try:
        coordinator = parse_coordinator_config(data, source)
    except ValueError as err:
        raise UpError(str(err)) from err
    api = coordinator.api
    if api is not None and not api.tokens_file.is_absolute():
        api = api.model_copy(update={"tokens_file": anchor / api.tokens_file})
    return coordinator.model_copy(
        update={
            "coordinator": coordinator.coordinator.model_copy(update={"feeder": feeder.id}),
            "sites": {k: v for k, v in coordinator.sites.items() if k in feeder.sites},
            "api": api,
        }
    )


def init_folder(directory: Path, *, overwrite: bool = False, feeders: bool = False) -> list[Path]:
    """Write the community example as a config folder for ``wattmesh up``; the files written.

    ``feeders``: as two feeders on one broker, ``feeders.toml`` (north: solar-farm, factory,
    house-1; south: school, house-2) and ``coordinators/south.toml`` (south's own grid limits).
    ``UpError`` if a file exists and not ``overwrite``.
    """
    example = resources.files("wattmesh") / "examples" / "community"
    files: dict[Path, str] = {
        directory / SCENARIO_FILE: (
            resources.files("simulators") / "scenarios" / "community.toml"
        ).read_text(encoding="utf-8"),
        directory / COORDINATOR_FILE: (example / COORDINATOR_FILE).read_text(encoding="utf-8"),
    }
    folders = [SITES_DIR, COORDINATORS_DIR] if feeders else [SITES_DIR]
    for folder in folders:
        for entry in (example / folder).iterdir():
            if entry.name.endswith(".toml"):
                files[directory / folder / entry.name] = entry.read_text(encoding="utf-8")
    if feeders:
        files[directory / FEEDERS_FILE] = (example / FEEDERS_FILE).read_text(encoding="utf-8")
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


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` different TCP ports nothing listens on right now."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def with_free_ports(spec: FeedersFile, host: str = "127.0.0.1") -> FeedersFile:
    """``spec`` with a free port for the operator listener and for each feeder's."""
    operator, *feeders = free_ports(1 + len(spec.feeders), host)
    return spec.model_copy(
        update={
            "operator": spec.operator.model_copy(update={"port": operator}),
            "feeders": tuple(
                f.model_copy(update={"port": port})
                for f, port in zip(spec.feeders, feeders, strict=True)
            ),
        }
    )


class LocalBroker:
    """Mosquitto with per-site credentials and ACL in ``directory``, or the embedded broker
    (MQTT 3.1.1, no access control). ``directory=None``: a temporary one, removed at the end.

    With ``feeders`` (a feeders file, its ports as they are to be), Mosquitto is laid out as
    ``wattmesh broker init --feeders`` lays it out: ``port`` is then the operator listener's,
    and each user connects to its feeder's listener (:meth:`listener`). ``settings(user,
    client_id)`` gives each participant its client settings.
    """

    def __init__(
        self,
        sites: Sequence[str],
        *,
        embedded: bool = False,
        directory: Path | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        feeders: FeedersFile | None = None,
    ) -> None:
        if feeders is not None and embedded:
            raise UpError(EMBEDDED_FEEDERS)
        self.sites = list(sites)
        self.embedded = embedded
        self.directory = directory
        self.host = host
        self.feeders = feeders
        self.port = feeders.operator.port if feeders is not None else port or free_port(host)
        self.credentials_file: Path | None = None
        #: Where the broker's files are (``directory``, or the temporary one); None: embedded.
        self.broker_dir: Path | None = None
        #: The many-feeders broker's files (None: one feeder).
        self.files: FeedersBrokerFiles | None = None
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
        self.broker_dir = directory
        if self.feeders is not None:
            self.files = write_feeders_broker_config(
                directory, self.feeders, host=self.host, overwrite=True
            )
            conf, credentials, credentials_file = (
                self.files.conf,
                self.files.credentials,
                self.files.credentials_file,
            )
        else:
            files = write_broker_config(
                directory, self.sites, port=self.port, host=self.host, overwrite=True
            )
            conf, credentials, credentials_file = (
                files.conf,
                files.credentials,
                files.credentials_file,
            )
        self._credentials = credentials
        self.credentials_file = credentials_file
        process = await self._stack.enter_async_context(MosquittoProcess(conf, self.port))
        self.pid = process.pid

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def listener(self, user: str) -> tuple[int, str | None]:
        """The port and mount point ``user`` connects to: its feeder's listener on a
        many-feeders broker (the operator listener for users of no feeder), else the one."""
        feeder = self.files.feeder_of(user) if self.files is not None else None
        if feeder is None:
            return self.port, None
        return feeder.port, feeder.mount_point

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
        port, mount_point = self.listener(user)
        return BusSettings(
            host=self.host,
            port=port,
            username=user,
            password=self._credentials[user],
            client_id=client_id,
            max_inflight=max_inflight,
            mount_point=mount_point,
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


@dataclass(frozen=True)
class _Unit:
    """One coordinator a stack runs: its feeder, broker user and client id, its settings from
    the folder and its ledger file."""

    feeder: str
    user: str
    client_id: str
    config: CoordinatorConfig
    ledger: Path


@dataclass
class LocalStack:
    """Broker, simulators, edge agents and coordinator(s) as one async context manager.

    Everything runs on ``clock``; the state goes in ``state``; ``announce`` gets one line per
    component as it starts. Entering writes ``clock.json`` and ``ports.json`` to ``state``.
    A config with feeders runs one coordinator per feeder (``coordinators``, by feeder id;
    ``coordinator`` is then None) on a many-feeders Mosquitto.
    """

    config: StackConfig
    state: Path
    clock: ScaledClock
    embedded: bool = False
    fixed_ports: bool = False
    broker_in_state: bool = True
    coordinator_max_inflight: int = 1000
    #: Days (0-7) of the simulated sites' load and PV, and the simulated weather service's
    #: runs over them, written as a coordinator's history when it has no history file yet.
    history_days: float = 0.0
    announce: Callable[[str], None] = lambda _line: None
    broker: LocalBroker | None = None
    runner: ScenarioRunner | None = None
    #: The coordinator of a single-feeder stack.
    coordinator: Coordinator | None = None
    #: Every coordinator, by feeder id (one feeder: the one above).
    coordinators: dict[str, Coordinator] = field(default_factory=dict)
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

    def _units(self) -> list[_Unit]:
        """The coordinators to run: the folder's one, or one per feeder."""
        cfg = self.config
        if cfg.feeders_file is None:
            return [
                _Unit(
                    cfg.coordinator.coordinator.feeder,
                    "coordinator",
                    "wattmesh-coordinator",
                    cfg.coordinator,
                    self.state / "ledger.sqlite",
                )
            ]
        return [
            _Unit(
                f.spec.id,
                f.spec.coordinator_user,
                f.spec.coordinator_user,
                f.coordinator,
                self.state / f"ledger-{f.spec.id}.sqlite",
            )
            for f in cfg.feeders
        ]

    def _check_http_ports(self, units: Sequence[_Unit]) -> None:
        """``UpError`` if two coordinators would keep the same HTTP port (a port named in a
        file shared by feeders, or the defaults under ``fixed_ports``)."""
        seen: dict[int, str] = {}
        for unit in units:
            api = _free_unless_named(unit.config.api, self.fixed_ports)
            metrics = _free_unless_named(unit.config.metrics, self.fixed_ports)
            for name, port in (
                ("api", api.port if api else 0),
                ("metrics", metrics.port if metrics else 0),
            ):
                if not port:
                    continue
                what = f"feeder {unit.feeder!r}'s [{name}]"
                if port in seen:
                    raise UpError(
                        f"port {port} is both {seen[port]} and {what}: give each "
                        f"feeder its own in {COORDINATORS_DIR}/<id>.toml, or leave port out "
                        "for a free one"
                    )
                seen[port] = what

    async def _start(self) -> None:
        cfg = self.config
        self.state.mkdir(parents=True, exist_ok=True)
        units = self._units()
        self._check_http_ports(units)
        sites = [s.site.id for s in cfg.sites]
        feeders = cfg.feeders_file
        if feeders is not None and not self.fixed_ports:
            feeders = with_free_ports(feeders)
        broker_port = cfg.coordinator.broker.port if self.fixed_ports else None
        self.broker = LocalBroker(
            sites,
            embedded=self.embedded,
            directory=self.state / "broker" if self.broker_in_state else None,
            port=broker_port,
            feeders=feeders,
        )
        await self._stack.enter_async_context(self.broker)
        self.announce(self._broker_line())
        scenario = cfg.scenario if self.fixed_ports else cfg.scenario.with_free_ports()
        if scenario.pty_dir is None:
            scenario = scenario.model_copy(update={"pty_dir": str(self.state / "pty")})
        self.runner = await self._stack.enter_async_context(ScenarioRunner(scenario, self.clock))
        for dev in self.runner.devices:
            self.announce(f"simulator: {dev.line()} (site {dev.site})")
        (self.state / CLOCK_FILE).write_text(json.dumps(self.clock.to_json()))
        for unit in units:
            coordinator_cfg = self._coordinator_config(unit)
            self._seed_history(unit, coordinator_cfg)
            coordinator = Coordinator(
                coordinator_cfg,
                self.clock,
                bus_settings=self.broker.settings(
                    unit.user, unit.client_id, max_inflight=self.coordinator_max_inflight
                ),
            )
            await self._stack.enter_async_context(coordinator)
            self.coordinators[unit.feeder] = coordinator
            self.announce(self._coordinator_line(unit, coordinator))
        if cfg.feeders_file is None:
            self.coordinator = self.coordinators[units[0].feeder]
        await self._start_weather(scenario, units)
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
            feeder = cfg.feeder_of(edge.site.id)
            self.announce(
                f"edge: site {edge.site.id!r} ({edge.site.role})"
                + (f" on feeder {feeder!r}" if feeder is not None else "")
                + f", {', '.join(d.name for d in edge.devices)}, spool {edge.spool.path}"
                + endpoints
            )
        self._write_ports()

    async def _start_weather(self, scenario: ScenarioConfig, units: Sequence[_Unit]) -> None:
        """The simulated world's weather service, for the coordinators that read it: on a
        many-feeders broker one connection on the operator listener publishes into each."""
        assert self.broker is not None
        enabled = [u.feeder for u in units if u.config.weather.enabled]
        if not enabled:
            return
        if self.broker.files is None:
            settings = self.broker.settings("weather", "weather")
            self.weather = SimulatedWeatherService(scenario, self.clock, settings)
            into = ""
        else:
            assert self.broker.broker_dir is not None
            settings, targets = weather_target(self.broker.broker_dir, "weather", enabled)
            self.weather = SimulatedWeatherService(scenario, self.clock, settings, targets)
            into = f" into feeder{'s' if len(enabled) > 1 else ''} {', '.join(enabled)}"
        await self._stack.enter_async_context(self.weather)
        self.announce(
            f"weather: simulated forecasts of each site's clouds every 6 h{into} "
            "(off: [weather] enabled = false)"
        )

    def _broker_line(self) -> str:
        """The broker's start line: where it listens (each feeder's listener) and the
        credentials file."""
        assert self.broker is not None
        b = self.broker
        kind = "embedded (MQTT 3.1.1, no access control)" if self.embedded else "mosquitto"
        line = f"broker: {kind} on {b.host}:{b.port}"
        if b.files is not None:
            line += " (operator listener), " + ", ".join(
                f"feeder {f.id!r} on {b.host}:{f.port} ({f.mount_point})" for f in b.files.feeders
            )
        return line + (f", credentials {b.credentials_file}" if b.credentials_file else "")

    def _coordinator_line(self, unit: _Unit, coordinator: Coordinator) -> str:
        assert self.broker is not None
        endpoints = "".join(
            f", {name} {url}" for name, url in _coordinator_endpoints(coordinator).items() if url
        )
        where = ""
        if self.broker.files is not None:
            port, mount_point = self.broker.listener(unit.user)
            sites = self.broker.files.feeder(unit.feeder).sites
            where = (
                f" on {self.broker.host}:{port} ({mount_point}) as {unit.user}, "
                f"sites {', '.join(sites)}"
            )
        return f"coordinator: feeder {unit.feeder!r}{where}, ledger {unit.ledger}{endpoints}"

    def _seed_history(self, unit: _Unit, config: CoordinatorConfig) -> None:
        """With ``history_days``, a coordinator without a history file yet (a fresh state)
        gets one: its sites' simulated week before now (as ``wattmesh demo`` and the stepped
        engine start), so it forecasts and its sites plan as a running one's would."""
        path = config.coordinator.history_path()
        if self.history_days <= 0 or path is None or path.exists():
            return
        from wattmesh.backtest import scenario_history, scenario_weather  # noqa: PLC0415

        cfg, now = self.config, self.clock.now()
        mine = {s.site.id for s in cfg.sites if cfg.feeder_of(s.site.id) in (None, unit.feeder)}
        histories = scenario_history(cfg.scenario, now, self.history_days)
        runs = scenario_weather(cfg.scenario, now, self.history_days)
        write_histories(
            path,
            {name: h for name, h in histories.items() if name in mine},
            runs if config.weather.enabled else [],
        )
        self.announce(
            f"history: {self.history_days:g} day(s) of {len(mine)} simulated site(s) before "
            f"the start{f' and {len(runs)} weather run(s)' if config.weather.enabled else ''} "
            f"written to {path} (a fresh state; --history-days 0 starts from nothing)"
        )

    def _coordinator_config(self, unit: _Unit) -> CoordinatorConfig:
        assert self.broker is not None
        c = unit.config
        port, mount_point = self.broker.listener(unit.user)
        return c.model_copy(
            update={
                "coordinator": c.coordinator.model_copy(update={"ledger": unit.ledger}),
                "broker": BrokerConnection(
                    host=self.broker.host,
                    port=port,
                    username=unit.user,
                    mount_point=mount_point,
                ),
                "clock": None,
                "api": _free_unless_named(c.api, self.fixed_ports),
                "metrics": _free_unless_named(c.metrics, self.fixed_ports),
            }
        )

    def _edge_config(self, site: EdgeConfig) -> EdgeConfig:
        assert self.broker is not None
        port, mount_point = self.broker.listener(site.site.id)
        return site.model_copy(
            update={
                "broker": BrokerConnection(
                    host=self.broker.host, port=port, mount_point=mount_point
                ),
                "spool": site.spool.model_copy(
                    update={"path": self.state / "spool" / f"{site.site.id}.sqlite"}
                ),
                "clock": None,
                "metrics": _free_unless_named(site.metrics, self.fixed_ports),
                "proxy": _free_unless_named(site.proxy, self.fixed_ports),
            }
        )

    def ports(self) -> dict[str, Any]:
        """Where everything listens, as ``ports.json`` has it. Many feeders: ``broker`` is
        the operator listener, and ``feeders`` gives each feeder's listener, coordinator,
        ledger and sites."""
        assert self.broker is not None
        assert self.runner is not None
        out: dict[str, Any] = {
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
        }
        files = self.broker.files
        if files is None:
            assert self.coordinator is not None
            out["coordinator"] = _coordinator_endpoints(self.coordinator)
        else:
            out["broker"]["directory"] = str(files.directory)
            out["feeders"] = {
                f.id: {
                    "port": f.port,
                    "mount_point": f.mount_point,
                    "user": f.coordinator_user,
                    "sites": list(f.sites),
                    "coordinator": _coordinator_endpoints(self.coordinators[f.id]),
                    "ledger": str(self.state / f"ledger-{f.id}.sqlite"),
                }
                for f in files.feeders
            }
        out["sites"] = {
            a.site: _agent_endpoints(a)
            | ({"feeder": feeder} if (feeder := self.config.feeder_of(a.site)) else {})
            for a in self.agents
        }
        out["clock_file"] = str(self.state / CLOCK_FILE)
        if files is None:
            out["ledger"] = str(self.state / "ledger.sqlite")
        return out

    def _write_ports(self) -> None:
        tmp = self.ports_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.ports(), indent=2))
        tmp.replace(self.ports_file)

    def summary(self) -> str:
        """One line: simulated time, the last clearing, the feeder, the sites reporting (many
        feeders: each feeder's, then the sites reporting in all)."""
        when = datetime.fromtimestamp(self.clock.now(), UTC).strftime("%a %H:%M UTC")
        if self.config.feeders_file is None:
            assert self.coordinator is not None
            c = self.coordinator
            return (
                f"{when}: {_market(c)}; feeder {c.flow_w / 1000:+.1f} kW ({c.mode}); "
                f"{_reporting(c)}/{len(self.config.sites)} sites reporting"
            )
        parts = []
        for f in self.config.feeders:
            c = self.coordinators[f.spec.id]
            parts.append(
                f"{f.spec.id}: {_market(c)}, feeder {c.flow_w / 1000:+.1f} kW ({c.mode}), "
                f"{_reporting(c)}/{len(f.spec.sites)} sites"
            )
        reporting = sum(_reporting(c) for c in self.coordinators.values())
        return f"{when}: {'; '.join(parts)}; {reporting}/{len(self.config.sites)} sites reporting"


def _market(coordinator: Coordinator) -> str:
    """The last clearing, in words."""
    clearing = coordinator.last_clearing
    if clearing is None:
        return "no clearing yet"
    return f"price {clearing.price_per_kwh:.3f}/kWh, {clearing.volume_kwh:.1f} kWh traded"


def _reporting(coordinator: Coordinator) -> int:
    """How many sites a coordinator has a reading of."""
    return sum(1 for s in coordinator.sites.values() if s.latest is not None)


def _coordinator_endpoints(coordinator: Coordinator) -> dict[str, str | None]:
    """Where a coordinator's HTTP API and metrics listen (None: not configured)."""
    c = coordinator
    api = f"http://{c.api.host}:{c.api.port}/api/v1" if c.api is not None else None
    metrics = c.metrics
    return {
        "api": api,
        "metrics": f"http://{metrics.host}:{metrics.port}/metrics" if metrics else None,
    }


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
    history_days: float = 0.0,
    say: Callable[[str], None] = print,
) -> None:
    """Run a local stack until Ctrl-C or SIGTERM; ``say`` gets each component's start line
    and a summary line every ``summary_every_s`` wall seconds. A coordinator without a
    history file yet starts with ``history_days`` of its sites' simulated history
    (:attr:`LocalStack.history_days`)."""
    if embedded and config.feeders_file is not None:
        raise UpError(EMBEDDED_FEEDERS)
    stop = stop_on_signals()
    if shutil.which("socat") is None:
        scenario, moved = rtu_over_tcp(config.scenario)
        if moved:
            config = replace(config, scenario=scenario)
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
        config,
        state,
        clock,
        embedded=embedded,
        fixed_ports=fixed_ports,
        history_days=history_days,
        announce=say,
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
