"""The historian over a real time-series server, plus its settings and disk buffer.

The server is Debian's VictoriaMetrics, started by the ``vm`` fixture on a free loopback port:
it accepts influxdb-client's writes on ``/api/v2/write`` and stores field ``f`` of measurement
``m`` as the series ``m_f``, which the tests read back through ``/api/v1/export`` (one
``match[]`` per series) and compare with hand-written tags, values and timestamps. A new
series becomes searchable only after VictoriaMetrics flushes its index (about 10 s), so the
tests call its ``/internal/force_flush`` before reading.
Retry order and rejected batches are checked against a tiny scripted HTTP server instead,
because VictoriaMetrics answers 204 even to lines it cannot parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import logging
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.messages import (
    Award,
    Clearing,
    DeviceReading,
    Dispatch,
    DispatchAck,
    Forecast,
    GridState,
    Telemetry,
)
from coordinator import historian as historian_module
from coordinator.historian import (
    SCHEMA,
    Historian,
    HistorianClosed,
    HistorianConfigError,
    HistorianSettings,
    PointBuffer,
    settings_from_config,
)
from coordinator.ledger import SettlementResult, SiteSettlement

VM_BINARY = "victoria-metrics"
TOKEN = "test-token-not-secret"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class VictoriaMetrics:
    """One ``victoria-metrics`` process on a fixed port and data directory (restartable)."""

    def __init__(self, data_dir: Path, port: int, log_path: Path) -> None:
        self.data_dir = data_dir
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> None:
        assert self.proc is None
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    VM_BINARY,
                    f"-httpListenAddr=127.0.0.1:{self.port}",
                    f"-storageDataPath={self.data_dir}",
                    "-retentionPeriod=100y",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"victoria-metrics exited at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    if resp.read().strip() == b"OK":
                        return
            except OSError:
                pass
            time.sleep(0.05)
        pytest.fail(f"victoria-metrics did not become healthy in {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """``kill`` (SIGTERM): the server goes away and refuses connections until restarted.

        Not SIGKILL: VictoriaMetrics keeps its newest samples in memory for a few seconds
        (searchable, not yet on disk), so a SIGKILL would make the *server* lose points the
        historian had already delivered; that is the server's durability, not the historian's.
        """
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])

    def force_flush(self) -> None:
        """Make every accepted sample searchable now (a new series otherwise takes ~10 s)."""
        with urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=5) as resp:
            resp.read()

    def export(self, selector: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({"match[]": selector})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{query}", timeout=5) as resp:
            return [json.loads(line) for line in resp.read().decode().splitlines() if line]


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    """A started VictoriaMetrics on a free loopback port; killed at teardown."""
    if shutil.which(VM_BINARY) is None:
        pytest.fail(
            "the historian tests need VictoriaMetrics (it accepts the InfluxDB v2 write API): "
            "apt-get install victoria-metrics"
        )
    server = VictoriaMetrics(tmp_path / "vm-data", free_port(), tmp_path / "vm.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_settings(url: str, tmp_path: Path, **overrides: Any) -> HistorianSettings:
    values: dict[str, Any] = {
        "url": url,
        "org": "wattmesh",
        "bucket": "wattmesh",
        "token": TOKEN,
        "batch_size": 50,
        "flush_interval_s": 0.05,
        "timeout_s": 2.0,
        "retries": 1,
        "retry_backoff_s": 0.05,
        "retry_backoff_max_s": 0.5,
        "buffer_path": tmp_path / "historian-buffer.sqlite",
    }
    values.update(overrides)
    return HistorianSettings(**values)


# --- reading back -------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """One value of one field of one point, as it must come back."""

    measurement: str
    tags: tuple[tuple[str, str], ...]
    field: str
    ts_ms: int
    value: float


def expect(measurement: str, tags: dict[str, str], ts_ms: int, **fields: float) -> list[Expected]:
    tag_items = tuple(sorted(tags.items()))
    return [Expected(measurement, tag_items, f, ts_ms, v) for f, v in fields.items()]


def selector(measurement: str, field: str, tags: tuple[tuple[str, str], ...]) -> str:
    labels = ",".join(f'{k}="{v}"' for k, v in tags)
    return f"{measurement}_{field}{{{labels}}}"


def read_series(
    vm: VictoriaMetrics, measurement: str, field: str, tags: tuple[tuple[str, str], ...]
) -> dict[int, float]:
    """Every sample of one series: ts_ms -> value (a repeated write must repeat the value)."""
    samples: dict[int, float] = {}
    for series in vm.export(selector(measurement, field, tags)):
        assert series["metric"] == {"__name__": f"{measurement}_{field}", **dict(tags)}
        for ts, value in zip(series["timestamps"], series["values"], strict=True):
            assert samples.get(ts, value) == value, f"{ts}: two different values"
            samples[ts] = value
    return samples


async def assert_read_back(
    vm: VictoriaMetrics, expected: list[Expected], timeout_s: float = 15.0
) -> None:
    """Each series holds exactly the expected samples (waits for the server to index them)."""
    want: dict[tuple[str, str, tuple[tuple[str, str], ...]], dict[int, float]] = defaultdict(dict)
    for e in expected:
        assert e.ts_ms not in want[e.measurement, e.field, e.tags], f"test bug: duplicate {e}"
        want[e.measurement, e.field, e.tags][e.ts_ms] = e.value
    deadline = time.monotonic() + timeout_s
    while True:
        await asyncio.to_thread(vm.force_flush)
        got = {key: await asyncio.to_thread(read_series, vm, *key) for key in want}
        if all(got[key].keys() == want[key].keys() for key in want):
            break
        if time.monotonic() > deadline:
            for key, samples in want.items():
                missing = sorted(samples.keys() - got[key].keys())
                extra = sorted(got[key].keys() - samples.keys())
                if missing or extra:
                    pytest.fail(
                        f"{selector(*key)}: {len(missing)} missing (first {missing[:5]}), "
                        f"{len(extra)} unexpected (first {extra[:5]})"
                    )
        await asyncio.sleep(0.2)
    for key, samples in want.items():
        for ts, value in samples.items():
            assert got[key][ts] == pytest.approx(value, rel=1e-12, abs=1e-12), (key, ts)


async def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


def assert_accounted(h: Historian) -> None:
    s = h.stats()
    assert s.recorded + s.recovered == (
        s.written + s.rejected + s.dropped + s.pending + s.buffer_points
    ), s


# --- every measurement round trip ---------------------------------------------------------


async def test_every_record_is_read_back_with_tags_values_and_timestamps(
    vm: VictoriaMetrics, tmp_path: Path
) -> None:
    base = float(int(time.time()) - 3600)  # an hour ago, whole seconds
    ms = int(base * 1000)
    async with Historian(make_settings(vm.url, tmp_path)) as h:
        n = h.record_telemetry(
            "house-1",
            Telemetry(
                ts=base + 0.25,
                devices=[
                    DeviceReading(
                        device="battery",
                        kind="battery",
                        available=True,
                        power_w=-1500.5,
                        soc_pct=62.5,
                        setpoint_w=-1500.0,
                        rated_power_w=5000.0,
                        capacity_wh=10000.0,
                    ),
                    DeviceReading(device="meter", kind="sdm630", available=False, error="timeout"),
                ],
                grid_power_w=820.0,
                pv_power_w=3100.0,
                battery_power_w=-1500.5,
                load_power_w=2419.5,
                battery_soc_pct=62.5,
                controller="market",
            ),
        )
        assert n == 3
        h.record_clearing(
            Clearing(
                ts=base + 1,
                interval=2_000_000,
                price_per_kwh=0.21,
                volume_kwh=12.5,
                utility_import_kwh=3.0,
                bids=4,
            ),
            retail_price_per_kwh=0.30,
            feed_in_price_per_kwh=0.08,
        )
        h.record_award(
            "house-1",
            Award(ts=base + 2, interval=2_000_000, price_per_kwh=0.21, quantity_kwh=-1.75),
        )
        h.record_settlement(
            2_000_000,
            "house-1",
            -1.5,
            -0.3,
            ts=base + 3,
            award_kwh=-1.75,
            imbalance_amount=0.0675,
            baseline_amount=-0.12,
            estimated=True,
        )
        h.record_settlement_result(
            SettlementResult(
                interval=2_000_001,
                clearing_price_micro_per_kwh=210_000,
                retail_price_micro_per_kwh=300_000,
                feed_in_price_micro_per_kwh=80_000,
                imbalance_premium_micro_per_kwh=50_000,
                imbalance_buy_price_micro_per_kwh=350_000,
                imbalance_sell_price_micro_per_kwh=30_000,
                community_net_wh=2000,
                utility_micro=-600_000,
                community_micro=0,
                sites=(SiteSettlement("factory", 2000, 2000, False, -420_000, 0, 20_000),),
            ),
            ts=base + 4,
        )
        assert (
            h.record_forecast(
                "house-1",
                Forecast(
                    ts=base + 5,
                    start_ts=base + 900,
                    step_s=900,
                    pv_power_w=[100.0, 200.0],
                    load_power_w=[300.0, 400.0],
                    price_per_kwh=[0.2, 0.25],
                ),
            )
            == 2
        )
        h.record_grid_state(
            "main",
            GridState(
                ts=base + 6,
                flow_w=-42000.0,
                import_limit_w=1e5,
                export_limit_w=8e4,
                mode="constrained",
            ),
        )
        h.record_dispatch(
            "house-1",
            Dispatch(
                ts=base + 7, battery_power_w=2000.0, expires_ts=base + 307, priority="emergency"
            ),
        )
        h.record_dispatch(
            "house-1",
            DispatchAck(
                ts=base + 8, command_id="cmd-1", outcome="clamped", applied_battery_power_w=1800.0
            ),
        )
        await h.flush()
        assert_accounted(h)
    assert h.stats().written == h.stats().recorded == 12
    assert h.stats().buffered == h.stats().dropped == h.stats().rejected == 0

    site = {"site": "house-1"}
    expected = [
        *expect(
            "site",
            site,
            ms + 250,
            grid_power_w=820.0,
            pv_power_w=3100.0,
            battery_power_w=-1500.5,
            load_power_w=2419.5,
            battery_soc_pct=62.5,
            controller_code=1,
        ),
        *expect(
            "device",
            {**site, "device": "battery", "kind": "battery"},
            ms + 250,
            available=1,
            power_w=-1500.5,
            soc_pct=62.5,
            setpoint_w=-1500.0,
            rated_power_w=5000.0,
            capacity_wh=10000.0,
        ),
        *expect("device", {**site, "device": "meter", "kind": "sdm630"}, ms + 250, available=0),
        *expect(
            "clearing",
            {},
            ms + 1000,
            interval=2_000_000,
            price_per_kwh=0.21,
            volume_kwh=12.5,
            utility_import_kwh=3.0,
            utility_export_kwh=0.0,
            bids=4,
            retail_price_per_kwh=0.30,
            feed_in_price_per_kwh=0.08,
        ),
        *expect(
            "award", site, ms + 2000, interval=2_000_000, price_per_kwh=0.21, quantity_kwh=-1.75
        ),
        *expect(
            "settlement",
            site,
            ms + 3000,
            interval=2_000_000,
            energy_kwh=-1.5,
            award_kwh=-1.75,
            amount=-0.3,
            imbalance_amount=0.0675,
            baseline_amount=-0.12,
            savings=0.18,
            estimated=1,
        ),
        # 2 kWh bought at 0.21 and metered: paid 0.42, 0.02 of it paid back as a rebate;
        # the utility alone: 2 kWh at 0.30.
        *expect(
            "settlement",
            {"site": "factory"},
            ms + 4000,
            interval=2_000_001,
            energy_kwh=2.0,
            award_kwh=2.0,
            amount=0.40,
            imbalance_amount=0.0,
            rebate_amount=-0.02,
            baseline_amount=0.6,
            savings=0.2,
            estimated=0,
        ),
        *expect(
            "forecast",
            site,
            ms + 900_000,
            pv_power_w=100.0,
            load_power_w=300.0,
            price_per_kwh=0.2,
            lead_s=895.0,
        ),
        *expect(
            "forecast",
            site,
            ms + 1_800_000,
            pv_power_w=200.0,
            load_power_w=400.0,
            price_per_kwh=0.25,
            lead_s=1795.0,
        ),
        *expect(
            "feeder",
            {"feeder": "main"},
            ms + 6000,
            flow_w=-42000.0,
            import_limit_w=1e5,
            export_limit_w=8e4,
            mode_code=1,
        ),
        *expect(
            "dispatch",
            {**site, "priority": "emergency"},
            ms + 7000,
            battery_power_w=2000.0,
            duration_s=300.0,
        ),
        *expect(
            "dispatch_ack",
            {**site, "outcome": "clamped"},
            ms + 8000,
            acks=1,
            applied_battery_power_w=1800.0,
        ),
    ]
    # Every field of every measurement the historian claims to write was exercised.
    seen = {(e.measurement, e.field) for e in expected}
    missing = {(m, f) for m, (_, fields) in SCHEMA.items() for f in fields} - seen
    assert missing <= {
        ("device", "energy_wh"),
        ("device", "import_energy_wh"),
        ("device", "export_energy_wh"),
        ("dispatch", "load_limit_w"),
        ("dispatch_ack", "applied_load_limit_w"),
    }
    await assert_read_back(vm, expected)
    # Fields a message leaves out are not written (not as zeros either).
    meter = tuple(sorted({**site, "device": "meter", "kind": "sdm630"}.items()))
    assert await asyncio.to_thread(read_series, vm, "device", "power_w", meter) == {}
    assert (
        await asyncio.to_thread(
            read_series,
            vm,
            "dispatch",
            "load_limit_w",
            (("priority", "emergency"), ("site", "house-1")),
        )
        == {}
    )


# --- a 20 s outage ------------------------------------------------------------------------

OUTAGE_S = 20.0


async def test_a_20s_server_outage_loses_nothing(
    vm: VictoriaMetrics, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coordinator.historian")
    base = float(int(time.time()) - 600)
    settings = make_settings(
        vm.url,
        tmp_path,
        batch_size=20,
        flush_interval_s=0.1,
        retries=2,
        retry_backoff_s=0.1,
        retry_backoff_max_s=0.5,
        timeout_s=1.0,
    )
    expected: list[Expected] = []

    def record(h: Historian, i: int) -> None:
        ts = base + i * 0.1
        h.record_telemetry(
            "site-a",
            Telemetry(
                ts=ts,
                grid_power_w=float(i),
                battery_soc_pct=i % 100,
                devices=[
                    DeviceReading(device="pv", kind="pv_inverter", available=True, power_w=10.0 * i)
                ],
            ),
        )
        ms = round(ts * 1000)
        expected.extend(
            expect("site", {"site": "site-a"}, ms, grid_power_w=float(i), battery_soc_pct=i % 100)
        )
        expected.extend(
            expect(
                "device",
                {"site": "site-a", "device": "pv", "kind": "pv_inverter"},
                ms,
                available=1,
                power_w=10.0 * i,
            )
        )

    async with Historian(settings) as h:
        for i in range(20):
            record(h, i)
        await h.flush()
        await assert_read_back(vm, expected)  # the server has them before it goes away
        written_before = h.stats().written

        await asyncio.to_thread(vm.stop)
        started = time.monotonic()
        i = 20
        while time.monotonic() - started < OUTAGE_S:
            record(h, i)
            i += 1
            await asyncio.sleep(0.1)
        outage_points = h.stats().recorded - written_before
        assert outage_points >= 2 * 150  # ~200 messages of 2 points in 20 s
        s = h.stats()
        assert s.written == written_before
        assert s.buffer_points > 0
        assert s.buffered >= s.buffer_points
        assert s.write_errors > 0
        assert s.retried > 0
        assert s.dropped == 0

        await asyncio.to_thread(vm.start)
        restarted = time.monotonic()
        await wait_until(
            lambda: h.stats().buffer_points == 0 and h.stats().pending == 0,
            10.0,
            "the disk buffer to be replayed",
        )
        replay_s = time.monotonic() - restarted
        for j in range(i, i + 5):  # and life goes on
            record(h, j)
        await h.flush()
    s = h.stats()
    assert (s.dropped, s.rejected, s.buffer_points, s.pending) == (0, 0, 0, 0)
    assert s.written == s.recorded == len(expected) // 2
    assert s.replayed == s.buffered > 0
    assert_accounted(h)
    assert replay_s < 5.0  # the writer probes at most every retry_backoff_max_s
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot write to" in m for m in messages) == 1  # one warning per outage
    assert any("is back after" in m for m in messages)
    await assert_read_back(vm, expected)


# --- the bounded buffer -------------------------------------------------------------------


async def test_the_bounded_buffer_counts_and_logs_what_it_drops_and_replays_the_rest(
    vm: VictoriaMetrics, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = float(int(time.time()) - 600)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = make_settings(dead, tmp_path, buffer_max_points=10, retries=0, batch_size=5)

    def state(i: int) -> GridState:
        return GridState(
            ts=base + i, flow_w=float(i), import_limit_w=1e5, export_limit_w=1e5, mode="normal"
        )

    with caplog.at_level(logging.WARNING, logger="coordinator.historian"):
        async with Historian(settings) as h:
            for i in range(25):
                h.record_grid_state("main", state(i))
                if i % 5 == 4:
                    await h.flush()
            assert_accounted(h)
    s = h.stats()
    assert (s.recorded, s.written, s.buffered, s.dropped, s.buffer_points) == (25, 0, 25, 15, 10)
    assert_accounted(h)
    assert any("is full" in r.getMessage() for r in caplog.records)

    with PointBuffer(settings.buffer_path, 10) as buffer:  # the newest 10, oldest first
        lines = [line for _, line in buffer.peek(100)]
    assert [int(line.rsplit(" ", 1)[1]) for line in lines] == [
        round((base + i) * 1000) for i in range(15, 25)
    ]

    # The next run replays what the buffer kept, in order, to a server that is up.
    async with Historian(settings.model_copy(update={"url": vm.url})) as h2:
        assert h2.stats().recovered == 10
        await wait_until(lambda: h2.stats().buffer_points == 0, 10.0, "the replay")
    s2 = h2.stats()
    assert (s2.written, s2.replayed, s2.dropped) == (10, 10, 0)
    assert_accounted(h2)
    feeder = (("feeder", "main"),)
    await assert_read_back(
        vm,
        [
            e
            for i in range(15, 25)
            for e in expect(
                "feeder", dict(feeder), round((base + i) * 1000), flow_w=float(i), mode_code=0
            )
        ],
    )


def test_point_buffer_bound_on_one_big_append(tmp_path: Path) -> None:
    with PointBuffer(tmp_path / "b.sqlite", 3) as buffer:
        assert buffer.append([f"m f=1 {i}" for i in range(2)]) == 0
        assert buffer.append([f"m f=1 {i}" for i in range(2, 7)]) == 4  # 2 old + 2 of the new
        assert [line for _, line in buffer.peek(10)] == ["m f=1 4", "m f=1 5", "m f=1 6"]
        seqs = [seq for seq, _ in buffer.peek(10)]
        assert buffer.remove_through(seqs[1]) == 2
        assert len(buffer) == 1
    with PointBuffer(tmp_path / "b.sqlite", 3) as buffer:  # persisted
        assert [line for _, line in buffer.peek(10)] == ["m f=1 6"]


def test_a_foreign_sqlite_file_is_not_used_as_buffer(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "ledger.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE t (x)")
        db.commit()
    with pytest.raises(historian_module.HistorianError, match="ledger.sqlite"):
        PointBuffer(path, 10)


# --- order, retries and rejection against a scripted server --------------------------------


class ScriptedServer:
    """An HTTP server answering ``/api/v2/write`` with scripted statuses, recording bodies."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[int, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                status = outer.statuses.pop(0) if outer.statuses else 204
                outer.requests.append((status, body))
                self.send_response(status)
                payload = b'{"code":"invalid","message":"bad line"}' if status == 400 else b""
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def accepted_lines(self) -> list[str]:
        return [
            line for status, body in self.requests if status == 204 for line in body.splitlines()
        ]


