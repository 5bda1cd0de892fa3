"""The site gateway agent: poll devices, publish telemetry, bid, execute dispatch, stay safe.

One poll cycle every ``site.poll_interval_s`` (wall seconds): every due device is polled
(one :class:`DevicePoller` per device owns its interval and availability), the controller
chooses the battery setpoint by precedence (docs/architecture.md s. 5: safety > emergency > dispatch
> market commitment > local fallback), and one telemetry message carrying every device's
reading goes into the spool. The spool is the outbox: a replay task publishes it in order
and removes what the broker acknowledged, so a broker outage or an agent crash loses nothing.
If the spool itself fails (disk full, read-only, corrupt), the agent runs degraded
(:mod:`edge.outbox`): control goes on, telemetry is published directly or dropped and counted.
Times in messages come from the agent's clock (simulated time in simulations).

Inbound messages are trusted no further than they must be: every handler turns any failure of
a payload into a refusal counted by topic kind and reason (logged once), or for a dispatch an
``invalid`` acknowledgement; a dispatch is judged on the agent's own clock and held at most
the site's maximum duration from its receipt (:mod:`edge.trust`). The counters travel in the
retained status message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker import topics
from broker.client import BusClient, BusSettings, Presence
from broker.clock import Clock
from broker.errors import BusUnavailable
from broker.messages import (
    Award,
    Bid,
    BidStep,
    Clearing,
    DeviceReading,
    Dispatch,
    DispatchAck,
    Forecast,
    GridState,
    Reservation,
    Status,
    Telemetry,
)
from drivers.devices import (
    Battery,
    BatteryReading,
    Inverter,
    InverterReading,
    MapBattery,
    MeterReading,
    RegisterMapMeter,
    SunSpecMeter,
)
from drivers.errors import DriverError, SetpointRejected
from drivers.regmap import RegisterMap, builtin_map_names, load_builtin_map, load_register_map
from drivers.transport import BusPool
from drivers.writeguard import WritePolicy
from edge import homeassistant
from edge.bidding import CurveSteps
from edge.config import DeviceSection, EdgeConfig, proxy_units
from edge.latency import LatencyHistogram
from edge.outbox import Outbox
from edge.plan import (
    Horizon,
    IntervalPlan,
    PlanError,
    WarmStart,
    aligned,
    load_solver,
    plan_interval,
)
from edge.policy import (
    BatteryView,
    Command,
    Commitment,
    PlanStep,
    clamp_to_rating_w,
    decide_setpoint_w,
    expected_net_kwh,
    interval_bid,
    rated_totals_w,
    renew_step_w,
    share_among_batteries_w,
)
from edge.proxy import ModbusProxy, ProxyTarget
from edge.spool import Spool
from edge.trust import OrderWindow, order_window

if TYPE_CHECKING:
    from broker.metrics_http import MetricsServer

log = logging.getLogger(__name__)

#: Wall seconds a plan may take before the agent bids without it (at most half the time left
#: before the gate, so the fallback bid still goes out in time), and the least worth trying.
PLAN_TIMEOUT_S = 5.0
PLAN_MIN_TIME_S = 0.01

SOFTWARE_VERSION = "0.1.0"
AckOutcome = Literal["accepted", "clamped", "refused", "expired", "duplicate", "invalid"]
ReadingKind = Literal["pv_inverter", "battery", "sunspec_meter", "sdm630", "meter"]
Reading = InverterReading | BatteryReading | MeterReading
Facade = Inverter | Battery | MapBattery | SunSpecMeter | RegisterMapMeter
#: A battery the agent controls: SunSpec 124/802 or a register map's ``[battery]``.
BatteryFacade = Battery | MapBattery
#: Inbound payloads larger than this are refused unread, bytes (a week's forecast is ~60 kB).
MAX_INBOUND_BYTES = 256 * 1024
#: Awards for intervals further than this from the current one are refused (stale or forged).
AWARD_WINDOW_INTERVALS = 96
#: At most this many recent net-load samples are kept for bidding without a forecast.
HISTORY_MAX_SAMPLES = 20_000


class PayloadTooLarge(ValueError):
    """An inbound payload over :data:`MAX_INBOUND_BYTES`."""


class Unwanted(ValueError):
    """A well-formed inbound message the agent does not act on; ``reason`` says why."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def rejection_reason(err: BaseException) -> str:
    """A short name for why an inbound payload was refused (a status counter key)."""
    if isinstance(err, Unwanted):
        return err.reason
    if isinstance(err, PayloadTooLarge):
        return "too_large"
    if isinstance(err, ValidationError):
        return "invalid"
    if isinstance(err, RecursionError):
        return "too_deep"
    return "error"


def _first_line(err: BaseException) -> str:
    text = str(err).splitlines()
    return (text[0] if text else type(err).__name__)[:200]


class _CommandId(BaseModel):
    """Just the ``id`` of a dispatch that failed validation, to name it in the ack."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


def command_id_of(payload: bytes) -> str:
    """The ``id`` of a dispatch payload if one can be read safely, else ``""``; never raises."""
    if len(payload) > MAX_INBOUND_BYTES:
        return ""
    try:
        return _CommandId.model_validate_json(payload).id
    except Exception:  # anything at all: the ack then says "unknown"
        return ""


def battery_view(reading: BatteryReading) -> BatteryView:
    """A battery's reading as :mod:`edge.policy` sees it."""
    return BatteryView(
        rated_discharge_w=reading.rated_discharge_w,
        rated_charge_w=reading.rated_charge_w,
        soc_pct=reading.soc_pct,
        soc_min_pct=reading.soc_min_pct,
        soc_max_pct=reading.soc_max_pct,
        capacity_wh=reading.capacity_wh,
    )


