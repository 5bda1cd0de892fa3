"""The Mosquitto configuration against a real broker: users, ACL, persistence, TLS, CLI.

Access rules are proved by what a subscriber receives (a refused PUBLISH is acknowledged and a
refused SUBSCRIBE granted): each check sends the forbidden messages first and a permitted one
last over the same path, so the subscriber would have seen a forbidden one before the last.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from typer.testing import CliRunner

import broker.mosquitto
from broker.client import BusClient, BusSettings
from broker.errors import BrokerConfigError, BrokerProcessError
from broker.mosquitto import (
    BrokerFiles,
    MosquittoProcess,
    find_mosquitto,
    load_broker_files,
    mosquitto_password_hash,
    pid_file_path,
    write_broker_config,
)
from broker.topics import (
    HA_OBJECTS,
    MARKET_CLEARING,
    PREFIX,
    forecast_topic,
    grid_state_topic,
    ha_discovery_topic,
    ha_state_topic,
    site_topic,
)
from tests.broker_fixtures import MqttClientFactory, client_kwargs, free_port
from wattmesh.broker_cli import broker_app

ALL = f"{PREFIX}/#"
ROOT = Path(__file__).resolve().parent.parent
#: Where the coordinator publishes its retained health counters.
COORDINATOR_STATUS = f"{PREFIX}/coordinator/main/status"


async def receive_until(client: aiomqtt.Client, last_topic: str) -> list[tuple[str, bytes]]:
    """(topic, payload) of every message up to and including the first on ``last_topic``."""
    got: list[tuple[str, bytes]] = []
    async for message in client.messages:
        assert isinstance(message.payload, bytes)
        got.append((message.topic.value, message.payload))
        if message.topic.value == last_topic:
            return got
    raise AssertionError("the message stream ended")


def topics(messages: list[tuple[str, bytes]]) -> list[str]:
    return [topic for topic, _ in messages]


# --- access rules ----------------------------------------------------------------------------


async def test_coordinator_dispatch_reaches_the_site(
    mosquitto: MosquittoProcess, mqtt_client: MqttClientFactory
) -> None:
    dispatch = site_topic("site-a", "dispatch")
    async with asyncio.timeout(10):
        async with mqtt_client("site-a") as site, mqtt_client("coordinator") as coordinator:
            await site.subscribe(dispatch, qos=1)
            await coordinator.publish(dispatch, b'{"setpoint_w": -2000}', qos=1)
            assert await receive_until(site, dispatch) == [(dispatch, b'{"setpoint_w": -2000}')]


async def test_site_cannot_publish_on_other_sites_or_coordinator_topics(
    mosquitto: MosquittoProcess, mqtt_client: MqttClientFactory
) -> None:
    forbidden = [
        *(site_topic("site-b", kind) for kind in ("status", "telemetry", "bid", "dispatch/ack")),
        site_topic("site-a", "award"),
        forecast_topic("site-a"),
        MARKET_CLEARING,
        grid_state_topic("feeder-1"),
        f"{PREFIX}/site/site-a/telemetry/extra",
        "elsewhere/topic",
    ]
    own = site_topic("site-a", "telemetry")
    async with asyncio.timeout(10):
        async with mqtt_client("coordinator") as coordinator, mqtt_client("site-a") as site:
            await coordinator.subscribe(ALL, qos=1)
            await coordinator.subscribe("elsewhere/#", qos=1)
            for topic in forbidden:
                await site.publish(topic, b"forged", qos=1)
            for kind in ("status", "bid", "dispatch/ack"):
                await site.publish(site_topic("site-a", kind), b"ok", qos=1)
            await site.publish(own, b"legit", qos=1)
            got = await receive_until(coordinator, own)
    assert topics(got) == [
        site_topic("site-a", "status"),
        site_topic("site-a", "bid"),
        site_topic("site-a", "dispatch/ack"),
        own,
    ]
    assert (own, b"legit") in got


async def test_site_cannot_send_dispatch_commands(
    mosquitto: MosquittoProcess, mqtt_client: MqttClientFactory
) -> None:
    ack = site_topic("site-a", "dispatch/ack")
    async with asyncio.timeout(10):
        async with (
            mqtt_client("coordinator") as coordinator,
            mqtt_client("site-a") as site_a,
            mqtt_client("site-b") as site_b,
        ):
            await coordinator.subscribe(ALL, qos=1)
            await site_b.subscribe(site_topic("site-b", "dispatch"), qos=1)
            await site_b.subscribe(site_topic("site-b", "award"), qos=1)
            await site_a.publish(site_topic("site-a", "dispatch"), b"self-dispatch", qos=1)
            await site_a.publish(site_topic("site-b", "dispatch"), b"attack", qos=1)
            await site_a.publish(site_topic("site-b", "award"), b"attack", qos=1)
            await site_a.publish(ack, b"legit", qos=1)
            assert await receive_until(coordinator, ack) == [(ack, b"legit")]
            # site-b got nothing either: the coordinator's award is the first it sees.
            award_b = site_topic("site-b", "award")
            await coordinator.publish(award_b, b"award", qos=1)
            assert await receive_until(site_b, award_b) == [(award_b, b"award")]


async def test_site_cannot_read_other_sites_commands_or_telemetry(
    mosquitto: MosquittoProcess, mqtt_client: MqttClientFactory
) -> None:
    secrets_of_a = [
        site_topic("site-a", "dispatch"),
        site_topic("site-a", "award"),
        forecast_topic("site-a"),
    ]
    award_b = site_topic("site-b", "award")
    award_h = site_topic("house-1", "award")
    async with asyncio.timeout(10):
        async with (
            mqtt_client("coordinator") as coordinator,
            mqtt_client("site-a") as site_a,
            mqtt_client("site-b") as site_b,
            mqtt_client("house-1") as house,
        ):
            for topic in secrets_of_a:
                await site_a.subscribe(topic, qos=1)
                await site_b.subscribe(topic, qos=1)  # granted, but nothing is delivered
            await site_b.subscribe(award_b, qos=1)
            await house.subscribe(ALL, qos=1)  # a wildcard reaches only what house-1 may read
            await house.subscribe("#", qos=1)

            await site_a.publish(site_topic("site-a", "telemetry"), b"private", qos=1)
            await site_a.publish(site_topic("site-a", "status"), b"online", qos=1, retain=True)
            for topic in secrets_of_a:
                await coordinator.publish(topic, b"for site-a", qos=1)
            await coordinator.publish(award_b, b"for site-b", qos=1)
            await coordinator.publish(award_h, b"for house-1", qos=1)

            assert topics(await receive_until(site_a, secrets_of_a[-1])) == secrets_of_a
            assert await receive_until(site_b, award_b) == [(award_b, b"for site-b")]
            assert await receive_until(house, award_h) == [(award_h, b"for house-1")]


async def test_site_reads_market_clearing_grid_state_and_own_forecast(
    mosquitto: MosquittoProcess, mqtt_client: MqttClientFactory
) -> None:
    grid = grid_state_topic("feeder-1")
    forecast = forecast_topic("house-1")
    async with asyncio.timeout(10):
        async with mqtt_client("coordinator") as coordinator:
            await coordinator.publish(MARKET_CLEARING, b"price", qos=1, retain=True)
            await coordinator.publish(grid, b"normal", qos=1, retain=True)
            await coordinator.publish(forecast, b"sunny", qos=1, retain=True)
        async with mqtt_client("house-1") as house:
            await house.subscribe(MARKET_CLEARING, qos=1)
            await house.subscribe(f"{PREFIX}/grid/+/state", qos=1)
            await house.subscribe(forecast, qos=1)
            got = [await anext(house.messages) for _ in range(3)]
            assert sorted((m.topic.value, m.payload) for m in got) == sorted(
                [(MARKET_CLEARING, b"price"), (grid, b"normal"), (forecast, b"sunny")]
            )
            # Live messages too, not only retained ones.
            async with mqtt_client("coordinator") as coordinator:
                await coordinator.publish(grid, b"emergency", qos=1)
            assert await receive_until(house, grid) == [(grid, b"emergency")]


async def test_site_publishes_only_its_own_home_assistant_discovery_and_state_topics(
    mosquitto: MosquittoProcess, mqtt_client: MqttClientFactory
) -> None:
    """Home Assistant's user (the monitor) sees site-a's own discovery configs and state, and
    none of site-a's attempts on another site's, on an unlisted object or component, on Home
    Assistant's own status or elsewhere under the prefix; sites read none of it."""
    own = [ha_discovery_topic("homeassistant", "site-a", obj) for obj in HA_OBJECTS]
    state = ha_state_topic("site-a")
    forbidden = [
        *(ha_discovery_topic("homeassistant", "site-b", obj) for obj in HA_OBJECTS),
        ha_state_topic("site-b"),
        "homeassistant/sensor/wattmesh-site-a/other/config",
        "homeassistant/switch/wattmesh-site-a/pv_power/config",
        "homeassistant/sensor/wattmesh-site-a/pv_power/config/extra",
        "homeassistant/sensor/pv_power/config",
        "homeassistant/status",
        f"{PREFIX}/site/site-a/ha/command",
    ]
    async with asyncio.timeout(10):
        async with (
            mqtt_client("monitor") as monitor,
            mqtt_client("site-a") as site_a,
            mqtt_client("site-b") as site_b,
        ):
            await monitor.subscribe("homeassistant/#", qos=1)
            await monitor.subscribe(ALL, qos=1)
            await site_b.subscribe("homeassistant/#", qos=1)  # granted, nothing delivered
            await site_b.subscribe(state, qos=1)
            await site_b.subscribe(site_topic("site-b", "award"), qos=1)
            for topic in forbidden:
                await site_a.publish(topic, b"forged", qos=1)
            for topic in own:
                await site_a.publish(topic, b"{}", qos=1, retain=True)
            await site_a.publish(state, b"{}", qos=1, retain=True)
            got = await receive_until(monitor, state)
            assert topics(got) == [*own, state]
            async with mqtt_client("coordinator") as coordinator:
                award_b = site_topic("site-b", "award")
                await coordinator.publish(award_b, b"award", qos=1)
                assert await receive_until(site_b, award_b) == [(award_b, b"award")]
        # The configs are retained: Home Assistant started later still discovers them.
        async with mqtt_client("monitor") as later:
            await later.subscribe("homeassistant/sensor/#", qos=1)
            retained = [await anext(later.messages) for _ in own]
            assert sorted(m.topic.value for m in retained) == sorted(own)
            assert all(m.retain for m in retained)


