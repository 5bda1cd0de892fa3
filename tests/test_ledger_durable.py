"""Tests for the ledger's durable clearings, settlement from a clearing (roster, estimate
reasons), corrections and the append-only audit log, on both engines (real SQLite files and a
real PostgreSQL server, through the ``ledger_store`` fixture); migrations on SQLite files."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.ledger import (
    COMMUNITY,
    DEFAULT_ESTIMATE_REASON,
    SCHEMA_VERSION,
    UTILITY,
    ClearedInterval,
    ClearingConflict,
    Correction,
    EstimatedSite,
    Ledger,
    LedgerInputError,
    LedgerStorageError,
    RebateRule,
    SchemaVersionError,
    SettlementConflict,
    SettlementResult,
    site_account,
)
from tests.pg_fixtures import LedgerStore
from tests.test_ledger import _downgrade_to_version_1, _downgrade_to_version_2, _settle

RETAIL = 0.30
FEED_IN = 0.05
PREMIUM = 0.02
CLEARED_TS = 1_765_000_000.0

PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _record(
    ledger: Ledger,
    interval: int,
    awards: Mapping[str, float],
    *,
    clearing: float = 0.20,
    premium: float = PREMIUM,
    rebate: RebateRule = "none",
    cleared_ts: float = CLEARED_TS,
) -> ClearedInterval:
    return ledger.record_clearing(
        interval,
        clearing_price_per_kwh=clearing,
        retail_price_per_kwh=RETAIL,
        feed_in_price_per_kwh=FEED_IN,
        awards_kwh=awards,
        imbalance_premium_per_kwh=premium,
        rebate=rebate,
        cleared_ts=cleared_ts,
    )


def _account_totals(ledger: Ledger, interval: int) -> dict[str, int]:
    totals: dict[str, int] = {}
    for e in ledger.interval_entries(interval):
        totals[e.account] = totals.get(e.account, 0) + e.amount_micro
    return {a: v for a, v in totals.items() if v}


# --- durable clearings ----------------------------------------------------------------

_KILLED_AFTER_RECORDING = textwrap.dedent(
    """
    import os, signal, sys
    from coordinator.ledger import Ledger

    ledger = Ledger(sys.argv[1])
    ledger.record_clearing(
        41, clearing_price_per_kwh=0.2, retail_price_per_kwh=0.3, feed_in_price_per_kwh=0.05,
        awards_kwh={"buyer": 4.0, "seller": -4.0}, imbalance_premium_per_kwh=0.02,
        rebate="traded_energy", cleared_ts=1765000000.0,
    )
    print("recorded", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_clearing_recorded_by_a_killed_coordinator_is_found_unsettled(
    ledger_store: LedgerStore,
) -> None:
    path = ledger_store.location()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_RECORDING, str(path)],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout == "recorded\n"
    with Ledger(path) as ledger:
        (found,) = ledger.unsettled_clearings()
        assert found == ClearedInterval(
            interval=41,
            clearing_price_micro_per_kwh=200_000,
            retail_price_micro_per_kwh=300_000,
            feed_in_price_micro_per_kwh=50_000,
            imbalance_premium_micro_per_kwh=20_000,
            rebate_rule="traded_energy",
            awards_wh={"buyer": 4000, "seller": -4000},
            cleared_ts=1_765_000_000.0,
            settled=False,
        )
        assert found.awards_kwh == {"buyer": 4.0, "seller": -4.0}
        assert ledger.clearing(41) == found
        # The restarted coordinator settles it from the stored clearing.
        result = ledger.settle_cleared(41, metered_kwh={"buyer": 4.5, "seller": -4.0})
        assert result.rebate_rule == "traded_energy"
        assert result.site("buyer").award_wh == 4000
        assert result.site("buyer").imbalance_micro < 0
        assert ledger.unsettled_clearings() == ()
        cleared = ledger.clearing(41)
        assert cleared is not None and cleared.settled
        assert ledger.check_balanced()


