"""``wattmesh broker``: write a Mosquitto configuration for a community and run it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from broker.bridge import (
    BRIDGES_RECORD_NAME,
    RecordedBridge,
    add_bridge_user,
    load_bridge_kit,
    plan_bridges,
    restore_bridges,
    write_edge_broker,
)
from broker.errors import BrokerConfigError, BrokerError, MosquittoNotFoundError
from broker.feeders import (
    FeedersBrokerFiles,
    FeedersFile,
    load_feeders_broker,
    load_feeders_file,
    write_feeders_broker_config,
)
from broker.mosquitto import (
    CONF_NAME,
    BrokerFiles,
    TlsFiles,
    check_broker_access,
    run_mosquitto_foreground,
    write_broker_config,
)

broker_app = typer.Typer(
    help="The MQTT broker: Mosquitto configuration (users, ACL, TLS) and running it.",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _site_list(sites: str) -> list[str]:
    return [part.strip() for part in sites.split(",") if part.strip()]


def _describe_tls(tls: TlsFiles) -> list[str]:
    """Where the CA, the server's and the clients' certificates were written."""
    return [
        f"  CA           {tls.ca_cert} (key: {tls.ca_key})",
        f"  server cert  {tls.server_cert}",
        f"  client certs {tls.ca_cert.parent / 'clients'}/<user>.crt and .key",
    ]


def _describe(files: BrokerFiles) -> list[str]:
    lines = [
        f"wrote a Mosquitto configuration for {len(files.sites)} site(s) in {files.directory}:",
        f"  config       {files.conf}",
        f"  passwords    {files.password_file} (salted hashes)",
        f"  ACL          {files.acl_file}",
        f"  persistence  {files.persistence_dir}/",
    ]
    if files.tls is not None:
        lines += _describe_tls(files.tls)
    lines.append(f"  listener     {files.connect_host}:{files.port} (user name and password)")
    if files.tls_port is not None:
        lines.append(f"  TLS listener {files.host}:{files.tls_port} (client certificate = user)")
    lines += [
        f"users: {', '.join(files.users)}",
        "client id = user name on every listener: one connection per user"
        + (f" (observers use {files.monitor_user!r}, read-only)" if files.monitor_user else ""),
        f"credentials (user -> password, keep secret, mode 600): {files.credentials_file}",
        f"start it with: wattmesh broker run {files.directory}",
    ]
    return lines


def _describe_feeders(files: FeedersBrokerFiles) -> list[str]:
    lines = [
        f"wrote a Mosquitto configuration for {len(files.feeders)} feeder(s), "
        f"{len(files.sites)} site(s) in {files.directory}:",
        f"  config       {files.conf}",
        f"  persistence  {files.persistence_dir}/",
    ]
    if files.tls is not None:
        lines += _describe_tls(files.tls)
    for f in files.feeders:
        lines.append(
            f"  feeder {f.id}: listener {files.connect_host}:{f.port}, mount point "
            f"{f.mount_point}, coordinator user {f.coordinator_user!r}, sites {', '.join(f.sites)}"
            f" (passwords {f.password_file.name}, ACL {f.acl_file.name})"
        )
        if f.ingest_users:
            lines.append(
                f"    ingest users {', '.join(f.ingest_users)} (one password; they log in on "
                f"the operator listener, port {files.port}: [broker] ingest_port)"
            )
        if f.tls_port is not None:
            lines.append(
                f"    TLS listener {files.host}:{f.tls_port} (client certificate = user; "
                "other feeders' certificates are revoked there)"
            )
    observers = [u for u in (files.operator_user, files.monitor_user) if u]
    lines.append(
        f"  operator listener {files.connect_host}:{files.port} (no mount point: every feeder "
        f"under feeder/<id>/) for {', '.join(observers) or 'nobody'}"
    )
    if files.weather_user:
        lines.append(
            f"  weather user {files.weather_user!r} (operator listener): publishes each "
            "feeder's weather forecast (feeder/<id>/wattmesh/v1/weather/forecast), nothing else"
        )
    if files.tls_port is not None:
        lines.append(
            f"    TLS listener {files.host}:{files.tls_port} (operator, monitor and weather only)"
        )
    lines += [
        "a site's or coordinator's credentials are valid only on its own feeder's listeners; "
        "give each its feeder's port (or TLS port) and mount_point in its [broker] section",
        f"credentials (user -> password, keep secret, mode 600): {files.credentials_file}",
        f"start it with: wattmesh broker run {files.directory}",
    ]
    return lines


def _feeders_spec(
    feeders: Path, port: int | None, tls_port: int | None, ingest_workers: int | None
) -> FeedersFile:
    """The feeders file, with the command line's operator ports and ingest workers."""
    spec = load_feeders_file(feeders)
    if ingest_workers is not None:  # every feeder's coordinator gets that many
        every = tuple(f.model_copy(update={"ingest_workers": ingest_workers}) for f in spec.feeders)
        spec = spec.model_copy(update={"feeders": every})
    operator = {
        key: value for key, value in (("port", port), ("tls_port", tls_port)) if value is not None
    }
    if operator:
        spec = spec.model_copy(update={"operator": spec.operator.model_copy(update=operator)})
    return spec


