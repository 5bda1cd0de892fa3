"""Edge Mosquitto brokers bridged to a core broker (broker/bridge.py), over real processes.

One core broker (the coordinator's) and two edge brokers on this machine: edge ``north``
serves sites ``site-a`` and ``house-1``, edge ``south`` serves ``site-b``; each edge's bridge
connects out to the core as its own user. Access rules are proved by what a subscriber
receives, never by acknowledgements: forbidden messages go first and a permitted one last
over the same path, so a subscriber would have seen a forbidden one before the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from typer.testing import CliRunner, Result

from broker.bridge import (
    BRIDGES_RECORD_NAME,
    BridgeConfig,
    BridgeCredentials,
    BridgeKit,
    RecordedBridge,
    add_bridge_user,
    bridge_acl_text,
    bridge_conf_text,
    bridge_kit_path,
    bridge_topics,
    load_bridge_kit,
    recorded_bridges,
    write_edge_broker,
)
from broker.errors import BrokerConfigError
from broker.mosquitto import (
    BrokerFiles,
    MosquittoProcess,
    load_broker_files,
    write_broker_config,
)
from broker.topics import (
    BRIDGE_STATE_ALL,
    MARKET_CLEARING,
    bridge_state_topic,
    forecast_topic,
    grid_state_topic,
    site_topic,
)
from tests.broker_fixtures import client_kwargs, free_port
from wattmesh.broker_cli import broker_app

EDGES = {"north": ("site-a", "house-1"), "south": ("site-b",)}
SITES = tuple(site for sites in EDGES.values() for site in sites)
#: Test bridges reconnect after 1-2 s (production default: 2-30 s).
FAST_RESTART_S = (1, 2)


@dataclass
class Community:
    """The broker directories of one core and its edges (nothing running yet)."""

    core: BrokerFiles
    edges: dict[str, BrokerFiles]
    kits: dict[str, BridgeKit]


@pytest.fixture
def broker_root() -> Iterator[Path]:
    """A directory Mosquitto's user can reach (as root: not under pytest's mode-700 tmp)."""
    path = Path(tempfile.mkdtemp(prefix="wattmesh-bridge-"))
    if os.geteuid() == 0:
        path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_community(
    root: Path, *, tls: bool = False, protocol: Literal["mqttv50", "mqttv311"] = "mqttv311"
) -> Community:
    core = write_broker_config(
        root / "core", SITES, port=free_port(), tls=tls, tls_port=free_port()
    )
    kits = {edge: add_bridge_user(core.directory, edge, sites) for edge, sites in EDGES.items()}
    edges = {
        edge: write_edge_broker(
            root / edge,
            load_bridge_kit(bridge_kit_path(core.directory, edge)),
            core=["127.0.0.1"],
            port=free_port(),
            restart_timeout_s=FAST_RESTART_S,
            protocol=protocol,
        )
        for edge in EDGES
    }
    # Reloaded: its credentials now include the bridge users.
    return Community(load_broker_files(core.directory), edges, kits)


@pytest.fixture
def community(broker_root: Path) -> Community:
    return make_community(broker_root)


@contextlib.asynccontextmanager
async def running(files: BrokerFiles) -> AsyncIterator[MosquittoProcess]:
    process = MosquittoProcess(files.conf, files.port)
    await process.start()
    try:
        yield process
    finally:
        await process.stop()
        print(f"--- {files.directory} log:\n{process.log_tail(40)}")


def client(files: BrokerFiles, user: str, **overrides: object) -> aiomqtt.Client:
    return aiomqtt.Client(**client_kwargs(files, user, **overrides))


async def receive(subscriber: aiomqtt.Client, count: int) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    async for message in subscriber.messages:
        assert isinstance(message.payload, bytes)
        got.append((message.topic.value, message.payload))
        if len(got) == count:
            break
    return got


async def until_received(
    publish: Callable[[], Awaitable[None]], subscriber: aiomqtt.Client, topic: str
) -> aiomqtt.Message:
    """Publish every 0.2 s until ``subscriber`` gets a message on ``topic`` (a bridge is up).

    The publishing task is stopped by an event, not cancelled: Python 3.11's
    ``asyncio.wait_for`` (inside aiomqtt's publish) swallows a cancellation that meets the
    PUBACK, and the task would go on publishing.
    """
    stop = asyncio.Event()

    async def repeat() -> None:
        while not stop.is_set():
            await publish()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await stop.wait()

    task = asyncio.create_task(repeat())
    try:
        async for message in subscriber.messages:
            if message.topic.value == topic:
                return message
        raise AssertionError("the message stream ended")
    finally:
        stop.set()
        await task


async def drain(subscriber: aiomqtt.Client, quiet_s: float = 0.5) -> list[str]:
    """Topics of whatever arrives until ``quiet_s`` passes without a message."""
    got: list[str] = []
    with contextlib.suppress(TimeoutError):
        while True:
            async with asyncio.timeout(quiet_s):
                message = await anext(aiter(subscriber.messages))
            got.append(message.topic.value)
    return got


# --- the configuration text ------------------------------------------------------------------


def test_bridge_section_carries_exactly_the_sites_topics_with_persistent_sessions() -> None:
    creds = BridgeCredentials("bridge-north", password="secret")
    config = BridgeConfig("north", ("core1:1883", "core2:1883"), ("site-a",), creds)
    text = bridge_conf_text(config)
    lines = text.splitlines()
    assert "connection bridge-north" in lines
    assert "address core1:1883 core2:1883" in lines
    assert {"cleansession false", "local_cleansession false", "try_private true"} <= set(lines)
    assert "bridge_protocol_version mqttv311" in lines  # keeps its session on the core
    topic_lines = [line for line in lines if line.startswith("topic ")]
    assert topic_lines == [
        "topic wattmesh/v1/site/site-a/status out 1",
        "topic wattmesh/v1/site/site-a/telemetry out 1",
        "topic wattmesh/v1/site/site-a/bid out 1",
        "topic wattmesh/v1/site/site-a/dispatch/ack out 1",
        "topic wattmesh/v1/site/site-a/award in 1",
        "topic wattmesh/v1/site/site-a/dispatch in 1",
        "topic wattmesh/v1/site/site-a/reservation in 1",
        "topic wattmesh/v1/forecast/site-a in 1",
        "topic wattmesh/v1/market/clearing in 1",
        "topic wattmesh/v1/grid/+/state in 1",
    ]
    # In and out never share a topic: nothing can travel back the way it came.
    out = {topic for topic, way in bridge_topics(["site-a", "site-b"]) if way == "out"}
    into = {topic for topic, way in bridge_topics(["site-a", "site-b"]) if way == "in"}
    assert not out & into


def test_core_acl_block_writes_what_the_sites_publish_and_reads_what_they_read() -> None:
    lines = bridge_acl_text("north", ["site-a"]).splitlines()
    assert "user bridge-north" in lines
    assert "topic write wattmesh/v1/site/site-a/telemetry" in lines
    assert "topic read wattmesh/v1/site/site-a/award" in lines
    assert "topic read wattmesh/v1/grid/+/state" in lines
    assert not any("site-b" in line or line.endswith("#") for line in lines)


def test_bridge_config_refuses_what_mosquitto_would_misread() -> None:
    creds = BridgeCredentials("bridge-north", password="secret")
    with pytest.raises(BrokerConfigError, match="host:port"):
        BridgeConfig("north", ("core1",), ("site-a",), creds)
    with pytest.raises(BrokerConfigError, match="site"):
        BridgeConfig("north", ("core1:1883",), ("Site A",), creds)
    with pytest.raises(BrokerConfigError, match="password or a client certificate"):
        BridgeConfig("north", ("core1:1883",), ("site-a",), BridgeCredentials("bridge-north"))


def test_adding_a_bridge_user_twice_is_refused(community: Community) -> None:
    with pytest.raises(BrokerConfigError, match="already exists"):
        add_bridge_user(community.core.directory, "north", ["site-a"])


# --- over real brokers -------------------------------------------------------------------------


async def test_site_telemetry_crosses_the_bridge_and_a_shared_subscription_splits_it(
    community: Community,
) -> None:
    core, north = community.core, community.edges["north"]
    telemetry = site_topic("site-a", "telemetry")
    shared = "$share/ingest/wattmesh/v1/site/+/telemetry"
    async with asyncio.timeout(30):
        async with running(core), running(north):
            async with (
                client(north, "site-a") as site,
                client(core, "coordinator") as worker_1,
                client(core, "monitor") as worker_2,
            ):
                await worker_1.subscribe(telemetry, qos=1)
                await until_received(
                    lambda: site.publish(telemetry, b"probe", qos=1), worker_1, telemetry
                )
                await worker_1.unsubscribe(telemetry)
                await drain(worker_1)
                await worker_1.subscribe(shared, qos=1)
                await worker_2.subscribe(shared, qos=1)
                count = 40
                for n in range(count):
                    await site.publish(telemetry, f"{n}".encode(), qos=1)
                got: list[list[bytes]] = [[], []]
                all_in = asyncio.Event()

                async def collect(worker: aiomqtt.Client, into: list[bytes]) -> None:
                    async for message in worker.messages:
                        assert message.topic.value == telemetry
                        assert isinstance(message.payload, bytes)
                        into.append(message.payload)
                        if len(got[0]) + len(got[1]) >= count:
                            all_in.set()

                tasks = [
                    asyncio.create_task(collect(w, g))
                    for w, g in zip((worker_1, worker_2), got, strict=True)
                ]
                await all_in.wait()
                await asyncio.sleep(0.5)  # a duplicate would arrive now
                for task in tasks:
                    task.cancel()
    payloads = sorted(int(p) for p in got[0] + got[1])
    assert payloads == list(range(count)), "each message to exactly one worker"
    assert got[0] and got[1], "the group shares the work"


async def test_commands_forecasts_and_retained_state_reach_sites_on_their_edge(
    community: Community,
) -> None:
    core, north, south = community.core, community.edges["north"], community.edges["south"]
    award_a = site_topic("site-a", "award")
    forecast_a, forecast_b = forecast_topic("site-a"), forecast_topic("site-b")
    grid = grid_state_topic("main")
    async with asyncio.timeout(40):
        async with running(core):
            # Retained before any bridge connected: the bridge's subscription fetches it.
            async with client(core, "coordinator") as coordinator:
                await coordinator.publish(forecast_a, b"forecast a 1", qos=1, retain=True)
                await coordinator.publish(forecast_b, b"forecast b 1", qos=1, retain=True)
                await coordinator.publish(MARKET_CLEARING, b"clearing 1", qos=1, retain=True)
            async with running(north), running(south):
                async with client(north, "site-a") as site, client(core, "coordinator") as coord:
                    await site.subscribe(award_a, qos=1)
                    await until_received(
                        lambda: coord.publish(award_a, b"award", qos=1), site, award_a
                    )
                    # Live retained messages keep their retain flag across the bridge.
                    await coord.publish(MARKET_CLEARING, b"clearing 2", qos=1, retain=True)
                    await coord.publish(grid, b"normal", qos=1, retain=True)
                    await asyncio.sleep(0.5)
                async with client(north, "site-a") as late:
                    await late.subscribe(forecast_a, qos=1)
                    await late.subscribe(MARKET_CLEARING, qos=1)
                    await late.subscribe(grid, qos=1)
                    north_got = sorted(await receive(late, 3))
                async with client(south, "site-b") as late_b:
                    await late_b.subscribe(forecast_b, qos=1)
                    await late_b.subscribe(MARKET_CLEARING, qos=1)
                    south_got = sorted(await receive(late_b, 2))
                async with client(north, "monitor") as monitor:  # north holds only its sites'
                    await monitor.subscribe("wattmesh/v1/forecast/+", qos=1)
                    north_forecasts = await drain(monitor)
    assert north_got == sorted(
        [(forecast_a, b"forecast a 1"), (MARKET_CLEARING, b"clearing 2"), (grid, b"normal")]
    )
    assert south_got == sorted([(forecast_b, b"forecast b 1"), (MARKET_CLEARING, b"clearing 2")])
    assert north_forecasts == [forecast_a]


async def test_core_acl_keeps_a_bridge_user_to_its_own_sites(community: Community) -> None:
    core = community.core
    north = community.kits["north"].credentials
    assert core.credentials[north.user] == north.password
    telemetry_a, telemetry_b = site_topic("site-a", "telemetry"), site_topic("site-b", "telemetry")
    award_a, award_b = site_topic("site-a", "award"), site_topic("site-b", "award")
    async with asyncio.timeout(20):
        async with running(core):
            # Edge north's bridge credentials, used directly (as a compromised edge would).
            async with (
                client(core, north.user) as rogue,
                client(core, "coordinator") as coordinator,
            ):
                await coordinator.subscribe("wattmesh/v1/site/+/telemetry", qos=1)
                await rogue.subscribe(award_b, qos=1)
                await rogue.subscribe(award_a, qos=1)
                await rogue.publish(telemetry_b, b"forged", qos=1)
                await rogue.publish(telemetry_a, b"own", qos=1)
                assert await receive(coordinator, 1) == [(telemetry_a, b"own")]
                await coordinator.publish(award_b, b"for b", qos=1)
                await coordinator.publish(award_a, b"for a", qos=1)
                assert await receive(rogue, 1) == [(award_a, b"for a")]


async def test_edge_acl_keeps_a_site_to_its_own_topics_across_the_bridge(
    community: Community,
) -> None:
    core, north = community.core, community.edges["north"]
    own, other = site_topic("site-a", "telemetry"), site_topic("site-b", "telemetry")
    house = site_topic("house-1", "telemetry")
    async with asyncio.timeout(30):
        async with running(core), running(north):
            async with (
                client(north, "site-a") as site,
                client(core, "coordinator") as coordinator,
            ):
                await coordinator.subscribe("wattmesh/v1/site/+/telemetry", qos=1)
                await until_received(lambda: site.publish(own, b"probe", qos=1), coordinator, own)
                await drain(coordinator)
                await site.publish(other, b"forged", qos=1)
                await site.publish(house, b"forged", qos=1)
                await site.publish(own, b"last", qos=1)
                assert await receive(coordinator, 1) == [(own, b"last")]


async def test_telemetry_queued_on_the_edge_while_the_core_is_down_arrives_after(
    community: Community,
) -> None:
    core, north = community.core, community.edges["north"]
    telemetry = site_topic("house-1", "telemetry")
    session = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    session.SessionExpiryInterval = 3600

    def coordinator() -> aiomqtt.Client:
        return client(core, "coordinator", clean_start=False, properties=session)

    count = 25
    async with asyncio.timeout(40):
        core_process = MosquittoProcess(core.conf, core.port)
        await core_process.start()
        try:
            async with running(north), client(north, "house-1") as site:
                async with coordinator() as coord:
                    await coord.subscribe(telemetry, qos=1)
                    await until_received(
                        lambda: site.publish(telemetry, b"probe", qos=1), coord, telemetry
                    )
                    await drain(coord)
                assert await core_process.stop() == 0  # saves the coordinator's session
                for n in range(count):
                    await site.publish(telemetry, f"{n}".encode(), qos=1)
                await core_process.start()
                async with coordinator() as coord:
                    got = [int(payload) for _, payload in await receive(coord, count)]
                    extra = await drain(coord)
        finally:
            await core_process.stop()
            print(f"--- core log:\n{core_process.log_tail(40)}")
    assert got == list(range(count))
    assert extra == []


async def test_bridge_over_mutual_tls_with_a_certificate_from_the_core_ca(
    broker_root: Path,
) -> None:
    community = make_community(broker_root, tls=True)
    core, south = community.core, community.edges["south"]
    assert community.kits["south"].credentials.tls
    conf = south.conf.read_text(encoding="utf-8")
    assert "remote_password" not in conf
    assert "bridge_certfile" in conf
    telemetry = site_topic("site-b", "telemetry")
    async with asyncio.timeout(30):
        async with running(core), running(south):
            async with (
                client(south, "site-b") as site,
                client(core, "coordinator") as coordinator,
            ):
                await coordinator.subscribe(telemetry, qos=1)
                message = await until_received(
                    lambda: site.publish(telemetry, b"over tls", qos=1), coordinator, telemetry
                )
    assert message.payload == b"over tls"


async def test_core_reads_each_edge_link_state_retained_and_zero_when_the_edge_stops_or_dies(
    community: Community,
) -> None:
    core, north = community.core, community.edges["north"]
    state = bridge_state_topic("north")
    async with asyncio.timeout(30):
        async with running(core), client(core, "coordinator") as coordinator:
            await coordinator.subscribe(BRIDGE_STATE_ALL, qos=1)
            edge = MosquittoProcess(north.conf, north.port)
            await edge.start()
            try:
                up = await receive(coordinator, 1)
                await edge.stop()
                after_stop = await receive(coordinator, 1)
                await edge.start()
                again = await receive(coordinator, 1)
                await edge.kill()
                after_kill = await receive(coordinator, 1)
            finally:
                await edge.stop()
                print(f"--- edge log:\n{edge.log_tail(60)}")
            async with client(core, "monitor") as later:  # retained on the core
                await later.subscribe(BRIDGE_STATE_ALL, qos=1)
                retained = await receive(later, 1)
    assert up == again == [(state, b"1")]
    assert after_stop == after_kill == retained == [(state, b"0")]


async def test_a_sites_retained_status_is_retained_on_the_core_too(community: Community) -> None:
    core, south = community.core, community.edges["south"]
    status = site_topic("site-b", "status")
    async with asyncio.timeout(30):
        async with running(core), running(south):
            async with client(south, "site-b") as site, client(core, "coordinator") as coord:
                await coord.subscribe(status, qos=1)
                await until_received(
                    lambda: site.publish(status, b"online", qos=1, retain=True), coord, status
                )
            async with client(core, "monitor") as later:
                await later.subscribe(status, qos=1)
                message = await anext(aiter(later.messages))
    assert (message.topic.value, message.payload, message.retain) == (status, b"online", True)


def standby_copy(core: BrokerFiles, directory: Path) -> BrokerFiles:
    """A second core with the same users, ACL and certificates on another port (a standby)."""
    shutil.copytree(core.directory, directory, symlinks=True)
    for source in [core.directory, *core.directory.rglob("*")]:
        st = source.stat()
        os.chown(directory / source.relative_to(core.directory), st.st_uid, st.st_gid)
    port = free_port()
    conf = (directory / "mosquitto.conf").read_text(encoding="utf-8")
    conf = conf.replace(str(core.directory), str(directory))
    conf = conf.replace(f"listener {core.port} ", f"listener {port} ")
    (directory / "mosquitto.conf").write_text(conf, encoding="utf-8")
    for name in ("mosquitto.log", "mosquitto.pid", "data/mosquitto.db"):
        (directory / name).unlink(missing_ok=True)
    return dataclasses.replace(load_broker_files(directory), port=port)


async def test_cli_writes_core_user_and_edge_and_the_bridge_falls_over_to_a_standby_core(
    broker_root: Path,
) -> None:
    runner = CliRunner()
    core_dir, edge_dir = broker_root / "core", broker_root / "east"
    core_port, edge_port = free_port(), free_port()
    result = runner.invoke(
        broker_app, ["init", str(core_dir), "--sites", "site-a,site-b", "--port", str(core_port)]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        broker_app, ["bridge-user", str(core_dir), "--edge", "east", "--sites", "site-b"]
    )
    assert result.exit_code == 0, result.output
    kit = bridge_kit_path(core_dir, "east")
    assert f"--kit {kit}" in result.output
    core = load_broker_files(core_dir)
    standby = standby_copy(core, broker_root / "standby")
    result = runner.invoke(
        broker_app,
        [
            "edge",
            str(edge_dir),
            "--kit",
            str(kit),
            "--core",
            "127.0.0.1",
            "--core",
            f"127.0.0.1:{standby.port}",
            "--port",
            str(edge_port),
        ],
    )
    assert result.exit_code == 0, result.output
    conf = (edge_dir / "mosquitto.conf").read_text(encoding="utf-8")
    assert f"address 127.0.0.1:{core_port} 127.0.0.1:{standby.port}" in conf
    assert stat.S_IMODE((edge_dir / "mosquitto.conf").stat().st_mode) == 0o600  # a password
    edge = load_broker_files(edge_dir)
    assert edge.sites == ("site-b",)
    state = bridge_state_topic("east")
    async with asyncio.timeout(40):
        # The main core is down: the bridge connects to the standby.
        async with running(standby), running(edge):
            async with client(standby, "coordinator") as coordinator:
                await coordinator.subscribe(state, qos=1)
                assert await receive(coordinator, 1) == [(state, b"1")]
                # The main core comes back: the bridge returns to it.
                async with running(core), client(core, "coordinator") as main:
                    await main.subscribe(state, qos=1)
                    assert await receive(main, 1) == [(state, b"1")]  # Mosquitto: ~9 s
                    assert await receive(coordinator, 1) == [(state, b"0")]


@pytest.mark.parametrize("protocol", ["mqttv311", "mqttv50"])
async def test_commands_queued_on_the_core_while_the_edge_is_down_arrive_after_over_mqtt_3_1_1(
    broker_root: Path, protocol: Literal["mqttv50", "mqttv311"]
) -> None:
    """Over MQTT 3.1.1 the core keeps the bridge's session; Mosquitto 2.0's MQTT 5 bridge sends
    no Session Expiry Interval, so the core drops its session and the commands with it."""
    community = make_community(broker_root, protocol=protocol)
    core, north = community.core, community.edges["north"]
    dispatch = site_topic("site-a", "dispatch")
    session = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    session.SessionExpiryInterval = 3600

    def gateway() -> aiomqtt.Client:
        return client(north, "site-a", clean_start=False, properties=session)

    async with asyncio.timeout(40):
        async with running(core), client(core, "coordinator") as coordinator:
            edge = MosquittoProcess(north.conf, north.port)
            await edge.start()
            try:
                async with gateway() as site:
                    await site.subscribe(dispatch, qos=1)
                    await until_received(
                        lambda: coordinator.publish(dispatch, b"probe", qos=1), site, dispatch
                    )
                    await drain(site)
                assert await edge.stop() == 0
                for n in range(5):
                    await coordinator.publish(dispatch, f"{n}".encode(), qos=1)
                await edge.start()
                async with gateway() as site:
                    if protocol == "mqttv50":
                        # Bridge up again: a new command passes, the queued ones are gone
                        # (they would have arrived first).
                        first = await until_received(
                            lambda: coordinator.publish(dispatch, b"new", qos=1), site, dispatch
                        )
                        assert first.payload == b"new"
                        return
                    got = [int(payload) for _, payload in await receive(site, 5)]
                    extra = await drain(site)
            finally:
                await edge.stop()
                print(f"--- edge log:\n{edge.log_tail(60)}")
    assert got == list(range(5))
    assert extra == []


async def test_a_bridge_user_added_to_a_running_core_works_after_sighup(
    broker_root: Path,
) -> None:
    core = write_broker_config(broker_root / "core", SITES, port=free_port())
    async with asyncio.timeout(30):
        async with running(core) as core_process:
            kit = add_bridge_user(core.directory, "west", ["site-b"])
            assert core_process.pid is not None
            os.kill(core_process.pid, signal.SIGHUP)
            edge = write_edge_broker(
                broker_root / "west",
                kit,
                core=["127.0.0.1"],
                port=free_port(),
                restart_timeout_s=FAST_RESTART_S,
            )
            async with running(edge), client(core, "coordinator") as coordinator:
                await coordinator.subscribe(bridge_state_topic("west"), qos=1)
                assert await receive(coordinator, 1) == [(bridge_state_topic("west"), b"1")]


def _tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes)."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


async def test_init_force_keeps_the_bridge_users_and_refuses_to_drop_one_unless_told(
    broker_root: Path,
) -> None:
    runner = CliRunner()
    core_dir, port = broker_root / "core", free_port()

    def init(sites: str, *flags: str) -> Result:
        args = ["init", str(core_dir), "--sites", sites, "--port", str(port), *flags]
        return runner.invoke(broker_app, args)

    assert init(",".join(SITES)).exit_code == 0
    old = {edge: add_bridge_user(core_dir, edge, sites) for edge, sites in EDGES.items()}
    # Without house-1 the north bridge cannot be kept: refused, named, nothing written.
    before = _tree(core_dir)
    refused = init("site-a,site-b", "--force")
    assert refused.exit_code == 2
    assert "bridge-north: its site house-1 is no longer in the broker" in refused.output
    assert "--drop-bridges" in refused.output
    assert "bridge-south" not in refused.output
    assert _tree(core_dir) == before
    # The same sites: both bridges are added again, with new passwords and kits.
    kept = init(",".join(SITES), "--force")
    assert kept.exit_code == 0, kept.output
    assert "kept bridge user bridge-north (sites site-a, house-1)" in kept.output
    core = load_broker_files(core_dir)
    kits = {edge: load_bridge_kit(bridge_kit_path(core_dir, edge)) for edge in EDGES}
    for edge, kit in kits.items():
        assert kit.sites == EDGES[edge]
        assert kit.credentials.password == core.credentials[kit.credentials.user]
        assert kit.credentials.password != old[edge].credentials.password
    assert [b.edge for b in recorded_bridges(core_dir)] == list(EDGES)
    async with asyncio.timeout(30), running(core):
        async with client(core, "bridge-north", password=kits["north"].credentials.password):
            pass  # the new kit's password logs in
        with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
            async with client(core, "bridge-north", password=old["north"].credentials.password):
                pass
        # What it may carry is the same as before the rewrite: site-a's telemetry, not site-b's.
        async with (
            client(core, "coordinator") as coordinator,
            client(core, "bridge-north") as bridge,
        ):
            await coordinator.subscribe("wattmesh/v1/site/+/telemetry", qos=1)
            await bridge.publish(site_topic("site-b", "telemetry"), b"not mine", qos=1)
            await bridge.publish(site_topic("site-a", "telemetry"), b"mine", qos=1)
            assert await receive(coordinator, 1) == [(site_topic("site-a", "telemetry"), b"mine")]
    # --drop-bridges drops the one that cannot be kept (and its kit), and keeps the other.
    dropped = init("site-a,site-b", "--force", "--drop-bridges")
    assert dropped.exit_code == 0, dropped.output
    assert "dropped bridge user bridge-north" in dropped.output
    assert "kept bridge user bridge-south" in dropped.output
    after = load_broker_files(core_dir)
    assert "bridge-north" not in after.credentials
    assert "bridge-south" in after.credentials
    assert "bridge-north" not in after.acl_file.read_text()
    assert not bridge_kit_path(core_dir, "north").exists()
    assert recorded_bridges(core_dir) == (RecordedBridge("south", ("site-b",)),)


def test_init_force_takes_a_bridge_from_its_kit_without_a_record_and_refuses_an_unknown_one(
    broker_root: Path,
) -> None:
    """Bridge users added before bridges.toml existed: their kit names their sites; a bridge
    user with neither a record nor a kit is named, and nothing is written."""
    runner = CliRunner()
    core_dir, port = broker_root / "core", free_port()
    args = ["init", str(core_dir), "--sites", ",".join(SITES), "--port", str(port)]
    assert runner.invoke(broker_app, args).exit_code == 0
    for edge, sites in EDGES.items():
        add_bridge_user(core_dir, edge, sites)
    (core_dir / BRIDGES_RECORD_NAME).unlink()
    shutil.rmtree(bridge_kit_path(core_dir, "south"))
    before = _tree(core_dir)
    refused = runner.invoke(broker_app, [*args, "--force"])
    assert refused.exit_code == 2
    assert "bridge-south: no record of its sites" in refused.output
    assert "bridge-north" not in refused.output
    assert _tree(core_dir) == before
    kept = runner.invoke(broker_app, [*args, "--force", "--drop-bridges"])
    assert kept.exit_code == 0, kept.output
    assert "kept bridge user bridge-north (sites site-a, house-1)" in kept.output
    assert set(load_broker_files(core_dir).credentials) >= {"bridge-north"}
    assert "bridge-south" not in load_broker_files(core_dir).credentials
    assert recorded_bridges(core_dir) == (RecordedBridge("north", EDGES["north"]),)