async def test_operator_dispatches_any_site_and_reads_all_but_publishes_nothing_else(
    mosquitto: MosquittoProcess, mqtt_client: MqttClientFactory
) -> None:
    dispatch_b = site_topic("site-b", "dispatch")
    dispatch_h = site_topic("house-1", "dispatch")
    telemetry = site_topic("site-a", "telemetry")
    async with asyncio.timeout(10):
        async with (
            mqtt_client("coordinator") as coordinator,
            mqtt_client("operator") as operator,
            mqtt_client("site-a") as site_a,
        ):
            await coordinator.subscribe(ALL, qos=1)
            await operator.subscribe(ALL, qos=1)
            await operator.publish(dispatch_b, b"limit", qos=1)
            await operator.publish(MARKET_CLEARING, b"forged", qos=1)
            await operator.publish(site_topic("site-b", "telemetry"), b"forged", qos=1)
            await operator.publish(site_topic("site-b", "award"), b"forged", qos=1)
            await operator.publish(dispatch_h, b"limit", qos=1)
            assert topics(await receive_until(coordinator, dispatch_h)) == [dispatch_b, dispatch_h]
            await site_a.publish(telemetry, b"reading", qos=1)
            got = await receive_until(operator, telemetry)
            assert topics(got) == [dispatch_b, dispatch_h, telemetry]


