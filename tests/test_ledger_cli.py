"""`wattmesh ledger report` and `wattmesh ledger check` on real SQLite ledgers.

The example: two sites, two intervals, imbalance premium 0.05/kWh.

interval 100: clearing 0.20, retail 0.30, feed-in 0.10; house awarded +2 metered +2.5,
  solar awarded -2 metered -2.0.
  house pays 2*0.20 = 0.40 and 0.5*(max(0.20, 0.30) + 0.05) = 0.175 imbalance; solar is paid
  0.40; the community imports 0.5 kWh and pays the utility 0.5*0.30 = 0.15.
interval 101: clearing 0.08 (the community exports, the utility buys at feed-in), retail 0.30,
  feed-in 0.08; house awarded +1 metered +1.0, solar awarded -3 metered -2.5.
  house pays 0.08; solar is paid 0.24 and pays 0.5*(max(0.08, 0.08) + 0.05) = 0.065 for its
  short export (the community exports, so a kWh short costs it feed-in); the community exports
  1.5 kWh and the utility pays it 1.5*0.08 = 0.12.

house: bought 3, import 3.5; paid 0.48, imbalance 0.175, net cost 0.655;
  baseline (2.5 + 1.0)*0.30 = 1.05; savings 0.395.
solar: sold 5, export 4.5; received 0.64, imbalance 0.065, net cost -0.575;
  baseline -(2.0*0.10 + 2.5*0.08) = -0.40; savings 0.175.
community account 0.40 + 0.175 - 0.40 - 0.15 + 0.08 - 0.24 + 0.065 + 0.12 = 0.05;
utility account 0.15 - 0.12 = 0.03; 0.05 + 0.03 = 0.08 = the sites' net cost 0.655 - 0.575.
No rebates: the ledger's default rule keeps the community account's balance.
"""

from __future__ import annotations

import json
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from coordinator.ledger import MICRO, Ledger
from tests.test_ledger import _downgrade_to_version_1
from wattmesh.ledger_cli import ledger_app

SITES = ("house", "solar")
MONEY_KEYS = (
    "paid",
    "received",
    "imbalance_cost",
    "rebate",
    "net_cost",
    "baseline_cost",
    "savings",
)
ENERGY_KEYS = ("bought_kwh", "sold_kwh", "metered_import_kwh", "metered_export_kwh")

runner = CliRunner()


#: Interval 100 of the example (module docstring).
INTERVAL_100: dict[str, Any] = {
    "clearing_price_per_kwh": 0.20,
    "retail_price_per_kwh": 0.30,
    "feed_in_price_per_kwh": 0.10,
    "imbalance_premium_per_kwh": 0.05,
    "awards_kwh": {"house": 2.0, "solar": -2.0},
    "metered_kwh": {"house": 2.5, "solar": -2.0},
}


def _write_example(path: Path) -> None:
    with Ledger(path) as ledger:
        ledger.settle_interval(100, **INTERVAL_100)
        ledger.settle_interval(
            101,
            clearing_price_per_kwh=0.08,
            retail_price_per_kwh=0.30,
            feed_in_price_per_kwh=0.08,
            imbalance_premium_per_kwh=0.05,
            awards_kwh={"house": 1.0, "solar": -3.0},
            metered_kwh={"house": 1.0, "solar": -2.5},
        )


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.sqlite"
    _write_example(path)
    return path


def _invoke(*args: str | Path) -> Result:
    return runner.invoke(ledger_app, [str(a) for a in args])


def _rows(output: str) -> list[list[str]]:
    """The body rows of every table printed, as stripped cells."""
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in output.splitlines()
        if line.startswith("│")
    ]


