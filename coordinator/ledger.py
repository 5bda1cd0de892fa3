"""The settlement ledger: double-entry bookkeeping of every market interval, in SQLite or
PostgreSQL.

docs/architecture.md section 6 is the market model this settles. One :class:`Ledger` owns one SQLite
connection (WAL journal, foreign keys on, ``synchronous=FULL`` because this is money) to a file
whose schema it creates on first open and whose version it checks on every open. The tables are
STRICT (SQLite >= 3.37), so no REAL can slip into an amount column. ``Ledger("postgresql://...")``
keeps the same schema, invariants and behaviour in a PostgreSQL database instead (BIGINT
columns); coordinator/ledger_sql.py holds everything that differs between the two engines.

Accounts
--------
One account per site (``site:<id>``, created the first time the site is settled), the
``community`` account and the ``utility``. An account's balance is the sum of its entries and is
the money it has *received* net: a site that buys has a negative balance, the utility's balance is
what the community has paid it net.

Units and rounding (money is exact)
-----------------------------------
* Money is an ``int`` of micro-currency (1e-6 currency units; :data:`MICRO` per unit), stored as
  SQLite INTEGER. Integers make every sum (a balance, an interval, the whole ledger) exact in
  SQL and in Python, which is what "sums to zero" needs; floats drift, and decimal strings
  cannot be summed by SQLite. Micro-currency is far below any tariff's resolution and int64 holds
  +-9.2e12 currency units. :func:`to_currency` turns an amount into a :class:`~decimal.Decimal`.
* Prices are stored as ``int`` micro-currency per kWh: each ``*_price_per_kwh`` argument is
  rounded to the nearest micro-currency per kWh (half to even, from the float's shortest decimal
  representation, so ``0.1`` is exactly 100000).
* Energy is an ``int`` of Wh, the resolution of the sites' meters: each ``*_kwh`` argument is
  rounded to the nearest Wh (half to even, from the float's shortest decimal representation).
  Positive energy is a net import (docs/architecture.md section 4).
* The value of ``e`` Wh at ``p`` micro-currency per kWh is ``e*p/1000`` micro-currency, exact as
  a fraction. Every posting is between the community account and one other party (a site or the
  utility); that party's amount is rounded *down* to the micro-currency (what it receives is
  floored, what it pays is ceiled) and the community's is the exact opposite. So the community
  account collects every sub-micro fraction, and rounding can never make a deviation pay.

Settlement of one interval (:meth:`Ledger.settle_interval`)
----------------------------------------------------------
With clearing price ``c``, retail ``r``, feed-in ``f`` and imbalance premium ``k >= 0`` (all per
kWh), for each site with award ``a`` and metered energy ``m`` (both signed, import positive):

* trade: the site pays ``a*c`` to the community (is paid ``-a*c`` when ``a < 0``);
* imbalance: the deviation ``d = m - a`` settles with the community at prices that follow the
  community's metered position ``n = sum(m)`` (the feeder's meter): the utility's marginal price
  ``u = r`` when ``n >= 0`` (the community imports: one more kWh is bought at retail, one less
  saves retail) and ``u = f`` when ``n < 0`` (it exports: one more kWh is feed-in forgone, one
  less is one more sold at feed-in). Then

  - ``buy = max(c, u) + k`` when ``d > 0`` (extra import or export short of the award): the
    site pays ``d*buy``;
  - ``sell = min(c, u) - k`` when ``d < 0`` (extra export or import short of the award): the
    site is paid ``-d*sell`` (which is a charge if ``sell < 0``).

  Because ``buy >= c + k`` and ``sell <= c - k``, a site's cost ``a*c + d*price(d)`` is at
  least the cost ``m*c`` of having been awarded what it metered, plus ``|d|*k``; with the
  rounding above this holds exactly for the stored integers:
  ``cost(a, m) >= cost(m, m) + floor(|d|*k/1000)`` (micro-currency, ``k`` per kWh in micro).
  And because a deviation pays at least what it costs the community at the feeder, the
  community account never loses on an interval whose clearing is consistent with the utility
  as outside option (``c >= r`` when the utility sells into the market, ``c <= f`` when it buys
  from it), whatever the sites meter: a deviation is charged what it really costs plus the
  premium, not the spread between retail and feed-in.
* utility: the community's net exchange with the utility is ``n``; the community pays ``n*r``
  to the utility when ``n > 0`` and is paid ``-n*f`` when ``n < 0``.
* rebate (``rebate="traded_energy"``; none with ``rebate="none"``, the default here; the
  coordinator's ``[market] rebate`` chooses): what the community account kept in the interval
  (imbalance premiums, congestion rent when a feeder limit set the price, rounding) is paid back
  to the sites pro rata to the energy each was awarded, ``|a|`` (fixed at the clearing, so a
  deviation does not buy a larger share; the metered ``|m|`` when nobody was awarded anything),
  at one rate per kWh rounded down to the micro-currency per kWh, each site's amount rounded
  down. The community keeps what the rounding leaves (less than one micro-currency per site
  plus the rate's rounding), so its account stays non-negative and the sites together pay the
  utility's bill. A deviating site gets back only its share of what its deviation paid in, so
  deviating still costs it more than keeping its award: at least ``(1 - s)`` of the premium on
  the deviation, ``s`` being its share of the basis (less the rebate's rounding). Nothing is
  paid back when the interval's balance is not positive.

Every posting is one double entry (two entries, equal and opposite), so every posting, every
interval and the whole ledger sum to zero by construction; the community account absorbs the
difference between what sites pay and what the utility is paid (zero when the clearing price
respects the tariffs and nobody deviates, positive with congestion rent and imbalance premiums,
then paid back by the rebate when it is on). Postings whose energy is zero, and rebates of
nothing, are not written.

Sites missing from ``awards_kwh`` have award 0. Sites missing from ``metered_kwh`` (their
telemetry has not arrived; the gateway spools it and replays it later) make settlement refuse
with :class:`IncompleteMetering` and write nothing, so the coordinator settles the interval
later, once the data is in. If it cannot wait any longer it passes ``estimate_missing=True``:
each missing site is settled as ``metered = award`` (no imbalance), flagged ``estimated`` in the
stored row and in the result, with a reason (:data:`DEFAULT_ESTIMATE_REASON` unless
:meth:`Ledger.settle_cleared` is given one). What is written is never updated or deleted:
late metering is booked as a correction (below).

Durable clearings (schema version 3)
------------------------------------
:meth:`Ledger.record_clearing` commits an interval's prices, premium, rebate rule and every
award (``clearings``, ``clearing_awards``) before the coordinator publishes them; the
connection runs with ``synchronous=FULL`` (set for the whole connection on open), so the commit
is on disk when the call returns. After a crash, :meth:`Ledger.unsettled_clearings` lists what
was cleared and not settled, and :meth:`Ledger.settle_cleared` settles it from the stored
clearing, with a ``roster`` of sites that must appear (estimated at 0 when they have neither an
award nor metering) and a reason per estimated site. ``settle_interval`` on an interval with a
recorded clearing must agree with it.

Corrections
-----------
:meth:`Ledger.correct_interval` takes new metering for some sites of a settled interval,
settles the interval afresh with its stored prices, awards, premium and rebate rule, and books
the difference per (kind, party) as new postings of the same kinds with ``revision`` N > 0
(the settlement's postings are revision 0). Each correction writes a ``revisions`` row (its
posting count, reason and time), a ``corrections`` row per site whose metering or money
changed (old and new metering and estimated flag, money delta) and an audit row. So after any
sequence of corrections each account's total for the interval is what a fresh settlement with
the final metering gives (the rounding included), and every posting and interval still sums to
zero. Reads (:meth:`Ledger.settlement`, site reports, baselines) use each site's latest
metering (the ``site_metering`` view).

Audit log
---------
``audit`` is append-only (triggers abort every UPDATE and DELETE, as for the clearings,
revisions and corrections): :meth:`Ledger.audit` appends a kind, an actor, a JSON detail and a
time; :meth:`Ledger.audit_entries` reads them back.

Idempotency and atomicity
-------------------------
All rows of an interval (the interval's prices, each site's award and metering, every posting and
entry) are written in one ``BEGIN IMMEDIATE`` transaction (in PostgreSQL: a transaction holding
the ledger's advisory lock), committed once; a crash before the commit leaves nothing of the
interval: SQLite's WAL recovery discards the uncommitted frames on the next open, PostgreSQL
rolls back the transaction of a session that ends. The ``intervals`` row also records how
many postings the interval has, and :meth:`Ledger.check_balanced` checks that count, so a
partial interval would be visible even if the storage lied about durability.

Settling an interval that is already settled writes nothing. If the inputs, after the rounding
above, are the ones it was settled with (the rebate rule is not compared: a settled interval
keeps the rule it was settled under, recorded in its ``rebate_rule``), the stored
:class:`SettlementResult` is returned (so a coordinator that restarts and settles again is
safe); if they differ, :class:`SettlementConflict` is raised carrying the stored result, because
silently keeping the old figures would hide late or corrected meter data from the operator.
Fresh and stored results are both read back from the database, so they compare equal.

Schema versions
---------------
Version 2 added the ``rebate`` posting kind and each interval's ``rebate_rule``; version 3 the
durable clearings, corrections, estimate reasons and the audit log (a PostgreSQL ledger starts
at version 3: only SQLite files migrate). Opening an older file
migrates it: the file is first copied to ``<file>.v<N>.bak`` (N its version), then in one
transaction version 1's ``postings`` table is rebuilt with the wider check (every row kept) and
``intervals`` gains ``rebate_rule`` ('none' for every interval settled before); then version 3's
columns (``postings.revision`` 0, ``site_intervals.estimate_reason`` NULL), tables, view and
triggers are added; the foreign keys are checked before the commit. Readers open with
``migrate=False`` and leave an older file as it is (it reads the same, clearings, corrections
and the audit log read as empty; writing into it is refused), so a report never upgrades the
file under an older coordinator. A newer version than this code reads is refused.

Concurrency
-----------
The connection is opened with ``check_same_thread=False`` and every method holds a lock, so a
coordinator may call it from ``asyncio.to_thread``. Several processes may open the same file
(or database); ``BEGIN IMMEDIATE`` (PostgreSQL: the advisory lock) and the interval primary key
serialise their settlements.
"""