def test_unsettled_clearings_come_oldest_first_and_leave_when_settled(
    ledger_store: LedgerStore,
) -> None:
    with Ledger(ledger_store.location()) as ledger:
        for interval in (9, 3, 5):
            _record(ledger, interval, {"a": 1.0})
        assert [c.interval for c in ledger.unsettled_clearings()] == [3, 5, 9]
        ledger.settle_cleared(5, metered_kwh={"a": 1.0})
        assert [c.interval for c in ledger.unsettled_clearings()] == [3, 9]
        assert ledger.clearing(4) is None


def test_recording_a_clearing_again_returns_the_stored_one(ledger_store: LedgerStore) -> None:
    path = ledger_store.location()
    with Ledger(path) as ledger:
        first = _record(ledger, 7, {"a": 2.0, "b": -2.0, "c": 0.0})
        assert first.awards_wh == {"a": 2000, "b": -2000, "c": 0}
        again = _record(ledger, 7, {"c": 0.0, "b": -2.0, "a": 2.0004}, cleared_ts=CLEARED_TS + 60)
        assert again == first  # same inputs after rounding: the first record and its time
        assert ledger_store.count(path, "clearing_awards") == 3


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"clearing": 0.21}, "clearing_price_per_kwh"),
        ({"premium": 0.03}, "imbalance_premium_per_kwh"),
        ({"rebate": "traded_energy"}, "rebate"),
        ({"awards": {"a": 2.0, "b": -1.5}}, "awards_kwh"),
    ],
)
def test_recording_a_different_clearing_conflicts(
    ledger_store: LedgerStore, change: dict[str, Any], field: str
) -> None:
    with Ledger(ledger_store.location()) as ledger:
        stored = _record(ledger, 7, {"a": 2.0, "b": -2.0})
        change = dict(change)  # the parameter is shared by both engines' runs
        awards = change.pop("awards", {"a": 2.0, "b": -2.0})
        with pytest.raises(ClearingConflict, match=field) as err:
            _record(ledger, 7, awards, **change)
        assert err.value.stored == stored
        assert ledger.clearing(7) == stored


def test_a_clearing_cannot_be_recorded_after_a_settlement_without_one(
    ledger_store: LedgerStore,
) -> None:
    with Ledger(ledger_store.location()) as ledger:
        _settle(ledger, 7, {"a": 1.0}, {"a": 1.0})
        with pytest.raises(ClearingConflict, match="already settled") as err:
            _record(ledger, 7, {"a": 1.0})
        assert err.value.stored is None
        assert ledger.clearing(7) is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"clearing_price_per_kwh": float("nan")}, "clearing_price_per_kwh"),
        ({"retail_price_per_kwh": 1e9}, "retail_price_per_kwh"),
        ({"imbalance_premium_per_kwh": -0.01}, "imbalance_premium_per_kwh"),
        ({"rebate": "all"}, "rebate"),
        ({"awards_kwh": {"": 1.0}}, "site ids"),
        ({"awards_kwh": {"a": float("inf")}}, "awards_kwh\\['a'\\]"),
        ({"cleared_ts": float("inf")}, "cleared_ts"),
        ({"interval": -1}, "interval"),
    ],
)
def test_record_clearing_rejects_bad_inputs_naming_the_field(
    ledger_store: LedgerStore, kwargs: dict[str, Any], field: str
) -> None:
    path = ledger_store.location()
    args: dict[str, Any] = {
        "interval": 3,
        "clearing_price_per_kwh": 0.2,
        "retail_price_per_kwh": RETAIL,
        "feed_in_price_per_kwh": FEED_IN,
        "awards_kwh": {"a": 1.0},
        "imbalance_premium_per_kwh": PREMIUM,
        "rebate": "none",
        "cleared_ts": CLEARED_TS,
    } | kwargs
    interval = args.pop("interval")
    with Ledger(path) as ledger:
        with pytest.raises(LedgerInputError, match=field):
            ledger.record_clearing(interval, **args)
        assert ledger.unsettled_clearings() == ()
    assert ledger_store.count(path, "clearings") == 0


