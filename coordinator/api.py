"""The coordinator's HTTP API (``[api]``): read the community's state, send operator orders.

FastAPI on uvicorn, in the coordinator's own event loop, reading the coordinator's state and
its ledger directly. OpenAPI is generated (``/openapi.json``, ``/docs``) from the same pydantic
models as the bus where a response is a bus message.

Authentication: ``Authorization: Bearer <token>``. Tokens are random and stored only as their
SHA-256 (``wattmesh api token add``), each with a role:

- ``viewer``: reads everything (and ``/metrics``);
- ``site``: reads only its own site's state, forecast, awards, settlements and statement;
- ``operator``: reads everything and sends dispatch and emergency orders, which go through
  the same path as ``wattmesh dispatch`` (a ``Dispatch`` on the site's topic, the site's
  acknowledgement returned) and into the audit log under the token's name.

``GET /api/v1/whoami`` tells any token its own name, role and site (the MCP server asks it).

Reads are cheap: the token check is a coroutine (no worker-thread hop per request) and a
site's statement is kept as encoded JSON while the ledger file is unchanged (its SQLite
``data_version`` on a connection of our own, so commits from any process count).

Units and signs as on the bus: powers in W (site and feeder power positive importing, battery
power positive discharging), energy in kWh, money in currency units, times in UTC epoch s.
Lists that grow are paginated (``limit``, ``offset`` or an interval range).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import sqlite3
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, model_validator

from broker import topics
from broker.errors import BusUnavailable
from broker.messages import Dispatch, DispatchAck, Forecast, Telemetry
from coordinator.ledger import MICRO, LedgerError, to_currency

if TYPE_CHECKING:
    from coordinator.service import Coordinator

__all__ = [
    "ApiToken",
    "TokenError",
    "build_app",
    "hash_token",
    "load_tokens",
    "new_token",
    "write_tokens",
]

Role = Literal["viewer", "site", "operator"]
MAX_PAGE = 1000


class TokenError(ValueError):
    """A tokens file that is missing or wrong; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class ApiToken:
    """One token's name, role, site (for ``site`` tokens) and SHA-256 (hex)."""

    name: str
    role: Role
    sha256: str
    site: str | None = None


def new_token() -> str:
    """A fresh random token (shown once; only its hash is stored)."""
    return "wm_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The SHA-256 of a token, hex (tokens are random: no salt or slow hash needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


class _TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    role: Role
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    site: str | None = Field(default=None, pattern=topics.ID_PATTERN)

    @model_validator(mode="after")
    def _site_for_site_role(self) -> _TokenEntry:
        if (self.role == "site") != (self.site is not None):
            raise ValueError("a site token names its site; other roles name none")
        return self


def load_tokens(path: Path) -> dict[str, ApiToken]:
    """Tokens by SHA-256 from a tokens file (``[[token]]`` tables); TokenError naming it."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise TokenError(f"{path}: {err}") from err
    tokens: dict[str, ApiToken] = {}
    for i, raw in enumerate(data.get("token", [])):
        try:
            entry = _TokenEntry.model_validate(raw)
        except ValueError as err:
            raise TokenError(f"{path}: token[{i}]: {str(err).splitlines()[-1].strip()}") from err
        tokens[entry.sha256] = ApiToken(entry.name, entry.role, entry.sha256, entry.site)
    return tokens


def write_tokens(path: Path, tokens: Mapping[str, ApiToken]) -> None:
    """Write a tokens file (mode 600)."""
    lines = ["# wattmesh API tokens: only their SHA-256 is kept (wattmesh api token add).", ""]
    for t in sorted(tokens.values(), key=lambda t: t.name):
        lines += ["[[token]]", f'name = "{t.name}"', f'role = "{t.role}"']
        if t.site is not None:
            lines.append(f'site = "{t.site}"')
        lines += [f'sha256 = "{t.sha256}"', ""]
    path.write_text("\n".join(lines))
    path.chmod(0o600)


# --- response models ---------------------------------------------------------------------


class SiteState(BaseModel):
    """A site as the coordinator sees it now."""

    site: str
    online: bool
    role: str | None
    latest: Telemetry | None = Field(description="Its latest accepted telemetry (W, %, ts).")
    telemetry_age_s: float | None = Field(description="Seconds of the coordinator's clock.")
    rejected: dict[str, int] = Field(description="Messages refused at ingest, by reason.")


class CallerOut(BaseModel):
    """Who a token is: its name, role and, for a site token, its site."""

    name: str
    role: Role
    site: str | None


class GridStateOut(BaseModel):
    """The feeder now: flow W (+ imports), limits W, mode."""

    feeder: str
    ts: float
    flow_w: float
    import_limit_w: float
    export_limit_w: float
    mode: str


class ClearingOut(BaseModel):
    """A committed clearing: prices per kWh, awards in kWh (+ import)."""

    interval: int
    start_ts: float
    clearing_price_per_kwh: float
    retail_price_per_kwh: float
    feed_in_price_per_kwh: float
    settled: bool
    awards_kwh: dict[str, float]


class SiteSettlementOut(BaseModel):
    """One site's part of a settled interval: energy kWh (+ import), money in currency
    received (negative: paid)."""

    site: str
    award_kwh: float
    metered_kwh: float
    estimated: bool
    estimate_reason: str | None
    trade: str
    imbalance: str
    rebate: str
    total: str


class SettlementOut(BaseModel):
    """A settled interval (after corrections: ``revision`` counts them)."""

    interval: int
    start_ts: float
    revision: int
    sites: list[SiteSettlementOut]


class StatementOut(BaseModel):
    """A site's totals over every settled interval: energy kWh, money in currency."""

    site: str
    intervals: int
    estimated_intervals: int
    net_cost: str
    baseline_cost: str
    savings: str


