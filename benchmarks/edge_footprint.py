"""The edge agent's footprint and throughput, as separate processes over real wires.

0. Start-up: --runs fresh interpreters each import the agent exactly as its service path does
   (``wattmesh.entry``, then :func:`wattmesh.edge_service.import_agent`); printed: the import's
   wall time (median and best run) and CPU time, the peak RSS after it, the number of modules
   and any module the service path must not load. A second figure adds the site planner's
   first solve (highspy and one small plan through :func:`edge.plan.plan_site`, as the agent
   does once it has a forecast); for comparison, the same import through the full command line
   (``wattmesh.cli``), which is what ``wattmesh edge run`` loaded before the lean path.
   Then where the memory goes: each library the agent uses imported alone in fresh
   interpreters (MB over the bare interpreter), all of them together without one line of
   wattmesh, and the agent; as RSS (/proc/self/status VmRSS) split into anonymous pages (the
   process's own) and file-backed ones (mapped library code, shared with every process that
   maps the same file), Pss (smaps_rollup: anonymous plus a share of the file pages), and the
   import's CPU time. wattmesh's packages are compiled to bytecode first, as an install does
   (a checkout run with PYTHONDONTWRITEBYTECODE would compile them on every start: +0.04 s).
1. A three-device site (PV inverter, battery, SunSpec meter) runs under `wattmesh sim run` in
   its own process; `wattmesh edge run` polls it at 1 Hz for --duration seconds against a real
   Mosquitto with auth and ACL, twice: with planning off, and with planning on and a forecast
   (retained, as the coordinator publishes it) on a one-minute market, so the agent loads the
   solver and plans 96 steps every minute (a deployed agent plans every 15 minutes). Printed:
   the agent's CPU share of one core, its peak RSS, RSS (anonymous, file-backed) and Pss,
   threads, plans made and the telemetry the coordinator's subscriber received.
2. The telemetry rate one agent process sustains: its spool is filled with --messages
   telemetry messages (as after a long broker outage) and the agent publishes them all with
   QoS 1; printed: messages per second until the subscriber has every one.

Run: python benchmarks/edge_footprint.py [--duration 60] [--messages 20000] [--runs 7]
[--startup-only]
Goals (issue 15): import under 0.25 s, RSS under 45 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from broker import topics
from broker.client import BusClient, BusSettings
from broker.messages import DeviceReading, Forecast, Telemetry
from broker.mosquitto import BrokerFiles, MosquittoProcess, write_broker_config
from edge.spool import Spool
from wattmesh.edge_service import AGENT_ENVIRONMENT

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


#: Top-level packages the agent's service path must not load at start-up (the site planner
#: needs only highspy, never scipy); tests/test_lean_edge.py checks the same.
NOT_ON_THE_SERVICE_PATH = (
    "simulators", "coordinator", "rich", "typer", "click", "cryptography", "scipy",
    "prometheus_client",  # only with [metrics] (edge/metrics.py)
)  # fmt: skip

def memory_mb(pid: str = "self") -> dict[str, float]:
    """Process ``pid``'s memory, MB: ``rss`` and ``peak`` (VmRSS, VmHWM); ``anon`` (RssAnon:
    the process's own memory, Python's objects and the libraries' heaps, private to it) and
    ``file`` (RssFile: pages of mapped files, i.e. the libraries' code, shared with every
    process that maps the same file and dropped by the kernel under pressure); ``pss``
    (smaps_rollup: ``anon`` plus a share of each file page split between the processes that
    map it). Builtins only: it also runs, as source, in the fresh interpreters of part 0."""
    keys = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file", "Pss": "pss"}
    out = {}
    for name in ("status", "smaps_rollup"):
        with open(f"/proc/{pid}/{name}") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key in keys:
                    out[keys[key]] = int(value.split()[0]) / 1024
    return out


#: Run in a fresh interpreter: import as the service path does, then as the planner's first
#: solve does; one JSON line of figures.
_STARTUP = """
import json, sys, time
{memory_mb}
wall, cpu = time.perf_counter(), time.process_time()
{imports}
out = {{"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
       "memory": memory_mb(), "modules": sorted(sys.modules)}}
