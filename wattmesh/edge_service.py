"""The edge agent's lean service path: ``wattmesh-edge SITE_FILE`` (the systemd unit's command)
and ``wattmesh edge run SITE_FILE``, which :mod:`wattmesh.entry` sends here before any of the
full command line is imported.

Only what the agent uses is loaded: the agent (pydantic, aiomqtt/paho, pymodbus, numpy) and
the standard library; no typer, rich, simulators, coordinator or cryptography. The options are
those of ``wattmesh edge run`` (``wattmesh edge run --help`` documents them).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from wattmesh import __version__
from wattmesh.service import (
    GIVE_UP_AFTER,
    LogFormat,
    clock_from,
    password_source,
    print_error,
    run_service,
    say,
    serve,
    service_logging,
    set_up_logging,
    stop_on_signals,
    use_log_format,
)

#: Set before the agent is imported unless already set: pydantic looks for plugins in every
#: installed distribution's entry points the first time it builds a model, a scan that grows
#: with the environment, and the agent uses none; numpy's OpenBLAS starts a thread per core for
#: matrix products, and the agent's are a few dot products of at most a few hundred numbers.
AGENT_ENVIRONMENT = {"PYDANTIC_DISABLE_PLUGINS": "__all__", "OPENBLAS_NUM_THREADS": "1"}


def import_agent() -> None:
    """Import the agent (``edge.agent``, ``edge.config``): all the service path loads, after
    :data:`AGENT_ENVIRONMENT` (a value already in the environment is kept);
    benchmarks/edge_footprint.py measures this function."""
    for name, value in AGENT_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    import edge.agent  # noqa: PLC0415 - after the command line is read and the setting made
    import edge.config  # noqa: PLC0415, F401


def run_edge(site_file: Path, give_up_after: int, log_format: LogFormat) -> int:
    """Run the site gateway agent of ``site_file`` until SIGINT/SIGTERM; the exit code: 0 when
    stopped, 1 after a failure or a broker that kept refusing, 2 for a file that cannot be
    used (one line per problem on stderr, never a traceback)."""
    import_agent()
    service_logging()
    from edge.agent import EdgeAgent  # noqa: PLC0415 - loaded by import_agent
    from edge.config import load_edge_config  # noqa: PLC0415

    try:
        config = load_edge_config(site_file)
        clock = clock_from(config.clock)
        password = config.broker.password()
    except ValueError as err:  # EdgeConfigError, or a clock file that cannot be used
        print_error(str(err))
        return 2

    async def run() -> str | None:
        stop = stop_on_signals()
        async with EdgeAgent(config, clock, password=password) as agent:
            say(
                f"edge agent for site {config.site.id!r}: {len(config.devices)} device(s), "
                f"broker {config.broker.host}:{config.broker.port}; Ctrl-C stops.",
                log_format,
            )
            return await serve(agent.bus, stop, give_up_after, password_source(config.broker))

    use_log_format(log_format)
    return run_service(run, log_format)


class _NotLean(Exception):
    """The command line is not one the lean path is sure to read as ``wattmesh edge run``."""


class _StrictParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # raises, never exits
        raise _NotLean(message)


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 0 or more")
    return value


def _edge_parser(parser: argparse.ArgumentParser, verbose: bool) -> argparse.ArgumentParser:
    parser.add_argument("site_file", type=Path, help="The site's TOML (see config/sites/).")
    parser.add_argument(
        "--give-up-after",
        type=_non_negative,
        default=GIVE_UP_AFTER,
        metavar="N",
        help="Exit when the broker refuses the connection (bad password, not authorised) this "
        "many times in a row before the first connection; 0 keeps retrying. Later refusals are "
        f"logged and retried (default {GIVE_UP_AFTER}).",
    )
    parser.add_argument(
        "--log-format",
        type=str.lower,
        choices=[f.value for f in LogFormat],
        default=LogFormat.text.value,
        help="text for a terminal, or json: one JSON object per line (ts, time, level, logger, "
        "message) for journald or log files (default text).",
    )
    if verbose:
        parser.add_argument(
            "-v",
            "--verbose",
            action="count",
            default=0,
            help="-v: the agent's debug lines (plans, bids, decisions); -vv: also pymodbus's "
            "protocol dumps. Info lines are logged without it.",
        )
    return parser


def fast_edge_run(args: Sequence[str]) -> int | None:
    """Run ``wattmesh [-v] edge run [options] SITE_FILE`` without loading the full command line:
    the exit code; None when ``args`` are anything else (help, a mistake, another command),
    for the full command line to handle exactly as always."""
    verbose = 0
    rest = list(args)
    while rest[:1] in (["-v"], ["--verbose"], ["-vv"]):
        verbose, rest = verbose + (2 if rest[0] == "-vv" else 1), rest[1:]
    if rest[:2] != ["edge", "run"]:
        return None
    parser = _edge_parser(_StrictParser(add_help=False, allow_abbrev=False), verbose=False)
    try:
        options = parser.parse_args(rest[2:])
    except _NotLean:
        return None
    set_up_logging(verbose)
    try:
        return run_edge(options.site_file, options.give_up_after, LogFormat(options.log_format))
    except KeyboardInterrupt:  # before the agent's signal handlers: as the full command line
        print("\nAborted!", file=sys.stderr)
        return 1


def parse_edge_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options of ``wattmesh-edge`` (``sys.argv`` when ``argv`` is None): ``site_file``,
    ``give_up_after``, ``log_format`` and ``verbose``; usage on stderr and exit 2 if wrong."""
    parser = _edge_parser(
        argparse.ArgumentParser(
            prog="wattmesh-edge",
            description="Run the site gateway agent: poll devices, publish telemetry and bids, "
            "obey dispatch; the same as `wattmesh edge run`, loading only what the agent uses. "
            "The broker password is read from the variable the site file's [broker] "
            "password_env names, unless password_file is given. Stops on Ctrl-C/SIGTERM.",
            allow_abbrev=False,
        ),
        verbose=True,
    )
    parser.add_argument("--version", action="version", version=f"wattmesh {__version__}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``wattmesh-edge`` console script (the systemd unit's command)."""
    options = parse_edge_args(argv)
    set_up_logging(options.verbose)
    try:
        code = run_edge(options.site_file, options.give_up_after, LogFormat(options.log_format))
    except KeyboardInterrupt:  # before the agent's own signal handlers are in place
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
