"""Many feeders on one Mosquitto: one listener per feeder, each with its own topic root.

``write_feeders_broker_config`` writes a broker directory in which every feeder's sites and
coordinator connect to that feeder's listener and see the unchanged v1 topic tree
(``wattmesh/v1/...``, docs/architecture.md s. 3), while the broker keeps the feeders apart::

    DIR/mosquitto.conf      one listener per feeder (mount_point feeder/{id}/) + the operator's
    DIR/passwd-{feeder}     that feeder's users: its coordinator, its sites, operator, monitor
    DIR/acl-{feeder}        the single-feeder ACL (``acl_text``) with every topic mounted
    DIR/passwd, DIR/acl     the operator listener (no mount point): operator and monitor, the
                            area's weather service, and each feeder's ingest worker users
    DIR/credentials.toml    user -> password, and each feeder's port, mount point and sites
    DIR/data/               persistence (one database for the whole broker)
    DIR/tls/                with ``tls``: ca.crt, ca.key, server.crt, server.key,
                            clients/{user}.crt and .key, crl-feeder-{id}.pem, crl-operator.pem

How it works (verified on Mosquitto 2.0.11, Debian 12):

- ``mount_point feeder/{id}/`` on a listener puts the prefix in front of every topic its
  clients publish, subscribe to or leave as their will. A feeder's ``wattmesh/v1/#`` is
  therefore ``feeder/{id}/wattmesh/v1/#`` in the broker, and one feeder's retained market
  clearing never reaches another's sites.
- The ACL is checked against the mounted topic (after the prefix is added), so each
  feeder's ACL file grants the mounted topics.
- ``per_listener_settings true``: each listener has its own password file and ACL. A site's
  credentials exist only in its own feeder's password file, so a site that connects to another
  feeder's listener (or the operator's) is refused at CONNECT (reason 135, not authorised).
- Client ids are broker-wide and every listener binds the client id to the user name
  (``use_username_as_clientid``), so user names are unique across the whole broker: site ids
  must be unique across feeders (checked here), and each feeder's coordinator has its own user
  (``coordinator-{feeder}`` unless the file names one).
- Mosquitto should take the mount point off the topics it delivers; 2.0.11 does not
  (eclipse-mosquitto issue 2244, fixed in 2.0.12). ``BusClient`` removes it when its settings
  give the listener's ``mount_point`` (``[broker] mount_point`` in a site or coordinator file).
- The operator listener has no mount point: the operator and the monitor read every feeder
  there as ``feeder/{id}/wattmesh/v1/...`` (``wattmesh status --broker-dir DIR``). They also
  have the same rights as in a single-feeder broker on each feeder's listener, where the
  feeder looks like a single-feeder broker (``wattmesh dispatch --port <feeder port>``).

The weather service (``weather_user``, default ``weather``): one for the whole area, as on a
single-feeder broker. Each feeder's coordinator reads the forecast under its feeder's mount
point (``feeder/{id}/wattmesh/v1/weather/forecast``), so the weather user logs in on the
operator listener (no mount point) and its ACL there grants exactly those topics, one per
feeder, to write (:func:`weather_topic`); it reads nothing, and no feeder's password file
has it. One connection publishes the area's forecast into every feeder (``wattmesh weather
publish --broker-dir DIR``, ``--feeder ID`` for some). With TLS its certificate is valid on
the operator's TLS listener only (every feeder's CRL revokes it).

Ingest workers (``ingest_workers = N`` for a feeder, or ``broker init --feeders F
--ingest-workers N`` for all): users ``{coordinator_user}-ingest-{i}`` (one password per
feeder) that read that feeder's telemetry. They log in on the operator listener, not on their
feeder's: Mosquitto puts a listener's mount point in front of a ``$share/...`` filter
(``feeder/north/$share/GROUP/wattmesh/v1/site/+/telemetry``, granted QoS 1), and a filter
whose first level is not ``$share`` is an ordinary subscription that matches nothing (verified
on 2.0.11; 2.0.22's source is the same). On the operator listener they subscribe to
``$share/wattmesh-ingest-{feeder}/feeder/{id}/wattmesh/v1/site/+/telemetry``, and its ACL
grants each of them exactly its own feeder's telemetry. The coordinator gives them
``[broker] ingest_port`` (the operator port); coordinator/ingest.py has the details.

With ``tls`` every feeder also gets a mutual-TLS listener (its ``tls_port``), and the operator
one if ``[operator] tls_port`` is set; the password listeners then serve 127.0.0.1 only. One
CA signs the server's certificate and one client certificate per user (CN = user). Verified
on Mosquitto 2.0.11 (tests/test_feeders_tls.py):

- ``per_listener_settings true`` makes ``acl_file`` a listener's own: the TLS listener names
  its feeder's ACL file (the same file as the password listener). A listener without
  ``acl_file`` allows every topic (under its mount point).
- ``mount_point`` works on a TLS listener as on a password listener (the ACL sees the mounted
  topic), and ``use_username_as_clientid`` takes the certificate's CN.
- ``use_identity_as_username`` skips the password check altogether (handle_connect.c:
  "Authentication assumed to be cleared"); a ``password_file`` on the TLS listener changes
  nothing. With one CA, another feeder's site certificate would therefore connect (its ACL
  would then deny it every topic). Each feeder's TLS listener has a ``crlfile`` that revokes
  the certificates of every other feeder's coordinator and sites, and the weather service's
  (the operator's revokes all but the operator's, the monitor's and the weather service's),
  so they fail the TLS handshake: under TLS 1.2 inside the handshake (alert "certificate
  revoked"), under TLS 1.3 right after it. The CRLs are
  valid as long as the CA (OpenSSL refuses every client once a CRL's next update passes);
  ``init --force`` renews the CA, every certificate and the CRLs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.errors import BrokerConfigError
from broker.mosquitto import (
    _CLIENT_ID_BINDING,
    _UNSPECIFIED_HOSTS,
    ACL_NAME,
    CONF_NAME,
    CREDENTIALS_NAME,
    DATA_DIR_NAME,
    LOG_NAME,
    PASSWD_NAME,
    TLS_DIR_NAME,
    TlsFiles,
    _common_conf_lines,
    _plain_bind_host,
    _tls_credentials_lines,
    _tls_layout,
    _write_file,
    _write_tls,
    acl_text,
    ingest_user,
    password_file_text,
    prepare_broker_dir,
)
from broker.topics import (
    HA_DISCOVERY_PREFIX,
    HA_PREFIX_PATTERN,
    ID_PATTERN,
    PREFIX,
    WEATHER_FORECAST,
    check_id,
    site_wildcard,
)

#: A feeder's topic root on the shared broker: ``feeder/{id}/`` (the listener's mount point).
MOUNT_ROOT = "feeder"
#: Every feeder's topics, as the operator listener sees them: ``feeder/+/wattmesh/v1``.
ALL_FEEDERS_PREFIX = f"{MOUNT_ROOT}/+/{PREFIX}"
_ACL_TOPIC = re.compile(r"^(topic\s+(?:read|write|readwrite|deny)\s+)(\S.*)$")


def mount_point(feeder: str) -> str:
    """The mount point of ``feeder``'s listener: ``feeder/{feeder}/``."""
    return f"{MOUNT_ROOT}/{check_id(feeder, 'feeder')}/"


