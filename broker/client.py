"""A resilient async MQTT client on aiomqtt: MQTT 5, persistent session, last will, reconnects.

``BusClient`` is an async context manager owning a task group with one named connection task.
That task connects, publishes the retained online status, (re)subscribes, delivers incoming
messages to the handler, and when the link breaks waits a random, capped, growing delay and
tries again. Its state is explicit (:class:`ConnectionState`). Publishing while disconnected
raises :class:`BusUnavailable` at once: nothing is buffered here (the edge spools to disk).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker.errors import BusUnavailable

log = logging.getLogger(__name__)
#: aiomqtt warns once per pending publish beyond ten; with many QoS 1 messages in flight
#: (the edge's replay) that is expected, so only its errors reach the log.
_aiomqtt_log = logging.getLogger("wattmesh.aiomqtt")
_aiomqtt_log.setLevel(logging.ERROR)

Handler = Callable[[str, bytes], Awaitable[None]]
#: Called synchronously in the event loop as a message arrives; returns True when it has
#: handled the message (it then skips the queue and the async handler).
FastHandler = Callable[[str, bytes], bool]

#: Options set on every MQTT connection's socket as soon as it is open (aiomqtt applies them
#: right after paho connects, before CONNACK). TCP_NODELAY: without it Nagle's algorithm holds
#: a small packet (a PUBACK, a dispatch, its acknowledgement) back until the previous one is
#: acknowledged, which with delayed ACKs stalls a QoS 1 round trip about 40 ms on loopback.
SOCKET_OPTIONS: tuple[tuple[int, int, int], ...] = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


class ConnectionState(enum.Enum):
    """Where the connection is."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class BusSettings:
    """How to reach the broker and who we are there."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 3600
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 30.0
    publish_timeout_s: float = 10.0
    max_inflight: int = 200
    #: MQTT 5 (5), or 3.1.1 (4) for brokers that speak only that, such as the embedded one.
    protocol: int = 5
    #: The listener's ``mount_point`` (a many-feeders broker: ``feeder/{id}/``), or None.
    #: The broker puts it in front of every topic we publish or subscribe to and should take it
    #: off what it delivers; Mosquitto 2.0.11 (Debian 12) leaves it on (eclipse-mosquitto
    #: issue 2244, fixed in 2.0.12), so delivered topics that start with it lose it here.
    mount_point: str | None = None


@dataclass(frozen=True, slots=True)
class Presence:
    """A retained status topic: ``online`` published on connect, ``offline`` as last will."""

    topic: str
    online_payload: bytes
    offline_payload: bytes


@dataclass
class BusStats:
    """Counters for monitoring."""

    connects: int = 0
    disconnects: int = 0
    published: int = 0
    received: int = 0
    handler_errors: int = 0
    #: Connections the broker refused (bad credentials, not authorised, ...).
    refusals: int = 0


#: CONNACK reason codes that refuse who the client is: MQTT 5's 0x86 bad user name or password,
#: 0x87 not authorized, 0x8A banned, 0x8C bad authentication method, and MQTT 3.1.1's
#: 4 (bad user name or password) and 5 (not authorised). Mosquitto answers 135 for a wrong,
#: missing or unknown user's password alike; paho 2 reports 3.1.1's 5 as 135 as well.
CREDENTIAL_REFUSALS = frozenset({134, 135, 138, 140, 4, 5})


def refusal_code(err: BaseException) -> int | None:
    """The broker's CONNACK reason code if ``err`` says it refused the connection, else None.

    aiomqtt raises :class:`aiomqtt.exceptions.MqttConnectError` for a CONNACK that refuses, with the
    reason code as ``rc`` (a paho ``ReasonCode`` under MQTT 5, an int under 3.1.1); a broker
    that cannot be reached at all raises a plain :class:`aiomqtt.MqttError` instead.
    """
    if not isinstance(err, MqttConnectError):
        return None
    rc = err.rc
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    return rc if isinstance(rc, int) else None


def refusal_reason(err: BaseException) -> str:
    """The broker's reason for refusing, e.g. ``Not authorized (reason code 135)``."""
    code = refusal_code(err)
    if not isinstance(err, MqttConnectError) or code is None:
        return str(err)
    if isinstance(err.rc, ReasonCode):
        name = str(err.rc)
    else:  # MQTT 3.1.1: aiomqtt's message is "Connection refused: <reason>"
        name = str(err.args[0]).removeprefix("Connection refused: ") if err.args else "refused"
    return f"{name} (reason code {code})"


