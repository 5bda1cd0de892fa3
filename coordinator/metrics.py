"""Prometheus metrics of the coordinator: read from its state at each scrape.

A custom collector (prometheus_client's ``Collector`` protocol) turns what the coordinator
already counts into metrics when Prometheus scrapes, so nothing on the ingest path pays for
them. Names follow Prometheus conventions: the unit in the name (``_watts``, ``_seconds``,
``_kwh``), ``_total`` for counters. Served on ``[metrics] host:port`` (``/metrics``).

Signs as everywhere in wattmesh: feeder flow is positive when the community imports.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.metrics_http import MetricsServer

if TYPE_CHECKING:
    from coordinator.service import Coordinator

__all__ = ["CoordinatorCollector", "MetricsServer", "registry_for"]

_MODES = ("normal", "constrained", "emergency")


class CoordinatorCollector(Collector):
    """Every coordinator metric, from ``coordinator``'s counters and state at scrape time."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def collect(self) -> Iterator[Metric]:
        c = self.c
        st = c.stats
        feeder = [c.feeder]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["feeder"])
            family.add_metric(feeder, value)
            return family

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["feeder"])
            family.add_metric(feeder, value)
            return family

        yield counter("wattmesh_telemetry_messages", "Telemetry messages accepted.", st.telemetry)
        yield counter(
            "wattmesh_telemetry_duplicates", "Telemetry messages seen before (replays).",
            st.duplicates,
        )  # fmt: skip
        yield counter("wattmesh_bids", "Bids accepted.", st.bids)
        rejected = CounterMetricFamily(
            "wattmesh_rejected_messages",
            "Messages refused at ingest, by site and reason (plausibility or invalid).",
            labels=["feeder", "site", "reason"],
        )
        for name, site in sorted(c.sites.items()):
            for reason, count in sorted(site.rejected.items()):
                rejected.add_metric([c.feeder, name, reason], count)
        yield rejected
        yield counter("wattmesh_clearings", "Market intervals cleared.", st.clearings)
        yield counter("wattmesh_awards", "Awards sent to sites.", st.awards)
        latest = c.last_clearing
        yield gauge(
            "wattmesh_clearing_price_per_kwh",
            "The last clearing price, currency per kWh.",
            float("nan") if latest is None else latest.price_per_kwh,
        )
        yield gauge(
            "wattmesh_clearing_volume_kwh",
            "Energy traded locally in the last cleared interval, kWh.",
            float("nan") if latest is None else latest.volume_kwh,
        )
        yield gauge(
            "wattmesh_clearing_duration_seconds",
            "Wall time from gate closure to the last award of the last clearing, s.",
            st.clear_latency_s[-1] if st.clear_latency_s else float("nan"),
        )
        yield gauge(
            "wattmesh_last_clearing_timestamp_seconds",
            "Wall time (UTC epoch s) of the last clearing; 0 before the first.",
            c.last_clearing_wall_ts,
        )
        yield gauge(
            "wattmesh_market_interval_seconds",
            "The market interval, in seconds of the coordinator's clock.",
            c.config.market.interval_s,
        )
        yield gauge(
            "wattmesh_clock_speed_ratio",
            "Simulated seconds per wall second (1 in production).",
            c.speed,
        )
        yield counter("wattmesh_settled_intervals", "Intervals settled.", st.settled)
        yield gauge("wattmesh_unsettled_intervals", "Cleared, not yet settled.", len(c.cleared))
        yield counter(
            "wattmesh_estimated_site_intervals", "Site-intervals settled as estimates.",
            st.estimated,
        )  # fmt: skip
        yield counter("wattmesh_corrections", "Settlements corrected by late telemetry.",
                      st.corrections)  # fmt: skip
        g = c.config.grid
        yield gauge("wattmesh_feeder_flow_watts", "Feeder flow, W (+ imports).", c.flow_w)
        yield gauge("wattmesh_feeder_import_limit_watts", "Feeder import limit, W.",
                    g.import_limit_w)  # fmt: skip
        yield gauge("wattmesh_feeder_export_limit_watts", "Feeder export limit, W.",
                    g.export_limit_w)  # fmt: skip
        mode = GaugeMetricFamily(
            "wattmesh_grid_mode", "1 for the grid mode in force.", labels=["feeder", "mode"]
        )
        for m in _MODES:
            mode.add_metric([c.feeder, m], 1.0 if c.mode == m else 0.0)
        yield mode
        yield counter("wattmesh_grid_orders", "Battery and load orders sent by the grid loop.",
                      st.dispatches)  # fmt: skip
        acks = CounterMetricFamily(
            "wattmesh_dispatch_acks", "Dispatch acknowledgements by outcome.",
            labels=["feeder", "outcome"],
        )  # fmt: skip
        for outcome, count in sorted(st.acks.items()):
            acks.add_metric([c.feeder, outcome], count)
        yield acks
        yield counter("wattmesh_weather_forecasts", "Weather forecasts taken.", st.weather)
        weather = CounterMetricFamily(
            "wattmesh_weather_forecasts_refused",
            "Weather forecasts refused, by reason (invalid, future, stale, superseded, off).",
            labels=["feeder", "reason"],
        )
        for reason, count in sorted(st.weather_rejected.items()):
            weather.add_metric([c.feeder, reason], count)
        yield weather
        if c.ingest is not None:  # [coordinator] ingest_workers > 0
            yield gauge("wattmesh_ingest_workers_connected",
                        "Ingest worker processes connected to the broker.",
                        c.ingest.connected)  # fmt: skip
            yield counter("wattmesh_ingest_worker_restarts",
                          "Ingest worker processes restarted after dying.",
                          c.ingest.stats.restarts)  # fmt: skip
        yield from self._sites_and_historian()

    def _sites_and_historian(self) -> Iterator[Metric]:
        c = self.c
        online = GaugeMetricFamily(
            "wattmesh_site_online", "1 while a site's agent says it is online.",
            labels=["feeder", "site"],
        )  # fmt: skip
        age = GaugeMetricFamily(
            "wattmesh_site_telemetry_age_seconds",
            "Wall seconds since a site's last accepted telemetry.",
            labels=["feeder", "site"],
        )
        dropped_telemetry = CounterMetricFamily(
            "wattmesh_site_telemetry_dropped",
            "Telemetry a site's agent dropped (its spool full or unwritable), from its status.",
            labels=["feeder", "site"],
        )
        degraded = GaugeMetricFamily(
            "wattmesh_site_spool_degraded",
            "1 while a site's agent runs without a usable spool, from its status.",
            labels=["feeder", "site"],
        )
        now = c.clock.now()
        for name, site in sorted(c.sites.items()):
            online.add_metric([c.feeder, name], 1.0 if site.online else 0.0)
            if site.latest_ts is not None:
                age.add_metric([c.feeder, name], max(0.0, now - site.latest_ts) / c.speed)
            if site.status is not None:
                dropped_telemetry.add_metric([c.feeder, name], site.status.telemetry_dropped)
                state = site.status.spool_state
                degraded.add_metric([c.feeder, name], 1.0 if state == "degraded" else 0.0)
        yield from (online, age, dropped_telemetry, degraded)
        h = c.historian.stats() if c.historian is not None else None
        dropped = CounterMetricFamily(
            "wattmesh_historian_dropped_points", "Time-series points dropped by a bound.",
            labels=["feeder"],
        )  # fmt: skip
        dropped.add_metric([c.feeder], 0 if h is None else h.dropped)
        yield dropped
        buffered = GaugeMetricFamily(
            "wattmesh_historian_buffer_points", "Time-series points waiting in the disk buffer.",
            labels=["feeder"],
        )  # fmt: skip
        buffered.add_metric([c.feeder], 0 if h is None else h.buffer_points)
        yield buffered
        up = GaugeMetricFamily(
            "wattmesh_historian_up", "1 while a configured historian runs, 0 if it failed.",
            labels=["feeder"],
        )  # fmt: skip
        up.add_metric([c.feeder], 1.0 if c.historian is not None else 0.0)
        yield up


def registry_for(coordinator: Coordinator) -> CollectorRegistry:
    """A registry holding the coordinator's collector (served by MetricsServer and the API)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoordinatorCollector(coordinator))
    return registry