def _plan_bridges(
    directory: Path,
    layout: dict[str | None, tuple[str, ...]],
    users: list[str],
    *,
    force: bool,
    drop_bridges: bool,
) -> tuple[tuple[RecordedBridge, ...], list[str]]:
    """The bridge users to add again after writing DIRECTORY and those to drop; refuses (a
    ``typer.Exit``, nothing written) when some cannot be kept and ``drop_bridges`` is off."""
    if (directory / CONF_NAME).exists() and not force:
        return (), []  # the write refuses anyway, with its own message
    try:
        keep, lost = plan_bridges(directory, layout, users)
    except BrokerConfigError as err:  # an unreadable record or credentials.toml
        if drop_bridges:
            return (), []
        raise _fail(
            f"cannot tell which bridge users {directory} has: {err}. Nothing was written; "
            "pass --drop-bridges to write it without them"
        ) from err
    if lost and not drop_bridges:
        reasons = "; ".join(f"{user}: {why}" for user, why in lost.items())
        raise _fail(
            f"init would drop bridge users of {directory} ({reasons}). Nothing was written: "
            "change the sites back, or pass --drop-bridges to drop them (their kits stop "
            "working)"
        )
    return keep, list(lost)


def _restore_bridges(directory: Path, keep: tuple[RecordedBridge, ...], drop: list[str]) -> None:
    """Add the bridges ``keep`` again, remove the kits of ``drop``, and say so."""
    if not keep and not drop and not (directory / BRIDGES_RECORD_NAME).exists():
        return
    try:
        kits = restore_bridges(directory, keep, drop)
    except BrokerConfigError as err:
        raise _fail(f"the broker was written, but its bridges were not: {err}") from err
    for kit in kits:
        where = f" into feeder {kit.feeder}" if kit.feeder else ""
        typer.echo(
            f"kept bridge user {kit.credentials.user}{where} (sites {', '.join(kit.sites)}) "
            f"with new credentials: copy its kit {kit.directory}/ to edge {kit.edge} again and "
            "rewrite the edge broker there (`wattmesh broker edge ... --force`)"
        )
    for user in drop:
        typer.echo(f"dropped bridge user {user} (--drop-bridges): its kit no longer works")


