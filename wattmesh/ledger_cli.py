"""``wattmesh ledger``: read a settlement ledger (``coordinator.ledger``) for people and machines.

``report`` prints each site's energy, money and savings against the utility-alone baseline
(docs/architecture.md s. 6), a community total, the community and utility accounts' balances and
whether the ledger balances; ``check`` verifies the balance invariant for cron and monitoring
and lists what is still open (cleared intervals not settled, sites estimated or missing,
corrections booked); ``audit`` lists the append-only audit log; ``backup`` and ``restore``
(wattmesh.ledger_backup) copy a live ledger consistently and put a copy back.

The ledger is a SQLite file or a ``postgresql://`` URL (password from
``$WATTMESH_LEDGER_PASSWORD``, never in the URL), or ``--config coordinator.toml`` names it
(wattmesh.ledger_location); the output is the same on both engines.

Every command only reads: a file that is missing, not SQLite, or SQLite without the ledger's
tables, and a PostgreSQL database without them, is refused before
:class:`~coordinator.ledger.Ledger` opens it (opening creates the file and its schema, which a
report must never do to a stranger's database).

Exit codes: 0 success; 1 ``check`` found the ledger unbalanced; 2 usage or input error (missing
file, not a ledger, unknown site, unreadable database, unreachable server, refused password,
psycopg missing), printed as one line on stderr; 3
``check --strict`` found a cleared interval unsettled for longer than ``--max-age`` or a site
missing from an interval (balanced otherwise).

JSON money is a decimal string of currency units with exactly six decimals, the ledger's exact
micro-currency (``"-0.675000"``; parse it with ``decimal.Decimal``, never lose a micro to a
float); energy is a JSON number of kWh with at most three decimals, the ledger's exact Wh.
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Annotated, Any, Final

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coordinator.ledger import (
    COMMUNITY,
    UTILITY,
    AuditEntry,
    ClearedInterval,
    EstimatedSite,
    Ledger,
    LedgerError,
    SiteReport,
    site_account,
    to_currency,
)
from wattmesh import ledger_backup
from wattmesh.ledger_location import (
    LEDGER_TABLES,
    PASSWORD_ENV,
    LedgerLocation,
    LedgerLocationError,
    one_line,
    open_postgres_ledger,
    resolve_location,
)

__all__ = [
    "AUDIT_VERSION",
    "REPORT_VERSION",
    "LedgerHealth",
    "LedgerReport",
    "UnknownSite",
    "audit_json",
    "build_health",
    "build_report",
    "ledger_app",
    "report_json",
]

#: Version of the ``report --json`` document layout (bumped when a key changes meaning).
REPORT_VERSION: Final = 3
#: Version of the ``audit --json`` document layout.
AUDIT_VERSION: Final = 1
#: The market interval the check assumes to give intervals UTC times (docs/architecture.md s. 4).
DEFAULT_INTERVAL_S: Final = 900

_SQLITE_HEADER: Final = b"SQLite format 3\x00"
_SITE_PREFIX: Final = site_account("")
_MAX_DECIMALS: Final = 6

ledger_app = typer.Typer(
    help="The settlement ledger: per-site report, savings, the balance check and the audit log.",
    no_args_is_help=True,
    add_completion=False,
)


class _CliError(Exception):
    """A problem reported as one line on stderr with exit code 2."""


class UnknownSite(LookupError):
    """``--site`` names no site of a ledger that has settled intervals."""

    def __init__(self, site: str, known: tuple[str, ...]) -> None:
        self.site = site
        self.known = known
        super().__init__(f"no site {site!r} in the ledger (sites: {', '.join(known)})")


def _fail(message: str, code: int = 2) -> typer.Exit:
    # One line, never wrapped; site ids and paths are not markup.
    Console(stderr=True).print(
        f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True
    )
    return typer.Exit(code)


def _stdout() -> Console:
    # Piped output gets a width that fits both tables; a terminal keeps its own.
    return Console(width=None if sys.stdout.isatty() else 120, highlight=False)


# --- opening a ledger without ever creating one ------------------------------------------


def _require_ledger_file(path: Path) -> None:
    """Refuse a path that is not an existing wattmesh ledger, reading it only."""
    if not path.exists():
        raise _CliError(f"{path}: no such file")
    if not path.is_file():
        raise _CliError(f"{path}: not a file")
    try:
        with path.open("rb") as f:
            header = f.read(len(_SQLITE_HEADER))
    except OSError as err:
        raise _CliError(f"{path}: cannot read: {err.strerror or err}") from err
    if header != _SQLITE_HEADER:
        raise _CliError(f"{path}: not a wattmesh ledger (not an SQLite database)")
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as err:
        raise _CliError(f"{path}: cannot read the database: {err}") from err
    missing = LEDGER_TABLES - {str(r[0]) for r in rows}
    if missing:
        raise _CliError(
            f"{path}: not a wattmesh ledger (missing tables: {', '.join(sorted(missing))})"
        )


def _locate(ledger: str | None, config: Path | None) -> LedgerLocation:
    """The ledger the command names (a file, a URL, or ``--config``'s)."""
    try:
        return resolve_location(ledger, config)
    except LedgerLocationError as err:
        raise _CliError(str(err)) from err


def _open_ledger(location: LedgerLocation) -> Ledger:
    """Open an existing ledger for reading: never create, never migrate."""
    try:
        if location.is_postgres:
            open_postgres_ledger(location).close()  # refuse a database without the ledger
        else:
            _require_ledger_file(location.path)
    except LedgerLocationError as err:
        raise _CliError(str(err)) from err
    try:
        # A report never upgrades the ledger.
        return Ledger(location.target, migrate=False, password=location.password)
    except LedgerError as err:  # schema version, locked, read-only directory, corrupt
        raise _CliError(f"{location.name}: {one_line(err)}") from err


_LEDGER_HELP: Final = (
    "The ledger: a SQLite file, or postgresql://user@host:port/db with the password in "
    f"${PASSWORD_ENV}."
)
_CONFIG_HELP: Final = "Read the ledger from this coordinator file (ledger or ledger_url)."


# --- the report as data -------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerReport:
    """Everything ``report`` prints. Money in micro-currency, energy in Wh (as the ledger).

    ``sites`` holds the selected sites (all, or the one of ``--site``); ``total`` always sums
    every site of the ledger (its ``intervals`` is the number of settled intervals, its
    ``estimated_intervals`` and ``corrected_intervals`` sums of site-intervals, its ``site`` is
    ``"community"``). ``community_balance_micro`` is what the community account kept net,
    ``utility_balance_micro`` what the utility received net; together they equal
    ``total.net_cost_micro`` in a balanced ledger.
    """

    location: str
    intervals: tuple[int, ...]
    all_sites: tuple[str, ...]
    site_filter: str | None
    sites: tuple[SiteReport, ...]
    total: SiteReport
    community_balance_micro: int
    utility_balance_micro: int
    balanced: bool


def _sum_reports(reports: Sequence[SiteReport], intervals: int) -> SiteReport:
    sums = {
        f.name: sum(getattr(r, f.name) for r in reports)
        for f in fields(SiteReport)
        if f.name not in {"site", "intervals"}
    }
    return SiteReport(site=COMMUNITY, intervals=intervals, **sums)


def build_report(ledger: Ledger, site: str | None = None) -> LedgerReport:
    """Read the figures of :class:`LedgerReport`; ``site`` must be one of the ledger's sites.

    Raises :class:`UnknownSite` for a site the ledger does not know, unless nothing is
    settled yet (then the report is simply empty).
    """
    intervals = ledger.settled_intervals()
    all_sites = tuple(
        sorted(a[len(_SITE_PREFIX) :] for a in ledger.accounts() if a.startswith(_SITE_PREFIX))
    )
    if site is not None and intervals and site not in all_sites:
        raise UnknownSite(site, all_sites)
    reports = tuple(ledger.site_report(s) for s in all_sites)
    return LedgerReport(
        location=ledger.location,
        intervals=intervals,
        all_sites=all_sites,
        site_filter=site,
        sites=tuple(r for r in reports if site is None or r.site == site),
        total=_sum_reports(reports, len(intervals)),
        community_balance_micro=ledger.balance(COMMUNITY),
        utility_balance_micro=ledger.balance(UTILITY),
        balanced=ledger.check_balanced(),
    )


# --- JSON ---------------------------------------------------------------------------------


def _money(amount_micro: int) -> str:
    """Exact decimal string of currency units, six decimals: ``-675000 -> "-0.675000"``."""
    return format(to_currency(amount_micro), "f")


def _kwh(energy_wh: int) -> float:
    """kWh as a JSON number; ``wh / 1000`` prints as its shortest decimal, exact to the Wh."""
    return energy_wh / 1000


def _figures(r: SiteReport) -> dict[str, Any]:
    return {
        "intervals": r.intervals,
        "estimated_intervals": r.estimated_intervals,
        "corrected_intervals": r.corrected_intervals,
        "bought_kwh": _kwh(r.bought_wh),
        "sold_kwh": _kwh(r.sold_wh),
        "metered_import_kwh": _kwh(r.metered_import_wh),
        "metered_export_kwh": _kwh(r.metered_export_wh),
        "paid": _money(r.paid_micro),
        "received": _money(r.received_micro),
        "imbalance_cost": _money(r.imbalance_cost_micro),
        "rebate": _money(r.rebate_micro),
        "net_cost": _money(r.net_cost_micro),
        "baseline_cost": _money(r.baseline_cost_micro),
        "savings": _money(r.savings_micro),
    }


def report_json(report: LedgerReport, currency: str) -> dict[str, Any]:
    """The ``report --json`` document (layout in the ``report`` help and the module docs)."""
    return {
        "report_version": REPORT_VERSION,
        "ledger": report.location,
        "currency": currency,
        "settled_intervals": {
            "count": len(report.intervals),
            "first": report.intervals[0] if report.intervals else None,
            "last": report.intervals[-1] if report.intervals else None,
        },
        "site_filter": report.site_filter,
        "sites": [{"site": r.site, **_figures(r)} for r in report.sites],
        "community_total": {"sites": len(report.all_sites), **_figures(report.total)},
        "accounts": {
            "community": _money(report.community_balance_micro),
            "utility": _money(report.utility_balance_micro),
        },
        "balanced": report.balanced,
    }


# --- tables -------------------------------------------------------------------------------


def _money_cell(amount_micro: int, decimals: int) -> str:
    value = to_currency(amount_micro).quantize(Decimal(1).scaleb(-decimals), ROUND_HALF_UP)
    if value == 0:
        value = abs(value)  # no "-0.00"
    return f"{value:,f}"


def _kwh_cell(energy_wh: int) -> str:
    return f"{Decimal(energy_wh).scaleb(-3):,f}"


def _energy_table(report: LedgerReport) -> Table:
    table = Table(title="Energy (kWh)", title_justify="left")
    table.add_column("site")
    for name in ("intervals", "estimated", "corrected", "bought", "sold", "import", "export"):
        table.add_column(name, justify="right")
    rows = [(escape(r.site), r) for r in report.sites]
    rows.append((f"[bold]community ({len(report.all_sites)} sites)[/bold]", report.total))
    for i, (label, r) in enumerate(rows):
        table.add_row(
            label,
            str(r.intervals),
            str(r.estimated_intervals),
            str(r.corrected_intervals),
            _kwh_cell(r.bought_wh),
            _kwh_cell(r.sold_wh),
            _kwh_cell(r.metered_import_wh),
            _kwh_cell(r.metered_export_wh),
            end_section=i == len(rows) - 2,
        )
    return table


def _money_table(report: LedgerReport, currency: str, decimals: int) -> Table:
    table = Table(
        title=f"Money ({escape(currency)}; positive cost = the site pays)", title_justify="left"
    )
    table.add_column("site")
    for name in ("paid", "received", "imbalance", "rebate", "net cost", "baseline", "savings"):
        table.add_column(name, justify="right")
    rows = [(escape(r.site), r) for r in report.sites]
    rows.append((f"[bold]community ({len(report.all_sites)} sites)[/bold]", report.total))
    for i, (label, r) in enumerate(rows):
        table.add_row(
            label,
            *(
                _money_cell(m, decimals)
                for m in (
                    r.paid_micro,
                    r.received_micro,
                    r.imbalance_cost_micro,
                    r.rebate_micro,
                    r.net_cost_micro,
                    r.baseline_cost_micro,
                    r.savings_micro,
                )
            ),
            end_section=i == len(rows) - 2,
        )
    return table


def _print_report(report: LedgerReport, currency: str, decimals: int) -> None:
    out = _stdout()
    first, last = report.intervals[0], report.intervals[-1]
    out.print(
        f"ledger {escape(report.location)}: {len(report.intervals)} settled interval(s), "
        f"#{first} to #{last}",
        soft_wrap=True,
    )
    out.print(_energy_table(report))
    out.print(_money_table(report, currency, decimals))
    cur = escape(currency)
    out.print(
        f"community account: {_money_cell(report.community_balance_micro, decimals)} {cur} "
        "(kept net after rebates: imbalance premiums, congestion rent, rounding)"
    )
    out.print(
        f"utility account:   {_money_cell(report.utility_balance_micro, decimals)} {cur} "
        "(paid to the utility net; negative: the utility paid the community)"
    )
    if report.balanced:
        out.print("balanced: yes (every posting, interval and the whole ledger sum to zero)")
    else:
        out.print("[bold red]balanced: NO[/bold red] (run `wattmesh ledger check`)")


# --- commands -----------------------------------------------------------------------------

_REPORT_HELP: Final = """Per-site energy, money and savings from a settlement ledger.

Energy (kWh):
  intervals  settled intervals the site took part in
             (community row: every settled interval)
  estimated  of those, the ones standing on estimated metering
  corrected  of those, the ones corrected since by late or replayed metering
             (the figures include every correction)
  bought     energy the market awarded the site to import
  sold       energy the market awarded the site to export
  import     energy the site's meter imported
  export     energy the site's meter exported

Money (in --currency; positive cost = the site pays, negative = it is paid):
  paid       paid for its bought energy at the clearing price
  received   received for its sold energy at the clearing price
  imbalance  net cost of metering more or less than the award
  rebate     the community account's surplus paid back to the site
             (coordinator \\[market] rebate; pro rata to the energy awarded)
  net cost   paid - received + imbalance - rebate
  baseline   what the utility alone would have billed its metered energy
             (import at retail, export at feed-in; no trading)
  savings    baseline - net cost (positive: trading saved the site money)

The community row sums all sites, also with --site. Below the tables: the
community account's balance (what it kept net) and the utility account's
(what it was paid net); in a balanced ledger they add up to the sites' total
net cost. The table rounds money to --decimals (half up); --json is exact.

--json prints one document with the same figures:
  report_version (3: adds corrected_intervals), ledger, currency, settled_intervals (count, first,
  last), site_filter, sites (list of site + FIGURES), community_total
  (sites + FIGURES), accounts (community, utility), balanced (true/false).
  FIGURES: intervals, estimated_intervals, corrected_intervals, bought_kwh, sold_kwh,
  metered_import_kwh, metered_export_kwh (numbers, exact to the Wh); paid,
  received, imbalance_cost, rebate, net_cost, baseline_cost, savings and the
  accounts' balances (decimal strings with six decimals, exact).

A missing file, a file that is not a wattmesh ledger or an unknown site is
a one-line error with exit code 2.
"""


@ledger_app.command("report", help=_REPORT_HELP)
def report(
    ledger_arg: Annotated[str | None, typer.Argument(metavar="LEDGER", help=_LEDGER_HELP)] = None,
    config: Annotated[Path | None, typer.Option("--config", help=_CONFIG_HELP)] = None,
    site: Annotated[
        str | None, typer.Option("--site", help="Show only this site (the total stays).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a machine-readable JSON document.")
    ] = False,
    currency: Annotated[
        str,
        typer.Option(help="Currency label for the amounts (a label only, nothing converts)."),
    ] = "EUR",
    decimals: Annotated[
        int,
        typer.Option(min=0, max=_MAX_DECIMALS, help="Decimals of money in the table."),
    ] = 2,
) -> None:
    currency = currency.strip()
    if not currency:
        raise _fail("--currency must not be empty")
    try:
        location = _locate(ledger_arg, config)
        with _open_ledger(location) as ledger:
            data = build_report(ledger, site)
    except _CliError as err:
        raise _fail(str(err)) from err
    except (LedgerError, UnknownSite) as err:
        raise _fail(f"{location.name}: {one_line(err)}") from err
    if as_json:
        typer.echo(json.dumps(report_json(data, currency), indent=2))
    elif not data.intervals:
        _stdout().print(f"ledger {escape(location.name)}: no settled intervals yet", soft_wrap=True)
    else:
        _print_report(data, currency, decimals)


# --- check -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerHealth:
    """Everything ``check`` reports. ``at_ts`` is the time ages are judged at (s since the
    epoch), ``interval_s`` the market interval that turns interval numbers into UTC times."""

    balanced: bool
    settled_intervals: int
    unsettled: tuple[ClearedInterval, ...]
    estimated: tuple[EstimatedSite, ...]
    absent: dict[str, tuple[int, ...]]
    corrections: int
    corrected_intervals: int
    at_ts: float
    interval_s: int

    def age_intervals(self, interval: int) -> int:
        """How many intervals ago ``interval`` started (0: it is the current one)."""
        return math.floor(self.at_ts / self.interval_s) - interval

    def overdue(self, max_age_s: float) -> tuple[ClearedInterval, ...]:
        """Unsettled clearings whose interval ended more than ``max_age_s`` ago."""
        return tuple(
            c for c in self.unsettled if self.at_ts - (c.interval + 1) * self.interval_s > max_age_s
        )

    @property
    def missing_site_intervals(self) -> int:
        """Site-intervals without metering: estimated ones plus absences within a site's span."""
        return len(self.estimated) + sum(len(v) for v in self.absent.values())


def build_health(ledger: Ledger, *, at_ts: float, interval_s: int) -> LedgerHealth:
    """Read the figures of :class:`LedgerHealth` from a ledger."""
    corrections = ledger.corrections()
    return LedgerHealth(
        balanced=ledger.check_balanced(),
        settled_intervals=len(ledger.settled_intervals()),
        unsettled=ledger.unsettled_clearings(),
        estimated=ledger.estimated_sites(),
        absent=ledger.absent_sites(),
        corrections=len(corrections),
        corrected_intervals=len({c.interval for c in corrections}),
        at_ts=at_ts,
        interval_s=interval_s,
    )


def _utc(ts: float) -> str:
    """``2026-12-06T03:15:00Z``: a timestamp in UTC, to the second."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_utc(text: str, option: str) -> float:
    """An ISO 8601 time (``Z`` or an offset; naive means UTC) as s since the epoch."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as err:
        raise _CliError(
            f"{option} {text!r} is not an ISO 8601 time like 2026-12-06T03:00Z"
        ) from err
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _parse_age_s(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``1d`` or plain seconds, >= 0."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    unit = text[-1:].lower()
    try:
        value = float(text[:-1] if unit in units else text) * units.get(unit, 1.0)
    except ValueError as err:
        raise _CliError(f"--max-age {text!r} is not a duration like 90s, 15m, 2h or 1d") from err
    if not math.isfinite(value) or value < 0:
        raise _CliError(f"--max-age {text!r} must be a duration >= 0")
    return value


def _ago(intervals: int) -> str:
    return f"{intervals} interval(s) ago" if intervals >= 0 else f"in {-intervals} interval(s)"


def _print_health(ledger: str, health: LedgerHealth) -> None:
    out = _stdout()
    name = escape(ledger)
    out.print(f"{name}: balanced ({health.settled_intervals} settled interval(s))", soft_wrap=True)
    if health.corrections:
        out.print(
            f"corrections: {health.corrections} booked in {health.corrected_intervals} interval(s)"
        )
    if health.unsettled:
        out.print(f"unsettled: {len(health.unsettled)} cleared interval(s) not settled")
        for c in health.unsettled:
            start = c.interval * health.interval_s
            out.print(
                f"  #{c.interval} ({_utc(start)} to {_utc(start + health.interval_s)}), "
                f"cleared {_utc(c.cleared_ts)}, {_ago(health.age_intervals(c.interval))}",
                soft_wrap=True,
            )
    if health.estimated:
        out.print(f"estimated: {len(health.estimated)} site-interval(s) without metering")
        for e in health.estimated:
            reason = e.reason or "no reason recorded"
            out.print(f"  #{e.interval} {escape(e.site)}: {escape(reason)}", soft_wrap=True)
    if health.absent:
        n = sum(len(v) for v in health.absent.values())
        out.print(f"missing: {n} site-interval(s) absent between a site's first and last interval")
        for site, intervals in health.absent.items():
            listed = ", ".join(f"#{i}" for i in intervals)
            out.print(f"  {escape(site)}: {listed}", soft_wrap=True)


_CHECK_HELP: Final = """Verify that the ledger balances; list what is still open (cron, monitoring).

Balanced: every posting, every interval and the whole ledger sum to zero,
and no interval (nor any correction) is partial. Below that line, when there
is any, it lists:

  corrections  how many corrections late or replayed metering booked
  unsettled    cleared intervals not settled yet: interval number, its UTC
               start and end (--interval-s), when it was cleared and how many
               intervals ago it started
  estimated    site-intervals settled without metering (awarded or on the
               roster, no or implausible telemetry), with the recorded reason
  missing      per site, the settled intervals between its first and last
               one in which it does not appear at all

Exit codes: 0 balanced; 1 NOT balanced (one line on stderr); 2 the file is
missing, not a wattmesh ledger or unreadable, or an option is malformed;
3 only with --strict: balanced, but a cleared interval ended more than
--max-age ago and is not settled, or a site-interval is estimated or missing
(one line on stderr). Without --strict these are reported and exit 0.
"""


@ledger_app.command("check", help=_CHECK_HELP)
def check(
    ledger_arg: Annotated[str | None, typer.Argument(metavar="LEDGER", help=_LEDGER_HELP)] = None,
    config: Annotated[Path | None, typer.Option("--config", help=_CONFIG_HELP)] = None,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="Print nothing when the check passes."),
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Also fail (exit 3) on overdue unsettled intervals or missing sites."
        ),
    ] = False,
    max_age: Annotated[
        str,
        typer.Option(
            "--max-age", help="With --strict: how long after its end an interval may stay open."
        ),
    ] = "1h",
    interval_s: Annotated[
        int, typer.Option("--interval-s", min=1, help="The market interval, s.")
    ] = DEFAULT_INTERVAL_S,
    at: Annotated[
        str | None,
        typer.Option("--at", help="Judge ages at this UTC time (ISO 8601; default now)."),
    ] = None,
) -> None:
    try:
        max_age_s = _parse_age_s(max_age)
        at_ts = time.time() if at is None else _parse_utc(at, "--at")
        location = _locate(ledger_arg, config)
        with _open_ledger(location) as ledger:
            health = build_health(ledger, at_ts=at_ts, interval_s=interval_s)
    except _CliError as err:
        raise _fail(str(err)) from err
    except LedgerError as err:
        raise _fail(f"{location.name}: {one_line(err)}") from err
    if not health.balanced:
        raise _fail(
            f"{location.name}: ledger NOT balanced "
            f"({health.settled_intervals} settled interval(s))",
            code=1,
        )
    overdue = health.overdue(max_age_s)
    missing = health.missing_site_intervals
    failed = strict and (overdue or missing)
    if not quiet:
        _print_health(location.name, health)
    if failed:
        raise _fail(
            f"{location.name}: {len(overdue)} cleared interval(s) unsettled for more than "
            f"{max_age}, {missing} site-interval(s) estimated or missing",
            code=3,
        )


