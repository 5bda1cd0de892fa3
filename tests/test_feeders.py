"""Many feeders on one Mosquitto (broker/feeders.py): each feeder's listener has its own topic
root (mount point), password file and ACL, and an operator listener sees every feeder.

Every test runs a real Mosquitto on the configuration ``write_feeders_broker_config`` writes
(the real ACL): feeder ``north`` (sites n-1, n-2) and feeder ``south`` (s-1, s-2). Access rules
are proved by what subscribers receive, never by acknowledgements (docs: pitfalls). A run of
messages ends with a sentinel published after them: once a subscriber has the sentinel, the
broker has routed everything published before it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import asdict
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt import ProtocolVersion
from pydantic import ValidationError
from typer.testing import CliRunner, Result

from broker import topics
from broker.client import BusClient, BusSettings
from broker.clock import ManualClock
from broker.errors import BrokerConfigError
from broker.feeders import (
    FeedersBrokerFiles,
    FeedersFile,
    load_feeders_broker,
    load_feeders_file,
    mount_point,
    write_feeders_broker_config,
)
from broker.messages import (
    Award,
    Bid,
    BidStep,
    Clearing,
    DeviceReading,
    Dispatch,
    DispatchAck,
    Forecast,
    GridState,
    Status,
    Telemetry,
)
from broker.mosquitto import MosquittoProcess, load_broker_files
from broker.settings import BrokerConnection
from coordinator.api import ApiToken, hash_token, new_token, write_tokens
from coordinator.config import parse_coordinator_config
from coordinator.service import Coordinator
from edge.agent import EdgeAgent
from edge.config import parse_edge_config
from tests.feeders_fixtures import NORTH, SOUTH, two_feeders
from tests.test_edge_agent import SITE as AGENT_SITE
from tests.test_edge_agent import simulated_house
from wattmesh.cli import app
from wattmesh.status_cli import (
    FeederRow,
    FeedersSnapshot,
    FeederView,
    feeder_rows,
    read_feeders_api,
    read_feeders_status,
)

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_782_043_200.0  # an interval boundary (900 s)
K = int(T0 // 900) + 1


@pytest.fixture
def feeders_files(broker_dir: Path) -> FeedersBrokerFiles:
    """Two feeders, two sites each, on one broker configuration (the real ACL)."""
    return write_feeders_broker_config(broker_dir, two_feeders())


@pytest.fixture
async def feeders_broker(feeders_files: FeedersBrokerFiles) -> AsyncIterator[MosquittoProcess]:
    """A running Mosquitto with every feeder's listener and the operator's."""
    process = MosquittoProcess(feeders_files.conf, feeders_files.port)
    await process.start()
    try:
        yield process
    finally:
        await process.stop()
        print(f"mosquitto log:\n{process.log_tail(60)}")


def _client(files: FeedersBrokerFiles, user: str, port: int | None = None) -> aiomqtt.Client:
    """A raw MQTT 5 client for ``user`` on its own feeder's listener (observers: the operator
    listener), or on ``port``."""
    own = files.feeder_of(user)
    return aiomqtt.Client(
        files.connect_host,
        port if port is not None else (own.port if own is not None else files.port),
        username=user,
        password=files.credentials[user],
        protocol=ProtocolVersion.V5,
        timeout=5.0,
    )


def _settings(files: FeedersBrokerFiles, user: str) -> BusSettings:
    """``BusClient`` settings for a site or coordinator: its feeder's port and mount point."""
    own = files.feeder_of(user)
    assert own is not None
    return BusSettings(
        host=files.connect_host,
        port=own.port,
        username=user,
        password=files.credentials[user],
        client_id=user,
        mount_point=own.mount_point,
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


def _telemetry(ts: float, grid_w: float) -> Telemetry:
    return Telemetry(
        ts=ts,
        devices=[
            DeviceReading(device="meter", kind="sunspec_meter", available=True, power_w=grid_w)
        ],
        grid_power_w=grid_w,
        pv_power_w=max(0.0, -grid_w),
        load_power_w=max(0.0, grid_w),
    )


# -- the configuration ---------------------------------------------------------------------


def test_the_shipped_feeders_file_writes_one_listener_per_feeder_and_the_operators(
    broker_dir: Path,
) -> None:
    spec = load_feeders_file(ROOT / "config" / "feeders.toml")
    files = write_feeders_broker_config(broker_dir, spec)
    conf = files.conf.read_text()
    assert "per_listener_settings true" in conf
    for f in files.feeders:
        assert f"listener {f.port} 127.0.0.1" in conf
        assert f"mount_point feeder/{f.id}/" in conf
        acl = f.acl_file.read_text()
        # The ACL names the mounted topics: Mosquitto checks them after adding the mount point.
        assert f"topic readwrite feeder/{f.id}/wattmesh/v1/#" in acl
        assert "\ntopic read wattmesh/" not in acl
        users = {line.split(":")[0] for line in f.password_file.read_text().splitlines()}
        assert users == {f.coordinator_user, "operator", "monitor", *f.sites}
    assert conf.count("mount_point") == len(files.feeders)  # the operator's listener has none
    assert load_feeders_broker(broker_dir) == files
    with pytest.raises(BrokerConfigError, match="many-feeders broker"):
        load_broker_files(broker_dir)


@pytest.mark.parametrize(
    ("feeders", "problem"),
    [
        (
            [{"id": "a", "port": 2001, "sites": ["x"]}, {"id": "b", "port": 2002, "sites": ["x"]}],
            "unique across the broker",
        ),
        (
            [{"id": "a", "port": 2001, "sites": ["x"]}, {"id": "b", "port": 2001, "sites": ["y"]}],
            "its own port",
        ),
        ([{"id": "a", "port": 1883, "sites": ["x"]}], "its own port"),
        (
            [
                {"id": "a", "port": 2001, "sites": ["x"], "coordinator": "boss"},
                {"id": "b", "port": 2002, "sites": ["y"], "coordinator": "boss"},
            ],
            "unique across the broker",
        ),
    ],
)
def test_colliding_users_or_ports_are_refused_before_anything_is_written(
    broker_dir: Path, feeders: list[dict[str, object]], problem: str
) -> None:
    spec = FeedersFile.model_validate({"feeders": feeders})
    with pytest.raises(BrokerConfigError, match=problem):
        write_feeders_broker_config(broker_dir / "b", spec)
    assert not (broker_dir / "b").exists()


# -- isolation over a real broker ----------------------------------------------------------


async def test_a_sites_telemetry_reaches_its_own_coordinator_and_not_the_other_feeders(
    feeders_broker: MosquittoProcess, feeders_files: FeedersBrokerFiles
) -> None:
    files = feeders_files
    got_north: list[tuple[str, bytes]] = []
    got_south: list[tuple[str, bytes]] = []
    got_monitor: list[tuple[str, bytes]] = []
    north_sentinel = topics.site_topic("n-2", "telemetry")
    south_sentinel = topics.site_topic("s-1", "telemetry")
    async with (
        _client(files, "coordinator-north") as north,
        _client(files, "coordinator-south") as south,
        _client(files, "monitor") as monitor,
    ):
        await north.subscribe(f"{topics.PREFIX}/#", qos=1)
        await south.subscribe(f"{topics.PREFIX}/#", qos=1)
        await monitor.subscribe("feeder/#", qos=1)
        async with _client(files, "n-1") as site:
            await site.publish(topics.site_topic("n-1", "telemetry"), b"north-1", qos=1)
            # Forging another feeder's site: its topic is under this feeder's root, refused.
            await site.publish(topics.site_topic("s-1", "telemetry"), b"forged", qos=1)
        async with _client(files, "n-2") as site:
            await site.publish(north_sentinel, b"north-2", qos=1)
        async with _client(files, "s-1") as site:
            await site.publish(south_sentinel, b"south-1", qos=1)
        await _collect_until(north, f"feeder/north/{north_sentinel}", got_north)
        await _collect_until(south, f"feeder/south/{south_sentinel}", got_south)
        await _collect_until(monitor, f"feeder/south/{south_sentinel}", got_monitor)
    # Mosquitto 2.0.11 leaves the mount point on delivered topics (BusClient removes it).
    assert got_north == [
        ("feeder/north/wattmesh/v1/site/n-1/telemetry", b"north-1"),
        ("feeder/north/wattmesh/v1/site/n-2/telemetry", b"north-2"),
    ]
    assert got_south == [("feeder/south/wattmesh/v1/site/s-1/telemetry", b"south-1")]
    # The operator listener sees every feeder, each under its own root.
    assert [t for t, _ in got_monitor] == [
        "feeder/north/wattmesh/v1/site/n-1/telemetry",
        "feeder/north/wattmesh/v1/site/n-2/telemetry",
        "feeder/south/wattmesh/v1/site/s-1/telemetry",
    ]


async def test_another_feeders_sites_cannot_read_its_awards_forecasts_or_clearing(
    feeders_broker: MosquittoProcess, feeders_files: FeedersBrokerFiles
) -> None:
    files = feeders_files
    award = Award(ts=T0, interval=K, price_per_kwh=0.2, quantity_kwh=1.0).model_dump_json()
    forecast = Forecast(
        ts=T0, start_ts=T0, step_s=900, pv_power_w=[1.0], load_power_w=[2.0], price_per_kwh=[0.2]
    ).model_dump_json()
    clearing_north = Clearing(ts=T0, interval=K, price_per_kwh=0.21, volume_kwh=2.0)
    clearing_south = Clearing(ts=T0, interval=K, price_per_kwh=0.15, volume_kwh=7.0)
    got_thief: list[tuple[str, bytes]] = []
    got_owner: list[tuple[str, bytes]] = []
    async with _client(files, "s-1") as thief, _client(files, "n-1") as owner:
        # s-1 asks for everything, and by name for north's site and north's clearing.
        for topic in (
            f"{topics.PREFIX}/#",
            topics.site_topic("n-1", "award"),
            topics.forecast_topic("n-1"),
            topics.MARKET_CLEARING,
        ):
            await thief.subscribe(topic, qos=1)
        await owner.subscribe(f"{topics.PREFIX}/#", qos=1)
        async with _client(files, "coordinator-north") as north:
            await north.publish(topics.site_topic("n-1", "award"), award, qos=1)
            await north.publish(topics.forecast_topic("n-1"), forecast, qos=1, retain=True)
            await north.publish(
                topics.MARKET_CLEARING, clearing_north.model_dump_json(), qos=1, retain=True
            )
        async with _client(files, "coordinator-south") as south:
            await south.publish(
                topics.MARKET_CLEARING, clearing_south.model_dump_json(), qos=1, retain=True
            )
        await _collect_until(thief, f"feeder/south/{topics.MARKET_CLEARING}", got_thief)
        await _collect_until(owner, f"feeder/north/{topics.MARKET_CLEARING}", got_owner)
    # s-1 received its own feeder's clearing and nothing of north's.
    assert got_thief == [
        (f"feeder/south/{topics.MARKET_CLEARING}", clearing_south.model_dump_json().encode())
    ]
    # n-1 (positive control) received its award, its forecast and north's clearing.
    assert [t.removeprefix("feeder/north/") for t, _ in got_owner] == [
        topics.site_topic("n-1", "award"),
        topics.forecast_topic("n-1"),
        topics.MARKET_CLEARING,
    ]
    assert Clearing.model_validate_json(got_owner[-1][1]).volume_kwh == 2.0
    # A site that joins later gets only its own feeder's retained clearing.
    async with _client(files, "s-2") as late:
        await late.subscribe(topics.MARKET_CLEARING, qos=1)
        retained: list[tuple[str, bytes]] = []
        await _collect_until(late, f"feeder/south/{topics.MARKET_CLEARING}", retained)
    assert Clearing.model_validate_json(retained[0][1]).price_per_kwh == 0.15


@pytest.mark.parametrize(
    ("user", "listener"),
    [("n-1", "south"), ("n-1", "operator"), ("coordinator-south", "north"), ("s-2", "north")],
)
async def test_a_user_connecting_to_another_feeders_listener_is_refused(
    feeders_broker: MosquittoProcess,
    feeders_files: FeedersBrokerFiles,
    user: str,
    listener: str,
) -> None:
    """Each listener has its own password file: a site's credentials are valid only on its
    own feeder's listener, so elsewhere the broker refuses the connection (CONNACK 135)."""
    files = feeders_files
    port = files.port if listener == "operator" else files.feeder(listener).port
    with pytest.raises(aiomqtt.MqttCodeError) as refused:
        async with _client(files, user, port):
            pass
    assert refused.value.rc == 135
    async with _client(files, user):  # the same credentials on its own listener connect
        pass


# -- a real coordinator per feeder, and the operator's view ---------------------------------


def _coordinator(
    files: FeedersBrokerFiles, feeder: str, tmp_path: Path, tokens_file: Path | None = None
) -> Coordinator:
    """A coordinator for ``feeder`` on its listener, as its coordinator file would give it;
    with ``tokens_file``, with its HTTP API on a free port."""
    f = files.feeder(feeder)
    api = {"api": {"port": 0, "tokens_file": str(tokens_file)}} if tokens_file else {}
    config = parse_coordinator_config(
        {
            **api,
            "coordinator": {"feeder": feeder, "ledger": str(tmp_path / f"{feeder}.sqlite")},
            "broker": {
                "port": f.port,
                "username": f.coordinator_user,
                "mount_point": f.mount_point,
                "password_env": None,
            },
            "tariff": {"retail_per_kwh": 0.30, "feed_in_per_kwh": 0.08},
            "grid": {"import_limit_w": 50_000.0, "export_limit_w": 50_000.0},
        },
        f"coordinator-{feeder}",
    )
    return Coordinator(config, ManualClock(T0), password=files.credentials[f.coordinator_user])


async def _started(c: Coordinator) -> Coordinator:
    """``c`` once connected, with its status on the bus now: its settle loop publishes it every
    STATUS_PERIOD_S, and the first try may come before the connection."""
    await c.bus.wait_connected(5)
    await c.bus.publish(
        topics.coordinator_status_topic(c.feeder), c.status().model_dump_json(), retain=True
    )
    return c


async def _until(condition: Callable[[], bool]) -> None:
    """Wait (5 s at most) until ``condition()`` holds."""
    for _ in range(250):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the condition did not hold within 5 s")


#: Each feeder's bids (site -> (side, price per kWh, kWh)) and each site's grid exchange (W).
BIDS = {
    "n-1": ("buy", 0.25, 2.0),
    "n-2": ("sell", 0.10, 3.0),
    "s-1": ("buy", 0.28, 1.0),
    "s-2": ("sell", 0.12, 4.0),
}
GRID_W = {"n-1": 3000.0, "n-2": -1000.0, "s-1": 500.0, "s-2": 0.0}


async def _site(
    files: FeedersBrokerFiles, site: str, got: list[tuple[str, bytes]], stack: AsyncExitStack
) -> BusClient:
    async def handle(topic: str, payload: bytes) -> None:
        got.append((topic, payload))

    bus = await stack.enter_async_context(BusClient(_settings(files, site), handler=handle))
    await bus.wait_connected(5)
    await bus.subscribe(topics.site_wildcard("award"))
    await bus.subscribe(topics.MARKET_CLEARING)
    return bus


@pytest.fixture
def coordinator_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The coordinators' log lines, shown when a test fails."""
    with caplog.at_level("INFO", logger="coordinator"):
        yield


async def _api_view(
    coordinators: dict[str, Coordinator], token: str
) -> tuple[FeedersSnapshot, Result]:
    """The operator view from each coordinator's HTTP API, directly and by ``wattmesh status``."""
    apis = {f: f"http://127.0.0.1:{c.api.port}" for f, c in coordinators.items() if c.api}
    from_api = await read_feeders_api(apis, token)
    cli = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["status", "--json", *(f"--api={f}={url}" for f, url in apis.items())],
        env={"WATTMESH_API_TOKEN": token},
    )
    return from_api, cli