if {plan}:
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        import highspy
    except ImportError:
        out["plan"] = None
    else:
        from edge.plan import PlanBattery, plan_site
        plan_site([0.5, -0.5, 0.5, 0.2], 0.3, 0.1, PlanBattery(1.0, 0.0, 2.0, 1.0, 1.0),
                  step_h=0.25, stored_value_per_kwh=0.2)
        out["plan"] = {{"wall_s": time.perf_counter() - wall,
                        "cpu_s": time.process_time() - cpu, "memory": memory_mb(),
                        "scipy": "scipy" in sys.modules}}
print(json.dumps(out))
"""
LEAN_IMPORTS = (
    "import wattmesh.entry\nfrom wattmesh.edge_service import import_agent\nimport_agent()"
)
FULL_IMPORTS = "import wattmesh.cli\nimport edge.agent, edge.config"

#: Each library the agent's service path imports, alone (its first use where the import
#: leaves work to it: pydantic builds a model, highspy makes a solver).
LIBRARIES = {
    "asyncio (with ssl)": "import asyncio",
    "sqlite3": "import sqlite3",
    "numpy": "import numpy",
    "pydantic, one model": (
        "from pydantic import BaseModel\nclass M(BaseModel):\n    x: int\nM(x=1)"
    ),
    "aiomqtt and paho": "import aiomqtt",
    "pymodbus client": "from pymodbus.client import AsyncModbusTcpClient",
    "highspy, a solver": "import highspy\nhighspy._core._Highs()",
}
#: All of them that the agent imports at start (highspy waits for a forecast), no wattmesh.
AGENT_LIBRARIES = "\n".join(v for k, v in LIBRARIES.items() if not k.startswith("highspy"))


def _startup_runs(
    imports: str, runs: int, plan: bool, agent_environment: bool = False
) -> list[dict[str, object]]:
    """``runs`` fresh interpreters importing ``imports``; their figures. The variables
    ``import_agent`` sets are its to set (and measured), unless ``agent_environment`` asks for
    them from the start (libraries measured without the agent, as the agent has them)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name, value in AGENT_ENVIRONMENT.items():
        if agent_environment:
            env[name] = value
        else:
            env.pop(name, None)
    code = _STARTUP.format(
        memory_mb=inspect.getsource(memory_mb), imports=imports, plan=plan
    )
    return [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout.splitlines()[-1]
        )
        for _ in range(runs)
    ]


def _median_memory(figures: list[dict[str, object]]) -> dict[str, float]:
    memories: list[dict[str, float]] = [f["memory"] for f in figures]  # type: ignore[misc]
    return {key: statistics.median(m[key] for m in memories) for key in memories[0]}


def _startup_line(label: str, figures: list[dict[str, object]], what: str = "import") -> str:
    walls = [float(str(f["wall_s"])) for f in figures]
    cpus = [float(str(f["cpu_s"])) for f in figures]
    peak = max(m["peak"] for m in (f["memory"] for f in figures))  # type: ignore[index]
    return (
        f"  {label:<28} {what} {statistics.median(walls):5.3f} s median, {min(walls):5.3f} s best"
        f", CPU {statistics.median(cpus):5.3f} s; peak RSS {peak:5.1f} MB"
    )


def _memory_line(
    label: str,
    figures: list[dict[str, object]],
    over: list[dict[str, object]] | None,
    cpu_is_extra: bool = False,
) -> str:
    """``label``, then median RSS, anonymous, file-backed and Pss MB and import CPU s (each
    over ``over``'s when given; ``cpu_is_extra``: the figures' CPU already is)."""
    memory = _median_memory(figures)
    cpu = statistics.median(float(str(f["cpu_s"])) for f in figures)
    keys = ("rss", "anon", "file", "pss")
    if over is None:
        return f"  {label:<44}" + "".join(f"{memory[k]:8.1f}" for k in keys) + f"{cpu:8.3f}"
    base = _median_memory(over)
    base_cpu = 0.0 if cpu_is_extra else statistics.median(float(str(f["cpu_s"])) for f in over)
    return (
        f"  {label:<44}"
        + "".join(f"{memory[k] - base[k]:+8.1f}" for k in keys)
        + f"{cpu - base_cpu:+8.3f}"
    )


