"""Edge brokers bridged into one feeder of a many-feeders core (``add_bridge_user(feeder=)``).

The core is ``write_feeders_broker_config``'s: feeder ``north`` (sites n-1, n-2) and ``south``
(s-1, s-2), each on its own listener with mount point ``feeder/{id}/``. Edge ``e1`` serves n-1
and n-2 and bridges into north. Everything over real Mosquitto processes: access is proved by
what subscribers receive (a sentinel published last ends a run), refusals of certificates by
what the TLS handshake answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt import ProtocolVersion
from typer.testing import CliRunner

from broker import topics
from broker.bridge import (
    BridgeConfig,
    BridgeCredentials,
    add_bridge_user,
    bridge_conf_text,
    bridge_kit_path,
    load_bridge_kit,
    write_edge_broker,
)
from broker.errors import BrokerConfigError
from broker.feeders import (
    FeedersBrokerFiles,
    load_feeders_broker,
    write_feeders_broker_config,
)
from broker.mosquitto import BrokerFiles, MosquittoProcess, write_broker_config
from tests.broker_fixtures import client_kwargs, free_port
from tests.feeders_fixtures import NORTH, feeders_toml, two_feeders
from tests.test_feeders_tls import CONNACK_ACCEPTED, _connect_over_tls
from wattmesh.cli import app

#: Test bridges reconnect after 1-2 s (production default: 2-30 s).
FAST_RESTART_S = (1, 2)


@pytest.fixture
def root(broker_dir: Path) -> Path:
    """A directory for a core and its edges that Mosquitto's user can enter (as root)."""
    broker_dir.chmod(0o755)
    return broker_dir


@contextlib.asynccontextmanager
async def _running(conf: Path, port: int) -> AsyncIterator[MosquittoProcess]:
    process = MosquittoProcess(conf, port)
    await process.start()
    try:
        yield process
    finally:
        await process.stop()
        print(f"--- {conf.parent} log:\n{process.log_tail(40)}")


def _core_client(files: FeedersBrokerFiles, user: str) -> aiomqtt.Client:
    """A raw MQTT 5 client on ``user``'s feeder's password listener (it sees mounted topics:
    Mosquitto 2.0.11 leaves the mount point on delivered topics)."""
    own = files.feeder_of(user)
    assert own is not None
    return aiomqtt.Client(
        files.connect_host,
        own.port,
        username=user,
        password=files.credentials[user],
        protocol=ProtocolVersion.V5,
        timeout=5.0,
    )


def _edge_client(files: BrokerFiles, user: str) -> aiomqtt.Client:
    return aiomqtt.Client(**client_kwargs(files, user))


async def _collect_until(
    client: aiomqtt.Client, sentinel: str, got: list[tuple[str, bytes]], timeout_s: float = 10
) -> None:
    """Append every message to ``got`` until one arrives on ``sentinel``."""
    async with asyncio.timeout(timeout_s):
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            got.append((message.topic.value, payload))
            if message.topic.value == sentinel:
                return