@pytest.mark.parametrize(
    ("user", "password"),
    [(None, None), ("site-a", "wrong"), ("site-a", "use-coordinator's"), ("intruder", "x")],
)
async def test_clients_without_valid_credentials_are_refused(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, user: str | None, password: str | None
) -> None:
    if password == "use-coordinator's":
        password = broker_files.credentials["coordinator"]
    kwargs = client_kwargs(broker_files, "site-a", username=user, password=password)
    async with asyncio.timeout(10):
        with pytest.raises(aiomqtt.MqttCodeError) as caught:
            async with aiomqtt.Client(**kwargs):
                pass
    # Mosquitto 2.0 answers 135 (Not authorized); 134 is "Bad user name or password".
    assert caught.value.rc is not None
    assert getattr(caught.value.rc, "value", caught.value.rc) in (134, 135)


# --- persistence and process control ---------------------------------------------------------


async def test_retained_messages_and_queued_session_messages_survive_a_restart(
    mosquitto: MosquittoProcess, mqtt_client: MqttClientFactory
) -> None:
    dispatch = site_topic("site-a", "dispatch")
    session = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    session.SessionExpiryInterval = 3600

    def gateway() -> aiomqtt.Client:
        return mqtt_client(
            "site-a", identifier="site-a-gateway", clean_start=False, properties=session
        )

    async with asyncio.timeout(15):
        async with gateway() as site:
            await site.subscribe(dispatch, qos=1)
        async with mqtt_client("coordinator") as coordinator:
            await coordinator.publish(MARKET_CLEARING, b"cleared", qos=1, retain=True)
            await coordinator.publish(dispatch, b"while away", qos=1)

        assert await mosquitto.stop() == 0
        await mosquitto.start()

        async with gateway() as site:  # the session and its queued command came back
            assert await receive_until(site, dispatch) == [(dispatch, b"while away")]
        async with mqtt_client("house-1") as house:
            await house.subscribe(MARKET_CLEARING, qos=1)
            assert await receive_until(house, MARKET_CLEARING) == [(MARKET_CLEARING, b"cleared")]


