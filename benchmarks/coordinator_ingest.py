"""Coordinator throughput over a real Mosquitto (auth + ACL), with 0, 2 and 4 ingest workers.

1. Ingest at full speed: two load generator processes (paho, QoS 1, many in flight) publish
   telemetry for 1,000 sites as fast as they can; the coordinator, with ``--workers`` ingest
   worker processes each (0: in its own process), validates and ingests every message.
   Printed per worker count: msg/s ingested, the share ingested (the rest: readings of a site
   that two workers handed over out of order, counted as duplicates), CPU of the coordinator,
   its workers, Mosquitto and the load generators (each as a share of one core) and the RSS of
   the coordinator and its workers.
2. At the gate under live telemetry, for 1,000, 5,000 and 10,000 sites, each with a two-step
   bid and a full forecasting history: every site sends a reading a second (load generator
   processes, one per 2,500 sites, at most 4) for ``--seconds``; 3 s in, the market loop's
   work at the gate (clear, commit, publish the awards, then compute and publish every
   forecast). Printed per site count and worker count: offered and ingested msg/s (from the
   first reading sent to the last one ingested), the share of the readings sent that was
   ingested, gate to the last award acknowledged by the broker and to the last forecast, the
   longest the coordinator's event loop went without a turn, CPU of every party (the load
   generators also as a share of the machine, and how far behind their schedule they fell),
   and RSS of the coordinator and its workers.

Issue 15 (ingest workers, coordinator/ingest.py), measured on the shared 2-core machine
(2026-12-06, load average 1-3 from other engineers' jobs; runs at load average 4-7 gave up to
3x slower gates: compare within a run). ``--messages 60000 --seconds 10``, the final code:

- full speed, 1k sites: 0 workers 5,482 msg/s (coordinator 56 %, Mosquitto 12 %, load
  generator 47 % of a core, 23 % of the machine; RSS 99 MB); 2 workers 4,588 msg/s, 97.7 %
  ingested (coordinator 10 % + workers 47 %, Mosquitto 11 %, load generator 33 %; 188 MB);
  4 workers 5,441 msg/s, 100 % (coordinator 10 % + workers 52 %; 273 MB). The run before
  (same code but for late readings, see below): 6,242 / 9,003 / 8,147 msg/s, 99.0 % ingested
  with workers; the load generators then took 34-35 % of the machine.
- at the gate, live 1 Hz telemetry (last award / last forecast / longest stall / share
  ingested / CPU coordinator + workers, Mosquitto, load generator / RSS):
  1k sites: 0 workers 123 ms / 0.7 s / 86 ms / 100 % / 19 + 0, 3, 7 % / 143 MB;
            2 workers 82 ms / 0.6 s / 138 ms / 100 % / 7 + 15, 4, 8 % / 235 MB;
            4 workers 117 ms / 0.6 s / 39 ms / 100 % / 6 + 17, 4, 7 % / 316 MB.
  5k sites: 0 workers 0.93 s / 4.0 s / 167 ms / 100 % / 76 + 0, 13, 30 % / 255 MB;
            2 workers 1.19 s / 3.4 s / 144 ms / 100 % / 28 + 50, 15, 31 % / 426 MB;
            4 workers 1.57 s / 4.9 s / 152 ms / 100 % / 29 + 58, 15, 32 % / 507 MB.
  10k sites: 0 workers 10.4 s / 14.7 s / 380 ms / 100 % / 89 + 0, 14, 47 % / 421 MB;
             2 workers 3.2 s / 13.4 s / 295 ms / 100 % / 50 + 57, 18, 63 % / 530 MB;
             4 workers 4.6 s / 13.1 s / 677 ms / 100 % / 52 + 73, 19, 48 % / 700 MB.
  The run before: 10k sites 10.6 / 2.0 / 3.4 s to the last award (0 / 2 / 4 workers), 5k
  sites 1.10 / 0.65 / 1.48 s. The load generators (2 and 4 processes at 5k and 10k) took
  15-32 % of the machine and kept their schedule within 0.2 s. With 10k sites the coordinator
  ingested 5.5-8k msg/s while the gate's work ran and caught up afterwards: every reading sent
  was ingested.

Against issue 15's goals on this machine: 10k sites with live telemetry, 100 % ingested: met
(with and without workers, after catching up); last award under 1 s after the gate at 10k:
MISSED (2.0-3.2 s with 2 workers, 10.4-10.6 s without, where in-process ingest of 10k msg/s
starves the award publication; 0.65-1.19 s at 5k); 20k msg/s ingested with workers: MISSED
(4.6-9k msg/s). Why, on 2 cores: the load generators alone need 0.3-0.7 of a core to offer
5-10k msg/s (on a real feeder they are the sites' gateways, elsewhere), Mosquitto another
0.1-0.2, the workers 0.5-0.8 (paho's read path and pydantic, as before, now in parallel
processes), the coordinator's own process about 10 us a reading (dedupe, checks, metering),
about 1 s of CPU to publish 10k awards through paho (1.35 s for 10k awards with nothing else
running, 4.6 s under the 10k msg/s load) and a core for seconds for the forecasts. Two
workers beat four: there is no third core, and each worker costs 44 MB. With workers the
coordinator's process spends 6-7 % of a core at 1k msg/s instead of 19 %, so the gate's work
finds the CPU (the workers run at nice 5 for that reason).
Out of order: Mosquitto hands each message of a shared subscription to a worker as it arrives,
round-robin, so a worker that gets less CPU for a while hands over a site's readings after
newer ones from the other. Before late readings were metered in place (the runs at load
average 4-7), 3.4-5.5 % of the 10k-site readings and up to 36 % at full speed were dropped as
duplicates; now a reading that comes within the site's last 8 is metered in its place, and
only the full-speed run lost 2.3 % (sites whose readings came 1,000 messages apart, out of
order by more than 8 of their own).

Earlier figures (issue 12; one process, no live telemetry during the gate), same machine:

- before (c0ac3a6): forecasts computed per site on the event loop from 2 days of 1-minute
  history (4 float64 ring buffers, 98 KB a site), awards and forecasts published through
  aiomqtt one future each, telemetry deduplicated by up to 5,000 ids a site.
  ingest 4,588 msg/s (coordinator 42 % of a core, Mosquitto 7 %, load generator 33 %), RSS
  200 MB; 10 minutes of 1 Hz telemetry from 1k sites: RSS 307 -> 391 MB (+27 %);
  1k sites: last award 0.21 s, last forecast 2.0 s, ingest stalled 1.7 s;
  5k sites: last award 1.79 s, last forecast 14.4 s, ingest stalled 11.6 s;
  10k sites: last award 2.71 s, last forecast 26.6 s, ingest stalled 22.0 s.
  (On a quiet machine earlier: 8,432 msg/s; last award 169 / 523 / 932 ms at 1k / 5k / 10k
  without forecasts.)
- after: forecasts vectorised across sites in a worker thread, 256 sites a call, from a week
  of 15-minute history (float32, 13 KB a site, allocated as it fills); awards built in a
  worker thread and, like the forecasts, published straight through paho
  (``BusClient.publish_burst``); telemetry deduplicated by a per-site (ts, id) high-water mark.
  ingest 4,819 msg/s (coordinator 50 %, Mosquitto 11 %, load generator 37 % of a core, 19 %
  of the machine), RSS 103 MB; 10 minutes at 1k sites: RSS 105 -> 105 MB (+0.1 %);
  1k sites: last award 88 ms, last forecast 0.45 s, longest ingest stall 35 ms;
  5k sites: last award 0.48 s, last forecast 2.1 s, longest ingest stall 112 ms;
  10k sites: last award 0.90 s, last forecast 4.1 s, longest ingest stall 172 ms.
- TCP_NODELAY costs ingest throughput (each PUBACK leaves in its own segment): interleaved
  runs of 30,000 messages, 8,452 / 10,337 msg/s without it, 7,438 / 7,018 msg/s with it.

Run: python benchmarks/coordinator_ingest.py [--messages 60000] [--sites 1000,5000,10000]
[--workers 0,2,4] [--seconds 10] [--memory-seconds 600: RSS growth over 10 minutes of 1 Hz
telemetry from --memory-sites sites, ingested directly]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from broker.clock import ManualClock
from broker.messages import Bid, BidStep, DeviceReading, Telemetry
from broker.mosquitto import (
    MosquittoProcess,
    ingest_user,
    mosquitto_password_hash,
    write_broker_config,
)
from coordinator import forecast as fc
from coordinator.config import parse_coordinator_config
from coordinator.service import HISTORY_SAMPLES, HISTORY_STEP_S, Coordinator, SiteState

ROOT = Path(__file__).resolve().parent.parent

#: A load generator at full speed: ``n`` readings for sites ``first..last-1`` in turn, QoS 1,
#: many in flight; prints what it sent and its own CPU seconds.
PUBLISHER = textwrap.dedent("""
    import sys, time, json, uuid
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    n, first, last = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = []
    sites = last - first
    for i in range(n):
        site = f"site-{first + i % sites}"
        payload = json.dumps({"schema_version": 1, "id": uuid.uuid4().hex, "ts": 1.7e9 - n + i,
            "devices": [{"device": "meter", "kind": "sunspec_meter", "available": True,
                         "power_w": 1500.0}], "grid_power_w": 1500.0, "pv_power_w": 0.0,
            "battery_power_w": 0.0, "load_power_w": 1500.0})
        infos.append(c.publish(f"wattmesh/v1/site/{site}/telemetry", payload, qos=1))
    for info in infos:
        info.wait_for_publish()
    c.loop_stop()
    c.disconnect()
    print(json.dumps({"sent": n, "cpu_s": time.process_time()}))