def test_settle_interval_must_agree_with_the_recorded_clearing(ledger_store: LedgerStore) -> None:
    with Ledger(ledger_store.location()) as ledger:
        _record(ledger, 7, {"a": 2.0, "b": -2.0})
        with pytest.raises(LedgerInputError, match="clearing_price_per_kwh disagrees"):
            _settle(ledger, 7, {"a": 2.0, "b": -2.0}, {"a": 2.0, "b": -2.0}, clearing=0.25)
        with pytest.raises(LedgerInputError, match="awards_kwh disagrees"):
            _settle(ledger, 7, {"a": 2.0}, {"a": 2.0, "b": -2.0})
        with pytest.raises(LedgerInputError, match="rebate disagrees"):
            _settle(ledger, 7, {"a": 2.0, "b": -2.0}, {"a": 2, "b": -2}, rebate="traded_energy")
        assert not ledger.is_settled(7)
        # The clearing's own figures settle, and the same as settle_cleared would.
        result = _settle(ledger, 7, {"a": 2.0, "b": -2.0}, {"a": 2.5, "b": -2.0})
    with Ledger(ledger_store.location("other")) as other:
        _record(other, 7, {"a": 2.0, "b": -2.0})
        assert other.settle_cleared(7, metered_kwh={"a": 2.5, "b": -2.0}) == result


def test_settle_cleared_settles_roster_sites_and_records_why_sites_are_estimated(
    ledger_store: LedgerStore,
) -> None:
    implausible = "implausible: grid power beyond the connection limit"
    with Ledger(ledger_store.location()) as ledger:
        _record(ledger, 12, {"a": 2.0, "b": -2.0})
        result = ledger.settle_cleared(
            12,
            metered_kwh={"a": 2.5},
            roster=("a", "b", "c"),
            estimate_reasons={"b": implausible},
        )
        a, b, c = result.sites
        assert (a.site, a.metered_wh, a.estimated, a.estimate_reason) == ("a", 2500, False, None)
        # b's reading was refused: settled on its award, no imbalance, with the reason.
        assert (b.award_wh, b.metered_wh, b.estimated) == (-2000, -2000, True)
        assert (b.imbalance_micro, b.estimate_reason) == (0, implausible)
        # c was in the roster with no award and no metering: settled at 0, flagged.
        assert (c.award_wh, c.metered_wh, c.estimated) == (0, 0, True)
        assert (c.total_micro, c.estimate_reason) == (0, DEFAULT_ESTIMATE_REASON)
        assert ledger.estimated_sites() == (
            EstimatedSite(12, "b", -2000, -2000, implausible),
            EstimatedSite(12, "c", 0, 0, DEFAULT_ESTIMATE_REASON),
        )
        assert ledger.site_report("c").intervals == 1
        assert ledger.site_report("c").estimated_intervals == 1
        # Settling again is idempotent (reasons are not compared); other metering conflicts.
        assert ledger.settle_cleared(12, metered_kwh={"a": 2.5}, roster=("b", "c")) == result
        with pytest.raises(SettlementConflict) as err:
            ledger.settle_cleared(12, metered_kwh={"a": 2.6}, roster=("b", "c"))
        assert err.value.stored == result
        assert ledger.check_balanced()


