"""Mosquitto for wattmesh: configuration (users, ACL, TLS) and a broker process to run it.

``write_broker_config`` writes a complete broker directory::

    DIR/mosquitto.conf      listeners, persistence, queue limits, logging
    DIR/passwd              PBKDF2-SHA512 hashes in Mosquitto's ``$7$`` format (no plain text)
    DIR/acl                 one explicit block per user (docs/architecture.md section 3)
    DIR/credentials.toml    user -> password for deployment (mode 600, never commit it)
    DIR/data/               persistence (retained messages, sessions, queued QoS 1 messages)
    DIR/tls/                with TLS: ca.crt, ca.key, server.crt, server.key,
                            clients/{user}.crt and clients/{user}.key
    DIR/mosquitto.log       the broker's stderr, written by ``MosquittoProcess``
    DIR/mosquitto.pid       while it runs: the broker's pid and the pid of who started it

Mosquitto started as root drops to the ``mosquitto`` user (``nobody`` if that user does not
exist); ``MosquittoProcess`` and ``run_mosquitto_foreground`` run as root start it as that user
directly, so that it keeps dying with its parent (Linux clears that tie on a change of user).
When the config is written as root, the files the broker reads (passwd, acl, the TLS
server key) and its persistence directory are therefore owned by that user, and the directory
is group-readable by it; secrets only deployment needs (credentials.toml, the CA key, client
keys) stay with the writer, mode 600. Every directory above the broker directory must be
traversable by that user too (pytest's ``/tmp/pytest-of-root`` is not): ``MosquittoProcess``
and ``run_mosquitto_foreground`` check this before starting and say what to change.

The ACL uses explicit ``user`` blocks, not ``pattern`` lines: a pattern applies to every user
(the coordinator and operator included), an explicit block to exactly one. Site user names
equal site ids, so the broker can tie a site's identity to its topics (docs/architecture.md s. 7).

A client id belongs to one user: every listener sets ``use_username_as_clientid``, so the broker
uses the user name (with mTLS the certificate's CN) as the client id whatever the client sends.
Credentials of one site can therefore never disconnect the coordinator or another site, nor take
over its persistent session; a service's session survives its reconnects because its id is
always the same. The price: one connection per user (a second connection of the same user
replaces the first). Observers (dashboards, ``wattmesh status``, tests) use the read-only
``monitor`` user.

TLS is mutual: the TLS listener requires a client certificate signed by the generated CA and
takes the certificate's CN as the user name (``use_identity_as_username``), so no password
crosses the network and the same ACL applies. The password listener then binds to 127.0.0.1
only (for services on the broker's own machine). To revoke a client certificate, add a CRL
(``crlfile``) or re-run ``init --force`` (new CA).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import datetime as dt
import errno
import functools
import hashlib
import ipaddress
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import (
    BrokerConfigError,
    BrokerError,
    BrokerProcessError,
    MosquittoNotFoundError,
)
from broker.topics import (
    HA_DISCOVERY_PREFIX,
    HA_OBJECTS,
    HA_PREFIX_PATTERN,
    MARKET_CLEARING,
    PREFIX,
    SITE_PUBLISHES,
    SITE_READS,
    WEATHER_FORECAST,
    check_id,
    forecast_topic,
    ha_discovery_topic,
    ha_state_topic,
    site_topic,
    site_wildcard,
)

log = logging.getLogger(__name__)

CONF_NAME = "mosquitto.conf"
PASSWD_NAME = "passwd"
ACL_NAME = "acl"
CREDENTIALS_NAME = "credentials.toml"
DATA_DIR_NAME = "data"
LOG_NAME = "mosquitto.log"
#: Next to the configuration (``mosquitto.conf`` -> ``mosquitto.pid``): which Mosquitto runs it
#: and which process started it.
PID_SUFFIX = ".pid"
TLS_DIR_NAME = "tls"

#: Where Mosquitto lives when it is not on PATH (Debian puts it in /usr/sbin).
MOSQUITTO_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")
INSTALL_HINT = "mosquitto is not installed: apt-get install mosquitto (Debian/Ubuntu)"

#: Mosquitto's ``$7$`` hash: PBKDF2-HMAC-SHA512, 12-byte salt. 101 iterations is Mosquitto's
#: own default; the generated passwords carry 256 bits, so more iterations would add nothing.
PBKDF2_ITERATIONS = 101
_SALT_BYTES = 12

#: Grid state topics of every feeder (what every site may read).
GRID_STATE_ALL = f"{PREFIX}/grid/+/state"
_UNSPECIFIED_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The certificate authority, the server's certificate and one client certificate per user."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_certs: dict[str, Path]
    client_keys: dict[str, Path]


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """What ``write_broker_config`` wrote: paths, listeners and credentials (user -> password)."""

    directory: Path
    conf: Path
    password_file: Path
    acl_file: Path
    credentials_file: Path
    persistence_dir: Path
    log_file: Path
    host: str
    port: int
    tls_port: int | None
    coordinator_user: str
    operator_user: str | None
    monitor_user: str | None
    sites: tuple[str, ...]
    credentials: dict[str, str] = field(repr=False)
    tls: TlsFiles | None = None
    #: The weather service's user: it may publish only ``weather/forecast`` (None: no such user).
    weather_user: str | None = None

    @property
    def users(self) -> tuple[str, ...]:
        """Every user name: the coordinator, the operator and monitor (if any), then the sites."""
        return tuple(self.credentials)

    @property
    def connect_host(self) -> str:
        """The address a client on this machine connects to (the password listener's)."""
        return _plain_bind_host(self.host, tls=self.tls_port is not None)


# ---------------------------------------------------------------------------------------------
# Writing a configuration


def write_broker_config(
    directory: str | os.PathLike[str],
    sites: Sequence[str],
    *,
    port: int = 1883,
    host: str = "127.0.0.1",
    tls: bool = False,
    tls_port: int = 8883,
    coordinator_user: str = "coordinator",
    operator_user: str | None = "operator",
    monitor_user: str | None = "monitor",
    tls_names: Sequence[str] = (),
    autosave_interval_s: int = 60,
    overwrite: bool = False,
    ha_discovery_prefix: str | None = HA_DISCOVERY_PREFIX,
    ingest_workers: int = 0,
    weather_user: str | None = "weather",
) -> BrokerFiles:
    """Write a Mosquitto configuration for ``sites`` into ``directory`` (created if missing).

    ``port`` is the password listener (on ``host``; with ``tls`` on 127.0.0.1 only) and
    ``tls_port`` the mutual-TLS listener on ``host``; ``tls_names`` are extra DNS names or IP
    addresses for the server certificate (``host`` unless it is a wildcard, ``localhost``,
    127.0.0.1 and ::1 are always in it). ``autosave_interval_s`` is how often the broker saves
    its persistence database (a SIGKILL loses what changed since). Every call makes new
    random passwords (and with ``tls`` a new CA). ``monitor_user`` reads everything and writes
    nothing (dashboards, status commands, tests); None leaves it out. Every listener binds the
    client id to the user (``use_username_as_clientid``): one connection per user.
    ``ha_discovery_prefix`` is Home Assistant's discovery prefix: each site may publish its own
    discovery configs under it and the monitor (Home Assistant's user) reads it; None grants
    neither. ``ingest_workers`` adds that many users ``{coordinator_user}-ingest-{i}``
    (:func:`ingest_user`, one password for them all) for the coordinator's ingest worker
    processes, each allowed to read every site's telemetry and nothing else. ``weather_user``
    (None: none) may publish the weather forecast (``weather/forecast``) and nothing else.
    ``BrokerConfigError`` for invalid ids,
    ports or paths, and when a configuration exists and ``overwrite`` is false.
    """
    site_ids = _check_users(
        sites,
        coordinator_user,
        operator_user,
        monitor_user,
        ingest_workers=ingest_workers,
        weather_user=weather_user,
    )
    if ha_discovery_prefix is not None and not re.match(HA_PREFIX_PATTERN, ha_discovery_prefix):
        raise BrokerConfigError(
            f"Home Assistant discovery prefix {ha_discovery_prefix!r} must be topic levels of "
            "A-Z, a-z, 0-9, '_' and '-' (no wildcards)"
        )
    _check_port(port, "port")
    if tls:
        _check_port(tls_port, "tls_port")
        if tls_port == port:
            raise BrokerConfigError(f"port and tls_port must differ (both are {port})")
    root, owner = prepare_broker_dir(
        directory, host, overwrite=overwrite, renewed="new passwords and certificates"
    )
    group = (-1, owner[1]) if owner else None
    conf, data_dir = root / CONF_NAME, root / DATA_DIR_NAME

    users = _user_names(site_ids, coordinator_user, operator_user, monitor_user, weather_user)
    credentials = {user: secrets.token_urlsafe(32) for user in users}
    ingest_users = [ingest_user(coordinator_user, i) for i in range(1, ingest_workers + 1)]
    if ingest_users:  # after the coordinator: one password for its worker processes
        ingest_password = secrets.token_urlsafe(32)
        credentials = {
            coordinator_user: credentials.pop(coordinator_user),
            **dict.fromkeys(ingest_users, ingest_password),
            **credentials,
        }

    tls_files = (
        _write_tls(root / TLS_DIR_NAME, host, users, tls_names, owner, group) if tls else None
    )
    passwd = root / PASSWD_NAME
    _write_file(passwd, password_file_text(credentials), 0o600, owner)
    acl = root / ACL_NAME
    _write_file(
        acl,
        acl_text(
            site_ids,
            coordinator_user,
            operator_user,
            monitor_user,
            ha_discovery_prefix=ha_discovery_prefix,
            ingest_users=ingest_users,
            weather_user=weather_user,
        ),
        0o600,
        owner,
    )
    files = BrokerFiles(
        directory=root,
        conf=conf,
        password_file=passwd,
        acl_file=acl,
        credentials_file=root / CREDENTIALS_NAME,
        persistence_dir=data_dir,
        log_file=root / LOG_NAME,
        host=host,
        port=port,
        tls_port=tls_port if tls else None,
        coordinator_user=coordinator_user,
        operator_user=operator_user,
        monitor_user=monitor_user,
        sites=tuple(site_ids),
        credentials=credentials,
        tls=tls_files,
        weather_user=weather_user,
    )
    _write_file(files.credentials_file, _credentials_text(files), 0o600, None)
    _write_file(conf, _conf_text(files, autosave_interval_s), 0o644, None)
    return files


def ingest_user(coordinator_user: str, index: int) -> str:
    """The broker user of the coordinator's ingest worker ``index`` (1, 2, ...)."""
    return f"{coordinator_user}-ingest-{index}"


def prepare_broker_dir(
    directory: str | os.PathLike[str], host: str, *, overwrite: bool, renewed: str
) -> tuple[Path, tuple[int, int] | None]:
    """Check ``host`` and ``directory`` and make the directory and its persistence folder,
    readable by the broker's service user when written as root; the directory (absolute)
    and that user's (uid, gid), if any. ``BrokerConfigError`` for a bad host, whitespace in
    the path (Mosquitto's parser splits values there), an existing configuration without
    ``overwrite`` (``renewed``: what overwriting makes anew) or a directory it cannot make."""
    if not host or any(ch.isspace() for ch in host):
        raise BrokerConfigError(f"host {host!r} is not a bind address")
    root = Path(directory).absolute()
    if any(ch.isspace() for ch in str(root)):
        raise BrokerConfigError(f"broker directory {str(root)!r} must not contain whitespace")
    conf = root / CONF_NAME
    if conf.exists() and not overwrite:
        raise BrokerConfigError(
            f"{conf} already exists: refusing to overwrite it (use --force / overwrite=True; "
            f"that makes {renewed})"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BrokerConfigError(f"cannot create broker directory {root}: {err}") from err
    owner = _service_owner()
    if owner:
        # The broker must read its files here; the writer keeps ownership of the directory.
        os.chown(root, -1, owner[1])
        root.chmod(0o750)
    data_dir = root / DATA_DIR_NAME
    data_dir.mkdir(mode=0o700, exist_ok=True)
    if owner:
        os.chown(data_dir, *owner)
    return root, owner


def _user_names(
    sites: Sequence[str],
    coordinator_user: str,
    operator_user: str | None,
    monitor_user: str | None,
    weather_user: str | None = None,
) -> list[str]:
    """Every user, in the order credentials.toml lists them."""
    optional = [user for user in (operator_user, monitor_user, weather_user) if user]
    return [coordinator_user, *optional, *sites]


def _check_users(
    sites: Sequence[str],
    coordinator_user: str,
    operator_user: str | None,
    monitor_user: str | None,
    *,
    ingest_workers: int = 0,
    weather_user: str | None = None,
) -> list[str]:
    if isinstance(sites, str):
        raise BrokerConfigError("sites must be a sequence of site ids, not one string")
    site_ids = list(sites)
    if not site_ids:
        raise BrokerConfigError("at least one site is needed")
    try:
        for site in site_ids:
            check_id(site)
        check_id(coordinator_user, "coordinator user")
        if operator_user is not None:
            check_id(operator_user, "operator user")
        if monitor_user is not None:
            check_id(monitor_user, "monitor user")
        if weather_user is not None:
            check_id(weather_user, "weather user")
    except ValueError as err:
        raise BrokerConfigError(str(err)) from err
    if not 0 <= ingest_workers <= 64:
        raise BrokerConfigError(f"ingest_workers must be 0-64, not {ingest_workers}")
    names = _user_names(site_ids, coordinator_user, operator_user, monitor_user, weather_user)
    names += [ingest_user(coordinator_user, i) for i in range(1, ingest_workers + 1)]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise BrokerConfigError(
            "user names must be unique (site ids, coordinator, operator, monitor and weather): "
            f"{duplicates}"
        )
    return site_ids


def _check_port(port: int, what: str) -> None:
    if not 1 <= port <= 65535:
        raise BrokerConfigError(f"{what} {port} is not a TCP port (1-65535)")


def mosquitto_password_hash(password: str, *, salt: bytes | None = None) -> str:
    """``password`` hashed the way ``mosquitto_passwd`` does: ``$7$iterations$salt$hash``.

    PBKDF2-HMAC-SHA512 (RFC 8018) with a random 12-byte salt, both base64-encoded.
    """
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    salt_b64 = base64.b64encode(salt).decode()
    return f"$7${PBKDF2_ITERATIONS}${salt_b64}${base64.b64encode(digest).decode()}"


def password_file_text(credentials: Mapping[str, str]) -> str:
    """A Mosquitto password file (``user:$7$...`` lines) for ``credentials``."""
    return "".join(f"{user}:{mosquitto_password_hash(pw)}\n" for user, pw in credentials.items())


def acl_text(
    sites: Sequence[str],
    coordinator_user: str,
    operator_user: str | None,
    monitor_user: str | None = None,
    *,
    ha_discovery_prefix: str | None = HA_DISCOVERY_PREFIX,
    ingest_users: Sequence[str] = (),
    weather_user: str | None = None,
) -> str:
    """The ACL file: the access rules (docs/architecture.md s. 3), one explicit block per user.

    The operator and the monitor read everything under the prefix (site topics, market, grid,
    forecasts and the coordinator's ``coordinator/{id}/status``); only the operator writes, and
    only dispatch commands. With ``ha_discovery_prefix`` each site may also publish its own
    Home Assistant discovery configs (one topic per sensor of ``HA_OBJECTS``) and its
    ``ha/state``, and the monitor (the user Home Assistant connects as) reads the prefix.
    Each of ``ingest_users`` (the coordinator's ingest workers) reads every site's telemetry
    (also through a shared subscription ``$share/GROUP/...``: Mosquitto checks the topic
    without that prefix) and writes nothing. ``weather_user`` (the weather service) and the
    operator may publish the weather forecast; the coordinator reads it.
    """
    lines = [
        "# wattmesh broker ACL (docs/architecture.md s. 3), written by `wattmesh broker init`.",
        "# One explicit block per user; no 'pattern' lines (they would apply to every user).",
        "# A topic not granted here is refused: publishes are dropped (MQTT 5: PUBACK 135),",
        "# messages on it are never delivered to the user.",
        "",
        "# The coordinator may do everything under the wattmesh prefix.",
        f"user {coordinator_user}",
        f"topic readwrite {PREFIX}/#",
        "",
    ]
    for user in ingest_users:
        lines += [
            "# A coordinator ingest worker reads every site's telemetry and writes nothing.",
            f"user {user}",
            f"topic read {site_wildcard('telemetry')}",
            "",
        ]
    if operator_user:
        lines += [
            "# The operator reads everything and may send dispatch commands to any site.",
            f"user {operator_user}",
            f"topic read {PREFIX}/#",
            f"topic write {site_wildcard('dispatch')}",
            f"topic write {WEATHER_FORECAST}",
            "",
        ]
    if monitor_user:
        lines += [
            "# The monitor (dashboards, status commands) reads everything and writes nothing.",
            f"user {monitor_user}",
            f"topic read {PREFIX}/#",
            *([f"topic read {ha_discovery_prefix}/#"] if ha_discovery_prefix else []),
            "",
        ]
    if weather_user:
        lines += [
            "# The weather service publishes its forecast and nothing else; it reads nothing.",
            f"user {weather_user}",
            f"topic write {WEATHER_FORECAST}",
            "",
        ]
    for site in sites:
        lines += [
            f"# Site {site}: publishes only its own topics, reads only its own commands.",
            f"user {site}",
            *(f"topic write {site_topic(site, kind)}" for kind in SITE_PUBLISHES),
            *(f"topic read {site_topic(site, kind)}" for kind in SITE_READS),
            f"topic read {forecast_topic(site)}",
            f"topic read {MARKET_CLEARING}",
            f"topic read {GRID_STATE_ALL}",
            *(_ha_site_lines(ha_discovery_prefix, site) if ha_discovery_prefix else []),
            "",
        ]
    return "\n".join(lines)


def _ha_site_lines(prefix: str, site: str) -> list[str]:
    """A site's Home Assistant grants: its own discovery configs and state topic, no more."""
    return [
        *(f"topic write {ha_discovery_topic(prefix, site, obj)}" for obj in HA_OBJECTS),
        f"topic write {ha_state_topic(site)}",
    ]


def _plain_bind_host(host: str, *, tls: bool) -> str:
    if tls:
        return "127.0.0.1"
    return "127.0.0.1" if host in _UNSPECIFIED_HOSTS else host


#: Written into every listener (it is a per-listener option): the broker replaces the client
#: id a client sends with its user name (with mTLS the certificate's CN), so credentials of one
#: user can never take over another user's connection or persistent session.
_CLIENT_ID_BINDING = (
    "# A client's id is its user name, whatever id it sends: one user's credentials cannot",
    "# take over another user's connection or persistent session. One connection per user:",
    "# a second connection of the same user replaces the first (and resumes its session).",
    "use_username_as_clientid true",
)


def _common_conf_lines(persistence_dir: Path, autosave_interval_s: int) -> list[str]:
    """The broker-wide settings every layout shares: persistence, queues and logging."""
    return [
        "# Persistence: retained messages, persistent sessions and their queued QoS 1 messages",
        "# survive a restart. Saved on a clean shutdown (SIGTERM) and every autosave_interval",
        "# seconds; a SIGKILL loses what changed since the last save.",
        "persistence true",
        f"persistence_location {persistence_dir}/",
        f"autosave_interval {autosave_interval_s}",
        "",
        "# Queues. After an outage an edge replays its spool in one burst, and a gateway that is",
        "# away keeps a persistent session whose QoS 1 messages wait here. Mosquitto's default",
        "# (1000 per client) silently drops whatever is beyond it, so the replay or a long",
        "# outage's commands would be lost: allow 100000 per client (bytes unlimited).",
        "max_queued_messages 100000",
        "max_queued_bytes 0",
        "# QoS 1 messages in flight to one client (default 20): more keeps a busy coordinator fed.",
        "# Receivers are idempotent on the message id and order by ts, not by arrival.",
        "max_inflight_messages 100",
        "# MQTT 3.1.1 sessions (clean_session false) that never come back are dropped after",
        "# 14 days; MQTT 5 clients set their own session expiry.",
        "persistent_client_expiration 14d",
        "# Small packets (PUBACKs, telemetry) go out at once instead of waiting for Nagle's",
        "# algorithm to meet a delayed ACK (tens of milliseconds per round trip otherwise).",
        "set_tcp_nodelay true",
        "",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "connection_messages true",
    ]


def _conf_text(files: BrokerFiles, autosave_interval_s: int) -> str:
    plain_host = _plain_bind_host(files.host, tls=files.tls is not None)
    bind = "" if files.host in _UNSPECIFIED_HOSTS else f" {files.host}"
    lines = [
        "# wattmesh Mosquitto configuration, written by `wattmesh broker init`",
        "# (broker/mosquitto.py). `init --force` rewrites it: hand edits are lost then.",
        "# Run it with `wattmesh broker run DIR` or `mosquitto -c DIR/mosquitto.conf`.",
        "",
        "# Started as root, Mosquitto drops to the 'mosquitto' user ('nobody' if that user does",
        "# not exist): the passwd, acl and TLS server key files and the persistence directory",
        "# are owned by it.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {files.password_file}",
        f"acl_file {files.acl_file}",
        "",
        *_common_conf_lines(files.persistence_dir, autosave_interval_s),
        "",
        "# Password listener (MQTT 3.1.1 and 5)."
        + (" With TLS on it serves this machine only." if files.tls else ""),
        f"listener {files.port} {plain_host}",
        "protocol mqtt",
        *_CLIENT_ID_BINDING,
    ]
    if files.tls is not None and files.tls_port is not None:
        lines += [
            "",
            "# Mutual TLS: a client presents a certificate signed by our CA; its CN is the user",
            "# name for the ACL (no password). TLS 1.2 and 1.3 only.",
            f"listener {files.tls_port}{bind}",
            "protocol mqtt",
            f"cafile {files.tls.ca_cert}",
            f"certfile {files.tls.server_cert}",
            f"keyfile {files.tls.server_key}",
            "require_certificate true",
            "use_identity_as_username true",
            *_CLIENT_ID_BINDING,
            "tls_version tlsv1.2",
        ]
    return "\n".join(lines) + "\n"


def _tls_credentials_lines(tls: TlsFiles) -> list[str]:
    """credentials.toml's [tls] section: where the CA and the client certificates are."""
    q = json.dumps  # a JSON string is a valid TOML basic string
    return [
        "[tls]",
        f"ca_cert = {q(str(tls.ca_cert))}",
        f"clients = {q(str(tls.ca_cert.parent / 'clients'))}",
        "",
    ]


def _credentials_text(files: BrokerFiles) -> str:
    q = json.dumps  # a JSON string is a valid TOML basic string
    lines = [
        "# wattmesh broker credentials (user -> password). Secret: mode 600, never commit it.",
        "# The broker itself holds only salted hashes (passwd).",
        "",
        "[broker]",
        f"host = {q(files.host)}",
        f"port = {files.port}",
    ]
    if files.tls_port is not None:
        lines.append(f"tls_port = {files.tls_port}")
    lines.append(f"coordinator_user = {q(files.coordinator_user)}")
    if files.operator_user:
        lines.append(f"operator_user = {q(files.operator_user)}")
    if files.monitor_user:
        lines.append(f"monitor_user = {q(files.monitor_user)}")
    if files.weather_user:
        lines.append(f"weather_user = {q(files.weather_user)}")
    lines += [f"sites = [{', '.join(q(s) for s in files.sites)}]", ""]
    if files.tls is not None:
        lines += _tls_credentials_lines(files.tls)
    lines.append("[users]")
    lines += [f"{q(user)} = {q(pw)}" for user, pw in files.credentials.items()]
    return "\n".join(lines) + "\n"


def _text_or_empty(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def load_broker_files(directory: str | os.PathLike[str]) -> BrokerFiles:
    """The ``BrokerFiles`` of a directory written by ``write_broker_config``.

    Read from its ``credentials.toml``; ``BrokerConfigError`` if it is missing or malformed.
    """
    root = Path(directory).absolute()
    path = root / CREDENTIALS_NAME
    if "[feeders." in _text_or_empty(path):
        raise BrokerConfigError(
            f"{root} is a many-feeders broker (`wattmesh broker init --feeders`): each feeder "
            "has its own listener and users; give that feeder's port and credentials "
            "(broker/feeders.py: load_feeders_broker)"
        )
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        broker = doc["broker"]
        credentials = {str(k): str(v) for k, v in doc["users"].items()}
        tls_port = broker.get("tls_port")
        files = BrokerFiles(
            directory=root,
            conf=root / CONF_NAME,
            password_file=root / PASSWD_NAME,
            acl_file=root / ACL_NAME,
            credentials_file=path,
            persistence_dir=root / DATA_DIR_NAME,
            log_file=root / LOG_NAME,
            host=str(broker["host"]),
            port=int(broker["port"]),
            tls_port=None if tls_port is None else int(tls_port),
            coordinator_user=str(broker["coordinator_user"]),
            operator_user=broker.get("operator_user"),
            monitor_user=broker.get("monitor_user"),
            sites=tuple(str(s) for s in broker["sites"]),
            credentials=credentials,
            tls=None if tls_port is None else _tls_layout(root / TLS_DIR_NAME, credentials),
            weather_user=broker.get("weather_user"),
        )
    except FileNotFoundError as err:
        raise BrokerConfigError(
            f"{path} not found: is {root} a broker directory (`wattmesh broker init`)?"
        ) from err
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as err:
        raise BrokerConfigError(f"cannot read {path}: {err!r}") from err
    return files


# ---------------------------------------------------------------------------------------------
# Files, ownership and TLS material


def _service_owner() -> tuple[int, int] | None:
    """(uid, gid) Mosquitto drops to when started as root; None unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("mosquitto", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    return None


def _write_file(path: Path, data: str | bytes, mode: int, owner: tuple[int, int] | None) -> None:
    """Write ``path`` atomically, created with ``mode`` (never briefly more open) and owner."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            if owner is not None:
                os.fchown(fh.fileno(), *owner)
            fh.write(raw)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tls_layout(directory: Path, users: Iterable[str]) -> TlsFiles:
    clients = directory / "clients"
    return TlsFiles(
        directory=directory,
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_certs={user: clients / f"{user}.crt" for user in users},
        client_keys={user: clients / f"{user}.key" for user in users},
    )


def _write_tls(
    directory: Path,
    host: str,
    users: Sequence[str],
    names: Sequence[str],
    owner: tuple[int, int] | None,
    group: tuple[int, int] | None,
) -> TlsFiles:
    layout = _tls_layout(directory, users)
    directory.mkdir(mode=0o750, exist_ok=True)
    if group:
        os.chown(directory, *group)
        directory.chmod(0o750)
    clients_dir = directory / "clients"
    if clients_dir.exists():
        shutil.rmtree(clients_dir)  # certificates of the previous CA are useless now
    clients_dir.mkdir(mode=0o700)

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate clock skew

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def name(common_name: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "wattmesh"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("wattmesh broker CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    def leaf(
        common_name: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName] | None
    ) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=825))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    server_cert, server_key = leaf(
        "wattmesh broker", ExtendedKeyUsageOID.SERVER_AUTH, _server_names(host, names)
    )
    _write_file(layout.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644, None)
    _write_file(layout.ca_key, key_pem(ca_key), 0o600, None)
    _write_file(layout.server_cert, server_cert, 0o644, None)
    _write_file(layout.server_key, server_key, 0o600, owner)
    for user in users:
        cert_pem, user_key = leaf(user, ExtendedKeyUsageOID.CLIENT_AUTH, None)
        _write_file(layout.client_certs[user], cert_pem, 0o644, None)
        _write_file(layout.client_keys[user], user_key, 0o600, None)
    return layout


def _server_names(host: str, extra: Sequence[str]) -> list[x509.GeneralName]:
    candidates = [*([] if host in _UNSPECIFIED_HOSTS else [host]), "localhost", "127.0.0.1"]
    candidates += ["::1", *extra]
    result: list[x509.GeneralName] = []
    seen: set[str] = set()
    for item in candidates:
        if item in seen:
            continue
        seen.add(item)
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(item)))
        except ValueError:
            result.append(x509.DNSName(item))
    return result


