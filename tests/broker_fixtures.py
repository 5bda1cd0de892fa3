"""Fixtures that start a real Mosquitto on a free loopback port (loaded from conftest).

- ``broker_dir``: an empty directory the broker's user can reach (see below).
- ``broker_files``: a configuration for sites ``BROKER_SITES`` written into it.
- ``mosquitto``: a started ``MosquittoProcess`` on that configuration, stopped at teardown.
- ``mqtt_client``: ``mqtt_client(user, **overrides) -> aiomqtt.Client`` (not yet connected).
- ``client_kwargs(files, user, ...)``: the keyword arguments behind ``mqtt_client``.

The broker binds each client id to its user (the id a client sends is replaced by its user
name): a second connection with the same user replaces the first, so a test that watches while
a real service runs connects as ``monitor`` (reads everything, writes nothing), never with the
service's own credentials.

Mosquitto started as root drops to the ``mosquitto`` user, which cannot enter pytest's
``/tmp/pytest-of-root`` (mode 700); as root the broker directory is therefore made with
``tempfile.mkdtemp`` in the system temp directory and removed at teardown.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from aiomqtt import ProtocolVersion, TLSParameters

from broker.errors import MosquittoNotFoundError
from broker.mosquitto import BrokerFiles, MosquittoProcess, write_broker_config

BROKER_SITES = ("site-a", "site-b", "house-1")

MqttClientFactory = Callable[..., aiomqtt.Client]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def client_kwargs(
    files: BrokerFiles,
    user: str,
    *,
    identifier: str | None = None,
    tls: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """``aiomqtt.Client`` keyword arguments to connect as ``user`` (MQTT 5).

    With ``tls`` the client uses the mutual-TLS listener with the CA and the user's client
    certificate (no password); ``overrides`` replace or add any argument.
    """
    kwargs: dict[str, Any] = {
        "hostname": files.connect_host,
        "port": files.port,
        "username": user,
        "password": files.credentials[user],
        "protocol": ProtocolVersion.V5,
        "identifier": identifier or f"{user}-{uuid.uuid4().hex[:8]}",
        "timeout": 5.0,
    }
    if tls:
        if files.tls is None or files.tls_port is None:
            raise ValueError(f"{files.directory} has no TLS listener")
        kwargs.update(
            hostname="127.0.0.1",
            port=files.tls_port,
            username=None,
            password=None,
            tls_params=TLSParameters(
                ca_certs=str(files.tls.ca_cert),
                certfile=str(files.tls.client_certs[user]),
                keyfile=str(files.tls.client_keys[user]),
            ),
        )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def broker_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty directory for a broker configuration that Mosquitto's user can reach."""
    if os.geteuid() != 0:
        yield tmp_path_factory.mktemp("broker")
        return
    path = Path(tempfile.mkdtemp(prefix="wattmesh-broker-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def broker_files(broker_dir: Path) -> BrokerFiles:
    """A configuration for ``BROKER_SITES`` (plus coordinator, operator, monitor), free port."""
    return write_broker_config(broker_dir, BROKER_SITES, port=free_port())


@pytest.fixture
async def mosquitto(broker_files: BrokerFiles) -> AsyncIterator[MosquittoProcess]:
    """A running Mosquitto on ``broker_files``; the test fails if mosquitto is missing."""
    process = MosquittoProcess(broker_files.conf, broker_files.port)
    try:
        await process.start()
    except MosquittoNotFoundError as err:
        pytest.fail(f"{err} (the broker tests need a real Mosquitto)", pytrace=False)
    try:
        yield process
    finally:
        await process.stop()
        # Shown by pytest only when the test failed.
        print(f"mosquitto log ({process.log_path}):\n{process.log_tail(60)}")


@pytest.fixture
def mqtt_client(broker_files: BrokerFiles) -> MqttClientFactory:
    """``mqtt_client(user, **overrides)``: an unconnected ``aiomqtt.Client`` for ``user``."""

    def make(user: str, **overrides: Any) -> aiomqtt.Client:
        return aiomqtt.Client(**client_kwargs(broker_files, user, **overrides))

    return make
