"""Simulated non-ideal networks, for experiments: a participant that drops out or straggles."""

from __future__ import annotations

import time

import numpy as np

from ..config import FaultSettings


class SimulatedDropout(RuntimeError):
    """This participant plays a device that failed this round."""


def simulate_faults(faults: FaultSettings, round_timeout: float, seed: int, server_round: int, partition_id: int) -> None:
    """Drop out or straggle with the configured rates.

    One seeded draw per (run seed, round, participant): below ``dropout-rate``
    the participant fails (an error reply); within the next ``straggler-rate``
    it first sleeps past ``round-timeout``, so its reply comes too late.
    """
    dropout, straggler = faults.dropout_rate, faults.straggler_rate
    if dropout == 0 and straggler == 0:
        return
    draw = np.random.default_rng([seed, server_round, partition_id, 0xFA17]).random()
    if draw < dropout:
        raise SimulatedDropout(f"simulated dropout (dropout-rate {dropout})")
    if draw < dropout + straggler:
        time.sleep(round_timeout + 2.0)