@broker_app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="Directory to write the broker files into.")],
    sites: Annotated[
        str | None,
        typer.Option("--sites", help="Comma-separated site ids, e.g. solar-farm,house-1."),
    ] = None,
    feeders: Annotated[
        Path | None,
        typer.Option(
            "--feeders",
            help="Instead of --sites: a feeders file (config/feeders.toml) for many feeders on "
            "one broker, one listener per feeder, each under its own topic root.",
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="Port of the password listener (default 1883); with --feeders the operator "
            "listener's (default: the file's)."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (and in the TLS cert).")] = (
        "127.0.0.1"
    ),
    tls: Annotated[
        bool, typer.Option("--tls", help="Add a mutual-TLS listener and make a CA and certs.")
    ] = False,
    tls_port: Annotated[
        int | None,
        typer.Option(
            help="Port of the TLS listener (default 8883); with --feeders the operator's TLS "
            "listener (default: the file's \\[operator] tls_port, else none)."
        ),
    ] = None,
    coordinator_user: Annotated[str, typer.Option(help="The coordinator's user name.")] = (
        "coordinator"
    ),
    operator_user: Annotated[
        str, typer.Option(help="The operator's user name (reads all, sends dispatch).")
    ] = "operator",
    no_operator: Annotated[
        bool, typer.Option("--no-operator", help="Create no operator user.")
    ] = False,
    monitor_user: Annotated[
        str, typer.Option(help="The read-only monitor's user name (dashboards, status).")
    ] = "monitor",
    no_monitor: Annotated[
        bool, typer.Option("--no-monitor", help="Create no monitor user.")
    ] = False,
    weather_user: Annotated[
        str,
        typer.Option(
            help="The weather service's user name: publishes the weather forecast "
            "(weather/forecast) and nothing else. With --feeders one for the whole area: it "
            "logs in on the operator listener and publishes each feeder's forecast (under the "
            "feeder's mount point)."
        ),
    ] = "weather",
    no_weather: Annotated[
        bool, typer.Option("--no-weather", help="Create no weather-service user.")
    ] = False,
    ha_discovery_prefix: Annotated[
        str,
        typer.Option(
            help="Home Assistant's MQTT discovery prefix: each site may publish its own "
            "discovery configs under it, the monitor user (Home Assistant's) reads it."
        ),
    ] = "homeassistant",
    no_homeassistant: Annotated[
        bool,
        typer.Option("--no-homeassistant", help="Grant no Home Assistant discovery topics."),
    ] = False,
    ingest_workers: Annotated[
        int | None,
        typer.Option(
            help="Users COORDINATOR-ingest-1..N for the coordinator's ingest worker processes "
            "(\\[coordinator] ingest_workers; one password, read telemetry only); with "
            "--feeders for every feeder's coordinator (instead of the file's ingest_workers).",
            min=0,
            max=64,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Overwrite an existing config: new passwords (and with --tls a new CA) for "
            "every user. Bridge users that `broker bridge-user` added are added again "
            "(new credentials, rewritten kits).",
        ),
    ] = False,
    drop_bridges: Annotated[
        bool,
        typer.Option(
            "--drop-bridges",
            help="With --force: drop the bridge users the new config cannot carry (a site or "
            "feeder of theirs is gone) instead of refusing.",
        ),
    ] = False,
) -> None:
    """Write mosquitto.conf, the password file, the ACL and credentials.toml into DIRECTORY.

    With --feeders: one listener per feeder (its own password file and ACL, mount point
    feeder/<id>/) and an operator listener that sees every feeder; with --tls also each
    feeder's mutual-TLS listener (its tls_port in the file).

    Rewriting an existing DIRECTORY (--force) keeps its bridge users (recorded in
    DIRECTORY/bridges.toml by `broker bridge-user`): each is added again with a new password
    (and certificate) and its kit in DIRECTORY/bridges/ is rewritten; copy it to the edge
    again. If one of a bridge's sites (or its feeder) is no longer in the new config, init
    refuses and names it, writing nothing, unless --drop-bridges.
    """
    if (sites is None) == (feeders is None):
        raise _fail("give either --sites or --feeders")
    operator = None if no_operator else operator_user
    monitor = None if no_monitor else monitor_user
    weather = None if no_weather else weather_user
    observers = [u for u in (operator, monitor, weather) if u]
    if feeders is not None:
        try:
            spec = _feeders_spec(feeders, port, tls_port, ingest_workers)
        except BrokerConfigError as err:
            raise _fail(str(err)) from err
        keep, drop = _plan_bridges(
            directory,
            {f.id: f.sites for f in spec.feeders},
            [*observers, *(u for f in spec.feeders for u in (f.coordinator_user, *f.sites))],
            force=force,
            drop_bridges=drop_bridges,
        )
        try:
            feeder_files = write_feeders_broker_config(
                directory,
                spec,
                host=host,
                tls=tls,
                operator_user=operator,
                monitor_user=monitor,
                overwrite=force,
                ha_discovery_prefix=None if no_homeassistant else ha_discovery_prefix,
                weather_user=weather,
            )
        except BrokerConfigError as err:
            raise _fail(str(err)) from err
        except OSError as err:
            raise _fail(f"cannot write the broker files in {directory}: {err}") from err
        for line in _describe_feeders(feeder_files):
            typer.echo(line)
        _restore_bridges(feeder_files.directory, keep, drop)
        _warn_access(feeder_files.directory)
        return
    assert sites is not None
    site_ids = tuple(_site_list(sites))
    keep, drop = _plan_bridges(
        directory,
        {None: site_ids},
        [coordinator_user, *observers, *site_ids],
        force=force,
        drop_bridges=drop_bridges,
    )
    try:
        files = write_broker_config(
            directory,
            site_ids,
            port=1883 if port is None else port,
            host=host,
            tls=tls,
            tls_port=8883 if tls_port is None else tls_port,
            coordinator_user=coordinator_user,
            operator_user=operator,
            monitor_user=monitor,
            overwrite=force,
            ha_discovery_prefix=None if no_homeassistant else ha_discovery_prefix,
            ingest_workers=ingest_workers or 0,
            weather_user=weather,
        )
    except BrokerConfigError as err:
        raise _fail(str(err)) from err
    except OSError as err:
        raise _fail(f"cannot write the broker files in {directory}: {err}") from err
    for line in _describe(files):
        typer.echo(line)
    _restore_bridges(files.directory, keep, drop)
    _warn_access(files.directory)


