"""Hostile payloads at every inbound path of the edge agent: nothing raises, everything is
applied, refused and counted, or (dispatch) acknowledged.

10,000 generated payloads per path go straight into the agent's message handler (an agent
polling a simulated battery over real Modbus TCP, on one event loop); a few hundred more go
through a real Mosquitto to a running agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from broker import topics
from broker.messages import Award, Clearing, Dispatch, Forecast, GridState
from broker.mosquitto import BrokerFiles, MosquittoProcess
from edge.agent import MAX_INBOUND_BYTES, EdgeAgent
from tests.test_edge_agent import (
    SITE,
    House,
    _dispatch,
    _password,
    observer,
    simulated_house,
    site_config,
)

EXAMPLES = 10_000
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- payloads ------------------------------------------------------------------------------

hostile_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e308, -1e308, 1e9 + 1, -1e9 - 1, 5e-324, 4.1e9, 2**63]),
    st.integers(),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    hostile_numbers,
    st.text(max_size=8),
    st.sampled_from(["", "emergency", "panic", "a" * 65, "\x00", "💥"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _dumps(value: Any) -> bytes:
    # allow_nan: NaN and Infinity become JSON tokens, which strict parsers must refuse.
    return json.dumps(value, allow_nan=True).encode()


def _nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


@dataclass(frozen=True)
class InboundPath:
    """One inbound message path: its topic and the model its payloads must satisfy."""

    topic: str
    model: type[Any]


PATHS: dict[str, InboundPath] = {
    "dispatch": InboundPath(topics.site_topic(SITE, "dispatch"), Dispatch),
    "award": InboundPath(topics.site_topic(SITE, "award"), Award),
    "forecast": InboundPath(topics.forecast_topic(SITE), Forecast),
    "grid/state": InboundPath(topics.grid_state_topic("feeder-1"), GridState),
    "market/clearing": InboundPath(topics.MARKET_CLEARING, Clearing),
}


def _plausible(key: str, now: float, interval: int) -> st.SearchStrategy[Any]:
    """Values near (and just beyond) what a key of some message accepts."""
    power = st.floats(-2e4, 2e4)
    floats_near: dict[str, st.SearchStrategy[Any]] = {
        "ts": st.floats(-1e5, 1e5).map(lambda d: now + d) | st.sampled_from([now + 3e7, 1.0]),
        "start_ts": st.floats(-1e5, 1e5).map(lambda d: now + d),
        "battery_power_w": power,
        "load_limit_w": st.floats(-10, 2e4),
        "priority": st.sampled_from(["dispatch", "emergency", "panic"]),
        "reason": st.text(max_size=10),
        "interval": st.integers(-200, 200).map(lambda d: interval + d),
        "price_per_kwh": st.floats(-150, 150),
        "quantity_kwh": st.floats(-10, 10),
        "volume_kwh": st.floats(-1, 1e3),
        "bids": st.integers(-1, 10),
        "step_s": st.integers(-10, 4000),
        "flow_w": power,
        "import_limit_w": st.floats(-1, 1e6),
        "export_limit_w": st.floats(-1, 1e6),
        "mode": st.sampled_from(["normal", "constrained", "emergency", "panic"]),
        "pv_power_w": st.lists(power, max_size=4),
        "load_power_w": st.lists(power, max_size=4),
    }
    return floats_near.get(key, scalars)


KEYS = {
    "dispatch": ["battery_power_w", "load_limit_w", "priority", "reason"],
    "award": ["interval", "price_per_kwh", "quantity_kwh"],
    "forecast": ["start_ts", "step_s", "pv_power_w", "load_power_w", "price_per_kwh"],
    "grid/state": ["flow_w", "import_limit_w", "export_limit_w", "mode"],
    "market/clearing": ["interval", "price_per_kwh", "volume_kwh", "bids"],
}


@st.composite
def well_shaped(draw: st.DrawFn, now: Callable[[], float], interval_s: int) -> bytes:
    """A message of some kind that looks right, with values near and beyond the limits."""
    t = now()
    kind = draw(st.sampled_from(sorted(KEYS)))
    out: dict[str, Any] = {"id": f"fz{draw(st.integers(0, 2**40)):010x}"}
    for key in ["ts", *KEYS[kind]]:
        pick = draw(st.integers(0, 19))
        if pick < 16:
            out[key] = draw(_plausible(key, t, int(t // interval_s)))
        elif pick < 19:
            out[key] = draw(hostile_numbers)  # and with pick == 19 the key is missing
    if kind == "dispatch":
        ts = out.get("ts", t)
        length = draw(st.floats(-100, 9e4) | st.sampled_from([1e9, -1e9]))
        out["expires_ts"] = ts + length if isinstance(ts, float) else length
    if kind == "forecast" and draw(st.booleans()):
        pv = out.get("pv_power_w")
        n = len(pv) if isinstance(pv, list) else 0
        out["load_power_w"] = [0.0] * n
        out["price_per_kwh"] = [0.1] * n
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.text(max_size=6))] = draw(scalars)  # an unknown field
    return _dumps(out)


def payloads(now: Callable[[], float], interval_s: int) -> st.SearchStrategy[bytes]:
    """Garbage bytes, huge, deeply nested, any JSON, or well-shaped with hostile values."""
    shaped = well_shaped(now, interval_s)
    return st.one_of(
        st.binary(max_size=200),
        st.integers(MAX_INBOUND_BYTES - 10, MAX_INBOUND_BYTES + 100).map(lambda n: b"[" + b"0," * (n // 2) + b"0]"),
        st.tuples(st.integers(1, 100_000), st.sampled_from(["list", "dict"])).map(
            lambda t: _nested(*t)
        ),
        json_values.map(_dumps),
        shaped,
        shaped,
        shaped,
        shaped.map(lambda b: b[: len(b) // 2]),  # cut short
        shaped.map(lambda b: b.replace(b'"', b"\xff", 1)),  # not UTF-8
    )  # fmt: skip


# -- the agent, in process -----------------------------------------------------------------


class _Port:
    """Stands in for BrokerFiles in site_config: the agent is never connected."""

    def __init__(self, port: int) -> None:
        self.port = port


@pytest.fixture
def agent_on_a_loop(tmp_path: Path) -> Iterator[tuple[EdgeAgent, House, asyncio.AbstractEventLoop]]:
    """An agent that has polled a simulated house over Modbus, with no broker (acks are
    counted, not sent); its handler is driven on one event loop."""
    loop = asyncio.new_event_loop()
    stack = contextlib.AsyncExitStack()
    house = loop.run_until_complete(stack.enter_async_context(simulated_house()))
    config = site_config(house, _Port(1), tmp_path / "spool.sqlite")  # type: ignore[arg-type]
    agent = EdgeAgent(config, house.clock, password="unused")
    loop.run_until_complete(agent.cycle())  # one poll: the battery is known
    assert agent._batteries()
    try:
        yield agent, house, loop
    finally:
        agent.pool.close()
        agent.outbox.close()
        loop.run_until_complete(stack.aclose())
        loop.close()


def _validates(model: type[Any], payload: bytes) -> bool:
    if len(payload) > MAX_INBOUND_BYTES:
        return False
    try:
        model.model_validate_json(payload)
    except ValidationError:
        return False
    return True


def test_10000_hostile_payloads_at_every_inbound_path_never_raise_and_are_each_answered(
    agent_on_a_loop: tuple[EdgeAgent, House, asyncio.AbstractEventLoop],
) -> None:
    """Every payload goes to every path: a dispatch is acknowledged exactly once (``invalid``
    unless it validates); anything else is applied or refused and counted, exactly once."""
    agent, house, loop = agent_on_a_loop
    tally = {kind: {"applied": 0, "refused": 0} for kind in PATHS}

    def refusals(kind: str) -> int:
        return sum(agent.stats.rejected.get(kind, {}).values())

    @FUZZ
    @given(payloads(house.clock.now, agent.config.market.interval_s))
    def run(payload: bytes) -> None:
        for kind, path in PATHS.items():
            acks, invalid = sum(agent.stats.acks.values()), agent.stats.acks.get("invalid", 0)
            refused_before = refusals(kind)
            loop.run_until_complete(agent._on_message(path.topic, payload))
            valid = _validates(path.model, payload)
            if kind == "dispatch":
                assert sum(agent.stats.acks.values()) == acks + 1
                assert valid or agent.stats.acks.get("invalid", 0) == invalid + 1
                refused = agent.stats.acks.get("invalid", 0) - invalid
            else:
                refused = refusals(kind) - refused_before
                assert refused in (0, 1)
                assert valid or refused == 1
            tally[kind]["refused" if refused else "applied"] += 1
        setpoint = house.battery.setpoint_w
        assert math.isfinite(setpoint) and -5000.0 <= setpoint <= 5000.0
        for order in (agent.dispatch, agent.emergency):
            if order is not None:  # never held longer than the site allows from receipt
                assert order.until_ts <= house.clock.now() + 7200.0

    run()
    for kind, counts in tally.items():
        assert counts["applied"] + counts["refused"] >= EXAMPLES, kind
        assert counts["refused"] > EXAMPLES // 4, kind
        assert counts["applied"] > 0, kind  # the well-shaped ones do get through
    assert agent.stats.rejected["dispatch"].get("too_large", 0) > 0
    # After all that, a well-formed order on the agent's own clock is still obeyed.
    now = house.clock.now()
    # (An emergency order, as one of the fuzzed ones may still be in force and outranks any
    # ordinary dispatch.)
    good = Dispatch(ts=now, battery_power_w=-800.0, expires_ts=now + 600, priority="emergency")
    before = dict(agent.stats.acks)
    loop.run_until_complete(
        agent._on_message(PATHS["dispatch"].topic, good.model_dump_json().encode())
    )
    new = {k: v - before.get(k, 0) for k, v in agent.stats.acks.items() if v != before.get(k, 0)}
    assert new in ({"accepted": 1}, {"clamped": 1}), new
    assert agent.bus.stats.handler_errors == 0


def test_unknown_topics_and_foreign_sites_are_refused_and_counted(
    agent_on_a_loop: tuple[EdgeAgent, House, asyncio.AbstractEventLoop],
) -> None:
    agent, _, loop = agent_on_a_loop

    @settings(max_examples=2_000, deadline=None, database=None)
    @given(st.text(max_size=80), st.binary(max_size=64))
    def run(topic: str, payload: bytes) -> None:
        before = sum(sum(v.values()) for v in agent.stats.rejected.values())
        acks = sum(agent.stats.acks.values())
        loop.run_until_complete(agent._on_message(topic, payload))
        after = sum(sum(v.values()) for v in agent.stats.rejected.values())
        assert after == before + 1 or sum(agent.stats.acks.values()) == acks + 1

    run()
    loop.run_until_complete(agent._on_message(topics.site_topic("site-b", "award"), b"{}"))
    assert agent.stats.rejected["award"]["other_site"] == 1
    assert agent.stats.rejected["unknown"]["unknown_topic"] >= 1


# -- and through a real Mosquitto ----------------------------------------------------------


def hostile_dispatches(n: int, now: float, seed: int = 11) -> list[bytes]:
    """``n`` hostile dispatch payloads of every family, reproducibly."""
    rng = random.Random(seed)
    out: list[bytes] = []
    for i in range(n):
        family = i % 6
        if family == 0:
            out.append(rng.randbytes(rng.randint(0, 200)))
        elif family == 1:
            out.append(_nested(rng.choice([1_000, 10_000, 100_000]), rng.choice(["list", "dict"])))
        elif family == 2:
            value = rng.choice([math.nan, math.inf, -math.inf, 1e308, "x", None, [], {}])
            out.append(_dumps({"id": f"fam2-{i:08d}", "ts": now, "expires_ts": now + 60,
                               "battery_power_w": value}))  # fmt: skip
        elif family == 3:
            offset = rng.choice([-3e7, -1e5, 3e7, 1e5, 4e9])
            out.append(_dumps({"id": f"fam3-{i:08d}", "ts": now + offset,
                               "expires_ts": now + offset + 600,
                               "battery_power_w": rng.uniform(-2e4, 2e4)}))  # fmt: skip
        elif family == 4:
            out.append(
                b'{"id": "fam4-%08d", "reason": "' % i + b"x" * (MAX_INBOUND_BYTES + 1) + b'"}'
            )
        else:
            out.append(_dumps({"id": f"fam5-{i:08d}", "ts": now, "expires_ts": now + 120,
                               "battery_power_w": rng.uniform(-2e4, 2e4),
                               "priority": rng.choice(["dispatch", "emergency", "panic"])}))  # fmt: skip
    return out


async def test_300_hostile_dispatches_through_mosquitto_are_each_acknowledged(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    async with simulated_house() as house, observer(broker_files) as obs:
        config = site_config(house, broker_files, tmp_path / "spool.sqlite")
        async with EdgeAgent(config, house.clock, password=_password(broker_files)) as agent:
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 2)
            sent = hostile_dispatches(300, house.clock.now())
            for payload in sent:
                await obs.bus.publish(topics.site_topic(SITE, "dispatch"), payload)
            await obs.wait_for(lambda: len(obs.of("dispatch/ack")) >= len(sent), timeout_s=60)
            now = house.clock.now()
            # Some hostile orders were emergencies in force: the last word must outrank them.
            good = Dispatch(
                ts=now, battery_power_w=-1000.0, expires_ts=now + 600, priority="emergency"
            )
            last = await _dispatch(obs, good.model_dump_json())
            errors = agent.bus.stats.handler_errors
            outcomes = dict(agent.stats.acks)
    assert len(obs.of("dispatch/ack")) == len(sent) + 1
    assert outcomes["invalid"] >= 150
    assert errors == 0
    assert (last.outcome, last.applied_battery_power_w) == ("accepted", -1000.0)
    assert -5000.0 <= house.battery.setpoint_w <= 5000.0
