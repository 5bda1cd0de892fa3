"""Many feeders over mutual TLS (``wattmesh broker init DIR --feeders F --tls``).

Each feeder gets a TLS listener of its own (same mount point and ACL as its password listener,
client certificate = user); one CA signs every certificate, and each TLS listener's CRL revokes
the certificates of the users that belong to the other feeders. Every broker test runs a real
Mosquitto on what ``write_feeders_broker_config`` writes: feeder ``north`` (sites n-1, n-2) and
``south`` (s-1, s-2). Access is proved by what subscribers receive (a sentinel published last
ends a run), and refusals by what the TLS handshake answers.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt import ProtocolVersion, TLSParameters
from cryptography import x509
from typer.testing import CliRunner

from broker import topics
from broker.client import BusClient, BusSettings
from broker.errors import BrokerConfigError
from broker.feeders import (
    FeedersBrokerFiles,
    load_feeders_broker,
    write_feeders_broker_config,
)
from broker.mosquitto import MosquittoProcess
from broker.settings import BrokerConnection
from tests.feeders_fixtures import NORTH, SOUTH, two_feeders
from wattmesh.cli import app

ROOT = Path(__file__).resolve().parent.parent
#: An MQTT 3.1.1 CONNECT (clean session, keep-alive 60 s, empty client id: the broker takes
#: the certificate's CN) and the CONNACK that accepts it.
CONNECT = bytes.fromhex("100c00044d5154540402003c0000")
CONNACK_ACCEPTED = bytes.fromhex("20020000")


@pytest.fixture
def tls_files(broker_dir: Path) -> FeedersBrokerFiles:
    """Two feeders with password and TLS listeners, and the operator's two listeners."""
    return write_feeders_broker_config(broker_dir, two_feeders(tls_ports=True), tls=True)


@pytest.fixture
async def tls_broker(tls_files: FeedersBrokerFiles) -> AsyncIterator[MosquittoProcess]:
    process = MosquittoProcess(tls_files.conf, tls_files.port)
    await process.start()
    try:
        yield process
    finally:
        await process.stop()
        print(f"mosquitto log:\n{process.log_tail(60)}")


def _tls_port(files: FeedersBrokerFiles, listener: str) -> int:
    port = files.tls_port if listener == "operator" else files.feeder(listener).tls_port
    assert port is not None
    return port


def _tls_client(files: FeedersBrokerFiles, user: str, listener: str) -> aiomqtt.Client:
    """An MQTT 5 client for ``user`` on ``listener``'s TLS port, with its certificate only."""
    assert files.tls is not None
    return aiomqtt.Client(
        "127.0.0.1",
        _tls_port(files, listener),
        protocol=ProtocolVersion.V5,
        timeout=5.0,
        tls_params=TLSParameters(
            ca_certs=str(files.tls.ca_cert),
            certfile=str(files.tls.client_certs[user]),
            keyfile=str(files.tls.client_keys[user]),
        ),
    )


def _password_client(files: FeedersBrokerFiles, user: str) -> aiomqtt.Client:
    """An MQTT 5 client for a coordinator on its feeder's password listener (127.0.0.1)."""
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