def weather_topic(feeder: str) -> str:
    """Where ``feeder``'s coordinator reads the weather forecast, as the operator listener
    sees it: ``feeder/{feeder}/wattmesh/v1/weather/forecast``."""
    return f"{mount_point(feeder)}{WEATHER_FORECAST}"


def split_mounted(topic: str) -> tuple[str, str] | None:
    """``(feeder, v1 topic)`` for ``feeder/{feeder}/wattmesh/v1/...``; None for anything else."""
    parts = topic.split("/", 2)
    if len(parts) != 3 or parts[0] != MOUNT_ROOT or not re.match(ID_PATTERN, parts[1]):
        return None
    if not parts[2].startswith(f"{PREFIX}/"):
        return None
    return parts[1], parts[2]


def mounted_acl(text: str, mount: str) -> str:
    """An ACL file with ``mount`` in front of every ``topic`` line's topic (comments kept)."""
    lines = []
    for line in text.splitlines():
        match = _ACL_TOPIC.match(line)
        lines.append(f"{match.group(1)}{mount}{match.group(2)}" if match else line)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The feeders file


class FeederSpec(BaseModel):
    """One feeder: its id, its listener's port, its coordinator's user and its sites."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    port: int = Field(gt=0, le=65535)
    #: The feeder's mutual-TLS listener (``broker init --feeders F --tls``; ignored without).
    tls_port: int | None = Field(default=None, gt=0, le=65535)
    coordinator: str | None = Field(default=None, pattern=ID_PATTERN)
    sites: tuple[str, ...] = Field(min_length=1)
    #: Users for the coordinator's ingest worker processes (``[coordinator] ingest_workers``).
    ingest_workers: int = Field(default=0, ge=0, le=64)

    @property
    def coordinator_user(self) -> str:
        """The coordinator's user name: ``coordinator`` from the file, else coordinator-{id}."""
        return self.coordinator or f"coordinator-{self.id}"

    @property
    def ingest_users(self) -> tuple[str, ...]:
        """The ingest workers' users: ``{coordinator_user}-ingest-{i}``, i = 1..ingest_workers."""
        return tuple(
            ingest_user(self.coordinator_user, i) for i in range(1, self.ingest_workers + 1)
        )


