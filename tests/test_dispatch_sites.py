"""`wattmesh dispatch --broker-dir`: a site unknown to the broker told apart from a silent agent.

The broker's own files (credentials.toml beside its ACL) say which sites it is configured for;
the site's retained status can only come from the site's credentials. Neither is input from
an unauthenticated client. Real Mosquitto (tests/broker_fixtures.py), the real command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from broker import topics
from broker.messages import Dispatch, DispatchAck
from broker.mosquitto import BrokerFiles, MosquittoProcess
from tests.broker_fixtures import MqttClientFactory
from wattmesh.cli import _no_ack

ROOT = Path(__file__).resolve().parent.parent


def _dispatch(files: BrokerFiles, site: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``wattmesh dispatch SITE --broker-dir DIR``: no host, port or password variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMESH_")}
    env.update({"PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    return subprocess.run(
        [sys.executable, "-m", "wattmesh", "dispatch", site, "--battery-w", "1000",
         "--broker-dir", str(files.directory), *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _said(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    return " ".join(result.stderr.split())


async def test_a_site_unknown_to_the_brokers_configuration_is_named_and_nothing_is_sent(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, mqtt_client: MqttClientFactory
) -> None:
    async with mqtt_client("monitor") as monitor:
        await monitor.subscribe(topics.site_topic("ghost", "dispatch"), qos=1)
        result = await asyncio.to_thread(_dispatch, broker_files, "ghost", "--wait", "1")
        received: list[object] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for message in monitor.messages:
                    received.append(message.payload)
    said = _said(result)
    assert result.returncode == 1
    assert "site 'ghost' is unknown to the broker's configuration" in said
    assert f"{broker_files.credentials_file} names site-a, site-b, house-1" in said
    assert "nothing was sent" in said
    assert received == []


async def test_a_configured_site_whose_agent_never_started_is_said_to_have_never_started(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles
) -> None:
    result = await asyncio.to_thread(_dispatch, broker_files, "site-b", "--wait", "1")
    said = _said(result)
    assert result.returncode == 1
    assert "no acknowledgement from site-b within 1 s: its agent never started" in said
    assert "the broker is configured for 'site-b' but holds no status from its agent" in said
    assert "unknown" not in said


@contextlib.asynccontextmanager
async def _accepting(make: MqttClientFactory, site: str) -> AsyncIterator[None]:
    """``site``'s credentials on the broker, accepting every dispatch order."""
    async with make(site) as client:
        await client.subscribe(topics.site_topic(site, "dispatch"), qos=1)

        async def answer() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                order = Dispatch.model_validate_json(message.payload)
                ack = DispatchAck(ts=order.ts, command_id=order.id, outcome="accepted")
                await client.publish(
                    topics.site_topic(site, "dispatch/ack"), ack.model_dump_json(), qos=1
                )

        task = asyncio.create_task(answer())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_the_broker_directory_gives_the_port_and_the_operators_password(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, mqtt_client: MqttClientFactory
) -> None:
    async with _accepting(mqtt_client, "house-1"):
        result = await asyncio.to_thread(_dispatch, broker_files, "house-1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outcome"] == "accepted"


async def test_a_wrong_password_variable_beats_the_file_and_is_named(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMESH_")}
    env.update({"PYTHONPATH": str(ROOT), "WATTMESH_OPERATOR_PASSWORD": "wrong"})
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "wattmesh", "dispatch", "house-1", "--battery-w", "1000",
         "--broker-dir", str(broker_files.directory)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "refused user 'operator'" in _said(result)
    assert "check $WATTMESH_OPERATOR_PASSWORD" in _said(result)


def test_without_the_broker_directory_the_message_says_what_would_tell_them_apart(
    tmp_path: Path,
) -> None:
    said = _no_ack("ghost", 1.0, "operator", None, None)
    assert "its agent never started, or the broker is not configured for the site" in said
    assert "--broker-dir tells which" in said
    missing = subprocess.run(
        [sys.executable, "-m", "wattmesh", "dispatch", "ghost", "--battery-w", "1",
         "--broker-dir", str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert missing.returncode == 2
    assert f"is {tmp_path} a broker directory (`wattmesh broker init`)?" in _said(missing)
