"""Tests for coordinator.ledger: hand-checked settlements, properties (balance, deviation costs
more) and idempotency on both engines (real SQLite files and a real PostgreSQL server, through
the ``ledger_store`` fixture); opening, migrating and a settlement killed mid-transaction on
SQLite files."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.ledger import (
    COMMUNITY,
    MICRO,
    UTILITY,
    IncompleteMetering,
    Ledger,
    LedgerInputError,
    RebateRule,
    SchemaVersionError,
    SettlementConflict,
    SettlementResult,
    UnknownAccount,
    site_account,
    to_currency,
)
from tests.pg_fixtures import LedgerStore

RETAIL = 0.30
FEED_IN = 0.05
PREMIUM = 0.02

PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _settle(
    ledger: Ledger,
    interval: int,
    awards: Mapping[str, float],
    metered: Mapping[str, float],
    *,
    clearing: float = 0.20,
    retail: float = RETAIL,
    feed_in: float = FEED_IN,
    premium: float = PREMIUM,
    estimate_missing: bool = False,
    rebate: RebateRule = "none",
) -> SettlementResult:
    return ledger.settle_interval(
        interval,
        clearing_price_per_kwh=clearing,
        retail_price_per_kwh=retail,
        feed_in_price_per_kwh=feed_in,
        awards_kwh=awards,
        metered_kwh=metered,
        imbalance_premium_per_kwh=premium,
        estimate_missing=estimate_missing,
        rebate=rebate,
    )


def _row_counts(store: LedgerStore, location: str | Path) -> dict[str, int]:
    return {
        table: store.count(location, table)
        for table in ("accounts", "intervals", "site_intervals", "postings", "entries")
    }


def _interval_sum(result: SettlementResult) -> int:
    return result.community_micro + result.utility_micro + sum(s.total_micro for s in result.sites)


# --- opening ----------------------------------------------------------------------------


def test_open_creates_schema_in_wal_with_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        conn = ledger._conn
        assert conn is not None
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert ledger.accounts() == (COMMUNITY, UTILITY)
        assert ledger.balance(COMMUNITY) == 0
        assert ledger.check_balanced()
    assert ledger.closed
    # Reopening an existing file checks the version and keeps the data.
    with Ledger(path) as again:
        assert again.accounts() == (COMMUNITY, UTILITY)


def test_open_refuses_another_schema_version(ledger_store: LedgerStore) -> None:
    path = ledger_store.location()
    Ledger(path).close()
    ledger_store.execute(path, "UPDATE schema_version SET version = 99")
    with pytest.raises(SchemaVersionError, match="99"):
        Ledger(path)


_V3_OBJECTS = (
    ("VIEW", "site_metering"),
    *(
        ("TRIGGER", f"{table}_no_{verb}")
        for table in ("audit", "clearings", "clearing_awards", "revisions", "corrections")
        for verb in ("update", "delete")
    ),
    ("TABLE", "corrections"),
    ("TABLE", "revisions"),
    ("TABLE", "clearing_awards"),
    ("TABLE", "clearings"),
    ("TABLE", "audit"),
)


def _downgrade_to_version_2(path: Path) -> None:
    """Turn a ledger file (without clearings or corrections) into what version 2 wrote: no
    clearings, corrections, audit log or estimate reasons, postings without a revision."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        for kind, name in _V3_OBJECTS:
            conn.execute(f"DROP {kind} {name}")
        conn.execute("ALTER TABLE postings DROP COLUMN revision")
        conn.execute("ALTER TABLE site_intervals DROP COLUMN estimate_reason")
        conn.execute("UPDATE schema_version SET version = 2")
        conn.execute("COMMIT")
    finally:
        conn.close()


