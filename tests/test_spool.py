"""The edge's store-and-forward spool, on real SQLite files."""

from __future__ import annotations

import itertools
import logging
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections import deque
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from edge.spool import Spool, SpoolCorrupt, SpooledMessage, SpoolError

TOPIC = "wattmesh/v1/site/home/telemetry"
T0 = 1_782_043_200.0
REPO = Path(__file__).resolve().parents[1]


def size_of(topic: str, payload: bytes) -> int:
    return len(topic.encode()) + len(payload)


def fill(spool: Spool, n: int, *, start: int = 0) -> list[int]:
    return [spool.append(TOPIC, b"m%d" % i, T0 + i) for i in range(start, start + n)]


# -- order, timestamps, ack --------------------------------------------------------------


def test_replays_in_order_with_original_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "spool.db"
    sent = [
        ("wattmesh/v1/site/home/telemetry", b'{"power_w": 1200.5}', T0 + 0.25),
        ("wattmesh/v1/site/home/bid", b"\x00\xff binary", T0 - 3600.0),  # older ts, later seq
        ("wattmesh/v1/site/h\u00e9me/telemetry", b"", T0 + 1e-6),
    ]
    with Spool(path) as spool:
        seqs = [spool.append(*message) for message in sent]
        assert seqs == [1, 2, 3]
        expected = [SpooledMessage(seq, *message) for seq, message in zip(seqs, sent, strict=True)]
        assert spool.peek() == expected
        assert spool.peek(2) == expected[:2]
        assert spool.peek(0) == []
        assert spool.peek() == expected, "peek must not remove anything"
        assert len(spool) == 3
        assert spool.bytes_used == sum(size_of(t, p) for t, p, _ in sent)
    with Spool(path) as spool:
        assert spool.peek() == expected
        assert spool.append(TOPIC, b"4", T0) == 4


def test_append_many_is_one_transaction_returning_the_last_seq(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db") as spool:
        assert spool.append_many([]) == 0
        assert spool.append_many((TOPIC, b"%d" % i, T0 + i) for i in range(5)) == 5
        assert spool.append(TOPIC, b"5", T0 + 5) == 6
        with pytest.raises(ValueError, match="finite"):
            spool.append_many([(TOPIC, b"ok", T0), (TOPIC, b"bad", float("nan"))])
        with pytest.raises(TypeError, match="payload str"):
            spool.append_many([(TOPIC, "not bytes", T0)])  # type: ignore[list-item]
        assert len(spool) == 6
        assert [m.payload for m in spool.peek()] == [b"%d" % i for i in range(6)]
        assert [m.ts for m in spool.peek()] == [T0 + i for i in range(6)]
        assert spool.append_many([]) == 6


def test_ack_removes_exactly_up_to_seq(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db") as spool:
        seqs = fill(spool, 10)
        assert spool.ack(0) == 0
        assert spool.ack(seqs[3]) == 4
        assert [m.seq for m in spool.peek()] == seqs[4:]
        assert spool.ack(seqs[3]) == 0, "acking again removes nothing"
        assert spool.ack(seqs[1]) == 0
        assert spool.ack(seqs[4]) == 1
        assert spool.bytes_used == sum(size_of(TOPIC, b"m%d" % i) for i in range(5, 10))
        with pytest.raises(ValueError, match="last seq appended is 10"):
            spool.ack(11)
        assert spool.stats() == {
            "messages": 5,
            "bytes": spool.bytes_used,
            "dropped": 0,
            "appended_total": 10,
            "replayed_total": 5,
        }
        assert spool.ack(seqs[-1]) == 5
        assert len(spool) == 0
        assert spool.bytes_used == 0


def test_seq_is_never_reused_after_emptying_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path) as spool:
        fill(spool, 3)
        spool.ack(3)
        assert spool.append(TOPIC, b"x", T0) == 4
        spool.ack(4)
    with Spool(path) as spool:
        assert len(spool) == 0
        assert spool.append(TOPIC, b"y", T0) == 5
        assert spool.stats()["replayed_total"] == 4


# -- bounds ------------------------------------------------------------------------------


def test_count_bound_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path, max_messages=5) as spool:
        fill(spool, 8)
        assert len(spool) == 5
        assert spool.dropped == 3
        assert [m.payload for m in spool.peek()] == [b"m%d" % i for i in range(3, 8)]
        assert [m.seq for m in spool.peek()] == [4, 5, 6, 7, 8]
        assert spool.append_many((TOPIC, b"m%d" % i, T0 + i) for i in range(8, 20)) == 20
        assert [m.seq for m in spool.peek()] == [16, 17, 18, 19, 20], "keeps the newest"
        assert spool.dropped == 15
    with Spool(path, max_messages=5) as spool:
        assert spool.dropped == 15, "dropped is persisted"
        assert spool.stats() == {
            "messages": 5,
            "bytes": 5 * size_of(TOPIC, b"m10"),
            "dropped": 15,
            "appended_total": 20,
            "replayed_total": 0,
        }


