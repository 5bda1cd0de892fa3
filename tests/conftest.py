"""Shared fixtures: simulated sites on a manual clock, served over real Modbus TCP and RTU."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import pytest

from broker.clock import ManualClock
from simulators.devices import LoadSpec, SimSite
from simulators.server import SerialPair

pytest_plugins = ["tests.broker_fixtures", "tests.pg_fixtures"]

#: 2026-06-21 12:00 UTC: midsummer noon, the sun high over 48 degrees north.
NOON_TS = 1_782_043_200.0


@pytest.fixture
def clock() -> ManualClock:
    """A clock that moves only when the test says so."""
    return ManualClock(NOON_TS)


@pytest.fixture
def site(clock: ManualClock) -> SimSite:
    """A household site at 48 N, 11 E with a seeded load."""
    return SimSite(
        "home",
        clock,
        LoadSpec("household", 300.0, 4000.0),
        seed=1,
        latitude_deg=48.0,
        longitude_deg=11.0,
    )


@pytest.fixture
async def serial_pair() -> AsyncIterator[SerialPair]:
    """A socat pseudo-terminal pair (the RTU wire)."""
    if shutil.which("socat") is None:
        pytest.fail("socat is required for the RTU tests (apt-get install socat)")
    async with SerialPair() as pair:
        yield pair