async def test_failed_batches_are_retried_then_buffered_and_replayed_in_order(
    tmp_path: Path,
) -> None:
    base = float(int(time.time()) - 600)
    # Two failed attempts (the first and its retry) move the batch to disk; the first replay
    # probe fails too; then everything goes through.
    with ScriptedServer([503, 503, 500]) as server:
        settings = make_settings(server.url, tmp_path, batch_size=4, retries=1)
        async with Historian(settings) as h:
            for i in range(30):
                h.record_award(
                    "s1", Award(ts=base + i, interval=i, price_per_kwh=0.1, quantity_kwh=1.0)
                )
                if i % 3 == 0:
                    await asyncio.sleep(0.02)
            await h.flush()
            await wait_until(lambda: h.stats().buffer_points == 0, 10.0, "the replay")
        s = h.stats()
        assert s.write_errors == 3
        first_batch = len(server.requests[0][1].splitlines())
        assert s.retried == first_batch  # one retry of the first batch
        assert s.buffered > 0
        assert s.replayed == s.buffered
        assert s.written == 30
        assert_accounted(h)
        lines = server.accepted_lines()
        assert [int(line.rsplit(" ", 1)[1]) for line in lines] == [
            round((base + i) * 1000) for i in range(30)
        ]
        assert all(len(body.splitlines()) <= 4 for _, body in server.requests)
        assert (
            lines[0]
            == f"award,site=s1 interval=0i,price_per_kwh=0.1,quantity_kwh=1.0 {round(base * 1000)}"
        )


