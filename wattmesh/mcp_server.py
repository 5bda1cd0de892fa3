"""``wattmesh mcp``: the coordinator's HTTP API as Model Context Protocol tools for AI agents.

An MCP server on the official ``mcp`` SDK that is a client of the coordinator's HTTP API
([api]): every tool is one API call made with the caller's bearer token, so the API's roles
hold here too. A site token reads only its site; only an operator token may dispatch, and the
API audits each order under the token's name. Transports:

- ``stdio`` (desktop agents start it): the token comes from an environment variable;
- ``http`` (streamable HTTP on ``/mcp``): each request carries ``Authorization: Bearer``; a
  request without a token the API accepts is refused with 401.

Units and signs (in every tool description): powers in W, site and feeder power positive when
importing, battery power positive when discharging; energy in kWh; prices in currency per kWh;
money as decimal strings of currency units; times as UTC epoch seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

__all__ = ["build_server", "run_http", "run_stdio"]

UNITS = (
    "Units: W (site/feeder power positive importing, battery power positive discharging), "
    "kWh, currency per kWh, money as decimal strings, times as UTC epoch seconds."
)


def _bearer(ctx: Context, stdio_token: str | None) -> str:
    if stdio_token is not None:
        return stdio_token
    request = ctx.request_context.request
    header = "" if request is None else str(request.headers.get("authorization", ""))
    if not header.lower().startswith("bearer "):
        raise ToolError("no bearer token on this request")
    return header[7:]


def build_server(api_url: str, stdio_token: str | None = None) -> MCPServer:
    """The MCP server, calling the API at ``api_url`` (stdio: with ``stdio_token``)."""
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

    return mcp


def run_stdio(api_url: str, token: str) -> None:
    """Serve over stdio with one token."""
    build_server(api_url, stdio_token=token).run("stdio")


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


def run_http(api_url: str, host: str, port: int) -> None:
    """Serve streamable HTTP on ``http://host:port/mcp``, behind the API's tokens."""
    import uvicorn  # noqa: PLC0415

    app = build_server(api_url).streamable_http_app(host=host)
    uvicorn.run(_RequireKnownToken(app, api_url), host=host, port=port, log_level="warning")


def token_from_env(variable: str) -> str | None:
    """The stdio token from ``variable``."""
    return os.environ.get(variable) or None
