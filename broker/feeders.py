"""Many feeders on one Mosquitto: one listener per feeder, each with its own topic root.

``write_feeders_broker_config`` writes a broker directory in which every feeder's sites and
coordinator connect to that feeder's listener and see the unchanged v1 topic tree
(``wattmesh/v1/...``, docs/architecture.md s. 3), while the broker keeps the feeders apart::

    DIR/mosquitto.conf      one listener per feeder (mount_point feeder/{id}/) + the operator's
    DIR/passwd-{feeder}     that feeder's users: its coordinator, its sites, operator, monitor
    DIR/acl-{feeder}        the single-feeder ACL (``acl_text``) with every topic mounted
    DIR/passwd, DIR/acl     the operator listener (no mount point): operator and monitor only
    DIR/credentials.toml    user -> password, and each feeder's port, mount point and sites
    DIR/data/               persistence (one database for the whole broker)

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
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

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
    _common_conf_lines,
    _write_file,
    acl_text,
    password_file_text,
    prepare_broker_dir,
)
from broker.topics import HA_DISCOVERY_PREFIX, HA_PREFIX_PATTERN, ID_PATTERN, PREFIX, check_id

#: A feeder's topic root on the shared broker: ``feeder/{id}/`` (the listener's mount point).
MOUNT_ROOT = "feeder"
#: Every feeder's topics, as the operator listener sees them: ``feeder/+/wattmesh/v1``.
ALL_FEEDERS_PREFIX = f"{MOUNT_ROOT}/+/{PREFIX}"
_ACL_TOPIC = re.compile(r"^(topic\s+(?:read|write|readwrite|deny)\s+)(\S.*)$")


def mount_point(feeder: str) -> str:
    """The mount point of ``feeder``'s listener: ``feeder/{feeder}/``."""
    return f"{MOUNT_ROOT}/{check_id(feeder, 'feeder')}/"


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
    coordinator: str | None = Field(default=None, pattern=ID_PATTERN)
    sites: tuple[str, ...] = Field(min_length=1)

    @property
    def coordinator_user(self) -> str:
        """The coordinator's user name: ``coordinator`` from the file, else coordinator-{id}."""
        return self.coordinator or f"coordinator-{self.id}"