def test_settle_cleared_refuses_what_it_cannot_settle(ledger_store: LedgerStore) -> None:
    with Ledger(ledger_store.location()) as ledger:
        with pytest.raises(LedgerInputError, match="no recorded clearing"):
            ledger.settle_cleared(3, metered_kwh={"a": 1.0})
        _record(ledger, 3, {"a": 1.0})
        with pytest.raises(LedgerInputError, match="estimate_reasons names sites with metering"):
            ledger.settle_cleared(3, metered_kwh={"a": 1.0}, estimate_reasons={"a": "odd"})
        with pytest.raises(LedgerInputError, match="estimate_reasons\\['b'\\]"):
            ledger.settle_cleared(3, metered_kwh={"a": 1.0}, estimate_reasons={"b": ""})
        with pytest.raises(LedgerInputError, match="site ids"):
            ledger.settle_cleared(3, metered_kwh={"a": 1.0}, roster=("",))
        with pytest.raises(LedgerInputError, match="metered_kwh\\['a'\\]"):
            ledger.settle_cleared(3, metered_kwh={"a": float("nan")})
        assert not ledger.is_settled(3)


# --- corrections ------------------------------------------------------------------------


def test_a_correction_books_the_difference_without_touching_what_was_written(
    ledger_store: LedgerStore,
) -> None:
    path = ledger_store.location()
    with Ledger(path) as ledger:
        _record(ledger, 20, {"buyer": 5.0, "seller": -5.0})
        settled = ledger.settle_cleared(20, metered_kwh={"buyer": 6.0})
        assert settled.site("seller").estimated
        before = ledger.interval_entries(20)
        # The seller's replayed telemetry arrives: it exported 5.5 kWh, not its award.
        correction = ledger.correct_interval(
            20, metered_kwh={"seller": -5.5}, reason="replayed telemetry", ts=CLEARED_TS + 900
        )
        assert isinstance(correction, Correction)
        assert (correction.interval, correction.revision) == (20, 1)
        line = {s.site: s for s in correction.sites}["seller"]
        assert (line.old_metered_wh, line.new_metered_wh) == (-5000, -5500)
        assert (line.old_estimated, line.new_estimated) == (True, False)
        # The feeder nets 0.5 kWh import: the extra 0.5 kWh export sells at
        # min(0.20, 0.30) - 0.02 = 0.18, so the seller receives 0.09 more; the utility bill
        # falls from 1 kWh to 0.5 kWh at retail, 0.15 less.
        assert line.delta_micro == 90_000
        assert correction.utility_delta_micro == -150_000
        assert correction.community_delta_micro == 60_000
        after = ledger.interval_entries(20)
        assert after[: len(before)] == before  # nothing updated or deleted
        assert {e.posting_id for e in after[len(before) :]}.isdisjoint(
            {e.posting_id for e in before}
        )
        assert sum(e.amount_micro for e in after) == 0
        assert ledger.check_balanced()
        # The interval now reads as a fresh settlement with the final metering would give.
        now = ledger.settlement(20)
        assert now is not None and now.revision == 1
        assert now.site("seller").metered_wh == -5500 and not now.site("seller").estimated
        assert ledger.estimated_sites() == ()
        # The same correction again changes nothing and books nothing.
        entries = len(after)
        assert ledger.correct_interval(20, metered_kwh={"seller": -5.5}, reason="x", ts=1) is None
        assert len(ledger.interval_entries(20)) == entries
        assert ledger.corrections() == (correction,)
        assert ledger.correction_count() == 1
        report = ledger.site_report("seller")
        assert report.corrected_intervals == 1
        assert report.imbalance_cost_micro == -90_000
        assert report.metered_export_wh == 5500
        (audit,) = ledger.audit_entries(kind="correction")
        assert audit.detail["interval"] == 20
        assert audit.detail["reason"] == "replayed telemetry"
        assert audit.detail["sites"] == {  # type: ignore[comparison-overlap]
            "seller": {
                "old_metered_wh": -5000,
                "new_metered_wh": -5500,
                "old_estimated": True,
                "new_estimated": False,
                "delta_micro": 90_000,
            }
        }
    with Ledger(ledger_store.location("fresh")) as fresh:
        _record(fresh, 20, {"buyer": 5.0, "seller": -5.0})
        expected = fresh.settle_cleared(20, metered_kwh={"buyer": 6.0, "seller": -5.5})
    assert now == _with_revision(expected, 1)