from __future__ import annotations

import bisect
import json
import math
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Final, Literal, Self, cast, get_args

from coordinator.ledger_sql import (
    ConnectError,
    LedgerConnection,
    SqliteConnection,
    connect,
    is_postgres_url,
    mask_url,
)

__all__ = [
    "COMMUNITY",
    "DEFAULT_ESTIMATE_REASON",
    "DEFAULT_IMBALANCE_PREMIUM_PER_KWH",
    "MAX_ABS_ENERGY_KWH",
    "MAX_ABS_PRICE_PER_KWH",
    "MICRO",
    "SCHEMA_VERSION",
    "UTILITY",
    "AuditEntry",
    "ClearedInterval",
    "ClearingConflict",
    "Correction",
    "Entry",
    "EstimatedSite",
    "IncompleteMetering",
    "Ledger",
    "LedgerError",
    "LedgerInputError",
    "LedgerStorageError",
    "PostingKind",
    "RebateRule",
    "SchemaVersionError",
    "SettlementConflict",
    "SettlementResult",
    "SiteCorrection",
    "SiteReport",
    "SiteSettlement",
    "UnknownAccount",
    "create_schema",
    "site_account",
    "to_currency",
]

#: Micro-currency per currency unit: money amounts are ints of 1/MICRO currency.
MICRO: Final = 1_000_000
#: The account standing between the sites and the utility.
COMMUNITY: Final = "community"
#: The utility's account (it sells at retail and buys at feed-in).
UTILITY: Final = "utility"
#: Version of the schema this module creates and reads.
SCHEMA_VERSION: Final = 3
#: Why a site was settled as estimated when the caller gives no reason.
DEFAULT_ESTIMATE_REASON: Final = "no telemetry"
#: Premium (currency per kWh) added to the imbalance buy price and taken off the sell price.
DEFAULT_IMBALANCE_PREMIUM_PER_KWH: Final = 0.05
#: Largest |energy| accepted per site and interval (kWh), so every amount fits SQLite's int64.
MAX_ABS_ENERGY_KWH: Final = 1.0e6
#: Largest |price| accepted (currency per kWh).
MAX_ABS_PRICE_PER_KWH: Final = 1.0e4

_WH_PER_KWH: Final = 1000
_SITE_PREFIX: Final = "site:"
_MAX_SITE_ID_LEN: Final = 200
_MAX_TEXT_LEN: Final = 1000

PostingKind = Literal["trade", "imbalance", "utility", "rebate"]
#: How the community account's balance of an interval goes back to the sites (module docs).
RebateRule = Literal["none", "traded_energy"]
_REBATE_RULES: Final = get_args(RebateRule)


# --- errors -------------------------------------------------------------------------------


class LedgerError(Exception):
    """Base of every error raised by the ledger."""


class LedgerInputError(LedgerError, ValueError):
    """An argument is malformed or out of range; the message names it."""


class IncompleteMetering(LedgerInputError):
    """Awarded sites have no metered energy yet; nothing was written, settle again later."""

    def __init__(self, interval: int, sites: tuple[str, ...]) -> None:
        self.interval = interval
        self.sites = sites
        super().__init__(
            f"interval {interval}: no metered energy for awarded sites {', '.join(sites)}; "
            "settle later or pass estimate_missing=True"
        )


class SettlementConflict(LedgerError):
    """The interval is already settled with other inputs; nothing was written."""

    def __init__(self, stored: SettlementResult) -> None:
        self.interval = stored.interval
        self.stored = stored
        super().__init__(
            f"interval {stored.interval} is already settled with different inputs; "
            "the stored settlement is final"
        )


class ClearingConflict(LedgerError):
    """The interval already has a clearing with other inputs (or was settled without one);
    nothing was written. ``stored`` is the recorded clearing (None: settled without one)."""

    def __init__(self, interval: int, stored: ClearedInterval | None, message: str) -> None:
        self.interval = interval
        self.stored = stored
        super().__init__(message)


class SchemaVersionError(LedgerError):
    """The database file holds a schema version this code does not understand."""


class UnknownAccount(LedgerError):
    """No account of that name exists in the ledger."""


class LedgerStorageError(LedgerError):
    """SQLite failed (locked, disk full, corrupt file, closed ledger); the cause is chained."""


# --- values -------------------------------------------------------------------------------


def site_account(site: str) -> str:
    """The account name of a site: ``site:<id>``."""
    return _SITE_PREFIX + site


def to_currency(amount_micro: int) -> Decimal:
    """An amount of micro-currency as an exact :class:`~decimal.Decimal` of currency units."""
    return Decimal(amount_micro).scaleb(-6)


@dataclass(frozen=True)
class SiteSettlement:
    """One site's part of a settled interval.

    Amounts are micro-currency received by the site (negative when it paid), ``rebate_micro``
    its share of the community account's balance; energy in Wh, positive for import; prices in
    micro-currency per kWh.
    """

    site: str
    award_wh: int
    metered_wh: int
    estimated: bool
    trade_micro: int
    imbalance_micro: int
    rebate_micro: int = 0
    #: Why the site was estimated (None when metered, or estimated before schema version 3).
    estimate_reason: str | None = None

    @property
    def deviation_wh(self) -> int:
        """Metered minus awarded energy (Wh): positive is extra import or short export."""
        return self.metered_wh - self.award_wh

    @property
    def total_micro(self) -> int:
        """What the site received in this interval (negative: it paid)."""
        return self.trade_micro + self.imbalance_micro + self.rebate_micro


@dataclass(frozen=True)
class SettlementResult:
    """A settled interval as stored. Prices in micro-currency per kWh, energy in Wh.

    ``utility_micro`` is what the utility received from the community (negative: it paid the
    community for exported energy); ``community_micro`` is the community account's net for the
    interval (after rebates, under ``rebate_rule``).
    ``community_micro + utility_micro + sum(s.total_micro for s in sites) == 0``.
    """

    interval: int
    clearing_price_micro_per_kwh: int
    retail_price_micro_per_kwh: int
    feed_in_price_micro_per_kwh: int
    imbalance_premium_micro_per_kwh: int
    imbalance_buy_price_micro_per_kwh: int
    imbalance_sell_price_micro_per_kwh: int
    community_net_wh: int
    utility_micro: int
    community_micro: int
    sites: tuple[SiteSettlement, ...]
    rebate_rule: RebateRule = "none"
    #: How many corrections have been booked on the interval (figures include them all).
    revision: int = 0

    def site(self, site: str) -> SiteSettlement:
        """The settlement of one site; KeyError when the site was not in the interval."""
        for s in self.sites:
            if s.site == site:
                return s
        raise KeyError(site)


@dataclass(frozen=True)
class Entry:
    """One ledger entry: half of a double-entry posting.

    ``amount_micro`` is credited to ``account`` (negative: debited). ``energy_wh`` and
    ``price_micro_per_kwh`` describe the posting: the energy imported by the site (trade,
    imbalance) or by the community from the utility (utility), and the price it settled at; for
    a rebate, the energy it was paid on and the rate per kWh.
    """

    entry_id: int
    interval: int
    posting_id: int
    kind: PostingKind
    site: str | None
    account: str
    amount_micro: int
    energy_wh: int
    price_micro_per_kwh: int


@dataclass(frozen=True)
class SiteReport:
    """A site's totals over every settled interval it took part in.

    Energy in Wh, money in micro-currency. ``paid_micro``/``received_micro`` are the money of
    its awards (trade postings), ``imbalance_cost_micro`` the net it paid on imbalance postings
    (negative: it was paid), ``rebate_micro`` what the community account paid back to it,
    ``net_cost_micro = paid - received + imbalance_cost - rebate`` (equal to
    minus its balance), ``baseline_cost_micro`` what the utility alone would have billed its
    metered energy at the tariffs, and ``savings_micro = baseline - net_cost``.
    """

    site: str
    intervals: int
    estimated_intervals: int
    bought_wh: int
    sold_wh: int
    metered_import_wh: int
    metered_export_wh: int
    paid_micro: int
    received_micro: int
    imbalance_cost_micro: int
    rebate_micro: int
    net_cost_micro: int
    baseline_cost_micro: int
    savings_micro: int
    #: Intervals of the site's with at least one correction (its figures include them).
    corrected_intervals: int = 0


@dataclass(frozen=True)
class ClearedInterval:
    """A clearing as recorded before it was published (:meth:`Ledger.record_clearing`).

    Prices in micro-currency per kWh, awards in Wh (import positive) as a read-only mapping
    sorted by site, ``cleared_ts`` the clearing's time (s since the epoch; the first record's),
    ``settled`` whether the interval has been settled since.
    """

    interval: int
    clearing_price_micro_per_kwh: int
    retail_price_micro_per_kwh: int
    feed_in_price_micro_per_kwh: int
    imbalance_premium_micro_per_kwh: int
    rebate_rule: RebateRule
    awards_wh: Mapping[str, int]
    cleared_ts: float
    settled: bool

    @property
    def awards_kwh(self) -> dict[str, float]:
        """The awards in kWh (exact to the Wh), e.g. to publish them again after a restart."""
        return {site: wh / _WH_PER_KWH for site, wh in self.awards_wh.items()}

    @property
    def clearing_price_per_kwh(self) -> float:
        """The clearing price in currency per kWh."""
        return self.clearing_price_micro_per_kwh / MICRO


@dataclass(frozen=True)
class SiteCorrection:
    """One site's line of a correction: metering before and after (Wh), the estimated flag
    before and after, and ``delta_micro``, what the site received more (<0: paid more)."""

    site: str
    old_metered_wh: int
    new_metered_wh: int
    old_estimated: bool
    new_estimated: bool
    delta_micro: int


@dataclass(frozen=True)
class Correction:
    """A correction booked on a settled interval (:meth:`Ledger.correct_interval`).

    ``revision`` counts the interval's corrections from 1; ``sites`` holds every site whose
    metering or money changed, sorted; ``utility_delta_micro`` and ``community_delta_micro``
    what those accounts received more. All deltas sum to zero.
    """

    interval: int
    revision: int
    reason: str
    ts: float
    sites: tuple[SiteCorrection, ...]
    utility_delta_micro: int
    community_delta_micro: int