def _assert_each_site_saw_only_its_feeder(
    got: dict[str, list[tuple[str, bytes]]], north: Clearing, south: Clearing
) -> None:
    """Each site received its own award and its own feeder's clearing, on the v1 topics."""
    for site, messages in got.items():
        feeder_clearing = north if site in NORTH else south
        # BusClient took the mount point off: the sites see the v1 topics.
        seen = {t for t, _ in messages}
        assert seen == {topics.site_topic(site, "award"), topics.MARKET_CLEARING}
        (clearing,) = [Clearing.model_validate_json(p) for t, p in messages if "clearing" in t]
        assert clearing.price_per_kwh == pytest.approx(feeder_clearing.price_per_kwh)
        assert clearing.volume_kwh == pytest.approx(feeder_clearing.volume_kwh)
        (award,) = [Award.model_validate_json(p) for t, p in messages if t.endswith("/award")]
        side, _, kwh = BIDS[site]
        expected = min(kwh, feeder_clearing.volume_kwh)
        assert award.quantity_kwh == pytest.approx(expected if side == "buy" else -expected)


async def _trade(site: str, bus: BusClient) -> None:
    """``site`` says its status (s-2: offline), sends a reading of ``GRID_W`` and its bid."""
    side, price, kwh = BIDS[site]
    step = [BidStep(price_per_kwh=price, quantity_kwh=kwh)]
    bid = Bid(ts=T0, interval=K, **{side: step})
    await bus.publish(
        topics.site_topic(site, "status"),
        Status(ts=T0, online=site != "s-2").model_dump_json(),
        retain=True,
    )
    await bus.publish(
        topics.site_topic(site, "telemetry"), _telemetry(T0, GRID_W[site]).model_dump_json()
    )
    await bus.publish(topics.site_topic(site, "bid"), bid.model_dump_json())


