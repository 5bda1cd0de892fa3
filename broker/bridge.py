"""The bus past one machine: edge Mosquitto brokers bridged to a core broker.

The coordinator (and any ingest workers on MQTT 5 shared subscriptions) connect to a **core**
broker; the sites connect to an **edge** broker near them (one per feeder, substation or
region). Each edge broker runs a bridge to the core: the edge broker is the bridge *client*
and connects out to the core, so the sites' networks need no inbound port. On the core the
bridge has a user of its own whose ACL grants exactly the topics of the sites behind that edge
broker; the edge broker's own ACL keeps each site to its own topics, as on a single broker.

Topics the bridge carries (QoS 1, exact topics per site, no ``#``)::

    out (edge -> core): wattmesh/v1/site/{site}/{status,telemetry,bid,dispatch/ack}
    in  (core -> edge): wattmesh/v1/site/{site}/{award,dispatch,reservation},
                        wattmesh/v1/forecast/{site}, wattmesh/v1/market/clearing,
                        wattmesh/v1/grid/+/state

The two sets are disjoint (``dispatch`` and ``dispatch/ack`` are different topics), so no
message can travel back the way it came. ``try_private`` tells the core that the client is a
bridge, which makes it forward retained flags as published. ``cleansession false`` keeps the
bridge's subscriptions and queued QoS 1 messages on the core while the link is down, and
``local_cleansession false`` keeps the outgoing messages queued on the edge broker (up to the
edge's ``max_queued_messages``, 100000) until the core is back.

The bridge speaks MQTT 3.1.1 to the core, on purpose: Mosquitto 2.0's MQTT 5 bridge
(``bridge_protocol_version mqttv50``) sends no Session Expiry Interval, so the core ends the
bridge's session when the link drops and the commands queued for its sites are lost
(eclipse-mosquitto issues 1632 and 2424; tests/test_bridge.py shows both). Sites and the
coordinator still speak MQTT 5 to their own brokers; shared subscriptions live on the core.

``add_bridge_user`` writes the core side (a password, an ACL block, with a TLS core a client
certificate signed by the core's CA) and a bridge kit to carry to the edge machine;
``write_edge_broker`` writes a complete edge broker directory from the kit
(``write_broker_config`` for its sites, plus the bridge section). The pure functions
``bridge_conf_text`` and ``bridge_acl_text`` make the two text blocks. A running core loads a
new bridge user on SIGHUP (Mosquitto rereads passwd and acl); Mosquitto does not reload
bridges, so an edge broker is restarted after its bridge changes.

A many-feeders core (broker/feeders.py) takes a bridge into one feeder
(``add_bridge_user(..., feeder=ID)``): the bridge user goes into that feeder's password file
and ACL (the same ACL block, with the feeder's mount point in front of every topic), its sites
must be that feeder's, and the kit names the feeder's listener (port, TLS port, mount point).
The listener's mount point puts ``feeder/{id}/`` in front of whatever the bridge publishes
and subscribes to, so the edge keeps the plain v1 topics. The other way, Mosquitto 2.0.11
leaves the mount point on the topics it delivers (eclipse-mosquitto issue 2244, fixed in
2.0.12): without help the edge would receive ``feeder/{id}/wattmesh/v1/...``, which no site
reads. ``bridge_conf_text`` therefore adds, for every incoming topic, a second ``topic`` line
with the mount point as the remote prefix: Mosquitto matches an incoming topic against it and
takes the prefix off (that line's own subscription on the core, under the mount point twice,
matches nothing; with a fixed core the first line matches as is). With TLS the bridge's new
certificate is added to the CRL of every other feeder's TLS listener and the operator's, as
the certificates written by ``broker init`` are; a running core loads the new passwd, acl
and CRLs on SIGHUP (tests/test_feeders_bridge.py).

``add_bridge_user`` also records each bridge (edge, sites, feeder; no secrets) in the core's
``bridges.toml``. ``broker init --force`` rewrites the core's passwd, acl and CRLs from scratch;
from the record it adds the bridge users again (``plan_bridges``, then ``restore_bridges``):
each gets a new password (and with TLS a certificate from the new CA) and a rewritten kit, like
every other user. A bridge the new configuration cannot carry (a site or feeder it names is
gone) is dropped only when the operator says so (``--drop-bridges``); a bridge user the
directory has but neither the record nor a kit describes (``bridge-*`` users from before the
record) counts as one that cannot be kept.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import shutil
import tomllib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import BrokerConfigError
from broker.feeders import (
    bridge_feeder,
    is_feeders_broker,
    load_feeders_broker,
    mounted_acl,
    record_bridge_user,
    write_crls,
)
from broker.mosquitto import (
    CONF_NAME,
    CREDENTIALS_NAME,
    GRID_STATE_ALL,
    BrokerFiles,
    TlsFiles,
    _service_owner,
    _write_file,
    load_broker_files,
    mosquitto_password_hash,
    write_broker_config,
)
from broker.topics import (
    MARKET_CLEARING,
    SITE_PUBLISHES,
    SITE_READS,
    bridge_state_topic,
    check_id,
    forecast_topic,
    site_topic,
)

#: Where ``add_bridge_user`` puts each bridge's kit on the core (``bridges/bridge-{edge}/``).
BRIDGES_DIR_NAME = "bridges"
KIT_TOML_NAME = "bridge.toml"
KIT_CA_NAME = "ca.crt"
KIT_CERT_NAME = "bridge.crt"
KIT_KEY_NAME = "bridge.key"
#: The core's record of its bridges (edge, sites, feeder): ``broker init --force`` adds them
#: again from it.
BRIDGES_RECORD_NAME = "bridges.toml"
#: Where ``write_edge_broker`` puts the TLS files the bridge presents to the core.
EDGE_BRIDGE_DIR_NAME = "bridge"
#: A bridge address: ``host:port`` (an IPv6 host in brackets: ``[::1]:8883``).
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
#: A core listener's mount point: topic levels without wildcards, ending in ``/``.
_MOUNT_POINT = re.compile(r"^([A-Za-z0-9_.-]+/)+$")

Direction = Literal["in", "out"]


@dataclass(frozen=True, slots=True)
class BridgeCredentials:
    """How a bridge authenticates to the core: a user name and either a password or mTLS.

    With ``ca_cert`` (the core's CA), ``cert`` and ``key`` (the bridge's client certificate,
    CN = ``user``) the bridge connects to the core's mutual-TLS listener and sends no password.
    """

    user: str
    password: str | None = field(default=None, repr=False)
    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def tls(self) -> bool:
        """Whether the bridge uses mutual TLS."""
        return self.cert is not None


@dataclass(frozen=True, slots=True)
class BridgeKit:
    """What an edge broker needs to bridge to the core (``add_bridge_user`` writes it).

    ``core_port`` is the core's password listener, ``core_tls_port`` its mutual-TLS listener
    (None without TLS). A kit with a client certificate connects to the TLS port: a core with
    TLS serves passwords on 127.0.0.1 only. On a many-feeders core they are ``feeder``'s
    listeners, whose ``mount_point`` the bridge takes off incoming topics.
    """

    edge: str
    sites: tuple[str, ...]
    credentials: BridgeCredentials
    core_port: int
    core_tls_port: int | None
    directory: Path
    feeder: str | None = None
    mount_point: str | None = None

    @property
    def core_connect_port(self) -> int:
        """The core port the bridge connects to."""
        if self.credentials.tls and self.core_tls_port is not None:
            return self.core_tls_port
        return self.core_port


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """One edge broker's bridge to the core.

    ``name`` is the edge's id (its core user is ``bridge_user_name(name)``, and it names the
    link-state topic); ``addresses`` are the core's ``host:port`` addresses (the first is the
    main one, the others are tried in turn when it fails, and the bridge returns to the main
    one when it can); ``sites`` are the sites behind this edge broker. ``restart_timeout_s``
    is the reconnect delay's (base, cap): Mosquitto waits a decorrelated-jitter delay between
    them. ``mount_point`` is the core listener's (a feeder's on a many-feeders core): the
    bridge takes it off the topics the core delivers (see the module docstring).
    """

    name: str
    addresses: tuple[str, ...]
    sites: tuple[str, ...]
    credentials: BridgeCredentials
    qos: int = 1
    #: MQTT 3.1.1 keeps the bridge's session on the core (see the module docstring).
    protocol: Literal["mqttv50", "mqttv311"] = "mqttv311"
    keepalive_s: int = 30
    restart_timeout_s: tuple[int, int] = (2, 30)
    insecure: bool = False
    mount_point: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.sites, str) or not self.sites:
            raise BrokerConfigError("a bridge needs at least one site (a tuple of site ids)")
        try:
            check_id(self.name, "edge")
            check_id(self.credentials.user, "bridge user")
            for site in self.sites:
                check_id(site)
        except ValueError as err:
            raise BrokerConfigError(str(err)) from err
        if len(set(self.sites)) != len(self.sites):
            raise BrokerConfigError(f"duplicate sites in {list(self.sites)}")
        if not self.addresses:
            raise BrokerConfigError("a bridge needs at least one core address (host:port)")
        for address in self.addresses:
            match = _ADDRESS.match(address)
            if match is None or not 1 <= int(match.group(2)) <= 65535:
                raise BrokerConfigError(f"core address {address!r} is not host:port")
        if self.qos not in (0, 1, 2):
            raise BrokerConfigError(f"qos {self.qos} is not 0, 1 or 2")
        creds = self.credentials
        if creds.tls:
            if creds.ca_cert is None or creds.key is None:
                raise BrokerConfigError("a TLS bridge needs ca_cert, cert and key")
        elif creds.password is None:
            raise BrokerConfigError("a bridge needs a password or a client certificate")
        base, cap = self.restart_timeout_s
        if not 1 <= base <= cap:
            raise BrokerConfigError(
                f"restart_timeout_s {self.restart_timeout_s}: need 1 <= base <= cap"
            )
        if self.keepalive_s < 5:
            raise BrokerConfigError("keepalive_s must be at least 5 (Mosquitto's minimum)")
        if self.mount_point is not None and not _MOUNT_POINT.match(self.mount_point):
            raise BrokerConfigError(
                f"mount point {self.mount_point!r}: need topic levels ending in '/', such as "
                "'feeder/north/' (no spaces, no wildcards)"
            )


def bridge_user_name(edge: str) -> str:
    """The core's user for edge ``edge``'s bridge: ``bridge-{edge}``."""
    return check_id(f"bridge-{check_id(edge, 'edge')}", "bridge user")


def bridge_topics(sites: Sequence[str]) -> list[tuple[str, Direction]]:
    """Every topic the bridge of ``sites`` carries and its direction (``out``: to the core)."""
    out: list[tuple[str, Direction]] = [
        (site_topic(site, kind), "out") for site in sites for kind in SITE_PUBLISHES
    ]
    into: list[tuple[str, Direction]] = [
        (site_topic(site, kind), "in") for site in sites for kind in SITE_READS
    ]
    into += [(forecast_topic(site), "in") for site in sites]
    into += [(MARKET_CLEARING, "in"), (GRID_STATE_ALL, "in")]
    return out + into


def bridge_conf_text(config: BridgeConfig) -> str:
    """The ``connection`` section of the edge broker's mosquitto.conf for ``config``.

    It holds the bridge's password (if any) in plain text: the file must be readable only
    by the broker (``write_edge_broker`` writes it mode 600).
    """
    creds = config.credentials
    base, cap = config.restart_timeout_s
    lines = [
        "",
        f"# Bridge to the core broker (broker/bridge.py): edge {config.name!r} connects out,",
        "# as user " + repr(creds.user) + "; the core's ACL grants it exactly these sites' topics.",
        f"connection {creds.user}",
        f"address {' '.join(config.addresses)}",
        "# The first address is the main core; the others are tried in turn when it fails.",
        "round_robin false",
        f"remote_clientid {creds.user}",
        f"local_clientid local.{creds.user}",
    ]
    if creds.tls:
        lines += [
            f"bridge_cafile {creds.ca_cert}",
            f"bridge_certfile {creds.cert}",
            f"bridge_keyfile {creds.key}",
            "bridge_tls_version tlsv1.2",
        ]
        if config.insecure:
            lines.append("bridge_insecure true")
    else:
        lines += [f"remote_username {creds.user}", f"remote_password {creds.password}"]
    lines += [
        f"bridge_protocol_version {config.protocol}",
        "# Tell the core this is a bridge: retained flags travel as published.",
        "try_private true",
        "bridge_outgoing_retain true",
        "# Persistent on both ends: while the link is down the core queues what is due to the",
        "# edge and the edge queues what is due to the core (QoS 1), delivered on reconnect.",
        "cleansession false",
        "local_cleansession false",
        "start_type automatic",
        f"restart_timeout {base} {cap}",
        f"keepalive_interval {config.keepalive_s}",
        "# The link's state, retained on both brokers: 1 when up; 0, the bridge's will on the",
        "# core, when the link drops (an edge broker that is gone reads 0 on the core).",
        "notifications true",
        "notifications_local_only false",
        f"notification_topic {bridge_state_topic(config.name)}",
        "bridge_attempt_unsubscribe false",
    ]
    topics = bridge_topics(config.sites)
    lines += [f"topic {topic} {direction} {config.qos}" for topic, direction in topics]
    if config.mount_point is not None:
        lines += [
            f"# The core's listener has mount_point {config.mount_point}, which Mosquitto 2.0.11",
            "# leaves on the topics it delivers (issue 2244, fixed in 2.0.12). So each incoming",
            "# topic once more, with the mount point as its remote prefix, which the bridge",
            "# takes off. (These lines' own subscriptions, mounted twice, match nothing.)",
        ]
        lines += [
            f'topic {topic} in {config.qos} "" {config.mount_point}'
            for topic, direction in topics
            if direction == "in"
        ]
    return "\n".join(lines) + "\n"


def bridge_acl_text(edge: str, sites: Sequence[str]) -> str:
    """The core's ACL block for edge ``edge``'s bridge user (``bridge-{edge}``) of ``sites``.

    It writes what the sites publish and reads what they read (section 3 of
    docs/architecture.md), plus the bridge's own state topic; a message it forwards for any
    other site is dropped by the core.
    """
    user = _checked_user(edge)
    lines = [
        "",
        f"# Bridge of edge {edge}: forwards the topics of sites {', '.join(sites)} and no others.",
        f"user {user}",
    ]
    for topic, direction in bridge_topics(sites):
        lines.append(f"topic {'write' if direction == 'out' else 'read'} {topic}")
    lines.append(f"topic write {bridge_state_topic(edge)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The core side: a user per bridge


@dataclass(frozen=True, slots=True)
class _CoreListener:
    """Where a bridge user goes on a core: the listener's files, ports and mount point."""

    directory: Path
    password_file: Path
    acl_file: Path
    credentials: dict[str, str] = field(repr=False)
    tls: TlsFiles | None
    port: int
    tls_port: int | None
    feeder: str | None = None
    mount_point: str | None = None


