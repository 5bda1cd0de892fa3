"""Issue 15: telemetry ingest in worker processes on an MQTT 5 shared subscription.

Over a real Mosquitto: the workers share the telemetry (each message reaches exactly one,
none lost or counted twice), garbage and implausible readings through a worker are refused
and counted as in-process ingest counts them, a killed worker is noticed and restarted, and
the same readings through two workers and through the coordinator's own process settle the
same meters and feeder flow. The broker's ACL lets an ingest user read telemetry through
``$share/...`` and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from prometheus_client import generate_latest

from broker import topics
from broker.clock import ManualClock
from broker.errors import BrokerConfigError
from broker.messages import DeviceReading, Telemetry
from broker.mosquitto import BrokerFiles, MosquittoProcess, ingest_user, write_broker_config
from coordinator import plausibility as pl
from coordinator.config import parse_coordinator_config
from coordinator.ingest import Record, merge_epochs, reduce_message, shared_topic
from coordinator.service import Coordinator
from tests.broker_fixtures import BROKER_SITES, client_kwargs, free_port
from tests.test_coordinator import T0, _telemetry

WORKERS = 2


@pytest.fixture
def ingest_files(broker_dir: Path) -> BrokerFiles:
    """A broker configuration with two ingest users for the coordinator's workers."""
    return write_broker_config(broker_dir, BROKER_SITES, port=free_port(), ingest_workers=WORKERS)


@pytest.fixture
async def ingest_broker(ingest_files: BrokerFiles) -> AsyncIterator[MosquittoProcess]:
    async with MosquittoProcess(ingest_files.conf, ingest_files.port) as process:
        yield process


def _coordinator(tmp_path: Path, files: BrokerFiles, workers: int, name: str) -> Coordinator:
    config = parse_coordinator_config(
        {
            "coordinator": {
                "ledger": str(tmp_path / f"{name}.sqlite"),
                "ingest_workers": workers,
                "ingest_flush_s": 0.05,
            },
            "broker": {"port": files.port, "password_env": None},
            "grid": {"import_limit_w": 1e6, "export_limit_w": 1e6},
            "trust": {"max_hold_s": 900},
            "sites": {"site-a": {"connection_w": 20_000.0}},
        },
        "test",
    )
    return Coordinator(
        config,
        ManualClock(T0 + 600.0),
        password=files.credentials["coordinator"],
        ingest_password=files.credentials[ingest_user("coordinator", 1)] if workers else None,
    )