""")

#: A load generator of live telemetry: every site of ``first..last-1`` once a second, spread
#: evenly over the second, for ``duration`` s from wall time ``start_at``; reading ts from
#: ``ts0`` on. Prints what it sent, its CPU seconds and how far behind its schedule it fell.
LIVE_PUBLISHER = textwrap.dedent("""
    import sys, time, json, uuid
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    first, last, seconds = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    ts0, start_at = float(sys.argv[7]), float(sys.argv[8])
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    count = last - first
    topics = [f"wattmesh/v1/site/site-{first + j}/telemetry" for j in range(count)]
    body = ('"devices": [{"device": "meter", "kind": "sunspec_meter", "available": true, '
            '"power_w": 1500.0}], "grid_power_w": 1500.0, "pv_power_w": 0.0, '
            '"battery_power_w": 0.0, "load_power_w": 1500.0}')
    while time.time() < start_at:
        time.sleep(0.005)
    t0 = time.perf_counter()
    infos, late = [], 0.0
    for k in range(seconds):
        for j in range(count):
            due = k + j / count
            if j % 20 == 0:
                now = time.perf_counter() - t0
                if now < due:
                    time.sleep(due - now)
                else:
                    late = max(late, now - due)
            payload = ('{"schema_version": 1, "id": "%s", "ts": %r, ' % (uuid.uuid4().hex,
                       ts0 + due)) + body
            infos.append(c.publish(topics[j], payload, qos=1))
    for info in infos:
        info.wait_for_publish()
    c.loop_stop()
    c.disconnect()
    print(json.dumps({"sent": len(infos), "cpu_s": time.process_time(), "late_s": late}))
