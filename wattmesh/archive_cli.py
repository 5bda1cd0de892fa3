"""``wattmesh archive``: the command line of :mod:`wattmesh.archive` (Parquet export).

Kept apart so that ``wattmesh`` (and the edge agent it runs) does not load pyarrow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.config import CoordinatorConfigError, load_coordinator_config
from wattmesh.ledger_location import (
    LedgerLocation,
    LedgerLocationError,
    from_config,
    parse_location,
)

archive_app = typer.Typer(
    help="Export the ledger and telemetry as Parquet files for pandas, DuckDB or Spark.",
    no_args_is_help=True,
)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


@archive_app.command("export")
def export_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Where the archive goes.")],
    start: Annotated[
        str,
        typer.Option(
            "--from", metavar="WHEN", help="Start (inclusive): 2026-06-22 or 2026-06-22T06:00Z."
        ),
    ],
    end: Annotated[str, typer.Option("--to", metavar="WHEN", help="End (exclusive), as --from.")],
    config: Annotated[
        Path | None,
        typer.Option(help="coordinator.toml: its ledger, market interval and historian url."),
    ] = None,
    ledger: Annotated[
        str | None,
        typer.Option(
            help="The ledger (instead of or over --config's): a SQLite file, or "
            "postgresql://user@host:port/db with the password in $WATTMESH_LEDGER_PASSWORD."
        ),
    ] = None,
    interval_s: Annotated[
        int | None,
        typer.Option(min=60, max=86_400, help="Market interval (s); default --config's or 900."),
    ] = None,
    telemetry_url: Annotated[
        str | None,
        typer.Option(help="The historian's VictoriaMetrics, e.g. http://127.0.0.1:8428."),
    ] = None,
) -> None:
    """Write settlements, clearings, awards and telemetry of [--from, --to) as Parquet files partitioned by day: DIR/settlements/date=2026-06-22/part-0.parquet (Hive style).

    Times are UTC unless they carry an offset; a row goes to the UTC day its interval starts in (telemetry: its timestamp). Running an export again replaces the days it covers. Ledger columns keep the ledger's units (Wh, micro-currency); telemetry is the historian's "site" and "device" series, read through VictoriaMetrics' /api/v1/export.

    Exit codes: 0 done; 2 bad range, options or ledger; 3 the ledger parts were written but the telemetry could not be read (the message says why).
    """  # noqa: E501 - one line per paragraph: the help wraps it to the terminal
    from wattmesh.archive import (  # noqa: PLC0415 - pyarrow loads only when exporting
        ArchiveError,
        export_archive,
        parse_range,
    )

    try:
        time_range = parse_range(start, end)
    except ArchiveError as err:
        raise _fail(str(err)) from err
    url = telemetry_url
    location: LedgerLocation | None = None
    try:
        if ledger is not None:
            location = parse_location(ledger)
        if config is not None:
            try:
                cfg = load_coordinator_config(config)
            except CoordinatorConfigError as err:
                raise _fail(str(err)) from err
            location = location or from_config(config)
            interval_s = interval_s or cfg.market.interval_s
            if url is None and cfg.historian is not None and "url" in cfg.historian:
                url = str(cfg.historian["url"])
    except LedgerLocationError as err:
        raise _fail(str(err)) from err
    if location is None:
        raise _fail(
            "give --ledger LEDGER.sqlite (or a postgresql:// URL) or --config coordinator.toml"
        )
    try:
        result = export_archive(
            directory, time_range, ledger=location, interval_s=interval_s or 900, telemetry_url=url
        )
    except ArchiveError as err:
        raise _fail(str(err)) from err
    except OSError as err:
        raise _fail(f"cannot write the archive in {directory}: {err}") from err
    for name, count in result.rows.items():
        typer.echo(f"{name}: {count} row(s)")
    typer.echo(f"{len(result.files)} file(s) in {directory}")
    if result.telemetry_error is not None:
        typer.echo(f"telemetry not exported: {result.telemetry_error}", err=True)
        raise typer.Exit(3)