def device_revert_s(battery: BatteryFacade, revert_s: int) -> int:
    """The revert timeout (s) to command ``battery`` with when the agent wants ``revert_s``.

    A SunSpec battery takes it as written. A map battery with a timeout point takes it
    rounded up to the point's resolution (a Huawei counts minutes: 30 s would round to 0,
    "no timeout") and at most the device's longest; one whose revert timeout is fixed ignores
    it; one that holds setpoints until told otherwise takes 0 (it refuses any other).
    """
    if isinstance(battery, Battery):
        return revert_s
    c = battery.control
    if c is None:
        return 0
    if c.timeout is not None:
        step_s = abs(battery.regmap.point(c.timeout).scale)
        whole = math.ceil(revert_s / step_s) * step_s
        return int(min(whole, c.revert_timeout_max_s or whole))
    return revert_s if c.revert_timeout_s else 0


@dataclass(frozen=True, slots=True)
class Order:
    """An accepted dispatch and when it ends on the agent's clock (s, see edge.trust)."""

    command: Dispatch
    until_ts: float


class DevicePoller:
    """One device: connects lazily, polls when due, tracks availability with backoff.

    Logs when the device fails and when it recovers, not on every failed poll.
    """

    def __init__(self, cfg: DeviceSection, pool: BusPool, default_interval_s: float) -> None:
        self.cfg = cfg
        self.pool = pool
        self.interval_s = cfg.poll_interval_s or default_interval_s
        self.facade: Facade | None = None
        self.reading: Reading | None = None
        self.available = False
        self.error: str | None = None
        self.failures = 0
        #: Failed polls over the agent's life (``failures`` counts the current run only).
        self.failed_polls = 0
        #: Wall seconds each poll took, failed ones included (read by edge.metrics).
        self.latency = LatencyHistogram()
        self._next_wall = 0.0
        self._backoff_s = 0.0
        self._policy_set = False
        #: What telemetry calls this device (a map device: "battery" or "meter").
        self.reading_kind: ReadingKind = self._reading_kind()

    async def _connect(self) -> Facade:
        transport = self.pool.get(self.cfg.url)
        kind, unit = self.cfg.kind, self.cfg.unit
        if kind == "pv_inverter":
            return await Inverter.connect(transport, unit)
        if kind == "battery":
            return await Battery.connect(transport, unit)
        if kind == "sunspec_meter":
            return await SunSpecMeter.connect(transport, unit)
        if kind == "map":
            regmap = self.cfg.load_map()
            unit = self.cfg.map_unit(regmap)
            if regmap.battery is None:
                return RegisterMapMeter(transport, unit, regmap)
            c = regmap.battery.control
            if c is not None and c.timeout is None and not c.revert_timeout_s:
                log.warning(
                    "battery %s (%s) holds setpoints until told otherwise: if this agent "
                    "stops, it keeps the last one",
                    self.cfg.name,
                    regmap.model,
                )
            return MapBattery(transport, unit, regmap, self._map_write_policy(regmap))
        name = self.cfg.register_map or "sdm630"
        regmap = load_builtin_map(name) if name in builtin_map_names() else load_register_map(name)
        return RegisterMapMeter(transport, unit, regmap)

    def _map_write_policy(self, regmap: RegisterMap) -> WritePolicy | None:
        """The map's write policy with the site file's deadband and minimum interval."""
        c = regmap.battery.control if regmap.battery is not None else None
        if c is None:
            return None
        return WritePolicy(
            deadband_w=c.deadband_w if self.cfg.deadband_w is None else self.cfg.deadband_w,
            min_interval_s=c.min_write_interval_s
            if self.cfg.min_write_interval_s is None
            else self.cfg.min_write_interval_s,
        )

    def _sunspec_write_policy(self, reading: BatteryReading) -> WritePolicy:
        """A SunSpec battery's write policy: the site file's, else 1 % of its rated power."""
        return WritePolicy(
            deadband_w=renew_step_w(reading.rated_discharge_w)
            if self.cfg.deadband_w is None
            else self.cfg.deadband_w,
            min_interval_s=self.cfg.min_write_interval_s or 0.0,
        )

    def is_available(self) -> bool:
        """Whether the last poll succeeded."""
        return self.available

    def _reading_kind(self) -> ReadingKind:
        """What this device's telemetry says it is (a map device: battery or meter)."""
        if self.cfg.kind != "map":
            return self.cfg.kind
        try:
            return "battery" if self.cfg.load_map().battery is not None else "meter"
        except DriverError:  # the map file went away since the site file was read
            return "meter"

    async def poll(self, wall_now: float) -> None:
        """Poll if due; a failure marks the device unavailable and backs off."""
        if wall_now < self._next_wall:
            return
        started = time.perf_counter()
        try:
            if self.facade is None:
                self.facade = await self._connect()
            self.reading = await self.facade.read()
            if not self._policy_set and isinstance(self.facade, Battery):
                assert isinstance(self.reading, BatteryReading)
                self.facade.write_policy = self._sunspec_write_policy(self.reading)
                self._policy_set = True
        except DriverError as err:
            self.latency.observe(time.perf_counter() - started)
            self.failures += 1
            self.failed_polls += 1
            if self.available or self.failures == 1:
                log.warning("device %s unavailable: %s", self.cfg.name, err)
            self.available, self.error = False, str(err)[:200]
            self._backoff_s = min(60.0, max(self.interval_s, self._backoff_s * 2 or 1.0))
            self._next_wall = wall_now + self._backoff_s
            return
        self.latency.observe(time.perf_counter() - started)
        if not self.available and self.failures:
            log.warning("device %s recovered after %d failed poll(s)", self.cfg.name, self.failures)
        self.available, self.error, self.failures, self._backoff_s = True, None, 0, 0.0
        self._next_wall = wall_now + self.interval_s

    def message(self) -> DeviceReading:
        """This device's part of a telemetry message (last values only while available)."""
        r = self.reading if self.available else None
        values: dict[str, float | None] = {}
        if isinstance(r, InverterReading):
            values = {
                "power_w": r.ac_power_w,
                "energy_wh": r.energy_wh,
                "rated_power_w": r.rated_power_w,
            }
        elif isinstance(r, BatteryReading):
            values = {
                "power_w": r.power_w,
                "soc_pct": r.soc_pct,
                "setpoint_w": r.setpoint_w,
                "rated_power_w": r.rated_discharge_w,
                "capacity_wh": r.capacity_wh,
            }
        elif isinstance(r, MeterReading):
            values = {
                "power_w": r.power_w,
                "import_energy_wh": r.import_energy_wh,
                "export_energy_wh": r.export_energy_wh,
            }
        clean = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
        battery = self.facade if isinstance(self.facade, Battery | MapBattery) else None
        return DeviceReading(
            device=self.cfg.name,
            kind=self.reading_kind,
            available=self.available,
            error=self.error,
            setpoint_writes=None if battery is None else battery.writes,
            setpoint_refreshes=None if battery is None else battery.held.refreshes,
            **clean,
        )


