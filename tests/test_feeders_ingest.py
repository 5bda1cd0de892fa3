"""Ingest workers on a many-feeders broker (``broker init --feeders F`` with ``ingest_workers``).

Mosquitto puts a listener's mount point in front of a ``$share/...`` filter, which turns the
shared subscription into an ordinary one that matches nothing (the first test shows it on the
installed Mosquitto). So each feeder's ingest users log in on the operator listener (no mount
point) and read their feeder's telemetry through
``$share/wattmesh-ingest-{feeder}/feeder/{id}/wattmesh/v1/site/+/telemetry``; a coordinator
behind a mount point needs ``[broker] ingest_port``. Every broker test runs a real Mosquitto:
feeder ``north`` (sites n-1, n-2) and ``south`` (s-1, s-2), one ingest worker each.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt import ProtocolVersion
from typer.testing import CliRunner

from broker import topics
from broker.client import BusSettings
from broker.clock import ManualClock
from broker.errors import BrokerConfigError
from broker.feeders import (
    FeedersBrokerFiles,
    load_feeders_broker,
    write_feeders_broker_config,
)
from broker.mosquitto import MosquittoProcess
from coordinator.config import CoordinatorConfigError, parse_coordinator_config
from coordinator.ingest import shared_topic, worker_specs
from coordinator.service import Coordinator
from tests.feeders_fixtures import two_feeders
from tests.test_coordinator import T0, _telemetry
from wattmesh.cli import app

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ingest_files(broker_dir: Path) -> FeedersBrokerFiles:
    """Two feeders, each coordinator with one ingest worker user."""
    return write_feeders_broker_config(broker_dir, two_feeders(ingest_workers=1))


@pytest.fixture
async def ingest_broker(ingest_files: FeedersBrokerFiles) -> AsyncIterator[MosquittoProcess]:
    process = MosquittoProcess(ingest_files.conf, ingest_files.port)
    await process.start()
    try:
        yield process
    finally:
        await process.stop()
        print(f"mosquitto log:\n{process.log_tail(60)}")


def _client(files: FeedersBrokerFiles, user: str, port: int) -> aiomqtt.Client:
    return aiomqtt.Client(
        files.connect_host,
        port,
        username=user,
        password=files.credentials[user],
        protocol=ProtocolVersion.V5,
        timeout=5.0,
    )


async def _collect_until(
    client: aiomqtt.Client, sentinel: str, got: list[tuple[str, bytes]]
) -> None:
    """Append every message to ``got`` until one arrives on ``sentinel`` (5 s at most)."""
    async with asyncio.timeout(5):
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            got.append((str(message.topic), payload))
            if str(message.topic) == sentinel:
                return


async def _until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - the coordinator counts; nothing to wait on
            await asyncio.sleep(0.02)


def _coordinator_data(files: FeedersBrokerFiles, feeder: str, tmp_path: Path) -> dict[str, object]:
    """A coordinator file for ``feeder`` with one ingest worker, as credentials.toml gives it."""
    f = files.feeder(feeder)
    return {
        "coordinator": {
            "feeder": feeder,
            "ledger": str(tmp_path / f"{feeder}.sqlite"),
            "ingest_workers": 1,
            "ingest_flush_s": 0.05,
        },
        "broker": {
            "port": f.port,
            "username": f.coordinator_user,
            "mount_point": f.mount_point,
            "ingest_port": files.port,
            "password_env": None,
        },
        "grid": {"import_limit_w": 1e6, "export_limit_w": 1e6},
        "trust": {"max_hold_s": 900},
    }


def _workers_connected(c: Coordinator) -> Callable[[], bool]:
    """Whether ``c``'s one ingest worker is connected to the broker."""
    return lambda: c.ingest is not None and c.ingest.connected == 1


# -- what Mosquitto does with $share behind a mount point ----------------------------------


