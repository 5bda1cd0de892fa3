"""Telemetry ingest in worker processes, on an MQTT 5 shared subscription.

With ``[coordinator] ingest_workers = N`` the coordinator starts N worker processes. Each
connects as its own broker user (``{coordinator}-ingest-{i}``: a client id belongs to one user)
and subscribes to ``$share/{group}/wattmesh/v1/site/+/telemetry``: the broker hands each
telemetry message to exactly one of them. A worker does what costs most per message: reading
MQTT (paho's read path and the PUBACK), validating the JSON (the same pydantic model) and
summarising it (:func:`coordinator.plausibility.summarise`). It sends the main process, per
message, the site (from the topic), the message id, the summary and the raw JSON.

Everything that needs a site's state or the coordinator's clock stays in the main process,
which applies the records through :meth:`coordinator.service.Coordinator.ingest_reading`,
the very code the in-process path runs: the dedupe high-water mark, the limits fixed at a
site's first report, the plausibility checks, metering, history and the latest reading. Bids,
status and dispatch acknowledgements stay there too: few, and they need its state at once.

Why per message, not per site and interval: Mosquitto (2.0) hands the messages of a shared
subscription out round-robin, message by message, not by site, so one site's readings reach
several workers, and metering (sample and hold between consecutive readings) and the dedupe
mark need them in order in one place. At 1 Hz telemetry and 0.1 s batches a site has at most
one reading in a batch anyway.

Order: the main process asks every worker for its batch at once (epoch k) and applies epoch k
only once every live worker has answered the epochs of the next ``REORDER_WINDOW_S``
(:func:`merge_epochs`): a site's reading read by one worker after a barrier is applied in ts
order before a later reading that another worker read before it. Mosquitto hands each message
to a worker when it arrives, so a worker that falls behind (less CPU for a while) can still
hand over a site's reading after a newer one was applied: the coordinator then meters it in
its place among the site's last ``RECENT_READINGS`` readings (``reordered=True`` of
:meth:`~coordinator.service.Coordinator.ingest_reading`; a copy of a reading already taken is
still a duplicate by its id, and an older one beyond those is counted as a duplicate, as
in-process ingest counts any older reading).

Behind a listener's mount point (a many-feeders broker, broker/feeders.py) the workers log in
on a listener without one (``[broker] ingest_port``: the operator listener) and subscribe to
``$share/{group}/feeder/{id}/wattmesh/v1/site/+/telemetry``. Verified on Mosquitto 2.0.11
(tests/test_feeders_ingest.py): a listener's mount point goes in front of the whole filter,
``$share`` included, so ``$share/g/wattmesh/v1/site/+/telemetry`` through a listener with
``mount_point feeder/north/`` becomes the ordinary subscription
``feeder/north/$share/g/wattmesh/v1/site/+/telemetry`` (SUBACK granted, QoS 1), whose literal
``$share`` and ``g`` levels match no published topic: nothing is ever delivered. Mosquitto
recognises a shared subscription only when ``$share`` is the first level (topic_tok.c), after
handle_subscribe.c has added the mount point; 2.0.22's source does the same (read, not run).

Worker lifecycle: a worker dies with the coordinator (the kernel's parent-death signal, and
end of file on its pipe); when one dies, the coordinator logs it and starts it again after a
growing delay. Its persistent session (``WORKER_SESSION_EXPIRY_S``) keeps the share the broker
queued for it meanwhile; what it had read but not yet handed over (at most one batch, already
acknowledged to the broker) is lost, which metering's sample and hold bridges.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import itertools
import logging
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType

from pydantic import ValidationError

from broker import topics
from broker.client import BusClient, BusSettings
from broker.messages import Telemetry
from coordinator import plausibility as pl

log = logging.getLogger(__name__)

#: A validated reading: (site, message id, summary, the message's JSON).
Record = tuple[str, str, pl.ReadingSummary, bytes]
#: A message that failed validation: (site, the first line of the error).
Invalid = tuple[str, str]
#: Seconds the broker keeps a worker's session (and queues its share) while it is away: long
#: enough for a restart, short enough that a worker given up (N lowered) stops taking a share.
WORKER_SESSION_EXPIRY_S = 120
#: Delay before restarting a dead worker (doubling up to the maximum), seconds.
RESTART_INITIAL_S = 0.5
RESTART_MAX_S = 30.0
#: How long (wall s) the coordinator holds the workers' batches back to put each site's readings
#: in order: a worker may read its share up to this much later than another reads its own.
REORDER_WINDOW_S = 0.3
#: Records applied in one turn of the event loop (about 10 us each in the coordinator).
APPLY_CHUNK = 2000
#: How much lower the workers' CPU priority is than the coordinator's: at a gate the market and
#: grid decisions go first, and the telemetry waits a moment in the workers' socket buffers.
WORKER_NICE = 5
#: What a worker process runs (``python -m``).
WORKER_MODULE = "coordinator.ingest"

_TELEMETRY_PREFIX = f"{topics.PREFIX}/site/"
_TELEMETRY_SUFFIX = "/telemetry"


def shared_topic(group: str, root: str = "") -> str:
    """The shared subscription the workers of ``group`` take their share of telemetry from;
    ``root`` (a feeder's mount point, ``feeder/{id}/``) in front of the telemetry topics when
    the workers read a many-feeders broker on its listener without a mount point."""
    return f"$share/{group}/{root}{topics.site_wildcard('telemetry')}"


def error_line(err: BaseException) -> str:
    """The first line of an error (at most 200 characters), or its type's name."""
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def reduce_message(topic: str, payload: bytes) -> Record | Invalid | None:
    """A telemetry message as the main process needs it: a :data:`Record` when it is a valid
    reading, an :data:`Invalid` when it is not, None when the topic is not a site's telemetry.
    Pure; the same validation as :meth:`coordinator.service.Coordinator.handle`."""
    if not (topic.startswith(_TELEMETRY_PREFIX) and topic.endswith(_TELEMETRY_SUFFIX)):
        return None
    site = topic[len(_TELEMETRY_PREFIX) : -len(_TELEMETRY_SUFFIX)]
    if "/" in site or not site:
        return None
    try:
        msg = Telemetry.model_validate_json(payload)
    except (ValidationError, ValueError, RecursionError, MemoryError) as err:
        return site, error_line(err)
    return site, msg.id, pl.summarise(msg), payload


def merge_epochs(epochs: Sequence[Sequence[Record]]) -> tuple[list[Record], list[list[Record]]]:
    """(apply now, keep): from the records of consecutive epochs, oldest first, apply all of
    the oldest epoch's and every later one no newer than its site's newest in the oldest epoch
    (read by a slower worker after a barrier), in ts order; keep the rest, by epoch.

    Each worker reads a site's readings in the order the broker sent them, so a reading that
    crossed up to ``len(epochs) - 1`` barriers is put back in order here.
    """
    if not epochs:
        return [], []
    newest: dict[str, float] = {}
    for site, _, s, _ in epochs[0]:
        if s.ts > newest.get(site, -math.inf):
            newest[site] = s.ts
    now = list(epochs[0])
    keep: list[list[Record]] = []
    for epoch in itertools.islice(epochs, 1, None):
        later = []
        for record in epoch:
            if record[2].ts <= newest.get(record[0], -math.inf):
                now.append(record)
            else:
                later.append(record)
        keep.append(later)
    now.sort(key=lambda r: r[2].ts)
    return now, keep


# -- the worker process ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What one worker process needs: its index, connection (its own user) and group."""

    index: int
    bus: BusSettings
    group: str
    log_level: int = logging.WARNING
    #: The feeder's mount point, in front of the subscribed telemetry topics (see
    #: :func:`shared_topic`); ``bus.mount_point`` takes it off the delivered ones.
    topic_root: str = ""


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the parent dies; exit now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(0)


def worker_main(argv: Sequence[str]) -> None:
    """A worker process's entry point (``python -m coordinator.ingest FD PARENT_PID``, its
    :class:`WorkerSpec` pickled on stdin): serve on the socket FD until the coordinator says
    stop or goes away. A process of its own, not a fork: it imports only what ingest needs."""
    fd, parent_pid = int(argv[0]), int(argv[1])
    _die_with_parent(parent_pid)
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICE)
    spec = pickle.loads(sys.stdin.buffer.read())  # from our parent only: stdin is its pipe
    conn = Connection(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the coordinator: it stops us
    logging.basicConfig(
        level=spec.log_level, format=f"ingest-{spec.index} %(levelname)s %(message)s"
    )
    asyncio.run(_serve(spec, conn))


async def _serve(spec: WorkerSpec, conn: Connection) -> None:
    records: list[Record] = []
    invalid: list[Invalid] = []
    stop = asyncio.Event()

    def on_message(topic: str, payload: bytes) -> bool:
        reduced = reduce_message(topic, payload)
        if reduced is None:
            return True
        if len(reduced) == 2:
            invalid.append(reduced)
        else:
            records.append(reduced)
        return True

    bus = BusClient(spec.bus, fast_handler=on_message)

    def on_request() -> None:
        try:
            epoch = conn.recv()
        except (EOFError, OSError):
            stop.set()
            return
        if epoch is None:
            stop.set()
            return
        batch = (epoch, bus.connected, records[:], invalid[:])
        records.clear()
        invalid.clear()
        try:
            conn.send_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            stop.set()

    loop = asyncio.get_running_loop()
    loop.add_reader(conn.fileno(), on_request)
    try:
        async with bus:
            await bus.subscribe(shared_topic(spec.group, spec.topic_root))
            await stop.wait()
    finally:
        loop.remove_reader(conn.fileno())


# -- the pool, in the coordinator ------------------------------------------------------------


@dataclass
class _Worker:
    spec: WorkerSpec
    process: subprocess.Popen[bytes] | None = None
    conn: Connection | None = None
    connected: bool = False
    answered: int = -1  # the last epoch it answered
    restart_delay_s: float = 0.0
    restart_at: float = 0.0
    started_at: float = 0.0


@dataclass
class IngestStats:
    """Counters of the ingest workers."""

    batches: int = 0
    records: int = 0
    #: Valid readings received from each worker (by index).
    per_worker: dict[int, int] = field(default_factory=dict)
    invalid: int = 0
    deaths: int = 0
    restarts: int = 0
    #: Exit codes of the workers that died, newest last (at most 100).
    exit_codes: list[int | None] = field(default_factory=list)


Deliver = Callable[[list[Record], list[Invalid]], None]


class IngestPool:
    """N ingest worker processes and the barrier that collects their batches. ``async with``.

    ``deliver(records, invalid)`` is called in the event loop with each epoch's records in
    the order to apply them and the invalid messages reported.
    """

    def __init__(self, specs: Sequence[WorkerSpec], flush_s: float, deliver: Deliver) -> None:
        if not specs:
            raise ValueError("an ingest pool needs at least one worker")
        self.workers = [_Worker(spec) for spec in specs]
        self.flush_s = flush_s
        self.deliver = deliver
        self.stats = IngestStats()
        self._epoch = 0
        self._waiting: set[int] = set()  # workers that have not answered the current epoch
        self._arrived: list[Record] = []
        #: Epochs answered but not yet applied, oldest first: each is applied when
        #: ``hold_epochs`` more have been answered.
        self._held: deque[list[Record]] = deque()
        self.hold_epochs = max(1, math.ceil(REORDER_WINDOW_S / flush_s))
        #: Records merged and in order, delivered ``APPLY_CHUNK`` at a time.
        self._ready: deque[Record] = deque()
        self._applying = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def connected(self) -> int:
        """How many workers are connected to the broker (as of their last batch)."""
        return sum(1 for w in self.workers if w.connected and w.process is not None)

    def pids(self) -> list[int | None]:
        """Each worker's process id (None while it is down)."""
        return [w.process.pid if w.process is not None else None for w in self.workers]

    async def __aenter__(self) -> IngestPool:
        for worker in self.workers:
            self._start(worker)
        self._task = asyncio.create_task(self._run(), name="coordinator-ingest-pool")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._drain(2.0)
        self._closing = True
        loop = asyncio.get_running_loop()
        for worker in self.workers:
            if worker.conn is not None:
                loop.remove_reader(worker.conn.fileno())
                with contextlib.suppress(OSError):
                    worker.conn.send(None)
        await asyncio.to_thread(self._join_all, 5.0)
        for worker in self.workers:
            if worker.conn is not None:
                worker.conn.close()
                worker.conn = None

    async def _drain(self, timeout_s: float) -> None:
        """Collect one last batch from every worker and apply everything held."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._waiting:  # noqa: ASYNC110 - answers come through pipe readers
                    await asyncio.sleep(0.01)
                self._request()
                while self._waiting:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        self._held.append(self._arrived)
        self._arrived = []
        records = [r for epoch in self._held for r in epoch]
        self._held.clear()
        records.sort(key=lambda r: r[2].ts)
        records = [*self._ready, *records]  # what was merged already goes first
        self._ready.clear()
        if records:
            self.deliver(records, [])

    def _request(self) -> None:
        """Ask every live worker for its batch of the next epoch."""
        self._epoch += 1
        for worker in self.workers:
            if worker.conn is None:
                continue
            try:
                worker.conn.send(self._epoch)
            except OSError:
                self._died(worker)
                continue
            self._waiting.add(worker.spec.index)

    def _join_all(self, timeout_s: float) -> None:
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("ingest worker %d did not stop: terminating it", worker.spec.index)
                process.terminate()
                try:
                    process.wait(2.0)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(1.0)

    def _start(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parent.parent)  # where the packages are
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, path] if path else [root])}
        with theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, str(theirs.fileno()), str(os.getpid())],
                stdin=subprocess.PIPE,
                pass_fds=[theirs.fileno()],
                env=env,
            )
        assert process.stdin is not None
        with process.stdin:
            process.stdin.write(pickle.dumps(worker.spec))
        parent = Connection(ours.detach())
        worker.process, worker.conn, worker.connected = process, parent, False
        worker.answered = self._epoch  # it joins at the next epoch
        worker.started_at = asyncio.get_running_loop().time()
        asyncio.get_running_loop().add_reader(parent.fileno(), self._on_reply, worker)
        log.info("ingest worker %d started (pid %s)", worker.spec.index, process.pid)

    def _close(self, worker: _Worker) -> None:
        """Close the pipe to a worker (in the event loop: its reader goes first)."""
        if worker.conn is not None:
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
            worker.conn.close()
        worker.conn = None

    def _on_reply(self, worker: _Worker) -> None:
        conn = worker.conn
        if conn is None:
            return
        try:
            epoch, connected, records, invalid = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            self._died(worker)
            return
        worker.connected = connected
        worker.answered = epoch
        self.stats.batches += 1
        self.stats.records += len(records)
        i = worker.spec.index
        self.stats.per_worker[i] = self.stats.per_worker.get(i, 0) + len(records)
        self.stats.invalid += len(invalid)
        if invalid:
            self.deliver([], invalid)
        self._arrived += records
        if epoch == self._epoch:
            self._waiting.discard(worker.spec.index)
            self._complete_epoch()

    def _complete_epoch(self) -> None:
        """Apply the held epoch once every live worker has answered the current one."""
        if self._waiting:
            return
        self._held.append(self._arrived)
        self._arrived = []
        if len(self._held) <= self.hold_epochs:
            return
        now, keep = merge_epochs(self._held)
        self._held = deque(keep)
        self._ready.extend(now)
        if self._ready and not self._applying:
            self._applying = True
            asyncio.get_running_loop().call_soon(self._apply_some)

    def _apply_some(self) -> None:
        """Deliver up to ``APPLY_CHUNK`` ready records, then give the event loop a turn."""
        chunk = [self._ready.popleft() for _ in range(min(APPLY_CHUNK, len(self._ready)))]
        if chunk:
            self.deliver(chunk, [])
        if self._ready and not self._closing:
            asyncio.get_running_loop().call_soon(self._apply_some)
        else:
            self._applying = False

    def _died(self, worker: _Worker) -> None:
        if self._closing:
            return
        process = worker.process
        code = None
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = process.wait(0.5)
        self._close(worker)
        worker.process, worker.connected = None, False
        self.stats.deaths += 1
        self.stats.exit_codes = [*self.stats.exit_codes[-99:], code]
        loop = asyncio.get_running_loop()
        lived_s = loop.time() - worker.started_at
        worker.restart_delay_s = (
            RESTART_INITIAL_S
            if lived_s > 60.0 or worker.restart_delay_s <= 0
            else min(RESTART_MAX_S, 2.0 * worker.restart_delay_s)
        )
        worker.restart_at = loop.time() + worker.restart_delay_s
        log.error(
            "ingest worker %d (user %s) died with exit code %s; restarting it in %.1f s",
            worker.spec.index,
            worker.spec.bus.username,
            code,
            worker.restart_delay_s,
        )
        self._waiting.discard(worker.spec.index)
        self._complete_epoch()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.flush_s)
            for worker in self.workers:
                if worker.process is None and loop.time() >= worker.restart_at:
                    self.stats.restarts += 1
                    self._start(worker)
                elif worker.process is not None and worker.process.poll() is not None:
                    self._died(worker)  # gone without closing its pipe (should not happen)
            if not self._waiting:  # else the last epoch is still being answered
                self._request()


def worker_specs(
    settings: BusSettings,
    *,
    user: str,
    password: str,
    count: int,
    group: str,
    port: int | None = None,
) -> list[WorkerSpec]:
    """The specs of ``count`` workers: ``settings`` with each worker's own user
    (``{user}-ingest-{i}``, which the broker also takes as its client id) and ``password``.

    With a ``settings.mount_point`` the workers log in on ``port``, a listener without a mount
    point, and subscribe to the mounted telemetry topics: Mosquitto (2.0.11; the same code in
    later 2.0 releases) puts a listener's mount point in front of a ``$share/...`` filter
    (``feeder/north/$share/GROUP/...``), an ordinary subscription that matches nothing.
    ``ValueError`` for a mount point without another ``port``."""
    root = settings.mount_point or ""
    if root and port in (None, settings.port):
        raise ValueError(
            f"ingest workers behind mount point {root!r} need the port of a listener without "
            "one ([broker] ingest_port): a shared subscription behind a mount point matches "
            "nothing on Mosquitto"
        )
    from broker.mosquitto import ingest_user  # noqa: PLC0415 - Mosquitto tooling, not the bus

    level = logging.getLogger().getEffectiveLevel()
    specs = []
    for i in range(1, count + 1):
        name = ingest_user(user, i)
        bus = dataclasses.replace(
            settings,
            port=settings.port if port is None else port,
            username=name,
            client_id=name,
            password=password,
            session_expiry_s=WORKER_SESSION_EXPIRY_S,
        )
        specs.append(
            WorkerSpec(
                index=i,
                bus=bus,
                group=group,
                log_level=max(level, logging.INFO),
                topic_root=root,
            )
        )
    return specs


if __name__ == "__main__":
    worker_main(sys.argv[1:])
