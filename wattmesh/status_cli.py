"""``wattmesh status``: the coordinator's health counters and every site's status, from the bus.

Reads the retained ``coordinator/{feeder}/status`` and ``site/{site}/status`` messages: what was
rejected at ingest (by site and reason), corrections, estimates, unsettled clearings, the
historian's buffer, and each site's availability with the counters its agent publishes.

On a many-feeders broker (``wattmesh broker init --feeders``, broker/feeders.py) it reads every
feeder at once through the operator listener (``feeder/{id}/wattmesh/v1/...``) and shows one
row per feeder and their total: sites online, feeder flow, grid mode and the last clearing.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from broker import topics
from broker.client import BusClient, BusSettings
from broker.errors import BusUnavailable
from broker.feeders import ALL_FEEDERS_PREFIX, split_mounted
from broker.messages import Clearing, CoordinatorStatus, GridState, Status


@dataclass
class Snapshot:
    """What the bus said within the wait."""

    coordinators: dict[str, CoordinatorStatus] = field(default_factory=dict)
    sites: dict[str, Status] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)


async def read_status(settings: BusSettings, wait_s: float) -> Snapshot:
    """Collect the retained status messages for ``wait_s`` (s) at most."""
    snap = Snapshot()
    got_coordinator = asyncio.Event()

    async def handle(topic: str, payload: bytes) -> None:
        try:
            parsed = topics.parse_topic(topic)
            if parsed.kind == "coordinator/status" and parsed.feeder is not None:
                snap.coordinators[parsed.feeder] = CoordinatorStatus.model_validate_json(payload)
                got_coordinator.set()
            elif parsed.kind == "status" and parsed.site is not None:
                snap.sites[parsed.site] = Status.model_validate_json(payload)
        except (ValueError, ValidationError) as err:
            snap.invalid.append(f"{topic}: {str(err).splitlines()[0]}")

    failure: str | None = None
    async with BusClient(settings, handler=handle) as bus:
        try:
            await bus.wait_connected(min(5.0, wait_s))
        except TimeoutError:
            failure = (
                f"the broker refused user {settings.username!r}: {bus.refusal}"
                if bus.refusal is not None
                else f"cannot reach the broker: {bus.last_error or 'no answer'}"
            )
        else:
            await bus.subscribe(topics.COORDINATOR_STATUS_ALL)
            await bus.subscribe(topics.site_wildcard("status"))
            try:
                async with asyncio.timeout(wait_s):
                    await got_coordinator.wait()
                await asyncio.sleep(min(0.5, wait_s))  # the sites' retained messages follow
            except TimeoutError:
                pass
    if failure is not None:  # raised here, outside the client: no TaskGroup wrapper
        raise BusUnavailable(failure)
    return snap


# -- many feeders on one broker ---------------------------------------------------------------


@dataclass
class FeederView:
    """What one feeder's retained messages said (its topics under ``feeder/{id}/``)."""

    coordinator: CoordinatorStatus | None = None
    sites: dict[str, Status] = field(default_factory=dict)
    grid: dict[str, GridState] = field(default_factory=dict)
    clearing: Clearing | None = None


@dataclass
class FeedersSnapshot:
    """Every feeder seen through the operator listener within the wait."""

    feeders: dict[str, FeederView] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)


#: What the operator view subscribes to on the operator listener (no mount point).
FEEDERS_SUBSCRIPTIONS = tuple(
    f"{ALL_FEEDERS_PREFIX}/{rest}"
    for rest in ("coordinator/+/status", "site/+/status", "grid/+/state", "market/clearing")
)


def take_feeder_message(snap: FeedersSnapshot, topic: str, payload: bytes) -> str | None:
    """File one message of ``feeder/{id}/wattmesh/v1/...`` into ``snap``; the feeder's id."""
    mounted = split_mounted(topic)
    if mounted is None:
        snap.invalid.append(f"{topic}: not under feeder/<id>/{topics.PREFIX}/")
        return None
    feeder, local = mounted
    try:
        parsed = topics.parse_topic(local)
        view = snap.feeders.setdefault(feeder, FeederView())
        if parsed.kind == "coordinator/status":
            view.coordinator = CoordinatorStatus.model_validate_json(payload)
        elif parsed.kind == "status" and parsed.site is not None:
            view.sites[parsed.site] = Status.model_validate_json(payload)
        elif parsed.kind == "grid/state" and parsed.feeder is not None:
            view.grid[parsed.feeder] = GridState.model_validate_json(payload)
        elif parsed.kind == "market/clearing":
            view.clearing = Clearing.model_validate_json(payload)
    except (ValueError, ValidationError) as err:
        snap.invalid.append(f"{topic}: {str(err).splitlines()[0]}")
        return None
    return feeder