class AuditOut(BaseModel):
    """One audit log row."""

    id: int
    ts: float
    kind: str
    actor: str
    detail: dict[str, Any]


class DispatchIn(BaseModel):
    """An operator's order: battery W (+ discharges) and/or a load limit W, for ``duration_s``
    seconds of the coordinator's clock."""

    model_config = ConfigDict(extra="forbid")

    battery_power_w: float | None = Field(default=None, ge=-1e9, le=1e9, allow_inf_nan=False)
    load_limit_w: float | None = Field(default=None, ge=0, le=1e9, allow_inf_nan=False)
    duration_s: float = Field(default=900.0, gt=0, le=86400, allow_inf_nan=False)
    emergency: bool = False
    reason: str = Field(default="", max_length=150)

    @model_validator(mode="after")
    def _something(self) -> DispatchIn:
        if self.battery_power_w is None and self.load_limit_w is None:
            raise ValueError("give battery_power_w and/or load_limit_w")
        return self


# --- the app -----------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False)


async def _caller(
    request: Request,
    cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiToken:
    """The token's holder; 401 without a known bearer token. (Async: FastAPI would run a
    plain function in a worker thread, a thread hop on every request.)"""
    if cred is None or cred.scheme.lower() != "bearer":
        raise HTTPException(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})
    digest = hash_token(cred.credentials)
    tokens: dict[str, ApiToken] = request.app.state.tokens
    for known, token in tokens.items():
        if hmac.compare_digest(known, digest):
            return token
    raise HTTPException(401, "unknown token", {"WWW-Authenticate": "Bearer"})


Caller = Annotated[ApiToken, Depends(_caller)]


class _StatementCache:
    """Statements as encoded JSON, per site, valid while the ledger file is unchanged.

    The ledger's version is SQLite's ``PRAGMA data_version`` on a read-only connection of our
    own: it changes whenever any other connection (the coordinator's, or ``wattmesh ledger``
    in another process) commits to the file. It is read before a statement is computed, so a
    statement is never served for a version older than the one it was computed from. Without
    that connection (the file cannot be opened read-only) nothing is cached.
    """

    def __init__(self, path: Path) -> None:
        self._bodies: dict[str, tuple[int, bytes]] = {}
        self._conn: sqlite3.Connection | None = None
        try:
            self._conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
            )
            self.version()
        except sqlite3.Error:
            self._conn = None

    def version(self) -> int | None:
        """The ledger's data version now; None when it cannot be told (never cached)."""
        if self._conn is None:
            return None
        try:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            return None

    def close(self) -> None:
        """Close our connection (idempotent); nothing is cached after."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def get(self, site: str, version: int | None) -> bytes | None:
        """The site's statement computed at ``version``, or None."""
        hit = self._bodies.get(site)
        return hit[1] if hit is not None and version is not None and hit[0] == version else None

    def put(self, site: str, version: int | None, body: bytes) -> None:
        """Keep ``body`` as the site's statement at ``version`` (a ledger version at or
        before the one it was computed from)."""
        if version is not None:
            self._bodies[site] = (version, body)


def _money(micro: int) -> str:
    return f"{to_currency(micro):.6f}"