def _with_revision(result: SettlementResult, revision: int) -> SettlementResult:
    return SettlementResult(**{**result.__dict__, "revision": revision})


def test_correcting_what_is_not_settled_or_not_in_the_interval_is_refused(
    ledger_store: LedgerStore,
) -> None:
    with Ledger(ledger_store.location()) as ledger:
        with pytest.raises(LedgerInputError, match="not settled"):
            ledger.correct_interval(4, metered_kwh={"a": 1.0}, reason="late", ts=CLEARED_TS)
        _settle(ledger, 4, {"a": 1.0}, {"a": 1.0})
        with pytest.raises(LedgerInputError, match="not in interval 4: z"):
            ledger.correct_interval(4, metered_kwh={"z": 1.0}, reason="late", ts=CLEARED_TS)
        with pytest.raises(LedgerInputError, match="reason"):
            ledger.correct_interval(4, metered_kwh={"a": 2.0}, reason=" ", ts=CLEARED_TS)
        with pytest.raises(LedgerInputError, match="ts"):
            ledger.correct_interval(4, metered_kwh={"a": 2.0}, reason="late", ts=float("nan"))
        assert ledger.corrections() == ()


_SITES = ("a", "b", "c", "d")
_energy = st.floats(min_value=-40.0, max_value=40.0, allow_nan=False).map(lambda x: round(x, 3))
_price = st.floats(min_value=-0.5, max_value=1.5, allow_nan=False).map(lambda x: round(x, 4))


@st.composite
def _corrected_interval(draw: st.DrawFn) -> dict[str, Any]:
    awarded = draw(st.lists(st.sampled_from(_SITES), unique=True))
    roster = draw(st.lists(st.sampled_from(_SITES), unique=True))
    everyone = sorted(set(awarded) | set(roster))
    metered = draw(st.lists(st.sampled_from(everyone), unique=True)) if everyone else []
    corrections = (
        draw(
            st.lists(
                st.dictionaries(st.sampled_from(everyone), _energy, max_size=len(everyone)),
                max_size=5,
            )
        )
        if everyone
        else []
    )
    return {
        "awards": {s: draw(_energy) for s in awarded},
        "roster": roster,
        "metered": {s: draw(_energy) for s in metered},
        "clearing": draw(_price),
        "premium": draw(st.floats(min_value=0.0, max_value=0.3).map(lambda x: round(x, 4))),
        "rebate": draw(st.sampled_from(("none", "traded_energy"))),
        "corrections": corrections,
    }


@PROPERTY_SETTINGS
@given(case=_corrected_interval())
def test_any_sequence_of_corrections_equals_a_fresh_settlement_of_the_final_metering(
    ledger_store: LedgerStore, case: dict[str, Any]
) -> None:
    path = ledger_store.fresh("corrections")
    clearing = {"clearing": case["clearing"], "premium": case["premium"]}
    final = dict(case["metered"])
    with Ledger(path) as ledger:
        _record(ledger, 1, case["awards"], rebate=case["rebate"], **clearing)
        ledger.settle_cleared(1, metered_kwh=case["metered"], roster=case["roster"])
        revision = 0
        for step, new in enumerate(case["corrections"]):
            changed = any(
                (s not in final or round(final[s] * 1000) != round(q * 1000))
                for s, q in new.items()
            )
            correction = ledger.correct_interval(
                1, metered_kwh=new, reason=f"step {step}", ts=CLEARED_TS + step
            )
            assert (correction is not None) == changed
            if correction is not None:
                revision += 1
                assert correction.revision == revision
                assert (
                    sum(s.delta_micro for s in correction.sites)
                    + (correction.utility_delta_micro + correction.community_delta_micro)
                    == 0
                )
            final |= new
            assert ledger.check_balanced()
        corrected = ledger.settlement(1)
        totals = _account_totals(ledger, 1)
        assert sum(ledger.balance(a) for a in ledger.accounts()) == 0
        assert len(ledger.corrections(1)) == revision
    with Ledger(ledger_store.fresh("fresh")) as fresh:
        _record(fresh, 1, case["awards"], rebate=case["rebate"], **clearing)
        expected = fresh.settle_cleared(1, metered_kwh=final, roster=case["roster"])
        assert totals == _account_totals(fresh, 1)
    assert corrected is not None
    assert corrected == _with_revision(expected, revision)