""")

#: Load generator users (each its own broker user: a client id belongs to one user).
LOADGEN_USERS = 4


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _coordinator(
    port: int,
    passwords: dict[str, str],
    ledger: Path,
    workers: int = 0,
) -> Coordinator:
    config = parse_coordinator_config(
        {
            "coordinator": {"ledger": str(ledger), "ingest_workers": workers},
            "broker": {"port": port, "password_env": None},
            "market": {"interval_s": 900, "gate_s": 60},
        },
        "bench",
    )
    return Coordinator(
        config,
        ManualClock(1.7e9),
        password=passwords["coordinator"],
        ingest_password=passwords[ingest_user("coordinator", 1)] if workers else None,
    )


def wipe_sessions(port: int, passwords: dict[str, str], users: list[str]) -> None:
    """End the persistent sessions of ``users`` (what one run left queued must not reach the
    next): connect each with a clean start and no session expiry, then disconnect."""
    for user in users:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
        c.username_pw_set(user, passwords[user])
        c.connect("127.0.0.1", port, clean_start=True)
        c.loop_start()
        deadline = time.monotonic() + 5
        while not c.is_connected() and time.monotonic() < deadline:
            time.sleep(0.01)
        c.disconnect()
        c.loop_stop()


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int | str = "self", key: str = "VmRSS") -> float:
    """A process's resident memory (``VmHWM``: its peak), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class Cpu:
    """CPU seconds used by the coordinator (this process), its workers and Mosquitto."""

    def __init__(self, coordinator: Coordinator, broker_pid: int) -> None:
        self.pids = [p for p in (coordinator.ingest.pids() if coordinator.ingest else []) if p]
        self.broker_pid = broker_pid
        self.main0 = time.process_time()
        self.workers0 = sum(proc_cpu_s(p) for p in self.pids)
        self.broker0 = proc_cpu_s(broker_pid)
        self.wall0 = time.perf_counter()

    def shares(self) -> tuple[float, float, float, float]:
        """(wall s, main, workers, Mosquitto as shares of one core) since creation."""
        wall = time.perf_counter() - self.wall0
        main = (time.process_time() - self.main0) / wall
        workers = (sum(proc_cpu_s(p) for p in self.pids) - self.workers0) / wall
        return wall, main, workers, (proc_cpu_s(self.broker_pid) - self.broker0) / wall

    def rss_mb(self) -> float:
        """RSS of the coordinator and its workers, MB."""
        return rss_mb() + sum(rss_mb(p) for p in self.pids)


