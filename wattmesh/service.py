"""What every long-running service (``edge run``, ``coordinator run``) shares: log set-up and
format, the start-up and final lines, waiting out a broker that refuses, exit codes.

Lean on purpose: standard library only (the bus and settings types are for type checking), so
the edge agent's service path (:mod:`wattmesh.edge_service`) loads no typer, rich, simulators
or cryptography (docs/architecture.md, "The edge agent's footprint").
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.client import BusClient
    from broker.clock import Clock
    from broker.settings import BrokerConnection, ClockSettings

#: Refusals in a row before the first connection after which a service exits by default.
GIVE_UP_AFTER = 3


class LogFormat(enum.StrEnum):
    """How a service writes its log: for a terminal, or JSON lines for journald and files."""

    text = "text"
    json = "json"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC epoch s), ``time`` (ISO 8601, UTC), ``level``,
    ``logger``, ``message`` and, for an exception, ``exc`` (its traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        doc: dict[str, object] = {
            "ts": round(record.created, 3),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


#: wattmesh's own loggers (the packages'), set apart from libraries'.
OWN_LOGGERS = ("edge", "coordinator", "broker", "drivers", "simulators", "wattmesh")


def set_up_logging(verbosity: int) -> None:
    """The root logger as every ``wattmesh`` command has it, to stderr: warnings; with ``-v``
    (``verbosity`` 1) wattmesh's own debug lines too (plans, bids, protocol decisions); with
    ``-vv`` (2) also pymodbus's protocol dumps, which are silent otherwise."""
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 1 else logging.WARNING)
    logging.getLogger("pymodbus").setLevel(logging.DEBUG if verbosity >= 2 else logging.CRITICAL)


def service_logging() -> None:
    """What a long-running service (``edge run``, ``coordinator run``) logs by default: its
    info lines too (clearings, settlements, awards, dispatch decisions, device availability,
    grid mode), unless ``-v`` asked for more."""
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level > logging.INFO or logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


def use_log_format(log_format: LogFormat) -> None:
    """Switch the root logger's handlers (set up by :func:`set_up_logging`) to JSON lines."""
    if log_format is LogFormat.json:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())


def print_error(message: str) -> None:
    """``error: message`` on stderr, one line (``error:`` in red on a colour terminal)."""
    colour = sys.stderr.isatty() and "NO_COLOR" not in os.environ
    label = "\x1b[31merror:\x1b[0m" if colour else "error:"
    print(f"{label} {message}", file=sys.stderr, flush=True)


def say(message: str, log_format: LogFormat, level: int = logging.INFO) -> None:
    """A service's own line on stderr (start-up, final error): plain, or a JSON log line."""
    if log_format is LogFormat.text:
        if level >= logging.ERROR:
            print_error(message)
        else:
            print(message, file=sys.stderr, flush=True)
        return
    record = logging.makeLogRecord(
        {"name": "wattmesh", "levelno": level, "levelname": logging.getLevelName(level)}
    )
    record.msg = message
    print(JsonLogFormatter().format(record), file=sys.stderr, flush=True)


def leaf_errors(err: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups: what a person needs to read."""
    if isinstance(err, BaseExceptionGroup):
        return [leaf for sub in err.exceptions for leaf in leaf_errors(sub)]
    return [err]


def describe(err: BaseException) -> str:
    """One line for an error that escaped a service, never a TaskGroup's wrapper."""
    return "; ".join(str(e) or type(e).__name__ for e in leaf_errors(err))


async def until_connected_or_refused(bus: BusClient, give_up_after: int) -> str | None:
    """None once ``bus`` is connected; the broker's reason once it refused ``give_up_after``
    times in a row (never, for 0)."""
    while not bus.connected:
        if give_up_after and bus.refusals >= give_up_after:
            return bus.refusal or "refused"
        with contextlib.suppress(TimeoutError):
            await bus.wait_connected(0.05)
    return None


def refused_message(bus: BusClient, reason: str, password_source: str) -> str:
    """What to check when the broker keeps refusing ``bus``'s user."""
    s = bus.settings
    return (
        f"the broker at {s.host}:{s.port} refused user {s.username!r} {bus.refusals} times: "
        f"{reason}. Check {password_source}: it must hold {s.username}'s password from the "
        "broker's credentials.toml, and the user must be in the broker's configuration."
    )


def password_source(broker: BrokerConnection) -> str:
    """Where a site or coordinator file says its broker password comes from, in words."""
    if broker.password_file is not None:
        return f"the password file {broker.password_file}"
    if broker.password_env:
        return f"${broker.password_env}"
    return "the [broker] section (it gives no password_env or password_file)"


def clock_from(settings: ClockSettings | None) -> Clock:
    """The clock a site or coordinator file (or ``dispatch --clock-file``) describes; the wall
    clock when none. ``ValueError`` naming the clock file when it cannot be used."""
    from broker.clock import WallClock  # noqa: PLC0415 - only when no simulated clock

    return settings.build() if settings is not None else WallClock()


def stop_on_signals() -> asyncio.Event:
    """An event set by Ctrl-C or SIGTERM (inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(bus: BusClient, stop: asyncio.Event, give_up_after: int, source: str) -> str | None:
    """Run until ``stop``; a message instead when the broker keeps refusing at start-up
    (``source``: where the password comes from, see :func:`password_source`)."""
    waiting = asyncio.create_task(until_connected_or_refused(bus, give_up_after))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if waiting.done() and (reason := waiting.result()) is not None:
        stopping.cancel()
        return refused_message(bus, reason, source)
    waiting.cancel()
    await stopping
    return None


def run_service(run: Callable[[], Coroutine[None, None, str | None]], log_format: LogFormat) -> int:
    """Run a service until stopped: exit code 0; a refusal or a failure ends it with one
    line and exit code 1."""
    try:
        refused = asyncio.run(run())
    except Exception as err:  # a failure, told in words: no TaskGroup wrapper, no traceback
        logging.getLogger("wattmesh").debug("the service failed", exc_info=err)
        say(describe(err), log_format, logging.ERROR)
        return 1
    if refused is not None:
        say(refused, log_format, logging.ERROR)
        return 1
    return 0