async def _until_bridged(
    site: aiomqtt.Client, coordinator: aiomqtt.Client, mount: str, timeout_s: float = 15
) -> None:
    """Publish n-1's status every 0.2 s until ``coordinator`` receives it (the bridge is up)."""
    status = topics.site_topic("n-1", "status")
    async with asyncio.timeout(timeout_s):
        while True:
            await site.publish(status, b"probe", qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    async for message in coordinator.messages:
                        if message.topic.value == f"{mount}{status}":
                            return


async def _until_revoked(
    files: FeedersBrokerFiles, user: str, listener: str, timeout_s: float = 10
) -> None:
    """Try ``user``'s certificate on ``listener`` every 0.1 s until the handshake refuses it."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                await asyncio.to_thread(_connect_over_tls, files, user, listener)
            except ssl.SSLError as err:
                if "CERTIFICATE_REVOKED" in str(err):
                    return
                raise
            await asyncio.sleep(0.1)


def _passwd_users(path: Path) -> list[str]:
    return [line.split(":", 1)[0] for line in path.read_text().splitlines() if line]


# -- the configuration -----------------------------------------------------------------------


def test_a_bridge_into_a_feeder_goes_into_that_feeders_passwd_acl_and_credentials(
    root: Path,
) -> None:
    core = write_feeders_broker_config(root / "core", two_feeders(tls_ports=True))
    kit = add_bridge_user(core.directory, "e1", ["n-1"], feeder="north")
    north, south = core.feeder("north"), core.feeder("south")
    assert "bridge-e1" in _passwd_users(north.password_file)
    assert "bridge-e1" not in _passwd_users(south.password_file)
    assert "bridge-e1" not in _passwd_users(core.directory / "passwd")  # the operator's
    acl = north.acl_file.read_text()
    block = acl[acl.index("user bridge-e1") :].splitlines()
    assert "topic write feeder/north/wattmesh/v1/site/n-1/telemetry" in block
    assert "topic read feeder/north/wattmesh/v1/site/n-1/dispatch" in block
    assert "topic write feeder/north/wattmesh/v1/bridge/e1/state" in block
    assert not [line for line in block if line.startswith("topic") and "feeder/north/" not in line]
    assert not [line for line in block if "n-2" in line or "s-1" in line]
    assert "bridge-e1" not in south.acl_file.read_text()
    after = load_feeders_broker(core.directory)
    assert after.feeder("north").bridge_users == ("bridge-e1",)
    assert after.feeder("south").bridge_users == ()
    assert after.feeder_of("bridge-e1") == after.feeder("north")
    assert after.credentials == {**core.credentials, "bridge-e1": kit.credentials.password}
    # Nothing else in credentials.toml changed.
    assert after == replace(
        core,
        feeders=(replace(north, bridge_users=("bridge-e1",)), south),
        credentials=after.credentials,
    )
    # The kit names north's listener; the edge's bridge takes the mount point off.
    assert (kit.feeder, kit.mount_point, kit.core_port) == ("north", "feeder/north/", north.port)
    assert load_bridge_kit(bridge_kit_path(core.directory, "e1")) == kit
    edge = write_edge_broker(root / "e1", kit, core=["127.0.0.1"], port=free_port())
    conf = edge.conf.read_text().splitlines()
    assert f"address 127.0.0.1:{north.port}" in conf
    assert "topic wattmesh/v1/site/n-1/award in 1" in conf
    assert 'topic wattmesh/v1/site/n-1/award in 1 "" feeder/north/' in conf
    assert 'topic wattmesh/v1/grid/+/state in 1 "" feeder/north/' in conf
    assert not [line for line in conf if line.endswith("feeder/north/") and " out " in line]


def test_a_bridge_config_refuses_a_mount_point_mosquitto_would_misread() -> None:
    creds = BridgeCredentials("bridge-e1", password="secret")
    for bad in ("feeder/north", "feeder/+/", "feeder/no rth/", "/"):
        with pytest.raises(BrokerConfigError, match="mount point"):
            BridgeConfig("e1", ("core:1884",), ("n-1",), creds, mount_point=bad)
    good = BridgeConfig("e1", ("core:1884",), ("n-1",), creds, mount_point="feeder/north/")
    assert 'topic wattmesh/v1/market/clearing in 1 "" feeder/north/' in bridge_conf_text(good)


def test_a_bridge_on_a_feeders_core_needs_the_feeder_of_its_sites(root: Path) -> None:
    core = write_feeders_broker_config(root / "core", two_feeders(tls_ports=True))
    before = {p.name: p.read_bytes() for p in core.directory.iterdir() if p.is_file()}
    with pytest.raises(BrokerConfigError, match=r"many-feeders broker.*--feeder.*north, south"):
        add_bridge_user(core.directory, "e1", ["n-1"])
    with pytest.raises(BrokerConfigError, match="'s-1' is not a site of feeder 'north'.*'south'"):
        add_bridge_user(core.directory, "e1", ["n-1", "s-1"], feeder="north")
    with pytest.raises(BrokerConfigError, match="'x-9' is not a site.*no feeder of this broker"):
        add_bridge_user(core.directory, "e1", ["x-9"], feeder="north")
    with pytest.raises(BrokerConfigError, match="no feeder 'east'"):
        add_bridge_user(core.directory, "e1", ["n-1"], feeder="east")
    after = {p.name: p.read_bytes() for p in core.directory.iterdir() if p.is_file()}
    assert after == before, "a refused bridge writes nothing"
    add_bridge_user(core.directory, "e1", ["n-1"], feeder="north")
    # A bridge user's name is broker-wide (its client id), also for another feeder.
    with pytest.raises(BrokerConfigError, match="already exists"):
        add_bridge_user(core.directory, "e1", ["s-1"], feeder="south")
    single = write_broker_config(root / "single", ["a-1"], port=free_port())
    with pytest.raises(BrokerConfigError, match="single-feeder broker: it has no feeder 'north'"):
        add_bridge_user(single.directory, "e1", ["a-1"], feeder="north")


def test_bridge_user_cli_takes_a_feeder_on_a_feeders_core_and_explains_it(
    root: Path,
) -> None:
    runner = CliRunner()
    core = write_feeders_broker_config(root / "core", two_feeders(tls_ports=True), tls=True)
    args = ["broker", "bridge-user", str(core.directory), "--edge", "e1", "--sites", "n-1"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    assert "--feeder" in refused.output
    result = runner.invoke(app, [*args, "--feeder", "north"])
    assert result.exit_code == 0, result.output
    north = core.feeder("north")
    assert f"feeder north's listeners (port {north.port}, TLS port {north.tls_port}" in (
        result.output
    )
    assert "revoked on the other TLS listeners: feeder south, operator" in result.output
    assert "kill -HUP" in result.output
    kit = bridge_kit_path(core.directory, "e1")
    edge_args = ["broker", "edge", str(root / "e1"), "--kit", str(kit), "--core", "127.0.0.1"]
    edge = runner.invoke(app, [*edge_args, "--port", str(free_port())])
    assert edge.exit_code == 0, edge.output
    assert f"bridge: bridge-e1 -> 127.0.0.1 (in {root / 'e1' / 'mosquitto.conf'})" in edge.output
    assert "into feeder north of a many-feeders core" in edge.output
    conf = (root / "e1" / "mosquitto.conf").read_text()
    assert f"address 127.0.0.1:{north.tls_port}" in conf
    assert 'topic wattmesh/v1/forecast/n-1 in 1 "" feeder/north/' in conf
    shown = " ".join(
        runner.invoke(app, ["broker", "bridge-user", "--help"], env={"COLUMNS": "100"})
        .output.replace("│", " ")
        .split()
    )
    assert "--feeder" in shown
    assert "broker init --feeders" in shown


# -- over real brokers -----------------------------------------------------------------------


async def test_an_edge_bridged_into_north_trades_with_north_only(root: Path) -> None:
    core = write_feeders_broker_config(root / "core", two_feeders(tls_ports=True))
    kit = add_bridge_user(core.directory, "e1", NORTH, feeder="north")
    core = load_feeders_broker(core.directory)
    edge = write_edge_broker(
        root / "e1",
        kit,
        core=["127.0.0.1"],
        port=free_port(),
        restart_timeout_s=FAST_RESTART_S,
    )
    mount = "feeder/north/"
    telemetry, award = topics.site_topic("n-1", "telemetry"), topics.site_topic("n-1", "award")
    dispatch, forecast = topics.site_topic("n-1", "dispatch"), topics.forecast_topic("n-1")
    clearing = topics.MARKET_CLEARING
    got_north: list[tuple[str, bytes]] = []
    got_south: list[tuple[str, bytes]] = []
    got_site: list[tuple[str, bytes]] = []
    got_retained: list[tuple[str, bytes]] = []
    got_state: list[tuple[str, bytes]] = []
    async with asyncio.timeout(60), _running(core.conf, core.port):
        async with _core_client(core, "coordinator-north") as north:
            # Retained on the core before the edge exists: the bridge's subscription fetches it.
            await north.publish(forecast, b"north forecast", qos=1, retain=True)
        async with _running(edge.conf, edge.port):
            async with (
                _core_client(core, "coordinator-north") as north,
                _core_client(core, "coordinator-south") as south,
                _edge_client(edge, "n-1") as site,
            ):
                await north.subscribe("wattmesh/v1/#", qos=1)
                await south.subscribe("wattmesh/v1/#", qos=1)
                await site.subscribe(award, qos=1)
                await site.subscribe(dispatch, qos=1)
                await site.subscribe(clearing, qos=1)
                await _until_bridged(site, north, mount)
                await site.publish(telemetry, b"reading", qos=1)
                # South's coordinator addresses n-1 on its own listener: south's tree, not north's.
                await south.publish(dispatch, b"from south", qos=1)
                await south.publish(award, b"from south", qos=1)
                await south.publish(clearing, b"south clearing", qos=1)  # south's sentinel
                await north.publish(award, b"north award", qos=1)
                await north.publish(dispatch, b"north dispatch", qos=1)
                await north.publish(clearing, b"north clearing", qos=1)  # the sentinel
                await _collect_until(site, clearing, got_site)
                await _collect_until(north, f"{mount}{clearing}", got_north)
                await _collect_until(south, f"feeder/south/{clearing}", got_south)
            async with _edge_client(edge, "n-1") as late:  # retained on the edge, plain topic
                await late.subscribe(forecast, qos=1)
                await _collect_until(late, forecast, got_retained)
        # The edge is gone: north's coordinator reads the link's state, retained, as 0.
        state = f"{mount}{topics.bridge_state_topic('e1')}"
        async with _core_client(core, "coordinator-north") as north:
            await north.subscribe(topics.BRIDGE_STATE_ALL, qos=1)
            await _collect_until(north, state, got_state)
    # The site on the edge receives north's orders on the plain v1 topics, and nothing of
    # south's; its telemetry reaches north's coordinator (under the mount point), not south's.
    assert got_site == [
        (award, b"north award"),
        (dispatch, b"north dispatch"),
        (clearing, b"north clearing"),
    ]
    assert (f"{mount}{telemetry}", b"reading") in got_north
    assert got_south == [
        ("feeder/south/wattmesh/v1/site/n-1/dispatch", b"from south"),
        ("feeder/south/wattmesh/v1/site/n-1/award", b"from south"),
        ("feeder/south/wattmesh/v1/market/clearing", b"south clearing"),
    ]
    assert got_retained == [(forecast, b"north forecast")]
    assert got_state == [(state, b"0")]


async def test_a_bridge_certificate_issued_later_is_revoked_elsewhere_after_sighup(
    root: Path,
) -> None:
    """Mosquitto 2.0.11 rereads crlfile on SIGHUP: before it, south's TLS listener still
    accepts the new bridge certificate; after it, only north's accepts it, and the edge's
    bridge carries telemetry to north over mutual TLS."""
    core = write_feeders_broker_config(root / "core", two_feeders(tls_ports=True), tls=True)
    north = core.feeder("north")
    telemetry = topics.site_topic("n-2", "telemetry")
    got: list[tuple[str, bytes]] = []
    async with asyncio.timeout(60), _running(core.conf, core.port) as process:
        kit = add_bridge_user(core.directory, "e1", NORTH, feeder="north")
        files = load_feeders_broker(core.directory)
        assert kit.credentials.tls
        assert kit.core_connect_port == north.tls_port
        before = await asyncio.to_thread(_connect_over_tls, files, "bridge-e1", "south")
        assert process.pid is not None
        os.kill(process.pid, signal.SIGHUP)
        await _until_revoked(files, "bridge-e1", "south")  # Mosquitto reloads in its loop
        for listener in ("south", "operator"):
            with pytest.raises(ssl.SSLError, match="CERTIFICATE_REVOKED"):
                await asyncio.to_thread(_connect_over_tls, files, "bridge-e1", listener)
        on_north = await asyncio.to_thread(_connect_over_tls, files, "bridge-e1", "north")
        # The certificates written by `init` are still judged as before.
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REVOKED"):
            await asyncio.to_thread(_connect_over_tls, files, "n-1", "south")
        own = await asyncio.to_thread(_connect_over_tls, files, "s-1", "south")
        edge = write_edge_broker(
            root / "e1",
            kit,
            core=["127.0.0.1"],
            port=free_port(),
            restart_timeout_s=FAST_RESTART_S,
        )
        assert f"address 127.0.0.1:{north.tls_port}" in edge.conf.read_text()
        async with (
            _running(edge.conf, edge.port),
            _core_client(files, "coordinator-north") as coordinator,
            _edge_client(edge, "n-1") as site,
            _edge_client(edge, "n-2") as other,
        ):
            await coordinator.subscribe("wattmesh/v1/#", qos=1)
            await _until_bridged(site, coordinator, north.mount_point)
            await other.publish(telemetry, b"over tls", qos=1)
            await _collect_until(coordinator, f"{north.mount_point}{telemetry}", got)
    assert before == CONNACK_ACCEPTED, "the old CRL did not list the new certificate"
    assert on_north == own == CONNACK_ACCEPTED
    assert got[-1] == (f"{north.mount_point}{telemetry}", b"over tls")


async def test_init_force_adds_a_feeders_bridge_again_whose_new_kit_logs_in_only_there(
    root: Path,
) -> None:
    """``broker init --force`` rewrites every passwd, ACL and CRL; the bridge user that
    ``bridge-user`` added comes back from bridges.toml with a new password and a certificate
    from the new CA, in north's files only, revoked on south's and the operator's TLS
    listeners."""
    spec = two_feeders(tls_ports=True)
    feeders_file = root / "feeders.toml"
    feeders_file.write_text(feeders_toml(spec))
    init = ["broker", "init", str(root / "core"), "--feeders", str(feeders_file), "--tls"]
    first = CliRunner().invoke(app, init)
    assert first.exit_code == 0, first.output
    old = add_bridge_user(root / "core", "e1", ["n-1"], feeder="north")
    assert old.credentials.cert is not None
    old_cert = old.credentials.cert.read_bytes()
    again = CliRunner().invoke(app, [*init, "--force"])
    assert again.exit_code == 0, again.output
    assert "kept bridge user bridge-e1 into feeder north (sites n-1)" in again.output
    core = load_feeders_broker(root / "core")
    assert [f.bridge_users for f in core.feeders] == [("bridge-e1",), ()]
    assert "bridge-e1" in _passwd_users(core.feeder("north").password_file)
    assert "bridge-e1" not in _passwd_users(core.feeder("south").password_file)
    assert "user bridge-e1" in core.feeder("north").acl_file.read_text()
    kit = load_bridge_kit(bridge_kit_path(core.directory, "e1"))
    assert (kit.feeder, kit.sites) == ("north", ("n-1",))
    assert kit.credentials.password == core.credentials["bridge-e1"] != old.credentials.password
    assert kit.credentials.cert is not None
    assert core.tls is not None
    assert kit.credentials.cert.read_bytes() == core.tls.client_certs["bridge-e1"].read_bytes()
    assert kit.credentials.cert.read_bytes() != old_cert
    async with asyncio.timeout(30), _running(core.conf, core.port):
        on_north = await asyncio.to_thread(_connect_over_tls, core, "bridge-e1", "north")
        for listener in ("south", "operator"):
            with pytest.raises(ssl.SSLError, match="CERTIFICATE_REVOKED"):
                await asyncio.to_thread(_connect_over_tls, core, "bridge-e1", listener)
        async with aiomqtt.Client(
            core.connect_host,
            core.feeder("north").port,
            username=kit.credentials.user,
            password=kit.credentials.password,
            protocol=ProtocolVersion.V5,
            timeout=5.0,
        ):
            pass  # the kit's new password logs in on north's password listener
    assert on_north == CONNACK_ACCEPTED