def _warn_access(directory: Path) -> None:
    try:
        check_broker_access(directory)
    except BrokerConfigError as err:
        typer.echo(f"warning: {err}", err=True)


@broker_app.command("bridge-user")
def bridge_user(
    core_directory: Annotated[
        Path, typer.Argument(help="The core broker's directory (written by `broker init`).")
    ],
    edge: Annotated[str, typer.Option("--edge", help="The edge broker's id, e.g. north.")],
    sites: Annotated[
        str, typer.Option("--sites", help="Comma-separated ids of the sites behind that edge.")
    ],
    feeder: Annotated[
        str | None,
        typer.Option(
            "--feeder",
            help="On a core written by `broker init --feeders` (required there, refused on a "
            "single-feeder core): the feeder whose sites the edge serves. The bridge logs in "
            "on that feeder's listener (its port, TLS port and mount point go into the kit).",
        ),
    ] = None,
) -> None:
    """Add an edge broker's bridge user to the core; write its bridge kit.

    The user (bridge-EDGE) may publish and read exactly those sites' topics on the core. The
    kit (CORE_DIRECTORY/bridges/bridge-EDGE/) goes to the edge machine for `broker edge`.
    CORE_DIRECTORY/bridges.toml records the bridge: `broker init --force` adds it again.

    On a many-feeders core the user goes into feeder ID's password file and ACL, the sites must
    be that feeder's, and the edge keeps the plain v1 topics: the feeder's listener puts
    feeder/ID/ in front of them, and the edge's bridge takes it off what comes back. With TLS
    the bridge's certificate is revoked on every other feeder's TLS listener and the
    operator's.
    """
    try:
        kit = add_bridge_user(core_directory, edge, _site_list(sites), feeder=feeder)
    except BrokerConfigError as err:
        raise _fail(str(err)) from err
    except OSError as err:
        raise _fail(f"cannot write the bridge user in {core_directory}: {err}") from err
    auth = "client certificate (mTLS)" if kit.credentials.tls else "password"
    typer.echo(f"added {kit.credentials.user} to the core in {core_directory} ({auth}),")
    typer.echo(f"  for sites: {', '.join(kit.sites)}")
    reload = "passwd and acl"
    if kit.feeder is not None:
        tls = f", TLS port {kit.core_tls_port}" if kit.core_tls_port is not None else ""
        typer.echo(
            f"  on feeder {kit.feeder}'s listeners (port {kit.core_port}{tls}, mount point "
            f"{kit.mount_point}): the edge's bridge takes the mount point off what it receives"
        )
        if kit.credentials.tls:
            others = _other_tls_listeners(core_directory, kit.feeder)
            typer.echo(
                "  its certificate is revoked on the other TLS listeners: " + ", ".join(others)
            )
            reload = "passwd, acl and the CRLs"
    typer.echo(f"bridge kit (secret, copy it to the edge machine): {kit.directory}/")
    typer.echo(
        f"a running core reads the new {reload} after `kill -HUP <mosquitto pid>` or a restart"
    )
    typer.echo(f"then on the edge: wattmesh broker edge EDGE_DIR --kit {kit.directory} --core HOST")


