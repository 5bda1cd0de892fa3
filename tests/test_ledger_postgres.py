"""What only the PostgreSQL ledger has to prove, on a real throwaway server: its schema (64-bit
money, code-point ordering, append-only tables that also refuse TRUNCATE), passwords kept out of
messages, clear errors, a settlement killed mid-transaction, and writers in two processes that
settle one interval once. The ledger's logic runs on it in test_ledger*.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import CoordinatorConfigError, parse_coordinator_config
from coordinator.ledger import (
    COMMUNITY,
    Ledger,
    LedgerStorageError,
    SettlementConflict,
    SettlementResult,
    site_account,
)
from coordinator.ledger_sql import PostgresConnection
from tests.pg_fixtures import LedgerStore, PostgresServer, psycopg_connect
from tests.test_ledger import _settle

_REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def pg_store(postgres_server: PostgresServer, tmp_path: Path) -> Iterator[LedgerStore]:
    store = LedgerStore("postgresql", tmp_path, postgres_server)
    yield store
    store.close()


def test_the_schema_holds_64_bit_money_and_sorts_sites_by_code_point(pg_store: LedgerStore) -> None:
    url = pg_store.location()
    sites = {"b": 900_000.0, "B": -900_000.0, "_x": 1.0, "a-1": -1.0, "a": 0.5, "é": -0.5}
    with Ledger(url) as ledger:
        # 900 MWh at 9,000 per kWh: 8.1e15 micro-currency, far beyond a 32-bit integer.
        result = _settle(ledger, 3, sites, sites, clearing=9000.0, retail=9500.0)
        assert [s.site for s in result.sites] == sorted(sites)  # "B" < "_x" < "a" < "a-1" < "b"
        assert result.site("b").trade_micro == -8_100_000_000_000_000
        assert type(ledger.balance(site_account("b"))) is int
        assert ledger.balance(site_account("b")) == -8_100_000_000_000_000
        report = ledger.site_report("b")
        assert type(report.paid_micro) is int and report.paid_micro == 8_100_000_000_000_000
        assert ledger.accounts() == tuple(sorted(ledger.accounts()))
        assert ledger.check_balanced()
    kinds = dict(
        pg_store.execute(
            url,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'entries'",
        )
    )
    assert kinds["amount_micro"] == "bigint"


def test_append_only_tables_refuse_truncate_too(pg_store: LedgerStore) -> None:
    url = pg_store.location()
    with Ledger(url) as ledger:
        ledger.audit("grid_mode", "coordinator", {"mode": "emergency"}, 1_765_000_000.0)
    for table in ("audit", "clearings", "corrections"):
        with pytest.raises(pg_store.integrity_error, match="append-only"):
            pg_store.execute(url, f"TRUNCATE {table} CASCADE")
    with Ledger(url) as ledger:
        assert len(ledger.audit_entries()) == 1


def test_a_password_comes_from_outside_the_url_and_never_shows(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.url()  # TCP: the server asks for the password
    with pytest.raises(LedgerStorageError, match="cannot open ledger") as err:
        Ledger(url)
    assert postgres_server.password not in str(err.value)
    with Ledger(url, password=postgres_server.password) as ledger:
        assert ledger.location == url
        assert ledger.accounts() == (COMMUNITY, "utility")
    wrong = postgres_server.url(with_password=True).replace(postgres_server.password, "nope-123")
    with pytest.raises(LedgerStorageError, match="password") as err:
        Ledger(wrong)
    assert "nope-123" not in str(err.value)
    assert ":***@" in str(err.value)


def test_an_unreachable_server_is_a_clear_error(postgres_server: PostgresServer) -> None:
    dead = postgres_server.url().replace(f":{postgres_server.port}/", ":1/")
    with pytest.raises(LedgerStorageError, match=r"cannot open ledger postgresql://.*:1/"):
        Ledger(dead, password="x", busy_timeout_s=1.0)


def test_without_psycopg_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    with pytest.raises(LedgerStorageError, match=r"psycopg.*wattmesh\[postgres\]"):
        Ledger("postgresql://coordinator@db.invalid/wattmesh")


_KILLED_MID_SETTLEMENT = textwrap.dedent(
    """
    import json, os, signal, sys
    from coordinator.ledger import Ledger

    url, kill_after, inputs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])

    class Crashing(Ledger):
        written = 0

        def _write_posting(self, conn, interval, posting, revision=0):
            super()._write_posting(conn, interval, posting, revision)
            self.written += 1
            if self.written == kill_after:
                assert conn.in_transaction
                print("killing", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    with Crashing(url) as ledger:
        ledger.settle_interval(2, **inputs)
    print("not killed", flush=True)
    """
)


def _inputs(n_sites: int) -> dict[str, Any]:
    awards = {f"site{i:03d}": (i % 7 - 3) * 1.5 for i in range(n_sites)}
    return {
        "clearing_price_per_kwh": 0.22,
        "retail_price_per_kwh": 0.30,
        "feed_in_price_per_kwh": 0.05,
        "awards_kwh": awards,
        "metered_kwh": {
            s: q + (0.25 if i % 2 else -0.4) for i, (s, q) in enumerate(awards.items())
        },
    }


def test_a_killed_settlement_leaves_nothing_of_the_interval(pg_store: LedgerStore) -> None:
    inputs = _inputs(40)
    with Ledger(pg_store.location("reference")) as reference:
        expected = reference.settle_interval(2, **inputs)
        postings = len(reference.interval_entries(2)) // 2
    url = pg_store.location()
    env = {**os.environ, "PYTHONPATH": str(_REPO)}
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_SETTLEMENT, str(url), str(postings // 2),
         json.dumps(inputs)],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout == "killing\n"
    with Ledger(url) as ledger:  # the server rolled the dead client's transaction back
        assert not ledger.is_settled(2)
        assert ledger.interval_entries(2) == ()
        assert pg_store.count(url, "postings") == 0
        assert pg_store.count(url, "site_intervals") == 0
        assert ledger.check_balanced()
        assert ledger.settle_interval(2, **inputs) == expected


def test_writers_on_two_connections_settle_an_interval_once(pg_store: LedgerStore) -> None:
    url = pg_store.location()
    inputs = _inputs(30)
    other = {**inputs, "metered_kwh": {**inputs["metered_kwh"], "site000": 9.0}}
    Ledger(url).close()  # the schema exists before the race
    outcomes: list[SettlementResult | SettlementConflict] = []
    start = threading.Barrier(2)

    def settle(kwargs: dict[str, Any]) -> None:
        with Ledger(url) as ledger:
            start.wait()
            try:
                outcomes.append(ledger.settle_interval(5, **kwargs))
            except SettlementConflict as err:
                outcomes.append(err)

    threads = [threading.Thread(target=settle, args=(k,)) for k in (inputs, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    results = [o for o in outcomes if isinstance(o, SettlementResult)]
    conflicts = [o for o in outcomes if isinstance(o, SettlementConflict)]
    assert len(results) == 1 and len(conflicts) == 1  # one wrote, the other saw it
    assert conflicts[0].stored == results[0]
    with Ledger(url) as ledger:
        assert ledger.settled_intervals() == (5,)
        assert ledger.settlement(5) == results[0]
        assert ledger.check_balanced()
    with psycopg_connect(str(url)) as conn:
        (count,) = conn.execute("SELECT posting_count FROM intervals").fetchone()
        assert pg_store.count(url, "postings") == count


def test_the_coordinator_file_names_a_postgres_ledger_with_its_password_outside(
    postgres_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_password = postgres_server.url(with_password=True)
    with pytest.raises(CoordinatorConfigError, match="ledger_url.*password"):
        parse_coordinator_config({"coordinator": {"ledger_url": with_password}}, "c.toml")
    with pytest.raises(CoordinatorConfigError, match="ledger_url.*postgresql://"):
        parse_coordinator_config({"coordinator": {"ledger_url": "/var/ledger.db"}}, "c.toml")
    section = {"ledger_url": postgres_server.url(), "ledger_password_env": "TEST_LEDGER_PW"}
    config = parse_coordinator_config({"coordinator": section}, str(tmp_path / "c.toml"))
    monkeypatch.delenv("TEST_LEDGER_PW", raising=False)
    with pytest.raises(LedgerStorageError, match="cannot open ledger postgresql://"):
        config.coordinator.open_ledger()
    monkeypatch.setenv("TEST_LEDGER_PW", postgres_server.password)
    with config.coordinator.open_ledger() as ledger:
        assert ledger.location == postgres_server.url()
        assert ledger.check_balanced()
    # Without a URL the file next to the coordinator file is the ledger, as before.
    plain = parse_coordinator_config({"coordinator": {}}, str(tmp_path / "c.toml"))
    with plain.coordinator.open_ledger() as ledger:
        assert ledger.path == tmp_path / "ledger.sqlite"


def test_a_dropped_session_fails_one_call_and_the_next_reconnects(pg_store: LedgerStore) -> None:
    url = pg_store.location()
    with Ledger(url) as ledger:
        _settle(ledger, 1, {"a": 1.0}, {"a": 1.0})
        conn = ledger._conn
        assert isinstance(conn, PostgresConnection)
        pid = conn.raw.info.backend_pid
        (ended,) = pg_store.execute(url, f"SELECT pg_terminate_backend({pid})")[0]
        assert ended  # the server ended the ledger's session
        with pytest.raises(LedgerStorageError, match="terminat|closed|lost"):
            ledger.settled_intervals()
        assert ledger.settled_intervals() == (1,)  # a new session
        _settle(ledger, 2, {"a": 1.0}, {"a": 2.0})
        assert ledger.check_balanced()
