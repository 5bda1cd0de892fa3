"""The coordinator service: ingest, forecasts, market clearing, settlement, grid balancing.

One MQTT session (coordinator credentials) and four clock-driven tasks:

- ingest: every site's status, telemetry, bids and dispatch acks, validated (invalid messages
  are counted per site and logged once per site and topic); a site's identity is its topic.
  Telemetry is deduplicated by id, kept in bounded numpy ring buffers for forecasting, and
  integrated into metered energy per market interval (sample and hold: a reading's power
  holds until the next reading).
- market: at each gate closure, clear the interval's bids (coordinator.market) with the
  utility as outside option, publish each bidder's award and the retained clearing.
- settlement: ``settle_delay_s`` after an interval ends, settle it in the ledger from metered
  energy against awards (idempotent; a site with no telemetry is settled as its award and
  flagged estimated).
- forecasts: before each gate, publish every site's PV, load and price forecast (retained).
- grid: every ``period_s``, the feeder's net flow from the latest telemetry; when it nears a
  limit, dispatch batteries with headroom pro rata (then load limits to consumers), re-issued
  while needed and left to expire when not; the grid state is published retained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError

from broker import topics
from broker.client import BusClient, BusSettings
from broker.clock import Clock
from broker.errors import BusUnavailable
from broker.messages import (
    Award,
    Bid,
    Clearing,
    Dispatch,
    DispatchAck,
    Forecast,
    GridState,
    Status,
    Telemetry,
    new_id,
)
from coordinator import forecast as fc
from coordinator.config import CoordinatorConfig
from coordinator.historian import Historian, HistorianSettings
from coordinator.ledger import Ledger, LedgerError
from coordinator.market import Book, Tariff, clear

log = logging.getLogger(__name__)

GridMode = Literal["normal", "constrained", "emergency"]


class RingBuffer:
    """A bounded history of (ts, value) samples in float64 numpy arrays."""

    def __init__(self, capacity: int) -> None:
        self.ts = np.full(capacity, np.nan)
        self.values = np.full(capacity, np.nan)
        self._next = 0
        self._count = 0

    def append(self, ts: float, value: float | None) -> None:
        """Add a sample (None is stored as NaN, ignored by the forecasters)."""
        i = self._next
        self.ts[i] = ts
        self.values[i] = np.nan if value is None else value
        self._next = (i + 1) % len(self.ts)
        self._count = min(self._count + 1, len(self.ts))

    def arrays(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(ts, values), oldest first."""
        if self._count < len(self.ts):
            return self.ts[: self._count].copy(), self.values[: self._count].copy()
        order = np.r_[self._next : len(self.ts), 0 : self._next]
        return self.ts[order], self.values[order]

    def __len__(self) -> int:
        return self._count


@dataclass(frozen=True, slots=True)
class _Relief:
    """What the grid orders to one site's batteries do (battery power, W, + discharges).

    ``flow_w`` is how much the order moves the site's battery from ``base_w``, its power before
    the episode's first order (and so how much it moves the feeder's flow); ``pending_w`` the
    change the last order asked for, not visible until two readings have arrived after it
    (``readings_at_order``); the relief lapses with the order at ``expires_ts``.
    """

    flow_w: float
    pending_w: float
    base_w: float
    expires_ts: float
    readings_at_order: int


@dataclass
class SiteState:
    """What the coordinator knows of one site."""

    site: str
    online: bool = False
    role: str | None = None
    latest: Telemetry | None = None
    pv: RingBuffer = field(default_factory=lambda: RingBuffer(8 * 96 * 4))
    load: RingBuffer = field(default_factory=lambda: RingBuffer(8 * 96 * 4))
    energy_wh: dict[int, float] = field(default_factory=dict)  # interval -> metered import
    last_sample: tuple[float, float] | None = None  # (ts, grid W) held until the next
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    invalid: int = 0
    last_history_ts: float = -math.inf
    readings: int = 0  # telemetry messages taken as the latest so far

    @property
    def battery_headroom_w(self) -> tuple[float, float]:
        """(more discharge, more charge) the site's batteries could take on now, W."""
        t = self.latest
        if t is None:
            return 0.0, 0.0
        rated = sum(
            d.rated_power_w or 0.0 for d in t.devices if d.kind == "battery" and d.available
        )
        now_w = t.battery_power_w or 0.0
        soc = t.battery_soc_pct
        can_discharge = soc is None or soc > 12.0
        can_charge = soc is None or soc < 98.0
        return (
            max(0.0, rated - now_w) if can_discharge else 0.0,
            max(0.0, rated + now_w) if can_charge else 0.0,
        )