def _read_disconnect(client: aiomqtt.Client) -> None:
    """Mark the client's disconnection as read when it comes: aiomqtt keeps it in a future
    that only ``async with`` awaits, so a broker that drops the client at a moment nothing
    awaits it (a stack stopping right after it started) left asyncio printing "Future
    exception was never retrieved" at exit. The error itself reaches :meth:`BusClient._run`
    through aiomqtt as before."""
    future = getattr(client, "_disconnected", None)
    if isinstance(future, asyncio.Future):
        future.add_done_callback(lambda f: f.cancelled() or f.exception())


def next_backoff_s(previous_s: float, initial_s: float, max_s: float) -> float:
    """The next reconnect delay: double the last, capped, with full jitter on top half.

    Returns a value in ``[d/2, d]`` where ``d = min(max_s, 2 * previous_s)`` (``initial_s`` the
    first time), so many clients that lost the same broker do not return in lockstep.
    """
    ceiling = initial_s if previous_s <= 0 else min(max_s, previous_s * 2.0)
    return ceiling * (0.5 + 0.5 * random.random())


class BusClient:
    """One MQTT session that survives broker restarts. Use ``async with``."""

    def __init__(
        self,
        settings: BusSettings,
        *,
        presence: Presence | None = None,
        handler: Handler | None = None,
        fast_handler: FastHandler | None = None,
    ) -> None:
        self.settings = settings
        self.presence = presence
        self.handler = handler
        self.fast_handler = fast_handler
        self.state = ConnectionState.DISCONNECTED
        self.stats = BusStats()
        #: Refusals in a row since the last connection, and the broker's last reason.
        self.refusals = 0
        self.refusal: str | None = None
        #: Why the last attempt to connect failed (None once connected).
        self.last_error: str | None = None
        self._unreachable = False
        self._subscriptions: dict[str, int] = {}
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.on_connect: Callable[[], Awaitable[None]] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> BusClient:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._task = self._group.create_task(self._run(), name="mqtt-connection")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
        assert self._group is not None
        await self._group.__aexit__(et, ev, tb)

    async def close(self) -> None:
        """Say offline (retained) and disconnect cleanly."""
        if self._closing:
            return
        self._closing = True
        client = self._client
        if client is not None and self.connected and self.presence is not None:
            try:
                await client.publish(
                    self.presence.topic,
                    self.presence.offline_payload,
                    qos=1,
                    retain=True,
                    timeout=2.0,
                )
            except aiomqtt.MqttError:
                log.debug("could not publish offline status while closing")
        if self._task is not None:
            self._task.cancel()
        self.state = ConnectionState.CLOSED
        self._connected.clear()

    @property
    def connected(self) -> bool:
        """Whether the session is up now."""
        return self.state is ConnectionState.CONNECTED

    def socket(self) -> socket.socket | None:
        """The connection's TCP (or TLS) socket while connected, for inspection; else None."""
        client = self._client
        if client is None or not self.connected:
            return None
        sock = client._client.socket()  # aiomqtt keeps paho's client private
        return sock if isinstance(sock, socket.socket) else None

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Wait until connected; ``TimeoutError`` after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            await self._connected.wait()

    def local_topic(self, topic: str) -> str:
        """``topic`` as this client named it: without the listener's mount point (if any)."""
        mount = self.settings.mount_point
        if mount and topic.startswith(mount):
            return topic[len(mount) :]
        return topic

    # -- the connection task ---------------------------------------------------------------
    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = s.session_expiry_s
        will = None
        if self.presence is not None:
            will = aiomqtt.Will(
                self.presence.topic, self.presence.offline_payload, qos=1, retain=True
            )
        tls_context = None
        if s.ca_file:
            tls_context = ssl.create_default_context(cafile=s.ca_file)
            if s.cert_file:
                tls_context.load_cert_chain(s.cert_file, s.key_file)
        common: dict[str, Any] = {
            "username": s.username,
            "password": s.password,
            "identifier": s.client_id,
            "will": will,
            "keepalive": s.keepalive_s,
            "tls_context": tls_context,
            "max_inflight_messages": s.max_inflight,
            "timeout": s.publish_timeout_s,
            "logger": _aiomqtt_log,
            "queue_type": self._queue_type(),
            "socket_options": SOCKET_OPTIONS,
        }
        if s.protocol == 4:  # MQTT 3.1.1: a persistent session is clean_session=False
            return aiomqtt.Client(
                s.host, s.port, protocol=aiomqtt.ProtocolVersion.V311, clean_session=False, **common
            )
        return aiomqtt.Client(
            s.host,
            s.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=properties,
            **common,
        )

    def _queue_type(self) -> type[asyncio.Queue[aiomqtt.Message]]:
        """aiomqtt's incoming queue, letting the fast handler take messages on arrival.

        Handling a message as it arrives skips a task and a wait per message, which is most
        of the cost of a high-rate stream such as the coordinator's telemetry ingest.
        """
        bus = self

        class _Inbox(asyncio.Queue[aiomqtt.Message]):
            def put_nowait(self, item: aiomqtt.Message) -> None:
                fast = bus.fast_handler
                if fast is not None:
                    payload = (
                        item.payload
                        if isinstance(item.payload, bytes)
                        else (str(item.payload or "").encode())
                    )
                    try:
                        if fast(bus.local_topic(str(item.topic)), payload):
                            bus.stats.received += 1
                            return
                    except Exception:  # a handler bug must not take the connection down
                        bus.stats.handler_errors += 1
                        log.exception("fast message handler failed on %s", item.topic)
                        return
                super().put_nowait(item)

        return _Inbox

    async def _run(self) -> None:
        delay_s = 0.0
        while not self._closing:
            self.state = ConnectionState.CONNECTING
            client = self._make_client()
            _read_disconnect(client)
            try:
                async with client:
                    _read_disconnect(client)  # connecting may have made it anew
                    self._client = client
                    await self._on_connected(client)
                    delay_s = 0.0
                    async for message in client.messages:
                        await self._deliver(self.local_topic(str(message.topic)), message.payload)
            except aiomqtt.MqttError as err:
                self.last_error = str(err)
                if self.state is ConnectionState.CONNECTED:
                    log.warning(
                        "lost the broker at %s:%s: %s", self.settings.host, self.settings.port, err
                    )
                    self.stats.disconnects += 1
                elif refusal_code(err) is not None:
                    self._refused(err)
                elif not self._unreachable:
                    self._unreachable = True
                    log.warning(
                        "cannot reach the broker at %s:%s: %s; retrying",
                        self.settings.host,
                        self.settings.port,
                        err,
                    )
                else:
                    log.debug("cannot reach the broker: %s", err)
            finally:
                self._client = None
                self._connected.clear()
                if self.state is not ConnectionState.CLOSED:
                    self.state = ConnectionState.DISCONNECTED
            if self._closing:
                break
            delay_s = next_backoff_s(
                delay_s, self.settings.backoff_initial_s, self.settings.backoff_max_s
            )
            await asyncio.sleep(delay_s)

    def _refused(self, err: aiomqtt.MqttError) -> None:
        """Count a refusal; log it at ERROR the 1st, 2nd, 4th, 8th... time in a row."""
        self.refusals += 1
        self.stats.refusals += 1
        self.refusal = refusal_reason(err)
        if self.refusals & (self.refusals - 1) == 0:
            again = "" if self.refusals == 1 else f" ({self.refusals} times in a row)"
            log.error(
                "the broker at %s:%s refused the connection of user %r: %s%s; retrying",
                self.settings.host,
                self.settings.port,
                self.settings.username,
                self.refusal,
                again,
            )

    async def _on_connected(self, client: aiomqtt.Client) -> None:
        for topic, qos in self._subscriptions.items():
            await client.subscribe(topic, qos=qos)
        if self.presence is not None:
            await client.publish(
                self.presence.topic, self.presence.online_payload, qos=1, retain=True
            )
        self.state = ConnectionState.CONNECTED
        self.stats.connects += 1
        self.refusals, self.refusal, self._unreachable = 0, None, False
        self.last_error = None
        if self.stats.connects > 1:
            log.warning(
                "reconnected to the broker at %s:%s", self.settings.host, self.settings.port
            )
        self._connected.set()
        if self.on_connect is not None:
            await self.on_connect()

    async def _deliver(self, topic: str, payload: object) -> None:
        self.stats.received += 1
        if self.handler is None:
            return
        data = payload if isinstance(payload, bytes) else str(payload or "").encode()
        try:
            await self.handler(topic, data)
        except Exception:  # a handler bug must not take the connection down
            self.stats.handler_errors += 1
            log.exception("message handler failed on %s", topic)

    # -- what users call -------------------------------------------------------------------
    async def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        self._subscriptions[topic] = qos
        client = self._client
        if client is not None and self.connected:
            try:
                await client.subscribe(topic, qos=qos)
            except aiomqtt.MqttError as err:
                raise BusUnavailable(f"subscribe to {topic} failed: {err}") from err

    async def unsubscribe(self, topic: str) -> None:
        """Forget a subscription: now if connected, and never again after reconnects (a
        persistent session keeps subscriptions, so a service that no longer wants one must
        say so)."""
        self._subscriptions.pop(topic, None)
        client = self._client
        if client is not None and self.connected:
            try:
                await client.unsubscribe(topic)
            except aiomqtt.MqttError as err:
                raise BusUnavailable(f"unsubscribe from {topic} failed: {err}") from err

    async def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish and, for QoS 1, wait for the broker's acknowledgement.

        Raises :class:`BusUnavailable` when not connected or when the link breaks first.
        """
        client = self._client
        if client is None or not self.connected:
            raise BusUnavailable("not connected to the broker")
        try:
            await client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as err:
            raise BusUnavailable(f"publish to {topic} failed: {err}") from err
        self.stats.published += 1

    async def publish_many(
        self,
        items: Iterable[tuple[str, bytes | str]],
        *,
        qos: int = 1,
        retain: bool = False,
        window: int = 100,
    ) -> int:
        """Publish in order with at most ``window`` awaiting acknowledgement; returns the count.

        Bounded windows keep many messages in flight while aiomqtt's bookkeeping, whose cost
        grows with the number of pending calls, stays cheap.
        """
        count = 0
        pending: list[Coroutine[None, None, None]] = []
        for topic, payload in items:
            pending.append(self.publish(topic, payload, qos=qos, retain=retain))
            if len(pending) >= window:
                count += len(pending)
                await asyncio.gather(*pending)
                pending = []
        if pending:
            count += len(pending)
            await asyncio.gather(*pending)
        return count

    async def publish_burst(
        self,
        items: Iterable[tuple[str, bytes | str]],
        *,
        qos: int = 1,
        retain: bool = False,
        window: int = 500,
        poll_s: float = 0.002,
    ) -> int:
        """Publish many messages in order and wait until the broker has acknowledged them
        all; returns the count. For bursts of thousands (a gate's awards, the forecasts).

        Each message goes straight to paho's queue (paho keeps ``max_inflight`` of them in
        flight and sends the rest as acknowledgements come back); completion is read from
        paho's message info, oldest first. That skips aiomqtt's future and bookkeeping per
        message, which cost about half of a publication. At most ``window`` messages are
        queued and unacknowledged at a time, and the event loop gets a turn between every
        ``window // 2`` of them, so ingest goes on meanwhile.

        Raises :class:`BusUnavailable` when not connected, when the link breaks first, or
        when acknowledgements stop for ``publish_timeout_s``.
        """
        client = self._client
        if client is None or not self.connected:
            raise BusUnavailable("not connected to the broker")
        paho = client._client  # aiomqtt keeps paho's client private
        loop = asyncio.get_running_loop()
        pending: deque[mqtt.MQTTMessageInfo] = deque()
        count = 0

        async def drain(keep: int) -> None:
            deadline = loop.time() + self.settings.publish_timeout_s
            while True:
                while pending and pending[0].is_published():
                    pending.popleft()
                    deadline = loop.time() + self.settings.publish_timeout_s
                if len(pending) <= keep:
                    return
                if self._client is not client or not self.connected:
                    raise BusUnavailable("the link broke before the broker acknowledged")
                if loop.time() > deadline:
                    raise BusUnavailable(
                        f"no acknowledgement for {self.settings.publish_timeout_s} s"
                    )
                await asyncio.sleep(poll_s)

        for topic, payload in items:
            if len(pending) >= window:
                await drain(window // 2)
            info = paho.publish(topic, payload, qos=qos, retain=retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise BusUnavailable(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
            pending.append(info)
            count += 1
        await drain(0)
        self.stats.published += count
        return count