class OperatorListener(BaseModel):
    """The listener without a mount point, for the operator and the monitor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int = Field(default=1883, gt=0, le=65535)


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

    @property
    def connect_host(self) -> str:
        """The address a client on this machine connects to."""
        return "127.0.0.1" if self.host in _UNSPECIFIED_HOSTS else self.host

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
        """The feeder whose listener ``user`` (a site or a coordinator) belongs to; else None."""
        for f in self.feeders:
            if user == f.coordinator_user or user in f.sites:
                return f
        return None


def _check_feeders(
    spec: FeedersFile, operator_user: str | None, monitor_user: str | None
) -> list[str]:
    """Every user name, in the order credentials.toml lists them; ``BrokerConfigError`` if two
    users, two feeders or two listeners collide."""
    try:
        for user, what in ((operator_user, "operator user"), (monitor_user, "monitor user")):
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
    if len(set(ports)) != len(ports):
        raise BrokerConfigError(
            f"every feeder needs its own port, and the operator listener another: {ports}"
        )
    names = [
        *(u for u in (operator_user, monitor_user) if u),
        *(f.coordinator_user for f in spec.feeders),
        *(site for f in spec.feeders for site in f.sites),
    ]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise BrokerConfigError(
            "user names must be unique across the broker (a client id is its user name, and "
            "client ids are broker-wide): site ids across feeders, coordinators, operator and "
            f"monitor; repeated: {duplicates}"
        )
    return names


def operator_acl_text(operator_user: str | None, monitor_user: str | None) -> str:
    """The operator listener's ACL: every feeder's topics, ``feeder/+/wattmesh/v1/...``."""
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
            "",
        ]
    if monitor_user:
        lines += [
            "# The monitor (dashboards, `wattmesh status`) reads every feeder, writes nothing.",
            f"user {monitor_user}",
            f"topic read {ALL_FEEDERS_PREFIX}/#",
            "",
        ]
    return "\n".join(lines)


def write_feeders_broker_config(
    directory: str | os.PathLike[str],
    spec: FeedersFile,
    *,
    host: str = "127.0.0.1",
    operator_user: str | None = "operator",
    monitor_user: str | None = "monitor",
    autosave_interval_s: int = 60,
    overwrite: bool = False,
    ha_discovery_prefix: str | None = HA_DISCOVERY_PREFIX,
) -> FeedersBrokerFiles:
    """Write a Mosquitto configuration for every feeder of ``spec`` into ``directory``.

    One listener per feeder on ``host`` (its port from ``spec``, mount point ``feeder/{id}/``)
    and the operator listener (``spec.operator.port``, no mount point). Every call makes new
    random passwords. ``BrokerConfigError`` for invalid or colliding ids, users or ports, a
    path with whitespace, and when a configuration exists and ``overwrite`` is false.
    """
    users = _check_feeders(spec, operator_user, monitor_user)
    if ha_discovery_prefix is not None and not re.match(HA_PREFIX_PATTERN, ha_discovery_prefix):
        raise BrokerConfigError(
            f"Home Assistant discovery prefix {ha_discovery_prefix!r} is invalid"
        )
    root, owner = prepare_broker_dir(directory, host, overwrite=overwrite, renewed="new passwords")
    conf, data_dir = root / CONF_NAME, root / DATA_DIR_NAME
    credentials = {user: secrets.token_urlsafe(32) for user in users}
    observers = [u for u in (operator_user, monitor_user) if u]
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
            f"# Feeder {f.id}'s listener (mount_point {listener.mount_point}): the broker checks\n"
            "# the mounted topic, so every topic below has the mount point in front.\n"
        )
        _write_file(
            listener.acl_file, header + mounted_acl(acl, listener.mount_point), 0o600, owner
        )
        listeners.append(listener)
    _write_file(
        root / PASSWD_NAME,
        password_file_text({u: credentials[u] for u in observers}),
        0o600,
        owner,
    )
    _write_file(root / ACL_NAME, operator_acl_text(operator_user, monitor_user), 0o600, owner)
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
    )
    _write_file(files.credentials_file, _credentials_text(files), 0o600, None)
    _write_file(conf, _conf_text(files, autosave_interval_s), 0o644, None)
    return files


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


def _conf_text(files: FeedersBrokerFiles, autosave_interval_s: int) -> str:
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
            f"# under {f.mount_point} (the ACL names the mounted topics).",
            *_listener_lines(f.port, files.host, f.password_file, f.acl_file),
            f"mount_point {f.mount_point}",
        ]
    lines += [
        "",
        "# The operator listener: no mount point, every feeder under feeder/{id}/.",
        *_listener_lines(
            files.port, files.host, files.directory / PASSWD_NAME, files.directory / ACL_NAME
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
    if files.operator_user:
        lines.append(f"operator_user = {q(files.operator_user)}")
    if files.monitor_user:
        lines.append(f"monitor_user = {q(files.monitor_user)}")
    lines += [f"sites = [{', '.join(q(s) for s in files.sites)}]", ""]
    for f in files.feeders:
        lines += [
            f"[feeders.{f.id}]",
            f"port = {f.port}",
            f"mount_point = {q(f.mount_point)}",
            f"coordinator_user = {q(f.coordinator_user)}",
            f"sites = [{', '.join(q(s) for s in f.sites)}]",
            "",
        ]
    lines.append("[users]")
    lines += [f"{q(user)} = {q(pw)}" for user, pw in files.credentials.items()]
    return "\n".join(lines) + "\n"


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
        feeders = tuple(
            FeederListener(
                id=str(feeder_id),
                port=int(f["port"]),
                mount_point=str(f["mount_point"]),
                coordinator_user=str(f["coordinator_user"]),
                sites=tuple(str(s) for s in f["sites"]),
                password_file=root / f"{PASSWD_NAME}-{feeder_id}",
                acl_file=root / f"{ACL_NAME}-{feeder_id}",
            )
            for feeder_id, f in doc["feeders"].items()
        )
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
            credentials={str(k): str(v) for k, v in doc["users"].items()},
        )
    except FileNotFoundError as err:
        raise BrokerConfigError(
            f"{path} not found: is {root} a broker directory (`wattmesh broker init`)?"
        ) from err
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as err:
        raise BrokerConfigError(f"cannot read {path} as a many-feeders broker: {err!r}") from err
