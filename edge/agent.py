"""The site gateway agent: poll devices, publish telemetry, bid, execute dispatch, stay safe.

One poll cycle every ``site.poll_interval_s`` (wall seconds): every due device is polled
(one :class:`DevicePoller` per device owns its interval and availability), the controller
chooses the battery setpoint by precedence (design section 2: safety > emergency > dispatch
> market commitment > local fallback), and one telemetry message carrying every device's
reading goes into the spool. The spool is the outbox: a replay task publishes it in order
and removes what the broker acknowledged, so a broker outage or an agent crash loses nothing.
Times in messages come from the agent's clock (simulated time in simulations).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import numpy as np
from pydantic import ValidationError

from broker import topics
from broker.client import BusClient, BusSettings, Presence
from broker.clock import Clock
from broker.errors import BusUnavailable
from broker.messages import (
    Award,
    Bid,
    BidStep,
    DeviceReading,
    Dispatch,
    DispatchAck,
    Forecast,
    GridState,
    Status,
    Telemetry,
)
from drivers.devices import (
    Battery,
    BatteryReading,
    Inverter,
    InverterReading,
    MeterReading,
    RegisterMapMeter,
    SunSpecMeter,
)
from drivers.errors import DriverError, SetpointRejected
from drivers.regmap import builtin_map_names, load_builtin_map, load_register_map
from drivers.transport import BusPool
from edge.bidding import bid_curve, interval_energy_kwh
from edge.config import DeviceSection, EdgeConfig
from edge.control import keep_peak_reserve_w, self_consumption_setpoint_w
from edge.spool import Spool

log = logging.getLogger(__name__)

SOFTWARE_VERSION = "0.1.0"
AckOutcome = Literal["accepted", "clamped", "refused", "expired", "duplicate", "invalid"]
Reading = InverterReading | BatteryReading | MeterReading
Facade = Inverter | Battery | SunSpecMeter | RegisterMapMeter


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
        self._next_wall = 0.0
        self._backoff_s = 0.0

    async def _connect(self) -> Facade:
        transport = self.pool.get(self.cfg.url)
        kind, unit = self.cfg.kind, self.cfg.unit
        if kind == "pv_inverter":
            return await Inverter.connect(transport, unit)
        if kind == "battery":
            return await Battery.connect(transport, unit)
        if kind == "sunspec_meter":
            return await SunSpecMeter.connect(transport, unit)
        name = self.cfg.register_map or "sdm630"
        regmap = load_builtin_map(name) if name in builtin_map_names() else load_register_map(name)
        return RegisterMapMeter(transport, unit, regmap)

    async def poll(self, wall_now: float) -> None:
        """Poll if due; a failure marks the device unavailable and backs off."""
        if wall_now < self._next_wall:
            return
        try:
            if self.facade is None:
                self.facade = await self._connect()
            self.reading = await self.facade.read()
        except DriverError as err:
            self.failures += 1
            if self.available or self.failures == 1:
                log.warning("device %s unavailable: %s", self.cfg.name, err)
            self.available, self.error = False, str(err)[:200]
            self._backoff_s = min(60.0, max(self.interval_s, self._backoff_s * 2 or 1.0))
            self._next_wall = wall_now + self._backoff_s
            return
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
        return DeviceReading(
            device=self.cfg.name,
            kind=self.cfg.kind,
            available=self.available,
            error=self.error,
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
    acks: dict[str, int] = field(default_factory=dict)
    battery_writes: int = 0


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
        self.spool = Spool(config.spool.path, max_messages=config.spool.max_messages)
        self.stats = AgentStats()
        self.snapshot = SiteSnapshot()
        self.controller = "fallback"
        self.awards: OrderedDict[int, Award] = OrderedDict()
        self.forecast: Forecast | None = None
        self.grid_mode = "normal"
        self.dispatch: Dispatch | None = None
        self.emergency: Dispatch | None = None
        self._seen_commands: OrderedDict[str, None] = OrderedDict()
        self._bid_for: int | None = None
        self._battery_written: dict[str, tuple[float, float]] = {}
        self._history: list[tuple[float, float]] = []  # (ts, net load W), bounded
        self._control_lock = asyncio.Lock()
        self._outbox = asyncio.Event()
        self._logged_invalid: set[str] = set()
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

    def _status(self, online: bool) -> bytes:
        kinds: list[str] = sorted({d.kind for d in self.config.devices})
        return (
            Status(
                ts=self.clock.now(),
                online=online,
                role=self.config.site.role,
                capabilities=kinds,
                software_version=SOFTWARE_VERSION,
            )
            .model_dump_json()
            .encode()
        )

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> EdgeAgent:
        await self.bus.__aenter__()
        for kind in topics.SITE_READS:
            await self.bus.subscribe(topics.site_topic(self.site, kind))
        await self.bus.subscribe(topics.forecast_topic(self.site))
        await self.bus.subscribe(f"{topics.PREFIX}/grid/+/state")
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._group.create_task(self._cycle_loop(), name="edge-cycle")
        self._group.create_task(self._replay_loop(), name="edge-replay")
        if self.config.market.enabled:
            self._group.create_task(self._bid_loop(), name="edge-bids")
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
            await self.bus.__aexit__(et, ev, tb)
            self.pool.close()
            self.spool.close()

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
                self._history.pop(0)

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
        self.spool.append(
            topics.site_topic(self.site, "telemetry"),
            message.model_dump_json(exclude_none=True).encode(),
            now,
        )
        self.stats.telemetry_spooled += 1
        self._outbox.set()

    # -- the controller --------------------------------------------------------------------
    def _batteries(self) -> list[tuple[DevicePoller, Battery, BatteryReading]]:
        out = []
        for p in self.pollers:
            if (
                p.available
                and isinstance(p.facade, Battery)
                and isinstance(p.reading, BatteryReading)
            ):
                out.append((p, p.facade, p.reading))
        return out

    def _active(self, now: float) -> tuple[Dispatch | None, Dispatch | None]:
        if self.emergency is not None and self.emergency.expires_ts <= now:
            log.info("emergency order %s lapsed", self.emergency.id)
            self.emergency = None
        if self.dispatch is not None and self.dispatch.expires_ts <= now:
            log.info("dispatch %s lapsed: back to the layer below", self.dispatch.id)
            self.dispatch = None
        return self.emergency, self.dispatch

    def decide(self, now: float) -> tuple[float | None, str]:
        """The total battery setpoint (W, + discharges) and the layer it comes from."""
        batteries = self._batteries()
        net = self.snapshot.net_load_w
        if not batteries:
            return None, "fallback"
        max_dis = sum(r.rated_discharge_w or 0.0 for _, _, r in batteries)
        max_cha = sum(r.rated_charge_w or 0.0 for _, _, r in batteries)
        emergency, dispatch = self._active(now)
        award = self.awards.get(int(now // self.config.market.interval_s))
        target: float | None
        layer: str
        command = emergency or dispatch
        if command is not None:
            layer = command.priority
            target = command.battery_power_w
            if target is None and command.load_limit_w is not None and net is not None:
                target = max(0.0, net - command.load_limit_w)  # discharge to respect the cap
        elif award is not None and net is not None:
            layer = "market"
            target = net - award.quantity_kwh * 3.6e6 / self.config.market.interval_s
            if (
                target < 0 < net
                and award.price_per_kwh > self.config.market.battery_charge_price_per_kwh
            ):
                # Keeping the award would mean buying dear energy to charge the battery (the
                # forecast overshot): deviate instead; the imbalance costs less than that.
                target = 0.0
            # The energy below the peak-shaving reserve was not offered to the market: it
            # covers a forecast shortfall only beyond the fallback's import cap (the rest is
            # imbalance). The cap itself is the fallback's: the feeder is the coordinator's.
            fb = self.config.fallback
            soc = self.snapshot.soc_pct
            target = float(
                keep_peak_reserve_w(
                    target,
                    net,
                    soc if soc is not None else 100.0,
                    import_cap_w=fb.import_cap_w,
                    reserve_soc_pct=fb.reserve_soc_pct if soc is not None else None,
                )
            )
        elif self.config.fallback.mode == "self_consumption" and net is not None:
            layer = "fallback"
            fb = self.config.fallback
            soc = self.snapshot.soc_pct if self.snapshot.soc_pct is not None else 50.0
            target = float(
                self_consumption_setpoint_w(
                    net,
                    0.0,
                    soc,
                    soc_min_pct=min(r.soc_min_pct for _, _, r in batteries),
                    soc_max_pct=max(r.soc_max_pct for _, _, r in batteries),
                    max_charge_w=max_cha,
                    max_discharge_w=max_dis,
                    import_cap_w=fb.import_cap_w,
                    reserve_soc_pct=fb.reserve_soc_pct,
                )
            )
        else:
            layer, target = "fallback", 0.0
        if target is None:
            return None, layer
        safe = self._safety(target, net, max_cha, max_dis)
        return safe, ("safety" if abs(safe - target) > 1e-6 else layer)

    def _safety(self, target: float, net: float | None, max_cha: float, max_dis: float) -> float:
        """Connection limits, then rated powers: above every other layer."""
        limits = self.config.limits
        if net is not None and limits.import_limit_w is not None:
            target = max(target, net - limits.import_limit_w)
        if net is not None and limits.export_limit_w is not None:
            target = min(target, net + limits.export_limit_w)
        return float(np.clip(target, -max_cha, max_dis))

    async def _control(self, now: float) -> float | None:
        """Decide and apply; returns the total setpoint the batteries report."""
        total, self.controller = self.decide(now)
        batteries = self._batteries()
        if total is None or not batteries:
            return None
        revert_s = math.ceil(
            max(self.config.dispatch_revert_s, 3 * self.config.site.poll_interval_s * self.speed)
        )
        applied = 0.0
        loop = asyncio.get_running_loop()
        weights = [
            (r.rated_discharge_w if total > 0 else r.rated_charge_w) or 0.0 for _, _, r in batteries
        ]
        for (poller, battery, reading), weight in zip(batteries, weights, strict=True):
            share = total * weight / (sum(weights) or 1.0)
            # Respect this battery's own state-of-charge bounds before asking it.
            soc = reading.soc_pct
            if soc is not None and (
                (share > 0 and soc <= reading.soc_min_pct)
                or (share < 0 and soc >= reading.soc_max_pct)
            ):
                share = 0.0
            share = round(share)
            last = self._battery_written.get(poller.cfg.name)
            renew_wall = revert_s / self.speed / 2.0
            step = max(50.0, 0.01 * (reading.rated_discharge_w or 0.0))
            if (
                last is not None
                and abs(last[0] - share) < step
                and loop.time() - last[1] < renew_wall
            ):
                applied += reading.setpoint_w if reading.setpoint_w is not None else last[0]
                continue
            try:
                applied += await battery.set_power_w(share, revert_timeout_s=revert_s)
            except SetpointRejected as err:
                log.info("battery %s refused %s W: %s", poller.cfg.name, share, err)
                continue
            except DriverError as err:
                log.warning("battery %s write failed: %s", poller.cfg.name, err)
                continue
            self.stats.battery_writes += 1
            self._battery_written[poller.cfg.name] = (share, loop.time())
        return applied

    # -- messages in -----------------------------------------------------------------------
    def _invalid(self, topic: str, err: Exception) -> None:
        self.stats.invalid_messages[topic] = self.stats.invalid_messages.get(topic, 0) + 1
        if topic not in self._logged_invalid:
            self._logged_invalid.add(topic)
            log.warning(
                "invalid message on %s (further ones counted, not logged): %s",
                topic,
                str(err).splitlines()[0],
            )

    async def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = topics.parse_topic(topic)
        except ValueError as err:
            self._invalid(topic, err)
            return
        try:
            if parsed.kind == "dispatch":
                await self._on_dispatch(topic, payload)
            elif parsed.kind == "award":
                award = Award.model_validate_json(payload)
                self.awards[award.interval] = award
                while len(self.awards) > 8:
                    self.awards.popitem(last=False)
            elif parsed.kind == "forecast":
                self.forecast = Forecast.model_validate_json(payload)
            elif parsed.kind == "grid/state":
                self.grid_mode = GridState.model_validate_json(payload).mode
        except ValidationError as err:
            self._invalid(topic, err)

    async def _ack(
        self,
        command_id: str,
        outcome: AckOutcome,
        detail: str = "",
        applied: float | None = None,
        load_limit: float | None = None,
    ) -> None:
        self.stats.acks[outcome] = self.stats.acks.get(outcome, 0) + 1
        ack = DispatchAck(
            ts=self.clock.now(),
            command_id=command_id[:64] or "unknown",
            outcome=outcome,
            applied_battery_power_w=applied,
            applied_load_limit_w=load_limit,
            detail=detail[:300],
        )
        try:
            await self.bus.publish(
                topics.site_topic(self.site, "dispatch/ack"), ack.model_dump_json()
            )
        except BusUnavailable:
            log.warning("could not acknowledge dispatch %s: broker unavailable", command_id)

    async def _on_dispatch(self, topic: str, payload: bytes) -> None:
        try:
            cmd = Dispatch.model_validate_json(payload)
        except ValidationError as err:
            self._invalid(topic, err)
            command_id = ""
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                command_id = str(json.loads(payload).get("id", ""))
            detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            await self._ack(command_id, "invalid", detail)
            return
        if cmd.id in self._seen_commands:
            await self._ack(cmd.id, "duplicate", "this command id was already handled")
            return
        self._seen_commands[cmd.id] = None
        while len(self._seen_commands) > 10_000:
            self._seen_commands.popitem(last=False)
        now = self.clock.now()
        if cmd.expires_ts <= now:
            await self._ack(cmd.id, "expired", f"expired {now - cmd.expires_ts:.0f} s ago")
            return
        batteries = self._batteries()
        if cmd.battery_power_w is not None and not batteries:
            await self._ack(cmd.id, "refused", "no battery is available at this site")
            return
        outcome: AckOutcome = "accepted"
        detail = ""
        if cmd.battery_power_w is not None:
            max_dis = sum(r.rated_discharge_w or 0.0 for _, _, r in batteries)
            max_cha = sum(r.rated_charge_w or 0.0 for _, _, r in batteries)
            wanted = cmd.battery_power_w
            clamped = float(np.clip(wanted, -max_cha, max_dis))
            if clamped != wanted:
                outcome = "clamped"
                detail = f"{wanted:.0f} W is beyond the rated {-max_cha:.0f}..{max_dis:.0f} W"
                cmd = cmd.model_copy(update={"battery_power_w": clamped})
        if cmd.priority == "emergency":
            self.emergency = cmd
        else:
            self.dispatch = cmd
        async with self._control_lock:
            applied = await self._control(now)
        if self.controller not in (cmd.priority, "safety"):
            await self._ack(
                cmd.id, "refused", f"overridden by the {self.controller} layer", applied
            )
            return
        if self.controller == "safety":
            outcome = "clamped"
            detail = (detail + "; " if detail else "") + "limited by site safety limits"
        if (
            cmd.battery_power_w is not None
            and applied is not None
            and abs(applied - cmd.battery_power_w) > max(50.0, 0.01 * abs(cmd.battery_power_w))
        ):
            outcome = "clamped"
            detail = (detail + "; " if detail else "") + "limited by state of charge"
        await self._ack(cmd.id, outcome, detail, applied, cmd.load_limit_w)

    # -- the outbox ------------------------------------------------------------------------
    async def _replay_loop(self) -> None:
        """Publish the spool in order; remove what the broker acknowledged."""
        while not self._stop.is_set():
            batch = self.spool.peek(200)
            if not batch:
                self._outbox.clear()
                await self._outbox.wait()
                continue
            if not self.bus.connected:
                with contextlib.suppress(TimeoutError):
                    await self.bus.wait_connected(1.0)
                continue
            try:
                await self.bus.publish_many((m.topic, m.payload) for m in batch)
            except BusUnavailable:
                continue  # not removed: published again (receivers are idempotent on id)
            self.spool.ack(batch[-1].seq)
            self.stats.telemetry_published += len(batch)

    # -- bidding ---------------------------------------------------------------------------
    def _expected_net_kwh(self, start_ts: float, interval_s: float) -> float:
        f = self.forecast
        if f is not None and f.pv_power_w:
            times = f.start_ts + f.step_s * np.arange(len(f.pv_power_w))
            mask = (times >= start_ts) & (times < start_ts + interval_s)
            if mask.any():
                net = np.asarray(f.load_power_w)[mask] - np.asarray(f.pv_power_w)[mask]
                return interval_energy_kwh(float(net.mean()), interval_s)
        if self._history:
            recent = [w for _, w in self._history]
            return interval_energy_kwh(float(np.mean(recent)), interval_s)
        return 0.0

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
        hours = m.interval_s / 3600.0
        charge = discharge = 0.0
        for _, _, r in self._batteries():
            if r.soc_pct is None or r.capacity_wh is None:
                continue
            room_kwh = (r.soc_max_pct - r.soc_pct) / 100.0 * r.capacity_wh / 1000.0
            # Energy kept for peak shaving is not offered to the market.
            floor_pct = max(r.soc_min_pct, self.config.fallback.reserve_soc_pct or 0.0)
            avail_kwh = (r.soc_pct - floor_pct) / 100.0 * r.capacity_wh / 1000.0
            charge += max(0.0, min((r.rated_charge_w or 0.0) / 1000.0 * hours, room_kwh))
            discharge += max(0.0, min((r.rated_discharge_w or 0.0) / 1000.0 * hours, avail_kwh))
        curve = bid_curve(
            self._expected_net_kwh(start, m.interval_s),
            charge_kwh=charge,
            discharge_kwh=discharge,
            max_buy_price_per_kwh=m.max_buy_price_per_kwh,
            min_sell_price_per_kwh=m.min_sell_price_per_kwh,
            charge_price_per_kwh=m.battery_charge_price_per_kwh,
            discharge_price_per_kwh=m.battery_discharge_price_per_kwh,
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