def _assert_same_view(
    rows: list[FeederRow], total: FeederRow, from_api: FeedersSnapshot, cli: Result
) -> None:
    """The APIs' view agrees with the bus's (the ledger keeps prices in micro-units)."""
    assert from_api.invalid == []
    api_rows, api_total = feeder_rows(from_api)
    for bus_row, api_row in zip([*rows, total], [*api_rows, api_total], strict=True):
        assert api_row.feeder == bus_row.feeder
        assert api_row.mode == bus_row.mode
        assert api_row.sites_online == bus_row.sites_online
        assert api_row.last_interval == bus_row.last_interval
        assert api_row.flow_w == pytest.approx(bus_row.flow_w)
        assert api_row.volume_kwh == pytest.approx(bus_row.volume_kwh)
        assert api_row.price_per_kwh == pytest.approx(bus_row.price_per_kwh, abs=1e-6)
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output)["total"] == asdict(api_total)


async def test_each_feeders_coordinator_clears_only_its_own_sites_and_the_operator_sums_them(
    feeders_broker: MosquittoProcess,
    feeders_files: FeedersBrokerFiles,
    tmp_path: Path,
    coordinator_logs: None,
) -> None:
    files = feeders_files
    got: dict[str, list[tuple[str, bytes]]] = {site: [] for site in BIDS}
    token = new_token()
    tokens_file = tmp_path / "api-tokens.toml"
    write_tokens(tokens_file, {"v": ApiToken("control-room", "viewer", hash_token(token))})
    async with AsyncExitStack() as stack:
        coordinators = {
            feeder: await _started(
                await stack.enter_async_context(_coordinator(files, feeder, tmp_path, tokens_file))
            )
            for feeder in ("north", "south")
        }
        for site in BIDS:
            await _trade(site, await _site(files, site, got[site], stack))
        await _until(
            lambda: all(
                len(c.bids.get(K, {})) == 2
                and len(c.sites) == 2
                and all(s.latest is not None for s in c.sites.values())
                for c in coordinators.values()
            )
        )
        # Each coordinator holds its own feeder's bids and readings only.
        assert set(coordinators["north"].bids[K]) == set(NORTH)
        assert set(coordinators["south"].bids[K]) == set(SOUTH)
        assert set(coordinators["north"].sites) == set(NORTH)
        clearings = {f: await c.clear_interval(K) for f, c in coordinators.items()}
        loop = asyncio.get_running_loop()
        for c in coordinators.values():
            await c.balance(loop.time())  # publishes the feeder's grid state now
        await _until(lambda: all(any(t == topics.MARKET_CLEARING for t, _ in got[s]) for s in BIDS))
        monitor = BusSettings(
            host=files.connect_host,
            port=files.port,
            username="monitor",
            password=files.credentials["monitor"],
            client_id="monitor",
            session_expiry_s=0,
        )
        snap = await read_feeders_status(monitor, 5.0, ("north", "south"))
        from_api, cli = await _api_view(coordinators, token)

    north, south = clearings["north"], clearings["south"]
    assert north is not None
    assert south is not None
    assert north.volume_kwh == pytest.approx(2.0)  # n-1 buys 2 of n-2's 3 kWh
    assert south.volume_kwh == pytest.approx(1.0)  # s-1 buys 1 of s-2's 4 kWh
    _assert_each_site_saw_only_its_feeder(got, north, south)

    # The operator's view: both feeders and their sum.
    rows, total = feeder_rows(snap, {"north": NORTH, "south": SOUTH})
    by_feeder = {r.feeder: r for r in rows}
    assert set(by_feeder) == {"north", "south"}
    assert (by_feeder["north"].sites_online, by_feeder["north"].sites_known) == (2, 2)
    assert (by_feeder["south"].sites_online, by_feeder["south"].sites_known) == (1, 2)
    assert by_feeder["north"].flow_w == pytest.approx(2000.0)
    assert by_feeder["south"].flow_w == pytest.approx(500.0)
    assert by_feeder["north"].volume_kwh == pytest.approx(2.0)
    assert by_feeder["south"].price_per_kwh == pytest.approx(south.price_per_kwh)
    assert (total.sites_online, total.sites_known) == (3, 4)
    assert total.flow_w == pytest.approx(2500.0)
    assert total.last_interval == K
    assert total.volume_kwh == pytest.approx(3.0)
    assert total.cleared_feeders == 2
    # The same view from each coordinator's HTTP API, and on the command line.
    _assert_same_view(rows, total, from_api, cli)