def breakdown(
    runs: int, agent: list[dict[str, object]], planner: list[dict[str, object]] | None
) -> None:
    """Where the agent's memory goes (see the docstring), medians of ``runs`` interpreters."""
    print(f"\nafter import, median of {runs} fresh interpreters each: MB, CPU s")
    print(f"  {'':<44}{'RSS':>8}{'anon':>8}{'file':>8}{'Pss':>8}{'CPU':>8}")
    bare = _startup_runs("pass", runs, plan=False, agent_environment=True)
    print(_memory_line("bare interpreter", bare, None))
    for label, imports in LIBRARIES.items():
        alone = _startup_runs(imports, runs, plan=False, agent_environment=True)
        print(_memory_line(f"+ {label}, alone", alone, bare))
    libraries = _startup_runs(AGENT_LIBRARIES, runs, plan=False, agent_environment=True)
    print(_memory_line("the agent's libraries together, no wattmesh", libraries, None))
    print(_memory_line("the agent (service path)", agent, None))
    print(_memory_line("  of which wattmesh's own", agent, libraries))
    if planner is not None:
        print(_memory_line("+ the planner's solver and a first solve", planner, agent, True))
    print(
        "  alone: over the bare interpreter, so what two share (e.g. ssl) is in both. anon: the "
        "process's own;\n  file: mapped library code, shared between processes; Pss: anon plus "
        "its share of the file pages."
    )