def add_bridge_user(
    core_directory: str | os.PathLike[str],
    edge: str,
    sites: Sequence[str],
    *,
    feeder: str | None = None,
) -> BridgeKit:
    """Add edge ``edge``'s bridge user (``bridge-{edge}``) to the core in ``core_directory``.

    Appends a password hash to passwd, the bridge's ACL block (``bridge_acl_text``) to acl
    and the password to credentials.toml; if the core has a TLS listener, also issues a client
    certificate (CN = the user) signed by its CA. Writes the **bridge kit** the edge machine
    needs into ``bridges/bridge-{edge}/`` (mode 700): ``bridge.toml`` (user, password, sites,
    the core's ports) and with TLS ``ca.crt``, ``bridge.crt`` and ``bridge.key``; copy that
    directory to the edge machine and pass it to ``write_edge_broker`` (``load_bridge_kit``).

    A many-feeders core needs ``feeder``, and a single-feeder core refuses it: the user then
    goes into that feeder's passwd-{feeder} and acl-{feeder} (the ACL block mounted), the
    sites must be that feeder's, credentials.toml lists it among the feeder's
    ``bridge_users``, the kit gets the feeder's ports and mount point, and with TLS every
    other TLS listener's CRL is rewritten to revoke its certificate (``write_crls``).
    The bridge (edge, sites, feeder) is recorded in the core's ``bridges.toml``, from which
    ``broker init --force`` adds it again (``plan_bridges``, ``restore_bridges``).
    ``BrokerConfigError`` if the user exists, an id is invalid or a site is not the feeder's.
    A running core rereads passwd, acl and the CRLs on SIGHUP.
    """
    user = _checked_user(edge)
    site_ids = _checked_sites(sites)
    target = _core_listener(core_directory, feeder, site_ids)
    if user in target.credentials:
        raise BrokerConfigError(f"user {user!r} already exists on the core {target.directory}")
    recorded = recorded_bridges(target.directory)  # a malformed record stops us before writing
    owner = _service_owner()
    password = secrets.token_urlsafe(32)
    acl = bridge_acl_text(edge, site_ids)
    if target.mount_point is not None:
        acl = mounted_acl(
            f"\n# Feeder {target.feeder}'s listeners put {target.mount_point} in front of the "
            f"bridge's topics.{acl}",
            target.mount_point,
        )
    _append(target.password_file, f"{user}:{mosquitto_password_hash(password)}\n", owner)
    _append(target.acl_file, acl, owner)
    kit_dir = bridge_kit_path(target.directory, edge)
    kit_dir.parent.mkdir(mode=0o700, exist_ok=True)
    kit_dir.mkdir(mode=0o700, exist_ok=True)
    credentials = BridgeCredentials(user, password)
    if target.tls is not None:
        cert, key = _issue_client_cert(target.tls.ca_cert, target.tls.ca_key, user)
        copies = {KIT_CA_NAME: target.tls.ca_cert, KIT_CERT_NAME: cert, KIT_KEY_NAME: key}
        for name, source in copies.items():
            _write_file(kit_dir / name, source.read_bytes(), 0o600, None)
        credentials = BridgeCredentials(
            user, password, kit_dir / KIT_CA_NAME, kit_dir / KIT_CERT_NAME, kit_dir / KIT_KEY_NAME
        )
    if target.feeder is None:
        line = f"{json.dumps(user)} = {json.dumps(password)}\n"
        _append(target.directory / CREDENTIALS_NAME, line, None)
    else:
        write_crls(
            record_bridge_user(load_feeders_broker(target.directory), target.feeder, user, password)
        )
    kit = BridgeKit(
        edge=edge,
        sites=site_ids,
        credentials=credentials,
        core_port=target.port,
        core_tls_port=target.tls_port,
        directory=kit_dir,
        feeder=target.feeder,
        mount_point=target.mount_point,
    )
    _write_file(kit_dir / KIT_TOML_NAME, _kit_toml(kit), 0o600, None)
    _write_record(
        target.directory,
        [
            *(b for b in recorded if b.edge != edge),
            RecordedBridge(edge, site_ids, target.feeder),
        ],
    )
    return kit