def _downgrade_to_version_1(path: Path) -> None:
    """Turn a ledger file into what version 1 wrote: ``postings`` without the rebate kind,
    ``intervals`` without the rebate rule."""
    _downgrade_to_version_2(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.execute(
            """CREATE TABLE postings_old (
            posting_id INTEGER PRIMARY KEY,
            interval INTEGER NOT NULL REFERENCES intervals (interval),
            kind TEXT NOT NULL CHECK (kind IN ('trade', 'imbalance', 'utility')),
            site TEXT REFERENCES accounts (site),
            energy_wh INTEGER NOT NULL,
            price_micro_per_kwh INTEGER NOT NULL,
            CHECK ((kind = 'utility') = (site IS NULL))
            ) STRICT"""
        )
        conn.execute("INSERT INTO postings_old SELECT * FROM postings")
        conn.execute("DROP TABLE postings")
        conn.execute("ALTER TABLE postings_old RENAME TO postings")
        conn.execute("CREATE INDEX postings_interval ON postings (interval)")
        conn.execute("ALTER TABLE intervals DROP COLUMN rebate_rule")
        conn.execute("UPDATE schema_version SET version = 1")
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_opening_a_version_1_ledger_migrates_it_and_keeps_every_entry(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        first = _settle(ledger, 7, {"buyer": 5.0, "seller": -5.0}, {"buyer": 6.0, "seller": -5.5})
        entries = ledger.interval_entries(7)
    _downgrade_to_version_1(path)
    with sqlite3.connect(path) as conn:  # a version 1 file refuses rebate postings
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(
                "INSERT INTO postings (interval, kind, site, energy_wh, price_micro_per_kwh) "
                "VALUES (7, 'rebate', 'buyer', 1, 1)"
            )
    # A reader leaves it as it is: it reads the same, settling into it is refused.
    with Ledger(path, migrate=False) as reader:
        assert reader.schema_version == 1
        assert reader.settlement(7) == first
        assert reader.site_report("buyer").rebate_micro == 0
        with pytest.raises(SchemaVersionError, match="migrate"):
            _settle(reader, 8, {"buyer": 1.0}, {"buyer": 1.0})
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    backup = tmp_path / "ledger.db.v1.bak"
    assert not backup.exists()
    with Ledger(path) as ledger:
        assert ledger.schema_version == 3
        assert ledger.settlement(7) == first  # rebate_rule 'none', as it was settled
        assert ledger.interval_entries(7) == entries
        assert ledger.check_balanced()
        result = _settle(ledger, 8, {"buyer": 5.0, "seller": -5.0},
                         {"buyer": 6.0, "seller": -5.5}, rebate="traded_energy")  # fmt: skip
        assert result.site("buyer").rebate_micro > 0
        assert result.rebate_rule == "traded_energy"
        assert ledger.check_balanced()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(3,)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        targets = {row[2] for row in conn.execute("PRAGMA foreign_key_list(entries)")}
        assert targets == {"postings", "intervals", "accounts"}
    finally:
        conn.close()
    # The file as it was before the migration was kept beside it.
    with Ledger(backup, migrate=False) as old:
        assert old.schema_version == 1
        assert old.settlement(7) == first
        assert old.settled_intervals() == (7,)


# --- hand-checked settlement ------------------------------------------------------------


def test_two_site_interval_hand_checked(ledger_store: LedgerStore) -> None:
    # Clearing 0.20, retail 0.30, feed-in 0.05, premium 0.02. The feeder meters 6 - 5.5 =
    # 0.5 kWh imported, so a kWh more or less is worth retail (0.30) to the community:
    # imbalance buy = max(0.20, 0.30) + 0.02 = 0.32, sell = min(0.20, 0.30) - 0.02 = 0.18.
    # buyer: awarded 5 kWh, metered 6 -> pays 5*0.20 = 1.00 and 1*0.32 = 0.32.
    # seller: awarded -5 kWh, metered -5.5 -> paid 5*0.20 = 1.00 and 0.5*0.18 = 0.09.
    # The community pays the utility 0.5*0.30 = 0.15 and keeps
    # 1.00 + 0.32 - 1.00 - 0.09 - 0.15 = 0.08 (the premium on 1.5 kWh of deviation, 0.03, and
    # the seller's extra 0.5 kWh bought at 0.18 that saved 0.30 at retail, 0.06... less the
    # buyer's extra kWh that cost 0.30 at retail but paid 0.32: 0.02 + 0.06 = 0.08).
    with Ledger(ledger_store.location()) as ledger:
        result = _settle(ledger, 7, {"buyer": 5.0, "seller": -5.0}, {"buyer": 6.0, "seller": -5.5})
        assert result.interval == 7
        assert result.clearing_price_micro_per_kwh == 200_000
        assert result.imbalance_buy_price_micro_per_kwh == 320_000
        assert result.imbalance_sell_price_micro_per_kwh == 180_000
        assert result.community_net_wh == 500
        buyer, seller = result.site("buyer"), result.site("seller")
        assert (buyer.award_wh, buyer.metered_wh, buyer.deviation_wh) == (5000, 6000, 1000)
        assert (buyer.trade_micro, buyer.imbalance_micro) == (-1_000_000, -320_000)
        assert (seller.award_wh, seller.metered_wh, seller.deviation_wh) == (-5000, -5500, -500)
        assert (seller.trade_micro, seller.imbalance_micro) == (1_000_000, 90_000)
        assert result.utility_micro == 150_000
        assert result.community_micro == 80_000
        assert _interval_sum(result) == 0

        assert ledger.balance(site_account("buyer")) == -1_320_000
        assert ledger.balance(site_account("seller")) == 1_090_000
        assert ledger.balance(UTILITY) == 150_000
        assert ledger.balance(COMMUNITY) == 80_000
        assert to_currency(ledger.balance(COMMUNITY)) == Decimal("0.08")
        assert ledger.check_balanced()

        entries = ledger.interval_entries(7)
        # trade + imbalance per site, then the utility leg: 5 postings, 2 entries each.
        assert [(e.kind, e.account, e.amount_micro) for e in entries] == [
            ("trade", "site:buyer", -1_000_000),
            ("trade", COMMUNITY, 1_000_000),
            ("imbalance", "site:buyer", -320_000),
            ("imbalance", COMMUNITY, 320_000),
            ("trade", "site:seller", 1_000_000),
            ("trade", COMMUNITY, -1_000_000),
            ("imbalance", "site:seller", 90_000),
            ("imbalance", COMMUNITY, -90_000),
            ("utility", UTILITY, 150_000),
            ("utility", COMMUNITY, -150_000),
        ]
        assert len({e.posting_id for e in entries}) == 5
        assert sum(e.amount_micro for e in entries) == 0
        assert ledger.interval_entries(8) == ()


def test_imbalance_prices_follow_the_feeders_position(ledger_store: LedgerStore) -> None:
    # The community exports (the utility is the marginal buyer: clearing = feed-in 0.05), so a
    # kWh more or less at the feeder is worth feed-in, not retail:
    # buy = max(0.05, 0.05) + 0.02 = 0.07, sell = min(0.05, 0.05) - 0.02 = 0.03.
    # buyer: awarded 5, metered 6 -> pays 0.25 + 1*0.07; seller: awarded -8, metered -8.5 ->
    # paid 0.40 + 0.5*0.03. Feeder: 6 - 8.5 = -2.5 kWh -> the utility pays 0.125.
    # Community: 0.25 + 0.07 - 0.40 - 0.015 + 0.125 = 0.03, the premium on 1.5 kWh.
    with Ledger(ledger_store.location()) as ledger:
        result = _settle(ledger, 1, {"buyer": 5.0, "seller": -8.0},
                         {"buyer": 6.0, "seller": -8.5}, clearing=FEED_IN)  # fmt: skip
        assert result.community_net_wh == -2500
        assert result.imbalance_buy_price_micro_per_kwh == 70_000
        assert result.imbalance_sell_price_micro_per_kwh == 30_000
        assert result.site("buyer").imbalance_micro == -70_000
        assert result.site("seller").imbalance_micro == 15_000
        assert result.utility_micro == -125_000
        assert result.community_micro == 30_000
        assert _interval_sum(result) == 0


def test_rebate_pays_the_community_surplus_back_pro_rata(ledger_store: LedgerStore) -> None:
    # As in the hand-checked interval above, the community keeps 0.08 (80,000 micro) before
    # rebates. The sites were awarded 5 + 5 = 10 kWh: rate 80,000 * 1000 / 10,000 = 8,000
    # micro per kWh; each gets 5000 * 8000 / 1000 = 40,000 (what they metered does not count:
    # deviating does not buy a larger share); the community keeps nothing.
    with Ledger(ledger_store.location()) as ledger:
        result = _settle(ledger, 7, {"buyer": 5.0, "seller": -5.0},
                         {"buyer": 6.0, "seller": -5.5}, rebate="traded_energy")  # fmt: skip
        buyer, seller = result.site("buyer"), result.site("seller")
        assert result.rebate_rule == "traded_energy"
        assert (buyer.rebate_micro, seller.rebate_micro) == (40_000, 40_000)
        assert result.community_micro == 0
        assert buyer.total_micro == -1_320_000 + 40_000
        assert _interval_sum(result) == 0
        rebates = [e for e in ledger.interval_entries(7) if e.kind == "rebate"]
        assert [
            (e.account, e.amount_micro, e.energy_wh, e.price_micro_per_kwh) for e in rebates
        ] == [
            ("site:buyer", 40_000, 5000, 8000),
            (COMMUNITY, -40_000, 5000, 8000),
            ("site:seller", 40_000, 5000, 8000),
            (COMMUNITY, -40_000, 5000, 8000),
        ]
        report = ledger.site_report("buyer")
        assert report.rebate_micro == 40_000
        assert report.net_cost_micro == 1_320_000 - 40_000
        assert ledger.check_balanced()
        # A deviating site still pays more than if it had kept its award: the buyer's extra
        # kWh cost it 0.32 and came back only as its share of the surplus.
        assert -buyer.imbalance_micro - buyer.rebate_micro > 0


def test_rebate_pays_nothing_back_from_a_loss(ledger_store: LedgerStore) -> None:
    with Ledger(ledger_store.location()) as ledger:
        # The export interval of test_utility_pays_feed_in_for_net_export: the community
        # loses 0.21 there, so there is nothing to pay back.
        result = _settle(ledger, 1, {"a": -4.0, "b": 1.0}, {"a": -4.0, "b": 1.0},
                         clearing=0.12, rebate="traded_energy")  # fmt: skip
        assert result.community_micro == -210_000
        assert all(s.rebate_micro == 0 for s in result.sites)
        with pytest.raises(LedgerInputError, match="rebate"):
            _settle(ledger, 2, {}, {"a": 1.0}, rebate="everything")  # type: ignore[arg-type]
        assert not ledger.is_settled(2)


def test_utility_pays_feed_in_for_net_export(ledger_store: LedgerStore) -> None:
    # Both sites export more than they import: the utility buys 3 kWh at 0.05 = 0.15.
    with Ledger(ledger_store.location()) as ledger:
        result = _settle(ledger, 1, {"a": -4.0, "b": 1.0}, {"a": -4.0, "b": 1.0}, clearing=0.12)
        assert result.community_net_wh == -3000
        assert result.utility_micro == -150_000
        # a is paid 0.48, b pays 0.12; the community nets 0.12 - 0.48 + 0.15 = -0.21.
        assert result.community_micro == -210_000
        assert _interval_sum(result) == 0
        assert ledger.check_balanced()


def test_rounding_never_favours_the_site(ledger_store: LedgerStore) -> None:
    # 1 Wh at 0.123457/kWh is worth 123.457 micro: the buyer pays 124, the seller gets 123,
    # the community keeps the fractions; the feeder is balanced so the utility gets nothing.
    with Ledger(ledger_store.location()) as ledger:
        result = _settle(ledger, 1, {"b": 0.001, "s": -0.001}, {"b": 0.001, "s": -0.001},
                         clearing=0.123457)  # fmt: skip
        assert result.site("b").trade_micro == -124
        assert result.site("s").trade_micro == 123
        assert result.utility_micro == 0
        assert result.community_micro == 1
        # Energy rounds to the nearest Wh, prices to the nearest micro per kWh (half to even).
        result = _settle(ledger, 2, {"x": 0.0015}, {"x": 0.0025}, clearing=0.1234565)
        assert result.site("x").award_wh == 2
        assert result.site("x").metered_wh == 2
        assert result.clearing_price_micro_per_kwh == 123_456


def test_missing_sites_and_metering(ledger_store: LedgerStore) -> None:
    path = ledger_store.location()
    with Ledger(path) as ledger:
        before = _row_counts(ledger_store, path)
        # An awarded site without metering: refused, nothing written, settle later.
        with pytest.raises(IncompleteMetering) as info:
            _settle(ledger, 3, {"a": 1.0, "b": -1.0}, {"a": 1.0})
        assert info.value.sites == ("b",)
        assert _row_counts(ledger_store, path) == before
        assert not ledger.is_settled(3)
        # A metered site without an award has award 0; all its energy is imbalance.
        result = _settle(ledger, 3, {"a": 1.0}, {"a": 1.0, "c": 2.0})
        assert result.site("c").award_wh == 0
        assert result.site("c").imbalance_micro == -2 * 320_000
        # Estimating: the missing site settles as metered = award, flagged, no imbalance.
        result = _settle(ledger, 4, {"a": 1.0, "b": -1.0}, {"a": 1.0}, estimate_missing=True)
        b = result.site("b")
        assert b.estimated
        assert (b.metered_wh, b.imbalance_micro) == (-1000, 0)
        assert not result.site("a").estimated
        assert ledger.site_report("b").estimated_intervals == 1
        assert ledger.check_balanced()


def test_rejects_bad_inputs_without_writing(ledger_store: LedgerStore) -> None:
    path = ledger_store.location()
    with Ledger(path) as ledger:
        before = _row_counts(ledger_store, path)
        with pytest.raises(LedgerInputError, match="clearing_price_per_kwh"):
            _settle(ledger, 1, {"a": 1.0}, {"a": 1.0}, clearing=float("nan"))
        with pytest.raises(LedgerInputError, match="metered_kwh"):
            _settle(ledger, 1, {"a": 1.0}, {"a": float("inf")})
        with pytest.raises(LedgerInputError, match="premium"):
            _settle(ledger, 1, {"a": 1.0}, {"a": 1.0}, premium=-0.01)
        with pytest.raises(LedgerInputError, match="interval"):
            _settle(ledger, -1, {"a": 1.0}, {"a": 1.0})
        with pytest.raises(LedgerInputError, match="site ids"):
            _settle(ledger, 1, {"": 1.0}, {"": 1.0})
        with pytest.raises(UnknownAccount):
            ledger.balance("site:nobody")
        with pytest.raises(UnknownAccount):
            ledger.site_report("nobody")
        assert _row_counts(ledger_store, path) == before


# --- idempotency ----------------------------------------------------------------------


def test_resettling_returns_the_stored_result_and_writes_nothing(ledger_store: LedgerStore) -> None:
    path = ledger_store.location()
    awards = {"buyer": 5.0, "seller": -5.0}
    metered = {"buyer": 6.0, "seller": -5.5}
    with Ledger(path) as ledger:
        first = _settle(ledger, 7, awards, metered)
        counts = _row_counts(ledger_store, path)
        balances = {a: ledger.balance(a) for a in ledger.accounts()}
        # Same inputs (in another order, and as values that round to the same Wh): same result.
        again = _settle(ledger, 7, {**awards, "buyer": 5.0002}, dict(reversed(metered.items())))
        assert again == first
        assert ledger.settlement(7) == first
        assert _row_counts(ledger_store, path) == counts
        # Different inputs: refused with the stored result attached; still nothing written.
        with pytest.raises(SettlementConflict) as info:
            _settle(ledger, 7, awards, {"buyer": 6.5, "seller": -5.5})
        assert info.value.stored == first
        with pytest.raises(SettlementConflict):
            _settle(ledger, 7, awards, metered, clearing=0.21)
        assert _row_counts(ledger_store, path) == counts
        assert {a: ledger.balance(a) for a in ledger.accounts()} == balances
    # And across a reopen.
    with Ledger(path) as ledger:
        assert _settle(ledger, 7, awards, metered) == first
        assert _row_counts(ledger_store, path) == counts


# --- report and savings ---------------------------------------------------------------


def test_site_report_and_savings_against_the_baseline(ledger_store: LedgerStore) -> None:
    with Ledger(ledger_store.location()) as ledger:
        # Interval 1: the hand-checked one above.
        _settle(ledger, 1, {"buyer": 5.0, "seller": -5.0}, {"buyer": 6.0, "seller": -5.5})
        # Interval 2: clearing 0.25; buyer unawarded imports 2 kWh at imbalance buy 0.32
        # (0.64, dearer than the 0.60 it would pay the utility); seller sells 1 kWh as awarded.
        _settle(ledger, 2, {"seller": -1.0}, {"buyer": 2.0, "seller": -1.0}, clearing=0.25)

        buyer = ledger.site_report("buyer")
        assert buyer.intervals == 2
        assert (buyer.bought_wh, buyer.sold_wh) == (5000, 0)
        assert (buyer.metered_import_wh, buyer.metered_export_wh) == (8000, 0)
        assert (buyer.paid_micro, buyer.received_micro) == (1_000_000, 0)
        assert buyer.imbalance_cost_micro == 320_000 + 640_000
        assert buyer.net_cost_micro == 1_960_000 == -ledger.balance("site:buyer")
        # Alone: 6 kWh and 2 kWh at retail 0.30 = 2.40; saved 0.44.
        assert buyer.baseline_cost_micro == ledger.baseline_cost("buyer") == 2_400_000
        assert buyer.savings_micro == ledger.savings("buyer") == 440_000

        seller = ledger.site_report("seller")
        assert (seller.bought_wh, seller.sold_wh) == (0, 6000)
        assert (seller.metered_import_wh, seller.metered_export_wh) == (0, 6500)
        assert (seller.paid_micro, seller.received_micro) == (0, 1_250_000)
        assert seller.imbalance_cost_micro == -90_000
        assert seller.net_cost_micro == -1_340_000 == -ledger.balance("site:seller")
        # Alone: 6.5 kWh exported at feed-in 0.05 = paid 0.325; it got 1.34 instead.
        assert seller.baseline_cost_micro == -325_000
        assert seller.savings_micro == 1_015_000

        # Community: 0.08 in interval 1; 0.64 - 0.25 - 0.30 = 0.09 in interval 2.
        assert ledger.balance(COMMUNITY) == 170_000
        assert ledger.balance(UTILITY) == 150_000 + 300_000
        assert ledger.check_balanced()


# --- properties -----------------------------------------------------------------------

_SITES = ("a", "b", "c", "d")
_energy = st.floats(min_value=-50.0, max_value=50.0, allow_nan=False).map(lambda x: round(x, 4))
_price = st.floats(min_value=-0.5, max_value=1.5, allow_nan=False)


@st.composite
def _interval_inputs(draw: st.DrawFn) -> dict[str, Any]:
    awarded = draw(st.lists(st.sampled_from(_SITES), unique=True))
    metered_sites = draw(st.lists(st.sampled_from(_SITES), unique=True))
    estimate = draw(st.booleans())
    if not estimate:
        metered_sites = sorted(set(metered_sites) | set(awarded))
    return {
        "awards": {s: draw(_energy) for s in awarded},
        "metered": {s: draw(_energy) for s in metered_sites},
        "clearing": draw(_price),
        "retail": draw(_price),
        "feed_in": draw(_price),
        "premium": draw(st.floats(min_value=0.0, max_value=0.3)),
        "estimate_missing": estimate,
    }


@PROPERTY_SETTINGS
@given(
    steps=st.lists(
        st.tuples(st.integers(min_value=0, max_value=6), _interval_inputs(), st.booleans()),
        min_size=1,
        max_size=8,
    )
)
def test_ledger_always_balances(
    ledger_store: LedgerStore,
    steps: list[tuple[int, dict[str, Any], bool]],
) -> None:
    path = ledger_store.fresh("balance")
    settled: dict[int, SettlementResult] = {}
    with Ledger(path) as ledger:
        for interval, step, repeat in steps:
            kwargs = {k: v for k, v in step.items() if k not in {"awards", "metered"}}
            conflict: SettlementConflict | None = None
            try:
                result = _settle(ledger, interval, step["awards"], step["metered"], **kwargs)
            except SettlementConflict as err:
                conflict = err
            if conflict is not None:
                assert conflict.stored == settled[interval]
                continue
            if interval in settled:
                assert result == settled[interval]
            settled[interval] = result
            if repeat:  # the same call again changes nothing
                counts = _row_counts(ledger_store, path)
                assert (
                    _settle(ledger, interval, step["awards"], step["metered"], **kwargs) == result
                )
                assert _row_counts(ledger_store, path) == counts
            assert _interval_sum(result) == 0
            # Each site amount is its exact value rounded down (never in the site's favour).
            for s in result.sites:
                exact = Fraction(-s.award_wh * result.clearing_price_micro_per_kwh, 1000)
                assert exact - 1 < s.trade_micro <= exact
            assert ledger.check_balanced()
        assert sum(ledger.balance(a) for a in ledger.accounts()) == 0
        for site in {s.site for r in settled.values() for s in r.sites}:
            expected = sum(
                s.total_micro for r in settled.values() for s in r.sites if s.site == site
            )
            assert ledger.balance(site_account(site)) == expected
            report = ledger.site_report(site)
            assert report.net_cost_micro == -expected
            assert report.savings_micro == report.baseline_cost_micro - report.net_cost_micro
        assert ledger.balance(UTILITY) == sum(r.utility_micro for r in settled.values())
        assert ledger.balance(COMMUNITY) == sum(r.community_micro for r in settled.values())
        assert ledger.settled_intervals() == tuple(sorted(settled))


@PROPERTY_SETTINGS
@given(award=_energy, metered=_energy, clearing=_price, retail=_price, feed_in=_price,
       premium=st.floats(min_value=0.0, max_value=0.3))  # fmt: skip
def test_deviation_costs_at_least_as_much_as_being_awarded_it(
    ledger_store: LedgerStore,
    award: float,
    metered: float,
    clearing: float,
    retail: float,
    feed_in: float,
    premium: float,
) -> None:
    # The same site and meter reading, once awarded `award` and once awarded what it metered.
    path = ledger_store.fresh("deviation")
    with Ledger(path) as ledger:
        first = _settle(ledger, 1, {"s": award}, {"s": metered}, clearing=clearing,
                        retail=retail, feed_in=feed_in, premium=premium)  # fmt: skip
        second = _settle(ledger, 2, {"s": metered}, {"s": metered}, clearing=clearing,
                         retail=retail, feed_in=feed_in, premium=premium)  # fmt: skip
    deviating, keeping = first.site("s"), second.site("s")
    assert keeping.imbalance_micro == 0
    extra_cost = keeping.total_micro - deviating.total_micro
    premium_micro = first.imbalance_premium_micro_per_kwh
    assert extra_cost >= abs(deviating.deviation_wh) * premium_micro // 1000 >= 0


@st.composite
def _consistent_interval(draw: st.DrawFn) -> dict[str, Any]:
    """Awards and a clearing price the market could produce (the utility, offering at retail
    and bidding at feed-in, is marginal on its side), and any metering. Energies in whole Wh
    and prices in whole micro-currency, so the ledger's rounding does not move them."""
    n = draw(st.integers(min_value=1, max_value=6))
    wh = st.integers(min_value=-40_000, max_value=40_000)
    awards = [draw(wh) for _ in range(n)]
    metered = [draw(wh) for _ in range(n)]
    micro = st.integers(min_value=-200_000, max_value=800_000)
    feed_in = draw(micro)
    retail = feed_in + draw(st.integers(min_value=1, max_value=500_000))
    utility_sells = sum(awards)
    if utility_sells > 0:  # the utility supplies: the price is retail, or above with congestion
        clearing = retail + draw(st.integers(min_value=0, max_value=300_000))
    elif utility_sells < 0:  # it buys the surplus: feed-in, or below with export congestion
        clearing = feed_in - draw(st.integers(min_value=0, max_value=300_000))
    else:
        clearing = draw(st.integers(min_value=feed_in, max_value=retail))
    return {
        "awards": {f"s{i}": a / 1000 for i, a in enumerate(awards)},
        "metered": {f"s{i}": m / 1000 for i, m in enumerate(metered)},
        "clearing": clearing / 1e6,
        "retail": retail / 1e6,
        "feed_in": feed_in / 1e6,
        "premium": draw(st.integers(min_value=0, max_value=100_000)) / 1e6,
    }


@PROPERTY_SETTINGS
@given(case=_consistent_interval())
def test_community_never_loses_on_deviations_and_rebates_its_surplus(
    ledger_store: LedgerStore, case: dict[str, Any]
) -> None:
    # Whatever the sites meter, a consistent clearing leaves the community account >= 0:
    # every deviation pays at least what it costs at the feeder. With the rebate, the sites
    # get that surplus back, except for less than a micro-currency per site and per kWh moved.
    path = ledger_store.fresh("surplus")
    kwargs = {k: case[k] for k in ("clearing", "retail", "feed_in", "premium")}
    with Ledger(path) as ledger:
        kept = _settle(ledger, 1, case["awards"], case["metered"], **kwargs)
        result = _settle(ledger, 2, case["awards"], case["metered"], **kwargs,
                         rebate="traded_energy")  # fmt: skip
        assert ledger.check_balanced()
    assert kept.community_micro >= 0
    rebates = sum(s.rebate_micro for s in result.sites)
    assert all(s.rebate_micro >= 0 for s in result.sites)
    assert rebates + result.community_micro == kept.community_micro
    basis_wh = sum(abs(s.award_wh) for s in result.sites) or sum(
        abs(s.metered_wh) for s in result.sites
    )
    if basis_wh:
        assert 0 <= result.community_micro <= basis_wh / 1000 + len(result.sites)
    else:  # nobody traded or moved energy: nobody to pay back (only rounding was kept)
        assert rebates == 0
    for before, after in zip(kept.sites, result.sites, strict=True):
        assert after.total_micro - before.total_micro == after.rebate_micro


@PROPERTY_SETTINGS
@given(case=_consistent_interval(), metered=st.lists(_energy, min_size=6, max_size=6))
def test_rebate_shares_follow_the_awards_whatever_the_sites_meter(
    ledger_store: LedgerStore, case: dict[str, Any], metered: list[float]
) -> None:
    # The same awards and prices with two different sets of meter readings: each site's
    # rebate is the interval's surplus times its share of the awards, rounded down (within a
    # micro-currency per kWh of its award and one more), so a deviation never buys a larger
    # share of what the others paid in.
    path = ledger_store.fresh("rebate-shares")
    kwargs = {k: case[k] for k in ("clearing", "retail", "feed_in", "premium")}
    other = {site: metered[i] for i, site in enumerate(case["metered"])}
    with Ledger(path) as ledger:
        results = [
            _settle(ledger, i + 1, case["awards"], meters, **kwargs, rebate="traded_energy")
            for i, meters in enumerate((case["metered"], other))
        ]
    for result in results:
        awarded_wh = sum(abs(x.award_wh) for x in result.sites)
        surplus = result.community_micro + sum(x.rebate_micro for x in result.sites)
        if awarded_wh == 0 or surplus <= 0:
            continue
        for x in result.sites:
            exact = Fraction(surplus * abs(x.award_wh), awarded_wh)
            assert exact - Fraction(abs(x.award_wh), 1000) - 1 <= x.rebate_micro <= exact


# --- crash mid-settlement -------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from coordinator.ledger import Ledger

    path, kill_after, first, second = sys.argv[1], int(sys.argv[2]), *map(json.loads, sys.argv[3:])

    def wal_bytes():
        return os.path.getsize(path + "-wal")

    class Crashing(Ledger):
        written = 0

        def _write_posting(self, conn, interval, posting):
            super()._write_posting(conn, interval, posting)
            self.written += 1
            if self.written == kill_after:
                assert conn.in_transaction
                print("wal", wal_bytes(), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    with Ledger(path) as ledger:
        ledger.settle_interval(1, **first)
    with Crashing(path) as ledger:
        # A tiny page cache makes SQLite spill the uncommitted pages into the WAL file, so
        # the kill leaves uncommitted frames on disk for recovery to discard.
        ledger._conn.execute("PRAGMA cache_size=2")
        print("wal", wal_bytes(), flush=True)
        ledger.settle_interval(2, **second)
    print("not killed", flush=True)
    """
)


def _crash_inputs(n_sites: int, clearing: float) -> dict[str, Any]:
    awards = {f"site{i:03d}": (i % 7 - 3) * 1.5 for i in range(n_sites)}
    metered = {s: q + (0.25 if i % 2 else -0.4) for i, (s, q) in enumerate(awards.items())}
    return {
        "clearing_price_per_kwh": clearing,
        "retail_price_per_kwh": RETAIL,
        "feed_in_price_per_kwh": FEED_IN,
        "awards_kwh": awards,
        "metered_kwh": metered,
    }


def test_killed_settlement_leaves_no_partial_interval(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    first, second = _crash_inputs(5, 0.18), _crash_inputs(200, 0.22)
    # Reference: the same two intervals settled without a crash in another file.
    with Ledger(tmp_path / "reference.db") as reference:
        ref_first = reference.settle_interval(1, **first)
        ref_second = reference.settle_interval(2, **second)
        ref_postings = len(reference.interval_entries(2)) // 2
        ref_after_first = {
            a: sum(e.amount_micro for e in reference.interval_entries(1) if e.account == a)
            for a in reference.accounts()
        }
    kill_after = ref_postings // 2
    assert 0 < kill_after < ref_postings

    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(kill_after),
         json.dumps(first), json.dumps(second)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert child.returncode == -9, child.stderr
    assert "not killed" not in child.stdout
    wal_before, wal_at_kill = (int(line.split()[1]) for line in child.stdout.splitlines())
    assert wal_at_kill > wal_before  # uncommitted frames were on disk when it died

    with Ledger(path) as ledger:
        assert ledger.settled_intervals() == (1,)
        assert not ledger.is_settled(2)
        assert ledger.interval_entries(2) == ()
        conn = ledger._conn
        assert conn is not None
        for table in ("postings", "entries", "site_intervals"):
            n = conn.execute(f"SELECT COUNT(*) FROM {table} WHERE interval = 2").fetchone()[0]
            assert n == 0, table
        assert ledger.check_balanced()
        assert ledger.settlement(1) == ref_first
        for account in ledger.accounts():
            assert ledger.balance(account) == ref_after_first.get(account, 0)
        # Settling it again works and gives what an uninterrupted settlement gives.
        assert ledger.settle_interval(2, **second) == ref_second
        assert ledger.check_balanced()
        assert len(ledger.interval_entries(2)) == 2 * ref_postings


def test_amounts_are_micro_currency() -> None:
    assert MICRO == 1_000_000
    assert to_currency(-1_234_567) == Decimal("-1.234567")
