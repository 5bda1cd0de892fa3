"""The safe write path: a held battery setpoint is written on change beyond the deadband and to
refresh it before the device's own revert timeout, never on every poll."""

from __future__ import annotations

import pytest

from broker.clock import ManualClock
from drivers.devices import Battery
from drivers.transport import ModbusTransport
from drivers.writeguard import WritePolicy, write_due
from simulators.devices import BatterySim, SimSite
from simulators.server import DeviceServer

POLL_S = 5.0


def test_write_due_says_first_change_refresh_or_nothing() -> None:
    policy = WritePolicy(deadband_w=100.0, min_interval_s=10.0, refresh_s=60.0)
    assert write_due(policy, 500.0, 0.0, None, None) == "first"
    assert write_due(policy, 599.0, 20.0, 500.0, 0.0) is None  # within the deadband
    assert write_due(policy, 600.0, 20.0, 500.0, 0.0) == "change"
    assert write_due(policy, 900.0, 5.0, 500.0, 0.0) is None  # too soon after the last write
    assert write_due(policy, 500.0, 60.0, 500.0, 0.0) == "refresh"
    assert write_due(policy, 500.0, -5.0, 500.0, 0.0) == "refresh"  # the clock went back
    # A write the device did not confirm (value unknown) is retried, after the interval.
    assert write_due(policy, 500.0, 5.0, None, 0.0) is None
    assert write_due(policy, 500.0, 10.0, None, 0.0) == "change"


def test_refresh_follows_the_revert_timeout_and_respects_the_minimum_interval() -> None:
    assert WritePolicy().with_revert_timeout(300).refresh_s == 150.0
    assert WritePolicy(refresh_s=60.0).with_revert_timeout(300).refresh_s == 60.0
    assert WritePolicy(refresh_s=60.0).with_revert_timeout(0).refresh_s == 60.0
    with pytest.raises(ValueError, match="before the device's revert timeout"):
        WritePolicy(min_interval_s=600.0).with_revert_timeout(300)
    with pytest.raises(ValueError, match="at least min_interval_s"):
        WritePolicy(min_interval_s=600.0, refresh_s=60.0)


async def test_a_constant_setpoint_held_every_poll_is_written_only_to_refresh_it(
    site: SimSite, clock: ManualClock
) -> None:
    sim = BatterySim("bat", 1, site, capacity_wh=20_000, rated_power_w=5000, soc_pct=50.0)
    async with DeviceServer([sim], tcp=("127.0.0.1", 0)) as server:
        async with ModbusTransport.from_url(server.url) as transport:
            battery = await Battery.connect(transport, 1, WritePolicy(deadband_w=50.0))
            wrote = []
            for _ in range(int(3600 / POLL_S)):  # one hour of 5 s polls
                if await battery.hold_power_w(1000.0, clock.now(), revert_timeout_s=300):
                    wrote.append(clock.now())
                reading = await battery.read()
                assert reading.setpoint_w == 1000.0  # never lapsed to idle
                clock.advance(POLL_S)
    # Written first, then every 150 s (half the 300 s revert timeout): 24 commands in an hour.
    assert battery.writes == 24
    assert battery.held.refreshes == 23
    assert battery.held.skipped == 720 - 24
    assert sim.writes == 2 * 24  # each command: the rates, then the mode
    assert [round(t - wrote[0]) for t in wrote[:3]] == [0, 150, 300]


async def test_a_change_beyond_the_deadband_writes_at_once_and_within_it_does_not(
    site: SimSite, clock: ManualClock
) -> None:
    sim = BatterySim("bat", 1, site, capacity_wh=20_000, rated_power_w=5000, soc_pct=50.0)
    async with DeviceServer([sim], tcp=("127.0.0.1", 0)) as server:
        async with ModbusTransport.from_url(server.url) as transport:
            battery = await Battery.connect(transport, 1, WritePolicy(deadband_w=100.0))
            assert await battery.hold_power_w(1000.0, clock.now())
            clock.advance(POLL_S)
            assert not await battery.hold_power_w(1099.0, clock.now())  # within 100 W
            within = await battery.read()
            clock.advance(POLL_S)
            assert await battery.hold_power_w(-1500.0, clock.now())  # beyond: at once
            beyond = await battery.read()
            clock.advance(3600)
            assert not await battery.hold_power_w(-1500.0, clock.now())  # no timeout: no refresh
    assert within.setpoint_w == 1000.0
    assert beyond.setpoint_w == -1500.0 and beyond.power_w == -1500.0
    assert battery.writes == 2


async def test_the_minimum_write_interval_delays_a_change(
    site: SimSite, clock: ManualClock
) -> None:
    sim = BatterySim("bat", 1, site, capacity_wh=20_000, rated_power_w=5000, soc_pct=50.0)
    policy = WritePolicy(deadband_w=10.0, min_interval_s=60.0)
    async with DeviceServer([sim], tcp=("127.0.0.1", 0)) as server:
        async with ModbusTransport.from_url(server.url) as transport:
            battery = await Battery.connect(transport, 1, policy)
            assert await battery.hold_power_w(1000.0, clock.now())
            clock.advance(30)
            assert not await battery.hold_power_w(2000.0, clock.now())
            clock.advance(30)
            assert await battery.hold_power_w(2000.0, clock.now())
            after = await battery.read()
    assert after.setpoint_w == 2000.0 and battery.writes == 2
