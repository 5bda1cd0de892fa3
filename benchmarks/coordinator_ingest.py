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
from pathlib import Path

import numpy as np

from broker.clock import ManualClock
from broker.messages import Bid, BidStep
from broker.mosquitto import MosquittoProcess, mosquitto_password_hash, write_broker_config
from coordinator.config import parse_coordinator_config
from coordinator.service import Coordinator

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


async def gate_to_awards(port: int, password: str, work: Path, sites: int) -> float:
    coordinator = _coordinator(port, password, work / f"gate-{sites}.sqlite", f"gate-{sites}")
    rng = np.random.default_rng(1)
    async with coordinator:
        await coordinator.bus.wait_connected(5)
        interval = int(coordinator.clock.now() // 900) + 1
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
        t0 = time.perf_counter()
        await coordinator.clear_interval(interval)
        return time.perf_counter() - t0


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
        for sites in site_counts:
            seconds = await gate_to_awards(files.port, password, work, sites)
            print(
                f"gate closure to last award, {sites:>6,} sites: {seconds * 1000:8.0f} ms "
                f"(goal < 1 s for 10,000) {'met' if seconds < 1 else 'MISSED'}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--sites", default="1000,10000")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    asyncio.run(main(args.messages, [int(x) for x in args.sites.split(",")]))