def test_bytes_bound_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    topic = "t"  # 1 byte, so each message is 1 + payload bytes
    with Spool(path, max_bytes=100) as spool:
        for size in (30, 30, 30):  # 31 + 31 + 31 = 93 bytes
            spool.append(topic, b"a" * size, T0)
        assert spool.dropped == 0
        assert spool.bytes_used == 93
        spool.append(topic, b"b" * 59, T0)  # 60 bytes: two 31-byte messages must go
        assert spool.dropped == 2
        assert spool.bytes_used == 91
        assert [len(m.payload) for m in spool.peek()] == [30, 59]
        spool.append(topic, b"c" * 99, T0)  # exactly max_bytes: everything else goes
        assert [m.payload for m in spool.peek()] == [b"c" * 99]
        assert spool.dropped == 4
        with pytest.raises(ValueError, match="exceeds the spool's max_bytes 100"):
            spool.append(topic, b"d" * 100, T0)
        assert spool.dropped == 4
        assert len(spool) == 1
    with Spool(path, max_bytes=100) as spool:
        assert spool.dropped == 4
        assert spool.bytes_used == 100


def test_reopening_with_smaller_bounds_drops_the_oldest(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path) as spool:
        fill(spool, 10)
    with Spool(path, max_messages=4) as spool:
        assert [m.seq for m in spool.peek()] == [7, 8, 9, 10]
        assert spool.dropped == 6
    with Spool(path) as spool:
        assert spool.dropped == 6
        assert len(spool) == 4


def test_dropping_is_logged_once_per_episode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge.spool")
    with Spool(tmp_path / "spool.db", max_messages=2) as spool:
        fill(spool, 10)
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert "dropping the oldest" in caplog.records[0].getMessage()
        spool.ack(spool.peek(1)[0].seq)
        fill(spool, 5)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Spool(tmp_path / "a.db", max_messages=0)
    with pytest.raises(ValueError, match="at least 1"):
        Spool(tmp_path / "a.db", max_bytes=0)
    with Spool(tmp_path / "spool.db") as spool:
        with pytest.raises(ValueError, match="finite"):
            spool.append(TOPIC, b"x", float("inf"))
        with pytest.raises(TypeError):
            spool.append(TOPIC, "x", T0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="limit"):
            spool.peek(-1)
        assert len(spool) == 0
    with pytest.raises(SpoolError, match="is closed"):
        spool.append(TOPIC, b"x", T0)
    spool.close()  # idempotent


# -- crashes -----------------------------------------------------------------------------


def run_and_kill(code: str, *args: str) -> str:
    """Run ``code`` in a fresh interpreter that SIGKILLs itself; returns its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc.stdout


def test_survives_a_sigkilled_writer(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    n = 500
    out = run_and_kill(
        """
        import os, signal, sys
        from edge.spool import Spool
        spool = Spool(sys.argv[1])
        for i in range(int(sys.argv[2])):
            seq = spool.append("wattmesh/v1/site/home/telemetry", b"%d" % i, 1782043200.0 + i)
        print(seq, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        str(path),
        str(n),
    )
    assert int(out) == n
    wal = path.with_name(path.name + "-wal")
    assert wal.exists(), "the writer never closed the file: its data lives in the WAL"
    assert wal.stat().st_size > 0
    with Spool(path) as spool:
        assert len(spool) == n
        assert spool.peek(n + 1) == [
            SpooledMessage(i + 1, TOPIC, b"%d" % i, T0 + i) for i in range(n)
        ]
        assert spool.append(TOPIC, b"next", T0) == n + 1