async def test_wattmesh_status_on_a_feeders_broker_dir_shows_each_feeder_and_the_total(
    feeders_broker: MosquittoProcess, feeders_files: FeedersBrokerFiles, tmp_path: Path
) -> None:
    files = feeders_files
    async with AsyncExitStack() as stack:
        for feeder in ("north", "south"):
            await _started(await stack.enter_async_context(_coordinator(files, feeder, tmp_path)))
        site = await stack.enter_async_context(BusClient(_settings(files, "n-1")))
        await site.wait_connected(5)
        await site.publish(
            topics.site_topic("n-1", "status"),
            Status(ts=T0, online=True).model_dump_json(),
            retain=True,
        )
        await site.publish(
            topics.site_topic("n-1", "telemetry"), _telemetry(T0, 1500.0).model_dump_json()
        )
        await asyncio.sleep(0.1)
        args = [sys.executable, "-m", "wattmesh", "status", "--broker-dir", str(files.directory)]
        json_run, table_run = await asyncio.gather(
            asyncio.to_thread(
                subprocess.run, [*args, "--json", "--wait", "5"], capture_output=True, text=True
            ),
            asyncio.to_thread(
                subprocess.run,
                [*args, "--wait", "5", "--user", "monitor"],
                capture_output=True,
                text=True,
            ),
        )
    assert json_run.returncode == 0, json_run.stderr + json_run.stdout
    view = json.loads(json_run.stdout)
    assert set(view["feeders"]) == {"north", "south"}
    assert view["feeders"]["north"]["coordinator"]["feeder"] == "north"
    assert view["feeders"]["north"]["sites_online"] == 1
    assert view["total"]["sites_known"] == 4
    assert view["total"]["sites_online"] == 1
    assert table_run.returncode == 0, table_run.stderr + table_run.stdout
    for word in ("north", "south", "total", "1/4"):
        assert word in table_run.stdout


