"""The coordinator's HTTP API: reads per second and latency, and dispatch to register change.

1. Reads: a separate process sends GET requests over 16 keep-alive connections, as fast as it
   can, for a site's statement (a ledger of 1,000 sites x 96 settled intervals: first each
   site's once, computed from the ledger as after every settlement, then again as the API
   keeps them until the ledger changes) and for the latest state of each of 1,000 sites in
   turn. Printed: requests/s, p50 and p99 latency, and the CPU share of the coordinator's
   process and of the load generator's (a bare asyncio HTTP/1.1 client: httpx's own cost
   capped it near 650 req/s). Goals: >= 1,000 req/s and p99 < 50 ms.
2. Dispatch: an operator's order through the API to a real edge agent (real time) and a
   simulated battery over Modbus TCP, from sending the request to the battery's setpoint
   register changing. Printed: p50, p99, max. Goal: p99 < 1 s.

Run: python benchmarks/api.py [--requests 5000] [--dispatches 30] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np

from broker.clock import ManualClock, WallClock
from broker.messages import DeviceReading, Telemetry
from broker.mosquitto import MosquittoProcess, write_broker_config
from coordinator.api import ApiToken, hash_token, new_token, write_tokens
from coordinator.config import parse_coordinator_config
from coordinator.service import Coordinator

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_782_043_200.0
SITES = 1000

LOADGEN = textwrap.dedent("""
    import asyncio, json, sys, time
    from urllib.parse import urlsplit
    base, token, n, conc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    paths = json.loads(sys.argv[5])
    url = urlsplit(base)

    async def get(reader, writer, path):
        writer.write(f"GET {path} HTTP/1.1\\r\\nHost: {url.netloc}\\r\\n"
                     f"Authorization: Bearer {token}\\r\\n\\r\\n".encode())
        head = (await reader.readuntil(b"\\r\\n\\r\\n")).split(b"\\r\\n")
        status, length = int(head[0].split()[1]), None
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RuntimeError(f"{path}: no Content-Length")
        body = await reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"{path}: HTTP {status} {body[:200]!r}")

    async def main():
        lat, pending, go = [], [paths[i % len(paths)] for i in reversed(range(n))], asyncio.Event()
        async def worker(i):
            reader, writer = await asyncio.open_connection(url.hostname, url.port)
            await get(reader, writer, paths[i % len(paths)])  # warm up
            await go.wait()
            while pending:
                path = pending.pop()
                t = time.perf_counter()
                await get(reader, writer, path)
                lat.append(time.perf_counter() - t)
            writer.close()
        workers = [asyncio.create_task(worker(i)) for i in range(conc)]
        await asyncio.sleep(0.5)
        cpu0, t0 = time.process_time(), time.perf_counter()
        go.set()
        await asyncio.gather(*workers)
        elapsed = time.perf_counter() - t0
        cpu = (time.process_time() - cpu0) / elapsed
        print(json.dumps({"rate": n / elapsed, "lat": lat, "cpu": cpu, "elapsed": elapsed}))
    asyncio.run(main())
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _telemetry(ts: float, grid_w: float) -> Telemetry:
    meter = DeviceReading(device="meter", kind="sunspec_meter", available=True, power_w=grid_w)
    return Telemetry(ts=ts, devices=[meter], grid_power_w=grid_w, pv_power_w=0.0,
                     battery_power_w=0.0, load_power_w=max(grid_w, 0.0))  # fmt: skip