# --- audit log ----------------------------------------------------------------------------


def test_the_audit_log_appends_and_filters(ledger_store: LedgerStore) -> None:
    with Ledger(ledger_store.location()) as ledger:
        first = ledger.audit(
            "dispatch", "operator", {"site": "house-1", "battery_w": -3000.0}, CLEARED_TS
        )
        ledger.audit("rejection", "coordinator", {"site": "x", "why": "clock"}, CLEARED_TS + 1)
        last = ledger.audit("dispatch", "coordinator", {"site": "f", "nested": [1, {"a": None}]},
                            CLEARED_TS + 2)  # fmt: skip
        assert last > first
        everything = ledger.audit_entries()
        assert [e.kind for e in everything] == ["dispatch", "rejection", "dispatch"]
        assert everything[0].detail == {"battery_w": -3000.0, "site": "house-1"}
        assert everything[0].actor == "operator" and everything[0].ts == CLEARED_TS
        assert [e.audit_id for e in ledger.audit_entries(kind="dispatch")] == [first, last]
        assert [e.kind for e in ledger.audit_entries(since_ts=CLEARED_TS + 1)] == [
            "rejection",
            "dispatch",
        ]
        assert [e.audit_id for e in ledger.audit_entries(limit=1)] == [last]  # the newest
        with pytest.raises(LedgerInputError, match="JSON"):
            ledger.audit("dispatch", "x", {"w": float("nan")}, CLEARED_TS)
        with pytest.raises(LedgerInputError, match="JSON"):
            ledger.audit("dispatch", "x", {"w": object()}, CLEARED_TS)
        with pytest.raises(LedgerInputError, match="kind"):
            ledger.audit("", "x", {}, CLEARED_TS)
        with pytest.raises(LedgerInputError, match="limit"):
            ledger.audit_entries(limit=0)
        assert len(ledger.audit_entries()) == 3


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit SET actor = 'someone else'",
        "DELETE FROM audit",
        "UPDATE corrections SET delta_micro = 0",
        "DELETE FROM corrections",
        "DELETE FROM revisions",
        "UPDATE clearings SET clearing_price_micro_per_kwh = 1",
        "DELETE FROM clearing_awards",
    ],
)
def test_the_audit_trail_refuses_updates_and_deletes(
    ledger_store: LedgerStore, statement: str
) -> None:
    path = ledger_store.location()
    with Ledger(path) as ledger:
        ledger.audit("grid_mode", "coordinator", {"mode": "emergency"}, CLEARED_TS)
        _record(ledger, 2, {"a": 1.0})
        ledger.settle_cleared(2, metered_kwh={"a": 1.0})
        ledger.correct_interval(2, metered_kwh={"a": 1.5}, reason="late", ts=CLEARED_TS)
    with pytest.raises(ledger_store.integrity_error, match="append-only"):
        ledger_store.execute(path, statement)
    with Ledger(path) as ledger:
        assert len(ledger.audit_entries()) == 2  # grid_mode and the correction
        assert len(ledger.corrections()) == 1


# --- migration ----------------------------------------------------------------------------


