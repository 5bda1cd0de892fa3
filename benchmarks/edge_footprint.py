"""The edge agent's footprint and throughput, as separate processes over real wires.

1. A three-device site (PV inverter, battery, SunSpec meter) runs under `wattmesh sim run` in
   its own process; `wattmesh edge run` polls it at 1 Hz for --duration seconds against a real
   Mosquitto with auth and ACL. Printed: the agent's CPU share of one core and its peak RSS
   (from /proc), and the telemetry the coordinator's subscriber received.
2. The telemetry rate one agent process sustains: its spool is filled with --messages
   telemetry messages (as after a long broker outage) and the agent publishes them all with
   QoS 1; printed: messages per second until the subscriber has every one.

Run: python benchmarks/edge_footprint.py [--duration 60] [--messages 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from broker import topics
from broker.client import BusClient, BusSettings
from broker.messages import DeviceReading, Telemetry
from broker.mosquitto import BrokerFiles, MosquittoProcess, write_broker_config
from edge.spool import Spool

ROOT = Path(__file__).resolve().parent.parent
SITE = "bench"
SCENARIO = """
name = "footprint"
start = 2026-06-21T06:00:00Z
speed = 1.0
latitude_deg = 48.0
longitude_deg = 11.0

[[sites]]
id = "bench"
load = { profile = "household", base_w = 300, peak_w = 4000 }
devices = [
  { name = "pv", kind = "pv_inverter", rated_ac_w = 6000 },
  { name = "battery", kind = "battery", capacity_wh = 10000, rated_power_w = 5000 },
  { name = "meter", kind = "sunspec_meter", max_power_w = 20000 },
]
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def _proc_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _site_file(directory: Path, port: int, urls: dict[str, str], poll_s: float) -> Path:
    path = directory / "bench.toml"
    devices = "".join(
        f'\n[[devices]]\nname = "{name}"\nkind = "{kind}"\nurl = "{urls[name]}"\n'
        for name, kind in (
            ("pv", "pv_inverter"),
            ("battery", "battery"),
            ("meter", "sunspec_meter"),
        )
    )
    path.write_text(f"""
[site]
id = "{SITE}"
poll_interval_s = {poll_s}

[broker]
port = {port}
password_env = "BENCH_MQTT_PASSWORD"
{devices}
[spool]
path = "spool.sqlite"
max_messages = 1000000
""")
    return path


async def _subscriber(port: int, password: str, received: list[bytes]) -> BusClient:
    async def handle(topic: str, payload: bytes) -> None:
        if topic.endswith("/telemetry"):
            received.append(payload)

    bus = BusClient(
        BusSettings(
            port=port, username="coordinator", password=password, client_id="bench-coordinator"
        ),
        handler=handle,
    )
    await bus.__aenter__()
    await bus.subscribe(topics.site_wildcard("telemetry"))
    await bus.wait_connected(5)
    return bus


async def main(duration_s: float, messages: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="wattmesh-bench-"))
    work.chmod(0o755)  # Mosquitto, started as root, runs as its own user and must get in
    files = write_broker_config(work / "broker", [SITE], port=_free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_MQTT_PASSWORD": files.credentials[SITE]}
    (work / "scenario.toml").write_text(SCENARIO)
    sim = subprocess.Popen(
        [sys.executable, "-m", "wattmesh", "sim", "run", str(work / "scenario.toml"), "--quiet"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        await _measure(work, files, env, sim, duration_s, messages)
    finally:
        sim.terminate()
        sim.wait(timeout=10)


async def _measure(
    work: Path,
    files: BrokerFiles,
    env: dict[str, str],
    sim: subprocess.Popen[str],
    duration_s: float,
    messages: int,
) -> None:
    assert sim.stdout is not None
    urls = {}
    for _ in range(3):
        name, _kind, url, _unit = sim.stdout.readline().split()
        urls[name] = url
    async with MosquittoProcess(files.conf, files.port) as _broker:
        received: list[bytes] = []
        bus = await _subscriber(files.port, files.credentials["coordinator"], received)
        try:
            # 1. Footprint at 1 Hz.
            site = _site_file(work, files.port, urls, 1.0)
            agent = subprocess.Popen(
                [sys.executable, "-m", "wattmesh", "edge", "run", str(site)],
                env=env,
                cwd=work,
                stderr=subprocess.DEVNULL,
            )
            await asyncio.sleep(3.0)  # start-up (imports, discovery) is not steady state
            cpu0, t0, n0 = _proc_cpu_s(agent.pid), time.monotonic(), len(received)
            print(f"polling a three-device site at 1 Hz for {duration_s:.0f} s ...", flush=True)
            await asyncio.sleep(duration_s)
            cpu = _proc_cpu_s(agent.pid) - cpu0
            wall = time.monotonic() - t0
            peak_mb = _proc_peak_rss_mb(agent.pid)
            got = len(received) - n0
            agent.terminate()
            agent.wait(timeout=15)
            share = 100.0 * cpu / wall
            print(
                f"  CPU share of one core  {share:6.2f} %   (goal < 3 %)  "
                f"{'met' if share < 3 else 'MISSED'}"
            )
            print(
                f"  peak RSS               {peak_mb:6.1f} MB  (goal < 80 MB) "
                f"{'met' if peak_mb < 80 else 'MISSED'}"
            )
            print(f"  telemetry received     {got} messages in {wall:.0f} s")

            # 2. Sustained telemetry rate: a full spool published by one agent process.
            spool_path = work / "spool.sqlite"
            payload = Telemetry(
                ts=1.0,
                devices=[
                    DeviceReading(device=n, kind=k, available=True, power_w=1234.5)  # type: ignore[arg-type]
                    for n, k in (
                        ("pv", "pv_inverter"),
                        ("battery", "battery"),
                        ("meter", "sunspec_meter"),
                    )
                ],
            ).model_dump_json(exclude_none=True)
            with Spool(spool_path, max_messages=messages + 10) as spool:
                spool.append_many(
                    (
                        topics.site_topic(SITE, "telemetry"),
                        payload.replace('"ts":1.0', f'"ts":{1e9 + i}').encode(),
                        1e9 + i,
                    )
                    for i in range(messages)
                )
                pending = len(spool)
            received.clear()
            slow = _site_file(work, files.port, urls, 60.0)  # polling out of the way
            agent = subprocess.Popen(
                [sys.executable, "-m", "wattmesh", "edge", "run", str(slow)],
                env=env,
                cwd=work,
                stderr=subprocess.DEVNULL,
            )
            t0 = time.monotonic()
            first_ts = None
            while len(received) < pending and time.monotonic() - t0 < 120:
                if received and first_ts is None:
                    first_ts = time.monotonic()
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - (first_ts or t0)
            agent.terminate()
            agent.wait(timeout=15)
            rate = len(received) / elapsed if elapsed > 0 else 0.0
            print(
                f"\none agent process published {len(received)} of {pending} spooled "
                f"telemetry messages (QoS 1) in {elapsed:.2f} s"
            )
            print(
                f"  sustained telemetry rate {rate:8.0f} msg/s (goal >= 2,000) "
                f"{'met' if rate >= 2000 else 'MISSED'}"
            )
        finally:
            await bus.__aexit__(None, None, None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds at 1 Hz")
    parser.add_argument("--messages", type=int, default=20_000, help="spooled messages")
    args = parser.parse_args()
    asyncio.run(main(args.duration, args.messages))
