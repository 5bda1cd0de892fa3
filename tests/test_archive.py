"""``wattmesh archive export``: a real ledger and a real VictoriaMetrics (written by the real
historian) exported to Parquet, read back with pyarrow and DuckDB, equal to what went in."""

from __future__ import annotations

import asyncio
import math
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from typer.testing import CliRunner

from broker.messages import DeviceReading, Telemetry
from coordinator.historian import CONTROLLER_CODES, Historian
from coordinator.ledger import Ledger
from tests.broker_fixtures import free_port
from tests.test_historian import VictoriaMetrics, make_settings, vm  # noqa: F401 - fixture
from wattmesh.archive import ArchiveError, TimeRange, export_archive, parse_range
from wattmesh.cli import app

INTERVAL_S = 900
#: Midnight UTC between 2026-06-22 and 2026-06-23.
MIDNIGHT = datetime(2026, 6, 23, tzinfo=UTC).timestamp()
K0 = int(MIDNIGHT // INTERVAL_S)
#: The first half hour of 2026-06-23: intervals K0 and K0 + 1.
HALF_HOUR = ("--from", "2026-06-23", "--to", "2026-06-23T00:30:00Z")


def build_ledger(path: Path) -> None:
    """Two intervals each side of midnight, one far outside the range, one cleared but not
    settled, one settled without a clearing, an estimated site and a corrected interval."""
    with Ledger(path) as ledger:
        for k, price in ((K0 - 2, 0.18), (K0 - 1, 0.21), (K0, 0.125), (K0 + 200, 0.3)):
            ledger.record_clearing(
                k,
                clearing_price_per_kwh=price,
                retail_price_per_kwh=0.32,
                feed_in_price_per_kwh=0.08,
                awards_kwh={"house-1": 1.25, "solar-farm": -3.5, "factory": 2.25},
                imbalance_premium_per_kwh=0.05,
                rebate="traded_energy" if k == K0 else "none",
                cleared_ts=k * INTERVAL_S - 60.0,
            )
            ledger.settle_cleared(
                k,
                metered_kwh={"house-1": 1.5, "solar-farm": -3.25},  # factory estimated
                roster=["school"],
            )
        ledger.correct_interval(
            K0 - 1, metered_kwh={"factory": 2.0}, reason="late meter data", ts=MIDNIGHT + 60
        )
        ledger.settle_interval(
            K0 + 1,
            clearing_price_per_kwh=0.11,
            retail_price_per_kwh=0.32,
            feed_in_price_per_kwh=0.08,
            awards_kwh={"house-1": 0.5},
            metered_kwh={"house-1": 0.75, "solar-farm": -0.75},
        )
        ledger.record_clearing(
            K0 + 2,
            clearing_price_per_kwh=0.1,
            retail_price_per_kwh=0.32,
            feed_in_price_per_kwh=0.08,
            awards_kwh={"house-1": 0.25},
            imbalance_premium_per_kwh=0.05,
            rebate="none",
            cleared_ts=(K0 + 2) * INTERVAL_S - 60.0,
        )


def read_hive(root: Path, name: str) -> list[dict[str, Any]]:
    """Every row of one dataset through pyarrow's Hive partitioning, ordered."""
    by_day = ds.partitioning(pa.schema([("date", pa.date32())]), flavor="hive")
    table = ds.dataset(root / name, format="parquet", partitioning=by_day).to_table()
    return sorted(table.to_pylist(), key=lambda r: (r["ts"], *(str(v) for v in r.values())))


def test_the_ledger_archive_reads_back_equal_to_the_ledger_with_pyarrow_and_duckdb(
    tmp_path: Path,
) -> None:
    ledger_path = tmp_path / "ledger.sqlite"
    build_ledger(ledger_path)
    out = tmp_path / "archive"
    result = CliRunner().invoke(
        app,
        [
            "archive",
            "export",
            str(out),
            "--ledger",
            str(ledger_path),
            "--from",
            "2026-06-22",
            "--to",
            "2026-06-24",
        ],
    )
    # No telemetry server given: the ledger parts are written, and the exit code says so.
    assert result.exit_code == 3, result.output
    assert "telemetry not exported: no telemetry server given" in result.output
    for name in ("settlements", "clearings", "awards"):
        parts = sorted(p.relative_to(out).as_posix() for p in (out / name).rglob("*.parquet"))
        assert parts == [
            f"{name}/date=2026-06-22/part-0.parquet",
            f"{name}/date=2026-06-23/part-0.parquet",
        ]

    with Ledger(ledger_path) as ledger:
        settled = [k for k in ledger.settled_intervals() if K0 - 96 <= k < K0 + 96]
        want_settlements = []
        for k in settled:
            result_k = ledger.settlement(k)
            assert result_k is not None
            for s in result_k.sites:
                want_settlements.append(
                    {
                        "interval": k,
                        "ts": float(k * INTERVAL_S),
                        "site": s.site,
                        "award_wh": s.award_wh,
                        "metered_wh": s.metered_wh,
                        "estimated": s.estimated,
                        "estimate_reason": s.estimate_reason,
                        "trade_micro": s.trade_micro,
                        "imbalance_micro": s.imbalance_micro,
                        "rebate_micro": s.rebate_micro,
                        "clearing_price_micro_per_kwh": result_k.clearing_price_micro_per_kwh,
                        "retail_price_micro_per_kwh": result_k.retail_price_micro_per_kwh,
                        "feed_in_price_micro_per_kwh": result_k.feed_in_price_micro_per_kwh,
                        "imbalance_premium_micro_per_kwh": (
                            result_k.imbalance_premium_micro_per_kwh
                        ),
                        "rebate_rule": result_k.rebate_rule,
                        "revision": result_k.revision,
                    }
                )
        clearings = [c for k in range(K0 - 96, K0 + 96) if (c := ledger.clearing(k)) is not None]
    assert settled == [K0 - 2, K0 - 1, K0, K0 + 1]
    assert [c.interval for c in clearings] == [K0 - 2, K0 - 1, K0, K0 + 2]

    got = read_hive(out, "settlements")
    assert {r.pop("date").isoformat() for r in got} == {"2026-06-22", "2026-06-23"}
    assert all(r.pop("time").timestamp() == r["ts"] for r in got)
    key = lambda r: (r["interval"], r["site"])  # noqa: E731
    assert sorted(got, key=key) == sorted(want_settlements, key=key)
    assert any(r["estimated"] and r["estimate_reason"] for r in got)  # factory, not corrected
    assert any(r["revision"] == 1 for r in got)  # the corrected interval
    assert any(r["rebate_micro"] for r in got)  # the traded_energy rebate

    got_clearings = read_hive(out, "clearings")
    assert [
        (
            r["interval"],
            r["clearing_price_micro_per_kwh"],
            r["retail_price_micro_per_kwh"],
            r["feed_in_price_micro_per_kwh"],
            r["imbalance_premium_micro_per_kwh"],
            r["rebate_rule"],
            r["cleared_ts"],
            r["award_count"],
            r["settled"],
        )
        for r in got_clearings
    ] == [
        (
            c.interval,
            c.clearing_price_micro_per_kwh,
            c.retail_price_micro_per_kwh,
            c.feed_in_price_micro_per_kwh,
            c.imbalance_premium_micro_per_kwh,
            c.rebate_rule,
            c.cleared_ts,
            len(c.awards_wh),
            c.settled,
        )
        for c in clearings
    ]
    got_awards = sorted((r["interval"], r["site"], r["award_wh"]) for r in read_hive(out, "awards"))
    assert got_awards == sorted(
        (c.interval, site, wh) for c in clearings for site, wh in c.awards_wh.items()
    )

    # DuckDB reads the same files as one table per dataset, with the day from the path.
    con = duckdb.connect()
    glob = (out / "settlements" / "*" / "*.parquet").as_posix()
    rows = con.execute(
        "SELECT CAST(date AS VARCHAR), count(*), sum(trade_micro + imbalance_micro + rebate_micro)"
        f" FROM read_parquet('{glob}', hive_partitioning = true) GROUP BY 1 ORDER BY 1"
    ).fetchall()
    by_day: dict[str, list[int]] = {}
    for r in want_settlements:
        day = datetime.fromtimestamp(r["ts"], UTC).date().isoformat()
        total = r["trade_micro"] + r["imbalance_micro"] + r["rebate_micro"]
        by_day.setdefault(day, []).append(total)
    assert rows == [(day, len(v), sum(v)) for day, v in sorted(by_day.items())]

    # Exporting again replaces the days: the same rows, not twice as many.
    again = CliRunner().invoke(
        app,
        [
            "archive",
            "export",
            str(out),
            "--ledger",
            str(ledger_path),
            "--from",
            "2026-06-22",
            "--to",
            "2026-06-24",
        ],
    )
    assert again.exit_code == 3, again.output
    assert len(read_hive(out, "settlements")) == len(want_settlements)


def telemetry(ts: float, grid_w: float, soc: float, controller: str) -> Telemetry:
    return Telemetry(
        ts=ts,
        devices=[
            DeviceReading(
                device="battery", kind="battery", available=True, power_w=-grid_w / 2, soc_pct=soc
            ),
            DeviceReading(device="meter", kind="sdm630", available=False, error="timeout"),
        ],
        grid_power_w=grid_w,
        pv_power_w=1200.5,
        battery_power_w=-grid_w / 2,
        battery_soc_pct=soc,
        controller=controller,  # type: ignore[arg-type]
    )


async def test_the_telemetry_archive_reads_back_equal_to_what_the_historian_wrote(
    vm: VictoriaMetrics,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    midnight = float(int(time.time()) // 86_400 * 86_400)  # today 00:00 UTC
    written = {
        ("house-1", midnight - 2.5): telemetry(midnight - 2.5, 800.0, 40.0, "market"),
        ("house-1", midnight + 0.25): telemetry(midnight + 0.25, -300.0, 41.5, "fallback"),
        ("factory", midnight - 1.0): telemetry(midnight - 1.0, 15_000.0, 70.0, "dispatch"),
    }
    outside = telemetry(midnight - 86_400 - 10.0, 1.0, 1.0, "safety")  # before --from
    async with Historian(make_settings(vm.url, tmp_path)) as h:
        for (site, _), msg in written.items():
            h.record_telemetry(site, msg)
        h.record_telemetry("house-1", outside)
        await h.flush()
    ledger_path = tmp_path / "ledger.sqlite"
    Ledger(ledger_path).close()  # empty: telemetry only
    out = tmp_path / "archive"
    span = TimeRange(midnight - 86_400, midnight + 10.0)
    deadline = time.monotonic() + 20
    while True:  # a new series is searchable once VictoriaMetrics flushed its index
        await asyncio.to_thread(vm.force_flush)
        result = export_archive(
            out, span, ledger=ledger_path, interval_s=INTERVAL_S, telemetry_url=vm.url
        )
        if result.rows["telemetry"] == 3 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert result.telemetry_error is None
    assert result.rows == {
        "settlements": 0,
        "clearings": 0,
        "awards": 0,
        "telemetry": 3,
        "device_telemetry": 6,
    }
    yesterday = datetime.fromtimestamp(midnight - 1, UTC).date().isoformat()
    today = datetime.fromtimestamp(midnight, UTC).date().isoformat()
    assert sorted(p.parent.name for p in (out / "telemetry").rglob("*.parquet")) == [
        f"date={yesterday}",
        f"date={today}",
    ]

    sites = read_hive(out, "telemetry")
    assert [(r["site"], r["ts"]) for r in sites] == sorted(written, key=lambda k: k[1])
    for r in sites:
        msg = written[r["site"], r["ts"]]
        assert r["time"].timestamp() == r["ts"]
        assert r["date"].isoformat() == (yesterday if r["ts"] < midnight else today)
        assert r["grid_power_w"] == pytest.approx(msg.grid_power_w, rel=1e-12)
        assert r["pv_power_w"] == pytest.approx(msg.pv_power_w, rel=1e-12)
        assert r["battery_power_w"] == pytest.approx(msg.battery_power_w, rel=1e-12)
        assert r["battery_soc_pct"] == pytest.approx(msg.battery_soc_pct, rel=1e-12)
        assert r["load_power_w"] is None  # not in the message: not written, null
        assert msg.controller is not None
        assert r["controller_code"] == CONTROLLER_CODES[msg.controller]

    devices = read_hive(out, "device_telemetry")
    assert len(devices) == 6
    for r in devices:
        reading = next(d for d in written[r["site"], r["ts"]].devices if d.device == r["device"])
        assert r["kind"] == reading.kind
        assert r["available"] == int(reading.available)
        for field in ("power_w", "soc_pct", "energy_wh", "setpoint_w"):
            want = getattr(reading, field)
            assert (r[field] is None) if want is None else r[field] == pytest.approx(want)

    con = duckdb.connect()
    glob = (out / "telemetry" / "*" / "*.parquet").as_posix()
    peak = con.execute(
        f"SELECT site, max(grid_power_w) FROM read_parquet('{glob}', hive_partitioning = true) "
        "GROUP BY site ORDER BY site"
    ).fetchall()
    assert peak == [("factory", 15_000.0), ("house-1", 800.0)]


def test_an_unreachable_telemetry_server_is_reported_and_the_ledger_still_exported(
    tmp_path: Path,
) -> None:
    """The ledger and the historian's url come from the coordinator's file (--config)."""
    build_ledger(tmp_path / "ledger.sqlite")
    url = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "coordinator.toml"
    config.write_text(
        f'[coordinator]\nledger = "ledger.sqlite"\n[market]\ninterval_s = {INTERVAL_S}\n'
        f'[historian]\nurl = "{url}"\norg = "wattmesh"\nbucket = "wattmesh"\n'
    )
    out = tmp_path / "archive"
    result = CliRunner().invoke(
        app,
        ["archive", "export", str(out), "--config", str(config), *HALF_HOUR],
    )
    assert result.exit_code == 3, result.output
    assert f"telemetry not exported: cannot read telemetry from {url}" in result.output
    assert "settlements: 6 row(s)" in result.output  # K0: four sites, K0 + 1: two
    assert (out / "settlements" / "date=2026-06-23" / "part-0.parquet").is_file()
    assert not (out / "telemetry").exists()


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("2026-06-23", "2026-06-22", "--to '2026-06-22' must be after --from"),
        ("2026-06-23", "2026-06-23", "must be after --from"),
        ("yesterday", "2026-06-23", "--from 'yesterday': not a date or time"),
        ("2026-06-22", "2026-13-01", "--to '2026-13-01': not a date or time"),
        ("1969-12-31", "2026-06-23", "before 1970"),
        ("2000-01-01", "2026-06-23", "longer than 3660 days"),
    ],
)
def test_bad_ranges_get_clear_errors(start: str, end: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match=re.escape(message)):
        parse_range(start, end)
    result = CliRunner().invoke(
        app,
        [
            "archive",
            "export",
            str(tmp_path / "a"),
            "--ledger",
            str(tmp_path / "l.sqlite"),
            "--from",
            start,
            "--to",
            end,
        ],
    )
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "a").exists()