def test_the_mount_point_of_a_feeder_is_its_topic_root() -> None:
    assert mount_point("north") == "feeder/north/"
    with pytest.raises(ValueError, match="feeder id"):
        mount_point("a/b")


def test_a_brokers_mount_point_comes_off_delivered_topics_and_nothing_else() -> None:
    bus = BusClient(BusSettings(mount_point="feeder/north/"))
    assert bus.local_topic("feeder/north/wattmesh/v1/market/clearing") == topics.MARKET_CLEARING
    assert bus.local_topic(topics.MARKET_CLEARING) == topics.MARKET_CLEARING  # 2.0.12 and later
    assert bus.local_topic("feeder/south/wattmesh/v1/x") == "feeder/south/wattmesh/v1/x"
    assert BusClient(BusSettings()).local_topic("feeder/north/a") == "feeder/north/a"


def test_a_site_or_coordinator_file_carries_its_listeners_mount_point() -> None:
    connection = BrokerConnection(port=1884, mount_point="feeder/north/")
    settings = connection.bus_settings(username="n-1", client_id="n-1")
    assert settings.mount_point == "feeder/north/"
    with pytest.raises(ValidationError, match="mount_point"):
        BrokerConnection(mount_point="feeder/north")  # a mount point ends with '/'


def _snapshot(
    clearings: dict[str, tuple[int, float, float]], flows: dict[str, float]
) -> FeedersSnapshot:
    snap = FeedersSnapshot()
    for feeder, (interval, price, kwh) in clearings.items():
        view = snap.feeders.setdefault(feeder, FeederView())
        view.clearing = Clearing(ts=T0, interval=interval, price_per_kwh=price, volume_kwh=kwh)
    for feeder, flow_w in flows.items():
        view = snap.feeders.setdefault(feeder, FeederView())
        mode = "constrained" if flow_w > 9000 else "normal"
        view.grid[feeder] = GridState(
            ts=T0, flow_w=flow_w, import_limit_w=1e4, export_limit_w=1e4, mode=mode
        )
    return snap


