"""Issue 11 at the coordinator: attacks by a member site fail harmlessly, over a real Mosquitto.

The fake meter, the reading from the future, the bid flood, bids for closed intervals and
garbage on every inbound path: each is refused, counted per site and reason, and never moves
another site's battery, inflates a settlement or grows memory without bound.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Coroutine, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import topics
from broker.clock import ManualClock
from broker.messages import Bid, BidStep, Dispatch
from broker.mosquitto import BrokerFiles, MosquittoProcess
from coordinator.ledger import Ledger
from coordinator.service import Coordinator
from tests.test_coordinator import T0, _bus, _coordinator, _dispatches, _telemetry


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def _until(predicate: object, timeout_s: float = 10.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - the coordinator counts; nothing to wait on
            await asyncio.sleep(0.02)


async def test_a_fake_meter_reading_is_refused_and_its_interval_settled_as_estimated(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    c = _coordinator(tmp_path, broker_files)
    assert isinstance(c.clock, ManualClock)
    k = int(T0 // 900)
    async with c:
        await c.bus.wait_connected(5)
        a = await _bus(broker_files, "site-a", [])
        b = await _bus(broker_files, "site-b", [])
        assert await c.clear_interval(k) is not None  # an interval with no bids
        sent = 0
        for ts in range(k * 900, (k + 1) * 900 + 1, 60):
            c.clock.ts = float(ts)
            for name, bus in (("site-a", a), ("site-b", b)):
                await bus.publish(
                    topics.site_topic(name, "telemetry"), _telemetry(ts, 1000.0).model_dump_json()
                )
                sent += 1
            await _until(lambda n=sent: c.stats.telemetry + c.stats.rejected >= n)
            if ts == k * 900 + 300:  # the attack: a meter claiming a gigawatt of export
                await a.publish(
                    topics.site_topic("site-a", "telemetry"),
                    _telemetry(ts + 1, -1e9).model_dump_json(),
                )
                sent += 1
                await _until(lambda n=sent: c.stats.telemetry + c.stats.rejected >= n)
        c.clock.ts = (k + 1) * 900 + 120.0
        c.settle_due()  # unless the settle loop was first
        assert c.ledger.is_settled(k)
        status = c.status()
        for bus in (a, b):
            await bus.__aexit__(None, None, None)
    assert status.rejected == {"site-a": {"grid_power": 1}}
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        result = ledger.settlement(k)
        assert result is not None
        assert result.site("site-a").estimated  # settled as its award (0), not as -1 GW
        assert result.site("site-a").metered_wh == 0
        assert not result.site("site-b").estimated
        assert result.site("site-b").metered_wh == 250  # 1 kW over 15 minutes
        assert abs(result.site("site-a").total_micro) < 1_000_000  # under one currency unit
        assert ledger.check_balanced()
        rejections = ledger.audit_entries(kind="rejection")
    assert [(e.actor, e.detail["reason"]) for e in rejections] == [("site-a", "grid_power")]


async def test_a_reading_from_the_future_neither_moves_the_feeder_flow_nor_orders_batteries(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    c = _coordinator(tmp_path, broker_files, period_s=0.1)
    got: list[tuple[str, bytes]] = []
    async with c:
        await c.bus.wait_connected(5)
        watcher = await _bus(broker_files, "operator", got)
        await watcher.subscribe(topics.site_wildcard("dispatch"))
        a = await _bus(broker_files, "site-a", [])
        b = await _bus(broker_files, "site-b", [])
        attacker = await _bus(broker_files, "house-1", [])
        for name, bus in (("site-a", a), ("site-b", b)):
            await bus.publish(
                topics.site_topic(name, "telemetry"),
                _telemetry(T0, 3000.0, 0.0, 50.0, rated_w=4000.0).model_dump_json(),
            )
        await _until(lambda: c.stats.telemetry == 2)
        # 50 kW stamped in 2096: it would have been the latest reading for ever.
        await attacker.publish(
            topics.site_topic("house-1", "telemetry"),
            _telemetry(4.0e9, 50_000.0).model_dump_json(),
        )
        await _until(lambda: c.stats.rejected == 1)
        await asyncio.sleep(0.5)  # several grid checks
        flow = c.feeder_flow_w()
        mode = c.mode
        # The site's honest readings still count.
        await attacker.publish(
            topics.site_topic("house-1", "telemetry"), _telemetry(T0, 1000.0).model_dump_json()
        )
        await _until(lambda: c.stats.telemetry == 3)
        honest_flow = c.feeder_flow_w()
        status = c.status()
        for bus in (a, b, attacker, watcher):
            await bus.__aexit__(None, None, None)
    assert flow == pytest.approx(6000.0)
    assert mode == "normal"
    assert _dispatches(got) == []
    assert honest_flow == pytest.approx(7000.0)
    assert status.rejected == {"house-1": {"future": 1}}


async def test_bids_for_closed_or_far_intervals_are_refused_and_a_new_bid_replaces_the_old(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    c = _coordinator(tmp_path, broker_files)
    k = int(T0 // 900) + 1  # the open interval at T0
    async with c:
        await c.bus.wait_connected(5)
        a = await _bus(broker_files, "site-a", [])
        for interval, kwh in ((k - 1, 1.0), (k + 5, 1.0), (k, 1.0), (k, 2.0), (k + 4, 1.0)):
            bid = Bid(ts=T0, interval=interval, buy=[BidStep(price_per_kwh=0.3, quantity_kwh=kwh)])
            await a.publish(topics.site_topic("site-a", "bid"), bid.model_dump_json())
        await _until(lambda: c.stats.bids + c.stats.rejected == 5)
        status = c.status()
        books = {interval: dict(b) for interval, b in c.bids.items()}
        await a.__aexit__(None, None, None)
    assert status.rejected == {"site-a": {"bid_closed": 1, "bid_too_far_ahead": 1}}
    assert sorted(books) == [k, k + 4]
    assert books[k]["site-a"].buy[0].quantity_kwh == 2.0  # the newer book


FLOOD = textwrap.dedent("""
    import json, sys, uuid
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    port, password, n, first, ts = (int(sys.argv[1]), sys.argv[2], int(sys.argv[3]),
                                    int(sys.argv[4]), float(sys.argv[5]))
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="site-a", protocol=mqtt.MQTTv5)
    c.username_pw_set("site-a", password)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = []
    for i in range(n):
        # Mostly intervals far ahead (each a new one), some closed, some valid and replaced.
        interval = first + (i if i % 3 else -1 - i % 50) if i % 7 else first + i % 4
        payload = json.dumps({"schema_version": 1, "id": uuid.uuid4().hex, "ts": ts,
            "interval": max(0, interval),
            "buy": [{"price_per_kwh": 0.3 - 0.001 * (s % 100), "quantity_kwh": 0.5}
                    for s in range(8)]})
        infos.append(c.publish("wattmesh/v1/site/site-a/bid", payload, qos=1))
        if len(infos) >= 2000:
            for info in infos:
                info.wait_for_publish()
            infos.clear()
    for info in infos:
        info.wait_for_publish()
    c.loop_stop()
    c.disconnect()
