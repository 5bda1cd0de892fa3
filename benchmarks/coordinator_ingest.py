"""Coordinator throughput over a real Mosquitto (auth + ACL).

1. Ingest: a separate process publishes telemetry for many sites as fast as paho allows
   (QoS 1, many in flight); the coordinator validates and ingests every message. Printed:
   messages per second one coordinator process ingests.
2. Gate closure to the last award: for 1,000 and 10,000 sites, each with a three-step bid,
   the time from the gate closing to the last award acknowledged by the broker.

Run: python benchmarks/coordinator_ingest.py [--messages 50000] [--sites 1000,10000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from broker.clock import ManualClock
from broker.messages import Bid, BidStep
from broker.mosquitto import MosquittoProcess, mosquitto_password_hash, write_broker_config
from coordinator import forecast as fc
from coordinator.config import parse_coordinator_config
from coordinator.service import HISTORY_SAMPLES, HISTORY_STEP_S, Coordinator, SiteState

ROOT = Path(__file__).resolve().parent.parent

PUBLISHER = textwrap.dedent("""
    import sys, time, json, uuid
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    port, password, n, sites = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set("loadgen", password)
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = []
    for i in range(n):
        site = f"site-{i % sites}"
        payload = json.dumps({"schema_version": 1, "id": uuid.uuid4().hex, "ts": 1.7e9 - n + i,
            "devices": [{"device": "meter", "kind": "sunspec_meter", "available": True,
                         "power_w": 1500.0}], "grid_power_w": 1500.0, "pv_power_w": 0.0,
            "battery_power_w": 0.0, "load_power_w": 1500.0})
        infos.append(c.publish(f"wattmesh/v1/site/{site}/telemetry", payload, qos=1))
    for info in infos:
        info.wait_for_publish()
    c.loop_stop()
    c.disconnect()
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _coordinator(port: int, password: str, ledger: Path, client_id: str) -> Coordinator:
    config = parse_coordinator_config(
        {
            "coordinator": {"ledger": str(ledger)},
            "broker": {"port": port, "password_env": None, "client_id": client_id},
            "market": {"interval_s": 900, "gate_s": 60},
        },
        "bench",
    )
    return Coordinator(config, ManualClock(1.7e9), password=password)


async def ingest(
    port: int, password: str, loadgen_password: str, work: Path, messages: int, sites: int
) -> float:
    coordinator = _coordinator(port, password, work / "ingest.sqlite", "bench-coordinator")
    async with coordinator:
        await coordinator.bus.wait_connected(5)
        await asyncio.sleep(0.2)
        proc = subprocess.Popen(
            [
                *(sys.executable, "-c", PUBLISHER, str(port), loadgen_password),
                *(str(messages), str(sites)),
            ]
        )
        t0 = None
        while coordinator.stats.telemetry < messages:
            if t0 is None and coordinator.stats.telemetry:
                t0, n0 = time.perf_counter(), coordinator.stats.telemetry
            await asyncio.sleep(0.01)
            if proc.poll() not in (None, 0):
                raise RuntimeError("the publisher failed")
        elapsed = time.perf_counter() - (t0 or time.perf_counter())
        proc.wait(timeout=30)
        return (messages - n0) / elapsed if elapsed > 0 else float("nan")


def fill_histories(coordinator: Coordinator, sites: int, now_ts: float) -> None:
    """Give every site a full forecasting history (what a week of 1 Hz telemetry leaves)."""
    c = coordinator.config.coordinator
    rng = np.random.default_rng(2)
    ts = now_ts - HISTORY_STEP_S * np.arange(HISTORY_SAMPLES)[::-1]
    ghi = fc.clear_sky_ghi_w_per_m2(ts, c.latitude_deg, c.longitude_deg)
    for i in range(sites):
        state = coordinator.sites.setdefault(f"site-{i}", SiteState(f"site-{i}"))
        pv = ghi * rng.uniform(2.0, 8.0)
        load = 400.0 + 300.0 * np.sin(ts / 9000.0 + i) + rng.uniform(0, 100, ts.size)
        state.history.extend(ts, np.column_stack([pv, load, ghi]))