# --- audit -------------------------------------------------------------------------------

#: Characters of an audit row's detail in the table (cut with an ellipsis; --json has it all).
_DETAIL_WIDTH: Final = 60


def audit_json(ledger: str | Path, entries: Sequence[AuditEntry]) -> dict[str, Any]:
    """The ``audit --json`` document; ``ledger`` names the ledger (a path or a URL)."""
    return {
        "audit_version": AUDIT_VERSION,
        "ledger": str(ledger),
        "entries": [
            {
                "id": e.audit_id,
                "ts": e.ts,
                "time": _utc(e.ts),
                "kind": e.kind,
                "actor": e.actor,
                "detail": dict(e.detail),
            }
            for e in entries
        ],
    }


@ledger_app.command("audit")
def audit(
    ledger_arg: Annotated[str | None, typer.Argument(metavar="LEDGER", help=_LEDGER_HELP)] = None,
    config: Annotated[Path | None, typer.Option("--config", help=_CONFIG_HELP)] = None,
    kind: Annotated[
        str | None,
        typer.Option(
            "--kind",
            help="Only this kind (dispatch, emergency, rejection, correction, grid_mode, ...).",
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only rows at or after this time (ISO 8601, UTC if naive)."),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="At most this many rows (the newest).")
    ] = 1000,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a machine-readable JSON document.")
    ] = False,
) -> None:
    """List the ledger's append-only audit log, oldest first.

    Each row: id, UTC time, kind, actor and its detail (a JSON object). The
    coordinator writes dispatches, emergencies, rejected readings or bids, grid
    mode changes; the ledger writes each correction. --json prints
    {"audit_version": 1, "ledger", "entries": [{"id", "ts", "time", "kind",
    "actor", "detail"}]}. A ledger older than schema version 3 has no audit log
    (empty list). Exit codes: 0 success; 2 missing file, not a ledger, bad option.
    """
    try:
        since_ts = None if since is None else _parse_utc(since, "--since")
        location = _locate(ledger_arg, config)
        with _open_ledger(location) as ledger:
            entries = ledger.audit_entries(since_ts=since_ts, kind=kind, limit=limit)
    except _CliError as err:
        raise _fail(str(err)) from err
    except LedgerError as err:
        raise _fail(f"{location.name}: {one_line(err)}") from err
    if as_json:
        typer.echo(json.dumps(audit_json(location.name, entries), indent=2))
        return
    out = _stdout()
    if not entries:
        out.print(f"ledger {escape(location.name)}: no audit entries", soft_wrap=True)
        return
    table = Table(title=f"Audit log ({len(entries)} row(s))", title_justify="left")
    # One line per row: the detail is cut to the width with an ellipsis (--json has it whole).
    for name in ("id", "time (UTC)", "kind", "actor"):
        table.add_column(name, justify="right" if name == "id" else "left", no_wrap=True)
    table.add_column("detail", no_wrap=True, overflow="ellipsis", max_width=_DETAIL_WIDTH)
    for e in entries:
        detail = json.dumps(dict(e.detail), sort_keys=True, separators=(",", ":"))
        table.add_row(str(e.audit_id), _utc(e.ts), escape(e.kind), escape(e.actor), escape(detail))
    out.print(table)


ledger_app.command("backup")(ledger_backup.backup_command)
ledger_app.command("restore")(ledger_backup.restore_command)