@dataclass(frozen=True)
class EstimatedSite:
    """A site settled on estimated metering in an interval, as it stands after corrections."""

    interval: int
    site: str
    award_wh: int
    metered_wh: int
    reason: str | None


@dataclass(frozen=True)
class AuditEntry:
    """One row of the append-only audit log; ``detail`` is the JSON object as stored."""

    audit_id: int
    ts: float
    kind: str
    actor: str
    detail: Mapping[str, object]


# --- pure settlement arithmetic -----------------------------------------------------------


def _party_amount(energy_to_party_wh: int, price_micro_per_kwh: int) -> int:
    """Micro-currency a non-community party receives when it takes ``energy_to_party_wh``.

    The exact value ``-energy*price/1000`` (the party *pays* for energy it takes, at
    ``price_micro_per_kwh``) rounded down: the party never gains from rounding, the community
    collects the fraction.
    """
    return (-energy_to_party_wh * price_micro_per_kwh) // _WH_PER_KWH


def _to_wh(kwh: float, name: str) -> int:
    value = float(kwh)
    if not math.isfinite(value) or abs(value) > MAX_ABS_ENERGY_KWH:
        raise LedgerInputError(f"{name} must be finite and within +-{MAX_ABS_ENERGY_KWH:g} kWh")
    scaled = Decimal(repr(value)) * _WH_PER_KWH
    return int(scaled.to_integral_value(rounding=ROUND_HALF_EVEN))


def _to_micro_per_kwh(price_per_kwh: float, name: str) -> int:
    value = float(price_per_kwh)
    if not math.isfinite(value) or abs(value) > MAX_ABS_PRICE_PER_KWH:
        raise LedgerInputError(
            f"{name} must be finite and within +-{MAX_ABS_PRICE_PER_KWH:g} per kWh"
        )
    scaled = Decimal(repr(value)) * MICRO
    return int(scaled.to_integral_value(rounding=ROUND_HALF_EVEN))


@dataclass(frozen=True)
class _Prices:
    clearing: int
    retail: int
    feed_in: int
    premium: int

    def marginal(self, net_wh: int) -> int:
        """The utility's price for one more kWh at the feeder: retail while the community
        imports (or is balanced), feed-in while it exports."""
        return self.retail if net_wh >= 0 else self.feed_in

    def imbalance_buy(self, net_wh: int) -> int:
        """Price of a positive deviation (extra import) with the community at ``net_wh``."""
        return max(self.clearing, self.marginal(net_wh)) + self.premium

    def imbalance_sell(self, net_wh: int) -> int:
        """Price of a negative deviation (extra export) with the community at ``net_wh``."""
        return min(self.clearing, self.marginal(net_wh)) - self.premium


@dataclass(frozen=True)
class _SiteInput:
    site: str
    award_wh: int
    metered_wh: int
    estimated: bool


@dataclass(frozen=True)
class _Posting:
    kind: PostingKind
    site: str | None
    party: str
    energy_wh: int
    price_micro_per_kwh: int
    party_micro: int


def _postings(
    prices: _Prices, sites: tuple[_SiteInput, ...], rebate: RebateRule = "none"
) -> tuple[_Posting, ...]:
    """Every posting of an interval (zero-energy ones left out), in a fixed order."""
    out: list[_Posting] = []
    net_wh = sum(s.metered_wh for s in sites)
    buy, sell = prices.imbalance_buy(net_wh), prices.imbalance_sell(net_wh)
    for s in sites:
        account = site_account(s.site)
        if s.award_wh:
            out.append(
                _Posting(
                    "trade",
                    s.site,
                    account,
                    s.award_wh,
                    prices.clearing,
                    _party_amount(s.award_wh, prices.clearing),
                )
            )
        deviation = s.metered_wh - s.award_wh
        if deviation:
            price = buy if deviation > 0 else sell
            out.append(
                _Posting(
                    "imbalance", s.site, account, deviation, price, _party_amount(deviation, price)
                )
            )
    if net_wh:
        price = prices.marginal(net_wh)
        # The utility *delivers* n Wh into the community: it receives n*price (rounded down).
        out.append(_Posting("utility", None, UTILITY, net_wh, price, _party_amount(-net_wh, price)))
    if rebate == "traded_energy":
        out += _rebates(-sum(p.party_micro for p in out), sites)
    return tuple(out)


def _rebates(surplus_micro: int, sites: tuple[_SiteInput, ...]) -> list[_Posting]:
    """The community's ``surplus_micro`` back to the sites pro rata to ``|award_wh|``.

    The basis is fixed at the clearing, so deviating does not buy a larger share; when nobody
    was awarded anything, the energy each site metered (``|metered_wh|``) is the basis. One
    rate per kWh, rounded down to the micro-currency per kWh; each site receives
    ``floor(|basis| * rate / 1000)``, so the rebates never exceed the surplus. Each posting
    records the energy it was paid on and the rate.
    """
    basis = {s.site: abs(s.award_wh) for s in sites}
    if not any(basis.values()):
        basis = {s.site: abs(s.metered_wh) for s in sites}
    total_wh = sum(basis.values())
    if surplus_micro <= 0 or total_wh == 0:
        return []
    rate = surplus_micro * _WH_PER_KWH // total_wh
    out = []
    for s in sites:
        amount = _party_amount(-basis[s.site], rate)
        if amount > 0:
            out.append(
                _Posting("rebate", s.site, site_account(s.site), basis[s.site], rate, amount)
            )
    return out


def _baseline_cost(metered_wh: int, retail: int, feed_in: int) -> int:
    """What the utility alone bills a site for one interval's metered energy (micro)."""
    price = retail if metered_wh > 0 else feed_in
    return -_party_amount(metered_wh, price)


# --- the ledger ---------------------------------------------------------------------------

_POSTINGS_TABLE: Final = """CREATE TABLE {name} (
        posting_id {ID},
        interval {INT} NOT NULL REFERENCES intervals (interval),
        kind {TEXT} NOT NULL CHECK (kind IN ('trade', 'imbalance', 'utility', 'rebate')),
        site {TEXT} REFERENCES accounts (site),
        energy_wh {INT} NOT NULL,
        price_micro_per_kwh {INT} NOT NULL,
        CHECK ((kind = 'utility') = (site IS NULL))
    ) {STRICT}"""
_POSTINGS_INDEX: Final = "CREATE INDEX postings_interval ON postings (interval)"

_SCHEMA: Final = (
    """CREATE TABLE schema_version (
        version {INT} NOT NULL
    ) {STRICT}""",
    """CREATE TABLE accounts (
        account {TEXT} PRIMARY KEY,
        kind {TEXT} NOT NULL CHECK (kind IN ('site', 'community', 'utility')),
        site {TEXT} UNIQUE,
        CHECK ((kind = 'site') = (site IS NOT NULL))
    ) {STRICT}""",
    """CREATE TABLE intervals (
        interval {INT} PRIMARY KEY CHECK (interval >= 0),
        clearing_price_micro_per_kwh {INT} NOT NULL,
        retail_price_micro_per_kwh {INT} NOT NULL,
        feed_in_price_micro_per_kwh {INT} NOT NULL,
        imbalance_premium_micro_per_kwh {INT} NOT NULL CHECK (
            imbalance_premium_micro_per_kwh >= 0),
        imbalance_buy_price_micro_per_kwh {INT} NOT NULL,
        imbalance_sell_price_micro_per_kwh {INT} NOT NULL,
        community_net_wh {INT} NOT NULL,
        posting_count {INT} NOT NULL CHECK (posting_count >= 0),
        rebate_rule {TEXT} NOT NULL DEFAULT 'none' CHECK (rebate_rule IN ('none', 'traded_energy'))
    ) {STRICT}""",
    """CREATE TABLE site_intervals (
        interval {INT} NOT NULL REFERENCES intervals (interval),
        site {TEXT} NOT NULL REFERENCES accounts (site),
        award_wh {INT} NOT NULL,
        metered_wh {INT} NOT NULL,
        estimated {INT} NOT NULL CHECK (estimated IN (0, 1)),
        PRIMARY KEY (interval, site)
    ) {STRICT}""",
    """CREATE INDEX site_intervals_site ON site_intervals (site)""",
    _POSTINGS_TABLE.replace("{name}", "postings"),
    _POSTINGS_INDEX,
    """CREATE TABLE entries (
        entry_id {ID},
        posting_id {INT} NOT NULL REFERENCES postings (posting_id),
        interval {INT} NOT NULL REFERENCES intervals (interval),
        account {TEXT} NOT NULL REFERENCES accounts (account),
        amount_micro {INT} NOT NULL
    ) {STRICT}""",
    """CREATE INDEX entries_interval ON entries (interval)""",
    """CREATE INDEX entries_account ON entries (account)""",
    """CREATE INDEX entries_posting ON entries (posting_id)""",
)


#: Tables whose rows are never updated or deleted (the engine's triggers refuse it).
_APPEND_ONLY_TABLES: Final = ("audit", "clearings", "clearing_awards", "revisions", "corrections")


