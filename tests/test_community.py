"""End to end: five simulated sites, their edge agents and the coordinator for a simulated day.

Real Mosquitto with auth and ACL, real Modbus (TCP and the factory's SDM630 over RTU), a real
SQLite ledger; simulated time runs 1440x (a day in a minute).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.clock import ScaledClock
from broker.mosquitto import MosquittoProcess, write_broker_config
from coordinator.config import parse_coordinator_config
from coordinator.ledger import Ledger
from coordinator.service import Coordinator
from edge.agent import EdgeAgent
from edge.config import parse_edge_config
from simulators.scenario import ScenarioRunner
from tests.broker_fixtures import free_port
from wattmesh.demo import builtin_scenario

SPEED = 1440.0
POLL_WALL_S = 0.1
IMPORT_LIMIT_W = 170_000.0
EXPORT_LIMIT_W = 220_000.0
#: The factory keeps its battery for shaving its peaks (and the coordinator's orders) rather
#: than offering it to the market: without that it would be empty by the evening shift.
FALLBACK = {"factory": {"fallback": {"import_cap_w": 150_000, "reserve_soc_pct": 100}}}
ROLES = {
    "solar-farm": "producer",
    "factory": "consumer",
    "house-1": "prosumer",
    "house-2": "consumer",
    "school": "prosumer",
}


@pytest.mark.slow
async def test_a_community_day_clears_every_interval_within_the_feeder_limit(
    broker_dir: Path, tmp_path: Path
) -> None:
    scenario = builtin_scenario()
    sites = [s.id for s in scenario.sites]
    assert len(sites) == 5
    files = write_broker_config(broker_dir, sites, port=free_port())
    clock = ScaledClock(scenario.start_ts, SPEED)
    broker = {"host": "127.0.0.1", "port": files.port}
    coordinator_config = parse_coordinator_config(
        {
            "coordinator": {
                "latitude_deg": scenario.latitude_deg,
                "longitude_deg": scenario.longitude_deg,
                "utc_offset_h": scenario.utc_offset_h,
                "ledger": str(tmp_path / "ledger.sqlite"),
            },
            "broker": {**broker, "password_env": None},
            "grid": {
                "import_limit_w": IMPORT_LIMIT_W,
                "export_limit_w": EXPORT_LIMIT_W,
                "period_s": 0.05,
                "dispatch_expiry_s": 600,
                "reissue_s": 60,
            },
        },
        "test",
    )
    day_end = scenario.start_ts + 24 * 3600
    async with (
        MosquittoProcess(files.conf, files.port),
        ScenarioRunner(scenario, clock) as runner,
        Coordinator(
            coordinator_config, clock, password=files.credentials["coordinator"]
        ) as coordinator,
    ):
        agents = []
        for site in sites:
            devices = [
                {"name": d.name, "kind": d.kind, "url": d.url, "unit": d.unit, "timeout_s": 0.5}
                for d in runner.devices
                if d.site == site
            ]
            config = parse_edge_config(
                {
                    "site": {"id": site, "role": ROLES[site], "poll_interval_s": POLL_WALL_S},
                    "broker": broker,
                    "devices": devices,
                    "spool": {"path": str(tmp_path / f"{site}.sqlite")},
                    "dispatch_revert_s": 600,
                    **FALLBACK.get(site, {}),
                },
                "test",
            )
            agents.append(EdgeAgent(config, clock, password=files.credentials[site]))
        for agent in agents:
            await agent.__aenter__()
        try:
            await asyncio.sleep(clock.sim_to_wall_s(day_end - clock.now()))
        finally:
            for agent in agents:
                await agent.__aexit__(None, None, None)
        flow_log = list(coordinator.flow_log)
        stats = coordinator.stats
        agent_stats = [a.stats for a in agents]
    intervals_in_day = 24 * 3600 // 900
    # Every interval of the day cleared (allowing the first and the last to straddle).
    assert stats.clearings >= intervals_in_day - 2
    assert stats.awards >= 5 * (intervals_in_day - 4)
    assert all(s.bids_published >= intervals_in_day - 4 for s in agent_stats)
    assert stats.invalid == 0
    # Awards reached the sites: each agent ran on its market commitment at some point.
    assert stats.settled >= intervals_in_day - 4
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.check_balanced()
        assert len(ledger.settled_intervals()) >= intervals_in_day - 4
    # The feeder: within its limits except for transients shorter than one poll plus one
    # dispatch round trip (here a few grid periods of wall time at 1440x).
    allowed_s = (POLL_WALL_S + 4 * 0.05 + 0.2) * SPEED
    longest = 0.0
    start = None
    for ts, flow in flow_log:
        over = flow > IMPORT_LIMIT_W or -flow > EXPORT_LIMIT_W
        if over and start is None:
            start = ts
        elif not over and start is not None:
            longest = max(longest, ts - start)
            start = None
    worst = max(flow_log, key=lambda x: x[1])
    assert longest <= allowed_s, (
        f"the feeder was over its limit for {longest:.0f} s (peak {worst[1]:.0f} W at "
        f"{(worst[0] - scenario.start_ts) / 3600:.1f} h)"
    )
    peak = max(flow for _, flow in flow_log)
    assert peak > 0.8 * IMPORT_LIMIT_W  # the limit mattered: the day came close to it
