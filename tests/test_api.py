"""The coordinator's HTTP API through a real uvicorn server: roles, a site's privacy, bad
input, OpenAPI, and an operator dispatch acknowledged by a real edge agent over Mosquitto."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from broker import topics
from broker.clock import Clock, ManualClock
from broker.mosquitto import BrokerFiles, MosquittoProcess
from coordinator.api import TokenError, load_tokens
from coordinator.config import parse_coordinator_config
from coordinator.service import Coordinator
from tests.test_coordinator import T0, _bus, _telemetry

ROOT = Path(__file__).resolve().parent.parent


def _token(tokens_file: Path, name: str, role: str, site: str | None = None) -> str:
    args = [sys.executable, "-m", "wattmesh", "api", "token", "add", str(tokens_file),
            "--name", name, "--role", role, *(["--site", site] if site else [])]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("api") / "api-tokens.toml"
    made = {
        "viewer": _token(path, "grafana", "viewer"),
        "operator": _token(path, "control-room", "operator"),
        "site-a": _token(path, "site-a-owner", "site", "site-a"),
        "house-1": _token(path, "house-1-owner", "site", "house-1"),
    }
    return path, made


@asynccontextmanager
async def _api(
    tmp_path: Path, files: BrokerFiles, tokens_file: Path, clock: Clock
) -> AsyncIterator[tuple[Coordinator, httpx.AsyncClient]]:
    config = parse_coordinator_config(
        {
            "coordinator": {"ledger": str(tmp_path / "ledger.sqlite")},
            "broker": {"port": files.port, "password_env": None},
            "tariff": {"retail_per_kwh": 0.30, "feed_in_per_kwh": 0.08},
            "grid": {"import_limit_w": 10_000.0, "export_limit_w": 10_000.0},
            "api": {"port": 0, "tokens_file": str(tokens_file), "ack_timeout_s": 10},
        },
        "test",
    )
    c = Coordinator(config, clock, password=files.credentials["coordinator"])
    async with c:
        await c.bus.wait_connected(5)
        assert c.api is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{c.api.port}") as http:
            yield c, http


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_each_role_reads_what_it_may_and_a_site_never_reads_another(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    tmp_path: Path,
    tokens: tuple[Path, dict[str, str]],
) -> None:
    path, t = tokens
    clock = ManualClock(T0)
    async with _api(tmp_path, broker_files, path, clock) as (c, http):
        for name in ("site-a", "site-b"):
            bus = await _bus(broker_files, name, [])
            await bus.publish(
                topics.site_topic(name, "telemetry"), _telemetry(T0, 1500.0).model_dump_json()
            )
            await bus.__aexit__(None, None, None)
        async with asyncio.timeout(10):
            while c.stats.telemetry < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        k = int(T0 // 900) + 1
        await c.clear_interval(k)
        r = {}
        r["none"] = await http.get("/api/v1/sites")
        r["bad"] = await http.get("/api/v1/sites", headers=_auth("wm_not-a-token"))
        r["viewer"] = await http.get("/api/v1/sites", headers=_auth(t["viewer"]))
        r["site"] = await http.get("/api/v1/sites", headers=_auth(t["site-a"]))
        r["own"] = await http.get("/api/v1/sites/site-a", headers=_auth(t["site-a"]))
        r["other"] = await http.get("/api/v1/sites/site-b", headers=_auth(t["site-a"]))
        r["other_statement"] = await http.get(
            "/api/v1/sites/site-b/statement", headers=_auth(t["site-a"])
        )
        r["audit_site"] = await http.get("/api/v1/audit", headers=_auth(t["site-a"]))
        r["audit_viewer"] = await http.get("/api/v1/audit", headers=_auth(t["viewer"]))
        r["metrics_site"] = await http.get("/metrics", headers=_auth(t["site-a"]))
        r["metrics"] = await http.get("/metrics", headers=_auth(t["viewer"]))
        r["grid"] = await http.get("/api/v1/grid", headers=_auth(t["site-a"]))
        r["clearings_site"] = await http.get(
            "/api/v1/clearings", params={"from_interval": k, "to_interval": k},
            headers=_auth(t["site-a"]),
        )  # fmt: skip
        r["bad_range"] = await http.get(
            "/api/v1/clearings", params={"from_interval": k + 5, "to_interval": k},
            headers=_auth(t["viewer"]),
        )  # fmt: skip
        r["bad_limit"] = await http.get(
            "/api/v1/settlements", params={"limit": 0}, headers=_auth(t["viewer"])
        )
        r["dispatch_viewer"] = await http.post(
            "/api/v1/sites/site-a/dispatch", json={"battery_power_w": 1000},
            headers=_auth(t["viewer"]),
        )  # fmt: skip
        r["dispatch_bad"] = await http.post(
            "/api/v1/sites/site-a/dispatch", json={"duration_s": -5},
            headers=_auth(t["operator"]),
        )  # fmt: skip
        r["unknown_site"] = await http.get("/api/v1/sites/nowhere", headers=_auth(t["viewer"]))
    assert r["none"].status_code == 401
    assert r["bad"].status_code == 401
    assert [s["site"] for s in r["viewer"].json()] == ["site-a", "site-b"]
    assert r["viewer"].json()[0]["latest"]["grid_power_w"] == 1500.0
    assert [s["site"] for s in r["site"].json()] == ["site-a"]
    assert r["own"].status_code == 200
    assert r["other"].status_code == 403
    assert r["other_statement"].status_code == 403
    assert r["audit_site"].status_code == 403
    assert r["audit_viewer"].status_code == 200
    assert r["metrics_site"].status_code == 403
    assert "wattmesh_telemetry_messages_total" in r["metrics"].text
    assert r["grid"].json()["flow_w"] == 3000.0
    assert r["clearings_site"].json()[0]["interval"] == k
    assert r["bad_range"].status_code == 400
    assert "from_interval" in r["bad_range"].json()["detail"]
    assert r["bad_limit"].status_code == 422
    assert r["dispatch_viewer"].status_code == 403
    assert r["dispatch_bad"].status_code == 422
    assert r["unknown_site"].status_code == 404


async def test_a_statement_follows_every_commit_to_the_ledger_and_whoami_names_the_token(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    tmp_path: Path,
    tokens: tuple[Path, dict[str, str]],
) -> None:
    from coordinator.ledger import Ledger

    path, t = tokens
    k0 = int(T0 // 900) - 10

    def settle(ledger: Ledger, k: int, metered_kwh: float) -> None:
        ledger.settle_interval(
            k,
            clearing_price_per_kwh=0.2,
            retail_price_per_kwh=0.3,
            feed_in_price_per_kwh=0.08,
            awards_kwh={"site-a": 1.0, "site-b": -1.0},
            metered_kwh={"site-a": metered_kwh, "site-b": -1.0},
        )

    async def read(http: httpx.AsyncClient) -> dict[str, object]:
        r = await http.get("/api/v1/sites/site-a/statement", headers=_auth(t["site-a"]))
        assert r.status_code == 200, r.text
        return dict(r.json())

    async with _api(tmp_path, broker_files, path, ManualClock(T0)) as (c, http):
        settle(c.ledger, k0, 1.5)
        first, again = await read(http), await read(http)
        settle(c.ledger, k0 + 1, 3.0)  # the coordinator's own connection
        second = await read(http)
        with Ledger(c.ledger.path) as other:  # another connection, as `wattmesh ledger` has
            settle(other, k0 + 2, 0.5)
        third = await read(http)
        report = c.ledger.site_report("site-a")
        whoami = await http.get("/api/v1/whoami", headers=_auth(t["site-a"]))
        whoami_none = await http.get("/api/v1/whoami")
    assert whoami.json() == {"name": "site-a-owner", "role": "site", "site": "site-a"}
    assert whoami_none.status_code == 401
    assert first == again
    assert first["intervals"] == 1
    assert second["intervals"] == 2
    assert second["net_cost"] != first["net_cost"]
    assert third["intervals"] == 3
    assert third == {
        "site": "site-a",
        "intervals": 3,
        "estimated_intervals": report.estimated_intervals,
        "net_cost": f"{report.net_cost_micro / 1e6:.6f}",
        "baseline_cost": f"{report.baseline_cost_micro / 1e6:.6f}",
        "savings": f"{report.savings_micro / 1e6:.6f}",
    }


async def test_openapi_is_served_and_valid(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    tmp_path: Path,
    tokens: tuple[Path, dict[str, str]],
) -> None:
    from openapi_spec_validator import validate

    path, _ = tokens
    async with _api(tmp_path, broker_files, path, ManualClock(T0)) as (_, http):
        spec = (await http.get("/openapi.json")).json()
    validate(spec)
    assert "/api/v1/sites/{site}/dispatch" in spec["paths"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


async def test_an_operator_dispatch_through_the_api_is_acknowledged_by_a_real_agent(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    tmp_path: Path,
    tokens: tuple[Path, dict[str, str]],
) -> None:
    from edge.agent import EdgeAgent
    from tests.test_edge_agent import simulated_house, site_config

    path, t = tokens
    async with simulated_house() as house:
        config = site_config(house, broker_files, tmp_path / "spool.sqlite")
        async with (
            EdgeAgent(config, house.clock, password=broker_files.credentials["house-1"]),
            _api(tmp_path, broker_files, path, house.clock) as (c, http),
        ):
            await asyncio.sleep(1.0)
            response = await http.post(
                "/api/v1/sites/house-1/dispatch",
                json={"battery_power_w": -1500, "duration_s": 600, "reason": "test"},
                headers=_auth(t["operator"]),
                timeout=30,
            )
            setpoint = house.battery.setpoint_w
            audit = c.ledger.audit_entries(kind="dispatch")
    assert response.status_code == 200, response.text
    ack = response.json()
    assert ack["outcome"] == "accepted"
    assert ack["applied_battery_power_w"] == -1500.0
    assert setpoint == -1500.0
    assert [(e.actor, e.detail["site"]) for e in audit] == [("control-room", "house-1")]


def test_a_tokens_file_keeps_only_hashes_and_refuses_nonsense(
    tokens: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    path, made = tokens
    text = path.read_text()
    assert all(token not in text for token in made.values())
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    loaded = load_tokens(path)
    assert sorted(tk.role for tk in loaded.values()) == ["operator", "site", "site", "viewer"]
    bad = tmp_path / "bad.toml"
    bad.write_text('[[token]]\nname = "x"\nrole = "site"\nsha256 = "' + "0" * 64 + '"\n')
    with pytest.raises(TokenError, match=r"bad\.toml: token\[0\]"):
        load_tokens(bad)