def _json(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def _assert_one_line_error(result: Result, code: int, fragment: str) -> None:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert fragment in lines[0]
    assert "Traceback" not in result.output


# --- report: the table --------------------------------------------------------------------


def test_table_shows_the_hand_checked_figures(ledger_path: Path) -> None:
    result = _invoke("report", ledger_path, "--decimals", "3")
    assert result.exit_code == 0, result.output
    assert _rows(result.stdout) == [
        # site, intervals, estimated, corrected, bought, sold, import, export (kWh)
        ["house", "2", "0", "0", "3.000", "0.000", "3.500", "0.000"],
        ["solar", "2", "0", "0", "0.000", "5.000", "0.000", "4.500"],
        ["community (2 sites)", "2", "0", "0", "3.000", "5.000", "3.500", "4.500"],
        # site, paid, received, imbalance, rebate, net cost, baseline, savings (EUR)
        ["house", "0.480", "0.000", "0.175", "0.000", "0.655", "1.050", "0.395"],
        ["solar", "0.000", "0.640", "0.065", "0.000", "-0.575", "-0.400", "0.175"],
        ["community (2 sites)", "0.480", "0.640", "0.240", "0.000", "0.080", "0.650", "0.570"],
    ]
    out = result.stdout
    assert "2 settled interval(s), #100 to #101" in out
    assert "community account: 0.050 EUR" in out
    assert "utility account:   0.030 EUR" in out
    assert "balanced: yes" in out


def test_table_rounds_money_half_up_to_cents_by_default(ledger_path: Path) -> None:
    result = _invoke("report", ledger_path, "--currency", "CHF")
    assert result.exit_code == 0, result.output
    money = _rows(result.stdout)[3:]
    assert money[0] == ["house", "0.48", "0.00", "0.18", "0.00", "0.66", "1.05", "0.40"]
    assert money[1] == ["solar", "0.00", "0.64", "0.07", "0.00", "-0.58", "-0.40", "0.18"]
    assert "Money (CHF; positive cost = the site pays)" in result.stdout
    assert "community account: 0.05 CHF" in result.stdout


# --- report --json ------------------------------------------------------------------------


def test_json_has_the_hand_checked_figures(ledger_path: Path) -> None:
    doc = _json(_invoke("report", ledger_path, "--json"))
    assert doc["report_version"] == 3
    assert doc["ledger"] == str(ledger_path)
    assert doc["currency"] == "EUR"
    assert doc["settled_intervals"] == {"count": 2, "first": 100, "last": 101}
    assert doc["site_filter"] is None
    assert doc["balanced"] is True
    assert doc["accounts"] == {"community": "0.050000", "utility": "0.030000"}
    house, solar = doc["sites"]
    assert house == {
        "site": "house",
        "intervals": 2,
        "estimated_intervals": 0,
        "corrected_intervals": 0,
        "bought_kwh": 3.0,
        "sold_kwh": 0.0,
        "metered_import_kwh": 3.5,
        "metered_export_kwh": 0.0,
        "paid": "0.480000",
        "received": "0.000000",
        "imbalance_cost": "0.175000",
        "rebate": "0.000000",
        "net_cost": "0.655000",
        "baseline_cost": "1.050000",
        "savings": "0.395000",
    }
    assert solar["site"] == "solar"
    assert (solar["net_cost"], solar["baseline_cost"], solar["savings"]) == (
        "-0.575000",
        "-0.400000",
        "0.175000",
    )


def test_rebates_show_in_the_table_and_the_json(tmp_path: Path) -> None:
    # Interval 100 of the example with the rebate on: the community keeps 0.025 (the house's
    # 0.5 kWh at 0.35 that cost 0.30 at retail) and pays it back over the 4 kWh awarded:
    # 6,250 micro per kWh, 0.0125 to each site; the community keeps nothing.
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.settle_interval(100, **INTERVAL_100, rebate="traded_energy")
    doc = _json(_invoke("report", path, "--json"))
    house, solar = doc["sites"]
    assert (house["rebate"], solar["rebate"]) == ("0.012500", "0.012500")
    assert house["net_cost"] == "0.562500"  # 0.40 + 0.175 - 0.0125
    assert doc["accounts"]["community"] == "0.000000"
    table = _invoke("report", path, "--decimals", "4")
    assert _rows(table.stdout)[3][4] == "0.0125"  # house's money row, rebate column


def test_report_reads_a_version_1_ledger_without_upgrading_it(ledger_path: Path) -> None:
    # An operator may upgrade the CLI before the coordinator: the report must not migrate the
    # coordinator's file under it.
    _downgrade_to_version_1(ledger_path)
    doc = _json(_invoke("report", ledger_path, "--json"))
    assert doc["sites"][0]["net_cost"] == "0.655000"
    assert doc["balanced"] is True
    assert _invoke("check", ledger_path).exit_code == 0
    with sqlite3.connect(ledger_path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]


def test_json_agrees_with_ledger_site_report(ledger_path: Path) -> None:
    doc = _json(_invoke("report", ledger_path, "--json"))
    with Ledger(ledger_path) as ledger:
        for entry in doc["sites"]:
            r = ledger.site_report(entry["site"])
            assert entry["intervals"] == r.intervals
            assert entry["estimated_intervals"] == r.estimated_intervals
            for key, wh in zip(
                ENERGY_KEYS,
                (r.bought_wh, r.sold_wh, r.metered_import_wh, r.metered_export_wh),
                strict=True,
            ):
                assert round(entry[key] * 1000) == wh
            for key, micro in zip(
                MONEY_KEYS,
                (
                    r.paid_micro,
                    r.received_micro,
                    r.imbalance_cost_micro,
                    r.rebate_micro,
                    r.net_cost_micro,
                    r.baseline_cost_micro,
                    r.savings_micro,
                ),
                strict=True,
            ):
                assert Decimal(entry[key]) * MICRO == micro
            assert Decimal(entry["baseline_cost"]) * MICRO == ledger.baseline_cost(r.site)
            assert Decimal(entry["savings"]) * MICRO == ledger.savings(r.site)
    assert [e["site"] for e in doc["sites"]] == list(SITES)


def test_community_total_sums_the_sites(ledger_path: Path) -> None:
    doc = _json(_invoke("report", ledger_path, "--json"))
    total, sites = doc["community_total"], doc["sites"]
    assert total["sites"] == 2
    assert total["intervals"] == doc["settled_intervals"]["count"] == 2
    assert total["estimated_intervals"] == sum(s["estimated_intervals"] for s in sites)
    for key in ENERGY_KEYS:
        assert round(total[key] * 1000) == sum(round(s[key] * 1000) for s in sites)
    for key in MONEY_KEYS:
        assert Decimal(total[key]) == sum(Decimal(s[key]) for s in sites)
    # What the sites paid net went to the community account and the utility.
    accounts = doc["accounts"]
    assert Decimal(total["net_cost"]) == Decimal(accounts["community"]) + Decimal(
        accounts["utility"]
    )


# --- report --site ------------------------------------------------------------------------


def test_site_filter_keeps_one_site_and_the_community_total(ledger_path: Path) -> None:
    result = _invoke("report", ledger_path, "--site", "solar", "--decimals", "3")
    assert result.exit_code == 0, result.output
    assert [row[0] for row in _rows(result.stdout)] == ["solar", "community (2 sites)"] * 2
    assert _rows(result.stdout)[2][5] == "-0.575"

    doc = _json(_invoke("report", ledger_path, "--site", "solar", "--json"))
    assert doc["site_filter"] == "solar"
    assert [s["site"] for s in doc["sites"]] == ["solar"]
    assert doc["community_total"]["net_cost"] == "0.080000"


def test_site_ids_are_printed_literally(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.settle_interval(
            7,
            clearing_price_per_kwh=0.2,
            retail_price_per_kwh=0.3,
            feed_in_price_per_kwh=0.1,
            awards_kwh={"[bold]x": 1.0},
            metered_kwh={"[bold]x": 1.0},
        )
    result = _invoke("report", path, "--site", "[bold]x")
    assert result.exit_code == 0, result.output
    assert _rows(result.stdout)[0][0] == "[bold]x"


# --- report: errors and the empty ledger --------------------------------------------------


def test_missing_file_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nope.sqlite"
    _assert_one_line_error(_invoke("report", path), 2, "no such file")
    assert not path.exists()


def test_directory_is_an_error(tmp_path: Path) -> None:
    _assert_one_line_error(_invoke("report", tmp_path), 2, "not a file")


@pytest.mark.parametrize("content", [b"", b"site,kwh\nhouse,1\n"])
def test_a_file_that_is_not_sqlite_is_refused_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(content)
    _assert_one_line_error(_invoke("report", path), 2, "not a wattmesh ledger")
    assert path.read_bytes() == content


def test_an_sqlite_database_that_is_not_a_ledger_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE readings (ts REAL, power_w REAL)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    _assert_one_line_error(_invoke("report", path), 2, "not a wattmesh ledger (missing tables")
    _assert_one_line_error(_invoke("check", path), 2, "not a wattmesh ledger")
    assert path.read_bytes() == before


def test_an_unknown_schema_version_is_an_error(ledger_path: Path) -> None:
    conn = sqlite3.connect(ledger_path)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    _assert_one_line_error(_invoke("report", ledger_path), 2, "schema version")


def test_unknown_site_is_an_error_naming_the_known_ones(ledger_path: Path) -> None:
    result = _invoke("report", ledger_path, "--site", "factory")
    _assert_one_line_error(result, 2, "no site 'factory'")
    assert "(sites: house, solar)" in result.stderr


def test_empty_currency_is_an_error(ledger_path: Path) -> None:
    _assert_one_line_error(_invoke("report", ledger_path, "--currency", " "), 2, "--currency")


def test_empty_ledger_says_so(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    result = _invoke("report", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"ledger {path}: no settled intervals yet"

    doc = _json(_invoke("report", path, "--json"))
    assert doc["settled_intervals"] == {"count": 0, "first": None, "last": None}
    assert doc["sites"] == []
    assert doc["community_total"]["net_cost"] == "0.000000"
    assert doc["balanced"] is True


# --- help ---------------------------------------------------------------------------------


def test_help_explains_columns_and_signs() -> None:
    result = runner.invoke(ledger_app, ["report", "--help"], terminal_width=100)
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "positive cost = the site pays" in text
    for column in ("bought", "sold", "import", "export", "paid", "received", "imbalance", "rebate"):
        assert f" {column} " in text
    assert "net cost paid - received + imbalance - rebate" in text
    assert "savings baseline - net cost" in text
    assert "decimal strings with six decimals" in text


# --- check --------------------------------------------------------------------------------


def test_check_passes_on_a_balanced_ledger(ledger_path: Path) -> None:
    result = _invoke("check", ledger_path)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{ledger_path}: balanced (2 settled interval(s))"
    quiet = _invoke("check", "-q", ledger_path)
    assert (quiet.exit_code, quiet.output) == (0, "")


def test_check_fails_with_exit_1_on_a_tampered_ledger(ledger_path: Path) -> None:
    conn = sqlite3.connect(ledger_path)
    conn.execute("UPDATE entries SET amount_micro = amount_micro + 1 WHERE entry_id = 1")
    conn.commit()
    conn.close()
    _assert_one_line_error(_invoke("check", "--quiet", ledger_path), 1, "NOT balanced")
    report = _invoke("report", ledger_path)
    assert report.exit_code == 0
    assert "balanced: NO" in report.stdout
    assert _json(_invoke("report", ledger_path, "--json"))["balanced"] is False


def test_check_errors_with_exit_2(tmp_path: Path) -> None:
    _assert_one_line_error(_invoke("check", tmp_path / "nope.sqlite"), 2, "no such file")