@dataclass
class SiteSnapshot:
    """Site totals from the last poll cycle (W, %); None when unknown."""

    grid_w: float | None = None
    pv_w: float = 0.0
    battery_w: float = 0.0
    soc_pct: float | None = None

    @property
    def net_load_w(self) -> float | None:
        """Load minus PV: what the site would import with its batteries idle."""
        return None if self.grid_w is None else self.grid_w + self.battery_w


@dataclass
class AgentStats:
    """Counters for monitoring and tests."""

    cycles: int = 0
    telemetry_spooled: int = 0
    telemetry_published: int = 0
    bids_published: int = 0
    invalid_messages: dict[str, int] = field(default_factory=dict)
    """Refused inbound messages by topic."""
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)
    """Refused inbound messages by topic kind, then reason."""
    acks: dict[str, int] = field(default_factory=dict)
    battery_writes: int = 0
    status_published: int = 0
    plans: int = 0
    """Intervals bid from a plan."""
    plan_fallbacks: int = 0
    """Intervals the plan failed or was late for (bid by the fixed-price rules instead)."""


class EdgeAgent:
    """The gateway agent for one site. ``async with EdgeAgent(...)`` runs it until exit."""

    def __init__(
        self,
        config: EdgeConfig,
        clock: Clock,
        *,
        password: str | None = None,
        bus_settings: BusSettings | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.site = config.site.id
        self.pool = BusPool(timeout_s=max(d.timeout_s for d in config.devices), retries=1)
        self.pollers = [
            DevicePoller(d, self.pool, config.site.poll_interval_s) for d in config.devices
        ]
        self.outbox = Outbox(
            config.spool.path,
            config.spool.max_messages,
            retry_max_s=config.spool.retry_max_s,
        )
        self.stats = AgentStats()
        self.snapshot = SiteSnapshot()
        self.controller = "fallback"
        self.awards: OrderedDict[int, Award] = OrderedDict()
        self.forecast: Forecast | None = None
        self.reservation: Reservation | None = None
        #: The plan's step for each interval bid from a plan (the last few).
        self.plans: OrderedDict[int, PlanStep] = OrderedDict()
        #: The latest plan made and the interval it was made for.
        self.last_plan: tuple[int, IntervalPlan] | None = None
        self._plan_failing: str | None = None
        self._plan_warm = WarmStart()  # the last plan's basis, for the next one to start from
        self._plan_warm_lock = threading.Lock()
        self.grid_mode = "normal"
        #: The latest market clearing received (read only with ``[homeassistant]``).
        self.clearing: Clearing | None = None
        self.dispatch: Order | None = None
        self.emergency: Order | None = None
        self._seen_commands: OrderedDict[str, None] = OrderedDict()
        self._bid_for: int | None = None
        #: (ts, net load W) of the last two intervals, at most one a poll.
        self._history: deque[tuple[float, float]] = deque(maxlen=HISTORY_MAX_SAMPLES)
        self._control_lock = asyncio.Lock()
        #: Batteries whose new setpoint waits for their minimum write interval (last control).
        self.deferred: list[str] = []
        self._outbox = asyncio.Event()
        self._logged_invalid: set[tuple[str, str]] = set()
        self._ack_unsent_logged = False
        self._status_sent: dict[str, object] | None = None
        self._status_sent_wall = -math.inf
        self._stop = asyncio.Event()
        b = config.broker
        self.bus = BusClient(
            bus_settings
            or b.bus_settings(
                username=self.site, client_id=f"wattmesh-edge-{self.site}", password=password
            ),
            presence=Presence(
                topics.site_topic(self.site, "status"),
                self._status(online=True),
                self._status(online=False),
            ),
            handler=self._on_message,
        )
        self._group: asyncio.TaskGroup | None = None
        self.proxy = self._proxy()
        #: The ``[metrics]`` port while the agent runs (edge/metrics.py).
        self.metrics: MetricsServer | None = None

    def _proxy(self) -> ModbusProxy | None:
        """The ``[proxy]`` over the agent's own transports (not started), if configured."""
        p = self.config.proxy
        if p is None:
            return None
        pollers = {poller.cfg.name: poller for poller in self.pollers}
        targets = [
            ProxyTarget(
                unit,
                self.pool.get(device.url),
                pollers[device.name].is_available,
            )
            for unit, device in proxy_units(self.config).items()
        ]
        return ModbusProxy(p.host, p.port, targets, allow_writes=p.allow_writes)

    @property
    def spool(self) -> Spool | None:
        """The spool while it is usable (None while the outbox runs degraded)."""
        return self.outbox.spool

    def counters(self) -> dict[str, object]:
        """The health counters the retained status carries (see ``broker.messages.Status``)."""
        return {
            "spool_state": self.outbox.state,
            "telemetry_dropped": self.outbox.dropped,
            "telemetry_direct": self.outbox.direct,
            "rejected": {k: dict(v) for k, v in self.stats.rejected.items()},
            "dispatch_outcomes": dict(self.stats.acks),
            "setpoint_writes": {
                p.cfg.name: p.facade.writes
                for p in self.pollers
                if isinstance(p.facade, Battery | MapBattery)
            },
        }

    def _status(self, online: bool, counters: dict[str, object] | None = None) -> bytes:
        kinds: list[str] = sorted({d.kind for d in self.config.devices})
        return (
            Status.model_validate(
                {
                    "ts": self.clock.now(),
                    "online": online,
                    "role": self.config.site.role,
                    "capabilities": kinds,
                    "software_version": SOFTWARE_VERSION,
                    **(counters if counters is not None else self.counters()),
                }
            )
            .model_dump_json()
            .encode()
        )

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> EdgeAgent:
        if self.config.metrics is not None:  # prometheus_client is loaded only then
            from edge.metrics import serve_metrics  # noqa: PLC0415

            self.metrics = serve_metrics(self, self.config.metrics)
        if self.proxy is not None:
            await self.proxy.start()
        try:
            await self.bus.__aenter__()
        except BaseException:
            if self.proxy is not None:
                await self.proxy.stop()
            await self._stop_metrics()
            raise
        for kind in topics.SITE_READS:
            await self.bus.subscribe(topics.site_topic(self.site, kind))
        await self.bus.subscribe(topics.forecast_topic(self.site))
        await self.bus.subscribe(f"{topics.PREFIX}/grid/+/state")
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._group.create_task(self._cycle_loop(), name="edge-cycle")
        self._group.create_task(self._replay_loop(), name="edge-replay")
        self._group.create_task(self._status_loop(), name="edge-status")
        if self.config.market.enabled:
            self._group.create_task(self._bid_loop(), name="edge-bids")
        if self.config.plan.enabled and any(
            d.kind in ("battery", "map") for d in self.config.devices
        ):
            # the solver loads in the background at start, so the first plan is not late for it
            # (loading it only with the first forecast made the first plans late in a demo at
            # 800x real time, where 0.2 s of import is minutes: tests/test_demo_agreement.py)
            self._group.create_task(asyncio.to_thread(load_solver), name="edge-plan-warm")
        ha = self.config.homeassistant
        if ha is not None and ha.enabled:
            await self.bus.subscribe(topics.MARKET_CLEARING)
            loop = homeassistant.publish_loop(self, ha, SOFTWARE_VERSION, self._stop)
            self._group.create_task(loop, name="edge-homeassistant")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._outbox.set()
        assert self._group is not None
        try:
            await self._group.__aexit__(et, ev, tb)
        finally:
            if self.proxy is not None:
                await self.proxy.stop()
            await self.bus.__aexit__(et, ev, tb)
            self.pool.close()
            self.outbox.close()
            await self._stop_metrics()

    async def _stop_metrics(self) -> None:
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
            self.metrics = None

    async def run_until(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (the CLI's Ctrl-C)."""
        await stop.wait()

    @property
    def speed(self) -> float:
        """Simulated seconds per wall second of the agent's clock."""
        return float(getattr(self.clock, "speed", 1.0))

    # -- the poll cycle --------------------------------------------------------------------
    async def _cycle_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.config.site.poll_interval_s
        next_wall = loop.time()
        while not self._stop.is_set():
            await self.cycle()
            next_wall += period
            delay = next_wall - loop.time()
            if delay < 0:  # fell behind: do not try to catch up in a burst
                next_wall, delay = loop.time(), 0.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def cycle(self) -> None:
        """One poll cycle: poll, control, spool telemetry, bid when due."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*[p.poll(loop.time()) for p in self.pollers])
        now = self.clock.now()
        self._update_snapshot(now)
        async with self._control_lock:
            await self._control(now)
        self._spool_telemetry(now)
        self.stats.cycles += 1

    def _update_snapshot(self, now: float) -> None:
        snap = SiteSnapshot()
        socs: list[tuple[float, float]] = []
        for p in self.pollers:
            r = p.reading if p.available else None
            if isinstance(r, MeterReading):
                snap.grid_w = r.power_w
            elif isinstance(r, InverterReading):
                snap.pv_w += r.ac_power_w or 0.0
            elif isinstance(r, BatteryReading):
                snap.battery_w += r.power_w or 0.0
                if r.soc_pct is not None:
                    socs.append((r.soc_pct, r.capacity_wh or 1.0))
        if socs:
            snap.soc_pct = sum(s * c for s, c in socs) / sum(c for _, c in socs)
        self.snapshot = snap
        if snap.net_load_w is not None:
            self._history.append((now, snap.net_load_w))
            horizon = now - 2 * self.config.market.interval_s
            while self._history and self._history[0][0] < horizon:
                self._history.popleft()

    def _spool_telemetry(self, now: float) -> None:
        snap = self.snapshot
        load = None if snap.grid_w is None else snap.grid_w + snap.pv_w + snap.battery_w
        message = Telemetry(
            ts=now,
            devices=[p.message() for p in self.pollers],
            grid_power_w=snap.grid_w,
            pv_power_w=snap.pv_w,
            battery_power_w=snap.battery_w,
            load_power_w=None if load is None else max(load, 0.0),
            battery_soc_pct=snap.soc_pct,
            controller=self.controller,  # type: ignore[arg-type]
        )
        way = self.outbox.put(
            topics.site_topic(self.site, "telemetry"),
            message.model_dump_json(exclude_none=True).encode(),
            now,
            connected=self.bus.connected,
        )
        if way == "spooled":
            self.stats.telemetry_spooled += 1
        self._outbox.set()

    # -- the controller --------------------------------------------------------------------
    def _batteries(self) -> list[tuple[DevicePoller, BatteryFacade, BatteryReading]]:
        """The available batteries the agent can command (a map battery whose map documents
        no control is polled, not commanded)."""
        out: list[tuple[DevicePoller, BatteryFacade, BatteryReading]] = []
        for p in self.pollers:
            facade = p.facade
            if not (p.available and isinstance(p.reading, BatteryReading)):
                continue
            if isinstance(facade, Battery) or (
                isinstance(facade, MapBattery) and facade.control is not None
            ):
                out.append((p, facade, p.reading))
        return out

    def _active(self, now: float) -> tuple[Dispatch | None, Dispatch | None]:
        """The emergency order and the dispatch in force at ``now`` (agent clock)."""
        if self.emergency is not None and self.emergency.until_ts <= now:
            log.info("emergency order %s lapsed", self.emergency.command.id)
            self.emergency = None
        if self.dispatch is not None and self.dispatch.until_ts <= now:
            log.info("dispatch %s lapsed: back to the layer below", self.dispatch.command.id)
            self.dispatch = None
        return (
            None if self.emergency is None else self.emergency.command,
            None if self.dispatch is None else self.dispatch.command,
        )

    def _views(self) -> list[BatteryView]:
        """The available batteries as the policy sees them."""
        return [battery_view(r) for _, _, r in self._batteries()]

    def decide(self, now: float) -> tuple[float | None, str]:
        """The total battery setpoint (W, + discharges) and the layer it comes from
        (:func:`edge.policy.decide_setpoint_w` on the latest poll and the orders in force)."""
        views = self._views()
        if not views:
            return None, "fallback"
        emergency, dispatch = self._active(now)
        order = emergency or dispatch
        award = self.awards.get(int(now // self.config.market.interval_s))
        return decide_setpoint_w(
            views,
            self.snapshot.net_load_w,
            self.snapshot.soc_pct,
            command=None
            if order is None
            else Command(order.priority, order.battery_power_w, order.load_limit_w),
            award=None if award is None else Commitment(award.quantity_kwh, award.price_per_kwh),
            market=self.config.market,
            fallback=self.config.fallback,
            limits=self.config.limits,
            plan=self.plans.get(int(now // self.config.market.interval_s)),
        )

    async def _control(self, now: float) -> float | None:
        """Decide and apply; returns the total setpoint the batteries report."""
        self.deferred = []
        total, self.controller = self.decide(now)
        batteries = self._batteries()
        if total is None or not batteries:
            return None
        revert_s = math.ceil(
            max(self.config.dispatch_revert_s, 3 * self.config.site.poll_interval_s * self.speed)
        )
        applied = 0.0
        shares = share_among_batteries_w(total, [battery_view(r) for _, _, r in batteries])
        for (poller, battery, reading), share in zip(batteries, shares, strict=True):
            held = battery.held.last_value_w
            try:
                # Written on a change beyond the deadband or to refresh before the device's
                # own revert timeout (drivers.writeguard), on the agent's clock.
                wrote = await battery.hold_power_w(
                    share, now, revert_timeout_s=device_revert_s(battery, revert_s)
                )
            except SetpointRejected as err:
                log.info("battery %s refused %s W: %s", poller.cfg.name, share, err)
                continue
            except DriverError as err:
                log.warning("battery %s write failed: %s", poller.cfg.name, err)
                continue
            except ValueError as err:  # a minimum write interval too long to refresh in time
                log.warning("battery %s cannot be held: %s", poller.cfg.name, err)
                continue
            if wrote and battery.applied_w is not None:
                self.stats.battery_writes += 1
                applied += battery.applied_w
                continue
            if held is not None and abs(share - held) >= battery.held.policy.deadband_w:
                self.deferred.append(poller.cfg.name)  # within the minimum write interval
            applied += reading.setpoint_w if reading.setpoint_w is not None else held or 0.0
        return applied

    # -- messages in -----------------------------------------------------------------------
    def _reject(self, kind: str, topic: str, err: BaseException) -> str:
        """Count a refused inbound message by kind and reason; log once per topic and reason."""
        reason = rejection_reason(err)
        by_reason = self.stats.rejected.setdefault(kind, {})
        by_reason[reason] = by_reason.get(reason, 0) + 1
        key = topic[:200]
        self.stats.invalid_messages[key] = self.stats.invalid_messages.get(key, 0) + 1
        if (key, reason) not in self._logged_invalid and len(self._logged_invalid) < 1000:
            self._logged_invalid.add((key, reason))
            log.warning(
                "refused a message on %s (%s; further ones counted, not logged): %s",
                key,
                reason,
                _first_line(err),
            )
        return reason

    async def _on_message(self, topic: str, payload: bytes) -> None:
        """Every inbound message: applied, or refused and counted. Never raises."""
        try:
            parsed = topics.parse_topic(topic)
            kind = parsed.kind
        except Exception as err:
            self._reject("unknown", topic, Unwanted("unknown_topic", _first_line(err)))
            return
        if kind == "dispatch":
            await self._on_dispatch(topic, payload)
            return
        try:
            self._apply(parsed, payload)
        except Exception as err:
            self._reject(kind, topic, err)

    def _apply(self, parsed: topics.ParsedTopic, payload: bytes) -> None:
        """Validate and keep an award, forecast, clearing or grid state; raises when refused."""
        kind = parsed.kind
        if parsed.site is not None and parsed.site != self.site:
            raise Unwanted("other_site", f"a message for site {parsed.site!r}")
        if len(payload) > MAX_INBOUND_BYTES:
            raise PayloadTooLarge(f"payload of {len(payload)} bytes")
        if kind == "award":
            award = Award.model_validate_json(payload)
            current = int(self.clock.now() // self.config.market.interval_s)
            if abs(award.interval - current) > AWARD_WINDOW_INTERVALS:
                raise Unwanted(
                    "stale" if award.interval < current else "future",
                    f"an award for interval {award.interval}, {award.interval - current} "
                    "from the current one",
                )
            if award.interval not in self.awards:
                log.info(
                    "award for interval %d: %+.3f kWh at %.4f/kWh",
                    award.interval,
                    award.quantity_kwh,
                    award.price_per_kwh,
                )
            self.awards[award.interval] = award
            while len(self.awards) > 8:
                self.awards.popitem(last=False)
        elif kind == "forecast":
            self.forecast = Forecast.model_validate_json(payload)
        elif kind == "reservation":
            self.reservation = Reservation.model_validate_json(payload)
        elif kind == "grid/state":
            self.grid_mode = GridState.model_validate_json(payload).mode
        elif kind == "market/clearing":
            clearing = Clearing.model_validate_json(payload)  # kept for [homeassistant] only
            if self.clearing is None or clearing.interval >= self.clearing.interval:
                self.clearing = clearing
        else:
            raise Unwanted("unexpected_topic", f"the agent does not read {kind} messages")

    async def _ack(
        self,
        command_id: str,
        outcome: AckOutcome,
        detail: str = "",
        applied: float | None = None,
        load_limit: float | None = None,
    ) -> None:
        """Acknowledge a dispatch (counted by outcome, one info line each); never raises."""
        self.stats.acks[outcome] = self.stats.acks.get(outcome, 0) + 1
        log.info(
            "dispatch %s: %s%s%s",
            command_id[:64] or "unknown",
            outcome,
            "" if applied is None else f", battery {applied:.0f} W",
            f" ({detail})" if detail else "",
        )
        try:
            ack = DispatchAck(
                ts=self.clock.now(),
                command_id=command_id[:64] or "unknown",
                outcome=outcome,
                applied_battery_power_w=applied,
                applied_load_limit_w=load_limit,
                detail=detail[:300],
            )
            await self.bus.publish(
                topics.site_topic(self.site, "dispatch/ack"), ack.model_dump_json()
            )
        except BusUnavailable:
            if not self._ack_unsent_logged:  # once per outage
                self._ack_unsent_logged = True
                log.warning("could not acknowledge dispatch %s: broker unavailable", command_id)
            return
        except Exception:
            log.exception("could not acknowledge dispatch %s", command_id)
            return
        self._ack_unsent_logged = False

    async def _on_dispatch(self, topic: str, payload: bytes) -> None:
        """A dispatch: applied and acknowledged, or acknowledged ``invalid``. Never raises."""
        try:
            await self._dispatch(topic, payload)
        except Exception as err:
            reason = self._reject("dispatch", topic, err)
            detail = _first_line(err)
            if isinstance(err, ValidationError):
                detail = "; ".join(
                    f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5]
                )
            await self._ack(command_id_of(payload), "invalid", f"{reason}: {detail}")

    def order_window(self, cmd: Dispatch, received_ts: float) -> OrderWindow:
        """Judge a dispatch's times on the agent's clock with the site's ``[dispatch]`` rules.

        Skew and age are real seconds, scaled by the clock's speed (edge.config).
        """
        trust = self.config.dispatch
        return order_window(
            cmd.ts,
            cmd.expires_ts,
            received_ts,
            max_skew_s=trust.max_clock_skew_s * self.speed,
            max_age_s=trust.max_age_s * self.speed,
            max_duration_s=trust.max_emergency_duration_s
            if cmd.priority == "emergency"
            else trust.max_duration_s,
        )

    def _first_sight(self, command_id: str) -> bool:
        """Remember a command id (the last 10,000); False if it was seen before."""
        if command_id in self._seen_commands:
            return False
        self._seen_commands[command_id] = None
        while len(self._seen_commands) > 10_000:
            self._seen_commands.popitem(last=False)
        return True

    async def _dispatch(self, topic: str, payload: bytes) -> None:
        if len(payload) > MAX_INBOUND_BYTES:
            raise PayloadTooLarge(f"payload of {len(payload)} bytes")
        cmd = Dispatch.model_validate_json(payload)
        if not self._first_sight(cmd.id):
            await self._ack(cmd.id, "duplicate", "this command id was already handled")
            return
        now = self.clock.now()
        window = self.order_window(cmd, now)
        if window.verdict == "expired":
            await self._ack(cmd.id, "expired", window.detail)
            return
        if window.verdict != "ok":
            self._reject("dispatch", topic, Unwanted(window.verdict, window.detail))
            await self._ack(cmd.id, "refused", window.detail)
            return
        batteries = self._batteries()
        if cmd.battery_power_w is not None and not batteries:
            await self._ack(cmd.id, "refused", "no battery is available at this site")
            return
        details = [window.detail] if window.shortened else []
        if cmd.battery_power_w is not None:
            views = [battery_view(r) for _, _, r in batteries]
            max_cha, max_dis = rated_totals_w(views)
            wanted = cmd.battery_power_w
            clamped = clamp_to_rating_w(wanted, views)
            if clamped != wanted:
                details.append(
                    f"{wanted:.0f} W is beyond the rated {-max_cha:.0f}..{max_dis:.0f} W"
                )
                cmd = cmd.model_copy(update={"battery_power_w": clamped})
        outcome: AckOutcome = "clamped" if details else "accepted"
        order = Order(cmd, window.end_ts)
        if cmd.priority == "emergency":
            self.emergency = order
        else:
            self.dispatch = order
        try:
            async with self._control_lock:
                applied = await self._control(now)
        except BaseException:
            # Never leave an order in force that was not acknowledged as such.
            if self.emergency is order:
                self.emergency = None
            if self.dispatch is order:
                self.dispatch = None
            raise
        if self.controller not in (cmd.priority, "safety"):
            await self._ack(
                cmd.id, "refused", f"overridden by the {self.controller} layer", applied
            )
            return
        if self.controller == "safety":
            outcome = "clamped"
            details.append("limited by site safety limits")
        if self.deferred:
            details.append(
                f"written once the minimum write interval of {', '.join(self.deferred)} has passed"
            )
        elif (
            cmd.battery_power_w is not None
            and applied is not None
            and abs(applied - cmd.battery_power_w) > max(50.0, 0.01 * abs(cmd.battery_power_w))
        ):
            outcome = "clamped"
            details.append("limited by state of charge")
        await self._ack(cmd.id, outcome, "; ".join(details), applied, cmd.load_limit_w)

    # -- the outbox ------------------------------------------------------------------------
    async def _replay_loop(self) -> None:
        """Publish the spool in order and remove what the broker acknowledged; while the
        spool is unusable, publish what the outbox queued in memory instead."""
        live = self.outbox.live
        while not self._stop.is_set():
            batch = self.outbox.peek(200)
            if not batch and not live:
                self._outbox.clear()
                await self._outbox.wait()
                continue
            if not self.bus.connected:
                with contextlib.suppress(TimeoutError):
                    await self.bus.wait_connected(1.0)
                continue
            if batch:
                try:
                    await self.bus.publish_many((m.topic, m.payload) for m in batch)
                except BusUnavailable:
                    continue  # not removed: published again (receivers are idempotent on id)
                self.outbox.ack(batch[-1].seq)
                self.stats.telemetry_published += len(batch)
                continue
            direct = list(itertools.islice(live, 200))
            try:
                await self.bus.publish_many(direct)
            except BusUnavailable:
                continue
            for _ in direct:
                live.popleft()
            self.stats.telemetry_published += len(direct)

    # -- the retained status ---------------------------------------------------------------
    async def _status_loop(self) -> None:
        """Republish the retained status when the counters change, at most every
        ``site.status_interval_s`` wall seconds; a reconnect publishes the latest one."""
        loop = asyncio.get_running_loop()
        every_s = self.config.site.status_interval_s
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), min(1.0, every_s))
            if self._stop.is_set() or not self.bus.connected:
                continue
            counters = self.counters()
            if counters == self._status_sent or loop.time() - self._status_sent_wall < every_s:
                continue
            payload = self._status(online=True, counters=counters)
            presence = self.bus.presence
            if presence is not None:
                self.bus.presence = Presence(presence.topic, payload, presence.offline_payload)
            try:
                await self.bus.publish(presence.topic if presence else "", payload, retain=True)
            except BusUnavailable:
                continue
            self._status_sent, self._status_sent_wall = counters, loop.time()
            self.stats.status_published += 1

    # -- bidding ---------------------------------------------------------------------------
    def _expected_net_kwh(self, start_ts: float, interval_s: float) -> float:
        f = self.forecast
        recent = [w for _, w in self._history]
        if f is None or not f.pv_power_w:
            return expected_net_kwh(start_ts, interval_s, recent_net_w=recent)
        return expected_net_kwh(
            start_ts,
            interval_s,
            forecast_start_ts=f.start_ts,
            forecast_step_s=f.step_s,
            forecast_pv_w=f.pv_power_w,
            forecast_load_w=f.load_power_w,
            recent_net_w=recent,
        )

    def horizon(self, start_ts: float) -> Horizon | None:
        """The forecast and reservation aligned on the market intervals from ``start_ts``
        (None without a forecast)."""
        f, r, m = self.forecast, self.reservation, self.config.market
        if f is None or not f.pv_power_w:
            return None
        n, step = len(f.pv_power_w), float(m.interval_s)

        def series(first: float, step_s: float, values: list[float | None] | list[float]) -> Any:
            data = [math.nan if v is None else v for v in values]
            return aligned(start_ts, step, n, first, step_s, data)

        nan: list[float] = [math.nan]
        return Horizon(
            start_ts=start_ts,
            step_s=step,
            pv_w=series(f.start_ts, f.step_s, f.pv_power_w),
            load_w=series(f.start_ts, f.step_s, f.load_power_w),
            price_per_kwh=series(f.start_ts, f.step_s, f.price_per_kwh),
            floor_kwh=series(r.start_ts, r.step_s, r.floor_kwh) if r else series(0, step, nan),
            import_cap_kw=series(r.start_ts, r.step_s, r.import_cap_kw)
            if r
            else series(0, step, nan),
            export_cap_kw=series(r.start_ts, r.step_s, r.export_cap_kw)
            if r
            else series(0, step, nan),
            suggested_kwh=(
                series(r.start_ts, r.step_s, r.suggested_kwh)
                if r is not None and r.suggested_kwh
                else None
            ),
        )

    def _plan(self, horizon: Horizon | None, views: list[BatteryView]) -> IntervalPlan:
        """:func:`edge.plan.plan_interval` for this site; raises PlanError without a
        forecast. Pure: runs in a worker thread."""
        if horizon is None:
            raise PlanError("no forecast from the coordinator yet")
        c = self.config
        # a late plan's thread may still hold the warm start: then this one starts cold
        warm = self._plan_warm if self._plan_warm_lock.acquire(blocking=False) else None
        try:
            return plan_interval(
                horizon,
                views,
                config=c.plan,
                market=c.market,
                limits=c.limits,
                role=c.site.role,
                warm=warm,
            )
        finally:
            if warm is not None:
                self._plan_warm_lock.release()

    async def _planned_bid(self, upcoming: int, time_left_s: float) -> CurveSteps | None:
        """The bid for interval ``upcoming`` from a plan (edge/plan.py) solved in a worker
        thread within ``time_left_s`` (wall); None when planning is off, there is no battery
        or forecast, or the plan fails or is late: the agent then bids by the fixed-price
        rules and says so once (and once when planning works again)."""
        c = self.config
        views = self._views()
        if not c.plan.enabled or not views:
            return None
        horizon = self.horizon(upcoming * float(c.market.interval_s))
        timeout_s = min(PLAN_TIMEOUT_S, time_left_s / 2)
        if timeout_s < PLAN_MIN_TIME_S:
            timeout_s = 0.0  # no time to plan and still bid before the gate: times out now
        try:
            planned = await asyncio.wait_for(
                asyncio.to_thread(self._plan, horizon, views), timeout=timeout_s
            )
        except (PlanError, TimeoutError) as err:
            reason = str(err) or "the plan was late"
            self.stats.plan_fallbacks += 1
            if self._plan_failing is None:
                log.warning(
                    "site %s: no plan for interval %d (%s); bidding by the fixed-price rules",
                    self.site,
                    upcoming,
                    reason,
                )
            self._plan_failing = reason
            return None
        if self._plan_failing is not None:
            log.info("site %s: planning again from interval %d", self.site, upcoming)
            self._plan_failing = None
        self.stats.plans += 1
        self.last_plan = (upcoming, planned)
        self.plans[upcoming] = planned.step
        while len(self.plans) > 8:
            self.plans.popitem(last=False)
        log.debug(
            "site %s: planned interval %d: grid %.0f W, stored energy worth %.3f/kWh",
            self.site,
            upcoming,
            planned.step.grid_w,
            float(planned.plan.value_per_kwh[0]),
        )
        return planned.bid

    async def _bid_loop(self) -> None:
        """Bid once per interval, ``bid_lead_s`` before its gate closes (on the agent's clock)."""
        m = self.config.market
        while not self._stop.is_set():
            now = self.clock.now()
            upcoming = int(now // m.interval_s) + 1
            if self._bid_for == upcoming or now >= upcoming * m.interval_s - m.gate_s:
                upcoming += 1  # done, or too late for it: the next one
            bid_at = upcoming * m.interval_s - m.gate_s - m.bid_lead_s
            wait_s = max(0.0, (bid_at - now) / self.speed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait_s)
            if self._stop.is_set():
                return
            await self.bid(upcoming)

    async def bid(self, upcoming: int) -> None:
        """Publish the bid for interval ``upcoming`` if its gate is still open."""
        m = self.config.market
        now = self.clock.now()
        start = upcoming * m.interval_s
        if self._bid_for == upcoming or now >= start - m.gate_s:
            return
        curve = await self._planned_bid(upcoming, (start - m.gate_s - now) / self.speed)
        if curve is None:
            curve = interval_bid(
                self._views(),
                self._expected_net_kwh(start, m.interval_s),
                market=m,
                fallback=self.config.fallback,
                role=self.config.site.role,
            )
        bid = Bid(
            ts=now,
            interval=upcoming,
            buy=[BidStep(price_per_kwh=p, quantity_kwh=q) for p, q in curve.buy],
            sell=[BidStep(price_per_kwh=p, quantity_kwh=q) for p, q in curve.sell],
        )
        try:
            await self.bus.publish(topics.site_topic(self.site, "bid"), bid.model_dump_json())
        except BusUnavailable:
            return  # a late bid is worthless; the market clears without it
        self._bid_for = upcoming
        self.stats.bids_published += 1
        log.debug(
            "bid for interval %d: buy %s, sell %s",
            upcoming,
            [(round(p, 4), round(q, 3)) for p, q in curve.buy],
            [(round(p, 4), round(q, 3)) for p, q in curve.sell],
        )