async def _until(predicate: object, timeout_s: float = 20.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - the coordinator counts; nothing to wait on
            await asyncio.sleep(0.02)


async def _started(c: Coordinator) -> None:
    """Until the coordinator and all its workers are connected (and subscribed)."""
    await c.bus.wait_connected(10)
    if c.ingest is not None:
        pool = c.ingest
        await _until(lambda: pool.connected == len(pool.workers))


def _readings() -> list[tuple[str, Telemetry]]:
    """Ten minutes of readings every 20 s from every site, interleaved as they would arrive."""
    out = []
    for step in range(30):
        ts = T0 + 20.0 * step
        for i, site in enumerate(BROKER_SITES):
            out.append((site, _telemetry(ts, 1000.0 * (i + 1) + 37.0 * step - 500.0 * (step % 3))))
    return out


async def _publish(files: BrokerFiles, messages: list[tuple[str, bytes]]) -> None:
    """Publish each (site, payload) as that site (QoS 1), in order per site."""
    by_site: dict[str, list[bytes]] = {}
    for site, payload in messages:
        by_site.setdefault(site, []).append(payload)
    for site, payloads in by_site.items():
        async with aiomqtt.Client(**client_kwargs(files, site)) as client:
            for payload in payloads:
                await client.publish(topics.site_topic(site, "telemetry"), payload, qos=1)


def test_reduce_message_validates_and_summarises_as_in_process_ingest_does() -> None:
    msg = _telemetry(T0, 1234.0, battery_w=-500.0, soc=50.0, rated_w=5000.0)
    topic = topics.site_topic("site-a", "telemetry")
    record = reduce_message(topic, msg.model_dump_json().encode())
    assert record == ("site-a", msg.id, pl.summarise(msg), msg.model_dump_json().encode())
    garbage = reduce_message(topic, b'{"schema_version": 1, "ts": "soon"')
    assert garbage is not None
    assert len(garbage) == 2
    assert garbage[0] == "site-a"
    assert reduce_message(topics.site_topic("site-a", "bid"), b"{}") is None


def test_a_reading_that_crossed_the_barrier_is_put_back_in_ts_order() -> None:
    def rec(site: str, ts: float) -> Record:
        return site, f"{site}-{ts}", pl.summarise(_telemetry(ts, 1.0)), b""

    k0 = [rec("a", 2.0), rec("a", 5.0), rec("b", 10.0)]  # epoch k, both workers
    k1 = [rec("a", 3.0), rec("a", 7.0), rec("b", 11.0), rec("c", 1.0)]  # epoch k + 1
    k2 = [rec("a", 4.0), rec("a", 6.0)]  # a worker two barriers behind
    now, keep = merge_epochs([k0, k1, k2])
    assert [(r[0], r[2].ts) for r in now] == [
        ("a", 2.0),
        ("a", 3.0),
        ("a", 4.0),
        ("a", 5.0),
        ("b", 10.0),
    ]
    assert [[(r[0], r[2].ts) for r in epoch] for epoch in keep] == [
        [("a", 7.0), ("b", 11.0), ("c", 1.0)],
        [("a", 6.0)],
    ]
    now, keep = merge_epochs(keep)
    assert [(r[0], r[2].ts) for r in now] == [("c", 1.0), ("a", 6.0), ("a", 7.0), ("b", 11.0)]
    assert keep == [[]]


def test_the_summary_check_is_the_message_check() -> None:
    limits = pl.SiteLimits(connection_w=20_000.0, generation_w=10_000.0, storage_w=5_000.0)
    window = pl.TimeWindow(30.0, 86_400.0)
    big = DeviceReading(device="x", kind="battery", available=True, power_w=1e6)
    cases = [
        _telemetry(T0, 1000.0),
        _telemetry(T0, 1e6),
        _telemetry(T0 + 60.0, 1000.0),
        Telemetry(ts=T0, devices=[big]),
        _telemetry(T0, 0.0, battery_w=9000.0, soc=50.0, rated_w=5000.0),
    ]
    reasons = [pl.check_telemetry(m, limits, T0, window, 0.1) for m in cases]
    assert reasons == [None, "grid_power", "future", "device_power", "battery_power"]
    assert reasons == [pl.check_reading(pl.summarise(m), limits, T0, window, 0.1) for m in cases]


async def test_an_ingest_user_reads_telemetry_through_a_shared_subscription_and_nothing_else(
    ingest_broker: MosquittoProcess, ingest_files: BrokerFiles
) -> None:
    user = ingest_user("coordinator", 1)
    got: list[tuple[str, bytes]] = []
    async with aiomqtt.Client(**client_kwargs(ingest_files, user)) as reader:
        await reader.subscribe(shared_topic("g"), qos=1)
        await reader.subscribe(f"$share/g/{topics.site_wildcard('bid')}", qos=1)
        await reader.subscribe(topics.site_wildcard("status"), qos=1)
        async with aiomqtt.Client(**client_kwargs(ingest_files, "site-a")) as site:
            await site.publish(topics.site_topic("site-a", "bid"), b"bid", qos=1)
            await site.publish(topics.site_topic("site-a", "status"), b"status", qos=1)
            await site.publish(topics.site_topic("site-a", "telemetry"), b"reading", qos=1)
        # it cannot write: a reading forged as another site's is dropped by the broker
        await reader.publish(topics.site_topic("site-b", "telemetry"), b"forged", qos=1)

        async def collect() -> None:
            async for message in reader.messages:
                assert isinstance(message.payload, bytes)
                got.append((str(message.topic), message.payload))

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await collect()
    assert got == [(topics.site_topic("site-a", "telemetry"), b"reading")]


async def test_workers_share_the_telemetry_without_losing_or_double_counting_a_reading(
    ingest_broker: MosquittoProcess, ingest_files: BrokerFiles, tmp_path: Path
) -> None:
    readings = _readings()
    c = _coordinator(tmp_path, ingest_files, WORKERS, "workers")
    async with c:
        await _started(c)
        await _publish(ingest_files, [(s, m.model_dump_json().encode()) for s, m in readings])
        await _until(lambda: c.stats.telemetry >= len(readings))
        await asyncio.sleep(0.3)  # a copy would arrive now
        pool = c.ingest
        assert pool is not None
        per_worker = dict(pool.stats.per_worker)
        pids = pool.pids()
    assert c.stats.telemetry == len(readings)
    assert c.stats.duplicates == 0
    assert c.stats.invalid == c.stats.rejected == 0
    assert sum(per_worker.values()) == len(readings)  # each reading reached exactly one worker
    assert sorted(per_worker) == [1, 2]
    assert all(n > 0 for n in per_worker.values())  # both took a share
    for pid in pids:  # and they stopped with the coordinator
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_the_same_readings_through_workers_and_in_process_meter_the_same(
    ingest_broker: MosquittoProcess, ingest_files: BrokerFiles, tmp_path: Path
) -> None:
    readings = _readings()
    payloads = [(s, m.model_dump_json().encode()) for s, m in readings]
    results = []
    for workers in (0, WORKERS):
        c = _coordinator(tmp_path, ingest_files, workers, f"run-{workers}")
        async with c:
            await _started(c)
            await _publish(ingest_files, payloads)
            await _until(lambda c=c: c.stats.telemetry >= len(readings))
            await c.balance(0.0)
            results.append(
                (
                    {n: dict(s.energy_wh) for n, s in c.sites.items()},
                    {n: dict(s.covered_s) for n, s in c.sites.items()},
                    {n: s.latest.id if s.latest else None for n, s in c.sites.items()},
                    {n: s.history.arrays()[0].tolist() for n, s in c.sites.items()},
                    c.flow_w,
                    c.stats.telemetry,
                    c.stats.duplicates,
                )
            )
    in_process, workers_result = results
    assert in_process[2:] == workers_result[2:]
    for ours, theirs in zip(in_process[:2], workers_result[:2], strict=True):  # energy, cover
        assert ours.keys() == theirs.keys()
        for site, table in ours.items():  # equal up to rounding (a reading metered late)
            assert table == pytest.approx(theirs[site], abs=1e-9)
    energy = in_process[0]
    assert set(energy) == set(BROKER_SITES)
    assert in_process[4] == pytest.approx(sum(m.grid_power_w or 0.0 for _, m in readings[-3:]))


async def test_garbage_and_implausible_readings_through_a_worker_are_refused_and_counted(
    ingest_broker: MosquittoProcess, ingest_files: BrokerFiles, tmp_path: Path
) -> None:
    c = _coordinator(tmp_path, ingest_files, WORKERS, "trust")
    fake = _telemetry(T0 + 100.0, -1e9)  # a meter claiming a gigawatt of export
    future = _telemetry(T0 + 3600.0, 1000.0)
    good = _telemetry(T0 + 200.0, 1000.0)
    async with c:
        await _started(c)
        await _publish(
            ingest_files,
            [
                ("site-a", b'{"schema_version": 1, "id": "x", "ts": "not a time"}'),
                ("site-a", fake.model_dump_json().encode()),
                ("site-a", future.model_dump_json().encode()),
                ("site-a", good.model_dump_json().encode()),
            ],
        )
        await _until(lambda: c.stats.telemetry + c.stats.rejected >= 4)
        await asyncio.sleep(0.3)
        state = c.sites["site-a"]
        audited = [e.detail["reason"] for e in c.ledger.audit_entries(kind="rejection")]
    assert c.stats.invalid == 1
    assert c.stats.telemetry == 1
    assert state.rejected == {"invalid": 1, "grid_power": 1, "future": 1}
    assert state.suspect == {int(fake.ts // 900)}  # settled as estimated, as in process
    assert state.latest is not None
    assert state.latest.id == good.id
    assert audited == ["invalid", "grid_power", "future"]  # audited as in process


async def test_a_killed_worker_is_noticed_restarted_and_its_share_still_ingested(
    ingest_broker: MosquittoProcess,
    ingest_files: BrokerFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = _coordinator(tmp_path, ingest_files, WORKERS, "kill")
    readings = _readings()
    first, second = readings[:45], readings[45:]
    async with c:
        await _started(c)
        pool = c.ingest
        assert pool is not None
        await _publish(ingest_files, [(s, m.model_dump_json().encode()) for s, m in first])
        await _until(lambda: c.stats.telemetry >= len(first))
        victim = pool.pids()[0]
        assert victim is not None
        with caplog.at_level(logging.ERROR, logger="coordinator.ingest"):
            os.kill(victim, signal.SIGKILL)
            await _until(lambda: pool.stats.deaths == 1)
        assert "ingest worker 1 (user coordinator-ingest-1) died" in caplog.text
        assert pool.stats.exit_codes == [-signal.SIGKILL]
        await _until(lambda: pool.stats.restarts == 1 and pool.connected == WORKERS)
        assert pool.pids()[0] not in (None, victim)
        metrics = generate_latest(c.metrics_registry).decode()
        assert 'wattmesh_ingest_worker_restarts_total{feeder="feeder-1"} 1.0' in metrics
        assert 'wattmesh_ingest_workers_connected{feeder="feeder-1"} 2.0' in metrics
        await _publish(ingest_files, [(s, m.model_dump_json().encode()) for s, m in second])
        await _until(lambda: c.stats.telemetry >= len(readings))
        per_worker = dict(pool.stats.per_worker)
    assert c.stats.telemetry == len(readings)
    assert c.stats.duplicates == 0
    assert per_worker[1] > 0
    assert per_worker[2] > 0


KILLED_COORDINATOR = textwrap.dedent("""
    import asyncio, sys
    from broker.clock import ManualClock
    from coordinator.config import parse_coordinator_config
    from coordinator.service import Coordinator

    async def main() -> None:
        config = parse_coordinator_config(
            {
                "coordinator": {"ledger": sys.argv[1], "ingest_workers": 1},
                "broker": {"port": 1, "password_env": None},  # nobody listens: it retries
            },
            "test",
        )
        async with Coordinator(config, ManualClock(0.0), password="x", ingest_password="y") as c:
            assert c.ingest is not None
            print(c.ingest.pids()[0], flush=True)
            await asyncio.sleep(60)

    asyncio.run(main())
""")


def test_the_workers_die_with_a_killed_coordinator(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    coordinator = subprocess.Popen(
        [sys.executable, "-c", KILLED_COORDINATOR, str(tmp_path / "ledger.sqlite")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert coordinator.stdout is not None
        worker = int(coordinator.stdout.readline())
        os.kill(worker, 0)  # it runs
        coordinator.kill()  # no chance to stop its workers
        coordinator.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        with pytest.raises(ProcessLookupError):
            os.kill(worker, 0)
    finally:
        coordinator.kill()
        coordinator.wait(10)


def _offline_coordinator(tmp_path: Path, name: str) -> Coordinator:
    config = parse_coordinator_config(
        {
            "coordinator": {"ledger": str(tmp_path / f"{name}.sqlite")},
            "broker": {"port": 1, "password_env": None},
            "trust": {"max_hold_s": 60},
        },
        "test",
    )
    return Coordinator(config, ManualClock(T0 + 600.0), password="x")


def _record(site: str, msg: Telemetry) -> Record:
    return site, msg.id, pl.summarise(msg), msg.model_dump_json().encode()


def test_readings_two_workers_hand_over_out_of_order_are_metered_in_their_place(
    tmp_path: Path,
) -> None:
    # Readings every 20 s (a 90 s gap in the middle, beyond max_hold_s), one without a grid
    # power; the reordered feed swaps neighbours as two lagging workers would.
    steps = [0, 20, 40, 60, 150, 170, 190, 210, 230, 250, 270]
    msgs = [_telemetry(T0 + t, 1000.0 + 300.0 * (i % 4) - 2500.0 * (i % 3)) for i, t in enumerate(steps)]
    msgs[6] = Telemetry(ts=T0 + 190.0, devices=[], load_power_w=5.0)  # no grid power
    in_order = _offline_coordinator(tmp_path, "in-order")
    for m in msgs:
        assert in_order.ingest_telemetry("site-a", m)
    swapped = _offline_coordinator(tmp_path, "swapped")
    order = [0, 2, 1, 3, 5, 4, 6, 9, 7, 8, 10]
    swapped.apply_ingest([_record("site-a", msgs[i]) for i in order], [])
    again = _offline_coordinator(tmp_path, "again")  # and each copy once more, late
    again.apply_ingest([_record("site-a", msgs[i]) for i in [*order, 1, 4, 8]], [])
    a, b, c = (x.sites["site-a"] for x in (in_order, swapped, again))
    assert swapped.stats.telemetry == len(msgs)
    assert swapped.stats.duplicates == 0
    assert again.stats.duplicates == 3
    for other in (b, c):
        assert other.energy_wh.keys() == a.energy_wh.keys()
        for k in a.energy_wh:
            assert other.energy_wh[k] == pytest.approx(a.energy_wh[k], abs=1e-9)
            assert other.covered_s[k] == pytest.approx(a.covered_s[k], abs=1e-9)
        assert other.last_sample == a.last_sample
        assert other.latest is not None
        assert other.latest.id == msgs[-1].id
    # In process (one reader, in order) an older reading is still a replay, as before.
    assert not in_order.ingest_telemetry("site-a", _telemetry(T0 + 30.0, 1.0))


def test_broker_init_makes_one_read_only_user_per_ingest_worker(broker_dir: Path) -> None:
    files = write_broker_config(broker_dir, ["site-a"], port=free_port(), ingest_workers=3)
    users = [ingest_user("coordinator", i) for i in (1, 2, 3)]
    assert list(files.users[:4]) == ["coordinator", *users]
    assert len({files.credentials[u] for u in users}) == 1  # one password for the workers
    assert files.credentials[users[0]] != files.credentials["coordinator"]
    acl = files.acl_file.read_text()
    for user in users:
        assert f"user {user}\ntopic read wattmesh/v1/site/+/telemetry\n\n" in acl
    with pytest.raises(BrokerConfigError, match="unique"):
        write_broker_config(
            broker_dir / "again", ["coordinator-ingest-1"], port=free_port(), ingest_workers=1
        )
