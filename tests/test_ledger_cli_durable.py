"""`wattmesh ledger check` on open work (unsettled, estimated, missing, corrections) and
`wattmesh ledger audit`, on real SQLite ledgers.

The example ledger (interval numbers relative to N = the interval starting at AT - 2.5 h, with
AT = 2026-12-06T12:00Z and 900 s intervals, so N + 10 is the interval starting at AT):

N      cleared {house: +2, solar: -2, shop: 0}, roster adds office; house metered 2.5,
       solar's reading refused as implausible, shop and office without telemetry. Later
       solar's replayed telemetry (-2.2) corrects it: one correction.
N + 1  settled (no clearing) with solar only: house is absent.
N + 2  settled with house only.
N + 3  cleared, never settled: ended 6 intervals (1.5 h) before AT.
N + 9  cleared, never settled: ended at AT.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from coordinator.ledger import Ledger
from tests.test_ledger import _downgrade_to_version_2
from tests.test_ledger_cli import _assert_one_line_error, _rows, _write_example
from wattmesh.ledger_cli import ledger_app

runner = CliRunner()

AT = "2026-12-06T12:00:00Z"
AT_TS = datetime(2026, 12, 6, 12, tzinfo=UTC).timestamp()
N = int(AT_TS // 900) - 10
PRICES: dict[str, Any] = {
    "clearing_price_per_kwh": 0.20,
    "retail_price_per_kwh": 0.30,
    "feed_in_price_per_kwh": 0.05,
    "imbalance_premium_per_kwh": 0.02,
}
IMPLAUSIBLE = "implausible: grid power beyond the connection limit"


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clear(ledger: Ledger, interval: int, awards: dict[str, float]) -> None:
    ledger.record_clearing(
        interval, **PRICES, awards_kwh=awards, rebate="none", cleared_ts=interval * 900.0 - 60
    )


def _write_open_work(path: Path) -> None:
    with Ledger(path) as ledger:
        _clear(ledger, N, {"house": 2.0, "solar": -2.0, "shop": 0.0})
        ledger.settle_cleared(
            N,
            metered_kwh={"house": 2.5},
            roster=("office",),
            estimate_reasons={"solar": IMPLAUSIBLE},
        )
        ledger.settle_interval(N + 1, **PRICES, awards_kwh={}, metered_kwh={"solar": -1.0})
        ledger.settle_interval(N + 2, **PRICES, awards_kwh={}, metered_kwh={"house": 1.0})
        _clear(ledger, N + 3, {"house": 1.0})
        _clear(ledger, N + 9, {"house": 1.0})
        ledger.correct_interval(
            N, metered_kwh={"solar": -2.2}, reason="replayed telemetry", ts=AT_TS - 600
        )
        ledger.audit("dispatch", "operator", {"site": "house", "battery_w": -3000}, AT_TS - 300)
        ledger.audit("grid_mode", "coordinator", {"mode": "constrained"}, AT_TS - 200)


@pytest.fixture
def open_work(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.sqlite"
    _write_open_work(path)
    return path


def _invoke(*args: str | Path) -> Result:
    return runner.invoke(ledger_app, [str(a) for a in args])


# --- check --------------------------------------------------------------------------------


def test_check_lists_corrections_unsettled_estimated_and_missing_sites(open_work: Path) -> None:
    result = _invoke("check", open_work, "--at", AT)
    assert result.exit_code == 0, result.output
    start3, start9 = (N + 3) * 900, (N + 9) * 900
    assert result.stdout.splitlines() == [
        f"{open_work}: balanced (3 settled interval(s))",
        "corrections: 1 booked in 1 interval(s)",
        "unsettled: 2 cleared interval(s) not settled",
        f"  #{N + 3} ({_utc(start3)} to {_utc(start3 + 900)}), cleared {_utc(start3 - 60)}, "
        "7 interval(s) ago",
        f"  #{N + 9} ({_utc(start9)} to {_utc(start9 + 900)}), cleared {_utc(start9 - 60)}, "
        "1 interval(s) ago",
        "estimated: 2 site-interval(s) without metering",
        f"  #{N} office: no telemetry",
        f"  #{N} shop: no telemetry",
        "missing: 1 site-interval(s) absent between a site's first and last interval",
        f"  house: #{N + 1}",
    ]
    assert _utc(start3 + 900) == "2026-12-06T10:30:00Z"  # 1.5 h before AT


def test_check_shows_the_reason_until_a_correction_meters_the_site(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        _clear(ledger, N, {"house": 2.0, "solar": -2.0})
        ledger.settle_cleared(
            N, metered_kwh={"house": 2.0}, estimate_reasons={"solar": IMPLAUSIBLE}
        )
    result = _invoke("check", path, "--at", AT)
    assert f"  #{N} solar: {IMPLAUSIBLE}" in result.stdout.splitlines()
    with Ledger(path) as ledger:
        ledger.correct_interval(N, metered_kwh={"solar": -2.0}, reason="replayed", ts=AT_TS)
    again = _invoke("check", path, "--at", AT)
    assert "estimated" not in again.stdout
    assert "corrections: 1 booked in 1 interval(s)" in again.stdout


def test_strict_check_fails_with_exit_3_on_overdue_intervals_and_missing_sites(
    open_work: Path,
) -> None:
    result = _invoke("check", open_work, "--strict", "--at", AT)
    assert result.exit_code == 3, result.output
    assert "unsettled: 2 cleared interval(s)" in result.stdout  # the report is still printed
    assert result.stderr.splitlines() == [
        f"error: {open_work}: 1 cleared interval(s) unsettled for more than 1h, "
        "3 site-interval(s) estimated or missing"
    ]
    _assert_one_line_error(
        _invoke("check", open_work, "--strict", "-q", "--max-age", "2h", "--at", AT),
        3,
        "0 cleared interval(s) unsettled for more than 2h, 3 site-interval(s)",
    )
    quiet = _invoke("check", open_work, "-q", "--at", AT)  # without --strict: reported only
    assert (quiet.exit_code, quiet.output) == (0, "")


def test_strict_check_judges_the_age_of_unsettled_intervals(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        _clear(ledger, N, {"house": 1.0})  # ends at AT - 2.25 h
    for max_age, code in (("2h", 3), ("2.25h", 0), ("135m", 0), ("8000s", 3), ("1d", 0)):
        result = _invoke("check", path, "--strict", "-q", "--max-age", max_age, "--at", AT)
        assert result.exit_code == code, (max_age, result.output)


def test_strict_check_passes_a_ledger_with_nothing_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    _write_example(path)
    result = _invoke("check", path, "--strict")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{path}: balanced (2 settled interval(s))"


def test_an_unbalanced_ledger_fails_with_exit_1_before_anything_else(open_work: Path) -> None:
    conn = sqlite3.connect(open_work)
    conn.execute("UPDATE entries SET amount_micro = amount_micro + 1 WHERE entry_id = 1")
    conn.commit()
    conn.close()
    _assert_one_line_error(_invoke("check", open_work, "--strict", "--at", AT), 1, "NOT balanced")


def test_a_correction_with_a_posting_missing_is_unbalanced(open_work: Path) -> None:
    conn = sqlite3.connect(open_work)
    # Remove one correction posting and its entries behind the ledger's back.
    posting = conn.execute("SELECT MAX(posting_id) FROM postings WHERE revision = 1").fetchone()[0]
    conn.execute("DELETE FROM entries WHERE posting_id = ?", (posting,))
    conn.execute("DELETE FROM postings WHERE posting_id = ?", (posting,))
    conn.commit()
    conn.close()
    _assert_one_line_error(_invoke("check", open_work, "-q"), 1, "NOT balanced")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--max-age", "soon"), "--max-age 'soon' is not a duration"),
        (("--max-age", "-5m"), "must be a duration >= 0"),
        (("--at", "yesterday"), "--at 'yesterday' is not an ISO 8601 time"),
    ],
)
def test_check_refuses_malformed_options_with_exit_2(
    open_work: Path, args: tuple[str, ...], fragment: str
) -> None:
    _assert_one_line_error(_invoke("check", open_work, *args), 2, fragment)


def test_check_reads_a_version_2_ledger_without_upgrading_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    _write_example(path)
    _downgrade_to_version_2(path)
    result = _invoke("check", path, "--strict")
    assert result.exit_code == 0, result.output
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
    conn.close()


# --- audit --------------------------------------------------------------------------------


def test_audit_lists_every_row_oldest_first(open_work: Path) -> None:
    result = _invoke("audit", open_work)
    assert result.exit_code == 0, result.output
    rows = _rows(result.stdout)
    assert [row[:4] for row in rows] == [
        ["1", _utc(AT_TS - 600), "correction", "ledger"],
        ["2", _utc(AT_TS - 300), "dispatch", "operator"],
        ["3", _utc(AT_TS - 200), "grid_mode", "coordinator"],
    ]
    assert rows[1][4] == '{"battery_w":-3000,"site":"house"}'
    assert "Audit log (3 row(s))" in result.stdout


def test_audit_filters_by_kind_and_time_and_prints_json(open_work: Path) -> None:
    result = _invoke("audit", open_work, "--kind", "correction", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["audit_version"] == 1 and doc["ledger"] == str(open_work)
    (entry,) = doc["entries"]
    assert (entry["id"], entry["kind"], entry["actor"]) == (1, "correction", "ledger")
    assert entry["time"] == _utc(AT_TS - 600) and entry["ts"] == AT_TS - 600
    assert entry["detail"]["interval"] == N
    assert entry["detail"]["reason"] == "replayed telemetry"
    solar = entry["detail"]["sites"]["solar"]
    assert (solar["old_metered_wh"], solar["new_metered_wh"]) == (-2000, -2200)
    assert (solar["old_estimated"], solar["new_estimated"]) == (True, False)
    since = json.loads(_invoke("audit", open_work, "--since", _utc(AT_TS - 300), "--json").stdout)
    assert [e["kind"] for e in since["entries"]] == ["dispatch", "grid_mode"]
    naive = _invoke("audit", open_work, "--since", "2026-12-06T11:56:00", "--json")
    assert [e["kind"] for e in json.loads(naive.stdout)["entries"]] == ["grid_mode"]
    newest = json.loads(_invoke("audit", open_work, "--limit", "1", "--json").stdout)
    assert [e["id"] for e in newest["entries"]] == [3]


def test_audit_of_a_ledger_without_rows_says_so(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    _write_example(path)
    result = _invoke("audit", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"ledger {path}: no audit entries"
    assert json.loads(_invoke("audit", path, "--json").stdout)["entries"] == []


def test_audit_errors_with_exit_2(open_work: Path, tmp_path: Path) -> None:
    _assert_one_line_error(_invoke("audit", tmp_path / "nope.sqlite"), 2, "no such file")
    _assert_one_line_error(
        _invoke("audit", open_work, "--since", "noon"), 2, "--since 'noon' is not an ISO 8601"
    )