def rss_mb() -> float:
    """This process's resident memory, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


@dataclass
class GateResult:
    to_last_award_s: float
    to_last_forecast_s: float
    longest_stall_s: float
    site_state_mb: float


async def gate_to_awards(port: int, password: str, work: Path, sites: int) -> GateResult:
    """The market loop's work at one gate for ``sites`` bidders with full histories: clear,
    publish the awards, compute and publish every forecast; and the longest the event loop
    (ingest) went without a turn meanwhile."""
    coordinator = _coordinator(port, password, work / f"gate-{sites}.sqlite", f"gate-{sites}")
    rng = np.random.default_rng(1)
    async with coordinator:
        await coordinator.bus.wait_connected(5)
        interval = int(coordinator.clock.now() // 900) + 1
        before_mb = rss_mb()
        fill_histories(coordinator, sites, coordinator.clock.now())
        site_state_mb = rss_mb() - before_mb
        bids = {}
        for i in range(sites):
            price = float(rng.uniform(0.05, 0.35))
            if i % 2:
                bid = Bid(
                    ts=1.7e9,
                    interval=interval,
                    buy=[
                        BidStep(price_per_kwh=1.0, quantity_kwh=float(rng.uniform(0.1, 2))),
                        BidStep(price_per_kwh=price, quantity_kwh=float(rng.uniform(0.1, 2))),
                    ],
                )
            else:
                bid = Bid(
                    ts=1.7e9,
                    interval=interval,
                    sell=[
                        BidStep(price_per_kwh=price, quantity_kwh=float(rng.uniform(0.1, 2))),
                        BidStep(
                            price_per_kwh=price + 0.05, quantity_kwh=float(rng.uniform(0.1, 2))
                        ),
                    ],
                )
            bids[f"site-{i}"] = bid
        coordinator.bids[interval] = bids
        stall = 0.0
        running = True

        async def watch() -> None:  # how long the loop goes without a turn
            nonlocal stall
            last = time.perf_counter()
            while running:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                stall, last = max(stall, now - last), now

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await coordinator.clear_interval(interval)  # what the market loop does at the gate
        t_award = time.perf_counter() - t0
        await coordinator.publish_forecasts(interval + 1)
        t_forecast = time.perf_counter() - t0
        running = False
        await watcher
        if coordinator.stats.forecasts != sites:
            raise RuntimeError(f"{coordinator.stats.forecasts} forecasts for {sites} sites")
        return GateResult(t_award, t_forecast, stall, site_state_mb)


async def main(messages: int, site_counts: list[int]) -> None:
    work = Path(tempfile.mkdtemp(prefix="wattmesh-bench-"))
    work.chmod(0o755)  # Mosquitto, started as root, runs as its own user and must get in
    files = write_broker_config(work / "broker", ["site-0"], port=_free_port())
    password = files.credentials["coordinator"]
    # The load generator speaks for every site: a user of its own (a client id belongs to its
    # user, so it must not be the coordinator's) that may write any site's telemetry.
    loadgen_password = "loadgen-" + password[:12]
    with files.password_file.open("a") as f:
        f.write(f"loadgen:{mosquitto_password_hash(loadgen_password)}\n")
    with files.acl_file.open("a") as f:
        f.write("\nuser loadgen\ntopic write wattmesh/v1/site/+/telemetry\n")
    async with MosquittoProcess(files.conf, files.port):
        rate = await ingest(files.port, password, loadgen_password, work, messages, 1000)
        print(f"ingest: {messages} telemetry messages from 1,000 sites, QoS 1")
        print(
            f"  {rate:,.0f} msg/s ingested by one coordinator process (goal >= 10,000) "
            f"{'met' if rate >= 10_000 else 'MISSED'}"
        )
        print("at the gate (clear, awards, then every site's forecast from a full history):")
        for sites in site_counts:
            r = await gate_to_awards(files.port, password, work, sites)
            print(
                f"  {sites:>6,} sites: last award {r.to_last_award_s * 1000:6.0f} ms "
                f"({'met' if r.to_last_award_s < 1 else 'MISSED'} goal < 1 s at 10k), "
                f"last forecast {r.to_last_forecast_s * 1000:6.0f} ms, "
                f"longest ingest stall {r.longest_stall_s * 1000:5.0f} ms, "
                f"site state {r.site_state_mb:5.0f} MB RSS"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--sites", default="1000,5000,10000")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    asyncio.run(main(args.messages, [int(x) for x in args.sites.split(",")]))