def build_app(  # noqa: PLR0915 - one statement per route; they share the closure
    coordinator: Coordinator, tokens: Mapping[str, ApiToken], ack_timeout_s: float = 10.0
) -> FastAPI:
    """The API for one running coordinator."""
    c = coordinator
    app = FastAPI(
        title="wattmesh coordinator",
        version="1",
        description=(__doc__ or "").split("\n\n")[0],
    )
    app.state.tokens = dict(tokens)

    def may_read(token: ApiToken, site: str | None) -> None:
        if token.role == "site" and site != token.site:
            raise HTTPException(403, f"a site token reads only site {token.site}")

    def not_site(token: ApiToken) -> None:
        if token.role == "site":
            raise HTTPException(403, "a site token reads only its own site")

    def known_site(site: str) -> None:
        if site not in c.sites and site not in c.config.sites:
            raise HTTPException(404, f"no site {site!r}")

    def interval_start(k: int) -> float:
        return float(k * c.config.market.interval_s)

    @app.get("/api/v1/whoami", tags=["auth"])
    async def whoami(token: Caller) -> CallerOut:
        """The caller's token: its name, role and (site tokens) site."""
        return CallerOut(name=token.name, role=token.role, site=token.site)

    @app.get("/api/v1/sites", tags=["sites"])
    async def sites(token: Caller) -> list[SiteState]:
        """Every site's latest state (a site token: its own only)."""
        now = c.clock.now()
        return [
            SiteState(
                site=name,
                online=s.online,
                role=s.role,
                latest=s.latest,
                telemetry_age_s=None if s.latest is None else now - s.latest.ts,
                rejected=dict(s.rejected),
            )
            for name, s in sorted(c.sites.items())
            if token.role != "site" or name == token.site
        ]

    @app.get("/api/v1/sites/{site}", tags=["sites"])
    async def site_state(site: str, token: Caller) -> SiteState:
        """One site's latest state."""
        may_read(token, site)
        known_site(site)
        s = c.sites.get(site)
        if s is None:
            return SiteState(
                site=site, online=False, role=None, latest=None, telemetry_age_s=None, rejected={}
            )
        return SiteState(
            site=site,
            online=s.online,
            role=s.role,
            latest=s.latest,
            telemetry_age_s=None if s.latest is None else c.clock.now() - s.latest.ts,
            rejected=dict(s.rejected),
        )

    @app.get("/api/v1/sites/{site}/forecast", tags=["sites"])
    async def site_forecast(site: str, token: Caller) -> Forecast:
        """The site's last published forecast (PV and load W, price per kWh)."""
        may_read(token, site)
        forecast = c.last_forecasts.get(site)
        if forecast is None:
            raise HTTPException(404, f"no forecast for {site!r} yet")
        return forecast

    statements = _StatementCache(c.ledger.path)
    app.state.closers = [statements.close]

    @app.get("/api/v1/sites/{site}/statement", tags=["settlement"], response_model=StatementOut)
    async def statement(site: str, token: Caller) -> Response:
        """The site's totals over every settled interval (the ledger report's figures)."""
        may_read(token, site)
        version = statements.version()
        body = statements.get(site, version)
        if body is None:
            try:
                r = c.ledger.site_report(site)
            except LedgerError as err:
                raise HTTPException(404, str(err)) from err
            body = (
                StatementOut(
                    site=site,
                    intervals=r.intervals,
                    estimated_intervals=r.estimated_intervals,
                    net_cost=_money(r.net_cost_micro),
                    baseline_cost=_money(r.baseline_cost_micro),
                    savings=_money(r.savings_micro),
                )
                .model_dump_json(by_alias=True)
                .encode()
            )
            statements.put(site, version, body)
        return Response(body, media_type="application/json")

    def interval_range(start: int | None, end: int | None, limit: int) -> range:
        last = end if end is not None else int(c.clock.now() // c.config.market.interval_s) + 1
        first = start if start is not None else last - limit + 1
        if first > last:
            raise HTTPException(400, "from_interval must not be after to_interval")
        return range(max(first, last - limit + 1, 0), last + 1)

    @app.get("/api/v1/clearings", tags=["market"])
    async def clearings(
        token: Caller,
        from_interval: Annotated[int | None, Query(ge=0)] = None,
        to_interval: Annotated[int | None, Query(ge=0)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 96,
    ) -> list[ClearingOut]:
        """Committed clearings in an interval range (at most ``limit``, the newest); a site
        token sees only its own award in each."""
        out = []
        for k in interval_range(from_interval, to_interval, limit):
            record = c.ledger.clearing(k)
            if record is None:
                continue
            awards = {
                s: q
                for s, q in record.awards_kwh.items()
                if token.role != "site" or s == token.site
            }
            out.append(
                ClearingOut(
                    interval=k,
                    start_ts=interval_start(k),
                    clearing_price_per_kwh=record.clearing_price_per_kwh,
                    retail_price_per_kwh=record.retail_price_micro_per_kwh / MICRO,
                    feed_in_price_per_kwh=record.feed_in_price_micro_per_kwh / MICRO,
                    settled=record.settled,
                    awards_kwh=awards,
                )
            )
        return out

    @app.get("/api/v1/settlements", tags=["settlement"])
    async def settlements(
        token: Caller,
        from_interval: Annotated[int | None, Query(ge=0)] = None,
        to_interval: Annotated[int | None, Query(ge=0)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 96,
    ) -> list[SettlementOut]:
        """Settled intervals in a range (at most ``limit``, the newest); a site token sees only
        its own rows."""
        out = []
        for k in interval_range(from_interval, to_interval, limit):
            result = c.ledger.settlement(k)
            if result is None:
                continue
            rows = [
                SiteSettlementOut(
                    site=s.site,
                    award_kwh=s.award_wh / 1000.0,
                    metered_kwh=s.metered_wh / 1000.0,
                    estimated=s.estimated,
                    estimate_reason=s.estimate_reason,
                    trade=_money(s.trade_micro),
                    imbalance=_money(s.imbalance_micro),
                    rebate=_money(s.rebate_micro),
                    total=_money(s.total_micro),
                )
                for s in result.sites
                if token.role != "site" or s.site == token.site
            ]
            if rows:
                out.append(
                    SettlementOut(
                        interval=k, start_ts=interval_start(k), revision=result.revision, sites=rows
                    )
                )
        return out

    @app.get("/api/v1/grid", tags=["grid"])
    async def grid(token: Caller) -> GridStateOut:
        """The feeder's flow against its limits and the grid mode."""
        g = c.config.grid
        return GridStateOut(
            feeder=c.feeder,
            ts=c.clock.now(),
            flow_w=c.feeder_flow_w(),
            import_limit_w=g.import_limit_w,
            export_limit_w=g.export_limit_w,
            mode=c.mode,
        )

    @app.get("/api/v1/audit", tags=["audit"])
    async def audit(
        token: Caller,
        kind: str | None = None,
        since_ts: Annotated[float | None, Query(ge=0, allow_inf_nan=False)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    ) -> list[AuditOut]:
        """The newest audit rows, oldest first (viewers and operators)."""
        not_site(token)
        entries = c.ledger.audit_entries(since_ts=since_ts, kind=kind, limit=limit)
        return [
            AuditOut(id=e.audit_id, ts=e.ts, kind=e.kind, actor=e.actor, detail=dict(e.detail))
            for e in entries
        ]

    @app.get("/metrics", tags=["monitoring"], response_class=Response)
    async def metrics(token: Caller) -> Response:
        """Prometheus metrics (viewers and operators)."""
        not_site(token)
        if c.metrics_registry is None:
            raise HTTPException(404, "no metrics")
        return Response(generate_latest(c.metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/api/v1/sites/{site}/dispatch", tags=["operations"])
    async def dispatch(site: str, order: DispatchIn, token: Caller) -> DispatchAck:
        """Send an operator's order to a site and return its acknowledgement (504 when none
        arrives within the timeout). Operators only; recorded in the audit log."""
        if token.role != "operator":
            raise HTTPException(403, "only an operator token may dispatch")
        try:
            topics.check_id(site)
        except ValueError as err:
            raise HTTPException(422, str(err)) from err
        known_site(site)
        now = c.clock.now()
        command = Dispatch(
            ts=now,
            battery_power_w=order.battery_power_w,
            load_limit_w=order.load_limit_w,
            expires_ts=now + order.duration_s,
            priority="emergency" if order.emergency else "dispatch",
            reason=(order.reason or f"API order by {token.name}")[:200],
        )
        try:
            ack = await c.send_operator_order(
                site, command, actor=token.name, timeout_s=ack_timeout_s
            )
        except BusUnavailable as err:
            raise HTTPException(503, f"the broker is not reachable: {err}") from err
        if ack is None:
            raise HTTPException(504, f"no acknowledgement from {site} within {ack_timeout_s:g} s")
        return ack

    return app


class ApiServer:
    """uvicorn serving :func:`build_app` in the running event loop."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        import uvicorn  # noqa: PLC0415 - only a coordinator with [api] pays for it

        self.host = host
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            http="httptools",  # C parser; h11's pure-Python one costs about a fifth more
            access_log=False,
        )
        self._server = uvicorn.Server(self._config)
        self._closers: list[Callable[[], None]] = list(getattr(app.state, "closers", []))
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port listened on (the real one when 0 was asked for)."""
        servers = getattr(self._server, "servers", [])
        for server in servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return int(self._config.port)

    async def start(self) -> None:
        """Listen; OSError naming the address when it cannot."""
        self._task = asyncio.create_task(self._server.serve(), name="coordinator-api")
        while not self._server.started:
            if self._task.done():
                err = self._task.exception()
                raise OSError(f"api: cannot listen on {self.host}:{self._config.port}: {err}")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop serving."""
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, SystemExit):
                await self._task
        for close in self._closers:
            close()