async def read_feeders_status(
    settings: BusSettings, wait_s: float, expected: Sequence[str] = ()
) -> FeedersSnapshot:
    """Collect every feeder's retained messages for ``wait_s`` (s) at most.

    Stops early once each ``expected`` feeder (any feeder, when none are expected) has shown
    its coordinator's status, after half a second more for the rest of the retained messages.
    """
    snap = FeedersSnapshot()
    done = asyncio.Event()

    async def handle(topic: str, payload: bytes) -> None:
        if take_feeder_message(snap, topic, payload) is None:
            return
        seen = {f for f, v in snap.feeders.items() if v.coordinator is not None}
        if (set(expected) <= seen) if expected else seen:
            done.set()

    failure: str | None = None
    async with BusClient(settings, handler=handle) as bus:
        try:
            await bus.wait_connected(min(5.0, wait_s))
        except TimeoutError:
            failure = (
                f"the broker refused user {settings.username!r}: {bus.refusal}"
                if bus.refusal is not None
                else f"cannot reach the broker: {bus.last_error or 'no answer'}"
            )
        else:
            for topic in FEEDERS_SUBSCRIPTIONS:
                await bus.subscribe(topic)
            try:
                async with asyncio.timeout(wait_s):
                    await done.wait()
                await asyncio.sleep(min(0.5, wait_s))
            except TimeoutError:
                pass
    if failure is not None:
        raise BusUnavailable(failure)
    return snap


def _local_volume_kwh(awards_kwh: Mapping[str, float]) -> float:
    """Energy traded between sites (kWh) by net award: the smaller of the imports and the
    exports awarded. Equal to the clearing's ``volume_kwh`` unless a site had both a buy and a
    sell step awarded in the same interval (then it is smaller by that site's smaller side)."""
    bought = sum(q for q in awards_kwh.values() if q > 0)
    sold = -sum(q for q in awards_kwh.values() if q < 0)
    return max(0.0, min(bought, sold))


async def read_feeders_api(
    apis: Mapping[str, str], token: str | None, timeout_s: float = 10.0
) -> FeedersSnapshot:
    """Every feeder's view from its coordinator's HTTP API (``feeder id -> base URL``).

    Reads ``/api/v1/grid``, ``/api/v1/sites`` and the newest of ``/api/v1/clearings``; a
    feeder whose API cannot be read is named in ``invalid`` and left out.
    """
    import httpx  # noqa: PLC0415 - only this path needs it

    snap = FeedersSnapshot()
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def one(feeder: str, url: str, http: httpx.AsyncClient) -> None:
        base = url.rstrip("/")
        try:
            answers = await asyncio.gather(
                *(
                    http.get(f"{base}/api/v1/{path}", headers=headers)
                    for path in ("grid", "sites", "clearings?limit=8")
                )
            )
            for answer in answers:
                answer.raise_for_status()
            grid, sites, clearings = (a.json() for a in answers)
            view = FeederView()
            state = GridState.model_validate({k: grid[k] for k in _GRID_FIELDS})
            view.grid[str(grid["feeder"])] = state
            for site in sites:
                view.sites[str(site["site"])] = Status(ts=state.ts, online=bool(site["online"]))
            if clearings:
                newest = max(clearings, key=lambda c: int(c["interval"]))
                view.clearing = Clearing(
                    ts=state.ts,
                    interval=int(newest["interval"]),
                    price_per_kwh=float(newest["clearing_price_per_kwh"]),
                    volume_kwh=_local_volume_kwh(newest["awards_kwh"]),
                )
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
            snap.invalid.append(f"{feeder}: cannot read {base}/api/v1: {err}")
            return
        snap.feeders[feeder] = view

    async with httpx.AsyncClient(timeout=timeout_s) as http:
        await asyncio.gather(*(one(f, url, http) for f, url in apis.items()))
    return snap


_GRID_FIELDS = ("ts", "flow_w", "import_limit_w", "export_limit_w", "mode")


_MODE_RANK = {"normal": 0, "constrained": 1, "emergency": 2}


@dataclass(frozen=True, slots=True)
class FeederRow:
    """One line of the operator view: a feeder, or the total of all feeders.

    ``flow_w`` is the feeder's net import (W, positive importing); in the total, the sum.
    The total's clearing is the newest interval any feeder cleared, its volume summed over
    the feeders that cleared that interval (``cleared_feeders``); a price does not add up,
    so the total has none. The total's mode is the worst feeder's.
    """

    feeder: str
    mode: str | None
    sites_online: int
    sites_known: int
    flow_w: float | None
    last_interval: int | None
    price_per_kwh: float | None
    volume_kwh: float | None
    cleared_feeders: int