class OperatorListener(BaseModel):
    """The listener without a mount point, for the operator and the monitor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int = Field(default=1883, gt=0, le=65535)
    #: With ``--tls``, an optional mutual-TLS listener for the operator and the monitor.
    tls_port: int | None = Field(default=None, gt=0, le=65535)


class FeedersFile(BaseModel):
    """A feeders file (config/feeders.toml): ``[operator]`` and one ``[[feeders]]`` each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    operator: OperatorListener = OperatorListener()
    feeders: tuple[FeederSpec, ...] = Field(min_length=1)


def load_feeders_file(path: str | os.PathLike[str]) -> FeedersFile:
    """Read a feeders file; ``BrokerConfigError`` naming the file and the field."""
    source = Path(path)
    try:
        doc = tomllib.loads(source.read_text(encoding="utf-8"))
        return FeedersFile.model_validate(doc)
    except OSError as err:
        raise BrokerConfigError(f"cannot read {source}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise BrokerConfigError(f"{source}: {err}") from err
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in err.errors()
        )
        raise BrokerConfigError(f"{source}: {problems}") from err


# ---------------------------------------------------------------------------------------------
# The broker directory


@dataclass(frozen=True, slots=True)
class FeederListener:
    """One feeder's listener as written: port, mount point, users and their files."""

    id: str
    port: int
    mount_point: str
    coordinator_user: str
    sites: tuple[str, ...]
    password_file: Path
    acl_file: Path
    #: With TLS: the mutual-TLS listener's port and its certificate revocation list (every
    #: certificate of the other feeders' users, so that they fail the TLS handshake here).
    tls_port: int | None = None
    crl_file: Path | None = None
    #: The coordinator's ingest workers' users: they log in on the operator listener (no mount
    #: point), where Mosquitto's shared subscriptions work; see the module's docstring.
    ingest_users: tuple[str, ...] = ()
    #: Users of edge brokers bridged into this feeder (``add_bridge_user(..., feeder=id)``):
    #: they log in on this feeder's listeners, and the others' CRLs revoke their certificates.
    bridge_users: tuple[str, ...] = ()

    @property
    def users(self) -> tuple[str, ...]:
        """The users that belong to this feeder: its coordinator, its sites and its bridges."""
        return (self.coordinator_user, *self.sites, *self.bridge_users)


@dataclass(frozen=True, slots=True)
class FeedersBrokerFiles:
    """What ``write_feeders_broker_config`` wrote (or ``load_feeders_broker`` read)."""

    directory: Path
    conf: Path
    credentials_file: Path
    persistence_dir: Path
    log_file: Path
    host: str
    #: The operator listener's port (no mount point).
    port: int
    operator_user: str | None
    monitor_user: str | None
    feeders: tuple[FeederListener, ...]
    credentials: dict[str, str] = field(repr=False)
    #: With TLS: the CA, the server's and every user's certificate, and the operator's
    #: mutual-TLS listener (None if it has none).
    tls: TlsFiles | None = None
    tls_port: int | None = None
    operator_crl_file: Path | None = None
    #: The area's weather service: logs in on the operator listener and may publish only each
    #: feeder's weather forecast (:func:`weather_topic`); None: no such user.
    weather_user: str | None = None

    @property
    def connect_host(self) -> str:
        """The address a client on this machine connects to (the password listeners', which
        serve 127.0.0.1 only when the broker has TLS)."""
        return _plain_bind_host(self.host, tls=self.tls is not None)

    @property
    def sites(self) -> tuple[str, ...]:
        """Every feeder's sites, feeder by feeder."""
        return tuple(site for f in self.feeders for site in f.sites)

    def feeder(self, feeder_id: str) -> FeederListener:
        """The listener of ``feeder_id``; ``KeyError`` if the broker has no such feeder."""
        for f in self.feeders:
            if f.id == feeder_id:
                return f
        raise KeyError(feeder_id)

    def feeder_of(self, user: str) -> FeederListener | None:
        """The feeder whose listener ``user`` (a site, a coordinator or a bridge) belongs to;
        else None."""
        for f in self.feeders:
            if user in f.users:
                return f
        return None


