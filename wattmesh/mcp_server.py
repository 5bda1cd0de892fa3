"""``wattmesh mcp``: the coordinator's HTTP API as Model Context Protocol tools for AI agents.

An MCP server on the official ``mcp`` SDK that is a client of the coordinator's HTTP API
([api]): every tool is one API call made with the caller's bearer token, so the API's roles
hold here too. A site token reads only its site; only an operator token may dispatch, and the
API audits each order under the token's name. Transports:

- ``stdio`` (desktop agents start it): the token comes from an environment variable;
- ``http`` (streamable HTTP on ``/mcp``): each request carries ``Authorization: Bearer``; a
  request without a token the API accepts is refused with 401.

One tool is not an API call: ``what_if_battery`` runs the stepped simulation engine
(:mod:`wattmesh.whatif`) on a scenario file (``--scenario``; the community's by default) in a
worker thread of this process, one at a time, so the coordinator's own loop never carries a
simulation. It reads nothing from the ledger, so any token may call it (a viewer's included);
a site token only about its own site, the API's rule for site data. The caller's role comes
from the API (``GET /api/v1/whoami``) with the caller's own token.

Units and signs (in every tool description): powers in W, site and feeder power positive when
importing, battery power positive when discharging; energy in kWh; prices in currency per kWh;
money as decimal strings of currency units; times as UTC epoch seconds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

__all__ = ["build_server", "run_http", "run_stdio"]

UNITS = (
    "Units: W (site/feeder power positive importing, battery power positive discharging), "
    "kWh, currency per kWh, money as decimal strings, times as UTC epoch seconds."
)
#: The scenario the what-if tool simulates unless ``wattmesh mcp --scenario`` names another.
DEFAULT_SCENARIO = Path(__file__).resolve().parents[1] / "config" / "scenarios" / "community.toml"
WHAT_IF = (
    "What a battery added, resized or removed at one site would have changed: runs the "
    "stepped simulation engine on the community scenario twice, as it is and with the site's "
    "battery set to capacity_kwh (kWh; 0 removes it) and power_kw (kW; default half the "
    "capacity per hour; at most 4 times it), for `days` days (at most 14) from `start` (ISO "
    "8601 date, UTC; default the scenario's start). soc_pct: the battery's state of charge at "
    "the start, % (default 50, or a resized battery's own). variant: wattmesh (market, "
    "dispatch, feeder balancing) or self_consumption (each site's own controller). Returns "
    "each run's community and site costs in currency units (positive: paid), with battery "
    "energy left at the end valued at the last retail tariff over the charge efficiency "
    "(cost = settled_cost - stored_value), the site's import and export kWh, the feeder's "
    "peak 15-minute mean import W, and saving = as_is.cost - with_change.cost (positive: the "
    "change saves), site_saving alike, feeder_peak_change_w (positive: a higher peak). Takes "
    "about a second per simulated day. Any token may ask; a site token only about its own "
    "site. Simulated from the scenario's synthetic weather and loads, not from the ledger."
)


def _bearer(ctx: Context, stdio_token: str | None) -> str:
    if stdio_token is not None:
        return stdio_token
    request = ctx.request_context.request
    header = "" if request is None else str(request.headers.get("authorization", ""))
    if not header.lower().startswith("bearer "):
        raise ToolError("no bearer token on this request")
    return header[7:]


def build_server(
    api_url: str, stdio_token: str | None = None, scenario: Path | None = None
) -> MCPServer:
    """The MCP server, calling the API at ``api_url`` (stdio: with ``stdio_token``); the
    what-if tool simulates ``scenario`` (a scenario TOML file; default ``DEFAULT_SCENARIO``)."""
    scenario_path = scenario or DEFAULT_SCENARIO
    one_at_a_time = anyio.CapacityLimiter(1)  # a what-if keeps a core busy for seconds
    mcp: MCPServer = MCPServer(
        name="wattmesh",
        instructions=(
            "Read a wattmesh energy community (sites, feeder, market, settlements) and, with "
            "an operator token, send battery or load orders. " + UNITS
        ),
    )

    async def call(ctx: Context, method: str, path: str, **kwargs: Any) -> str:
        """One API call with the caller's token; the JSON answer as text, or a ToolError."""
        token = _bearer(ctx, stdio_token)
        async with httpx.AsyncClient(
            base_url=api_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as http:
            try:
                response = await http.request(method, path, **kwargs)
            except httpx.HTTPError as err:
                raise ToolError(f"the API at {api_url} is not reachable: {err}") from err
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ToolError(f"API {response.status_code}: {detail}")
        return json.dumps(response.json())

    def page(**params: int | None) -> dict[str, int]:
        return {k: v for k, v in params.items() if v is not None}

    @mcp.tool(description="Every site's latest state: online, role, latest telemetry. " + UNITS)
    async def list_sites(ctx: Context) -> str:
        return await call(ctx, "GET", "/api/v1/sites")

    @mcp.tool(description="One site's latest state (grid, PV, battery W, SOC %). " + UNITS)
    async def site_state(site: str, ctx: Context) -> str:
        return await call(ctx, "GET", f"/api/v1/sites/{site}")

    @mcp.tool(description="A site's PV, load (W) and price (per kWh) forecast. " + UNITS)
    async def site_forecast(site: str, ctx: Context) -> str:
        return await call(ctx, "GET", f"/api/v1/sites/{site}/forecast")

    @mcp.tool(
        description="A site's statement over every settled interval: net cost, what the "
        "utility alone would have billed, savings. " + UNITS
    )
    async def site_statement(site: str, ctx: Context) -> str:
        return await call(ctx, "GET", f"/api/v1/sites/{site}/statement")

    @mcp.tool(
        description="Market clearings in an interval range (intervals are floor(ts / 900) for "
        "15-minute markets; at most `limit`, the newest): price and awards (kWh, + buys). " + UNITS
    )
    async def clearings(
        ctx: Context,
        from_interval: int | None = None,
        to_interval: int | None = None,
        limit: int = 96,
    ) -> str:
        params = page(from_interval=from_interval, to_interval=to_interval, limit=limit)
        return await call(ctx, "GET", "/api/v1/clearings", params=params)

    @mcp.tool(
        description="Settled intervals in a range: per site award and metered kWh, estimates "
        "with their reason, money received (negative: paid). " + UNITS
    )
    async def settlements(
        ctx: Context,
        from_interval: int | None = None,
        to_interval: int | None = None,
        limit: int = 96,
    ) -> str:
        params = page(from_interval=from_interval, to_interval=to_interval, limit=limit)
        return await call(ctx, "GET", "/api/v1/settlements", params=params)

    @mcp.tool(description="The feeder's flow against its import and export limits (W). " + UNITS)
    async def grid_state(ctx: Context) -> str:
        return await call(ctx, "GET", "/api/v1/grid")

    @mcp.tool(description="The newest audit log rows (orders, emergencies, rejections, ...).")
    async def audit_log(ctx: Context, kind: str | None = None, limit: int = 100) -> str:
        params: dict[str, Any] = {"limit": limit}
        if kind is not None:
            params["kind"] = kind
        return await call(ctx, "GET", "/api/v1/audit", params=params)

    @mcp.tool(
        description="OPERATOR ONLY. Order a site's battery to battery_power_w (W, positive "
        "discharges, negative charges) and/or cap its import at load_limit_w (W), for "
        "duration_s seconds; emergency outranks market commitments. The site's devices clamp "
        "to their limits; returns the site's acknowledgement (accepted, clamped, refused, ...). "
        "Recorded in the audit log under the caller's token name."
    )
    async def dispatch(
        site: str,
        ctx: Context,
        battery_power_w: float | None = None,
        load_limit_w: float | None = None,
        duration_s: float = 900.0,
        emergency: bool = False,
        reason: str = "",
    ) -> str:
        body: dict[str, Any] = {"duration_s": duration_s, "emergency": emergency}
        if battery_power_w is not None:
            body["battery_power_w"] = battery_power_w
        if load_limit_w is not None:
            body["load_limit_w"] = load_limit_w
        if reason:
            body["reason"] = reason
        return await call(ctx, "POST", f"/api/v1/sites/{site}/dispatch", json=body)

    @mcp.tool(description=WHAT_IF)
    async def what_if_battery(
        site: str,
        capacity_kwh: float,
        ctx: Context,
        power_kw: float | None = None,
        days: float = 7.0,
        start: str | None = None,
        soc_pct: float | None = None,
        variant: Literal["wattmesh", "self_consumption"] = "wattmesh",
    ) -> str:
        caller = json.loads(await call(ctx, "GET", "/api/v1/whoami"))
        if caller["role"] == "site" and caller["site"] != site:
            raise ToolError(f"403: a site token asks only about its own site {caller['site']}")
        question = {"capacity_kwh": capacity_kwh, "days": days, "soc_pct": soc_pct,
                    "variant": variant}  # fmt: skip
        if power_kw is not None:
            question["power_kw"] = power_kw
        return await _what_if(scenario_path, site, start, question, one_at_a_time)

    return mcp


async def _what_if(
    scenario: Path,
    site: str,
    start: str | None,
    question: dict[str, Any],
    limiter: anyio.CapacityLimiter,
) -> str:
    """Run :func:`wattmesh.whatif.run_whatif` in a worker thread (one at a time); its result
    as JSON text, or a ToolError saying what is wrong with the question."""
    from simulators.scenario import ScenarioError, load_scenario  # noqa: PLC0415 - slow
    from wattmesh import whatif  # noqa: PLC0415 - numpy and the engine: only when asked

    question.setdefault("power_kw", question["capacity_kwh"] / 2.0)
    try:
        config = load_scenario(scenario)
        when = None if start is None else whatif.parse_start(start)
        run = functools.partial(whatif.run_whatif, config, site, start=when, **question)
        result = await anyio.to_thread.run_sync(run, limiter=limiter)
    except (ScenarioError, whatif.WhatIfError) as err:
        raise ToolError(str(err)) from err
    return result.model_dump_json()


def run_stdio(api_url: str, token: str, scenario: Path | None = None) -> None:
    """Serve over stdio with one token."""
    build_server(api_url, stdio_token=token, scenario=scenario).run("stdio")


ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


class _RequireKnownToken:
    """ASGI middleware: 401 unless the bearer token is one the API accepts (checked once
    per token against the API, remembered by its hash)."""

    def __init__(self, app: ASGIApp, api_url: str) -> None:
        self.app, self.api_url = app, api_url
        self.known: set[str] = set()

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] == "http":
            headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
            auth = headers.get("authorization", "")
            if not auth.lower().startswith("bearer ") or not await self._accepted(auth[7:]):
                body = b'{"detail": "a bearer token the coordinator accepts is required"}'
                await send({
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"www-authenticate", b"Bearer")],
                })  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    async def _accepted(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode()).hexdigest()
        if digest in self.known:
            return True
        async with httpx.AsyncClient(base_url=self.api_url, timeout=10) as http:
            try:
                r = await http.get("/api/v1/grid", headers={"Authorization": f"Bearer {token}"})
            except httpx.HTTPError:
                return False
        if r.status_code == 200:
            self.known.add(digest)
            return True
        return False


def run_http(api_url: str, host: str, port: int, scenario: Path | None = None) -> None:
    """Serve streamable HTTP on ``http://host:port/mcp``, behind the API's tokens."""
    import uvicorn  # noqa: PLC0415

    app = build_server(api_url, scenario=scenario).streamable_http_app(host=host)
    uvicorn.run(_RequireKnownToken(app, api_url), host=host, port=port, log_level="warning")


def token_from_env(variable: str) -> str | None:
    """The stdio token from ``variable``."""
    return os.environ.get(variable) or None