def test_counters_survive_a_sigkilled_writer(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    out = run_and_kill(
        """
        import os, signal, sys
        from edge.spool import Spool
        spool = Spool(sys.argv[1], max_messages=50)
        for i in range(100):
            spool.append("t", b"%d" % i, float(i))
        spool.ack(70)
        spool.append_many(("t", b"%d" % i, float(i)) for i in range(100, 110))
        print(spool.stats(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        str(path),
    )
    with Spool(path, max_messages=50) as spool:
        assert str(spool.stats()) == out.strip()
        assert spool.stats() == {
            "messages": 40,
            "bytes": 30 * len("t70") + 10 * len("t100"),
            "dropped": 50,
            "appended_total": 110,
            "replayed_total": 20,
        }
        assert [m.seq for m in spool.peek(100)] == list(range(71, 111))


# -- bad files ---------------------------------------------------------------------------


def test_garbage_file_is_moved_aside_and_a_new_spool_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    garbage = b"this is not an SQLite database, it is a torn write\n" * 200
    path.write_bytes(garbage)
    with Spool(path) as spool:
        moved = spool.quarantined
        assert moved is not None
        assert moved.parent == tmp_path
        assert moved.name.startswith("spool.db.corrupt-")
        assert moved.read_bytes() == garbage
        assert len(spool) == 0
        assert spool.append(TOPIC, b"x", T0) == 1
    assert any(
        r.levelno == logging.WARNING
        and str(path) in r.getMessage()
        and str(moved) in r.getMessage()
        for r in caplog.records
    )
    with Spool(path) as spool:
        assert spool.quarantined is None
        assert len(spool) == 1


def corrupt_pages(path: Path) -> None:
    """Overwrite every page but the first (header and schema) with garbage."""
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    assert len(data) > 2 * page
    data[page:] = b"\xa5" * (len(data) - page)
    path.write_bytes(bytes(data))


def test_damaged_pages_are_detected_at_start_up(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path) as spool:
        fill(spool, 200)
    corrupt_pages(path)
    with Spool(path) as spool:
        assert spool.quarantined is not None
        assert spool.quarantined.exists()
        assert len(spool) == 0
        assert spool.stats()["appended_total"] == 0


def test_corrupt_file_raises_naming_the_path_without_recovery(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(SpoolCorrupt, match=str(path)) as info:
        Spool(path, recover_corrupt=False)
    assert info.value.path == path
    assert path.read_bytes() == b"\x00garbage" * 1000, "left where it is"
    assert list(tmp_path.iterdir()) == [path]


def test_a_foreign_database_is_refused_not_moved(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE trades (id INTEGER PRIMARY KEY)")
    conn.close()
    with pytest.raises(SpoolError, match="not a wattmesh spool") as info:
        Spool(path)
    assert not isinstance(info.value, SpoolCorrupt)
    assert str(path) in str(info.value)
    assert list(tmp_path.iterdir()) == [path]


def test_a_spool_in_use_by_another_owner_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path) as spool:
        spool.append(TOPIC, b"x", T0)
        with pytest.raises(SpoolError, match="in use") as info:
            Spool(path)
        assert not isinstance(info.value, SpoolCorrupt)
        assert spool.append(TOPIC, b"y", T0) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool.db"]


def test_an_unopenable_path_raises_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "a-directory"
    path.mkdir()
    with pytest.raises(SpoolError, match=str(path)):
        Spool(path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpoolError, match="directory"):
        Spool(blocker / "spool.db")


# -- property: any interleaving keeps FIFO order and the counts --------------------------

topics = st.text(st.characters(codec="utf-8"), min_size=1, max_size=3)
payloads = st.binary(max_size=16)
timestamps = st.floats(allow_nan=False, allow_infinity=False)
messages = st.tuples(topics, payloads, timestamps)


class SpoolModel(RuleBasedStateMachine):
    """The spool against a deque that drops from the left."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-model-"))
        self.path = self.dir / "spool.db"
        self.spool: Spool | None = None
        self.model: deque[SpooledMessage] = deque()
        self.appended = self.acked = self.dropped = 0

    @initialize(max_messages=st.integers(1, 8), max_bytes=st.integers(1, 60))
    def open_spool(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.spool = Spool(self.path, max_messages, max_bytes)

    @property
    def live(self) -> Spool:
        assert self.spool is not None
        return self.spool

    def model_bytes(self) -> int:
        return sum(size_of(m.topic, m.payload) for m in self.model)

    def model_append(self, items: list[tuple[str, bytes, float]]) -> None:
        for topic, payload, ts in items:
            self.appended += 1
            self.model.append(SpooledMessage(self.appended, topic, payload, ts))
        while len(self.model) > self.max_messages or self.model_bytes() > self.max_bytes:
            self.model.popleft()
            self.dropped += 1

    def fits(self, items: list[tuple[str, bytes, float]]) -> bool:
        return all(size_of(topic, payload) <= self.max_bytes for topic, payload, _ in items)

    @rule(message=messages)
    def append(self, message: tuple[str, bytes, float]) -> None:
        if not self.fits([message]):
            with pytest.raises(ValueError, match="max_bytes"):
                self.live.append(*message)
            return
        assert self.live.append(*message) == self.appended + 1
        self.model_append([message])

    @rule(items=st.lists(messages, max_size=10))
    def append_many(self, items: list[tuple[str, bytes, float]]) -> None:
        if not self.fits(items):
            with pytest.raises(ValueError, match="max_bytes"):
                self.live.append_many(items)
            return
        assert self.live.append_many(items) == self.appended + len(items)
        self.model_append(items)

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        up_to = data.draw(st.integers(0, self.appended), label="up_to")
        expected = sum(1 for m in self.model if m.seq <= up_to)
        assert self.live.ack(up_to) == expected
        while self.model and self.model[0].seq <= up_to:
            self.model.popleft()
        self.acked += expected

    @rule()
    def reopen(self) -> None:
        self.live.close()
        self.spool = Spool(self.path, self.max_messages, self.max_bytes)

    @invariant()
    def matches_the_model(self) -> None:
        if self.spool is None:
            return
        spool = self.spool
        assert spool.peek(1000) == list(self.model)
        assert len(spool) == self.appended - self.acked - self.dropped
        assert spool.stats() == {
            "messages": len(self.model),
            "bytes": self.model_bytes(),
            "dropped": self.dropped,
            "appended_total": self.appended,
            "replayed_total": self.acked,
        }
        seqs = [m.seq for m in self.model]
        assert seqs == list(range(self.appended - len(seqs) + 1, self.appended + 1))

    def teardown(self) -> None:
        if self.spool is not None:
            self.spool.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestSpoolModel = SpoolModel.TestCase
TestSpoolModel.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


# -- the outbox: the spool fails, the agent does not -----------------------------------------


class _Wall:
    """A wall clock the test moves (s)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_outbox_sends_direct_or_drops_while_the_spool_fails_and_reopens_a_corrupt_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edge.outbox import Outbox

    path = tmp_path / "spool.sqlite"
    wall = _Wall()
    outbox = Outbox(path, 1000, retry_max_s=8.0, wall=wall)
    assert outbox.put(TOPIC, b"a", T0, connected=False) == "spooled"
    # The file is damaged under the running agent.
    assert outbox.spool is not None
    outbox.spool.close()
    path.write_bytes(b"this is not an SQLite database at all" * 200)
    with caplog.at_level(logging.WARNING, logger="edge.outbox"):
        assert outbox.put(TOPIC, b"b", T0 + 1, connected=True) == "direct"
        assert outbox.state == "degraded"
        assert outbox.put(TOPIC, b"c", T0 + 2, connected=False) == "dropped"
        assert outbox.put(TOPIC, b"d", T0 + 3, connected=False) == "dropped"
        assert outbox.peek(10) == []  # nothing is read from a degraded spool
        wall.t += 8.0  # past the first retry (at most retry_max_s)
        assert outbox.put(TOPIC, b"e", T0 + 4, connected=False) == "spooled"
    assert outbox.state == "ok"
    assert list(outbox.live) == [(TOPIC, b"b")]
    assert (outbox.direct, outbox.dropped) == (1, 2)
    assert [m.payload for m in outbox.peek(10)] == [b"e"]  # a fresh spool
    assert list(tmp_path.glob("spool.sqlite.corrupt-*"))  # the damaged file was kept aside
    logged = [r.getMessage() for r in caplog.records]
    assert sum("running degraded" in m for m in logged) == 1
    assert sum("dropping telemetry" in m for m in logged) == 1
    assert sum("works again; 2 telemetry" in m for m in logged) == 1
    outbox.close()


def test_the_outbox_backs_off_between_attempts_on_an_unusable_spool(tmp_path: Path) -> None:
    from edge.outbox import Outbox

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    wall = _Wall()
    outbox = Outbox(blocker / "spool.sqlite", 1000, retry_max_s=4.0, wall=wall)
    assert outbox.state == "degraded"
    attempts = []
    for _ in range(400):  # 40 s in steps of 0.1 s: the delays grow to 4 s and stay there
        wall.t += 0.1
        before = outbox._retry_at
        outbox.put(TOPIC, b"x", T0, connected=False)
        if outbox._retry_at != before:
            attempts.append(wall.t)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert 8 <= len(attempts) <= 25
    assert max(gaps) <= 4.0 + 0.1 + 1e-9  # the cap, plus the 0.1 s step
    assert gaps[-1] >= 2.0 - 1e-9  # jittered, but no less than half the cap
    assert outbox.dropped == 400