async def test_a_batch_the_server_rejects_is_counted_and_logged_not_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with ScriptedServer([400]) as server:
        settings = make_settings(server.url, tmp_path, batch_size=10, retries=3)
        with caplog.at_level(logging.ERROR, logger="coordinator.historian"):
            async with Historian(settings) as h:
                h.record_grid_state(
                    "f",
                    GridState(
                        ts=1e9, flow_w=1.0, import_limit_w=1.0, export_limit_w=1.0, mode="normal"
                    ),
                )
                await h.flush()
                h.record_grid_state(
                    "f",
                    GridState(
                        ts=1e9 + 1,
                        flow_w=2.0,
                        import_limit_w=1.0,
                        export_limit_w=1.0,
                        mode="emergency",
                    ),
                )
        s = h.stats()
        assert (s.rejected, s.written, s.retried, s.buffered) == (1, 1, 0, 0)
        assert_accounted(h)
        assert len(server.requests) == 2
        assert any(
            "rejected 1 points" in r.getMessage() and "bad line" in r.getMessage()
            for r in caplog.records
        )


async def test_a_cancelled_historian_keeps_its_queue_on_disk(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = make_settings(dead, tmp_path, flush_interval_s=60.0, batch_size=1000)
    entered = asyncio.Event()

    async def coordinator() -> None:
        async with Historian(settings) as h:
            for i in range(7):
                h.record_grid_state(
                    "f",
                    GridState(
                        ts=1e9 + i,
                        flow_w=1.0,
                        import_limit_w=1.0,
                        export_limit_w=1.0,
                        mode="normal",
                    ),
                )
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(coordinator())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with PointBuffer(settings.buffer_path, 100) as buffer:
        assert len(buffer) == 7


async def test_an_error_in_the_body_propagates_unchanged_after_a_final_write(
    tmp_path: Path,
) -> None:
    historians: list[Historian] = []

    async def body(url: str) -> None:
        async with Historian(make_settings(url, tmp_path, flush_interval_s=60.0)) as h:
            historians.append(h)
            h.record_grid_state(
                "f",
                GridState(
                    ts=1e9, flow_w=1.0, import_limit_w=1.0, export_limit_w=1.0, mode="normal"
                ),
            )
            raise KeyError("boom")

    with ScriptedServer([]) as server:
        with pytest.raises(KeyError, match="boom"):
            await body(server.url)
    assert historians[0].stats().written == 1
    assert len(server.accepted_lines()) == 1


async def test_recording_after_close_raises(tmp_path: Path) -> None:
    with ScriptedServer([]) as server:
        h = Historian(make_settings(server.url, tmp_path))
        async with h:
            with pytest.raises(ValueError, match="tag site"):
                h.record_award("", Award(ts=1e9, interval=1, price_per_kwh=0.1, quantity_kwh=1))
            with pytest.raises(ValueError, match="tag feeder"):
                h.record_grid_state(
                    "a\nb",
                    GridState(
                        ts=1e9, flow_w=1.0, import_limit_w=1.0, export_limit_w=1.0, mode="normal"
                    ),
                )
        assert h.state == "closed"
        with pytest.raises(HistorianClosed):
            h.record_award("s", Award(ts=1e9, interval=1, price_per_kwh=0.1, quantity_kwh=1))


async def test_tag_values_are_escaped(tmp_path: Path) -> None:
    with ScriptedServer([]) as server:
        async with Historian(make_settings(server.url, tmp_path)) as h:
            h.record_grid_state(
                "feeder 1,a=b",
                GridState(ts=1e9, flow_w=1.5, import_limit_w=2, export_limit_w=3, mode="normal"),
            )
            await h.flush()
    assert server.accepted_lines() == [
        r"feeder,feeder=feeder\ 1\,a\=b flow_w=1.5,import_limit_w=2.0,export_limit_w=3.0,"
        "mode_code=0i 1000000000000"
    ]


# --- the schema is documented as it is --------------------------------------------------


def test_the_docstring_table_matches_schema() -> None:
    doc = historian_module.__doc__ or ""
    lines = doc.splitlines()
    rules = [i for i, line in enumerate(lines) if re.fullmatch(r"=+( +=+){2}", line)]
    assert len(rules) == 3, "the schema table must be one RST simple table"
    widths = [len(part) for part in lines[rules[0]].split()]
    start2 = widths[0] + 2
    start3 = start2 + widths[1] + 2
    table: dict[str, tuple[list[str], list[str]]] = {}
    last = ""
    for line in lines[rules[1] + 1 : rules[2]]:
        m, tags, fields = line[:start2].strip(), line[start2:start3].strip(), line[start3:]
        if m:
            last = m
            table[m] = ([t.strip() for t in tags.split(",") if t.strip()], [])
        table[last][1].extend(f.strip() for f in fields.split(",") if f.strip())
    assert {m: (tuple(t), tuple(f)) for m, (t, f) in table.items()} == dict(SCHEMA)


# --- settings -----------------------------------------------------------------------------

ENV = {"WATTMESH_INFLUX_TOKEN": "s3cret"}


def test_settings_from_a_toml_section() -> None:
    s = HistorianSettings.from_mapping(
        {
            "url": "http://influx:8086/",
            "org": "o",
            "bucket": "b",
            "batch_size": 10,
            "flush_interval_s": 2,
            "buffer_path": "/var/lib/wattmesh/h.sqlite",
        },
        "coordinator.toml",
        environ=ENV,
    )
    assert s.url == "http://influx:8086"
    assert s.token == "s3cret"
    assert s.flush_interval_s == 2.0
    assert s.buffer_path == Path("/var/lib/wattmesh/h.sqlite")
    assert "s3cret" not in repr(s)
    other = HistorianSettings.from_mapping(
        {"url": "https://x", "org": "o", "bucket": "b", "token_env": "MY_TOKEN"},
        "c.toml",
        environ={"MY_TOKEN": "t"},
    )
    assert other.token == "t"


def test_the_historian_is_off_without_a_section() -> None:
    assert settings_from_config({"market": {}}, "coordinator.toml") is None
    s = settings_from_config(
        {"historian": {"url": "http://h:8086", "org": "o", "bucket": "b"}}, "c.toml", environ=ENV
    )
    assert s is not None
    assert s.bucket == "b"
    with pytest.raises(HistorianConfigError, match=r"^c\.toml: historian: must be a table"):
        settings_from_config({"historian": 3}, "c.toml", environ=ENV)


@pytest.mark.parametrize(
    ("section", "environ", "message"),
    [
        ({"org": "o", "bucket": "b"}, ENV, r"coordinator\.toml: historian\.url: Field required"),
        ({"url": "ftp://h", "org": "o", "bucket": "b"}, ENV, r"historian\.url: .*http"),
        ({"url": "http://h", "org": "", "bucket": "b"}, ENV, r"historian\.org: "),
        (
            {"url": "http://h", "org": "o", "bucket": "b", "batch_size": 0},
            ENV,
            r"historian\.batch_size: Input should be greater than or equal to 1",
        ),
        (
            {"url": "http://h", "org": "o", "bucket": "b", "retries": True},
            ENV,
            r"historian\.retries: .*boolean",
        ),
        (
            {"url": "http://h", "org": "o", "bucket": "b", "flush_interval_s": "soon"},
            ENV,
            r"historian\.flush_interval_s: ",
        ),
        (
            {"url": "http://h", "org": "o", "bucket": "b", "colour": "red"},
            ENV,
            r"historian\.colour: Extra inputs are not permitted",
        ),
        (
            {"url": "http://h", "org": "o", "bucket": "b"},
            {},
            r"historian\.token_env: the environment variable WATTMESH_INFLUX_TOKEN is not set",
        ),
        (
            {"url": "http://h", "org": "o", "bucket": "b", "token_env": "no-such name"},
            ENV,
            r"historian\.token_env: must be an environment variable name",
        ),
        (
            {"url": "http://h", "org": "o", "bucket": "b", "token": "abc"},
            ENV,
            r"historian\.token: do not put the token in the file",
        ),
        (
            {
                "url": "http://h",
                "org": "o",
                "bucket": "b",
                "retry_backoff_s": 5,
                "retry_backoff_max_s": 1,
            },
            ENV,
            r"historian: .*retry_backoff_max_s must be >=",
        ),
        (
            {
                "url": "http://h",
                "org": "o",
                "bucket": "b",
                "batch_size": 500,
                "max_pending_points": 100,
            },
            ENV,
            r"max_pending_points must be >= batch_size",
        ),
    ],
)
def test_invalid_settings_name_the_file_and_field(
    section: dict[str, object], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(HistorianConfigError, match=message) as info:
        HistorianSettings.from_mapping(section, "coordinator.toml", environ=environ)
    assert str(info.value).startswith("coordinator.toml: historian")
    assert "s3cret" not in str(info.value)


def test_all_errors_are_reported_at_once() -> None:
    with pytest.raises(HistorianConfigError) as info:
        HistorianSettings.from_mapping({"batch_size": -1, "token": "x"}, "c.toml", environ={})
    text = str(info.value)
    for field in (
        "historian.url",
        "historian.org",
        "historian.bucket",
        "historian.batch_size",
        "historian.token:",
        "historian.token_env",
    ):
        assert field in text