def _connect_over_tls(files: FeedersBrokerFiles, user: str, listener: str) -> bytes:
    """Send an MQTT CONNECT over TLS 1.2 with ``user``'s certificate; the broker's first 4
    bytes. ``ssl.SSLError`` with the broker's alert when it refuses the certificate: TLS 1.2
    checks it inside the handshake (under TLS 1.3 the refusal comes after the handshake, and a
    client writing at that moment may see only the closed connection)."""
    assert files.tls is not None
    context = ssl.create_default_context(cafile=str(files.tls.ca_cert))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.tls.client_certs[user], files.tls.client_keys[user])
    with (
        socket.create_connection(("127.0.0.1", _tls_port(files, listener)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(CONNECT)
        return tls.recv(4)


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


def _listener_blocks(conf: str) -> dict[int, str]:
    """Each ``listener`` block of a Mosquitto configuration, by port."""
    blocks = re.split(r"^(?=listener )", conf, flags=re.MULTILINE)[1:]
    return {int(block.split()[1]): block for block in blocks}


def _revoked(crl_file: Path) -> set[int]:
    crl = x509.load_pem_x509_crl(crl_file.read_bytes())
    return {entry.serial_number for entry in crl}


def _serial(cert_file: Path) -> int:
    return x509.load_pem_x509_certificate(cert_file.read_bytes()).serial_number


# -- the configuration ---------------------------------------------------------------------


def test_each_feeder_gets_a_tls_listener_with_its_mount_point_acl_and_a_crl_of_the_others(
    broker_dir: Path,
) -> None:
    files = write_feeders_broker_config(
        broker_dir, two_feeders(tls_ports=True), host="0.0.0.0", tls=True
    )
    assert files.tls is not None
    blocks = _listener_blocks(files.conf.read_text())
    serial = {user: _serial(path) for user, path in files.tls.client_certs.items()}
    assert set(serial) == {
        *("operator", "monitor", "weather", "coordinator-north", "coordinator-south"),
        *NORTH,
        *SOUTH,
    }
    for f in files.feeders:
        assert f.tls_port is not None
        assert f.crl_file is not None
        # Passwords on this machine only; TLS on the given host (every address).
        assert blocks[f.port].startswith(f"listener {f.port} 127.0.0.1\n")
        tls = blocks[f.tls_port]
        assert tls.startswith(f"listener {f.tls_port}\n")
        for line in (
            f"mount_point {f.mount_point}",
            f"acl_file {f.acl_file}",
            f"crlfile {f.crl_file}",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
        ):
            assert f"\n{line}\n" in tls
        # The CRL revokes exactly the other feeder's coordinator and sites, and the area's
        # weather service (it publishes through the operator listener).
        others = [u for g in files.feeders if g.id != f.id for u in g.users]
        assert _revoked(f.crl_file) == {serial[u] for u in [*others, "weather"]}
    assert files.tls_port is not None
    assert files.operator_crl_file is not None
    assert "mount_point" not in blocks[files.tls_port]
    assert f"acl_file {files.directory / 'acl'}" in blocks[files.tls_port]
    observers = {serial["operator"], serial["monitor"], serial["weather"]}
    assert _revoked(files.operator_crl_file) == set(serial.values()) - observers
    assert load_feeders_broker(broker_dir) == files


def test_tls_needs_every_feeders_tls_port_and_distinct_ports(broker_dir: Path) -> None:
    spec = two_feeders(tls_ports=True)
    north, south = spec.feeders
    without = spec.model_copy(
        update={"feeders": (north, south.model_copy(update={"tls_port": None}))}
    )
    with pytest.raises(BrokerConfigError, match="missing for: south"):
        write_feeders_broker_config(broker_dir / "a", without, tls=True)
    clash = spec.model_copy(
        update={"feeders": (north, south.model_copy(update={"tls_port": north.tls_port}))}
    )
    with pytest.raises(BrokerConfigError, match="its own port"):
        write_feeders_broker_config(broker_dir / "b", clash, tls=True)
    assert not (broker_dir / "a").exists()
    assert not (broker_dir / "b").exists()
    # Without TLS the file's TLS ports are not used.
    plain = write_feeders_broker_config(broker_dir / "c", without)
    assert plain.tls is None
    assert all(f.tls_port is None for f in plain.feeders)
    assert "crlfile" not in plain.conf.read_text()


def test_broker_init_with_feeders_and_tls_names_every_tls_listener(broker_dir: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "broker",
            "init",
            str(broker_dir / "x"),
            "--feeders",
            str(ROOT / "config" / "feeders.toml"),
            "--tls",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "feeder north: listener 127.0.0.1:1884, mount point feeder/north/" in result.output
    assert "TLS listener 127.0.0.1:8884 (client certificate = user" in result.output
    assert "TLS listener 127.0.0.1:8883 (operator, monitor and weather only)" in result.output
    files = load_feeders_broker(broker_dir / "x")
    assert [f.tls_port for f in files.feeders] == [8884, 8885]
    assert files.tls is not None
    assert files.tls.client_certs["house-2"].is_file()


# -- over a real broker --------------------------------------------------------------------


def _site_bus(files: FeedersBrokerFiles, site: str) -> BusSettings:
    """A site's bus settings from its file's ``[broker]`` section on its feeder's TLS port."""
    own = files.feeder_of(site)
    assert own is not None
    assert own.tls_port is not None
    assert files.tls is not None
    connection = BrokerConnection(
        port=own.tls_port,
        mount_point=own.mount_point,
        ca_file=files.tls.ca_cert,
        cert_file=files.tls.client_certs[site],
        key_file=files.tls.client_keys[site],
    )
    return connection.bus_settings(username=site, client_id=site)


async def test_a_site_over_tls_sees_only_its_own_feeders_topics(
    tls_broker: MosquittoProcess, tls_files: FeedersBrokerFiles
) -> None:
    """n-1's agent settings (certificate, north's TLS port and mount point) on a BusClient."""
    files = tls_files
    clearing_topic = topics.MARKET_CLEARING
    got_site: list[tuple[str, bytes]] = []
    got_north: list[tuple[str, bytes]] = []
    got_south: list[tuple[str, bytes]] = []
    got_monitor: list[tuple[str, bytes]] = []

    async def on_site(topic: str, payload: bytes) -> None:
        got_site.append((topic, payload))

    async with (
        _password_client(files, "coordinator-north") as north,
        _password_client(files, "coordinator-south") as south,
        _tls_client(files, "monitor", "operator") as monitor,
        BusClient(_site_bus(files, "n-1"), handler=on_site) as site,
    ):
        await site.wait_connected(5)
        for client in (north, south):
            await client.subscribe(f"{topics.PREFIX}/#", qos=1)
        await site.subscribe(f"{topics.PREFIX}/#")
        await monitor.subscribe("feeder/#", qos=1)
        await site.publish(topics.site_topic("n-1", "telemetry"), b"reading")
        await site.publish(topics.site_topic("s-1", "telemetry"), b"forged")
        await south.publish(clearing_topic, b"south-clearing", qos=1)
        await south.publish(topics.site_topic("n-1", "award"), b"south-award", qos=1)
        await north.publish(topics.site_topic("n-1", "award"), b"north-award", qos=1)
        await north.publish(clearing_topic, b"north-clearing", qos=1)  # the sentinel
        async with asyncio.timeout(5):
            while (clearing_topic, b"north-clearing") not in got_site:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await _collect_until(north, f"feeder/north/{clearing_topic}", got_north)
        await _collect_until(south, f"feeder/south/{clearing_topic}", got_south)
        await _collect_until(monitor, f"feeder/north/{clearing_topic}", got_monitor)
    # BusClient took the mount point off. n-1's ACL grants it its own award, dispatch and
    # forecast, the clearing and grid states: not its own telemetry, nor south's anything.
    assert got_site == [
        (topics.site_topic("n-1", "award"), b"north-award"),
        (clearing_topic, b"north-clearing"),
    ]
    assert ("feeder/north/wattmesh/v1/site/n-1/telemetry", b"reading") in got_north
    assert [p for _, p in got_north].count(b"forged") == 0
    assert got_south == [
        ("feeder/south/wattmesh/v1/market/clearing", b"south-clearing"),
    ]
    # The monitor's certificate works on the operator's TLS listener: every feeder.
    assert [t for t, _ in got_monitor] == [
        "feeder/north/wattmesh/v1/site/n-1/telemetry",
        "feeder/south/wattmesh/v1/market/clearing",
        "feeder/south/wattmesh/v1/site/n-1/award",  # south's own tree: no n-1 reads it
        "feeder/north/wattmesh/v1/site/n-1/award",
        "feeder/north/wattmesh/v1/market/clearing",
    ]


@pytest.mark.parametrize(
    ("user", "listener", "own"),
    [
        ("n-1", "south", "north"),
        ("coordinator-south", "north", "south"),
        ("s-2", "operator", "south"),
        ("weather", "north", "operator"),
    ],
)
async def test_a_certificate_is_refused_in_the_handshake_of_a_listener_it_does_not_belong_to(
    tls_broker: MosquittoProcess,
    tls_files: FeedersBrokerFiles,
    user: str,
    listener: str,
    own: str,
) -> None:
    """One CA signs every certificate, so only the listener's CRL keeps another feeder's
    users out: Mosquitto's use_identity_as_username reads no password file."""
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REVOKED"):
        await asyncio.to_thread(_connect_over_tls, tls_files, user, listener)
    # The same certificate on its own feeder's TLS listener is accepted.
    assert await asyncio.to_thread(_connect_over_tls, tls_files, user, own) == CONNACK_ACCEPTED
    # The monitor's certificate is accepted on every TLS listener.
    accepted = await asyncio.to_thread(_connect_over_tls, tls_files, "monitor", listener)
    assert accepted == CONNACK_ACCEPTED