def _settle_history(coordinator: Coordinator, intervals: int) -> None:
    rng = np.random.default_rng(1)
    k0 = int(T0 // 900) - intervals
    for k in range(k0, k0 + intervals):
        metered = {f"site-{i}": float(x) for i, x in enumerate(rng.uniform(-2, 3, SITES))}
        coordinator.ledger.settle_interval(
            k,
            clearing_price_per_kwh=0.2,
            retail_price_per_kwh=0.3,
            feed_in_price_per_kwh=0.08,
            awards_kwh={s: round(v, 1) for s, v in metered.items()},
            metered_kwh=metered,
            rebate="traded_energy",
        )


def _percentiles(lat: list[float]) -> tuple[float, float, float]:
    """Median, 99th percentile (nearest rank) and maximum, ms."""
    ms = sorted(x * 1000 for x in lat)
    return statistics.median(ms), ms[max(0, math.ceil(0.99 * len(ms)) - 1)], ms[-1]


async def reads(
    work: Path, files_port: int, password: str, n: int, profile: Path | None = None
) -> None:
    profiler = cProfile.Profile()
    tokens_file = work / "tokens.toml"
    token = new_token()
    write_tokens(tokens_file, {hash_token(token): ApiToken("bench", "viewer", hash_token(token))})
    config = parse_coordinator_config(
        {
            "coordinator": {"ledger": str(work / "reads.sqlite")},
            "broker": {"port": files_port, "password_env": None},
            "api": {"port": 0, "tokens_file": str(tokens_file)},
        },
        "bench",
    )
    c = Coordinator(config, ManualClock(T0), password=password)
    print(f"settling 96 intervals of {SITES:,} sites for the statements ...", flush=True)
    _settle_history(c, 96)
    async with c:
        for i in range(SITES):
            c.ingest_telemetry(f"site-{i}", _telemetry(T0, 500.0 + i))
        assert c.api is not None
        base = f"http://127.0.0.1:{c.api.port}"
        statements = [f"/api/v1/sites/site-{i}/statement" for i in range(SITES)]
        states = [f"/api/v1/sites/site-{i}" for i in range(SITES)]
        cases = [
            ("a site's statement, computed (first read after a settlement)", statements, SITES),
            ("a site's statement (96 intervals)", statements[::7], n),
            ("latest state, 1,000 sites in turn", states, n),
        ]
        for label, paths, count in cases:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            if profile is not None:
                profiler.enable()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", LOADGEN, base, token, str(count), "16", json.dumps(paths),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await proc.communicate()
            profiler.disable()
            server_cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
            result = json.loads(out)
            p50, p99, worst = _percentiles(result["lat"])
            rate = result["rate"]
            print(
                f"{label}: {rate:,.0f} req/s (goal >= 1,000) "
                f"{'met' if rate >= 1000 else 'MISSED'}; latency p50 {p50:.1f} ms, "
                f"p99 {p99:.1f} ms (goal < 50) {'met' if p99 < 50 else 'MISSED'}, max {worst:.1f}; "
                f"CPU: coordinator {100 * server_cpu:.0f} %, load generator "
                f"{100 * result['cpu']:.0f} % of a core",
                flush=True,
            )
    if profile is not None:
        profiler.dump_stats(profile)
        print(f"profile of the coordinator during the reads: {profile}")


async def dispatch(work: Path, files: object, n: int) -> None:
    from broker.mosquitto import BrokerFiles
    from edge.agent import EdgeAgent
    from edge.config import parse_edge_config
    from simulators.devices import BatterySim, LoadSpec, SimSite, SunSpecMeterSim
    from simulators.server import DeviceServer

    assert isinstance(files, BrokerFiles)
    tokens_file = work / "tokens-op.toml"
    token = new_token()
    write_tokens(tokens_file, {hash_token(token): ApiToken("op", "operator", hash_token(token))})
    clock = WallClock()
    site = SimSite("house-1", clock, LoadSpec("household", 300.0, 4000.0), seed=1,
                   latitude_deg=48.0, longitude_deg=11.0)  # fmt: skip
    battery = BatterySim("battery", 1, site, capacity_wh=10_000, rated_power_w=5000, soc_pct=50)
    meter = SunSpecMeterSim("meter", 1, site, max_power_w=20_000)
    config = parse_coordinator_config(
        {
            "coordinator": {"ledger": str(work / "dispatch.sqlite")},
            "broker": {"port": files.port, "password_env": None},
            "api": {"port": 0, "tokens_file": str(tokens_file)},
        },
        "bench",
    )
    async with (
        DeviceServer([battery], tcp=("127.0.0.1", 0)) as s1,
        DeviceServer([meter], tcp=("127.0.0.1", 0)) as s2,
    ):
        edge = parse_edge_config(
            {
                "site": {"id": "house-1", "poll_interval_s": 1.0},
                "broker": {"host": "127.0.0.1", "port": files.port},
                "devices": [
                    {"name": "battery", "kind": "battery", "url": s1.url},
                    {"name": "meter", "kind": "sunspec_meter", "url": s2.url},
                ],
                "spool": {"path": str(work / "spool.sqlite")},
            },
            "bench-site.toml",
        )
        coordinator = Coordinator(config, clock, password=files.credentials["coordinator"])
        async with (
            EdgeAgent(edge, clock, password=files.credentials["house-1"]),
            coordinator,
        ):
            assert coordinator.api is not None
            await asyncio.sleep(2.0)
            lat = []
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{coordinator.api.port}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            ) as http:
                for i in range(n):
                    target = -1000.0 - 100.0 * (i % 20)
                    t = time.perf_counter()
                    request = asyncio.create_task(
                        http.post("/api/v1/sites/house-1/dispatch",
                                  json={"battery_power_w": target, "duration_s": 120})
                    )  # fmt: skip
                    while battery.setpoint_w != target:  # noqa: ASYNC110 - the register is data
                        await asyncio.sleep(0.001)
                    lat.append(time.perf_counter() - t)
                    (await request).raise_for_status()
    p50, p99, worst = _percentiles(lat)
    print(
        f"dispatch through the API to the battery's register, {n} orders: p50 {p50:.0f} ms, "
        f"p99 {p99:.0f} ms (goal < 1000) {'met' if p99 < 1000 else 'MISSED'}, max {worst:.0f} ms"
    )


async def main(requests: int, dispatches: int, profile: Path | None) -> None:
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (1 min)")
    work = Path(tempfile.mkdtemp(prefix="wattmesh-bench-api-"))
    work.chmod(0o755)  # Mosquitto, started as root, runs as its own user and must get in
    files = write_broker_config(work / "broker", ["house-1"], port=_free_port())
    async with MosquittoProcess(files.conf, files.port):
        await reads(work, files.port, files.credentials["coordinator"], requests, profile)
        await dispatch(work, files, dispatches)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--dispatches", type=int, default=30)
    parser.add_argument("--profile", type=Path, help="write a cProfile of the reads here")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    asyncio.run(main(args.requests, args.dispatches, args.profile))