def _loadgen_results(
    procs: list[subprocess.Popen[str]], timeout_s: float
) -> tuple[int, float, float]:
    """(messages sent, CPU seconds, most seconds behind schedule) of the finished load
    generators."""
    sent, cpu, late = 0, 0.0, 0.0
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError("a load generator failed")
        result = json.loads(out.strip().splitlines()[-1])
        sent += int(result["sent"])
        cpu += float(result["cpu_s"])
        late = max(late, float(result.get("late_s", 0.0)))
    return sent, cpu, late


async def _started(coordinator: Coordinator) -> None:
    await coordinator.bus.wait_connected(10)
    pool = coordinator.ingest
    async with asyncio.timeout(30):
        while pool is not None and pool.connected < len(pool.workers):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)


@dataclass
class IngestResult:
    rate_per_s: float
    fraction: float
    #: CPU used over the run, as a share of one core, and RSS at the end, MB.
    main_cpu: float
    workers_cpu: float
    broker_cpu: float
    loadgen_cpu: float
    rss_mb: float
    wall_s: float


async def ingest(
    broker: MosquittoProcess,
    passwords: dict[str, str],
    work: Path,
    messages: int,
    sites: int,
    workers: int,
    loadgens: int,
) -> IngestResult:
    """Telemetry from ``loadgens`` processes as fast as they go, into a coordinator with
    ``workers`` ingest workers."""
    port = broker.port
    await asyncio.sleep(0.5)  # the previous run's client callbacks run out first
    users = [u for u in passwords if u.startswith("coordinator")]
    await asyncio.to_thread(wipe_sessions, port, passwords, users)
    coordinator = _coordinator(port, passwords, work / f"ingest-{workers}.sqlite", workers)
    async with coordinator:
        await _started(coordinator)
        cpu = Cpu(coordinator, broker.pid or 0)
        per = messages // loadgens
        procs = [
            subprocess.Popen(
                [
                    *(sys.executable, "-c", PUBLISHER, str(port), f"loadgen-{g + 1}"),
                    passwords[f"loadgen-{g + 1}"],
                    *(str(per), str(g * sites // loadgens), str((g + 1) * sites // loadgens)),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for g in range(loadgens)
        ]
        total = per * loadgens
        t0 = n0 = None
        last_change, last_n = time.perf_counter(), 0
        while True:
            n = coordinator.stats.telemetry + coordinator.stats.duplicates
            now = time.perf_counter()
            if t0 is None and n:
                t0, n0 = now, n
            if n != last_n:
                last_change, last_n = now, n
            if n >= total or (all(p.poll() is not None for p in procs) and now - last_change > 3):
                break
            await asyncio.sleep(0.01)
        elapsed = last_change - (t0 or last_change)
        wall, main, workers_cpu, broker_cpu = cpu.shares()
        _, loadgen_cpu, _ = _loadgen_results(procs, 60)
        return IngestResult(
            rate_per_s=(coordinator.stats.telemetry - (n0 or 0)) / elapsed if elapsed else 0,
            fraction=coordinator.stats.telemetry / total,
            main_cpu=main,
            workers_cpu=workers_cpu,
            broker_cpu=broker_cpu,
            loadgen_cpu=loadgen_cpu / wall,
            rss_mb=cpu.rss_mb(),
            wall_s=wall,
        )


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


def _bids(sites: int, interval: int) -> dict[str, Bid]:
    """A two-step bid from every site, half buying, half selling."""
    rng = np.random.default_rng(1)
    bids = {}
    for i in range(sites):
        price = float(rng.uniform(0.05, 0.35))
        q1, q2 = float(rng.uniform(0.1, 2)), float(rng.uniform(0.1, 2))
        if i % 2:
            steps = [BidStep(price_per_kwh=1.0, quantity_kwh=q1)]
            steps.append(BidStep(price_per_kwh=price, quantity_kwh=q2))
            bids[f"site-{i}"] = Bid(ts=1.7e9, interval=interval, buy=steps)
        else:
            steps = [BidStep(price_per_kwh=price, quantity_kwh=q1)]
            steps.append(BidStep(price_per_kwh=price + 0.05, quantity_kwh=q2))
            bids[f"site-{i}"] = Bid(ts=1.7e9, interval=interval, sell=steps)
    return bids


@dataclass
class GateResult:
    offered_per_s: float
    rate_per_s: float
    fraction: float
    to_last_award_s: float
    to_last_forecast_s: float
    longest_stall_s: float
    main_cpu: float
    workers_cpu: float
    broker_cpu: float
    loadgen_cpu: float
    loadgen_late_s: float
    rss_mb: float


class StallWatch:
    """The longest the event loop (which ingests) goes without a turn inside ``async with``."""

    def __init__(self) -> None:
        self.longest_s = 0.0
        self._running = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StallWatch:
        self._running = True
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *_: object) -> None:
        self._running = False
        if self._task is not None:
            await self._task

    async def _watch(self) -> None:
        last = time.perf_counter()
        while self._running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.longest_s, last = max(self.longest_s, now - last), now


def _live_loadgens(
    port: int, passwords: dict[str, str], sites: int, loadgens: int, seconds: int, start_at: float
) -> list[subprocess.Popen[str]]:
    """``loadgens`` processes sending 1 Hz telemetry of ``sites`` sites between them."""
    return [
        subprocess.Popen(
            [
                *(sys.executable, "-c", LIVE_PUBLISHER, str(port), f"loadgen-{g + 1}"),
                passwords[f"loadgen-{g + 1}"],
                *(str(g * sites // loadgens), str((g + 1) * sites // loadgens)),
                *(str(seconds), repr(1.7e9 - seconds - 5), repr(start_at)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for g in range(loadgens)
    ]


async def gate_under_load(
    broker: MosquittoProcess,
    passwords: dict[str, str],
    work: Path,
    sites: int,
    workers: int,
    loadgens: int,
    seconds: int,
) -> GateResult:
    """The market loop's work at one gate for ``sites`` bidders with full histories (clear,
    publish the awards, compute and publish every forecast) while every site sends a reading
    a second; ingest rate and share ingested, CPU of every party and RSS over the live load."""
    port = broker.port
    await asyncio.sleep(0.5)  # the previous run's client callbacks run out first
    users = [u for u in passwords if u.startswith("coordinator")]
    await asyncio.to_thread(wipe_sessions, port, passwords, users)
    coordinator = _coordinator(port, passwords, work / f"gate-{sites}-{workers}.sqlite", workers)
    async with coordinator:
        await _started(coordinator)
        interval = int(coordinator.clock.now() // 900) + 1
        fill_histories(coordinator, sites, coordinator.clock.now())
        coordinator.bids[interval] = _bids(sites, interval)
        start_at = time.time() + 1.0
        procs = _live_loadgens(port, passwords, sites, loadgens, seconds, start_at)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu = Cpu(coordinator, broker.pid or 0)
        n0 = coordinator.stats.telemetry
        last_change = [time.perf_counter(), n0]  # when the count last moved, and to what

        async def progress() -> None:
            while True:
                await asyncio.sleep(0.02)
                if coordinator.stats.telemetry != last_change[1]:
                    last_change[:] = [time.perf_counter(), coordinator.stats.telemetry]

        counting = asyncio.create_task(progress())

        await asyncio.sleep(min(3.0, seconds / 3))  # the load runs before the gate
        async with StallWatch() as stall:
            t0 = time.perf_counter()
            await coordinator.clear_interval(interval)  # what the market loop does at the gate
            t_award = time.perf_counter() - t0
            await coordinator.publish_forecasts(interval + 1)
            t_forecast = time.perf_counter() - t0
        while any(p.poll() is None for p in procs):  # noqa: ASYNC110 - processes, not tasks
            await asyncio.sleep(0.05)
        load_wall, main, workers_cpu, broker_cpu = cpu.shares()
        rss = cpu.rss_mb()
        sent, loadgen_cpu, late = _loadgen_results(procs, 10)
        # What is still queued comes in, or nothing more does.
        while coordinator.stats.telemetry - n0 < sent:
            if time.perf_counter() - last_change[0] > 3:
                break
            await asyncio.sleep(0.05)
        counting.cancel()
        # from the first reading sent to the last one ingested
        rate = (last_change[1] - n0) / (last_change[0] - cpu.wall0)
        if coordinator.stats.forecasts != sites:
            raise RuntimeError(f"{coordinator.stats.forecasts} forecasts for {sites} sites")
        return GateResult(
            offered_per_s=sent / seconds,
            rate_per_s=rate,
            fraction=(coordinator.stats.telemetry - n0) / sent,
            to_last_award_s=t_award,
            to_last_forecast_s=t_forecast,
            longest_stall_s=stall.longest_s,
            main_cpu=main,
            workers_cpu=workers_cpu,
            broker_cpu=broker_cpu,
            loadgen_cpu=loadgen_cpu / load_wall,
            loadgen_late_s=late,
            rss_mb=rss,
        )


def memory_growth(sites: int, seconds: int, work: Path) -> tuple[float, float, int]:
    """RSS (MB) after the first minute and at the end of ``seconds`` of 1 Hz telemetry from
    ``sites`` sites, ingested directly (no broker: the state, not the transport), and the
    readings accepted."""
    coordinator = _coordinator(1, "unused", work / "memory.sqlite", "memory")
    clock = coordinator.clock
    assert isinstance(clock, ManualClock)
    devices = [DeviceReading(device="meter", kind="sunspec_meter", available=True, power_w=1e3)]
    start = clock.ts
    after_first_minute = 0.0
    for t in range(seconds):
        clock.ts = start + t
        for i in range(sites):
            reading = Telemetry(
                ts=clock.ts,
                devices=devices,
                grid_power_w=1000.0 + i,
                pv_power_w=0.0,
                load_power_w=1000.0 + i,
            )
            coordinator.ingest_telemetry(f"site-{i}", reading)
        if t == 60:
            after_first_minute = rss_mb()
    coordinator.ledger.close()
    return after_first_minute, rss_mb(), coordinator.stats.telemetry


def _cpu_line(main: float, workers: float, broker: float, loadgen: float) -> str:
    cores = os.cpu_count() or 1
    return (
        f"CPU (% of one core) coordinator {100 * main:.0f} + workers {100 * workers:.0f}, "
        f"Mosquitto {100 * broker:.0f}, load generator {100 * loadgen:.0f} "
        f"({100 * loadgen / cores:.0f} % of the {cores}-core machine)"
    )


async def main(
    messages: int,
    site_counts: list[int],
    workers_list: list[int],
    seconds: int,
    memory_sites: int,
    memory_seconds: int,
) -> None:
    work = Path(tempfile.mkdtemp(prefix="wattmesh-bench-"))
    work.chmod(0o755)  # Mosquitto, started as root, runs as its own user and must get in
    files = write_broker_config(
        work / "broker", ["site-0"], port=_free_port(), ingest_workers=max(workers_list)
    )
    passwords = dict(files.credentials)
    # The load generators speak for every site: users of their own (a client id belongs to its
    # user, so they must not be the coordinator's) that may write any site's telemetry.
    with files.password_file.open("a") as pw, files.acl_file.open("a") as acl:
        for g in range(1, LOADGEN_USERS + 1):
            passwords[f"loadgen-{g}"] = f"loadgen-{g}-" + passwords["coordinator"][:12]
            pw.write(f"loadgen-{g}:{mosquitto_password_hash(passwords[f'loadgen-{g}'])}\n")
            acl.write(f"\nuser loadgen-{g}\ntopic write wattmesh/v1/site/+/telemetry\n")
    async with MosquittoProcess(files.conf, files.port) as broker:
        print(f"ingest: {messages:,} telemetry messages from 1,000 sites as fast as 2 load "
              "generator processes send them, QoS 1")
        for workers in workers_list:
            r = await ingest(broker, passwords, work, messages, 1000, workers, 2)
            print(
                f"  {workers} workers: {r.rate_per_s:7,.0f} msg/s, {100 * r.fraction:5.1f} % "
                f"ingested; {_cpu_line(r.main_cpu, r.workers_cpu, r.broker_cpu, r.loadgen_cpu)}"
                f"; RSS {r.rss_mb:.0f} MB (coordinator + workers) over {r.wall_s:.1f} s"
            )
        print(
            f"at the gate with live telemetry: every site sends a reading a second for "
            f"{seconds} s; 3 s in, the gate: clear, awards, then every site's forecast from a "
            "full history"
        )
        for sites in site_counts:
            loadgens = min(LOADGEN_USERS, max(1, sites // 2500))
            for workers in workers_list:
                r = await gate_under_load(
                    broker, passwords, work, sites, workers, loadgens, seconds
                )
                cpu = _cpu_line(r.main_cpu, r.workers_cpu, r.broker_cpu, r.loadgen_cpu)
                print(
                    f"  {sites:>6,} sites, {workers} workers: offered {r.offered_per_s:6,.0f} "
                    f"msg/s, ingested {r.rate_per_s:6,.0f} msg/s, "
                    f"{100 * r.fraction:5.1f} % ingested; gate to last award "
                    f"{r.to_last_award_s * 1000:5.0f} ms, to last forecast "
                    f"{r.to_last_forecast_s:4.1f} s, longest stall "
                    f"{r.longest_stall_s * 1000:4.0f} ms; {cpu} ({loadgens} processes, at "
                    f"most {r.loadgen_late_s:.1f} s behind schedule); RSS {r.rss_mb:.0f} MB"
                )
        if memory_sites and memory_seconds > 60:
            first, last, accepted = memory_growth(memory_sites, memory_seconds, work)
            growth = 100.0 * (last - first) / first
            print(
                f"memory: {memory_seconds} s of 1 Hz telemetry from {memory_sites:,} sites "
                f"({accepted:,} readings, ingested directly): RSS {first:.0f} MB after the "
                f"first minute, {last:.0f} MB at the end: {growth:+.1f} % (goal < 5 %) "
                f"{'met' if growth < 5 else 'MISSED'}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--sites", default="1000,5000,10000")
    parser.add_argument("--workers", default="0,2,4", help="ingest workers to compare")
    parser.add_argument("--seconds", type=int, default=10, help="of live telemetry a gate")
    parser.add_argument("--memory-sites", type=int, default=1000)
    parser.add_argument("--memory-seconds", type=int, default=0, help="600: ten minutes")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    asyncio.run(
        main(
            args.messages,
            [int(x) for x in args.sites.split(",") if x],
            [int(x) for x in args.workers.split(",") if x],
            args.seconds,
            args.memory_sites,
            args.memory_seconds,
        )
    )
