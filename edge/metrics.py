"""Prometheus metrics of one edge agent (``[metrics]`` in the site file): read at each scrape.

A custom collector (prometheus_client's ``Collector`` protocol) turns what the agent already
counts into metrics when Prometheus scrapes, so the poll cycle pays nothing for them but one
histogram count per poll (:class:`edge.latency.LatencyHistogram`). Names follow Prometheus
conventions: the unit in the name (``_seconds``, ``_watts``, ``_ratio``), ``_total`` for
counters, and every sample carries the ``site`` label. Served on ``[metrics] host:port``
(``/metrics``) by prometheus_client's HTTP server in a daemon thread.

This module is imported only when ``[metrics]`` is configured: the agent's service path
never loads prometheus_client otherwise (tests/test_lean_edge.py).

The collector runs in the server's thread while the agent's event loop changes its counters:
it reads each dict through one ``dict(...)`` or ``sorted(...)`` copy (made in C, atomic
under the GIL) and the site snapshot through one reference, so a scrape never sees a dict
change size under it.
Counters start from zero when the agent starts, as Prometheus expects of a process.

Signs as everywhere in wattmesh: grid power is positive when the site imports, battery power
positive when the batteries discharge.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, get_args

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from broker.metrics_http import MetricsServer
from drivers.devices import Battery, MapBattery
from edge.agent import AckOutcome
from edge.homeassistant import CONTROLLERS

if TYPE_CHECKING:
    from edge.agent import EdgeAgent
    from edge.config import MetricsSection

__all__ = ["EdgeCollector", "MetricsServer", "registry_for", "serve_metrics"]

log = logging.getLogger(__name__)


def _bucket_label(bound_s: float) -> str:
    """A bucket's ``le`` label as prometheus_client writes it (``+Inf`` for the last)."""
    return "+Inf" if bound_s == float("inf") else repr(bound_s)