def feeder_rows(
    snap: FeedersSnapshot, sites_by_feeder: Mapping[str, Sequence[str]] | None = None
) -> tuple[list[FeederRow], FeederRow]:
    """Per-feeder rows (sorted by id) and their total.

    ``sites_by_feeder`` (from the broker's credentials.toml) makes a configured site without a
    status count as known and offline; without it the known sites are those with a status.
    """
    configured = dict(sites_by_feeder or {})
    rows: list[FeederRow] = []
    for feeder in sorted(set(snap.feeders) | set(configured)):
        view = snap.feeders.get(feeder, FeederView())
        known = set(configured.get(feeder, ())) | set(view.sites)
        mode = view.coordinator.mode if view.coordinator is not None else None
        for state in view.grid.values():
            if mode is None or _MODE_RANK[state.mode] > _MODE_RANK[mode]:
                mode = state.mode
        c = view.clearing
        rows.append(
            FeederRow(
                feeder=feeder,
                mode=mode,
                sites_online=sum(1 for s in view.sites.values() if s.online),
                sites_known=len(known),
                flow_w=sum(g.flow_w for g in view.grid.values()) if view.grid else None,
                last_interval=c.interval if c is not None else None,
                price_per_kwh=c.price_per_kwh if c is not None else None,
                volume_kwh=c.volume_kwh if c is not None else None,
                cleared_feeders=int(c is not None),
            )
        )
    flows = [r.flow_w for r in rows if r.flow_w is not None]
    modes = [r.mode for r in rows if r.mode is not None]
    intervals = [r.last_interval for r in rows if r.last_interval is not None]
    newest = max(intervals) if intervals else None
    cleared = [r for r in rows if newest is not None and r.last_interval == newest]
    total = FeederRow(
        feeder="total",
        mode=max(modes, key=_MODE_RANK.__getitem__) if modes else None,
        sites_online=sum(r.sites_online for r in rows),
        sites_known=sum(r.sites_known for r in rows),
        flow_w=sum(flows) if flows else None,
        last_interval=newest,
        price_per_kwh=None,
        volume_kwh=sum(r.volume_kwh or 0.0 for r in cleared) if cleared else None,
        cleared_feeders=len(cleared),
    )
    return rows, total


def feeders_json(
    snap: FeedersSnapshot, sites_by_feeder: Mapping[str, Sequence[str]] | None = None
) -> dict[str, Any]:
    """The operator view as plain JSON: per-feeder rows, the total, each feeder's messages."""
    rows, total = feeder_rows(snap, sites_by_feeder)
    views = snap.feeders
    return {
        "feeders": {
            r.feeder: {
                **asdict(r),
                "coordinator": (
                    c.model_dump()
                    if (c := views.get(r.feeder, FeederView()).coordinator) is not None
                    else None
                ),
                "sites": {
                    name: s.model_dump()
                    for name, s in sorted(views.get(r.feeder, FeederView()).sites.items())
                },
            }
            for r in rows
        },
        "total": asdict(total),
        "invalid": snap.invalid,
    }