""")


async def test_a_flood_of_100k_bids_from_one_site_leaves_memory_bounded(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    flood = 100_000
    c = _coordinator(tmp_path, broker_files)
    first = int(T0 // 900) + 1
    async with c:
        await c.bus.wait_connected(5)
        gc.collect()
        before = _rss_bytes()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            FLOOD,
            str(broker_files.port),
            broker_files.credentials["site-a"],
            str(flood),
            str(first),
            str(T0),
        )
        assert await proc.wait() == 0
        await _until(lambda: c.stats.bids + c.stats.rejected >= flood, timeout_s=120)
        gc.collect()
        after = _rss_bytes()
        books = sum(len(b) for b in c.bids.values())
        status = c.status()
    assert after - before < 50 * 2**20, f"RSS grew {(after - before) / 2**20:.1f} MB"
    assert books <= c.config.trust.bids_ahead + 1  # one book per interval it may bid for
    reasons = status.rejected["site-a"]
    assert set(reasons) == {"bid_closed", "bid_too_far_ahead"}
    assert sum(reasons.values()) + c.stats.bids == flood


# --- fuzz: every inbound path of the coordinator ------------------------------------------

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=30,
)
_FIELDS = [
    "schema_version", "id", "ts", "devices", "grid_power_w", "pv_power_w", "battery_power_w",
    "load_power_w", "battery_soc_pct", "interval", "buy", "sell", "online", "role",
    "battery_power_w", "load_limit_w", "expires_ts", "priority", "command_id", "outcome",
]  # fmt: skip


@st.composite
def _message_like(draw: st.DrawFn) -> dict[str, object]:
    """Dicts with the real field names and hostile values: closer to the validators' edges."""
    keys = draw(st.lists(st.sampled_from(_FIELDS), max_size=8, unique=True))
    out: dict[str, object] = {k: draw(_json) for k in keys}
    if draw(st.booleans()):
        out.setdefault("schema_version", 1)
        out.setdefault("id", "abcdefgh1234")
        out.setdefault("ts", draw(st.floats(allow_nan=True, allow_infinity=True)))
    return out


def _run(coro: Coroutine[object, object, None]) -> None:
    """Run a handler that never awaits anything slow, without an event loop per example."""
    try:
        while True:
            coro.send(None)
    except StopIteration:
        pass