class EdgeCollector(Collector):
    """Every metric of one agent, from its pollers, outbox, counters and snapshot."""

    def __init__(self, agent: EdgeAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        site = [a.site]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["site"])
            family.add_metric(site, value)
            return family

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            """A site gauge; no sample while ``value`` is unknown (None)."""
            family = GaugeMetricFamily(name, doc, labels=["site"])
            if value is not None:
                family.add_metric(site, value)
            return family

        yield from self._devices()
        st = a.stats
        yield counter("wattmesh_edge_poll_cycles", "Poll cycles run.", st.cycles)
        yield gauge(
            "wattmesh_edge_broker_connected", "1 while the agent is connected to the broker.",
            1.0 if a.bus.connected else 0.0,
        )  # fmt: skip
        outbox = a.outbox
        spool = outbox.spool
        yield gauge(
            "wattmesh_edge_spool_messages",
            "Telemetry messages waiting in the spool for the broker (0 while degraded).",
            len(spool) if spool is not None else 0,
        )
        yield gauge(
            "wattmesh_edge_spool_bytes", "Topic and payload bytes in the spool.",
            spool.bytes_used if spool is not None else 0,
        )  # fmt: skip
        yield gauge(
            "wattmesh_edge_spool_degraded",
            "1 while the spool is unusable (disk full, read-only, corrupt).",
            1.0 if outbox.state == "degraded" else 0.0,
        )
        yield counter(
            "wattmesh_edge_telemetry_dropped",
            "Telemetry lost: not spooled nor published, or pushed out by the spool's bound.",
            outbox.dropped,
        )
        yield counter(
            "wattmesh_edge_telemetry_direct",
            "Telemetry sent the direct way while the spool was unusable.", outbox.direct,
        )  # fmt: skip
        yield counter("wattmesh_edge_telemetry_spooled", "Telemetry messages spooled.",
                      st.telemetry_spooled)  # fmt: skip
        yield counter(
            "wattmesh_edge_telemetry_published",
            "Telemetry messages the broker acknowledged (replays of an unacknowledged batch "
            "count again).",
            st.telemetry_published,
        )
        yield counter("wattmesh_edge_bids_published", "Bids published.", st.bids_published)
        yield counter("wattmesh_edge_plans", "Intervals bid from a plan.", st.plans)
        yield counter(
            "wattmesh_edge_plan_fallbacks",
            "Intervals the plan failed or was late for (bid by the fixed-price rules).",
            st.plan_fallbacks,
        )
        yield from self._messages()
        yield from self._site()

    def _devices(self) -> Iterator[Metric]:
        a = self.agent
        latency = HistogramMetricFamily(
            "wattmesh_edge_device_poll_duration_seconds",
            "Wall time of each device poll, failed ones included, s.",
            labels=["site", "device"],
        )
        failures = CounterMetricFamily(
            "wattmesh_edge_device_poll_failures", "Device polls that failed.",
            labels=["site", "device"],
        )  # fmt: skip
        available = GaugeMetricFamily(
            "wattmesh_edge_device_available", "1 while a device's last poll succeeded.",
            labels=["site", "device"],
        )  # fmt: skip
        writes = CounterMetricFamily(
            "wattmesh_edge_setpoint_writes",
            "Setpoint commands written to a battery (held or direct).",
            labels=["site", "device"],
        )
        for p in list(a.pollers):
            labels = [a.site, p.cfg.name]
            h = p.latency
            buckets = h.cumulative()
            latency.add_metric(
                labels, [(_bucket_label(b), n) for b, n in buckets], sum_value=h.sum_s
            )
            failures.add_metric(labels, p.failed_polls)
            available.add_metric(labels, 1.0 if p.available else 0.0)
            facade = p.facade
            if isinstance(facade, Battery | MapBattery):
                writes.add_metric(labels, facade.writes)
        yield from (latency, failures, available, writes)

    def _messages(self) -> Iterator[Metric]:
        a = self.agent
        acks = CounterMetricFamily(
            "wattmesh_edge_dispatch_acks", "Dispatch acknowledgements by outcome.",
            labels=["site", "outcome"],
        )  # fmt: skip
        counts = dict(a.stats.acks)
        for outcome in get_args(AckOutcome):
            acks.add_metric([a.site, outcome], counts.get(outcome, 0))
        yield acks
        rejected = CounterMetricFamily(
            "wattmesh_edge_rejected_messages",
            "Inbound messages refused, by topic kind and reason.",
            labels=["site", "kind", "reason"],
        )
        for kind, by_reason in sorted(a.stats.rejected.items()):
            for reason, count in sorted(by_reason.items()):
                rejected.add_metric([a.site, kind, reason], count)
        yield rejected

    def _site(self) -> Iterator[Metric]:
        a = self.agent
        current = a.controller
        layer = GaugeMetricFamily(
            "wattmesh_edge_controller",
            "1 for the controller layer in force (safety > emergency > dispatch > market > "
            "fallback).",
            labels=["site", "layer"],
        )
        for name in (*CONTROLLERS, *([] if current in CONTROLLERS else [current])):
            layer.add_metric([a.site, name], 1.0 if name == current else 0.0)
        yield layer
        snap = a.snapshot  # replaced whole every cycle: one consistent set of values
        site = [a.site]
        for name, doc, value in (
            ("wattmesh_edge_grid_power_watts", "Grid exchange, W (+ imports).", snap.grid_w),
            ("wattmesh_edge_pv_power_watts", "PV power, W.", snap.pv_w),
            ("wattmesh_edge_battery_power_watts", "Battery power, W (+ discharges).",
             snap.battery_w),
            ("wattmesh_edge_battery_soc_ratio",
             "State of charge of the batteries (capacity-weighted), 0..1.",
             None if snap.soc_pct is None else snap.soc_pct / 100.0),
        ):  # fmt: skip
            family = GaugeMetricFamily(name, doc, labels=["site"])
            if value is not None:  # no sample while unknown (no meter or battery answering)
                family.add_metric(site, value)
            yield family


def registry_for(agent: EdgeAgent) -> CollectorRegistry:
    """A registry holding the agent's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(agent))
    return registry


def serve_metrics(agent: EdgeAgent, section: MetricsSection) -> MetricsServer:
    """Start serving ``agent``'s metrics as ``section`` says; OSError when it cannot listen."""
    server = MetricsServer(registry_for(agent), section.host, section.port)
    server.start()
    log.info("site %s: metrics on http://%s:%d/metrics", agent.site, server.host, server.port)
    return server
