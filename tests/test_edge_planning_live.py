"""Planning at the edge, live: a real agent over a real Mosquitto and a simulated house over
Modbus TCP plans from the coordinator's forecast, bids by its plan and keeps a reservation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from broker import topics
from broker.messages import Bid, Forecast, Reservation
from broker.mosquitto import BrokerFiles, MosquittoProcess
from edge.agent import EdgeAgent
from tests.test_edge_agent import SITE, _password, observer, simulated_house, site_config

MARKET = {"interval_s": 60, "gate_s": 10, "bid_lead_s": 30}
STEPS = 48


async def test_the_agent_plans_bids_by_its_plan_and_keeps_a_reservation(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    async with simulated_house(speed=30.0) as house, observer(broker_files) as obs:
        config = site_config(house, broker_files, tmp_path / "spool.sqlite", market=MARKET)
        async with EdgeAgent(config, house.clock, password=_password(broker_files)) as agent:
            await obs.wait_for(lambda: len(obs.of("telemetry")) >= 2)
            now = house.clock.now()
            first = int(now // 60)
            # The coordinator's forecast: 1 kW of load, no PV, dear now and cheap later; and a
            # reservation asking the house to export 2 kW in every interval.
            forecast = Forecast(
                ts=now,
                start_ts=first * 60.0,
                step_s=60,
                pv_power_w=[0.0] * STEPS,
                load_power_w=[1000.0] * STEPS,
                price_per_kwh=[0.40] * 8 + [0.10] * (STEPS - 8),
            )
            reservation = Reservation(
                ts=now,
                start_ts=first * 60.0,
                step_s=60,
                floor_kwh=[None] * STEPS,
                import_cap_kw=[-2.0] * STEPS,
                export_cap_kw=[None] * STEPS,
            )
            await obs.bus.publish(topics.forecast_topic(SITE), forecast.model_dump_json())
            await obs.bus.publish(
                topics.site_topic(SITE, "reservation"), reservation.model_dump_json()
            )
            await obs.wait_for(lambda: agent.last_plan is not None, timeout_s=15.0)
            assert agent.last_plan is not None
            planned_for, planned = agent.last_plan
            await obs.wait_for(
                lambda: any(
                    Bid.model_validate_json(p).interval == planned_for for p in obs.of("bid")
                )
            )
            # no award comes (no coordinator clears): in the planned interval the plan drives
            await obs.wait_for(lambda: agent.controller in ("plan", "safety"), timeout_s=15.0)
            controller, setpoint = agent.controller, house.battery.setpoint_w
            net_w = agent.snapshot.net_load_w
            step = agent.plans[int(house.clock.now() // 60)]
    assert agent.stats.plans >= 1
    # the plan keeps the reservation: at most -2 kW (an export) in every step
    np.testing.assert_array_less(planned.plan.grid_kwh, -2.0 / 60.0 + 1e-6)
    # the bid for the planned interval is the plan's bid, priced at the value of storage, not
    # at the configured fixed prices
    bid = next(
        Bid.model_validate_json(p)
        for p in obs.of("bid")
        if Bid.model_validate_json(p).interval == planned_for
    )
    steps = [(s.price_per_kwh, s.quantity_kwh) for s in bid.buy] + [
        (s.price_per_kwh, s.quantity_kwh) for s in bid.sell
    ]
    expected = list(planned.bid.buy) + list(planned.bid.sell)
    np.testing.assert_allclose(steps, expected)
    assert not {p for p, _ in steps} & {
        config.market.battery_charge_price_per_kwh,
        config.market.battery_discharge_price_per_kwh,
    }
    # the battery keeps the planned exchange, an export of at least 2 kW, whatever the
    # house's load net of its PV is: the reservation honoured on the wire (the setpoint
    # follows the last reading, within a renewal step)
    assert controller in ("plan", "safety")
    assert net_w is not None
    assert step.grid_w <= -2000.0 + 1e-3
    assert setpoint == pytest.approx(net_w - step.grid_w, abs=250.0)