#: Version 3 on top of version 2 (a new file gets version 2's schema and then these).
_V3_SCHEMA: Final = (
    "ALTER TABLE postings ADD COLUMN revision {INT} NOT NULL DEFAULT 0 CHECK (revision >= 0)",
    "ALTER TABLE site_intervals ADD COLUMN estimate_reason {TEXT}",
    """CREATE TABLE clearings (
        interval {INT} PRIMARY KEY CHECK (interval >= 0),
        clearing_price_micro_per_kwh {INT} NOT NULL,
        retail_price_micro_per_kwh {INT} NOT NULL,
        feed_in_price_micro_per_kwh {INT} NOT NULL,
        imbalance_premium_micro_per_kwh {INT} NOT NULL CHECK (
            imbalance_premium_micro_per_kwh >= 0),
        rebate_rule {TEXT} NOT NULL CHECK (rebate_rule IN ('none', 'traded_energy')),
        cleared_ts {REAL} NOT NULL,
        award_count {INT} NOT NULL CHECK (award_count >= 0)
    ) {STRICT}""",
    """CREATE TABLE clearing_awards (
        interval {INT} NOT NULL REFERENCES clearings (interval),
        site {TEXT} NOT NULL,
        award_wh {INT} NOT NULL,
        PRIMARY KEY (interval, site)
    ) {STRICT}""",
    """CREATE TABLE revisions (
        interval {INT} NOT NULL REFERENCES intervals (interval),
        revision {INT} NOT NULL CHECK (revision >= 1),
        posting_count {INT} NOT NULL CHECK (posting_count >= 0),
        reason {TEXT} NOT NULL,
        ts {REAL} NOT NULL,
        PRIMARY KEY (interval, revision)
    ) {STRICT}""",
    """CREATE TABLE corrections (
        interval {INT} NOT NULL,
        revision {INT} NOT NULL,
        site {TEXT} NOT NULL REFERENCES accounts (site),
        old_metered_wh {INT} NOT NULL,
        new_metered_wh {INT} NOT NULL,
        old_estimated {INT} NOT NULL CHECK (old_estimated IN (0, 1)),
        new_estimated {INT} NOT NULL CHECK (new_estimated IN (0, 1)),
        delta_micro {INT} NOT NULL,
        PRIMARY KEY (interval, revision, site),
        FOREIGN KEY (interval, revision) REFERENCES revisions (interval, revision)
    ) {STRICT}""",
    "CREATE INDEX corrections_site ON corrections (interval, site, revision)",
    """CREATE TABLE audit (
        audit_id {ID},
        ts {REAL} NOT NULL,
        kind {TEXT} NOT NULL,
        actor {TEXT} NOT NULL,
        detail {TEXT} NOT NULL CHECK ({JSON_CHECK})
    ) {STRICT}""",
    "CREATE INDEX audit_ts ON audit (ts)",
    # Each site's metering as it stands: the latest correction's, else the settlement's.
    """CREATE VIEW site_metering AS
    SELECT s.interval, s.site, s.award_wh,
        COALESCE(c.new_metered_wh, s.metered_wh) AS metered_wh,
        COALESCE(c.new_estimated, s.estimated) AS estimated,
        CASE WHEN COALESCE(c.new_estimated, s.estimated) = 1 THEN s.estimate_reason END
            AS estimate_reason
    FROM site_intervals s LEFT JOIN corrections c
        ON c.interval = s.interval AND c.site = s.site AND c.revision = (
            SELECT MAX(c2.revision) FROM corrections c2
            WHERE c2.interval = s.interval AND c2.site = s.site)""",
    # ... then the append-only triggers of _APPEND_ONLY_TABLES (see _v3_statements).
)
#: How readers of a version 1 or 2 file see ``site_metering``.
_SITE_METERING_BEFORE_V3: Final = (
    "(SELECT interval, site, award_wh, metered_wh, estimated, NULL AS estimate_reason "
    "FROM site_intervals)"
)


