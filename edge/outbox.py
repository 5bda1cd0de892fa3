"""Telemetry's way out: the spool while it works, straight to the broker while it does not.

The agent must go on controlling its batteries whatever happens to its disk. :class:`Outbox`
wraps the :class:`~edge.spool.Spool` so that nothing it raises reaches the agent:

- ``ok``: every message is appended to the spool; the replay task publishes and removes them.
- ``degraded`` (the spool cannot be opened or written: disk full, read-only, corrupt, a path
  that cannot be a directory): a message goes to a small in-memory queue that the replay task
  publishes directly while the broker is up, and is dropped and counted while it is not. The
  spool is closed and reopened after a random, growing delay (capped at ``retry_max_s`` wall
  seconds); the first message that is spooled again ends the episode. Opening a spool found
  corrupt moves it aside (see :mod:`edge.spool`).

It logs once when an episode starts, once when it starts dropping, and once when it recovers.
While degraded, messages published directly may overtake older ones still in the spool;
receivers are idempotent on ``id`` and use each message's own ``ts``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from broker.client import next_backoff_s
from edge.spool import Spool, SpooledMessage, SpoolError

__all__ = ["Outbox", "OutboxState"]

log = logging.getLogger(__name__)

OutboxState = Literal["ok", "degraded"]
#: The first retry of an unusable spool waits about this long, wall seconds.
RETRY_INITIAL_S = 1.0
#: Messages waiting in memory for a direct publish while the spool is unusable.
LIVE_MAX_MESSAGES = 1000


class Outbox:
    """The agent's outgoing telemetry, on disk when possible (see the module docstring).

    Args:
        path: the spool file.
        max_messages: the spool's bound.
        retry_max_s: the longest wait between attempts to use an unusable spool, wall s.
        wall: a monotonic wall clock (s), for the retry delays.
    """

    def __init__(
        self,
        path: Path,
        max_messages: int,
        *,
        retry_max_s: float = 60.0,
        wall: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.max_messages = max_messages
        self.retry_max_s = retry_max_s
        self._wall = wall
        self.spool: Spool | None = None
        self.state: OutboxState = "ok"
        #: Messages lost: neither spooled nor published (plus those the spool's bound pushed out).
        self.dropped = 0
        #: Messages handed to the direct path because the spool was unusable.
        self.direct = 0
        self.live: deque[tuple[str, bytes]] = deque()
        self._delay_s = 0.0
        self._retry_at = 0.0
        self._dropping = False
        self._episode_dropped = 0
        self._peeked_from: Spool | None = None
        try:
            self.spool = self._open()
        except SpoolError as err:
            log.error(  # noqa: TRY400 - the reason is the message; no traceback wanted
                "NO SPOOL: %s. The agent runs DEGRADED: it controls its devices and publishes "
                "telemetry directly while the broker is up, and drops (counts) it while it "
                "is not; it retries the spool with backoff",
                err,
            )
            self._degrade()

    def _open(self) -> Spool:
        return Spool(self.path, max_messages=self.max_messages)

    def _degrade(self) -> None:
        """Enter (or stay in) the degraded state; the next retry waits longer."""
        if self.state == "ok":
            self.state = "degraded"
            self._dropping = False
            self._episode_dropped = 0
        self._delay_s = next_backoff_s(self._delay_s, RETRY_INITIAL_S, self.retry_max_s)
        self._retry_at = self._wall() + self._delay_s
        if self.spool is not None:
            with contextlib.suppress(SpoolError):
                self.spool.close()
            self.spool = None

    def fail(self, err: SpoolError) -> None:
        """The spool failed (from the replay side): degrade, logging once per episode."""
        if self.state == "ok":
            log.error(
                "spool unusable: %s; running degraded (telemetry goes directly to the broker "
                "while it is up, is dropped and counted while it is not), retrying with backoff",
                err,
            )
        self._degrade()

    def _append(self, topic: str, payload: bytes, ts: float) -> bool:
        """Append to the spool; False (and degraded) when it cannot be used."""
        if self.state == "degraded":
            if self._wall() < self._retry_at:
                return False
            try:
                self.spool = self._open()
            except SpoolError as err:
                log.debug("spool still unusable: %s", err)
                self._degrade()
                return False
        assert self.spool is not None
        before = self.spool.dropped
        try:
            self.spool.append(topic, payload, ts)
        except SpoolError as err:
            self.fail(err)
            return False
        self.dropped += self.spool.dropped - before
        if self.state == "degraded":
            log.warning(
                "spool %s works again; %d telemetry message(s) were dropped meanwhile",
                self.path,
                self._episode_dropped,
            )
            self.state, self._delay_s = "ok", 0.0
        return True

    def put(
        self, topic: str, payload: bytes, ts: float, *, connected: bool
    ) -> Literal["spooled", "direct", "dropped"]:
        """Spool one message, or send it the direct way, or drop and count it; says which.

        Never raises for the spool's sake (``ValueError``/``TypeError`` for a malformed
        message remain).
        """
        if self._append(topic, payload, ts):
            return "spooled"
        if connected and len(self.live) < LIVE_MAX_MESSAGES:
            self.live.append((topic, payload))
            self.direct += 1
            return "direct"
        self.dropped += 1
        self._episode_dropped += 1
        if not self._dropping:
            self._dropping = True
            log.warning(
                "dropping telemetry: the spool is unusable and the broker is unreachable "
                "(counted in the status; logged once per episode)"
            )
        return "dropped"

    def peek(self, limit: int) -> list[SpooledMessage]:
        """The oldest spooled messages; none while degraded."""
        if self.state != "ok" or self.spool is None:
            return []
        self._peeked_from = self.spool
        try:
            return self.spool.peek(limit)
        except SpoolError as err:
            self.fail(err)
            return []

    def ack(self, up_to_seq: int) -> None:
        """Remove what was published; a failure degrades (they are published again later).

        Ignored when the spool was reopened since the batch was read: its seqs may name
        other messages now (a corrupt file is replaced by an empty one).
        """
        if self.spool is None or self.spool is not self._peeked_from:
            return
        try:
            self.spool.ack(up_to_seq)
        except SpoolError as err:
            self.fail(err)

    def __len__(self) -> int:
        """Messages in the spool (0 while degraded)."""
        return 0 if self.spool is None else len(self.spool)

    def close(self) -> None:
        """Close the spool; never raises."""
        spool, self.spool = self.spool, None
        if spool is not None:
            with contextlib.suppress(SpoolError):
                spool.close()