def _check_feeders(
    spec: FeedersFile,
    operator_user: str | None,
    monitor_user: str | None,
    *,
    tls: bool = False,
    weather_user: str | None = None,
) -> list[str]:
    """Every user name, in the order credentials.toml lists them; ``BrokerConfigError`` if two
    users, two feeders or two listeners collide."""
    try:
        for user, what in (
            (operator_user, "operator user"),
            (monitor_user, "monitor user"),
            (weather_user, "weather user"),
        ):
            if user is not None:
                check_id(user, what)
        for f in spec.feeders:
            for site in f.sites:
                check_id(site)
    except ValueError as err:
        raise BrokerConfigError(str(err)) from err
    ids = [f.id for f in spec.feeders]
    if len(set(ids)) != len(ids):
        raise BrokerConfigError(f"feeder ids must be unique: {sorted(ids)}")
    ports = [spec.operator.port, *(f.port for f in spec.feeders)]
    if tls:
        missing = [f.id for f in spec.feeders if f.tls_port is None]
        if missing:
            raise BrokerConfigError(
                "with TLS every feeder needs a tls_port (its mutual-TLS listener) in the "
                f"feeders file; missing for: {', '.join(missing)}"
            )
        ports += [p for p in (spec.operator.tls_port, *(f.tls_port for f in spec.feeders)) if p]
    if len(set(ports)) != len(ports):
        raise BrokerConfigError(
            "every feeder needs its own port (and TLS port), and the operator listener "
            f"others: {ports}"
        )
    names = [
        *(u for u in (operator_user, monitor_user, weather_user) if u),
        *(f.coordinator_user for f in spec.feeders),
        *(site for f in spec.feeders for site in f.sites),
        *(user for f in spec.feeders for user in f.ingest_users),
    ]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise BrokerConfigError(
            "user names must be unique across the broker (a client id is its user name, and "
            "client ids are broker-wide): site ids across feeders, coordinators, their ingest "
            f"users, operator, monitor and weather; repeated: {duplicates}"
        )
    return names


def operator_acl_text(
    operator_user: str | None,
    monitor_user: str | None,
    ingest_users: Mapping[str, Sequence[str]] | None = None,
    *,
    weather_user: str | None = None,
    feeders: Sequence[str] = (),
) -> str:
    """The operator listener's ACL: every feeder's topics, ``feeder/+/wattmesh/v1/...``;
    ``ingest_users`` (feeder -> its ingest workers' users) read their feeder's telemetry;
    ``weather_user`` writes the weather forecast of each of ``feeders`` and nothing else (the
    operator may too, as on a single-feeder broker)."""
    lines = [
        "# wattmesh operator listener ACL (no mount point), written by `wattmesh broker init`.",
        "# Each feeder's topics are under feeder/{id}/; sites and coordinators cannot log in here.",
        "",
    ]
    if operator_user:
        lines += [
            "# The operator reads every feeder and may send dispatch commands to any site.",
            f"user {operator_user}",
            f"topic read {ALL_FEEDERS_PREFIX}/#",
            f"topic write {ALL_FEEDERS_PREFIX}/site/+/dispatch",
            *(f"topic write {weather_topic(feeder)}" for feeder in feeders),
            "",
        ]
    if monitor_user:
        lines += [
            "# The monitor (dashboards, `wattmesh status`) reads every feeder, writes nothing.",
            f"user {monitor_user}",
            f"topic read {ALL_FEEDERS_PREFIX}/#",
            "",
        ]
    if weather_user:
        lines += [
            "# The area's weather service publishes each feeder's weather forecast (under the",
            "# feeder's mount point, where its coordinator reads it) and nothing else.",
            f"user {weather_user}",
            *(f"topic write {weather_topic(feeder)}" for feeder in feeders),
            "",
        ]
    for feeder, users in (ingest_users or {}).items():
        telemetry = f"{mount_point(feeder)}{site_wildcard('telemetry')}"
        for user in users:
            lines += [
                f"# Feeder {feeder}'s coordinator's ingest worker: reads that feeder's telemetry",
                f"# (through $share/GROUP/{telemetry}), writes nothing.",
                f"user {user}",
                f"topic read {telemetry}",
                "",
            ]
    return "\n".join(lines)


