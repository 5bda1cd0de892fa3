"""``wattmesh status``: the coordinator's health counters and every site's status, from the bus.

Reads the retained ``coordinator/{feeder}/status`` and ``site/{site}/status`` messages: what was
rejected at ingest (by site and reason), corrections, estimates, unsettled clearings, the
historian's buffer, and each site's availability with the counters its agent publishes.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
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
from broker.messages import CoordinatorStatus, Status


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
            "when no option or variable does."
        ),
    ] = None,
) -> None:
    """Show the coordinator's health counters and every site's status.

    Reads the retained status messages from the broker, as the operator by default (any user that may read the wattmesh topics will do). Counters count since the coordinator started. Exit code 0 when a coordinator status was found, 1 otherwise.
    """  # noqa: E501 - one line per paragraph: the help wraps it to the terminal
    password = os.environ.get(password_env)
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