async def test_a_shared_subscription_behind_a_mount_point_receives_nothing(
    ingest_broker: MosquittoProcess, ingest_files: FeedersBrokerFiles
) -> None:
    """The reason the workers read on the operator listener: through north's listener (mount
    point feeder/north/) ``$share/g/wattmesh/v1/site/+/telemetry`` becomes the ordinary filter
    ``feeder/north/$share/g/...``, granted and never matched. If a Mosquitto update makes
    this test fail, workers could log in on their feeder's own listener."""
    files = ingest_files
    north = files.feeder("north")
    telemetry = topics.site_topic("n-1", "telemetry")
    got_shared: list[tuple[str, bytes]] = []
    got_monitor: list[tuple[str, bytes]] = []
    async with (
        _client(files, north.coordinator_user, north.port) as coordinator,
        _client(files, "monitor", files.port) as monitor,
    ):
        granted = await coordinator.subscribe(shared_topic("g"), qos=1)
        assert [rc if isinstance(rc, int) else rc.value for rc in granted] == [1]  # QoS 1
        await coordinator.subscribe(topics.MARKET_CLEARING, qos=1)  # the sentinel's topic
        await monitor.subscribe(f"{north.mount_point}{telemetry}", qos=1)
        async with _client(files, "n-1", north.port) as site:
            await site.publish(telemetry, b"reading", qos=1)
        await coordinator.publish(topics.MARKET_CLEARING, b"sentinel", qos=1)
        await _collect_until(
            coordinator, f"{north.mount_point}{topics.MARKET_CLEARING}", got_shared
        )
        await _collect_until(monitor, f"{north.mount_point}{telemetry}", got_monitor)
    assert got_monitor == [(f"{north.mount_point}{telemetry}", b"reading")]  # it was published
    assert got_shared == [(f"{north.mount_point}{topics.MARKET_CLEARING}", b"sentinel")]


# -- the configuration ---------------------------------------------------------------------


def test_each_feeders_ingest_users_log_in_on_the_operator_listener_and_read_its_telemetry(
    broker_dir: Path,
) -> None:
    files = write_feeders_broker_config(broker_dir, two_feeders(ingest_workers=2))
    north, south = files.feeders
    assert north.ingest_users == ("coordinator-north-ingest-1", "coordinator-north-ingest-2")
    assert south.ingest_users == ("coordinator-south-ingest-1", "coordinator-south-ingest-2")
    operator_users = {line.split(":")[0] for line in (broker_dir / "passwd").read_text().split()}
    assert operator_users == {
        *("operator", "monitor", "weather"),
        *north.ingest_users,
        *south.ingest_users,
    }
    for f in files.feeders:  # not on the feeder's own listener: $share would not work there
        feeder_users = {line.split(":")[0] for line in f.password_file.read_text().split()}
        assert feeder_users == {f.coordinator_user, "operator", "monitor", *f.sites}
    acl = (broker_dir / "acl").read_text()
    assert (
        "user coordinator-north-ingest-2\ntopic read feeder/north/wattmesh/v1/site/+/telemetry\n"
        in acl
    )
    assert (
        "user coordinator-south-ingest-1\ntopic read feeder/south/wattmesh/v1/site/+/telemetry\n"
        in acl
    )
    # One password per feeder's workers (the coordinator has one for them all).
    creds = files.credentials
    assert creds["coordinator-north-ingest-1"] == creds["coordinator-north-ingest-2"]
    assert creds["coordinator-north-ingest-1"] != creds["coordinator-south-ingest-1"]
    assert load_feeders_broker(broker_dir) == files


def test_ingest_users_must_not_collide_with_other_users(broker_dir: Path) -> None:
    spec = two_feeders(ingest_workers=1)
    north, south = spec.feeders
    clash = south.model_copy(update={"sites": ("s-1", "coordinator-north-ingest-1")})
    with pytest.raises(BrokerConfigError, match="coordinator-north-ingest-1"):
        write_feeders_broker_config(
            broker_dir / "x", spec.model_copy(update={"feeders": (north, clash)})
        )
    assert not (broker_dir / "x").exists()


def test_broker_init_ingest_workers_applies_to_every_feeder(broker_dir: Path) -> None:
    feeders = str(ROOT / "config" / "feeders.toml")
    result = CliRunner().invoke(
        app,
        ["broker", "init", str(broker_dir / "x"), "--feeders", feeders, "--ingest-workers", "2"],
    )
    assert result.exit_code == 0, result.output
    assert "ingest users coordinator-south-ingest-1, coordinator-south-ingest-2" in result.output
    files = load_feeders_broker(broker_dir / "x")
    assert [len(f.ingest_users) for f in files.feeders] == [2, 2]