def write_feeders_broker_config(
    directory: str | os.PathLike[str],
    spec: FeedersFile,
    *,
    host: str = "127.0.0.1",
    tls: bool = False,
    tls_names: Sequence[str] = (),
    operator_user: str | None = "operator",
    monitor_user: str | None = "monitor",
    autosave_interval_s: int = 60,
    overwrite: bool = False,
    ha_discovery_prefix: str | None = HA_DISCOVERY_PREFIX,
    weather_user: str | None = "weather",
) -> FeedersBrokerFiles:
    """Write a Mosquitto configuration for every feeder of ``spec`` into ``directory``.

    One listener per feeder on ``host`` (its port from ``spec``, mount point ``feeder/{id}/``)
    and the operator listener (``spec.operator.port``, no mount point). With ``tls`` each
    feeder also gets a mutual-TLS listener on ``host`` (its ``tls_port``, same mount point and
    ACL, certificate = user), the operator one if ``spec.operator.tls_port`` is set, and the
    password listeners serve 127.0.0.1 only; one CA signs the server's certificate (with
    ``tls_names``, as in ``write_broker_config``) and one client certificate per user. Every
    call makes new random passwords (and with ``tls`` a new CA). ``weather_user`` (None: none)
    is the area's weather service, on the operator listener, allowed to publish only each
    feeder's weather forecast (:func:`weather_topic`). ``BrokerConfigError`` for
    invalid or colliding ids, users or ports, a feeder without ``tls_port`` under ``tls``, a
    path with whitespace, and when a configuration exists and ``overwrite`` is false.
    """
    users = _check_feeders(spec, operator_user, monitor_user, tls=tls, weather_user=weather_user)
    if ha_discovery_prefix is not None and not re.match(HA_PREFIX_PATTERN, ha_discovery_prefix):
        raise BrokerConfigError(
            f"Home Assistant discovery prefix {ha_discovery_prefix!r} is invalid"
        )
    root, owner = prepare_broker_dir(
        directory, host, overwrite=overwrite, renewed="new passwords and certificates"
    )
    conf, data_dir = root / CONF_NAME, root / DATA_DIR_NAME
    credentials = {user: secrets.token_urlsafe(32) for user in users}
    for f in spec.feeders:  # one password for a feeder's ingest workers, as for one feeder
        if f.ingest_users:
            shared = secrets.token_urlsafe(32)
            credentials.update(dict.fromkeys(f.ingest_users, shared))
    observers = [u for u in (operator_user, monitor_user) if u]
    ingest = {f.id: f.ingest_users for f in spec.feeders if f.ingest_users}
    cert_users = [u for u in users if not any(u in group for group in ingest.values())]
    tls_files = None
    if tls:
        group = (-1, owner[1]) if owner else None
        tls_files = _write_tls(root / TLS_DIR_NAME, host, cert_users, tls_names, owner, group)
    listeners: list[FeederListener] = []
    for f in spec.feeders:
        listener = FeederListener(
            id=f.id,
            port=f.port,
            mount_point=mount_point(f.id),
            coordinator_user=f.coordinator_user,
            sites=f.sites,
            password_file=root / f"{PASSWD_NAME}-{f.id}",
            acl_file=root / f"{ACL_NAME}-{f.id}",
            tls_port=f.tls_port if tls else None,
            crl_file=_crl_path(root, f.id) if tls else None,
            ingest_users=f.ingest_users,
        )
        feeder_users = [f.coordinator_user, *observers, *f.sites]
        _write_file(
            listener.password_file,
            password_file_text({u: credentials[u] for u in feeder_users}),
            0o600,
            owner,
        )
        acl = acl_text(
            f.sites,
            f.coordinator_user,
            operator_user,
            monitor_user,
            ha_discovery_prefix=ha_discovery_prefix,
        )
        header = (
            f"# Feeder {f.id}'s listeners (mount_point {listener.mount_point}): the broker checks\n"
            "# the mounted topic, so every topic below has the mount point in front.\n"
        )
        _write_file(
            listener.acl_file, header + mounted_acl(acl, listener.mount_point), 0o600, owner
        )
        listeners.append(listener)
    operator_users = [
        *observers,
        *([weather_user] if weather_user else []),
        *(u for users in ingest.values() for u in users),
    ]
    _write_file(
        root / PASSWD_NAME,
        password_file_text({u: credentials[u] for u in operator_users}),
        0o600,
        owner,
    )
    _write_file(
        root / ACL_NAME,
        operator_acl_text(
            operator_user,
            monitor_user,
            ingest,
            weather_user=weather_user,
            feeders=[f.id for f in spec.feeders],
        ),
        0o600,
        owner,
    )
    operator_tls_port = spec.operator.tls_port if tls else None
    operator_crl = _crl_path(root, None) if operator_tls_port is not None else None
    files = FeedersBrokerFiles(
        directory=root,
        conf=conf,
        credentials_file=root / CREDENTIALS_NAME,
        persistence_dir=data_dir,
        log_file=root / LOG_NAME,
        host=host,
        port=spec.operator.port,
        operator_user=operator_user,
        monitor_user=monitor_user,
        feeders=tuple(listeners),
        credentials=credentials,
        tls=tls_files,
        tls_port=operator_tls_port,
        operator_crl_file=operator_crl,
        weather_user=weather_user,
    )
    write_crls(files)
    _write_file(files.credentials_file, _credentials_text(files), 0o600, None)
    _write_file(conf, _conf_text(files, autosave_interval_s), 0o644, None)
    return files