# ---------------------------------------------------------------------------------------------
# The record of the bridges: what `broker init --force` adds again


@dataclass(frozen=True, slots=True)
class RecordedBridge:
    """A bridge ``add_bridge_user`` added: its edge, its sites and the feeder (None: the core
    is a single-feeder broker)."""

    edge: str
    sites: tuple[str, ...]
    feeder: str | None = None

    @property
    def user(self) -> str:
        """The bridge's user on the core: ``bridge-{edge}``."""
        return _checked_user(self.edge)


def recorded_bridges(core_directory: str | os.PathLike[str]) -> tuple[RecordedBridge, ...]:
    """The bridges in ``core_directory``'s ``bridges.toml`` (none if it has none), in the
    order they were added; ``BrokerConfigError`` if it is malformed."""
    path = Path(core_directory).absolute() / BRIDGES_RECORD_NAME
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ()
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise BrokerConfigError(f"cannot read {path}: {err}") from err
    try:
        return tuple(
            RecordedBridge(
                check_id(str(edge), "edge"),
                tuple(check_id(str(site)) for site in entry["sites"]),
                None if entry.get("feeder") is None else str(entry["feeder"]),
            )
            for edge, entry in doc.get("bridges", {}).items()
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BrokerConfigError(f"cannot read {path}: {err!r}") from err


def _write_record(core_directory: Path, bridges: Sequence[RecordedBridge]) -> None:
    q = json.dumps  # a JSON string is a valid TOML basic string
    lines = [
        "# The bridge users `wattmesh broker bridge-user` added to this core (no secrets):",
        "# `wattmesh broker init --force` adds them again from here, with new credentials.",
    ]
    for b in bridges:
        lines += ["", f"[bridges.{q(b.edge)}]", f"sites = [{', '.join(q(s) for s in b.sites)}]"]
        if b.feeder is not None:
            lines.append(f"feeder = {q(b.feeder)}")
    _write_file(core_directory / BRIDGES_RECORD_NAME, "\n".join(lines) + "\n", 0o600, None)


def _bridge_users_in(core_directory: Path) -> list[str]:
    """The bridge users ``core_directory``'s credentials.toml has: a many-feeders core lists
    them (``bridge_users``); on a single-feeder core, the users named ``bridge-*`` that are
    not sites."""
    if not (core_directory / CREDENTIALS_NAME).exists():
        return []
    if is_feeders_broker(core_directory):
        return [u for f in load_feeders_broker(core_directory).feeders for u in f.bridge_users]
    files = load_broker_files(core_directory)
    return [u for u in files.credentials if u.startswith("bridge-") and u not in files.sites]


def plan_bridges(
    core_directory: str | os.PathLike[str],
    layout: Mapping[str | None, Sequence[str]],
    users: Collection[str] = (),
) -> tuple[tuple[RecordedBridge, ...], dict[str, str]]:
    """Which of ``core_directory``'s bridges a new configuration of it can take again.

    ``layout`` is the new configuration's feeders and their sites (``{None: sites}`` for a
    single-feeder broker), ``users`` every other user it makes. The bridges come from the
    record (``recorded_bridges``); a bridge user the directory has but the record does not
    know is read from its kit (``bridges/bridge-{edge}/bridge.toml``) if that is there. Returns
    the bridges to keep (their feeder and sites are still there) and, for each user that
    cannot be kept, why. Writes nothing.
    """
    root = Path(core_directory).absolute()
    bridges = {b.user: b for b in recorded_bridges(root)}
    unknown: dict[str, str] = {}
    for user in _bridge_users_in(root):
        if user in bridges:
            continue
        try:
            kit = load_bridge_kit(root / BRIDGES_DIR_NAME / user)
        except BrokerConfigError:
            unknown[user] = "no record of its sites (neither bridges.toml nor its kit)"
            continue
        bridges[user] = RecordedBridge(kit.edge, kit.sites, kit.feeder)
    keep: list[RecordedBridge] = []
    for user, bridge in bridges.items():
        why = _why_not_kept(bridge, layout, users)
        if why is None:
            keep.append(bridge)
        else:
            unknown[user] = why
    return tuple(keep), unknown


def _why_not_kept(
    bridge: RecordedBridge, layout: Mapping[str | None, Sequence[str]], users: Collection[str]
) -> str | None:
    """Why the new configuration ``layout`` cannot carry ``bridge``; None if it can."""
    single = None in layout
    if bridge.feeder is None and not single:
        return "it was bridged into a single-feeder broker; this one has feeders"
    if bridge.feeder is not None and single:
        return f"it was bridged into feeder {bridge.feeder!r}; this broker has no feeders"
    if bridge.feeder not in layout:
        return f"feeder {bridge.feeder!r} is gone"
    gone = [s for s in bridge.sites if s not in layout[bridge.feeder]]
    if gone:
        where = "the broker" if bridge.feeder is None else f"feeder {bridge.feeder!r}"
        what = f"site {gone[0]} is" if len(gone) == 1 else f"sites {', '.join(gone)} are"
        return f"its {what} no longer in {where}"
    if bridge.user in users:
        return f"{bridge.user!r} is now another user's name"
    return None


def restore_bridges(
    core_directory: str | os.PathLike[str],
    keep: Sequence[RecordedBridge],
    drop: Collection[str] = (),
) -> list[BridgeKit]:
    """After ``broker init --force`` rewrote ``core_directory``: add the bridges ``keep`` again
    (``add_bridge_user``: new passwords, with TLS new certificates, rewritten kits), and remove
    the kits of the bridge users ``drop`` (their credentials are gone). The kits written."""
    root = Path(core_directory).absolute()
    _write_record(root, [])
    for user in [*drop, *(b.user for b in keep)]:  # old kits: their credentials are gone
        kit_dir = root / BRIDGES_DIR_NAME / user
        if kit_dir.is_dir():
            shutil.rmtree(kit_dir)
    return [add_bridge_user(root, b.edge, b.sites, feeder=b.feeder) for b in keep]


def _core_listener(
    core_directory: str | os.PathLike[str], feeder: str | None, sites: Sequence[str]
) -> _CoreListener:
    """The core's listener a bridge of ``sites`` logs in on: the broker's, or ``feeder``'s."""
    if not is_feeders_broker(core_directory):
        core = load_broker_files(core_directory)
        if feeder is not None:
            raise BrokerConfigError(
                f"{core.directory} is a single-feeder broker: it has no feeder {feeder!r} "
                "(give a feeder only for a core written by `broker init --feeders`)"
            )
        return _CoreListener(
            core.directory,
            core.password_file,
            core.acl_file,
            core.credentials,
            core.tls,
            core.port,
            core.tls_port,
        )
    files = load_feeders_broker(core_directory)
    if feeder is None:
        raise BrokerConfigError(
            f"{files.directory} is a many-feeders broker: name the feeder whose sites the edge "
            f"serves (--feeder; its feeders: {', '.join(f.id for f in files.feeders)})"
        )
    listener = bridge_feeder(files, feeder, sites)
    return _CoreListener(
        files.directory,
        listener.password_file,
        listener.acl_file,
        files.credentials,
        files.tls,
        listener.port,
        listener.tls_port,
        listener.id,
        listener.mount_point,
    )


def _checked_user(edge: str) -> str:
    try:
        return bridge_user_name(edge)
    except ValueError as err:
        raise BrokerConfigError(str(err)) from err


def _checked_sites(sites: Sequence[str]) -> tuple[str, ...]:
    if isinstance(sites, str) or not sites:
        raise BrokerConfigError("sites must be a non-empty sequence of site ids")
    try:
        return tuple(check_id(site) for site in sites)
    except ValueError as err:
        raise BrokerConfigError(str(err)) from err


def _append(path: Path, text: str, owner: tuple[int, int] | None) -> None:
    """Append ``text`` to ``path`` atomically, keeping its mode (600) and setting ``owner``."""
    old = path.read_text(encoding="utf-8")
    _write_file(path, old + ("" if old.endswith("\n") else "\n") + text, 0o600, owner)


def _kit_toml(kit: BridgeKit) -> str:
    q = json.dumps
    lines = [
        "# A bridge kit (broker/bridge.py): what edge broker "
        + q(kit.edge)
        + " needs to bridge to the core.",
        "# Secret (mode 600): copy this directory to the edge machine, then",
        "# `wattmesh broker edge EDGE_DIR --kit THIS_DIR --core HOST`.",
        "[bridge]",
        f"edge = {q(kit.edge)}",
        f"user = {q(kit.credentials.user)}",
        f"password = {q(kit.credentials.password)}",
        f"sites = [{', '.join(q(s) for s in kit.sites)}]",
        f"core_port = {kit.core_port}",
    ]
    if kit.core_tls_port is not None:
        lines.append(f"core_tls_port = {kit.core_tls_port}")
    if kit.feeder is not None and kit.mount_point is not None:
        lines += [
            "# The core's listener of this feeder; the bridge takes its mount point off.",
            f"feeder = {q(kit.feeder)}",
            f"mount_point = {q(kit.mount_point)}",
        ]
    if kit.credentials.tls:
        # Relative to the kit's directory, so that the kit can be moved.
        lines += [
            f"ca_cert = {q(KIT_CA_NAME)}",
            f"cert = {q(KIT_CERT_NAME)}",
            f"key = {q(KIT_KEY_NAME)}",
        ]
    return "\n".join(lines) + "\n"


def load_bridge_kit(path: str | os.PathLike[str]) -> BridgeKit:
    """The bridge kit in directory ``path`` (or its ``bridge.toml``), from ``add_bridge_user``.

    ``BrokerConfigError`` if it is missing or malformed.
    """
    root = Path(path).absolute()
    toml_path = root / KIT_TOML_NAME if root.is_dir() else root
    try:
        doc = tomllib.loads(toml_path.read_text(encoding="utf-8"))["bridge"]
        files = {
            k: toml_path.parent / str(doc[k]) if k in doc else None
            for k in ("ca_cert", "cert", "key")
        }
        tls_port = doc.get("core_tls_port")
        feeder, mount = doc.get("feeder"), doc.get("mount_point")
        return BridgeKit(
            edge=str(doc["edge"]),
            sites=tuple(str(site) for site in doc["sites"]),
            credentials=BridgeCredentials(
                user=str(doc["user"]),
                password=str(doc["password"]),
                ca_cert=files["ca_cert"],
                cert=files["cert"],
                key=files["key"],
            ),
            core_port=int(doc["core_port"]),
            core_tls_port=None if tls_port is None else int(tls_port),
            directory=toml_path.parent,
            feeder=None if feeder is None else str(feeder),
            mount_point=None if mount is None else str(mount),
        )
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as err:
        raise BrokerConfigError(f"cannot read the bridge kit {toml_path}: {err!r}") from err


def _issue_client_cert(ca_cert_path: Path, ca_key_path: Path, user: str) -> tuple[Path, Path]:
    """A client certificate (CN = ``user``) signed by the core's CA, next to the others."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise BrokerConfigError(f"{ca_key_path} is not the EC key write_broker_config makes")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate clock skew
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "wattmesh"),
                    x509.NameAttribute(NameOID.COMMON_NAME, user),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    clients = ca_cert_path.parent / "clients"
    cert_path, key_path = clients / f"{user}.crt", clients / f"{user}.key"
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, None)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_file(key_path, key_pem, 0o600, None)
    return cert_path, key_path


# ---------------------------------------------------------------------------------------------
# The edge side: a broker for the sites behind it, with the bridge


def write_edge_broker(
    directory: str | os.PathLike[str],
    kit: BridgeKit,
    *,
    core: Sequence[str],
    port: int = 1883,
    host: str = "127.0.0.1",
    overwrite: bool = False,
    restart_timeout_s: tuple[int, int] = (2, 30),
    insecure: bool = False,
    protocol: Literal["mqttv50", "mqttv311"] = "mqttv311",
    keepalive_s: int = 30,
) -> BrokerFiles:
    """Write edge ``kit.edge``'s broker for ``kit.sites`` in ``directory``, bridged to ``core``.

    ``core`` lists the core's addresses, ``host`` or ``host:port`` (the kit's port if none;
    the first is the main core, the others are tried in turn when it fails). The broker is
    ``write_broker_config(directory, kit.sites, port=..., host=...)`` (its own coordinator,
    operator and monitor users stay local; each site's ACL is the same as on a single broker)
    plus ``bridge_conf_text`` appended to its mosquitto.conf, which then holds the bridge's
    password and is written mode 600 (owned by the broker's user when we are root). With a
    TLS kit the CA, certificate and key are copied into ``bridge/`` and no password is used.
    A kit for a feeder of a many-feeders core carries its listener's mount point, which the
    bridge takes off incoming topics (``BridgeConfig.mount_point``). ``insecure`` skips the
    check of the core's host name against its certificate; ``protocol`` is the bridge's MQTT
    version (keep 3.1.1, see the module docstring).
    """
    addresses = tuple(_with_port(address, kit.core_connect_port) for address in core)
    files = write_broker_config(directory, kit.sites, port=port, host=host, overwrite=overwrite)
    owner = _service_owner()
    credentials = kit.credentials
    if credentials.tls:
        credentials = _copy_tls(files.directory / EDGE_BRIDGE_DIR_NAME, credentials, owner)
    config = BridgeConfig(
        name=kit.edge,
        addresses=addresses,
        sites=tuple(files.sites),
        credentials=credentials,
        restart_timeout_s=restart_timeout_s,
        insecure=insecure,
        protocol=protocol,
        keepalive_s=keepalive_s,
        mount_point=kit.mount_point,
    )
    conf = files.directory / CONF_NAME
    text = conf.read_text(encoding="utf-8") + bridge_conf_text(config)
    _write_file(conf, text, 0o600, owner)
    return files


def _with_port(address: str, port: int) -> str:
    """``address`` as ``host:port``, adding ``port`` if it has none."""
    if _ADDRESS.match(address):
        return address
    return f"{address}:{port}"


def _copy_tls(
    directory: Path, creds: BridgeCredentials, owner: tuple[int, int] | None
) -> BridgeCredentials:
    directory.mkdir(mode=0o700, exist_ok=True)
    if owner is not None:
        os.chown(directory, *owner)
    copied: list[Path] = []
    for source, name in (
        (creds.ca_cert, "ca.crt"),
        (creds.cert, "bridge.crt"),
        (creds.key, "bridge.key"),
    ):
        if source is None:
            raise BrokerConfigError("a TLS bridge needs ca_cert, cert and key")
        target = directory / name
        shutil.copyfile(source, target)
        target.chmod(0o600)
        if owner is not None:
            os.chown(target, *owner)
        copied.append(target)
    return BridgeCredentials(creds.user, creds.password, *copied)


def bridge_kit_path(core_directory: str | os.PathLike[str], edge: str) -> Path:
    """Where ``add_bridge_user`` writes edge ``edge``'s bridge kit on the core."""
    return Path(core_directory).absolute() / BRIDGES_DIR_NAME / _checked_user(edge)


__all__ = [
    "BRIDGES_DIR_NAME",
    "BRIDGES_RECORD_NAME",
    "BridgeConfig",
    "BridgeCredentials",
    "BridgeKit",
    "RecordedBridge",
    "add_bridge_user",
    "bridge_acl_text",
    "bridge_conf_text",
    "bridge_kit_path",
    "bridge_topics",
    "bridge_user_name",
    "load_bridge_kit",
    "plan_bridges",
    "recorded_bridges",
    "restore_bridges",
    "write_edge_broker",
]