def test_a_coordinator_behind_a_mount_point_needs_an_ingest_port_without_one(
    broker_dir: Path, tmp_path: Path
) -> None:
    files = write_feeders_broker_config(broker_dir, two_feeders(ingest_workers=1))
    data = _coordinator_data(files, "north", tmp_path)
    broker = data["broker"]
    assert isinstance(broker, dict)
    for ingest_port in (None, broker["port"]):  # none, or the mounted listener itself
        wrong = {**data, "broker": {**broker, "ingest_port": ingest_port}}
        with pytest.raises(CoordinatorConfigError, match=r"needs broker\.ingest_port.*\$share"):
            parse_coordinator_config(wrong, "north.toml")
    config = parse_coordinator_config(data, "north.toml")
    bus = config.broker.bus_settings(username="x", client_id="x", password="pw")
    (spec,) = worker_specs(
        bus, user="coordinator-north", password="pw", count=1, group="g", port=files.port
    )
    assert (spec.bus.port, spec.bus.username, spec.topic_root) == (
        files.port,
        "coordinator-north-ingest-1",
        "feeder/north/",
    )
    with pytest.raises(ValueError, match="ingest_port"):
        worker_specs(bus, user="c", password="pw", count=1, group="g")
    # Without a mount point the workers use the coordinator's own listener, as before.
    plain = worker_specs(BusSettings(port=1883), user="c", password="pw", count=1, group="g")
    assert (plain[0].bus.port, plain[0].topic_root) == (1883, "")


# -- over a real broker --------------------------------------------------------------------


async def test_an_ingest_user_reads_only_its_own_feeders_telemetry(
    ingest_broker: MosquittoProcess, ingest_files: FeedersBrokerFiles
) -> None:
    files = ingest_files
    north, south = files.feeder("north"), files.feeder("south")
    (reader,) = north.ingest_users
    got: list[tuple[str, bytes]] = []
    async with _client(files, reader, files.port) as worker:
        await worker.subscribe(shared_topic("wattmesh-ingest-north", north.mount_point), qos=1)
        # Asked for by name, south's telemetry is still refused by the ACL.
        await worker.subscribe(shared_topic("wattmesh-ingest-north", south.mount_point), qos=1)
        await worker.subscribe(f"{south.mount_point}{topics.PREFIX}/#", qos=1)
        async with _client(files, "s-1", south.port) as site:
            await site.publish(topics.site_topic("s-1", "telemetry"), b"south", qos=1)
        async with _client(files, "n-1", north.port) as site:
            await site.publish(topics.site_topic("n-1", "bid"), b"bid", qos=1)
            await site.publish(topics.site_topic("n-1", "telemetry"), b"north", qos=1)
        sentinel = f"{north.mount_point}{topics.site_topic('n-1', 'telemetry')}"
        await _collect_until(worker, sentinel, got)
    assert got == [(sentinel, b"north")]


async def test_each_feeders_coordinator_ingests_only_its_feeders_telemetry_through_its_worker(
    ingest_broker: MosquittoProcess, ingest_files: FeedersBrokerFiles, tmp_path: Path
) -> None:
    """Real coordinators, one ingest worker process each, behind their feeders' listeners:
    n-1's readings reach only north's worker and coordinator, s-1's only south's. North's
    last reading (sent after all of south's) closes the run."""
    files = ingest_files
    north_readings = [_telemetry(T0 + 20.0 * i, 1000.0 + i) for i in range(5)]
    south_readings = [_telemetry(T0 + 20.0 * i, -2000.0 - i) for i in range(4)]
    last = _telemetry(T0 + 200.0, 999.0)
    async with AsyncExitStack() as stack:
        coordinators = {}
        for feeder in ("north", "south"):
            f = files.feeder(feeder)
            config = parse_coordinator_config(
                _coordinator_data(files, feeder, tmp_path), f"{feeder}.toml"
            )
            c = Coordinator(
                config,
                ManualClock(T0 + 600.0),
                password=files.credentials[f.coordinator_user],
                ingest_password=files.credentials[f.ingest_users[0]],
            )
            coordinators[feeder] = await stack.enter_async_context(c)
        for c in coordinators.values():
            await c.bus.wait_connected(10)
            await _until(_workers_connected(c))
        for site, feeder, readings in (
            ("n-1", "north", north_readings),
            ("s-1", "south", south_readings),
            ("n-1", "north", [last]),
        ):
            async with _client(files, site, files.feeder(feeder).port) as client:
                for msg in readings:
                    await client.publish(
                        topics.site_topic(site, "telemetry"), msg.model_dump_json(), qos=1
                    )
        north, south = coordinators["north"], coordinators["south"]

        def latest_id(c: Coordinator, site: str) -> str | None:
            state = c.sites.get(site)
            return state.latest.id if state is not None and state.latest is not None else None

        await _until(lambda: latest_id(north, "n-1") == last.id)
        await _until(lambda: latest_id(south, "s-1") == south_readings[-1].id)
        stats = {
            f: (c.stats.telemetry, c.ingest.stats.records)
            for f, c in coordinators.items()
            if c.ingest
        }
    assert set(north.sites) == {"n-1"}
    assert set(south.sites) == {"s-1"}
    assert stats == {"north": (6, 6), "south": (4, 4)}