def test_the_total_adds_flows_and_only_the_newest_intervals_volumes() -> None:
    """A feeder whose coordinator is an interval behind adds its flow but not its older
    clearing; the total's mode is the worst feeder's, and a configured feeder that said
    nothing still counts its sites as known."""
    snap = _snapshot(
        {"a": (K, 0.20, 2.0), "b": (K, 0.25, 1.5), "c": (K - 1, 0.10, 9.0)},
        {"a": 9500.0, "b": -2000.0, "c": 1000.0},
    )
    snap.feeders["a"].sites["a-1"] = Status(ts=T0, online=True)
    snap.feeders["a"].sites["a-2"] = Status(ts=T0, online=False)
    rows, total = feeder_rows(snap, {"a": ("a-1", "a-2", "a-3"), "d": ("d-1",)})
    assert [r.feeder for r in rows] == ["a", "b", "c", "d"]
    assert (rows[0].sites_online, rows[0].sites_known) == (1, 3)
    assert rows[3].flow_w is None
    assert rows[3].sites_known == 1
    assert total.flow_w == pytest.approx(8500.0)
    assert total.mode == "constrained"
    assert total.last_interval == K
    assert total.volume_kwh == pytest.approx(3.5)  # a and b cleared K; c is still at K-1
    assert total.cleared_feeders == 2
    assert (total.sites_online, total.sites_known) == (1, 4)