# ---------------------------------------------------------------------------------------------
# Running Mosquitto


def find_mosquitto() -> str:
    """The path of the ``mosquitto`` binary; ``MosquittoNotFoundError`` if it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in MOSQUITTO_DIRS:
        candidate = Path(directory) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise MosquittoNotFoundError(
        f"{INSTALL_HINT}; looked on PATH and in {', '.join(MOSQUITTO_DIRS)}"
    )


def _user_may(st: os.stat_result, uid: int, gids: set[int], want: int) -> bool:
    """Whether a user (``uid``, groups ``gids``) has the ``want`` bits (4 r, 2 w, 1 x)."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return (st.st_mode >> 6) & want == want
    if st.st_gid in gids:
        return (st.st_mode >> 3) & want == want
    return st.st_mode & want == want


def check_broker_access(directory: str | os.PathLike[str]) -> None:
    """When we are root: ``BrokerConfigError`` unless Mosquitto can use ``directory``.

    Mosquitto started as root drops to the ``mosquitto`` user, which must traverse every
    directory above the broker directory, read passwd, acl and the TLS files, and write the
    persistence directory. Not root: nothing to check (Mosquitto keeps our user).
    """
    if os.geteuid() != 0:
        return
    entry = None
    for candidate in ("mosquitto", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(candidate)
            break
    if entry is None:
        return
    uid = entry.pw_uid
    gids = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    root = Path(directory).absolute()
    problems: list[str] = []
    for parent in [*reversed(root.parents), root]:
        with contextlib.suppress(FileNotFoundError):
            if not _user_may(parent.stat(), uid, gids, 1):
                problems.append(f"cannot enter {parent} (mode {parent.stat().st_mode & 0o777:o})")
                break
    needs = [(root / PASSWD_NAME, 4), (root / ACL_NAME, 4), (root / DATA_DIR_NAME, 7)]
    tls_dir = root / TLS_DIR_NAME
    needs += [(tls_dir / n, 4) for n in ("ca.crt", "server.crt", "server.key")]
    for path, want in needs:
        with contextlib.suppress(FileNotFoundError):
            if not problems and not _user_may(path.stat(), uid, gids, want):
                what = "write" if want & 2 else "read"
                problems.append(f"cannot {what} {path}")
    if problems:
        raise BrokerConfigError(
            f"Mosquitto started as root runs as user {entry.pw_name!r}, which "
            + "; ".join(problems)
            + ". Put the broker directory where that user can reach it (e.g. under "
            "/var/lib or /tmp) and re-run `wattmesh broker init` there as root, which sets the "
            "owners, or fix the modes."
        )


# ---------------------------------------------------------------------------------------------
# One Mosquitto per configuration: it dies with its parent, and a start clears what a killed
# parent left behind.

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: What the broker receives when its parent dies: SIGTERM, so it saves its database first.
PARENT_DEATH_SIGNAL = signal.SIGTERM


def pid_file_path(conf_path: str | os.PathLike[str]) -> Path:
    """Where the pid of the Mosquitto running ``conf_path`` is kept: next to it, ``.pid``."""
    return Path(conf_path).absolute().with_suffix(PID_SUFFIX)


def _proc_parent(pid: int) -> int | None:
    """The parent pid of a live process; None if it does not exist or is a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields follow the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X", "x"):
        return None
    return int(fields[1])


def _proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _describe_pid(pid: int) -> str:
    args = _proc_cmdline(pid)
    return f"pid {pid} ({' '.join(args)})" if args else f"pid {pid}"


def _runs_conf(pid: int, conf: Path) -> bool:
    """Whether ``pid`` is a Mosquitto started on the configuration ``conf``."""
    args = _proc_cmdline(pid)
    return bool(args) and "mosquitto" in Path(args[0]).name and str(conf) in args[1:]


def _write_pid_file(conf: Path, pid: int) -> str | None:
    """Record the broker ``pid`` and ours; a warning to show if the file cannot be written."""
    record = {"pid": pid, "parent": os.getpid(), "conf": str(conf)}
    try:
        _write_file(pid_file_path(conf), json.dumps(record) + "\n", 0o644, None)
    except OSError as err:
        return (
            f"cannot write {pid_file_path(conf)} ({err.strerror}): a broker orphaned by a "
            "killed parent will not be recognised at the next start"
        )
    return None


def _read_pid_file(conf: Path) -> tuple[int, int] | None:
    """(broker pid, pid of the process that started it) from the pid file; None if unreadable."""
    try:
        record = json.loads(pid_file_path(conf).read_text(encoding="utf-8"))
        return int(record["pid"]), int(record["parent"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_pid_file(conf: Path, pid: int | None) -> None:
    """Remove the pid file if it still names ``pid`` (a newer broker's file stays)."""
    record = _read_pid_file(conf)
    if pid is not None and record is not None and record[0] == pid:
        pid_file_path(conf).unlink(missing_ok=True)


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _proc_parent(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def stop_orphaned_mosquitto(
    conf_path: str | os.PathLike[str], timeout_s: float = 10.0
) -> int | None:
    """Stop a Mosquitto left running on ``conf_path`` by a parent that is gone; its pid, or None.

    The pid file next to the configuration names the broker and the process that started it.
    A broker that still runs this configuration but is no longer that process's child lost
    its parent (killed before it could stop the broker): it gets SIGTERM (it saves its
    database), SIGKILL after ``timeout_s``. ``BrokerProcessError`` if the broker still has its
    parent (the configuration is in use) or cannot be stopped. Linux (``/proc``) only; elsewhere
    nothing is found.
    """
    conf = Path(conf_path).absolute()
    record = _read_pid_file(conf)
    if record is None:
        return None
    pid, parent = record
    current_parent = _proc_parent(pid)
    if current_parent is None or not _runs_conf(pid, conf):
        pid_file_path(conf).unlink(missing_ok=True)  # stale: that broker is gone
        return None
    if current_parent == parent:
        raise BrokerProcessError(
            f"mosquitto for {conf} is already running ({_describe_pid(pid)}, started by "
            f"{_describe_pid(parent)}): stop that one first"
        )
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        except PermissionError as err:
            raise BrokerProcessError(
                f"mosquitto {_describe_pid(pid)} still runs {conf} without its parent, and we "
                f"may not stop it: {err}"
            ) from err
        if _wait_gone(pid, timeout_s):
            break
    else:
        raise BrokerProcessError(f"mosquitto {_describe_pid(pid)} did not stop")
    pid_file_path(conf).unlink(missing_ok=True)
    return pid


def conf_listeners(conf_path: str | os.PathLike[str]) -> list[tuple[int, str | None]]:
    """(port, bind address; None for every address) of each ``listener`` line of a config."""
    try:
        text = Path(conf_path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    listeners: list[tuple[int, str | None]] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "listener" and parts[1].isdigit():
            listeners.append((int(parts[1]), parts[2] if len(parts) > 2 else None))
    return listeners


def _port_in_use(port: int, host: str | None) -> bool:
    """Whether something listens on ``port`` where a broker binding ``host`` would."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                # As Mosquitto binds: SO_REUSEADDR ignores TIME_WAIT, never a listening socket.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
        except OSError as err:  # EACCES (a privileged port), no IPv6, ...: not "in use"
            if err.errno == errno.EADDRINUSE:
                return True
    return False


def port_holders(port: int) -> list[int]:
    """The pids of processes listening on TCP ``port`` that we can see (Linux ``/proc``)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            listening = len(fields) > 9 and fields[3] == "0A"
            if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    pids: list[int] = []
    if not inodes:
        return pids
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
    return sorted(pids)


def check_ports_free(
    conf_path: str | os.PathLike[str], extra: Iterable[tuple[int, str | None]] = ()
) -> None:
    """``BrokerProcessError`` naming the port and its process if a listener's port is taken.

    The ports are the configuration's ``listener`` lines plus ``extra`` (port, bind address).
    """
    for port, host in dict.fromkeys([*conf_listeners(conf_path), *extra]):
        if not _port_in_use(port, host):
            continue
        holders = port_holders(port)
        who = (
            ", ".join(_describe_pid(pid) for pid in holders)
            if holders
            else "a process we cannot see"
        )
        raise BrokerProcessError(
            f"port {port} ({host or 'every address'}) is already in use by {who}: stop it, or "
            f"give this broker another port (`wattmesh broker init DIR --force --port N`)"
        )


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when the forking thread exits.

    ``PR_SET_PDEATHSIG`` follows the *thread* that forked (start brokers from a thread that
    lives as long as they should), and Linux clears it when the process changes its user, so
    the broker is started as its service user rather than left to drop root itself.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def hook() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"prctl(PR_SET_PDEATHSIG): {os.strerror(code)}")
        if os.getppid() != parent:  # the parent died before prctl: nobody would stop us
            os._exit(1)

    return hook


def _spawn_options(conf: Path) -> dict[str, Any]:
    """``subprocess.Popen`` options for a broker on ``conf`` that dies with its parent.

    As root the broker starts as its service user (``mosquitto``), which it would drop to
    anyway, because a change of user clears the parent-death signal. A configuration with a
    privileged port (< 1024) needs root to bind: Mosquitto then drops root itself, and only the
    pid file protects against an orphan. The broker gets a process group of its own: a
    terminal's Ctrl-C reaches only its parent, which stops it after its clients.
    """
    options: dict[str, Any] = {"preexec_fn": _die_with_parent_hook(), "process_group": 0}
    owner = _service_owner()
    if owner is not None and all(port >= 1024 for port, _ in conf_listeners(conf)):
        uid, gid = owner
        options.update(
            user=uid, group=gid, extra_groups=os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
        )
    return options


class MosquittoProcess:
    """A Mosquitto broker process, as an async context manager.

    ``MosquittoProcess(conf_path, port)`` runs ``mosquitto -c conf_path`` and is ready when
    ``port`` on ``host`` accepts TCP connections. ``stop()`` ends it (SIGTERM, so it saves
    its persistence database), ``kill()`` (SIGKILL) simulates a crash, and ``start()`` again
    restarts it on the same port and configuration. The broker's stderr goes to ``log_path``
    (default ``mosquitto.log`` next to the configuration).

    The broker dies with the thread that started it (Linux), also when this process is
    SIGKILLed; a pid file next to the configuration names it while it runs, and a start stops
    a broker on the same configuration whose parent is gone.
    """

    def __init__(
        self,
        conf_path: str | os.PathLike[str],
        port: int,
        *,
        host: str = "127.0.0.1",
        binary: str | None = None,
        start_timeout_s: float = 10.0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.conf_path = Path(conf_path).absolute()
        self.port = port
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.log_path = Path(log_path) if log_path is not None else self.conf_path.parent / LOG_NAME
        self._binary = binary
        self._process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def returncode(self) -> int | None:
        """The exit status of the last run (negative: killed by that signal); None if running."""
        return None if self._process is None else self._process.returncode

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        """The broker's process id, if started."""
        return None if self._process is None else self._process.pid

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines the broker wrote to its log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no broker log)"
        return "\n".join(text.splitlines()[-lines:])

    async def start(self) -> None:
        """Start the broker and wait until its port accepts connections.

        ``MosquittoNotFoundError`` if mosquitto is not installed, ``BrokerConfigError`` if the
        configuration is missing or unreachable for the broker's user, ``BrokerProcessError``
        if it is already running (here or under another live parent), a port is taken (the
        message names the process), it exits, or it is not ready in time. A broker left
        running on this configuration by a parent that is gone is stopped first (logged).
        """
        if self.running:
            raise BrokerProcessError(f"mosquitto (pid {self.pid}) is already running")
        binary = self._binary or find_mosquitto()
        if not self.conf_path.is_file():
            raise BrokerConfigError(f"broker configuration {self.conf_path} does not exist")
        check_broker_access(self.conf_path.parent)
        stopped = await asyncio.to_thread(stop_orphaned_mosquitto, self.conf_path)
        if stopped is not None:
            log.warning(
                "stopped mosquitto pid %d, left running on %s by a parent that is gone",
                stopped,
                self.conf_path,
            )
        await asyncio.to_thread(check_ports_free, self.conf_path, [(self.port, self.host)])
        if await self._accepts():
            raise BrokerProcessError(
                f"{self.host}:{self.port} already accepts connections: another broker running?"
            )
        self._close_log()
        self._log = self.log_path.open("ab")
        self._log.write(f"--- wattmesh: starting {binary} -c {self.conf_path}\n".encode())
        self._log.flush()
        self._process = await asyncio.create_subprocess_exec(
            binary,
            "-c",
            str(self.conf_path),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            **_spawn_options(self.conf_path),
        )
        try:
            warning = _write_pid_file(self.conf_path, self._process.pid)
            if warning:
                log.warning("%s", warning)
            await self._wait_ready(self._process)
        except BaseException:
            await self.kill()  # also when cancelled: never leave a half-started broker behind
            raise

    async def _wait_ready(self, process: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not await self._accepts():
            if process.returncode is not None:
                raise BrokerProcessError(
                    f"mosquitto exited with status {process.returncode} while starting "
                    f"({self.conf_path}); log tail:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BrokerProcessError(
                    f"mosquitto did not accept connections on {self.host}:{self.port} within "
                    f"{self.start_timeout_s} s; log tail:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.02)
        if process.returncode is not None:  # someone else answered on the port
            raise BrokerProcessError(
                f"mosquitto exited with status {process.returncode}; log tail:\n{self.log_tail()}"
            )

    async def _accepts(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), timeout=1.0
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM (the broker saves its database) and wait; SIGKILL after ``timeout_s``."""
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout_s)
            except TimeoutError:
                await self.kill()
        self._forget()
        return self.returncode

    async def kill(self) -> int | None:
        """SIGKILL the broker (a crash: nothing saved since the last autosave) and wait."""
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        self._forget()
        return self.returncode

    def _forget(self) -> None:
        """After the broker exited: close its log and remove its pid file."""
        self._close_log()
        _remove_pid_file(self.conf_path, self.pid)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def run_mosquitto_foreground(
    directory: str | os.PathLike[str], notify: Callable[[str], None] | None = None
) -> int:
    """Run Mosquitto on an initialised broker directory until it exits; its exit status.

    SIGINT, SIGTERM and SIGHUP (reload) sent to us are passed on to the broker; if we are
    killed (even SIGKILL) the broker gets SIGTERM (Linux). ``DIR/mosquitto.pid`` names it while
    it runs. A broker that a killed earlier run left on this directory is stopped first and
    ``notify`` (default: a log warning) is told. ``BrokerConfigError`` if the directory has no
    configuration or the broker's user cannot reach it, ``MosquittoNotFoundError`` if mosquitto
    is not installed, ``BrokerProcessError`` if the directory's broker runs under a live
    parent or a port is taken (naming the process holding it).
    """
    root = Path(directory).absolute()
    conf = root / CONF_NAME
    if not conf.is_file():
        raise BrokerConfigError(
            f"{conf} does not exist: run `wattmesh broker init {root} --sites ...` first"
        )
    binary = find_mosquitto()
    check_broker_access(root)
    stopped = stop_orphaned_mosquitto(conf)
    if stopped is not None:
        (notify or log.warning)(
            f"stopped mosquitto (pid {stopped}) that an earlier run left on {root}"
        )
    check_ports_free(conf)
    try:
        process = subprocess.Popen(
            [binary, "-c", str(conf)], stdin=subprocess.DEVNULL, **_spawn_options(conf)
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise BrokerError(f"cannot start {binary}: {err}") from err
    warning = _write_pid_file(conf, process.pid)
    if warning:
        (notify or log.warning)(f"warning: {warning}")

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)

    previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, forward)
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if process.poll() is None:
            process.kill()
            process.wait()
        _remove_pid_file(conf, process.pid)