def test_the_ranges_days_and_intervals_are_half_open() -> None:
    span = parse_range("2026-06-22T23:50:00Z", "2026-06-23T00:15:00+00:00")
    assert span.intervals(900) == (K0, K0)  # 23:45 starts before --from; 00:15 is --to
    assert [d.isoformat() for d, _, _ in span.days()] == ["2026-06-22", "2026-06-23"]
    whole = parse_range("2026-06-22", "2026-06-23")
    assert whole.intervals(900) == (K0 - 96, K0 - 1)
    assert [(d.isoformat(), lo, hi) for d, lo, hi in whole.days()] == [
        ("2026-06-22", MIDNIGHT - 86_400, MIDNIGHT)
    ]
    assert math.isclose(whole.end_ts - whole.start_ts, 86_400)


def test_missing_ledger_and_help(tmp_path: Path) -> None:
    runner = CliRunner()
    nothing = runner.invoke(
        app, ["archive", "export", str(tmp_path), "--from", "2026-06-22", "--to", "2026-06-23"]
    )
    assert nothing.exit_code == 2
    assert "--ledger" in nothing.output
    missing = runner.invoke(
        app,
        [
            "archive",
            "export",
            str(tmp_path / "a"),
            "--ledger",
            str(tmp_path / "none.sqlite"),
            "--from",
            "2026-06-22",
            "--to",
            "2026-06-23",
        ],
    )
    assert missing.exit_code == 2
    assert "no such ledger file" in missing.output
    shown = runner.invoke(app, ["archive", "export", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0
    for words in ("Hive", "exclusive", "date=2026-06-22", "Exit codes", "--telemetry-url"):
        assert words in shown.output


def test_the_command_line_does_not_load_pyarrow_until_an_export_runs() -> None:
    """The edge agent runs through `wattmesh`: pyarrow (tens of MB) stays out of it."""
    probe = "import sys, wattmesh.cli; print('pyarrow' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