def _other_tls_listeners(core_directory: Path, feeder: str) -> list[str]:
    """The TLS listeners of a many-feeders core other than ``feeder``'s, by name."""
    files = load_feeders_broker(core_directory)
    names = [f"feeder {f.id}" for f in files.feeders if f.id != feeder and f.tls_port]
    return names + (["operator"] if files.tls_port is not None else [])


@broker_app.command("edge")
def edge_broker(
    directory: Annotated[Path, typer.Argument(help="Directory to write the edge broker into.")],
    kit_path: Annotated[
        Path, typer.Option("--kit", help="The bridge kit from `broker bridge-user`.")
    ],
    core: Annotated[
        list[str],
        typer.Option(
            "--core",
            help="The core broker's HOST or HOST:PORT (the kit's port if none); repeat it for "
            "a standby core, tried when the first fails.",
        ),
    ],
    port: Annotated[int, typer.Option(help="Port the sites connect to.")] = 1883,
    host: Annotated[str, typer.Option(help="Address the sites connect to.")] = "127.0.0.1",
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="TLS: do not check the core's name in its certificate."),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing config (new passwords).")
    ] = False,
) -> None:
    """Write an edge broker for the kit's sites, bridged to the core (it connects out)."""
    try:
        kit = load_bridge_kit(kit_path)
        files = write_edge_broker(
            directory, kit, core=core, port=port, host=host, overwrite=force, insecure=insecure
        )
    except BrokerConfigError as err:
        raise _fail(str(err)) from err
    except OSError as err:
        raise _fail(f"cannot write the edge broker in {directory}: {err}") from err
    for line in _describe(files):
        typer.echo(line)
    typer.echo(f"bridge: {kit.credentials.user} -> {', '.join(core)} (in {files.conf})")
    if kit.feeder is not None:
        typer.echo(
            f"  into feeder {kit.feeder} of a many-feeders core: the sites keep the v1 topics, "
            f"the bridge takes the core's mount point {kit.mount_point} off what it receives"
        )
    try:
        check_broker_access(files.directory)
    except BrokerConfigError as err:
        typer.echo(f"warning: {err}", err=True)


@broker_app.command("run")
def run(
    directory: Annotated[Path, typer.Argument(help="A directory written by `broker init`.")],
) -> None:
    """Run Mosquitto in the foreground on DIRECTORY's configuration (Ctrl-C stops it)."""
    try:
        status = run_mosquitto_foreground(
            directory, notify=lambda message: typer.echo(message, err=True)
        )
    except MosquittoNotFoundError as err:
        raise _fail(str(err), code=3) from err
    except BrokerError as err:
        raise _fail(str(err)) from err
    if status < 0:  # killed by a signal: the shell's convention
        status = 128 - status
    if status:
        raise typer.Exit(status)