async def test_kill_then_start_again(
    mosquitto: MosquittoProcess, mqtt_client: MqttClientFactory
) -> None:
    async with asyncio.timeout(15):
        assert mosquitto.running
        assert await mosquitto.kill() == -9
        assert not mosquitto.running
        with pytest.raises(aiomqtt.MqttError):
            async with mqtt_client("site-a", timeout=2.0):
                pass
        await mosquitto.start()
        async with mqtt_client("site-a") as site:
            await site.publish(site_topic("site-a", "status"), b"back", qos=1)
        with pytest.raises(BrokerProcessError, match="already running"):
            await mosquitto.start()


async def test_broker_drops_root_to_the_mosquitto_user(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only meaningful when the tests run as root")
    broker_uid = pwd.getpwnam("mosquitto").pw_uid
    status = await asyncio.to_thread(Path(f"/proc/{mosquitto.pid}/status").read_text)
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert int(uid_line.split()[1]) == broker_uid
    for path in (broker_files.password_file, broker_files.acl_file, broker_files.persistence_dir):
        assert path.stat().st_uid == broker_uid, path
    assert broker_files.credentials_file.stat().st_uid == 0


async def test_start_fails_clearly_when_the_port_is_taken_or_the_config_is_broken(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    async with asyncio.timeout(15):
        second = MosquittoProcess(broker_files.conf, broker_files.port, log_path=tmp_path / "l")
        with pytest.raises(BrokerProcessError, match=rf"already running \(pid {mosquitto.pid} "):
            await second.start()
        # Another configuration on the same port: the message names the port and its process.
        other = broker_files.directory / "other.conf"
        other.write_text(f"listener {broker_files.port} 127.0.0.1\nallow_anonymous true\n")
        third = MosquittoProcess(other, broker_files.port, log_path=tmp_path / "o.log")
        with pytest.raises(
            BrokerProcessError,
            match=rf"port {broker_files.port} .*in use by pid {mosquitto.pid} \(.*mosquitto",
        ):
            await third.start()
        assert third.pid is None  # refused before starting anything
        broken = broker_files.directory / "broken.conf"
        broken.write_text(f"listener {free_port()} 127.0.0.1\nno_such_option yes\n")
        bad = MosquittoProcess(broken, free_port(), log_path=tmp_path / "bad.log")
        with pytest.raises(BrokerProcessError, match="no_such_option"):
            await bad.start()
        assert bad.returncode not in (None, 0)


# --- configuration files ---------------------------------------------------------------------


def test_password_hash_matches_mosquitto_passwd() -> None:
    # `mosquitto_passwd -b -c file alice s3cret` (Mosquitto 2.0.11) wrote this line.
    expected = (
        "$7$101$DmaABP54+1cHgZzr$mOk3pNxGFdGw9K+bZm+VsL4VM4q7w7AivfejV0zI9cNnzMLLSFJ/OZXsWbLk7YC"
        "UAbUVjti7ZXB6sNuMk/5gHA=="
    )
    salt = base64.b64decode("DmaABP54+1cHgZzr")
    assert mosquitto_password_hash("s3cret", salt=salt) == expected


@pytest.mark.parametrize(
    ("sites", "kwargs", "message"),
    [
        (["Site A"], {}, "site id"),
        ([], {}, "at least one site"),
        ("site-a", {}, "not one string"),
        (["site-a", "site-a"], {}, "unique"),
        (["coordinator"], {}, "unique"),
        (["site-a"], {"operator_user": "site-a"}, "unique"),
        (["monitor"], {}, "unique"),
        (["site-a"], {"monitor_user": "Bad Monitor"}, "monitor user"),
        (["site-a"], {"port": 0}, "not a TCP port"),
        (["site-a"], {"tls": True, "tls_port": 1883}, "must differ"),
        (["site-a"], {"ha_discovery_prefix": "home/+"}, "discovery prefix"),
    ],
)
def test_invalid_configurations_are_refused(
    tmp_path: Path, sites: list[str], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(BrokerConfigError, match=message):
        write_broker_config(tmp_path / "b", sites, **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "b" / "mosquitto.conf").exists()


def test_cli_init_writes_the_files_and_refuses_to_overwrite(tmp_path: Path) -> None:
    runner = CliRunner()
    target = tmp_path / "broker"
    result = runner.invoke(broker_app, ["init", str(target), "--sites", "site-a, house-1"])
    assert result.exit_code == 0, result.output
    assert str(target / "credentials.toml") in result.output
    for name in ("mosquitto.conf", "passwd", "acl", "credentials.toml"):
        assert (target / name).is_file(), name
    assert stat.S_IMODE((target / "credentials.toml").stat().st_mode) == 0o600
    assert stat.S_IMODE((target / "passwd").stat().st_mode) == 0o600
    files = load_broker_files(target)
    assert files.sites == ("site-a", "house-1")
    assert set(files.credentials) == {
        "coordinator",
        "operator",
        "monitor",
        "weather",
        "site-a",
        "house-1",
    }
    assert files.monitor_user == "monitor"
    assert files.weather_user == "weather"
    passwd = (target / "passwd").read_text()
    assert all(pw not in passwd for pw in files.credentials.values())
    acl = (target / "acl").read_text()
    assert "user house-1\ntopic write wattmesh/v1/site/house-1/status\n" in acl
    # The monitor reads all (and Home Assistant's discovery prefix), writes nothing.
    assert "user monitor\ntopic read wattmesh/v1/#\ntopic read homeassistant/#\n\n" in acl
    assert "topic write homeassistant/sensor/wattmesh-house-1/pv_power/config\n" in acl
    # The weather service writes its forecast and nothing else.
    assert "user weather\ntopic write wattmesh/v1/weather/forecast\n\n" in acl

    again = runner.invoke(broker_app, ["init", str(target), "--sites", "site-a"])
    assert again.exit_code != 0
    assert "already exists" in again.output
    assert "--force" in again.output
    assert load_broker_files(target).credentials == files.credentials  # untouched

    forced = runner.invoke(
        broker_app,
        [
            "init",
            str(target),
            "--sites",
            "site-b",
            "--no-operator",
            "--no-monitor",
            "--no-homeassistant",
            "--no-weather",
            "--force",
        ],
    )
    assert forced.exit_code == 0, forced.output
    assert set(load_broker_files(target).credentials) == {"coordinator", "site-b"}
    assert "weather" not in (target / "acl").read_text()
    assert "homeassistant" not in (target / "acl").read_text()

    custom = runner.invoke(
        broker_app,
        ["init", str(target), "--sites", "site-b", "--ha-discovery-prefix", "ha/disc", "--force"],
    )
    assert custom.exit_code == 0, custom.output
    assert "topic write ha/disc/sensor/wattmesh-site-b/grid_power/config\n" in (
        target / "acl"
    ).read_text()

    bad = runner.invoke(broker_app, ["init", str(tmp_path / "x"), "--sites", "Bad Id"])
    assert bad.exit_code != 0
    assert "site id" in bad.output

    missing = runner.invoke(broker_app, ["run", str(tmp_path / "nothing-here")])
    assert missing.exit_code != 0
    assert "broker init" in missing.output


def test_cli_run_says_how_to_install_mosquitto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    assert runner.invoke(broker_app, ["init", str(tmp_path), "--sites", "a"]).exit_code == 0
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr(broker.mosquitto, "MOSQUITTO_DIRS", ())
    result = runner.invoke(broker_app, ["run", str(tmp_path)])
    assert result.exit_code == 3
    assert "apt-get install mosquitto" in result.output


# --- TLS -------------------------------------------------------------------------------------


async def test_tls_clients_need_the_ca_and_their_certificate(broker_dir: Path) -> None:
    port, tls_port = free_port(), free_port()
    args = ["init", str(broker_dir), "--sites", "site-a,site-b", "--tls", "--port", str(port)]
    result = CliRunner().invoke(broker_app, [*args, "--tls-port", str(tls_port)])
    assert result.exit_code == 0, result.output
    files = load_broker_files(broker_dir)
    assert files.tls is not None
    for user in files.users:
        assert stat.S_IMODE(files.tls.client_keys[user].stat().st_mode) == 0o600
    assert stat.S_IMODE(files.tls.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.tls.ca_key.stat().st_mode) == 0o600

    own = site_topic("site-a", "telemetry")
    async with asyncio.timeout(15), MosquittoProcess(files.conf, files.port) as broker:
        # The certificate's CN is the user: the ACL applies over TLS exactly as with passwords.
        async with (
            aiomqtt.Client(**client_kwargs(files, "coordinator", tls=True)) as coordinator,
            aiomqtt.Client(**client_kwargs(files, "site-a", tls=True)) as site,
        ):
            await coordinator.subscribe(ALL, qos=1)
            await site.publish(site_topic("site-b", "telemetry"), b"forged", qos=1)
            await site.publish(own, b"legit", qos=1)
            assert await receive_until(coordinator, own) == [(own, b"legit")]

        assert files.tls is not None
        client_cert = (str(files.tls.client_certs["site-a"]), str(files.tls.client_keys["site-a"]))
        without_ca = aiomqtt.TLSParameters(certfile=client_cert[0], keyfile=client_cert[1])
        with pytest.raises(aiomqtt.MqttError, match="CERTIFICATE_VERIFY_FAILED"):
            async with aiomqtt.Client(
                **client_kwargs(files, "site-a", tls=True, tls_params=without_ca)
            ):
                pass
        # Authenticated by the CA but without a client certificate: the broker refuses it (the
        # TLS 1.3 alert comes after the handshake, so the client sees a timeout).
        without_cert = aiomqtt.TLSParameters(ca_certs=str(files.tls.ca_cert))
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(
                **client_kwargs(files, "site-a", tls=True, tls_params=without_cert, timeout=1.5)
            ):
                pass
        # Over TLS a password is no substitute for the certificate either.
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(
                **client_kwargs(
                    files,
                    "site-a",
                    port=tls_port,
                    tls_params=without_cert,
                    timeout=1.5,
                )
            ):
                pass
        assert "peer did not return a certificate" in broker.log_tail(100)


# --- identity: a client id belongs to one user -----------------------------------------------


def session_properties() -> Properties:
    """CONNECT properties of a persistent session (one hour)."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    return properties


@pytest.fixture
async def identity_broker(broker_dir: Path) -> AsyncIterator[BrokerFiles]:
    """A running broker with a password listener and a mutual-TLS listener, two houses."""
    files = write_broker_config(
        broker_dir, ["house-1", "house-2"], port=free_port(), tls=True, tls_port=free_port()
    )
    process = MosquittoProcess(files.conf, files.port)
    await process.start()
    try:
        yield files
    finally:
        await process.stop()
        print(f"mosquitto log:\n{process.log_tail(60)}")


def test_every_listener_binds_the_client_id_to_the_user(identity_broker: BrokerFiles) -> None:
    conf = identity_broker.conf.read_text()
    listeners = conf.split("\nlistener ")[1:]
    assert len(listeners) == 2
    assert all("\nuse_username_as_clientid true\n" in block for block in listeners)


#: victim -> (the client id its service sends, what it subscribes to, who sends it what).
VICTIMS = {
    "coordinator": ("wattmesh-coordinator", ALL, "house-2", site_topic("house-2", "telemetry")),
    "house-2": (
        "wattmesh-edge-house-2",
        site_topic("house-2", "dispatch"),
        "operator",
        site_topic("house-2", "dispatch"),
    ),
}


@pytest.mark.parametrize("tls", [False, True], ids=["password", "mtls"])
@pytest.mark.parametrize("victim", sorted(VICTIMS))
async def test_site_credentials_cannot_take_over_another_users_client_id_or_session(
    identity_broker: BrokerFiles, victim: str, tls: bool
) -> None:
    files = identity_broker
    victim_id, victim_filter, sender, topic = VICTIMS[victim]
    own_dispatch = site_topic("house-1", "dispatch")

    def client(user: str, identifier: str, *, clean_start: bool = False) -> aiomqtt.Client:
        return aiomqtt.Client(
            **client_kwargs(
                files,
                user,
                identifier=identifier,
                tls=tls,
                clean_start=clean_start,
                properties=session_properties(),
            )
        )

    async def send(payload: bytes, to: str = topic, by: str = sender) -> None:
        async with client(by, f"{by}-sender", clean_start=True) as publisher:
            await publisher.publish(to, payload, qos=1)

    async with asyncio.timeout(30):
        # The victim's persistent session exists; while it is away a QoS 1 message waits in it.
        async with client(victim, victim_id) as service:
            await service.subscribe(victim_filter, qos=1)
        await send(b"queued")

        # house-1's credentials with the victim's client id (the one its service sends and its
        # user name), asking to resume the session or to start it clean (which would wipe it).
        for stolen_id in (victim_id, victim):
            for clean_start in (False, True):
                async with client("house-1", stolen_id, clean_start=clean_start) as attacker:
                    await attacker.subscribe(own_dispatch, qos=1)
                    await send(b"own", to=own_dispatch, by="operator")
                    # Nothing of the victim's session reached it: its own dispatch comes first.
                    assert await receive_until(attacker, own_dispatch) == [(own_dispatch, b"own")]

        # The victim comes back (a legitimate reconnect): its session and queued message are
        # there (the coordinator, which reads everything, also finds house-1's dispatches).
        async with client(victim, victim_id) as service:
            got = await receive_until(service, topic)
            assert [m for m in got if m[0] == topic] == [(topic, b"queued")]
            # An attack while it is connected does not disconnect it: it keeps receiving.
            async with client("house-1", victim_id) as attacker:
                await attacker.subscribe(own_dispatch, qos=1)
                await send(b"live")
                got = await receive_until(service, topic)
                assert [m for m in got if m[0] == topic] == [(topic, b"live")]


async def test_a_users_session_follows_the_user_whatever_client_id_it_sends(
    mosquitto: MosquittoProcess, mqtt_client: MqttClientFactory
) -> None:
    dispatch = site_topic("house-1", "dispatch")

    def gateway(identifier: str) -> aiomqtt.Client:
        return mqtt_client(
            "house-1", identifier=identifier, clean_start=False, properties=session_properties()
        )

    async with asyncio.timeout(15):
        async with gateway("gateway-before-upgrade") as site:
            await site.subscribe(dispatch, qos=1)
        async with mqtt_client("operator") as operator:
            await operator.publish(dispatch, b"while away", qos=1)
        async with gateway("gateway-after-upgrade") as site:
            assert await receive_until(site, dispatch) == [(dispatch, b"while away")]

            # One connection per user: a second connection of house-1 replaces the first.
            async with gateway("second-gateway") as second:
                with pytest.raises(aiomqtt.MqttError):
                    await anext(site.messages)
                async with mqtt_client("operator") as operator:
                    await operator.publish(dispatch, b"to the second", qos=1)
                assert await receive_until(second, dispatch) == [(dispatch, b"to the second")]


async def test_a_services_bus_client_resumes_its_session_across_a_broker_restart(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, mqtt_client: MqttClientFactory
) -> None:
    """An edge's BusClient (configured client id ``wattmesh-edge-house-1``, which the broker
    replaces with ``house-1``) finds the dispatch queued while it and the broker were down."""
    dispatch = site_topic("house-1", "dispatch")
    received: list[tuple[str, bytes]] = []
    arrived = asyncio.Event()

    async def handle(topic: str, payload: bytes) -> None:
        received.append((topic, payload))
        arrived.set()

    settings = BusSettings(
        port=broker_files.port,
        username="house-1",
        password=broker_files.credentials["house-1"],
        client_id="wattmesh-edge-house-1",
    )
    async with asyncio.timeout(20):
        async with BusClient(settings, handler=handle) as bus:
            await bus.subscribe(dispatch)
            await bus.wait_connected(5)
        async with mqtt_client("operator") as operator:
            await operator.publish(dispatch, b"while away", qos=1)
        await mosquitto.stop()  # saves the session with its queued message
        await mosquitto.start()
        # A new process of the edge subscribes to nothing: only its session can deliver.
        async with BusClient(settings, handler=handle) as bus:
            await arrived.wait()
    assert received == [(dispatch, b"while away")]


async def test_monitor_reads_everything_and_writes_nothing(
    mosquitto: MosquittoProcess, mqtt_client: MqttClientFactory
) -> None:
    telemetry = site_topic("site-a", "telemetry")
    forgeries = [
        site_topic("site-a", "dispatch"),
        site_topic("site-a", "telemetry"),
        site_topic("site-a", "award"),
        MARKET_CLEARING,
        grid_state_topic("feeder-1"),
        COORDINATOR_STATUS,
    ]
    async with asyncio.timeout(10):
        async with (
            mqtt_client("coordinator") as coordinator,
            mqtt_client("monitor") as monitor,
            mqtt_client("site-a") as site,
        ):
            await coordinator.subscribe(ALL, qos=1)
            await monitor.subscribe(ALL, qos=1)
            for topic in forgeries:
                await monitor.publish(topic, b"forged", qos=1)
            await coordinator.publish(COORDINATOR_STATUS, b"healthy", qos=1, retain=True)
            # The coordinator saw none of the monitor's messages, only its own status.
            assert await receive_until(coordinator, COORDINATOR_STATUS) == [
                (COORDINATOR_STATUS, b"healthy")
            ]
            await coordinator.publish(site_topic("site-a", "award"), b"award", qos=1)
            await site.publish(telemetry, b"reading", qos=1)
            assert await receive_until(monitor, telemetry) == [
                (COORDINATOR_STATUS, b"healthy"),
                (site_topic("site-a", "award"), b"award"),
                (telemetry, b"reading"),
            ]
        # The operator and the monitor read the coordinator's retained status.
        for user in ("operator", "monitor"):
            async with mqtt_client(user) as reader:
                await reader.subscribe(f"{PREFIX}/coordinator/+/status", qos=1)
                assert await receive_until(reader, COORDINATOR_STATUS) == [
                    (COORDINATOR_STATUS, b"healthy")
                ]


# --- a broker never outlives its parent ------------------------------------------------------


def broker_pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie has exited: its sockets are closed)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] not in "ZXx"


async def wait_until(predicate: object, what: str) -> None:
    """Poll ``predicate`` (a callable returning bool or an awaitable bool) until true."""
    assert callable(predicate)
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)


async def accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def refuses(port: int) -> bool:
    return not await accepts(port)


def recorded_pid(files: BrokerFiles) -> int | None:
    """The broker pid in the pid file; None if there is none."""
    try:
        pid: int = json.loads(pid_file_path(files.conf).read_text())["pid"]
    except FileNotFoundError:
        return None
    return pid


@pytest.fixture
def spawned() -> Iterator[list[int]]:
    """Pids a test started; any still alive at teardown get SIGKILL (a failed test leaks none)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if broker_pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


async def broker_run(
    files: BrokerFiles, spawned: list[int], previous: int | None = None
) -> asyncio.subprocess.Process:
    """``wattmesh broker run DIR`` as a child process, once its broker (a pid other than
    ``previous``) is recorded and the port accepts connections."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wattmesh",
        "broker",
        "run",
        str(files.directory),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=asyncio.subprocess.PIPE,
    )
    spawned.append(process.pid)
    await wait_until(lambda: recorded_pid(files) not in (None, previous), "the pid file")
    spawned.extend(pid for pid in [recorded_pid(files)] if pid is not None)
    await wait_until(lambda: accepts(files.port), "the broker accepts connections")
    return process


async def test_sigkill_of_broker_run_takes_mosquitto_along_and_the_next_run_starts(
    broker_files: BrokerFiles, spawned: list[int]
) -> None:
    async with asyncio.timeout(60):
        first = await broker_run(broker_files, spawned)
        broker_pid = recorded_pid(broker_files)
        assert broker_pid is not None
        assert broker_pid_alive(broker_pid)
        assert str(broker_files.conf) in Path(f"/proc/{broker_pid}/cmdline").read_text()

        first.kill()
        assert await first.wait() == -signal.SIGKILL
        await wait_until(lambda: not broker_pid_alive(broker_pid), "mosquitto exits")
        assert await refuses(broker_files.port)

        second = await broker_run(broker_files, spawned, previous=broker_pid)
        second.terminate()
        assert await second.wait() == 0
        assert not pid_file_path(broker_files.conf).exists()


async def test_broker_run_stops_a_mosquitto_an_earlier_run_left_on_its_directory(
    broker_files: BrokerFiles, spawned: list[int]
) -> None:
    conf = broker_files.conf
    # An orphan: started by a shell that is gone (as a parent killed before it could stop it).
    shell = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        f'"{find_mosquitto()}" -c "{conf}" >/dev/null 2>&1 & echo $$ $!',
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await shell.communicate()
    parent, orphan = (int(word) for word in out.split())
    spawned.append(orphan)
    pid_file_path(conf).write_text(json.dumps({"pid": orphan, "parent": parent, "conf": str(conf)}))
    async with asyncio.timeout(60):
        await wait_until(lambda: accepts(broker_files.port), "the orphan accepts connections")
        run = await broker_run(broker_files, spawned, previous=orphan)
        assert run.stderr is not None
        notice = await run.stderr.readline()
        assert f"stopped mosquitto (pid {orphan})" in notice.decode()
        assert not broker_pid_alive(orphan)
        new_pid = recorded_pid(broker_files)
        assert new_pid is not None
        assert broker_pid_alive(new_pid)
        run.terminate()
        assert await run.wait() == 0


def test_broker_run_names_the_process_that_holds_its_port(broker_files: BrokerFiles) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", broker_files.port))
        squatter.listen()
        result = CliRunner().invoke(broker_app, ["run", str(broker_files.directory)])
    assert result.exit_code == 2, result.output
    assert f"port {broker_files.port} (127.0.0.1) is already in use" in result.output
    assert f"pid {os.getpid()} (" in result.output
    assert not pid_file_path(broker_files.conf).exists()


HOLD_A_BROKER = """
import asyncio, sys
from broker.mosquitto import MosquittoProcess

async def main() -> None:
    async with MosquittoProcess(sys.argv[1], int(sys.argv[2])) as broker:
        print(broker.pid, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_sigkill_of_a_process_holding_a_mosquitto_process_takes_the_broker_along(
    broker_files: BrokerFiles, spawned: list[int]
) -> None:
    async with asyncio.timeout(60):
        holder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            HOLD_A_BROKER,
            str(broker_files.conf),
            str(broker_files.port),
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE,
        )
        spawned.append(holder.pid)
        assert holder.stdout is not None
        broker_pid = int(await holder.stdout.readline())
        spawned.append(broker_pid)
        assert broker_pid_alive(broker_pid)
        holder.kill()
        await holder.wait()
        await wait_until(lambda: not broker_pid_alive(broker_pid), "mosquitto exits")
        async with MosquittoProcess(broker_files.conf, broker_files.port) as again:
            assert again.pid != broker_pid
            assert recorded_pid(broker_files) == again.pid
        assert not pid_file_path(broker_files.conf).exists()