@dataclass
class CoordinatorStats:
    """Counters for monitoring and tests."""

    telemetry: int = 0
    duplicates: int = 0
    invalid: int = 0
    bids: int = 0
    clearings: int = 0
    awards: int = 0
    settled: int = 0
    forecasts: int = 0
    dispatches: int = 0
    acks: dict[str, int] = field(default_factory=dict)
    clear_latency_s: list[float] = field(default_factory=list)


class Coordinator:
    """The coordinator for one feeder. ``async with Coordinator(config, clock)`` runs it."""

    def __init__(
        self,
        config: CoordinatorConfig,
        clock: Clock,
        *,
        password: str | None = None,
        bus_settings: BusSettings | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.feeder = config.coordinator.feeder
        self.sites: dict[str, SiteState] = {}
        self.bids: dict[int, dict[str, Bid]] = {}
        self.awards: dict[int, dict[str, float]] = {}
        self.prices: dict[int, tuple[float, float, float]] = {}  # clearing, retail, feed-in
        self.stats = CoordinatorStats()
        self.mode: GridMode = "normal"
        self.flow_w = 0.0
        self.flow_log: list[tuple[float, float]] = []  # (ts, feeder flow W), for tests
        self.emergency_until = -math.inf
        self.last_clearing: Clearing | None = None
        self._grid_orders: dict[str, float] = {}  # site -> wall time the order was last sent
        self._relief: dict[str, _Relief] = {}  # site -> the relief its grid orders give
        self._logged: set[tuple[str, str]] = set()
        self._stop = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self.ledger = Ledger(config.coordinator.ledger)
        #: Off unless the configuration has a [historian] section.
        self.historian: Historian | None = None
        if config.historian is not None:
            self.historian = Historian(
                HistorianSettings.from_mapping(config.historian, "coordinator configuration")
            )
        b = config.broker
        self.bus = BusClient(
            bus_settings
            or b.bus_settings(
                username="coordinator",
                client_id="wattmesh-coordinator",
                password=password,
                max_inflight=1000,
            ),
            handler=self._on_message,
            fast_handler=self._on_telemetry,
        )

    @property
    def speed(self) -> float:
        """Simulated seconds per wall second."""
        return float(getattr(self.clock, "speed", 1.0))

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> Coordinator:
        if self.historian is not None:
            await self.historian.__aenter__()
        await self.bus.__aenter__()
        for kind in ("status", "telemetry", "bid", "dispatch", "dispatch/ack"):
            await self.bus.subscribe(topics.site_wildcard(kind))
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._group.create_task(self._market_loop(), name="coordinator-market")
        self._group.create_task(self._grid_loop(), name="coordinator-grid")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        assert self._group is not None
        try:
            await self._group.__aexit__(et, ev, tb)
        finally:
            await self.bus.__aexit__(et, ev, tb)
            if self.historian is not None:
                await self.historian.__aexit__(et, ev, tb)
            self.ledger.close()

    async def _sleep_until(self, ts: float) -> bool:
        """Sleep until simulated time ``ts``; False when stopping."""
        while not self._stop.is_set():
            wait_s = (ts - self.clock.now()) / self.speed
            if wait_s <= 0:
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait_s)
        return False

    # -- ingest ----------------------------------------------------------------------------
    def _site(self, site: str) -> SiteState:
        state = self.sites.get(site)
        if state is None:
            state = self.sites[site] = SiteState(site)
        return state

    def _invalid(self, site: str, kind: str, err: Exception) -> None:
        self.stats.invalid += 1
        self._site(site).invalid += 1
        if (site, kind) not in self._logged:
            self._logged.add((site, kind))
            log.warning(
                "invalid %s from site %s (further ones counted, not logged): %s",
                kind,
                site,
                str(err).splitlines()[0],
            )

    async def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = topics.parse_topic(topic)
        except ValueError:
            return
        site = parsed.site
        if site is None:
            return
        try:
            if parsed.kind == "telemetry":
                self.ingest_telemetry(site, Telemetry.model_validate_json(payload))
            elif parsed.kind == "bid":
                bid = Bid.model_validate_json(payload)
                self.bids.setdefault(bid.interval, {})[site] = bid
                self.stats.bids += 1
            elif parsed.kind == "status":
                status = Status.model_validate_json(payload)
                state = self._site(site)
                state.online, state.role = status.online, status.role
            elif parsed.kind == "dispatch":
                order = Dispatch.model_validate_json(payload)
                if order.priority == "emergency":  # an operator's order: the grid is theirs
                    self.emergency_until = max(self.emergency_until, order.expires_ts)
            elif parsed.kind == "dispatch/ack":
                ack = DispatchAck.model_validate_json(payload)
                self.stats.acks[ack.outcome] = self.stats.acks.get(ack.outcome, 0) + 1
        except ValidationError as err:
            self._invalid(site, parsed.kind, err)

    def _on_telemetry(self, topic: str, payload: bytes) -> bool:
        """Telemetry, the high-rate stream, handled synchronously as it arrives."""
        if not topic.endswith("/telemetry"):
            return False
        try:
            site = topics.parse_topic(topic).site
        except ValueError:
            return True
        if site is None:
            return True
        try:
            self.ingest_telemetry(site, Telemetry.model_validate_json(payload))
        except ValidationError as err:
            self._invalid(site, "telemetry", err)
        return True

    def ingest_telemetry(self, site: str, msg: Telemetry) -> None:
        """Keep the latest state, the history and the metered energy of a site."""
        state = self._site(site)
        if msg.id in state.seen:
            self.stats.duplicates += 1
            return
        state.seen[msg.id] = None
        if len(state.seen) > 5000:
            state.seen.popitem(last=False)
        self.stats.telemetry += 1
        if self.historian is not None:
            self.historian.record_telemetry(site, msg)
        if state.latest is None or msg.ts >= state.latest.ts:
            state.latest = msg
            state.readings += 1
        if msg.ts >= state.last_history_ts + 60.0:  # one history sample a minute
            state.last_history_ts = msg.ts
            state.pv.append(msg.ts, msg.pv_power_w)
            state.load.append(msg.ts, msg.load_power_w)
        if msg.grid_power_w is None:
            return
        if state.last_sample is not None and msg.ts > state.last_sample[0]:
            self._meter(state, state.last_sample[0], msg.ts, state.last_sample[1])
        if state.last_sample is None or msg.ts > state.last_sample[0]:
            state.last_sample = (msg.ts, msg.grid_power_w)

    def _meter(self, state: SiteState, t0: float, t1: float, grid_w: float) -> None:
        """Add grid_w held over [t0, t1) to the intervals it spans, Wh."""
        interval_s = self.config.market.interval_s
        while t0 < t1:
            k = int(t0 // interval_s)
            end = min(t1, (k + 1) * interval_s)
            state.energy_wh[k] = state.energy_wh.get(k, 0.0) + grid_w * (end - t0) / 3600.0
            t0 = end

    # -- market ----------------------------------------------------------------------------
    async def _market_loop(self) -> None:
        m = self.config.market
        k = int(self.clock.now() // m.interval_s) + 1
        if self.clock.now() >= k * m.interval_s - m.gate_s:
            k += 1
        while await self._sleep_until(k * m.interval_s - m.gate_s):
            await self.clear_interval(k)
            await self.publish_forecasts(k + 1)
            for done in [
                i
                for i in self.awards
                if (i + 1) * m.interval_s + m.settle_delay_s <= self.clock.now()
            ]:
                self.settle(done)
            k += 1

    def tariff_at(self, ts: float) -> tuple[float, float]:
        """(retail, feed-in) per kWh at ``ts``."""
        return self.config.tariff.at(ts, self.config.coordinator.utc_offset_h)

    async def clear_interval(self, interval: int) -> Clearing:
        """Clear one interval's bids; publish awards and the clearing."""
        t_gate = self.clock.now()
        m = self.config.market
        retail, feed_in = self.tariff_at(interval * m.interval_s)
        hours = m.interval_s / 3600.0
        grid = self.config.grid
        bids = self.bids.pop(interval, {})
        names = sorted(bids)
        steps: list[tuple[int, float, float]] = []
        for i, name in enumerate(names):
            steps += [(i, s.price_per_kwh, s.quantity_kwh) for s in bids[name].buy]
            steps += [(i, s.price_per_kwh, -s.quantity_kwh) for s in bids[name].sell]
        book = Book.from_steps(steps) if steps else Book.empty()
        result = clear(
            book,
            Tariff(
                retail,
                feed_in,
                grid.import_limit_w / 1000.0 * hours,
                grid.export_limit_w / 1000.0 * hours,
            ),
        )
        net = result.site_net_award_kwh(len(names))
        price = float(np.clip(result.price_per_kwh, -100.0, 100.0))
        self.awards[interval] = {name: float(net[i]) for i, name in enumerate(names)}
        self.prices[interval] = (price, retail, feed_in)
        now = self.clock.now()
        # Built without re-validation: every value is bounded above (receivers validate).
        awards = [
            (
                topics.site_topic(name, "award"),
                Award.model_construct(
                    id=new_id(),
                    ts=now,
                    interval=interval,
                    price_per_kwh=price,
                    quantity_kwh=float(np.clip(net[i], -1e6, 1e6)),
                ).model_dump_json(),
            )
            for i, name in enumerate(names)
        ]
        clearing = Clearing(
            ts=now,
            interval=interval,
            price_per_kwh=price,
            volume_kwh=float(result.local_volume_kwh),
            bids=len(names),
            utility_import_kwh=float(result.utility_import_kwh),
            utility_export_kwh=float(result.utility_export_kwh),
        )
        try:
            await self.bus.publish_many(awards)
            await self.bus.publish(topics.MARKET_CLEARING, clearing.model_dump_json(), retain=True)
        except BusUnavailable as err:
            log.warning("interval %d cleared but not all of it was published: %s", interval, err)
        self.last_clearing = clearing
        if self.historian is not None:
            self.historian.record_clearing(
                clearing, retail_price_per_kwh=retail, feed_in_price_per_kwh=feed_in
            )
            for i, name in enumerate(names):
                self.historian.record_award(name, Award.model_validate_json(awards[i][1]))
        self.stats.clearings += 1
        self.stats.awards += len(awards)
        self.stats.clear_latency_s.append((self.clock.now() - t_gate) / self.speed)
        return clearing

    def settle(self, interval: int) -> None:
        """Settle an interval in the ledger (once); awards and prices are then forgotten."""
        awards = self.awards.pop(interval)
        price, retail, feed_in = self.prices.pop(interval)
        metered = {
            name: s.energy_wh.pop(interval) / 1000.0
            for name, s in self.sites.items()
            if interval in s.energy_wh
        }
        if not awards and not metered:
            return
        try:
            result = self.ledger.settle_interval(
                interval,
                clearing_price_per_kwh=price,
                retail_price_per_kwh=retail,
                feed_in_price_per_kwh=feed_in,
                awards_kwh=awards,
                metered_kwh=metered,
                imbalance_premium_per_kwh=self.config.market.imbalance_premium_per_kwh,
                estimate_missing=True,
                rebate=self.config.market.rebate,
            )
        except LedgerError:
            log.exception("interval %d could not be settled", interval)
            return
        if self.historian is not None:
            self.historian.record_settlement_result(result, ts=self.clock.now())
        self.stats.settled += 1

    async def publish_forecasts(self, first_interval: int) -> None:
        """Every known site's forecast from ``first_interval`` on, and the price forecast."""
        m = self.config.market
        c = self.config.coordinator
        steps = int(m.forecast_horizon_h * 3600 // m.interval_s)
        times = (first_interval + np.arange(steps)) * float(m.interval_s) + m.interval_s / 2
        per_site: dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]] = {}
        for name, s in self.sites.items():
            if len(s.load) == 0:
                continue
            pv_ts, pv_w = s.pv.arrays()
            load_ts, load_w = s.load.arrays()
            pv = fc.pv_forecast_w(pv_ts, pv_w, times, c.latitude_deg, c.longitude_deg)
            load = fc.load_forecast_w(load_ts, load_w, times, utc_offset_h=c.utc_offset_h)
            per_site[name] = (np.nan_to_num(pv), np.nan_to_num(load))
        if not per_site:
            return
        tariffs = np.array([self.tariff_at(float(t)) for t in times])
        net = sum((load - pv for pv, load in per_site.values()), np.zeros(steps))
        price = fc.price_forecast_per_kwh(net, tariffs[:, 0], tariffs[:, 1])
        now = self.clock.now()
        start_ts = float(times[0] - m.interval_s / 2)
        prices = [float(x) for x in price]
        forecasts = {
            name: Forecast(
                ts=now,
                start_ts=start_ts,
                step_s=m.interval_s,
                pv_power_w=[float(x) for x in pv],
                load_power_w=[float(x) for x in load],
                price_per_kwh=prices,
            )
            for name, (pv, load) in per_site.items()
        }
        if self.historian is not None:
            for name, forecast in forecasts.items():
                self.historian.record_forecast(name, forecast)
        messages = [(topics.forecast_topic(n), f.model_dump_json()) for n, f in forecasts.items()]
        with contextlib.suppress(BusUnavailable):
            self.stats.forecasts += await self.bus.publish_many(messages, retain=True)

    # -- grid ------------------------------------------------------------------------------
    def feeder_flow_w(self) -> float:
        """The feeder's net import, W: the sum of every site's latest grid exchange."""
        return float(
            sum(s.latest.grid_power_w or 0.0 for s in self.sites.values() if s.latest is not None)
        )

    async def _grid_loop(self) -> None:
        g = self.config.grid
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            await self.balance(loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), g.period_s)

    async def balance(self, wall_now: float) -> None:
        """Check the feeder; dispatch batteries (and load limits) while it nears a limit."""
        g = self.config.grid
        flow = self.flow_w = self.feeder_flow_w()
        now = self.clock.now()
        self.flow_log.append((now, flow))
        importing = flow > 0
        limit = g.import_limit_w if importing else g.export_limit_w
        # Hysteresis on the flow as it would be without our orders, so that relieving the
        # feeder does not by itself end the relief (and start the overload again).
        self._relief = {n: r for n, r in self._relief.items() if r.expires_ts > now}
        underlying = flow + sum(r.flow_w for r in self._relief.values())
        load_pct = 100.0 * max(abs(flow), abs(underlying)) / limit
        if now < self.emergency_until:
            self.mode = "emergency"  # operator orders override market and balancing
        elif load_pct >= g.act_at_pct:
            self.mode = "constrained"
        elif load_pct <= g.release_pct or self.mode == "emergency":
            self.mode = "normal"
        if self.mode == "constrained":
            await self._relieve(flow, limit * g.target_pct / 100.0, importing, wall_now)
        state = GridState(
            ts=now,
            flow_w=float(np.clip(flow, -1e9, 1e9)),
            import_limit_w=g.import_limit_w,
            export_limit_w=g.export_limit_w,
            mode=self.mode,
        )
        if self.historian is not None:
            self.historian.record_grid_state(self.feeder, state)
        with contextlib.suppress(BusUnavailable):
            await self.bus.publish(
                topics.grid_state_topic(self.feeder), state.model_dump_json(), retain=True
            )

    def _headroom(self, excess: float, importing: bool) -> tuple[float, dict[str, float]]:
        """The excess (W) less what orders not yet in the readings will relieve, and the
        headroom (W) of every site that can be ordered now (two readings since its last
        order)."""
        sign = 1.0 if importing else -1.0
        headroom: dict[str, float] = {}
        for name, site in self.sites.items():
            if site.latest is None:
                continue
            relief = self._relief.get(name)
            if relief is not None and site.readings < relief.readings_at_order + 2:
                excess -= sign * relief.pending_w  # ordered, not yet in the flow we see
                continue
            headroom[name] = site.battery_headroom_w[0 if importing else 1]
        return excess, headroom

    def _battery_orders(
        self, flow: float, excess: float, headroom: dict[str, float], importing: bool
    ) -> dict[str, tuple[Dispatch, _Relief | None]]:
        """Each site's share of ``excess`` (pro rata to ``headroom``) as a battery order."""
        g = self.config.grid
        sign = 1.0 if importing else -1.0
        now = self.clock.now()
        total = sum(headroom.values())
        orders: dict[str, tuple[Dispatch, _Relief | None]] = {}
        for name, room in headroom.items():
            site = self.sites[name]
            latest = site.latest
            relief = self._relief.get(name)
            if latest is None or (relief is None and (room <= 0 or excess <= 0)):
                continue
            if total <= 0:
                share = 0.0  # every battery is at its limit: keep the relief in place
            elif excess > 0:
                share = min(room, excess * room / total)
            else:
                share = excess * room / total
            current = latest.battery_power_w or 0.0
            base = current if relief is None else relief.base_w
            setpoint = current + sign * share
            setpoint = max(setpoint, base) if importing else min(setpoint, base)
            order = Dispatch(
                ts=now,
                battery_power_w=setpoint,
                expires_ts=now + g.dispatch_expiry_s,
                reason=f"feeder {self.feeder} at {abs(flow):.0f} W",
            )
            orders[name] = (
                order,
                _Relief(
                    flow_w=setpoint - base,
                    pending_w=setpoint - current,
                    base_w=base,
                    expires_ts=order.expires_ts,
                    readings_at_order=site.readings,
                ),
            )
        return orders

    async def _relieve(self, flow: float, target: float, importing: bool, wall_now: float) -> None:
        """Spread the excess over the batteries with headroom, pro rata; then load limits.

        A battery's order is its present power plus its share of the excess, so re-issuing it
        while the flow sits at the target keeps the relief in place. A site is ordered again
        only once two readings have arrived since its last order (the first may have been
        taken before the order landed): until then the flow does not show that order, so its
        expected effect is taken off the excess instead of ordering the same excess twice, and
        its headroom is left out of the sharing. An order never goes past the battery's power
        before the first order of the episode in the wrong direction: handing relief back
        stops there, so a battery is never told to charge from (or discharge into) the
        overloaded feeder, whatever it did with earlier orders.
        """
        g = self.config.grid
        now = self.clock.now()
        excess, headroom = self._headroom(abs(flow) - target, importing)
        total = sum(headroom.values())
        orders = self._battery_orders(flow, excess, headroom, importing)
        uncovered = excess - min(max(excess, 0.0), total)
        if importing and uncovered > 0:
            consumers = [
                n
                for n, s in self.sites.items()
                if s.role in ("consumer", "prosumer")
                and s.latest is not None
                and (s.latest.grid_power_w or 0.0) > 0
                and n not in orders
                and n not in self._relief  # its battery order stands; do not replace it
            ]
            for name in consumers:
                latest = self.sites[name].latest
                assert latest is not None
                cut = uncovered / len(consumers)
                order = Dispatch(
                    ts=now,
                    load_limit_w=max(0.0, (latest.grid_power_w or 0.0) - cut),
                    expires_ts=now + g.dispatch_expiry_s,
                    reason=f"feeder {self.feeder} over its limit: please limit load",
                )
                orders[name] = (order, None)
        for name, (order, relief) in orders.items():
            last = self._grid_orders.get(name)
            if last is not None and wall_now - last < g.reissue_s / self.speed:
                continue
            try:
                await self.bus.publish(topics.site_topic(name, "dispatch"), order.model_dump_json())
            except BusUnavailable:
                return
            self._grid_orders[name] = wall_now
            if self.historian is not None:
                self.historian.record_dispatch(name, order)
            if relief is not None:
                self._relief[name] = relief
            self.stats.dispatches += 1