class Ledger:
    """The settlement ledger in one SQLite file or PostgreSQL database; a context manager
    owning one connection (coordinator/ledger_sql.py holds what differs between the engines).

    ``Ledger(path)`` opens (creating if needed) the file, switches it to WAL, turns foreign keys
    on, sets ``synchronous=FULL`` and creates or checks the schema, migrating an older one
    (after copying the file to ``<path>.v<N>.bak``). ``Ledger("postgresql://user@host/db")``
    opens a PostgreSQL database instead (psycopg 3, the ``postgres`` extra) and creates or
    checks the same schema in its current schema; ``password`` is its password (else libpq's
    ``PGPASSWORD`` or ``~/.pgpass``; keep it out of the URL). ``migrate=False`` (for readers
    such as ``wattmesh ledger report``) leaves an older file as it is: it can be read but not
    settled into. Closing (``close()`` or leaving the ``with`` block) closes the connection.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout_s: float = 5.0,
        migrate: bool = True,
        password: str | None = None,
    ) -> None:
        #: Where the ledger is, for messages: the file, or the URL without its password.
        self.location = mask_url(str(path)) if is_postgres_url(path) else str(path)
        #: The SQLite file (for PostgreSQL, ``location`` as a Path, which names no file).
        self.path = Path(self.location)
        self._lock = threading.RLock()
        try:
            conn = connect(path, busy_timeout_s=busy_timeout_s, password=password)
        except ConnectError as err:
            raise LedgerStorageError(f"cannot open ledger {self.location}: {err}") from err
        self._conn: LedgerConnection | None = conn
        try:
            #: The schema version of the file (older than SCHEMA_VERSION only without migrate).
            self.schema_version = _ensure_schema(conn, migrate=migrate)
            # Version 1 had no rebates: every interval was settled under the rule "none".
            self._rebate_rule_column = "rebate_rule" if self.schema_version >= 2 else "'none'"
            v3 = self.schema_version >= 3
            self._site_rows = "site_metering" if v3 else _SITE_METERING_BEFORE_V3
            if isinstance(conn, SqliteConnection):
                conn.execute("PRAGMA foreign_keys=ON")  # after a migration, which needs them off
        except BaseException as err:
            conn.close()
            self._conn = None
            if isinstance(err, conn.errors):
                raise LedgerStorageError(f"cannot open ledger {self.location}: {err}") from err
            raise

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._conn is None

    @contextmanager
    def _db(self) -> Iterator[LedgerConnection]:
        """The connection under the lock; the driver's errors come out as LedgerStorageError."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise LedgerStorageError(f"ledger {self.location} is closed")
            errors: tuple[type[Exception], ...] = (ConnectError, *conn.errors)
            try:
                conn.reconnect_if_broken()  # a PostgreSQL session the server dropped
                yield conn
            except errors as err:
                raise LedgerStorageError(f"ledger {self.location}: {err}") from err

    # -- settlement ---------------------------------------------------------------------

    def _require_writable(self) -> None:
        if self.schema_version < SCHEMA_VERSION:
            raise SchemaVersionError(
                f"ledger {self.location} has schema version {self.schema_version}, opened without "
                f"migrating: it can be read, not settled into (open it with migrate=True)"
            )

    def settle_interval(
        self,
        interval: int,
        *,
        clearing_price_per_kwh: float,
        retail_price_per_kwh: float,
        feed_in_price_per_kwh: float,
        awards_kwh: Mapping[str, float],
        metered_kwh: Mapping[str, float],
        imbalance_premium_per_kwh: float = DEFAULT_IMBALANCE_PREMIUM_PER_KWH,
        estimate_missing: bool = False,
        rebate: RebateRule = "none",
    ) -> SettlementResult:
        """Settle one market interval in one transaction; idempotent (see the module docs).

        ``awards_kwh`` and ``metered_kwh`` map site ids to energy over the interval (kWh, import
        positive). The sites settled are those in either mapping; a site without an award has
        award 0. An awarded site without metering raises :class:`IncompleteMetering` unless
        ``estimate_missing`` (then metered = award, flagged). Re-settling with the same inputs
        returns the stored result; with different ones raises :class:`SettlementConflict`.
        ``rebate`` pays the community account's balance of the interval back to the sites
        (``"traded_energy"``) or keeps it (``"none"``). When a clearing was recorded for the
        interval, the prices, premium, rebate rule and non-zero awards must be the clearing's
        (else :class:`LedgerInputError` naming the first that differs).
        """
        _check_interval(interval)
        self._require_writable()
        prices = _prices(
            clearing_price_per_kwh,
            retail_price_per_kwh,
            feed_in_price_per_kwh,
            imbalance_premium_per_kwh,
        )
        _check_rebate(rebate)
        sites = _site_inputs(interval, awards_kwh, metered_kwh, estimate_missing=estimate_missing)

        def agree(conn: LedgerConnection) -> None:
            cleared = self._clearing(conn, interval)
            if cleared is not None:
                _check_agrees_with_clearing(cleared, prices, rebate, sites)

        return self._settle(interval, prices, sites, rebate, {}, agree)

    def settle_cleared(
        self,
        interval: int,
        *,
        metered_kwh: Mapping[str, float],
        roster: Iterable[str] = (),
        estimate_reasons: Mapping[str, str] = MappingProxyType({}),
    ) -> SettlementResult:
        """Settle an interval from its recorded clearing (:meth:`record_clearing`).

        The sites settled are the clearing's awarded sites, those in ``metered_kwh`` (kWh,
        import positive), those in ``roster`` (sites that must appear in the interval even
        with no award and no metering) and those in ``estimate_reasons``. Every site without
        metering is settled as estimated (metered = award, 0 for a roster site), flagged, with
        its reason from ``estimate_reasons`` (e.g. "implausible: grid power beyond the
        connection limit"; default :data:`DEFAULT_ESTIMATE_REASON`). A reason for a site that
        has metering is refused: leave its metering out to estimate it. Idempotent as
        :meth:`settle_interval` (reasons are not compared). Raises :class:`LedgerInputError`
        when the interval has no recorded clearing.
        """
        _check_interval(interval)
        self._require_writable()
        roster = tuple(roster)
        _check_site_ids((*roster, *estimate_reasons))
        reasons: dict[str, str] = {}
        for site, reason in estimate_reasons.items():
            reasons[site] = _check_text(reason, f"estimate_reasons[{site!r}]")
        metered_named = sorted(s for s in reasons if s in metered_kwh)
        if metered_named:
            raise LedgerInputError(
                f"estimate_reasons names sites with metering: {', '.join(metered_named)}; "
                "leave their metering out to settle them as estimated"
            )
        with self._db() as conn:
            cleared = self._clearing(conn, interval)
        if cleared is None:
            raise LedgerInputError(
                f"interval {interval} has no recorded clearing; record_clearing comes first"
            )
        prices = _Prices(
            clearing=cleared.clearing_price_micro_per_kwh,
            retail=cleared.retail_price_micro_per_kwh,
            feed_in=cleared.feed_in_price_micro_per_kwh,
            premium=cleared.imbalance_premium_micro_per_kwh,
        )
        metered = {s: _to_wh(q, f"metered_kwh[{s!r}]") for s, q in metered_kwh.items()}
        _check_site_ids(metered)
        awards = cleared.awards_wh
        sites = tuple(
            _SiteInput(
                site=s,
                award_wh=awards.get(s, 0),
                metered_wh=metered.get(s, awards.get(s, 0)),
                estimated=s not in metered,
            )
            for s in sorted(awards.keys() | metered.keys() | set(roster) | reasons.keys())
        )
        estimated = {
            s.site: reasons.get(s.site, DEFAULT_ESTIMATE_REASON) for s in sites if s.estimated
        }
        return self._settle(interval, prices, sites, cleared.rebate_rule, estimated, None)

    def _settle(
        self,
        interval: int,
        prices: _Prices,
        sites: tuple[_SiteInput, ...],
        rebate: RebateRule,
        reasons: Mapping[str, str],
        check: Callable[[LedgerConnection], None] | None,
    ) -> SettlementResult:
        """Write the interval once (one transaction), or compare with what is stored."""
        postings = _postings(prices, sites, rebate)
        if not reasons:
            reasons = {s.site: DEFAULT_ESTIMATE_REASON for s in sites if s.estimated}
        with self._db() as conn:
            with _transaction(conn):
                if check is not None:
                    check(conn)
                original = self._original_inputs(conn, interval)
                if original is None:
                    self._write(conn, interval, prices, sites, postings, rebate, reasons)
            result = self._load(conn, interval)
        if result is None:  # pragma: no cover - committed just above on this connection
            raise LedgerStorageError(f"interval {interval} vanished after its commit")
        if original is not None and original != (prices, sites):
            raise SettlementConflict(result)
        return result

    def _write(
        self,
        conn: LedgerConnection,
        interval: int,
        prices: _Prices,
        sites: tuple[_SiteInput, ...],
        postings: tuple[_Posting, ...],
        rebate: RebateRule,
        reasons: Mapping[str, str],
    ) -> None:
        net_wh = sum(s.metered_wh for s in sites)
        conn.executemany(
            "INSERT INTO accounts (account, kind, site) VALUES (?, 'site', ?) "
            "ON CONFLICT DO NOTHING",
            [(site_account(s.site), s.site) for s in sites],
        )
        conn.execute(
            "INSERT INTO intervals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                interval,
                prices.clearing,
                prices.retail,
                prices.feed_in,
                prices.premium,
                prices.imbalance_buy(net_wh),
                prices.imbalance_sell(net_wh),
                net_wh,
                len(postings),
                rebate,
            ),
        )
        conn.executemany(
            "INSERT INTO site_intervals (interval, site, award_wh, metered_wh, estimated, "
            "estimate_reason) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    interval,
                    s.site,
                    s.award_wh,
                    s.metered_wh,
                    int(s.estimated),
                    reasons.get(s.site) if s.estimated else None,
                )
                for s in sites
            ],
        )
        for posting in postings:
            self._write_posting(conn, interval, posting)

    def _write_posting(
        self, conn: LedgerConnection, interval: int, posting: _Posting, revision: int = 0
    ) -> None:
        """Write one posting and its two entries (inside the interval's transaction).

        The single place postings are written; the crash test overrides it to die mid-interval.
        """
        cur = conn.execute(
            "INSERT INTO postings (interval, kind, site, energy_wh, price_micro_per_kwh, "
            "revision) VALUES (?, ?, ?, ?, ?, ?) RETURNING posting_id",
            (
                interval,
                posting.kind,
                posting.site,
                posting.energy_wh,
                posting.price_micro_per_kwh,
                revision,
            ),
        )
        posting_id = int(cur.fetchone()[0])
        conn.executemany(
            "INSERT INTO entries (posting_id, interval, account, amount_micro) VALUES (?, ?, ?, ?)",
            [
                (posting_id, interval, posting.party, posting.party_micro),
                (posting_id, interval, COMMUNITY, -posting.party_micro),
            ],
        )

    def _original_inputs(
        self, conn: LedgerConnection, interval: int
    ) -> tuple[_Prices, tuple[_SiteInput, ...]] | None:
        """The rounded inputs the interval was settled with (before any correction)."""
        row = conn.execute(
            "SELECT clearing_price_micro_per_kwh, retail_price_micro_per_kwh, "
            "feed_in_price_micro_per_kwh, imbalance_premium_micro_per_kwh "
            "FROM intervals WHERE interval = ?",
            (interval,),
        ).fetchone()
        if row is None:
            return None
        sites = tuple(
            _SiteInput(site=site, award_wh=a, metered_wh=m, estimated=bool(e))
            for site, a, m, e in conn.execute(
                "SELECT site, award_wh, metered_wh, estimated FROM site_intervals "
                "WHERE interval = ? ORDER BY site",
                (interval,),
            )
        )
        return _Prices(*row), sites

    def _load(self, conn: LedgerConnection, interval: int) -> SettlementResult | None:
        """The interval as it stands: the settlement plus every correction booked on it."""
        row = conn.execute(
            "SELECT clearing_price_micro_per_kwh, retail_price_micro_per_kwh, "
            "feed_in_price_micro_per_kwh, imbalance_premium_micro_per_kwh, "
            f"{self._rebate_rule_column} FROM intervals WHERE interval = ?",
            (interval,),
        ).fetchone()
        if row is None:
            return None
        prices = _Prices(*row[:4])
        money: dict[tuple[str, str], int] = {}
        for kind, account, amount in conn.execute(
            "SELECT p.kind, e.account, SUM(e.amount_micro) FROM entries e "
            "JOIN postings p USING (posting_id) WHERE e.interval = ? GROUP BY p.kind, e.account",
            (interval,),
        ):
            money[(kind, account)] = amount
        sites = tuple(
            SiteSettlement(
                site=site,
                award_wh=award,
                metered_wh=metered,
                estimated=bool(estimated),
                trade_micro=money.get(("trade", site_account(site)), 0),
                imbalance_micro=money.get(("imbalance", site_account(site)), 0),
                rebate_micro=money.get(("rebate", site_account(site)), 0),
                estimate_reason=reason,
            )
            for site, award, metered, estimated, reason in conn.execute(
                "SELECT site, award_wh, metered_wh, estimated, estimate_reason "
                f"FROM {self._site_rows} WHERE interval = ? ORDER BY site",
                (interval,),
            )
        )
        community = sum(v for (_, account), v in money.items() if account == COMMUNITY)
        net_wh = sum(s.metered_wh for s in sites)
        return SettlementResult(
            interval=interval,
            clearing_price_micro_per_kwh=prices.clearing,
            retail_price_micro_per_kwh=prices.retail,
            feed_in_price_micro_per_kwh=prices.feed_in,
            imbalance_premium_micro_per_kwh=prices.premium,
            imbalance_buy_price_micro_per_kwh=prices.imbalance_buy(net_wh),
            imbalance_sell_price_micro_per_kwh=prices.imbalance_sell(net_wh),
            community_net_wh=net_wh,
            rebate_rule=row[4],
            utility_micro=money.get(("utility", UTILITY), 0),
            community_micro=community,
            sites=sites,
            revision=self._revision(conn, interval),
        )

    def _revision(self, conn: LedgerConnection, interval: int) -> int:
        if self.schema_version < 3:
            return 0
        row = conn.execute(
            "SELECT COALESCE(MAX(revision), 0) FROM revisions WHERE interval = ?", (interval,)
        ).fetchone()
        return int(row[0])

    # -- durable clearings ------------------------------------------------------------------

    def record_clearing(
        self,
        interval: int,
        *,
        clearing_price_per_kwh: float,
        retail_price_per_kwh: float,
        feed_in_price_per_kwh: float,
        awards_kwh: Mapping[str, float],
        imbalance_premium_per_kwh: float,
        rebate: RebateRule,
        cleared_ts: float,
    ) -> ClearedInterval:
        """Commit an interval's clearing and every award before they are published.

        Durable when it returns: one ``BEGIN IMMEDIATE`` transaction on the ledger's
        connection, which runs with ``synchronous=FULL`` in WAL mode (the commit is fsynced),
        so a coordinator killed right after finds it in :meth:`unsettled_clearings`.
        Idempotent: the same inputs (after rounding; ``cleared_ts`` is not compared) return the
        stored record with its first ``cleared_ts``; other inputs, or an interval already
        settled without a recorded clearing, raise :class:`ClearingConflict`. Inputs are
        validated and rounded as :meth:`settle_interval`'s (a zero award is kept: the site
        takes part in the interval).
        """
        _check_interval(interval)
        self._require_writable()
        prices = _prices(
            clearing_price_per_kwh,
            retail_price_per_kwh,
            feed_in_price_per_kwh,
            imbalance_premium_per_kwh,
        )
        _check_rebate(rebate)
        ts = _check_ts(cleared_ts, "cleared_ts")
        _check_site_ids(awards_kwh)
        awards = {s: _to_wh(q, f"awards_kwh[{s!r}]") for s, q in sorted(awards_kwh.items())}
        with self._db() as conn:
            with _transaction(conn):
                stored = self._clearing(conn, interval)
                settled = stored is None and self._is_settled(conn, interval)
                if stored is None and not settled:
                    conn.execute(
                        "INSERT INTO clearings VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            interval,
                            prices.clearing,
                            prices.retail,
                            prices.feed_in,
                            prices.premium,
                            rebate,
                            ts,
                            len(awards),
                        ),
                    )
                    conn.executemany(
                        "INSERT INTO clearing_awards VALUES (?, ?, ?)",
                        [(interval, s, wh) for s, wh in awards.items()],
                    )
            if settled:
                raise ClearingConflict(
                    interval,
                    None,
                    f"interval {interval} is already settled without a recorded clearing",
                )
            if stored is None:
                stored = self._clearing(conn, interval)
                if stored is None:  # pragma: no cover - committed just above
                    raise LedgerStorageError(f"clearing {interval} vanished after its commit")
                return stored
        differs = _clearing_difference(stored, prices, rebate, awards)
        if differs:
            raise ClearingConflict(
                interval,
                stored,
                f"interval {interval} is already cleared with a different {differs}; "
                "the recorded clearing stands",
            )
        return stored

    def _clearing(self, conn: LedgerConnection, interval: int) -> ClearedInterval | None:
        if self.schema_version < 3:
            return None
        row = conn.execute(
            "SELECT c.interval, c.clearing_price_micro_per_kwh, c.retail_price_micro_per_kwh, "
            "c.feed_in_price_micro_per_kwh, c.imbalance_premium_micro_per_kwh, c.rebate_rule, "
            "c.cleared_ts, EXISTS (SELECT 1 FROM intervals i WHERE i.interval = c.interval) "
            "FROM clearings c WHERE c.interval = ?",
            (interval,),
        ).fetchone()
        if row is None:
            return None
        awards = dict(
            conn.execute(
                "SELECT site, award_wh FROM clearing_awards WHERE interval = ? ORDER BY site",
                (interval,),
            ).fetchall()
        )
        return ClearedInterval(
            interval=row[0],
            clearing_price_micro_per_kwh=row[1],
            retail_price_micro_per_kwh=row[2],
            feed_in_price_micro_per_kwh=row[3],
            imbalance_premium_micro_per_kwh=row[4],
            rebate_rule=row[5],
            awards_wh=MappingProxyType(awards),
            cleared_ts=row[6],
            settled=bool(row[7]),
        )

    @staticmethod
    def _is_settled(conn: LedgerConnection, interval: int) -> bool:
        row = conn.execute("SELECT 1 FROM intervals WHERE interval = ?", (interval,))
        return row.fetchone() is not None

    def clearing(self, interval: int) -> ClearedInterval | None:
        """The recorded clearing of an interval, or None."""
        with self._db() as conn:
            return self._clearing(conn, interval)

    def unsettled_clearings(self) -> tuple[ClearedInterval, ...]:
        """Every recorded clearing whose interval is not settled yet, oldest interval first."""
        if self.schema_version < 3:
            return ()
        with self._db() as conn:
            rows = conn.execute(
                "SELECT interval FROM clearings WHERE interval NOT IN "
                "(SELECT interval FROM intervals) ORDER BY interval"
            ).fetchall()
            found = (self._clearing(conn, r[0]) for r in rows)
            return tuple(c for c in found if c is not None)

    # -- corrections ------------------------------------------------------------------------

    def correct_interval(
        self,
        interval: int,
        *,
        metered_kwh: Mapping[str, float],
        reason: str,
        ts: float,
    ) -> Correction | None:
        """Book late or replayed metering of a settled interval as a correction.

        ``metered_kwh`` gives new metering (kWh, import positive) for some of the interval's
        sites; the others keep what they have; a named estimated site becomes metered. The
        interval is settled afresh with its stored prices, awards, premium and rebate rule,
        and the difference to what is booked is written as new postings of revision N (the
        same kinds, ``revision`` > 0; nothing is updated or deleted), with one ``corrections``
        row per site whose metering or money changed and one audit row (kind "correction").
        Returns None, writing nothing, when no metering changes (so the same correction twice
        books once). Raises :class:`LedgerInputError` for an interval that is not settled or a
        site that is not in it.
        """
        _check_interval(interval)
        self._require_writable()
        reason = _check_text(reason, "reason")
        ts = _check_ts(ts, "ts")
        _check_site_ids(metered_kwh)
        metered = {s: _to_wh(q, f"metered_kwh[{s!r}]") for s, q in metered_kwh.items()}
        with self._db() as conn, _transaction(conn):
            return self._correct(conn, interval, metered, reason, ts)

    def _correct(
        self,
        conn: LedgerConnection,
        interval: int,
        metered: Mapping[str, int],
        reason: str,
        ts: float,
    ) -> Correction | None:
        row = conn.execute(
            "SELECT clearing_price_micro_per_kwh, retail_price_micro_per_kwh, "
            "feed_in_price_micro_per_kwh, imbalance_premium_micro_per_kwh, rebate_rule "
            "FROM intervals WHERE interval = ?",
            (interval,),
        ).fetchone()
        if row is None:
            raise LedgerInputError(f"interval {interval} is not settled; nothing to correct")
        prices, rule = _Prices(*row[:4]), row[4]
        current = {
            site: _SiteInput(site, award, m, bool(e))
            for site, award, m, e in conn.execute(
                "SELECT site, award_wh, metered_wh, estimated FROM site_metering "
                "WHERE interval = ? ORDER BY site",
                (interval,),
            )
        }
        unknown = sorted(s for s in metered if s not in current)
        if unknown:
            raise LedgerInputError(
                f"metered_kwh names sites that are not in interval {interval}: {', '.join(unknown)}"
            )
        new = {
            s: _SiteInput(s, old.award_wh, metered[s], False) if s in metered else old
            for s, old in current.items()
        }
        if all(new[s] == current[s] for s in metered):
            return None
        booked: dict[tuple[str, str], tuple[int, int]] = {}
        for kind, account, amount, energy in conn.execute(
            "SELECT p.kind, e.account, SUM(e.amount_micro), SUM(p.energy_wh) FROM entries e "
            "JOIN postings p USING (posting_id) WHERE e.interval = ? AND e.account != ? "
            "GROUP BY p.kind, e.account",
            (interval, COMMUNITY),
        ):
            booked[(kind, account)] = (amount, energy)
        fresh: dict[tuple[str, str], _Posting] = {
            (p.kind, p.party): p for p in _postings(prices, tuple(new.values()), rule)
        }
        deltas: list[_Posting] = []
        for kind, party in sorted(booked.keys() | fresh.keys(), key=_posting_order):
            amount, energy = booked.get((kind, party), (0, 0))
            target = fresh.get((kind, party))
            delta = (target.party_micro if target else 0) - amount
            if delta:
                deltas.append(
                    _Posting(
                        cast(PostingKind, kind),
                        None if party == UTILITY else party.removeprefix(_SITE_PREFIX),
                        party,
                        (target.energy_wh if target else 0) - energy,
                        target.price_micro_per_kwh if target else 0,
                        delta,
                    )
                )
        revision = self._revision(conn, interval) + 1
        conn.execute(
            "INSERT INTO revisions VALUES (?, ?, ?, ?, ?)",
            (interval, revision, len(deltas), reason, ts),
        )
        site_delta: dict[str, int] = {}
        for p in deltas:
            if p.site is not None:
                site_delta[p.site] = site_delta.get(p.site, 0) + p.party_micro
        lines = tuple(
            SiteCorrection(
                site=s,
                old_metered_wh=current[s].metered_wh,
                new_metered_wh=new[s].metered_wh,
                old_estimated=current[s].estimated,
                new_estimated=new[s].estimated,
                delta_micro=site_delta.get(s, 0),
            )
            for s in sorted(current)
            if new[s] != current[s] or site_delta.get(s, 0)
        )
        conn.executemany(
            "INSERT INTO corrections VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    interval,
                    revision,
                    c.site,
                    c.old_metered_wh,
                    c.new_metered_wh,
                    int(c.old_estimated),
                    int(c.new_estimated),
                    c.delta_micro,
                )
                for c in lines
            ],
        )
        for p in deltas:
            self._write_posting(conn, interval, p, revision)
        utility = sum(p.party_micro for p in deltas if p.party == UTILITY)
        correction = Correction(
            interval=interval,
            revision=revision,
            reason=reason,
            ts=ts,
            sites=lines,
            utility_delta_micro=utility,
            community_delta_micro=-sum(p.party_micro for p in deltas),
        )
        self._audit(conn, "correction", "ledger", _correction_detail(correction), ts)
        return correction

    def corrections(self, interval: int | None = None) -> tuple[Correction, ...]:
        """Every correction booked (on one interval, or all), in the order booked."""
        if self.schema_version < 3:
            return ()
        where, args = ("WHERE r.interval = ?", (interval,)) if interval is not None else ("", ())
        with self._db() as conn:
            revisions = conn.execute(
                f"SELECT r.interval, r.revision, r.reason, r.ts FROM revisions r {where} "
                "ORDER BY r.ts, r.interval, r.revision",
                args,
            ).fetchall()
            out = []
            for i, rev, reason, ts in revisions:
                lines = tuple(
                    SiteCorrection(site, old, new, bool(oe), bool(ne), delta)
                    for site, old, new, oe, ne, delta in conn.execute(
                        "SELECT site, old_metered_wh, new_metered_wh, old_estimated, "
                        "new_estimated, delta_micro FROM corrections "
                        "WHERE interval = ? AND revision = ? ORDER BY site",
                        (i, rev),
                    )
                )
                utility, total = conn.execute(
                    "SELECT COALESCE(SUM(CASE WHEN e.account = ? THEN e.amount_micro END), 0), "
                    "COALESCE(SUM(CASE WHEN e.account = ? THEN e.amount_micro END), 0) "
                    "FROM entries e JOIN postings p USING (posting_id) "
                    "WHERE p.interval = ? AND p.revision = ?",
                    (UTILITY, COMMUNITY, i, rev),
                ).fetchone()
                out.append(Correction(i, rev, reason, ts, lines, utility, total))
        return tuple(out)

    # -- audit ------------------------------------------------------------------------------

    def audit(self, kind: str, actor: str, detail: Mapping[str, object], ts: float) -> int:
        """Append one row to the audit log and return its id.

        ``kind`` says what happened (the coordinator writes "dispatch", "emergency",
        "rejection", "correction", "grid_mode"), ``actor`` who did it, ``detail`` a JSON object
        (stored as JSON text; NaN and infinities are refused), ``ts`` when (s since the epoch).
        The log is append-only: SQLite triggers abort every UPDATE and DELETE of it.
        """
        self._require_writable()
        kind = _check_text(kind, "kind", max_len=_MAX_SITE_ID_LEN)
        actor = _check_text(actor, "actor", max_len=_MAX_SITE_ID_LEN)
        ts = _check_ts(ts, "ts")
        with self._db() as conn, _transaction(conn):
            return self._audit(conn, kind, actor, detail, ts)

    @staticmethod
    def _audit(
        conn: LedgerConnection, kind: str, actor: str, detail: Mapping[str, object], ts: float
    ) -> int:
        if not isinstance(detail, Mapping) or not all(isinstance(k, str) for k in detail):
            raise LedgerInputError("detail must be a mapping with string keys")
        try:
            text = json.dumps(dict(detail), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise LedgerInputError(f"detail must be JSON-serialisable: {err}") from err
        cur = conn.execute(
            "INSERT INTO audit (ts, kind, actor, detail) VALUES (?, ?, ?, ?) RETURNING audit_id",
            (ts, kind, actor, text),
        )
        return int(cur.fetchone()[0])

    def audit_entries(
        self, *, since_ts: float | None = None, kind: str | None = None, limit: int = 1000
    ) -> tuple[AuditEntry, ...]:
        """The newest ``limit`` audit rows (of ``kind``, at or after ``since_ts``), oldest
        first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise LedgerInputError(f"limit must be an int >= 1, got {limit!r}")
        if self.schema_version < 3:
            return ()
        clauses: list[str] = []
        args: list[object] = []
        if since_ts is not None:
            clauses.append("ts >= ?")
            args.append(_check_ts(since_ts, "since_ts"))
        if kind is not None:
            clauses.append("kind = ?")
            args.append(kind)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._db() as conn:
            rows = conn.execute(
                "SELECT audit_id, ts, kind, actor, detail FROM (SELECT * FROM audit "
                f"{where} ORDER BY audit_id DESC LIMIT ?) AS newest ORDER BY audit_id",
                (*args, limit),
            ).fetchall()
        return tuple(
            AuditEntry(i, ts, k, actor, MappingProxyType(json.loads(detail)))
            for i, ts, k, actor, detail in rows
        )

    # -- queries ------------------------------------------------------------------------

    def settlement(self, interval: int) -> SettlementResult | None:
        """The stored settlement of an interval, or None when it is not settled."""
        with self._db() as conn:
            return self._load(conn, interval)

    def is_settled(self, interval: int) -> bool:
        """Whether the interval has been settled."""
        with self._db() as conn:
            row = conn.execute("SELECT 1 FROM intervals WHERE interval = ?", (interval,))
            return row.fetchone() is not None

    def settled_intervals(self) -> tuple[int, ...]:
        """Every settled interval, ascending."""
        with self._db() as conn:
            rows = conn.execute("SELECT interval FROM intervals ORDER BY interval")
            return tuple(r[0] for r in rows)

    def accounts(self) -> tuple[str, ...]:
        """Every account name, sorted."""
        with self._db() as conn:
            return tuple(r[0] for r in conn.execute("SELECT account FROM accounts ORDER BY 1"))

    def balance(self, account: str) -> int:
        """The account's balance in micro-currency: what it has received net (<0: paid)."""
        with self._db() as conn:
            known = conn.execute("SELECT 1 FROM accounts WHERE account = ?", (account,))
            if known.fetchone() is None:
                raise UnknownAccount(f"no account {account!r} in ledger {self.location}")
            row = conn.execute(
                "SELECT COALESCE(SUM(amount_micro), 0) FROM entries WHERE account = ?",
                (account,),
            ).fetchone()
            return int(row[0])

    def interval_entries(self, interval: int) -> tuple[Entry, ...]:
        """Every entry of an interval in the order written (empty when not settled)."""
        with self._db() as conn:
            rows = conn.execute(
                "SELECT e.entry_id, e.interval, e.posting_id, p.kind, p.site, e.account, "
                "e.amount_micro, p.energy_wh, p.price_micro_per_kwh FROM entries e "
                "JOIN postings p USING (posting_id) WHERE e.interval = ? ORDER BY e.entry_id",
                (interval,),
            ).fetchall()
        return tuple(Entry(*row) for row in rows)

    def baseline_cost(self, site: str) -> int:
        """What the utility alone would have billed the site (micro-currency, >0: it pays).

        Over every settled interval the site took part in: its metered energy at that
        interval's retail tariff when importing and feed-in when exporting, rounded as every
        site amount is (what it pays ceiled, what it receives floored).
        """
        with self._db() as conn:
            self._require_site(conn, site)
            rows = conn.execute(
                "SELECT s.metered_wh, i.retail_price_micro_per_kwh, i.feed_in_price_micro_per_kwh "
                f"FROM {self._site_rows} s JOIN intervals i USING (interval) WHERE s.site = ?",
                (site,),
            ).fetchall()
        return sum(_baseline_cost(m, r, f) for m, r, f in rows)

    def savings(self, site: str) -> int:
        """Baseline cost minus what the site actually paid net (micro-currency)."""
        return self.site_report(site).savings_micro

    def site_report(self, site: str) -> SiteReport:
        """The site's energy and money totals, baseline and savings (see :class:`SiteReport`)."""
        baseline = self.baseline_cost(site)
        with self._db() as conn:
            n, estimated, bought, sold, imp, exp = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(estimated), 0), "
                "COALESCE(SUM(CASE WHEN award_wh > 0 THEN award_wh END), 0), "
                "COALESCE(SUM(CASE WHEN award_wh < 0 THEN -award_wh END), 0), "
                "COALESCE(SUM(CASE WHEN metered_wh > 0 THEN metered_wh END), 0), "
                "COALESCE(SUM(CASE WHEN metered_wh < 0 THEN -metered_wh END), 0) "
                f"FROM {self._site_rows} WHERE site = ?",
                (site,),
            ).fetchone()
            corrected = 0
            if self.schema_version >= 3:
                corrected = conn.execute(
                    "SELECT COUNT(DISTINCT interval) FROM corrections WHERE site = ?", (site,)
                ).fetchone()[0]
            paid, received, imbalance, rebate = conn.execute(
                "SELECT "
                "COALESCE(SUM(CASE WHEN p.kind = 'trade' AND e.amount_micro < 0 "
                "THEN -e.amount_micro END), 0), "
                "COALESCE(SUM(CASE WHEN p.kind = 'trade' AND e.amount_micro > 0 "
                "THEN e.amount_micro END), 0), "
                "COALESCE(SUM(CASE WHEN p.kind = 'imbalance' THEN -e.amount_micro END), 0), "
                "COALESCE(SUM(CASE WHEN p.kind = 'rebate' THEN e.amount_micro END), 0) "
                "FROM entries e JOIN postings p USING (posting_id) WHERE e.account = ?",
                (site_account(site),),
            ).fetchone()
        net_cost = paid - received + imbalance - rebate
        return SiteReport(
            site=site,
            intervals=n,
            estimated_intervals=estimated,
            bought_wh=bought,
            sold_wh=sold,
            metered_import_wh=imp,
            metered_export_wh=exp,
            paid_micro=paid,
            received_micro=received,
            imbalance_cost_micro=imbalance,
            rebate_micro=rebate,
            net_cost_micro=net_cost,
            baseline_cost_micro=baseline,
            savings_micro=baseline - net_cost,
            corrected_intervals=corrected,
        )

    def check_balanced(self) -> bool:
        """Every posting and every interval sums to zero, so does the ledger, and no interval
        is partial (its posting count matches what was recorded when it was settled)."""
        with self._db() as conn:
            unbalanced_postings = conn.execute(
                "SELECT COUNT(*) FROM (SELECT posting_id FROM entries GROUP BY posting_id "
                "HAVING SUM(amount_micro) != 0 OR COUNT(*) != 2) AS unbalanced"
            ).fetchone()[0]
            unbalanced_intervals = conn.execute(
                "SELECT COUNT(*) FROM (SELECT interval FROM entries GROUP BY interval "
                "HAVING SUM(amount_micro) != 0) AS unbalanced"
            ).fetchone()[0]
            total = conn.execute("SELECT COALESCE(SUM(amount_micro), 0) FROM entries").fetchone()[0]
            partial = conn.execute(
                "SELECT COUNT(*) FROM intervals i WHERE i.posting_count != "
                "(SELECT COUNT(*) FROM postings p WHERE p.interval = i.interval"
                f"{' AND p.revision = 0' if self.schema_version >= 3 else ''})"
            ).fetchone()[0]
            if self.schema_version >= 3:
                # Each correction's postings are all there, and none is without its revision.
                partial += conn.execute(
                    "SELECT COUNT(*) FROM revisions r WHERE r.posting_count != "
                    "(SELECT COUNT(*) FROM postings p WHERE p.interval = r.interval "
                    "AND p.revision = r.revision)"
                ).fetchone()[0]
                partial += conn.execute(
                    "SELECT COUNT(*) FROM postings p WHERE p.revision > 0 AND NOT EXISTS "
                    "(SELECT 1 FROM revisions r WHERE r.interval = p.interval "
                    "AND r.revision = p.revision)"
                ).fetchone()[0]
            orphans = conn.execute(
                "SELECT COUNT(*) FROM postings p WHERE NOT EXISTS "
                "(SELECT 1 FROM entries e WHERE e.posting_id = p.posting_id)"
            ).fetchone()[0]
        counts = (unbalanced_postings, unbalanced_intervals, total, partial, orphans)
        return all(int(c) == 0 for c in counts)

    def estimated_sites(self) -> tuple[EstimatedSite, ...]:
        """Every site-interval that stands on estimated metering (after corrections), by
        interval and site."""
        with self._db() as conn:
            rows = conn.execute(
                "SELECT interval, site, award_wh, metered_wh, estimate_reason "
                f"FROM {self._site_rows} WHERE estimated = 1 ORDER BY interval, site"
            ).fetchall()
        return tuple(EstimatedSite(*row) for row in rows)

    def absent_sites(self) -> dict[str, tuple[int, ...]]:
        """For each site, the settled intervals between its first and last settled interval
        in which it does not appear at all (only sites with such gaps; sorted)."""
        with self._db() as conn:
            settled = [r[0] for r in conn.execute("SELECT interval FROM intervals ORDER BY 1")]
            spans = conn.execute(
                "SELECT site, MIN(interval), MAX(interval), COUNT(*) FROM site_intervals "
                "GROUP BY site ORDER BY site"
            ).fetchall()
            out: dict[str, tuple[int, ...]] = {}
            for site, first, last, n in spans:
                in_span = bisect.bisect_right(settled, last) - bisect.bisect_left(settled, first)
                if in_span == n:
                    continue
                present = {
                    r[0]
                    for r in conn.execute(
                        "SELECT interval FROM site_intervals WHERE site = ?", (site,)
                    )
                }
                lo, hi = bisect.bisect_left(settled, first), bisect.bisect_right(settled, last)
                out[site] = tuple(i for i in settled[lo:hi] if i not in present)
        return out

    def correction_count(self) -> int:
        """How many corrections are booked in the whole ledger."""
        if self.schema_version < 3:
            return 0
        with self._db() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM revisions").fetchone()[0])

    @staticmethod
    def _require_site(conn: LedgerConnection, site: str) -> None:
        if conn.execute("SELECT 1 FROM accounts WHERE site = ?", (site,)).fetchone() is None:
            raise UnknownAccount(f"no site {site!r} in the ledger")