def _crl_path(root: Path, feeder: str | None) -> Path:
    """Where the revocation list of ``feeder``'s TLS listener (None: the operator's) goes."""
    name = "crl-operator.pem" if feeder is None else f"crl-feeder-{feeder}.pem"
    return root / TLS_DIR_NAME / name


def revoked_users(files: FeedersBrokerFiles, listener: FeederListener | None) -> list[str]:
    """The users whose certificates ``listener``'s TLS listener (None: the operator's) revokes:
    every user with a certificate except the listener's own (its coordinator, sites and
    bridges) and the operator and monitor (the operator's: all but the operator, the monitor
    and the weather service)."""
    if files.tls is None:
        return []
    observers = {u for u in (files.operator_user, files.monitor_user) if u}
    if listener is None:
        allowed = observers | ({files.weather_user} if files.weather_user else set())
    else:
        allowed = observers | set(listener.users)
    return [u for u in files.tls.client_certs if u not in allowed]


def write_crls(files: FeedersBrokerFiles) -> list[Path]:
    """(Re)write every TLS listener's CRL (``revoked_users``, ``write_crl``); the paths written.

    A running Mosquitto loads a rewritten CRL on SIGHUP (tests/test_feeders_bridge.py).
    """
    if files.tls is None:
        return []
    written: list[Path] = []
    for listener in files.feeders:
        if listener.crl_file is not None:
            write_crl(files.tls, listener.crl_file, revoked_users(files, listener))
            written.append(listener.crl_file)
    if files.operator_crl_file is not None:
        write_crl(files.tls, files.operator_crl_file, revoked_users(files, None))
        written.append(files.operator_crl_file)
    return written


def write_crl(tls: TlsFiles, path: Path, revoked_users: Sequence[str]) -> None:
    """Write a CRL, signed by the broker's CA, that revokes the client certificates of
    ``revoked_users``: a listener with it as ``crlfile`` refuses them in the TLS handshake.

    Valid as long as the CA (OpenSSL refuses every client once a CRL's next update passes).
    A running Mosquitto (2.0.11) replaces the listener's CRL with the file's on SIGHUP.
    """
    ca_cert = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(tls.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise BrokerConfigError(f"{tls.ca_key} is not the EC key wattmesh makes")
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate clock skew
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(ca_cert.not_valid_after_utc)
    )
    for user in revoked_users:
        cert = x509.load_pem_x509_certificate(tls.client_certs[user].read_bytes())
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now)
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    _write_file(path, crl.public_bytes(serialization.Encoding.PEM), 0o644, None)


def _listener_lines(port: int, host: str, password_file: Path, acl_file: Path) -> list[str]:
    bind = "" if host in _UNSPECIFIED_HOSTS else f" {host}"
    return [
        f"listener {port}{bind}",
        "protocol mqtt",
        "allow_anonymous false",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
        *_CLIENT_ID_BINDING,
    ]


def _tls_listener_lines(
    port: int, host: str, tls: TlsFiles, crl_file: Path, acl_file: Path
) -> list[str]:
    """A mutual-TLS listener: the certificate's CN is the user (no password file is read),
    ``crl_file`` keeps out the certificates of users that belong elsewhere, and the ACL is the
    listener's own (per_listener_settings: a listener without acl_file would allow every
    topic)."""
    bind = "" if host in _UNSPECIFIED_HOSTS else f" {host}"
    return [
        f"listener {port}{bind}",
        "protocol mqtt",
        f"cafile {tls.ca_cert}",
        f"certfile {tls.server_cert}",
        f"keyfile {tls.server_key}",
        f"crlfile {crl_file}",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        f"acl_file {acl_file}",
        *_CLIENT_ID_BINDING,
        "tls_version tlsv1.2",
    ]