def test_broker_init_takes_either_sites_or_a_feeders_file(broker_dir: Path) -> None:
    runner = CliRunner()
    feeders = str(ROOT / "config" / "feeders.toml")
    both = runner.invoke(
        app, ["broker", "init", str(broker_dir / "x"), "--sites", "a", "--feeders", feeders]
    )
    assert both.exit_code == 2
    assert "either --sites or --feeders" in both.output
    done = runner.invoke(
        app, ["broker", "init", str(broker_dir / "y"), "--feeders", feeders, "--port", "2883"]
    )
    assert done.exit_code == 0, done.output
    assert "feeder south: listener 127.0.0.1:1885, mount point feeder/south/" in done.output
    assert load_feeders_broker(broker_dir / "y").port == 2883  # --port moves the operator's
    bad = broker_dir / "bad.toml"
    bad.write_text('[[feeders]]\nid = "n"\nport = 0\nsites = ["a"]\n')
    refused = runner.invoke(app, ["broker", "init", str(broker_dir / "z"), "--feeders", str(bad)])
    assert refused.exit_code == 2
    assert "bad.toml: feeders.0.port" in refused.output


async def test_an_edge_agent_on_its_feeders_listener_takes_orders_on_the_v1_topics(
    broker_dir: Path, tmp_path: Path
) -> None:
    """A real agent with ``[broker] port`` and ``mount_point`` of its feeder: it acknowledges
    its own feeder's coordinator's order; the other feeder's coordinator sees none of it."""
    spec = two_feeders()
    north = spec.feeders[0].model_copy(update={"sites": (AGENT_SITE, "n-2")})
    files = write_feeders_broker_config(
        broker_dir, spec.model_copy(update={"feeders": (north, spec.feeders[1])})
    )
    got: dict[str, list[tuple[str, bytes]]] = {"north": [], "south": []}

    def collect(feeder: str) -> Callable[[str, bytes], Awaitable[None]]:
        async def handle(topic: str, payload: bytes) -> None:
            got[feeder].append((topic, payload))

        return handle

    async with (
        MosquittoProcess(files.conf, files.port),
        simulated_house() as house,
        BusClient(_settings(files, "coordinator-north"), handler=collect("north")) as c_north,
        BusClient(_settings(files, "coordinator-south"), handler=collect("south")) as c_south,
    ):
        for bus in (c_north, c_south):
            await bus.wait_connected(5)
            await bus.subscribe(f"{topics.PREFIX}/#")
        f = files.feeder("north")
        config = parse_edge_config(
            {
                "site": {"id": AGENT_SITE, "poll_interval_s": 0.2},
                "broker": {"port": f.port, "mount_point": f.mount_point},
                "devices": [
                    {"name": "pv", "kind": "pv_inverter", "url": house.urls["pv"]},
                    {"name": "battery", "kind": "battery", "url": house.urls["battery"]},
                    {"name": "meter", "kind": "sunspec_meter", "url": house.urls["meter"]},
                ],
                "spool": {"path": str(tmp_path / "spool.sqlite")},
                "dispatch_revert_s": 30,
            },
            "house-1.toml",
        )
        ack_topic = topics.site_topic(AGENT_SITE, "dispatch/ack")
        async with EdgeAgent(config, house.clock, password=files.credentials[AGENT_SITE]):
            await _until(lambda: any(t.endswith("/telemetry") for t, _ in got["north"]))
            now = house.clock.now()
            order = Dispatch(ts=now, battery_power_w=-2000.0, expires_ts=now + 600)
            await c_north.publish(
                topics.site_topic(AGENT_SITE, "dispatch"), order.model_dump_json()
            )
            await _until(lambda: any(t == ack_topic for t, _ in got["north"]))
        # The sentinel: south's own message after everything north's agent sent.
        await c_south.publish(topics.MARKET_CLEARING, b"{}", retain=False)
        await _until(lambda: any(t == topics.MARKET_CLEARING for t, _ in got["south"]))
    ack = DispatchAck.model_validate_json(next(p for t, p in got["north"] if t == ack_topic))
    assert ack.command_id == order.id
    assert ack.outcome == "accepted"
    assert house.battery.setpoint_w == -2000.0
    assert [t for t, _ in got["south"]] == [topics.MARKET_CLEARING]
