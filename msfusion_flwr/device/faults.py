"""Simulated non-ideal networks and hostile participants, for experiments.

A participant drops out or straggles (:func:`simulate_faults`), or, if it is
one of the run's attackers (:func:`is_attacker`), sends a manipulated update
(:func:`attack_update`) after training honestly.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch

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


def is_attacker(faults: FaultSettings, seed: int, partition_id: int, num_partitions: int) -> bool:
    """Whether this partition is one of the run's attackers.

    ``round(attack-fraction * num_partitions)`` partitions, the first of a
    permutation seeded by the run seed: the same partitions attack in every
    round, as a hostile device would.
    """
    if faults.attack == "none" or faults.attack_fraction == 0:
        return False
    count = round(faults.attack_fraction * num_partitions)
    attackers = np.random.default_rng([seed, 0xA77AC]).permutation(num_partitions)[:count]
    return partition_id in set(attackers.tolist())


def attack_update(
    faults: FaultSettings,
    received: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    num_examples: float,
    seed: int,
    server_round: int,
    partition_id: int,
) -> tuple[dict[str, torch.Tensor], float]:
    """What an attacker sends instead of its honest update ``trained`` (and the example count it claims).

    With s = ``attack-scale`` and delta = trained - received, per floating tensor:

    * ``scale``: received + s * delta (an outsized update);
    * ``sign-flip``: received - s * delta (pushes the model back up its loss);
    * ``random``: received + noise, Gaussian with s times the RMS of the
      tensor's honest delta (seeded per round and participant);
    * ``inflate-count``: the sign-flipped update, claiming s times its example count.

    Integer buffers (BatchNorm's counters) are sent as trained.
    """
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, server_round, partition_id, 0xA77AC]).generate_state(1)[0]))
    scale = faults.attack_scale
    sent = {}
    for key, value in trained.items():
        if not value.is_floating_point():
            sent[key] = value
            continue
        delta = value - received[key]
        if faults.attack == "scale":
            sent[key] = received[key] + scale * delta
        elif faults.attack in ("sign-flip", "inflate-count"):
            sent[key] = received[key] - scale * delta
        elif faults.attack == "random":
            rms = delta.square().mean().sqrt()
            sent[key] = received[key] + scale * rms * torch.randn(value.shape, generator=generator, dtype=value.dtype)
        else:
            raise ValueError(f"no attack {faults.attack!r}")
    claimed = num_examples * scale if faults.attack == "inflate-count" else num_examples
    return sent, claimed