def _conf_text(files: FeedersBrokerFiles, autosave_interval_s: int) -> str:
    plain_host = files.connect_host
    lines = [
        "# wattmesh Mosquitto configuration for many feeders, written by",
        "# `wattmesh broker init --feeders` (broker/feeders.py). `init --force` rewrites it.",
        "# Run it with `wattmesh broker run DIR` or `mosquitto -c DIR/mosquitto.conf`.",
        "",
        "# Each listener has its own password file and ACL: a site's credentials are valid only",
        "# on its own feeder's listener.",
        "per_listener_settings true",
        "",
        *_common_conf_lines(files.persistence_dir, autosave_interval_s),
    ]
    for f in files.feeders:
        lines += [
            "",
            f"# Feeder {f.id}: its coordinator and sites see the v1 tree; the broker keeps it",
            f"# under {f.mount_point} (the ACL names the mounted topics)."
            + (" Passwords: this machine only." if files.tls else ""),
            *_listener_lines(f.port, plain_host, f.password_file, f.acl_file),
            f"mount_point {f.mount_point}",
        ]
        if files.tls is not None and f.tls_port is not None and f.crl_file is not None:
            lines += [
                "",
                f"# Feeder {f.id} over mutual TLS: the same mount point and ACL; a client",
                "# certificate's CN is its user. The CRL revokes every other feeder's users'",
                "# certificates (one CA signs them all), so those fail the TLS handshake here.",
                *_tls_listener_lines(f.tls_port, files.host, files.tls, f.crl_file, f.acl_file),
                f"mount_point {f.mount_point}",
            ]
    lines += [
        "",
        "# The operator listener: no mount point, every feeder under feeder/{id}/.",
        *_listener_lines(
            files.port, plain_host, files.directory / PASSWD_NAME, files.directory / ACL_NAME
        ),
    ]
    if files.tls is not None and files.tls_port is not None and files.operator_crl_file:
        lines += [
            "",
            "# The operator listener over mutual TLS: only the operator's, the monitor's and",
            "# the weather service's certificates are valid here (the CRL revokes every",
            "# feeder's users').",
            *_tls_listener_lines(
                files.tls_port,
                files.host,
                files.tls,
                files.operator_crl_file,
                files.directory / ACL_NAME,
            ),
        ]
    return "\n".join(lines) + "\n"


def _credentials_text(files: FeedersBrokerFiles) -> str:
    q = json.dumps  # a JSON string is a valid TOML basic string
    lines = [
        "# wattmesh broker credentials (user -> password). Secret: mode 600, never commit it.",
        "# A many-feeders broker: [broker] is the operator listener, [feeders.ID] each feeder's.",
        "",
        "[broker]",
        f"host = {q(files.host)}",
        f"port = {files.port}",
    ]
    if files.tls_port is not None:
        lines.append(f"tls_port = {files.tls_port}")
    if files.operator_user:
        lines.append(f"operator_user = {q(files.operator_user)}")
    if files.monitor_user:
        lines.append(f"monitor_user = {q(files.monitor_user)}")
    if files.weather_user:
        lines += [
            "# The area's weather service logs in here and publishes into every feeder.",
            f"weather_user = {q(files.weather_user)}",
        ]
    lines += [f"sites = [{', '.join(q(s) for s in files.sites)}]", ""]
    if files.tls is not None:
        lines += _tls_credentials_lines(files.tls)
    for f in files.feeders:
        lines += [
            f"[feeders.{f.id}]",
            f"port = {f.port}",
            *([f"tls_port = {f.tls_port}"] if f.tls_port is not None else []),
            f"mount_point = {q(f.mount_point)}",
            f"coordinator_user = {q(f.coordinator_user)}",
            f"sites = [{', '.join(q(s) for s in f.sites)}]",
            *(
                [
                    "# The ingest workers log in on the operator listener ([broker] port).",
                    f"ingest_users = [{', '.join(q(u) for u in f.ingest_users)}]",
                ]
                if f.ingest_users
                else []
            ),
            *(
                [
                    "# Edge brokers bridged into this feeder (`broker bridge-user --feeder`).",
                    f"bridge_users = [{', '.join(q(u) for u in f.bridge_users)}]",
                ]
                if f.bridge_users
                else []
            ),
            "",
        ]
    lines.append("[users]")
    lines += [f"{q(user)} = {q(pw)}" for user, pw in files.credentials.items()]
    return "\n".join(lines) + "\n"


