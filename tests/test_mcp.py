"""``wattmesh mcp`` driven by the MCP SDK's own client, over stdio and streamable HTTP, against
a real coordinator API (and a real edge agent for the guarded dispatch)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from broker.clock import ManualClock
from broker.mosquitto import BrokerFiles, MosquittoProcess
from tests.test_api import _api, tokens  # noqa: F401 - the module-scoped fixture
from tests.test_coordinator import T0, _bus, _telemetry

ROOT = Path(__file__).resolve().parent.parent
READ_TOOLS = {"list_sites", "site_state", "site_forecast", "site_statement", "clearings",
              "settlements", "grid_state", "audit_log", "dispatch", "what_if_battery"}  # fmt: skip


def _stdio(api_url: str, token: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "wattmesh", "mcp", "--api", api_url],
        env={"WATTMESH_API_TOKEN": token, "PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]},
        cwd=str(ROOT),
    )


def _payload(result: Any) -> Any:
    assert not result.is_error, result.content
    return json.loads(result.content[0].text)


async def test_over_stdio_the_tools_are_listed_read_and_dispatch_is_guarded(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    tmp_path: Path,
    tokens: tuple[Path, dict[str, str]],  # noqa: F811
) -> None:
    from edge.agent import EdgeAgent
    from tests.test_edge_agent import simulated_house, site_config

    path, t = tokens
    async with simulated_house() as house:
        config = site_config(house, broker_files, tmp_path / "spool.sqlite")
        async with (
            EdgeAgent(config, house.clock, password=broker_files.credentials["house-1"]),
            _api(tmp_path, broker_files, path, house.clock) as (c, _),
        ):
            assert c.api is not None
            url = f"http://127.0.0.1:{c.api.port}"
            await asyncio.sleep(1.0)
            async with (
                stdio_client(_stdio(url, t["viewer"])) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                tools = {tool.name: tool for tool in (await session.list_tools()).tools}
                sites = _payload(await session.call_tool("list_sites", {}))
                refused = await session.call_tool(
                    "dispatch", {"site": "house-1", "battery_power_w": -1000.0}
                )
            async with (
                stdio_client(_stdio(url, t["operator"])) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                ack = _payload(
                    await session.call_tool(
                        "dispatch",
                        {"site": "house-1", "battery_power_w": -1200.0, "duration_s": 600},
                    )
                )
                setpoint = house.battery.setpoint_w
            audit = c.ledger.audit_entries(kind="dispatch")
    assert set(tools) == READ_TOOLS
    assert "positive discharging" in (tools["site_state"].description or "")
    assert [s["site"] for s in sites] == ["house-1"]
    assert refused.is_error
    assert "403" in refused.content[0].text
    assert ack["outcome"] == "accepted"
    assert setpoint == -1200.0
    assert [(e.actor, e.detail["site"]) for e in audit] == [("control-room", "house-1")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_over_http_a_token_is_required_and_a_site_token_reads_only_its_site(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    tmp_path: Path,
    tokens: tuple[Path, dict[str, str]],  # noqa: F811
) -> None:
    path, t = tokens
    async with _api(tmp_path, broker_files, path, ManualClock(T0)) as (c, _):
        assert c.api is not None
        for name in ("site-a", "site-b"):
            bus = await _bus(broker_files, name, [])
            await bus.publish(
                f"wattmesh/v1/site/{name}/telemetry", _telemetry(T0, 900.0).model_dump_json()
            )
            await bus.__aexit__(None, None, None)
        port = _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "wattmesh", "mcp", "--transport", "http", "--port", str(port),
             "--api", f"http://127.0.0.1:{c.api.port}"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        try:
            mcp_url = f"http://127.0.0.1:{port}/mcp"
            async with httpx.AsyncClient() as http:
                for _ in range(200):
                    try:
                        anonymous = await http.post(mcp_url, json={})
                        break
                    except httpx.ConnectError:
                        await asyncio.sleep(0.05)
                bad = await http.post(
                    mcp_url, json={}, headers={"Authorization": "Bearer wm_wrong"}
                )
            headers = {"Authorization": f"Bearer {t['site-a']}"}
            async with (
                httpx2.AsyncClient(headers=headers, timeout=30) as client,
                streamable_http_client(mcp_url, http_client=client) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                own = _payload(await session.call_tool("site_state", {"site": "site-a"}))
                other = await session.call_tool("site_state", {"site": "site-b"})
                grid = _payload(await session.call_tool("grid_state", {}))
        finally:
            server.terminate()
            server.wait(timeout=10)
    assert anonymous.status_code == 401
    assert bad.status_code == 401
    assert own["latest"]["grid_power_w"] == 900.0
    assert other.is_error
    assert "403" in other.content[0].text
    assert grid["flow_w"] == pytest.approx(1800.0)


async def test_what_if_a_battery_at_house_2_runs_the_engine_for_a_viewer_and_is_guarded(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    tmp_path: Path,
    tokens: tuple[Path, dict[str, str]],  # noqa: F811
) -> None:
    path, t = tokens
    question = {"site": "house-2", "capacity_kwh": 10.0, "power_kw": 5.0, "days": 1.0,
                "start": "2026-06-22"}  # fmt: skip
    async with _api(tmp_path, broker_files, path, ManualClock(T0)) as (c, _):
        assert c.api is not None
        url = f"http://127.0.0.1:{c.api.port}"
        async with (
            stdio_client(_stdio(url, t["viewer"])) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            tools = {tool.name: tool for tool in (await session.list_tools()).tools}
            answer = _payload(await session.call_tool("what_if_battery", question))
            too_long = await session.call_tool("what_if_battery", {**question, "days": 30.0})
            too_fast = await session.call_tool("what_if_battery", {**question, "power_kw": 80.0})
        async with (
            stdio_client(_stdio(url, t["house-1"])) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            other_site = await session.call_tool("what_if_battery", question)
    description = tools["what_if_battery"].description or ""
    for words in ("kWh", "currency", "positive: paid", "positive: the change saves", "W"):
        assert words in description
    assert (answer["site"], answer["capacity_kwh"], answer["days"]) == ("house-2", 10.0, 1.0)
    assert answer["start"] == "2026-06-22T00:00:00+00:00"
    as_is, changed = answer["as_is"], answer["with_change"]
    assert as_is["intervals"] == changed["intervals"] >= 90  # a day of 15-minute intervals
    assert as_is["site_stored_value"] == 0.0  # house-2 has no battery in the scenario
    assert changed["site_stored_value"] != 0.0  # the added one ends the day fuller or emptier
    assert changed["site_import_kwh"] != as_is["site_import_kwh"]
    for run in (as_is, changed):
        assert run["cost"] == pytest.approx(run["settled_cost"] - run["stored_value"])
        assert run["feeder_peak_w"] > 0
    assert answer["saving"] == pytest.approx(as_is["cost"] - changed["cost"])
    assert answer["site_saving"] == pytest.approx(as_is["site_cost"] - changed["site_cost"])
    assert answer["feeder_peak_change_w"] == pytest.approx(
        changed["feeder_peak_w"] - as_is["feeder_peak_w"]
    )
    assert too_long.is_error
    assert "at most 14" in too_long.content[0].text
    assert too_fast.is_error
    assert "more than 4 times" in too_fast.content[0].text
    assert other_site.is_error
    assert "403" in other_site.content[0].text