def _encode(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


_payloads = st.one_of(
    st.binary(max_size=200),
    _json.map(_encode),
    _message_like().map(_encode),
    st.integers(min_value=1, max_value=200_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=50_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(min_value=1, max_value=300_000).map(lambda n: b'{"id": "' + b"x" * n + b'"}'),
)

_KINDS = ("telemetry", "bid", "status", "dispatch", "dispatch/ack")


@pytest.fixture(scope="module")
def fuzz_coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    c = _coordinator(tmp_path_factory.mktemp("fuzz"))
    yield c
    c.ledger.close()


@settings(
    max_examples=10_000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=_payloads)
def test_no_payload_on_any_inbound_path_crashes_the_coordinator(
    fuzz_coordinator: Coordinator, payload: bytes
) -> None:
    """Each of the 10,000 payloads goes to every inbound path: 10,000 per path."""
    c = fuzz_coordinator
    for kind in _KINDS:
        before = (c.stats.telemetry, c.stats.bids, c.stats.rejected, c.stats.duplicates)
        topic = topics.site_topic("fuzz-site", kind)  # type: ignore[arg-type]
        assert c._on_fast(topic, payload)  # as it arrives over the bus
        _run(c._on_message(topic, payload))  # and through the queued path
        after = (c.stats.telemetry, c.stats.bids, c.stats.rejected, c.stats.duplicates)
        # Telemetry and bids are taken or refused (counted); the rest is refused or noted.
        assert after != before or kind in ("status", "dispatch", "dispatch/ack")


def test_a_dispatch_nested_100000_levels_deep_is_counted_as_invalid(tmp_path: Path) -> None:
    c = _coordinator(tmp_path)
    deep = b'{"ts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _run(c._on_message(topics.site_topic("site-a", "dispatch"), deep))
    assert c.stats.invalid == 1
    c.ledger.close()


def test_an_operator_order_is_audited_and_the_coordinators_own_are_not(tmp_path: Path) -> None:
    c = _coordinator(tmp_path)
    order = Dispatch(ts=T0, battery_power_w=-2000.0, expires_ts=T0 + 600, reason="test")
    _run(c._on_message(topics.site_topic("site-a", "dispatch"), order.model_dump_json().encode()))
    own = Dispatch(ts=T0, battery_power_w=1000.0, expires_ts=T0 + 60)
    c._own_dispatch_ids.append(own.id)
    _run(c._on_message(topics.site_topic("site-b", "dispatch"), own.model_dump_json().encode()))
    entries = c.ledger.audit_entries(kind="dispatch")
    c.ledger.close()
    assert [(e.actor, e.detail["site"], e.detail["battery_power_w"]) for e in entries] == [
        ("operator", "site-a", -2000.0)
    ]


async def test_a_historian_whose_buffer_cannot_be_opened_leaves_the_coordinator_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coordinator.config import parse_coordinator_config
    from tests.test_historian import free_port

    monkeypatch.setenv("WATTMESH_INFLUX_TOKEN", "unused")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the buffer's directory should be")
    config = parse_coordinator_config(
        {
            "coordinator": {"ledger": str(tmp_path / "ledger.sqlite")},
            "broker": {"port": free_port(), "password_env": None},
            "historian": {
                "url": f"http://127.0.0.1:{free_port()}",
                "org": "wattmesh",
                "bucket": "wattmesh",
                "buffer_path": str(blocker / "buffer.sqlite"),
            },
        },
        "test",
    )
    c = Coordinator(config, ManualClock(T0))
    async with c:
        assert c.ingest_telemetry("site-a", _telemetry(T0, 1234.0))
        status = c.status()
    assert c.historian is None
    assert status.historian == "failed"
    assert status.telemetry == 1


async def test_wattmesh_status_shows_the_coordinators_counters_and_the_sites(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:

    c = _coordinator(tmp_path, broker_files)
    async with c:
        await c.bus.wait_connected(5)
        site = await _bus(broker_files, "site-a", [])
        await site.publish(
            topics.site_topic("site-a", "telemetry"), _telemetry(4.0e9, 1.0).model_dump_json()
        )
        await _until(lambda: c.stats.rejected == 1)
        await c.bus.publish(
            topics.coordinator_status_topic(c.feeder), c.status().model_dump_json(), retain=True
        )
        env = {**os.environ, "WATTMESH_MONITOR_PASSWORD": broker_files.credentials["monitor"]}
        args = [
            sys.executable, "-m", "wattmesh", "status", "--port", str(broker_files.port),
            "--user", "monitor", "--password-env", "WATTMESH_MONITOR_PASSWORD", "--wait", "5",
        ]  # fmt: skip
        table = await asyncio.to_thread(
            subprocess.run, args, env=env, capture_output=True, text=True, timeout=60
        )
        as_json = await asyncio.to_thread(
            subprocess.run, [*args, "--json"], env=env, capture_output=True, text=True, timeout=60
        )
        await site.__aexit__(None, None, None)
    assert table.returncode == 0, table.stderr
    assert "rejected at ingest" in table.stdout
    assert "future" in table.stdout
    data = json.loads(as_json.stdout)
    assert data["coordinators"]["feeder-1"]["rejected"] == {"site-a": {"future": 1}}


async def test_wattmesh_status_says_when_no_coordinator_answers(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles
) -> None:

    env = {**os.environ, "WATTMESH_MONITOR_PASSWORD": broker_files.credentials["monitor"]}
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable, "-m", "wattmesh", "status", "--port", str(broker_files.port),
            "--user", "monitor", "--password-env", "WATTMESH_MONITOR_PASSWORD", "--wait", "1",
        ],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no coordinator status on the bus within 1 s" in result.stdout
