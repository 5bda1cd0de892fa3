"""What each verbosity logs: services their info lines by default, -v wattmesh's debug lines,
-vv also pymodbus's protocol dumps (issue 13's "quiet and noisy at the wrong places")."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.messages import Dispatch
from broker.mosquitto import BrokerFiles, MosquittoProcess
from edge.agent import EdgeAgent
from tests.test_edge_agent import _dispatch, _password, observer, simulated_house, site_config
from wattmesh.service import OWN_LOGGERS, service_logging, set_up_logging


@pytest.fixture
def restore_levels() -> Iterator[None]:
    names = (*OWN_LOGGERS, "pymodbus")
    before = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in before.items():
        logging.getLogger(n).setLevel(level)


@pytest.mark.usefixtures("restore_levels")
@pytest.mark.parametrize(
    ("verbosity", "service", "own", "pymodbus"),
    [
        (0, False, logging.WARNING, logging.CRITICAL),  # a command: warnings only
        (0, True, logging.INFO, logging.CRITICAL),  # a service: its info lines
        (1, True, logging.DEBUG, logging.CRITICAL),  # -v: our debug lines, no hex dumps
        (2, True, logging.DEBUG, logging.DEBUG),  # -vv: the protocol dumps too
    ],
)
def test_each_verbosity_logs_what_it_says(
    verbosity: int, service: bool, own: int, pymodbus: int
) -> None:
    set_up_logging(verbosity)
    if service:
        service_logging()
    for name in OWN_LOGGERS:
        assert logging.getLogger(name).getEffectiveLevel() == own, name
    assert logging.getLogger("pymodbus").getEffectiveLevel() == pymodbus


@pytest.mark.usefixtures("restore_levels")
async def test_an_agent_logs_each_dispatch_decision_at_info(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    set_up_logging(0)
    service_logging()
    caplog.set_level(logging.INFO, logger="edge")
    async with simulated_house() as house, observer(broker_files) as obs:
        config = site_config(house, broker_files, tmp_path / "spool.sqlite")
        async with EdgeAgent(config, house.clock, password=_password(broker_files)):
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 2)
            now = house.clock.now()
            cmd = Dispatch(ts=now, battery_power_w=-2000.0, expires_ts=now + 600)
            await _dispatch(obs, cmd.model_dump_json())
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert f"dispatch {cmd.id}: accepted, battery -2000 W" in lines