def _ensure_schema(conn: LedgerConnection, *, migrate: bool) -> int:
    """Create the schema in an empty database, or check (and with ``migrate``, bring up to
    date) the version of an existing one; returns the database's version afterwards."""
    old = _version(conn)
    if migrate and old is not None and 1 <= old < SCHEMA_VERSION:
        if not isinstance(conn, SqliteConnection):  # PostgreSQL ledgers began at version 3
            raise SchemaVersionError(f"ledger schema version {old}: only SQLite files migrate")
        # Money data: keep a copy of the file as it was before it is rewritten.
        path = Path(conn.location)
        backup = path.with_name(f"{path.name}.v{old}.bak")
        if not backup.exists():
            with closing(sqlite3.connect(backup)) as copy:
                conn.raw.backup(copy)
    with _transaction(conn):
        return _create_or_check_schema(conn, migrate=migrate)


def create_schema(conn: LedgerConnection) -> None:
    """Create the current schema (with the community and utility accounts) in a database
    without a ledger, inside the caller's transaction: a restore fills it and commits once.

    Raises :class:`LedgerStorageError` if the database already holds a ledger.
    """
    if _version(conn) is not None:
        raise LedgerStorageError(f"{conn.location} already holds a ledger")
    _create_or_check_schema(conn, migrate=False)


