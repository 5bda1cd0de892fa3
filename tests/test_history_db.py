"""The forecasting history kept in a PostgreSQL ledger's database (coordinator/history_db.py),
so that a coordinator on another machine (a standby taking over) forecasts from it: a real
PostgreSQL server (tests/pg_fixtures.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from broker.clock import ManualClock
from coordinator.config import parse_coordinator_config
from coordinator.history_db import TABLE, HistoryTable
from coordinator.history_store import history_bytes
from coordinator.service import Coordinator
from tests.pg_fixtures import PostgresServer, psycopg_connect
from tests.test_coordinator import T0
from tests.test_history_store import _feed_a_day, _history


def _coordinator(tmp_path: Path, url: str, feeder: str = "feeder-1") -> Coordinator:
    """A coordinator on a manual clock with its ledger in PostgreSQL at ``url`` and nothing
    of its own on disk but ``tmp_path`` (another machine: another ``tmp_path``)."""
    config = parse_coordinator_config(
        {
            "coordinator": {
                "feeder": feeder,
                "ledger": str(tmp_path / "unused.sqlite"),
                "ledger_url": url,
                "ledger_password_env": None,
            },
            "broker": {"port": 1, "password_env": None},
            "tariff": {"retail_per_kwh": 0.30, "feed_in_per_kwh": 0.08},
            "grid": {"import_limit_w": 10_000.0, "export_limit_w": 10_000.0},
        },
        "test",
    )
    return Coordinator(config, ManualClock(T0), password=None)


def _rows(url: str) -> dict[str, bytes]:
    with psycopg_connect(url) as conn:
        return {f: bytes(c) for f, c in conn.execute(f"SELECT feeder, content FROM {TABLE}")}


def test_a_coordinator_on_another_machine_forecasts_from_the_history_kept_in_the_database(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.socket_url(schema=postgres_server.new_schema())
    first = _coordinator(tmp_path / "a", url)
    assert first.history_db is not None and first.history_path is None
    assert first.sites == {}  # nothing stored yet (no table either)
    _feed_a_day(T0, first)
    assert first.save_history()
    first.ledger.close()
    assert list(_rows(url)) == ["feeder-1"]
    assert not any((tmp_path / "a").glob("*.npz"))  # not on this machine's disk

    second = _coordinator(tmp_path / "b", url)
    assert sorted(second.sites) == ["house", "school"]
    for site in ("house", "school"):
        (ts_a, values_a), (ts_b, values_b) = (
            c.sites[site].history.arrays() for c in (first, second)
        )
        np.testing.assert_array_equal(ts_b, ts_a)
        np.testing.assert_array_equal(values_b[:, :2], values_a[:, :2])
    second.ledger.close()


def test_feeders_sharing_a_database_keep_their_own_histories(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.socket_url(schema=postgres_server.new_schema())
    north = _coordinator(tmp_path / "n", url, "north")
    _feed_a_day(T0, north)
    assert north.save_history()
    north.ledger.close()
    south = _coordinator(tmp_path / "s", url, "south")
    assert south.sites == {}  # north's history is north's
    assert south.save_history()  # an empty one, beside north's
    south.ledger.close()
    assert sorted(_rows(url)) == ["north", "south"]
    again = _coordinator(tmp_path / "n2", url, "north")
    assert sorted(again.sites) == ["house", "school"]
    again.ledger.close()


def test_a_damaged_history_row_is_set_aside_and_the_coordinator_starts_without_it(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.socket_url(schema=postgres_server.new_schema())
    table = HistoryTable(url, "feeder-1")
    table.save(history_bytes({"house": _history(4, T0 - 3600.0)}), T0)
    with psycopg_connect(url) as conn:
        conn.execute(f"UPDATE {TABLE} SET content = %s", (b"PK\x03\x04" + b"\x00" * 60,))
    c = _coordinator(tmp_path, url)
    assert c.sites == {}
    assert _rows(url)["feeder-1.damaged"] == b"PK\x03\x04" + b"\x00" * 60
    _feed_a_day(T0, c)
    assert c.save_history()  # the next write replaces the damaged row, the copy stays
    assert sorted(_rows(url)) == ["feeder-1", "feeder-1.damaged"]
    c.ledger.close()


def test_a_database_that_cannot_take_the_history_is_reported_once_and_the_coordinator_goes_on(
    postgres_server: PostgresServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coordinator.service")  # whatever ran before
    url = postgres_server.socket_url(schema=postgres_server.new_schema())
    c = _coordinator(tmp_path, url)
    _feed_a_day(T0, c)
    c.history_db = HistoryTable(postgres_server.url("no_such_database"), "feeder-1")
    assert not c.save_history()
    assert not c.save_history()
    errors = [r for r in caplog.records if "not written" in r.getMessage()]
    assert len(errors) == 1  # once per reason
    assert "no_such_database" in errors[0].getMessage()
    c.history_db = HistoryTable(url, "feeder-1")
    assert c.save_history()
    assert any("written to" in r.getMessage() and "again" in r.getMessage() for r in caplog.records)
    c.ledger.close()
