"""Prometheus metrics scraped from a running coordinator, and the alert rules, checked by
promtool (Debian's prometheus package) for syntax and for when each alert fires."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker import topics
from broker.clock import ManualClock
from broker.messages import Bid, BidStep, Status
from broker.mosquitto import BrokerFiles, MosquittoProcess
from coordinator.config import parse_coordinator_config
from coordinator.service import Coordinator
from tests.test_coordinator import T0, _bus, _telemetry

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "prometheus" / "alerts.yml"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is required (apt-get install prometheus; scripts/test.sh does)")
    return path


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_a_running_coordinator_serves_every_metric_with_sane_values(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    config = parse_coordinator_config(
        {
            "coordinator": {"ledger": str(tmp_path / "ledger.sqlite")},
            "broker": {"port": broker_files.port, "password_env": None},
            "tariff": {"retail_per_kwh": 0.30, "feed_in_per_kwh": 0.08},
            "grid": {"import_limit_w": 10_000.0, "export_limit_w": 8_000.0, "period_s": 0.1},
            "metrics": {"port": 0},
        },
        "test",
    )
    c = Coordinator(config, ManualClock(T0), password=broker_files.credentials["coordinator"])
    k = int(T0 // 900) + 1
    async with c:
        await c.bus.wait_connected(5)
        assert c.metrics is not None
        a = await _bus(broker_files, "site-a", [])
        b = await _bus(broker_files, "site-b", [])
        await a.publish(
            topics.site_topic("site-a", "status"),
            Status(ts=T0, online=True, telemetry_dropped=7, spool_state="degraded")
            .model_dump_json(),
        )
        await a.publish(topics.site_topic("site-a", "telemetry"), _telemetry(T0, 3000.0).model_dump_json())
        await b.publish(topics.site_topic("site-b", "telemetry"), _telemetry(T0, -1000.0).model_dump_json())
        await b.publish(topics.site_topic("site-b", "telemetry"), _telemetry(4e9, 1.0).model_dump_json())
        for name, bus, side in (("site-a", a, "buy"), ("site-b", b, "sell")):
            step = [BidStep(price_per_kwh=0.25 if side == "buy" else 0.1, quantity_kwh=0.5)]
            bid = Bid(ts=T0, interval=k, **{side: step})  # type: ignore[arg-type]
            await bus.publish(topics.site_topic(name, "bid"), bid.model_dump_json())
        async with asyncio.timeout(10):
            while c.stats.bids < 2 or c.stats.telemetry < 2 or c.sites["site-a"].status is None:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert await c.clear_interval(k) is not None
        await asyncio.sleep(0.3)  # a few grid checks
        text = await asyncio.to_thread(_scrape, c.metrics.port)
        for bus in (a, b):
            await bus.__aexit__(None, None, None)
    s = _samples(text)
    f = (("feeder", "feeder-1"),)

    def site(name: str) -> tuple[tuple[str, str], ...]:
        return (("feeder", "feeder-1"), ("site", name))

    assert s[("wattmesh_telemetry_messages_total", f)] == 2
    assert s[("wattmesh_bids_total", f)] == 2
    rejected = (("feeder", "feeder-1"), ("reason", "future"), ("site", "site-b"))
    assert s[("wattmesh_rejected_messages_total", rejected)] == 1
    assert s[("wattmesh_clearings_total", f)] == 1
    assert 0.08 <= s[("wattmesh_clearing_price_per_kwh", f)] <= 0.30
    assert s[("wattmesh_clearing_volume_kwh", f)] == pytest.approx(0.5)
    assert s[("wattmesh_clearing_duration_seconds", f)] >= 0
    assert s[("wattmesh_last_clearing_timestamp_seconds", f)] > 1.7e9
    assert s[("wattmesh_feeder_flow_watts", f)] == pytest.approx(2000.0)
    assert s[("wattmesh_feeder_import_limit_watts", f)] == 10_000
    assert s[("wattmesh_feeder_export_limit_watts", f)] == 8_000
    assert s[("wattmesh_grid_mode", (*f, ("mode", "normal")))] == 1
    assert s[("wattmesh_unsettled_intervals", f)] == 1
    assert s[("wattmesh_site_online", site("site-a"))] == 1
    assert s[("wattmesh_site_telemetry_dropped_total", site("site-a"))] == 7
    assert s[("wattmesh_site_spool_degraded", site("site-a"))] == 1
    assert s[("wattmesh_site_telemetry_age_seconds", site("site-b"))] == 0
    assert s[("wattmesh_historian_up", f)] == 0
    for name in ("wattmesh_settled_intervals_total", "wattmesh_corrections_total",
                 "wattmesh_grid_orders_total", "wattmesh_historian_buffer_points",
                 "wattmesh_historian_dropped_points_total"):  # fmt: skip
        assert (name, f) in s
    lint = subprocess.run(  # noqa: ASYNC221 - the coordinator has stopped
        [_promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_the_alert_rules_load() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'wattmesh_feeder_flow_watts{{feeder="f1"}}'
        values: '100000x3 160000x10'
      - series: 'wattmesh_feeder_import_limit_watts{{feeder="f1"}}'
        values: '150000x13'
      - series: 'wattmesh_feeder_export_limit_watts{{feeder="f1"}}'
        values: '220000x13'
      - series: 'wattmesh_site_online{{feeder="f1", site="house-1"}}'
        values: '1x3 0x10'
      - series: 'wattmesh_site_telemetry_age_seconds{{feeder="f1", site="house-1"}}'
        values: '1x3 400x10'
    alert_rule_test:
      - eval_time: 2m
        alertname: WattmeshFeederOverLimit
        exp_alerts: []
      - eval_time: 6m
        alertname: WattmeshFeederOverLimit
        exp_alerts:
          - exp_labels: {{severity: critical, feeder: f1}}
            exp_annotations:
              summary: "Feeder f1 is over its limit"
              description: "The feeder's flow has been beyond a limit for a minute: batteries and demand response are not enough."
      - eval_time: 10m
        alertname: WattmeshSiteOffline
        exp_alerts:
          - exp_labels: {{severity: warning, feeder: f1, site: house-1}}
            exp_annotations:
              summary: "Site house-1 is offline or silent"
              description: "No telemetry from house-1 on feeder f1 for 5 minutes: its battery runs on local control and its intervals are settled as estimates."
  - interval: 1m
    input_series:
      - series: 'wattmesh_last_clearing_timestamp_seconds{{feeder="f1"}}'
        values: '0+60x40'
      - series: 'wattmesh_market_interval_seconds{{feeder="f1"}}'
        values: '900x40'
      - series: 'wattmesh_clock_speed_ratio{{feeder="f1"}}'
        values: '1x40'
    alert_rule_test:
      - eval_time: 30m
        alertname: WattmeshNoClearing
        exp_alerts: []
"""


def test_the_alerts_fire_when_they_should(tmp_path: Path) -> None:
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(RULE_TESTS.format(rules=RULES))
    result = subprocess.run(
        [_promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