@contextmanager
def _transaction(conn: LedgerConnection) -> Iterator[None]:
    """One transaction holding the engine's write lock (SQLite's ``BEGIN IMMEDIATE``, an
    advisory lock in PostgreSQL): committed when the block ends, rolled back if it raises."""
    conn.begin_write()
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _version(conn: LedgerConnection) -> int | None:
    """The file's schema version; None for a file without the schema."""
    if not conn.table_exists("schema_version"):
        return None
    rows = conn.execute("SELECT version FROM schema_version").fetchall()
    return int(rows[0][0]) if len(rows) == 1 else -1


def _create_or_check_schema(conn: LedgerConnection, *, migrate: bool) -> int:
    version = _version(conn)
    if version is None:
        for statement in (*(conn.ddl(t) for t in _SCHEMA), *_v3_statements(conn)):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        conn.executemany(
            "INSERT INTO accounts (account, kind, site) VALUES (?, ?, NULL)",
            [(COMMUNITY, "community"), (UTILITY, "utility")],
        )
        return SCHEMA_VERSION
    if version in (1, 2):
        if not migrate:
            return version  # a subset of the current version for every read
        if version == 1:
            _migrate_1_to_2(conn)
        _migrate_2_to_3(conn)
        return SCHEMA_VERSION
    if version != SCHEMA_VERSION:
        found = [r[0] for r in conn.execute("SELECT version FROM schema_version")]
        raise SchemaVersionError(f"ledger schema version {found}, this code reads {SCHEMA_VERSION}")
    return SCHEMA_VERSION