def print_feeders(
    snap: FeedersSnapshot,
    console: Console,
    sites_by_feeder: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """One row per feeder and the total, for a person."""
    rows, total = feeder_rows(snap, sites_by_feeder)
    table = Table(title="feeders")
    for name, justify in (
        ("feeder", "left"),
        ("mode", "left"),
        ("sites online", "right"),
        ("flow kW (+ import)", "right"),
        ("last cleared interval", "right"),
        ("price /kWh", "right"),
        ("volume kWh", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in [*rows, total]:
        table.add_row(
            r.feeder,
            r.mode or "-",
            f"{r.sites_online}/{r.sites_known}",
            fmt(None if r.flow_w is None else r.flow_w / 1000.0, ".1f"),
            "-" if r.last_interval is None else str(r.last_interval),
            fmt(r.price_per_kwh, ".4f"),
            fmt(r.volume_kwh, ".2f")
            + (
                f" ({r.cleared_feeders} feeders)"
                if r is total and r.cleared_feeders and r.cleared_feeders != len(rows)
                else ""
            ),
            end_section=r is rows[-1] if rows else False,
        )
    console.print(table)
    for line in snap.invalid:
        console.print(f"[yellow]left out[/] {line}", highlight=False)


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def snapshot_json(snap: Snapshot) -> dict[str, Any]:
    """The snapshot as plain JSON."""
    return {
        "coordinators": {k: v.model_dump() for k, v in sorted(snap.coordinators.items())},
        "sites": {k: v.model_dump() for k, v in sorted(snap.sites.items())},
        "invalid": snap.invalid,
    }


def print_snapshot(snap: Snapshot, console: Console) -> None:
    """Tables for a person."""
    for feeder, c in sorted(snap.coordinators.items()):
        table = Table(title=f"coordinator of {feeder} at {_utc(c.ts)}", show_header=False)
        table.add_column("what")
        table.add_column("value", justify="right")
        for label, value in (
            ("grid mode", c.mode),
            ("running since", _utc(c.started_ts)),
            ("telemetry accepted", c.telemetry),
            ("duplicates", c.duplicates),
            ("bids accepted", c.bids),
            ("clearings", c.clearings),
            ("last cleared interval", c.last_cleared_interval),
            ("settled", c.settled),
            ("cleared, not yet settled", c.unsettled),
            ("site-intervals estimated", c.estimated),
            ("corrections", c.corrections),
            ("grid orders", c.dispatches),
            ("historian", c.historian),
            ("historian points dropped", c.historian_dropped),
            ("historian points buffered on disk", c.historian_buffered),
        ):
            table.add_row(label, "-" if value is None else str(value))
        console.print(table)
        if c.rejected:
            rejected = Table(title="rejected at ingest")
            rejected.add_column("site")
            rejected.add_column("reason")
            rejected.add_column("count", justify="right")
            for site, reasons in sorted(c.rejected.items()):
                for reason, count in sorted(reasons.items()):
                    rejected.add_row(site, reason, str(count))
            console.print(rejected)
        else:
            console.print("nothing rejected at ingest", highlight=False)
    if snap.sites:
        sites = Table(title="sites")
        sites.add_column("site")
        sites.add_column("online")
        sites.add_column("role")
        sites.add_column("since")
        sites.add_column("agent counters")
        base = set(Status.model_fields) - {"online", "role", "ts"}
        for name, s in sorted(snap.sites.items()):
            extra = {
                k: v
                for k, v in s.model_dump().items()
                if k not in base and k not in ("online", "role", "ts") and v not in (None, {}, [])
            }
            sites.add_row(
                name,
                "yes" if s.online else "NO",
                s.role or "-",
                _utc(s.ts),
                json.dumps(extra, separators=(",", ":")) if extra else "-",
            )
        console.print(sites)
    for line in snap.invalid:
        console.print(f"[yellow]invalid status message[/] {line}", highlight=False)


def status(
    host: Annotated[
        str | None, typer.Option(help="Broker host (default: --broker-dir's, else 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Broker port (default: --broker-dir's, else 1883).")
    ] = None,
    user: Annotated[str, typer.Option(help="Broker user that may read the wattmesh topics.")] = (
        "operator"
    ),
    password_env: Annotated[
        str, typer.Option(help="Environment variable holding that user's password.")
    ] = "WATTMESH_OPERATOR_PASSWORD",
    wait: Annotated[float, typer.Option(help="Seconds to wait for the status messages.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    broker_dir: Annotated[
        Path | None,
        typer.Option(
            help="The broker's directory (`wattmesh broker init DIR`, or STATE/broker of "
            "`wattmesh up`): its credentials.toml gives the host, port and the user's password "
            "when no option or variable does. A many-feeders broker (`broker init --feeders`) "
            "shows every feeder and their total, through its operator listener."
        ),
    ] = None,
    api: Annotated[
        list[str] | None,
        typer.Option(
            "--api",
            metavar="FEEDER=URL",
            help="A feeder's coordinator HTTP API, e.g. north=http://10.0.0.5:8080 (repeat it "
            "for each feeder): one row per feeder and the total, from the APIs instead of the "
            "broker. The token is in --token-env.",
        ),
    ] = None,
    token_env: Annotated[
        str, typer.Option(help="Environment variable holding the API token (with --api).")
    ] = "WATTMESH_API_TOKEN",
    all_feeders: Annotated[
        bool,
        typer.Option(
            "--all-feeders",
            help="The broker at --host/--port is a many-feeders broker's operator listener: "
            "show one row per feeder and the total (implied by a many-feeders --broker-dir).",
        ),
    ] = False,
) -> None:
    """Show the coordinator's health counters and every site's status.

    Reads the retained status messages from the broker, as the operator by default (any user that may read the wattmesh topics will do). Counters count since the coordinator started. Exit code 0 when a coordinator status was found, 1 otherwise.
    """  # noqa: E501 - one line per paragraph: the help wraps it to the terminal
    if api:
        _api_status(api, os.environ.get(token_env), wait, as_json)
        return
    password = os.environ.get(password_env)
    from broker.feeders import is_feeders_broker  # noqa: PLC0415 - keeps --help fast

    if all_feeders or (broker_dir is not None and is_feeders_broker(broker_dir)):
        _feeders_status(host, port, user, password, wait, as_json, broker_dir)
        return
    if broker_dir is not None:
        from broker.errors import BrokerConfigError  # noqa: PLC0415
        from broker.mosquitto import load_broker_files  # noqa: PLC0415 - keeps --help fast

        try:
            files = load_broker_files(broker_dir)
        except BrokerConfigError as err:
            Console(stderr=True).print(f"error: {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        host, port = host or files.connect_host, port or files.port
        if password is None:
            password = files.credentials.get(user)
    host, port = host or "127.0.0.1", port or 1883
    settings = BusSettings(
        host=host,
        port=port,
        username=user,
        password=password,
        client_id=f"wattmesh-status-{os.getpid()}",
        session_expiry_s=0,
    )
    console = Console()
    try:
        snap = asyncio.run(read_status(settings, wait))
    except Exception as err:
        console.print(
            f"cannot read the status from {host}:{port}: {err}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(snapshot_json(snap), indent=2))
    else:
        print_snapshot(snap, console)
    if not snap.coordinators:
        if not as_json:
            console.print(f"no coordinator status on the bus within {wait:g} s", highlight=False)
        raise typer.Exit(1)


def _feeders_status(
    host: str | None,
    port: int | None,
    user: str,
    password: str | None,
    wait: float,
    as_json: bool,
    broker_dir: Path | None,
) -> None:
    """``wattmesh status`` on a many-feeders broker: one row per feeder and the total.

    Exit code 0 when every configured feeder (without ``broker_dir``: at least one) showed its
    coordinator's status, 1 otherwise.
    """
    sites_by_feeder: dict[str, tuple[str, ...]] = {}
    if broker_dir is not None:
        from broker.errors import BrokerConfigError  # noqa: PLC0415
        from broker.feeders import load_feeders_broker  # noqa: PLC0415

        try:
            files = load_feeders_broker(broker_dir)
        except BrokerConfigError as err:
            Console(stderr=True).print(f"error: {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        host, port = host or files.connect_host, port or files.port
        if password is None:
            password = files.credentials.get(user)
        sites_by_feeder = {f.id: f.sites for f in files.feeders}
    host, port = host or "127.0.0.1", port or 1883
    settings = BusSettings(
        host=host,
        port=port,
        username=user,
        password=password,
        client_id=f"wattmesh-status-{os.getpid()}",
        session_expiry_s=0,
    )
    console = Console()
    try:
        snap = asyncio.run(read_feeders_status(settings, wait, tuple(sites_by_feeder)))
    except Exception as err:
        console.print(
            f"cannot read the status from {host}:{port}: {err}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(feeders_json(snap, sites_by_feeder), indent=2))
    else:
        print_feeders(snap, console, sites_by_feeder)
    reporting = {f for f, v in snap.feeders.items() if v.coordinator is not None}
    missing = sorted(set(sites_by_feeder) - reporting)
    if missing or not reporting:
        if not as_json:
            console.print(
                f"no coordinator status within {wait:g} s from feeder(s): "
                f"{', '.join(missing) or 'any'}",
                highlight=False,
            )
        raise typer.Exit(1)


def _api_status(apis: list[str], token: str | None, wait: float, as_json: bool) -> None:
    """``wattmesh status --api FEEDER=URL ...``: exit code 0 when every API answered."""
    err = Console(stderr=True)
    urls: dict[str, str] = {}
    for item in apis:
        feeder, sep, url = item.partition("=")
        try:
            topics.check_id(feeder, "feeder")
        except ValueError as error:
            err.print(f"error: --api {item}: {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        if not sep or not url.startswith(("http://", "https://")) or feeder in urls:
            err.print(
                f"error: --api {item}: give each feeder once, as FEEDER=http://HOST:PORT",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2)
        urls[feeder] = url
    snap = asyncio.run(read_feeders_api(urls, token, max(wait, 1.0)))
    if as_json:
        print(json.dumps(feeders_json(snap), indent=2))
    else:
        print_feeders(snap, Console())
    if snap.invalid:
        raise typer.Exit(1)