def bridge_feeder(
    files: FeedersBrokerFiles, feeder_id: str, sites: Sequence[str]
) -> FeederListener:
    """The listener of ``feeder_id``, into which an edge broker of ``sites`` is bridged.

    ``BrokerConfigError`` if the broker has no such feeder, or a site is not one of its sites
    (naming the feeder it belongs to, or saying that no feeder has it).
    """
    try:
        listener = files.feeder(feeder_id)
    except KeyError as err:
        raise BrokerConfigError(
            f"{files.directory} has no feeder {feeder_id!r} "
            f"(its feeders: {', '.join(f.id for f in files.feeders)})"
        ) from err
    for site in sites:
        if site in listener.sites:
            continue
        owner = files.feeder_of(site)
        where = (
            f"it is a site of feeder {owner.id!r}"
            if owner is not None and site in owner.sites
            else "no feeder of this broker has it"
        )
        raise BrokerConfigError(
            f"site {site!r} is not a site of feeder {feeder_id!r} ({where}); a bridge into "
            f"feeder {feeder_id!r} may carry only its sites: {', '.join(listener.sites)}"
        )
    return listener


def record_bridge_user(
    files: FeedersBrokerFiles, feeder_id: str, user: str, password: str
) -> FeedersBrokerFiles:
    """Rewrite credentials.toml with ``user`` (``password``) as a bridge of ``feeder_id``;
    the broker as read back (with TLS: its certificate is then one of ``tls.client_certs``)."""
    feeders = tuple(
        replace(f, bridge_users=(*f.bridge_users, user)) if f.id == feeder_id else f
        for f in files.feeders
    )
    updated = replace(files, feeders=feeders, credentials={**files.credentials, user: password})
    _write_file(files.credentials_file, _credentials_text(updated), 0o600, None)
    return load_feeders_broker(files.directory)


def is_feeders_broker(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory``'s credentials.toml describes a many-feeders broker."""
    try:
        doc = tomllib.loads((Path(directory) / CREDENTIALS_NAME).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return isinstance(doc.get("feeders"), Mapping)


def load_feeders_broker(directory: str | os.PathLike[str]) -> FeedersBrokerFiles:
    """The ``FeedersBrokerFiles`` of a directory written by ``write_feeders_broker_config``."""
    root = Path(directory).absolute()
    path = root / CREDENTIALS_NAME
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        broker = doc["broker"]
        has_tls = "tls" in doc
        feeders = tuple(
            FeederListener(
                id=str(feeder_id),
                port=int(f["port"]),
                mount_point=str(f["mount_point"]),
                coordinator_user=str(f["coordinator_user"]),
                sites=tuple(str(s) for s in f["sites"]),
                password_file=root / f"{PASSWD_NAME}-{feeder_id}",
                acl_file=root / f"{ACL_NAME}-{feeder_id}",
                tls_port=int(f["tls_port"]) if has_tls else None,
                crl_file=_crl_path(root, str(feeder_id)) if has_tls else None,
                ingest_users=tuple(str(u) for u in f.get("ingest_users", ())),
                bridge_users=tuple(str(u) for u in f.get("bridge_users", ())),
            )
            for feeder_id, f in doc["feeders"].items()
        )
        credentials = {str(k): str(v) for k, v in doc["users"].items()}
        ingest = {u for f in feeders for u in f.ingest_users}
        cert_users = [u for u in credentials if u not in ingest]
        tls_port = broker.get("tls_port")
        return FeedersBrokerFiles(
            directory=root,
            conf=root / CONF_NAME,
            credentials_file=path,
            persistence_dir=root / DATA_DIR_NAME,
            log_file=root / LOG_NAME,
            host=str(broker["host"]),
            port=int(broker["port"]),
            operator_user=broker.get("operator_user"),
            monitor_user=broker.get("monitor_user"),
            feeders=feeders,
            credentials=credentials,
            tls=_tls_layout(root / TLS_DIR_NAME, cert_users) if has_tls else None,
            tls_port=None if tls_port is None else int(tls_port),
            operator_crl_file=_crl_path(root, None) if tls_port is not None else None,
            weather_user=broker.get("weather_user"),
        )
    except FileNotFoundError as err:
        raise BrokerConfigError(
            f"{path} not found: is {root} a broker directory (`wattmesh broker init`)?"
        ) from err
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as err:
        raise BrokerConfigError(f"cannot read {path} as a many-feeders broker: {err!r}") from err