def _v3_statements(conn: LedgerConnection) -> tuple[str, ...]:
    """Version 3's statements on top of version 2 in the engine's dialect, triggers last."""
    return (
        *(conn.ddl(t) for t in _V3_SCHEMA),
        *(s for table in _APPEND_ONLY_TABLES for s in conn.append_only(table)),
    )


def _migrate_1_to_2(conn: LedgerConnection) -> None:
    """Version 2 allows ``rebate`` postings (``postings`` rebuilt with the wider check) and
    records each interval's ``rebate_rule``.

    SQLite cannot alter a CHECK constraint, so (its documented procedure, inside the caller's
    transaction with foreign keys off): create the new table, copy every row, drop the old one,
    rename, recreate the index, then verify the foreign keys before the caller commits.
    """
    conn.execute(conn.ddl(_POSTINGS_TABLE, name="postings_v2"))
    conn.execute("INSERT INTO postings_v2 SELECT * FROM postings")
    conn.execute("DROP TABLE postings")
    conn.execute("ALTER TABLE postings_v2 RENAME TO postings")
    conn.execute(_POSTINGS_INDEX)
    conn.execute(
        "ALTER TABLE intervals ADD COLUMN rebate_rule TEXT NOT NULL DEFAULT 'none' "
        "CHECK (rebate_rule IN ('none', 'traded_energy'))"
    )
    broken = conn.execute("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise LedgerStorageError(f"migrating the ledger to version 2 broke references: {broken}")
    conn.execute("UPDATE schema_version SET version = 2")


def _migrate_2_to_3(conn: LedgerConnection) -> None:
    """Version 3 adds the durable clearings, corrections (postings gain their ``revision``, 0
    for every posting of a settlement), each estimated site's reason and the audit log. Only
    columns and tables are added: every existing row stays as it is."""
    for statement in _v3_statements(conn):
        conn.execute(statement)
    broken = conn.execute("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise LedgerStorageError(f"migrating the ledger to version 3 broke references: {broken}")
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))


def _check_interval(interval: object) -> None:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
        raise LedgerInputError(f"interval must be an int >= 0, got {interval!r}")


def _check_rebate(rebate: object) -> None:
    if rebate not in _REBATE_RULES:
        raise LedgerInputError(f"rebate must be one of {', '.join(_REBATE_RULES)}")


def _check_ts(ts: float, name: str) -> float:
    value = float(ts)
    if not math.isfinite(value) or value < 0:
        raise LedgerInputError(f"{name} must be a finite time in s since the epoch, got {ts!r}")
    return value


def _check_text(text: object, name: str, *, max_len: int = _MAX_TEXT_LEN) -> str:
    if not isinstance(text, str) or not text.strip() or len(text) > max_len:
        raise LedgerInputError(
            f"{name} must be a non-empty string of at most {max_len} characters, got {text!r}"
        )
    return text


def _check_site_ids(sites: Iterable[object]) -> None:
    for site in sites:
        if not isinstance(site, str) or not site or len(site) > _MAX_SITE_ID_LEN:
            raise LedgerInputError(
                f"site ids must be non-empty strings of at most {_MAX_SITE_ID_LEN} characters, "
                f"got {site!r}"
            )


def _prices(clearing: float, retail: float, feed_in: float, premium: float) -> _Prices:
    """Validated prices rounded to micro-currency per kWh (the premium must be >= 0)."""
    prices = _Prices(
        clearing=_to_micro_per_kwh(clearing, "clearing_price_per_kwh"),
        retail=_to_micro_per_kwh(retail, "retail_price_per_kwh"),
        feed_in=_to_micro_per_kwh(feed_in, "feed_in_price_per_kwh"),
        premium=_to_micro_per_kwh(premium, "imbalance_premium_per_kwh"),
    )
    if prices.premium < 0:
        raise LedgerInputError("imbalance_premium_per_kwh must be >= 0")
    return prices


def _clearing_difference(
    stored: ClearedInterval, prices: _Prices, rebate: str, awards_wh: Mapping[str, int] | None
) -> str | None:
    """The first input (its argument's name) that differs from a recorded clearing, or None.

    ``awards_wh`` None skips the awards; otherwise awards of zero are compared as absent
    (a site awarded nothing settles the same either way).
    """
    pairs = (
        ("clearing_price_per_kwh", stored.clearing_price_micro_per_kwh, prices.clearing),
        ("retail_price_per_kwh", stored.retail_price_micro_per_kwh, prices.retail),
        ("feed_in_price_per_kwh", stored.feed_in_price_micro_per_kwh, prices.feed_in),
        ("imbalance_premium_per_kwh", stored.imbalance_premium_micro_per_kwh, prices.premium),
        ("rebate", stored.rebate_rule, rebate),
    )
    for name, old, new in pairs:
        if old != new:
            return name
    if awards_wh is not None:
        nonzero = {s: wh for s, wh in stored.awards_wh.items() if wh}
        if nonzero != {s: wh for s, wh in awards_wh.items() if wh}:
            return "awards_kwh"
    return None


def _check_agrees_with_clearing(
    cleared: ClearedInterval, prices: _Prices, rebate: str, sites: tuple[_SiteInput, ...]
) -> None:
    differs = _clearing_difference(cleared, prices, rebate, {s.site: s.award_wh for s in sites})
    if differs:
        raise LedgerInputError(
            f"{differs} disagrees with the clearing recorded for interval {cleared.interval}; "
            "settle it with settle_cleared"
        )


_KIND_ORDER: Final = {"trade": 0, "imbalance": 1, "utility": 2, "rebate": 3}


def _posting_order(key: tuple[str, str]) -> tuple[int, str]:
    """Corrections are written in the order a settlement writes its postings' kinds."""
    kind, party = key
    return _KIND_ORDER[kind], party


def _correction_detail(c: Correction) -> dict[str, object]:
    """The audit row's detail of a correction."""
    return {
        "interval": c.interval,
        "revision": c.revision,
        "reason": c.reason,
        "sites": {
            s.site: {
                "old_metered_wh": s.old_metered_wh,
                "new_metered_wh": s.new_metered_wh,
                "old_estimated": s.old_estimated,
                "new_estimated": s.new_estimated,
                "delta_micro": s.delta_micro,
            }
            for s in c.sites
        },
        "utility_delta_micro": c.utility_delta_micro,
        "community_delta_micro": c.community_delta_micro,
    }


def _site_inputs(
    interval: int,
    awards_kwh: Mapping[str, float],
    metered_kwh: Mapping[str, float],
    *,
    estimate_missing: bool,
) -> tuple[_SiteInput, ...]:
    """Validate and round the per-site inputs; one row per site in either mapping, sorted."""
    _check_site_ids((*awards_kwh, *metered_kwh))
    awards = {s: _to_wh(q, f"awards_kwh[{s!r}]") for s, q in awards_kwh.items()}
    metered = {s: _to_wh(q, f"metered_kwh[{s!r}]") for s, q in metered_kwh.items()}
    missing = tuple(sorted(s for s in awards if s not in metered))
    if missing and not estimate_missing:
        raise IncompleteMetering(interval, missing)
    return tuple(
        _SiteInput(
            site=s,
            award_wh=awards.get(s, 0),
            metered_wh=metered.get(s, awards.get(s, 0)),
            estimated=s not in metered,
        )
        for s in sorted(awards.keys() | metered.keys())
    )
