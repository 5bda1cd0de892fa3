"""The edge agent's optional metrics port (``[metrics]``): scraped over HTTP from a running
agent on a real Mosquitto and a simulated house over Modbus TCP, linted by promtool; the poll
latency histogram; the edge alert rule, tested by promtool."""

from __future__ import annotations

import asyncio
import math
import re
import socket
import subprocess
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker import topics
from broker.clock import WallClock
from broker.messages import Dispatch
from broker.mosquitto import BrokerFiles, MosquittoProcess
from edge.agent import EdgeAgent
from edge.config import MetricsSection, parse_edge_config
from edge.latency import LatencyHistogram
from tests.broker_fixtures import free_port
from tests.test_edge_agent import SITE, _dispatch, _password, observer, simulated_house, site_config
from tests.test_metrics import RULES, _promtool

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def _samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _of(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"site": SITE, **labels}.items()))


async def test_a_running_agent_serves_every_edge_metric_with_sane_values(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    async with simulated_house() as house, observer(broker_files) as obs:
        devices = [
            {"name": "pv", "kind": "pv_inverter", "url": house.urls["pv"]},
            {"name": "battery", "kind": "battery", "url": house.urls["battery"]},
            {"name": "meter", "kind": "sunspec_meter", "url": house.urls["meter"]},
            # an inverter that nothing answers for: unavailable, failing polls
            {"name": "pv-dead", "kind": "pv_inverter", "url": f"tcp://127.0.0.1:{free_port()}"},
        ]
        spool = tmp_path / "spool.sqlite"
        config = site_config(house, broker_files, spool, devices=devices, metrics={"port": 0})
        async with EdgeAgent(config, house.clock, password=_password(broker_files)) as agent:
            assert agent.metrics is not None
            assert agent.metrics.port != 0
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 3)
            now = house.clock.now()
            cmd = Dispatch(ts=now, battery_power_w=-3000.0, expires_ts=now + 600)
            ack = await _dispatch(obs, cmd.model_dump_json())
            await obs.bus.publish(topics.site_topic(SITE, "award"), b"{not an award")
            await agent.bid(int(now // 900) + 2)  # no forecast yet: bid without a plan
            stats = agent.stats

            def settled() -> bool:
                """The dispatch moved the battery, the award was refused, telemetry went out."""
                return (
                    agent.snapshot.battery_w < -1000
                    and "award" in stats.rejected
                    and stats.telemetry_published >= 3
                )

            async with asyncio.timeout(10):
                while not settled():  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            text = await asyncio.to_thread(_scrape, agent.metrics.port)
            controller = agent.controller
            port = agent.metrics.port
        assert agent.metrics is None
    with pytest.raises(urllib.error.URLError, match="refused"):  # stopped with the agent
        _scrape(port)
    assert ack.outcome == "accepted"
    s = _samples(text)
    _assert_device_metrics(s)
    _assert_site_metrics(s, controller)
    _lint(text)


def _assert_device_metrics(s: Samples) -> None:
    """Per device: latency, failures, availability, setpoint writes."""
    for device in ("pv", "battery", "meter"):
        d = _of(device=device)
        count = s[("wattmesh_edge_device_poll_duration_seconds_count", d)]
        # one poll per cycle; a scrape can land after a cycle's polls and before it is counted
        cycles = s[("wattmesh_edge_poll_cycles_total", _of())]
        assert 1 <= count <= cycles + 1
        inf = _of(device=device, le="+Inf")
        assert s[("wattmesh_edge_device_poll_duration_seconds_bucket", inf)] == count
        assert 0 < s[("wattmesh_edge_device_poll_duration_seconds_sum", d)] < count * 1.0
        assert s[("wattmesh_edge_device_available", d)] == 1
        assert s[("wattmesh_edge_device_poll_failures_total", d)] == 0
    dead_labels = _of(device="pv-dead")
    assert s[("wattmesh_edge_device_available", dead_labels)] == 0
    assert s[("wattmesh_edge_device_poll_failures_total", dead_labels)] >= 1
    assert s[("wattmesh_edge_device_poll_duration_seconds_count", dead_labels)] >= 1
    assert s[("wattmesh_edge_setpoint_writes_total", _of(device="battery"))] >= 1


def _assert_site_metrics(s: Samples, controller: str) -> None:
    """Per site: cycles, broker, spool, telemetry, bids, plans, acks, rejections, controller
    and powers (as of the scrape, after a -3 kW dispatch and one refused award)."""
    site = _of()
    assert s[("wattmesh_edge_poll_cycles_total", site)] >= 3
    assert s[("wattmesh_edge_broker_connected", site)] == 1
    assert s[("wattmesh_edge_spool_messages", site)] >= 0
    assert s[("wattmesh_edge_spool_bytes", site)] >= 0
    assert s[("wattmesh_edge_spool_degraded", site)] == 0
    assert s[("wattmesh_edge_telemetry_dropped_total", site)] == 0
    assert s[("wattmesh_edge_telemetry_direct_total", site)] == 0
    spooled = s[("wattmesh_edge_telemetry_spooled_total", site)]
    assert spooled >= 3
    assert 3 <= s[("wattmesh_edge_telemetry_published_total", site)] <= spooled
    assert s[("wattmesh_edge_bids_published_total", site)] == 1
    assert s[("wattmesh_edge_plans_total", site)] == 0
    assert s[("wattmesh_edge_plan_fallbacks_total", site)] == 1
    acks = {o: s[("wattmesh_edge_dispatch_acks_total", _of(outcome=o))]
            for o in ("accepted", "clamped", "refused", "expired", "duplicate", "invalid")}  # fmt: skip
    assert acks == {"accepted": 1, "clamped": 0, "refused": 0, "expired": 0, "duplicate": 0,
                    "invalid": 0}  # fmt: skip
    assert s[("wattmesh_edge_rejected_messages_total", _of(kind="award", reason="invalid"))] == 1
    layers = {k[1]: v for k, v in s.items() if k[0] == "wattmesh_edge_controller"}
    assert sum(layers.values()) == 1
    assert layers[_of(layer=controller)] == 1
    assert controller == "dispatch"
    assert 0.4 < s[("wattmesh_edge_battery_soc_ratio", site)] < 0.6  # started at 50 %
    assert s[("wattmesh_edge_battery_power_watts", site)] < -1000  # charging as dispatched
    assert 0 <= s[("wattmesh_edge_pv_power_watts", site)] <= 6000
    assert math.isfinite(s[("wattmesh_edge_grid_power_watts", site)])


def _lint(text: str) -> None:
    lint = subprocess.run(
        [_promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_poll_latency_is_counted_into_inclusive_buckets() -> None:
    h = LatencyHistogram(bounds_s=(0.01, 0.1, 1.0))
    for duration_s in (0.002, 0.01, 0.05, 0.5, 3.0):
        h.observe(duration_s)
    assert h.counts == [2, 1, 1, 1]
    assert h.cumulative() == [(0.01, 2), (0.1, 3), (1.0, 4), (math.inf, 5)]
    assert h.count == 5
    assert h.sum_s == pytest.approx(3.562)
    assert h.last_s == 3.0
    with pytest.raises(ValueError, match="increasing"):
        LatencyHistogram(bounds_s=(1.0, 0.1))


@pytest.mark.parametrize(
    "path",
    [ROOT / "config/sites/house-1.toml", ROOT / "wattmesh/examples/community/sites/house-1.toml"],
    ids=["config", "example"],
)
def test_the_documented_metrics_section_is_off_by_default_and_parses_when_uncommented(
    path: Path,
) -> None:
    text = path.read_text()
    assert "metrics" not in tomllib.loads(text)  # off: `wattmesh up` would bind the port
    block = re.search(r"^# \[metrics\].*?(?=^\s*$)", text, re.MULTILINE | re.DOTALL)
    assert block is not None, "the site file documents [metrics]"
    section = tomllib.loads(re.sub(r"^# ?", "", block.group(0), flags=re.MULTILINE))
    assert MetricsSection.model_validate(section["metrics"]) == MetricsSection()


EDGE_RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'wattmesh_edge_device_available{{site="house-1", device="meter"}}'
        values: '1x3 0x10'
      - series: 'wattmesh_edge_device_available{{site="house-1", device="pv"}}'
        values: '1x13'
    alert_rule_test:
      - eval_time: 6m
        alertname: WattmeshEdgeDeviceUnavailable
        exp_alerts: []
      - eval_time: 10m
        alertname: WattmeshEdgeDeviceUnavailable
        exp_alerts:
          - exp_labels: {{severity: warning, site: house-1, device: meter}}
            exp_annotations:
              summary: "Device meter at site house-1 does not answer"
              description: "The agent of house-1 has not read meter for 5 minutes: check the device, its wiring and its Modbus address."
"""


def test_the_edge_device_alert_fires_after_five_minutes_unavailable(tmp_path: Path) -> None:
    tests = tmp_path / "edge_alerts_test.yml"
    tests.write_text(EDGE_RULE_TESTS.format(rules=RULES))
    result = subprocess.run(
        [_promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_a_metrics_port_in_use_stops_the_agent_starting_and_names_the_address(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = parse_edge_config(
            {
                "site": {"id": SITE},
                "broker": {"port": free_port()},  # never reached
                "devices": [{"name": "pv", "kind": "pv_inverter", "url": "tcp://127.0.0.1:1"}],
                "spool": {"path": str(tmp_path / "spool.sqlite")},
                "metrics": {"port": port},
            },
            "test-site.toml",
        )
        agent = EdgeAgent(config, WallClock(), password="unused")
        try:
            with pytest.raises(OSError, match=f"metrics: cannot listen on 127.0.0.1:{port}"):
                await agent.__aenter__()
        finally:
            agent.outbox.close()
    assert agent.metrics is None