def startup(runs: int) -> None:
    """Part 0: the agent's import time and memory before it does anything (see the docstring)."""
    for package in ("broker", "drivers", "edge", "wattmesh"):  # as pip install does
        compileall.compile_dir(ROOT / package, quiet=1)
    python = sys.version.split()[0]
    print(f"start-up, {runs} fresh interpreters each (Python {python}, {os.cpu_count()} CPUs)")
    lean = _startup_runs(LEAN_IMPORTS, runs, plan=True)
    print(_startup_line("service path", lean))
    modules = [str(m) for m in lean[0]["modules"]]  # type: ignore[attr-defined]
    banned = sorted({m.split(".")[0] for m in modules} & set(NOT_ON_THE_SERVICE_PATH))
    print(f"    {len(modules)} modules; must not load {', '.join(NOT_ON_THE_SERVICE_PATH)}: "
          f"{'none loaded' if not banned else 'LOADED ' + ', '.join(banned)}")  # fmt: skip
    best = min(float(str(f["wall_s"])) for f in lean)
    peak = max(m["peak"] for m in (f["memory"] for f in lean))  # type: ignore[index]
    print(f"    import under 0.25 s: {'met' if best < 0.25 else 'MISSED'} (best run); "
          f"RSS under 45 MB: {'met' if peak < 45 else 'MISSED'} (after import)")  # fmt: skip
    plans = [f["plan"] for f in lean]
    planner = None
    if any(p is None for p in plans):
        print("  planner's first solve: highspy is not installed, not measured")
    else:
        print(_startup_line("+ planner's first solve", plans, "HiGHS + solve"))  # type: ignore[arg-type]
        loaded = any(p["scipy"] for p in plans)  # type: ignore[index]
        print(f"    scipy loaded by the plan: {'YES' if loaded else 'no'}")
        planner = plans
    full = _startup_runs(FULL_IMPORTS, max(1, runs // 2), plan=False)
    print(_startup_line("full command line (before)", full))
    print(f"    {len(full[0]['modules'])} modules")  # type: ignore[arg-type]
    breakdown(runs, lean, planner)  # type: ignore[arg-type]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def _proc_threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _site_file(
    directory: Path, port: int, urls: dict[str, str], poll_s: float, extra: str = ""
) -> Path:
    directory.mkdir(exist_ok=True)
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
{extra}""")
    return path


#: Planning off, and planning on with a one-minute market (bids, and so plans, every minute).
PLANNING_OFF = "[plan]\nenabled = false\n"
PLANNING_EVERY_MINUTE = "[market]\ninterval_s = 60\ngate_s = 10\nbid_lead_s = 20\n"
PLANNED = "planned interval"  # the agent's debug line for each plan (edge/agent.py)


def _forecast(now: float) -> Forecast:
    """96 one-minute steps of a forecast from the minute of ``now`` (a plan steps as the
    market does: 96 steps, as a deployed agent's day of 15-minute intervals), a household with
    PV and an evening price peak, as the coordinator retains it for the site."""
    start = now // 60 * 60
    steps = range(96)
    return Forecast(
        ts=now,
        start_ts=start,
        step_s=60,
        pv_power_w=[3000.0 if i < 48 else 0.0 for i in steps],
        load_power_w=[600.0 if i < 48 else 2500.0 for i in steps],
        price_per_kwh=[0.15 if i < 48 else 0.35 for i in steps],
    )


async def _run_at_1hz(
    label: str, site: Path, env: dict[str, str], duration_s: float, received: list[bytes]
) -> None:
    """Run the agent on ``site`` (as systemd does) for ``duration_s`` after its start-up and
    print its figures (see the docstring)."""
    log = site.with_suffix(".log")
    with log.open("w") as stderr:
        agent = subprocess.Popen(
            [sys.executable, "-m", "wattmesh.edge_service", "-v", str(site)],  # as systemd, -v
            env=env,
            cwd=site.parent,
            stderr=stderr,
        )
        try:
            await asyncio.sleep(3.0)  # start-up (imports, discovery) is not steady state
            started = memory_mb(str(agent.pid))
            cpu0, t0, n0 = _proc_cpu_s(agent.pid), time.monotonic(), len(received)
            print(f"polling a three-device site at 1 Hz for {duration_s:.0f} s, {label} ...",
                  flush=True)  # fmt: skip
            await asyncio.sleep(duration_s)
            cpu = _proc_cpu_s(agent.pid) - cpu0
            wall = time.monotonic() - t0
            memory = memory_mb(str(agent.pid))
            threads = _proc_threads(agent.pid)
            got = len(received) - n0
        finally:
            agent.terminate()
            agent.wait(timeout=15)
    plans = log.read_text().count(PLANNED)
    share = 100.0 * cpu / wall
    print(f"  CPU share of one core  {share:6.2f} %   (goal < 3 %)  "
          f"{'met' if share < 3 else 'MISSED'}")  # fmt: skip
    print(f"  peak RSS               {memory['peak']:6.1f} MB  (goal < 45 MB) "
          f"{'met' if memory['peak'] < 45 else 'MISSED'}")  # fmt: skip
    print(f"  RSS after start-up     {started['rss']:6.1f} MB, after {duration_s:.0f} s "
          f"{memory['rss']:.1f} MB: anonymous {memory['anon']:.1f} MB, file-backed "
          f"{memory['file']:.1f} MB, Pss {memory['pss']:.1f} MB")  # fmt: skip
    print(f"  threads {threads}, plans made {plans}, telemetry received {got} messages in "
          f"{wall:.0f} s")  # fmt: skip


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


async def main(duration_s: float, messages: int, runs: int, startup_only: bool) -> None:
    startup(runs)
    if startup_only:
        return
    print()
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
            # 1. Footprint at 1 Hz, planning off, then on with a forecast.
            off = _site_file(work / "off", files.port, urls, 1.0, PLANNING_OFF)
            await _run_at_1hz("planning off", off, env, duration_s, received)
            await bus.publish(
                topics.forecast_topic(SITE), _forecast(time.time()).model_dump_json(), retain=True
            )
            on = _site_file(work / "on", files.port, urls, 1.0, PLANNING_EVERY_MINUTE)
            await _run_at_1hz(
                "planning on (a forecast, a plan a minute)", on, env, duration_s, received
            )

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
                [sys.executable, "-m", "wattmesh.edge_service", str(slow)],
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
    parser.add_argument("--runs", type=int, default=7, help="fresh interpreters for start-up")
    parser.add_argument("--startup-only", action="store_true", help="only part 0")
    args = parser.parse_args()
    asyncio.run(main(args.duration, args.messages, args.runs, args.startup_only))