def _table_rows(path: Path, table: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    finally:
        conn.close()


@pytest.mark.parametrize("version", [1, 2])
def test_migrating_an_older_ledger_to_version_3_keeps_every_entry(
    tmp_path: Path, version: int
) -> None:
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        first = _settle(ledger, 7, {"buyer": 5.0, "seller": -5.0}, {"buyer": 6.0, "seller": -5.5})
        _settle(ledger, 8, {"buyer": 1.0}, {"seller": -1.0}, estimate_missing=True)
        second = _account_totals(ledger, 8)
    (_downgrade_to_version_1 if version == 1 else _downgrade_to_version_2)(path)
    entries, postings = _table_rows(path, "entries"), _table_rows(path, "postings")
    # A reader leaves the old file alone and reads it; new features read as empty.
    with Ledger(path, migrate=False) as reader:
        assert reader.schema_version == version
        assert reader.settlement(7) == first
        assert reader.unsettled_clearings() == () and reader.clearing(7) is None
        assert reader.audit_entries() == () and reader.corrections() == ()
        assert [(e.interval, e.site) for e in reader.estimated_sites()] == [(8, "buyer")]
        assert reader.check_balanced()
        with pytest.raises(SchemaVersionError, match="migrate"):
            _record(reader, 9, {"a": 1.0})
        with pytest.raises(SchemaVersionError, match="migrate"):
            reader.audit("dispatch", "x", {}, CLEARED_TS)
    assert _table_rows(path, "schema_version") == [(version,)]
    backup = path.with_name(f"ledger.db.v{version}.bak")
    assert not backup.exists()
    with Ledger(path) as ledger:
        assert ledger.schema_version == SCHEMA_VERSION == 3
        assert ledger.settlement(7) == first
        eighth = ledger.settlement(8)
        assert eighth is not None
        buyer = eighth.site("buyer")
        assert buyer.estimated and buyer.estimate_reason is None  # no reason was recorded
        assert _account_totals(ledger, 8) == second
        assert ledger.check_balanced()
        # Everything new works on the migrated file.
        _record(ledger, 9, {"buyer": 1.0})
        ledger.settle_cleared(9, metered_kwh={"buyer": 1.0})
        ledger.correct_interval(7, metered_kwh={"seller": -5.0}, reason="late", ts=CLEARED_TS)
        assert ledger.check_balanced()
    # Every entry and posting written before is still there, unchanged (revision 0).
    assert _table_rows(path, "entries")[: len(entries)] == entries
    assert [row[:-1] for row in _table_rows(path, "postings")[: len(postings)]] == postings
    assert {row[-1] for row in _table_rows(path, "postings")[: len(postings)]} == {0}
    assert _table_rows(path, "schema_version") == [(3,)]
    with Ledger(backup, migrate=False) as old:
        assert old.schema_version == version
        assert old.settled_intervals() == (7, 8)


def test_a_closed_ledger_refuses_the_new_calls(ledger_store: LedgerStore) -> None:
    ledger = Ledger(ledger_store.location())
    ledger.close()
    with pytest.raises(LedgerStorageError, match="closed"):
        ledger.unsettled_clearings()
    with pytest.raises(LedgerStorageError, match="closed"):
        ledger.audit("dispatch", "x", {}, CLEARED_TS)


def test_community_and_utility_accounts_take_part_in_corrections(ledger_store: LedgerStore) -> None:
    with Ledger(ledger_store.location()) as ledger:
        _record(ledger, 1, {"a": 1.0}, rebate="traded_energy")
        ledger.settle_cleared(1, metered_kwh={"a": 1.0})
        before = {a: ledger.balance(a) for a in (COMMUNITY, UTILITY, site_account("a"))}
        c = ledger.correct_interval(1, metered_kwh={"a": 3.0}, reason="late", ts=CLEARED_TS)
        assert c is not None
        assert ledger.balance(UTILITY) - before[UTILITY] == c.utility_delta_micro == 600_000
        assert ledger.balance(COMMUNITY) - before[COMMUNITY] == c.community_delta_micro
        assert ledger.balance(site_account("a")) - before[site_account("a")] == (
            c.sites[0].delta_micro
        )
        assert json.dumps(ledger.audit_entries()[0].detail["interval"]) == "1"
