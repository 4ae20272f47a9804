"""Differential privacy for partial updates: the Gaussian mechanism over overlapping sub-models, and its epsilon.

The mechanism (``dp-clip`` = C, ``dp-noise-multiplier`` = z):

* every participant clips its update, the sub-model it trained minus the slice
  it received (floating-point tensors, one L2 norm over all of them), to norm C
  on the device (:func:`msfusion_flwr.device.privacy.clip_update`);
* the server sums, per element, the values of the participants that held it,
  adds Gaussian noise of std z·C to every sum and divides by the number of
  holders h (equal weights): the element's noise is z·C/h, calibrated to its
  holders. Integer buffers are not updated.

Privacy unit and adjacency: one participant's data (user level), *replace one*:
which nodes take part and the plan the server cuts for them are public (the
server chooses them; h follows from them), what a participant's data make it
send is private. Replacing one participant's data moves the vector of
per-element sums by at most 2C in L2 (its clipped update is one vector over the
elements it held), so each round is a Gaussian mechanism with noise multiplier
z/2 relative to that sensitivity; with ``fraction-train`` < 1 it is applied to a
sample of n of the N nodes drawn without replacement. Google's ``dp-accounting``
(its RDP accountant, for REPLACE_ONE) composes the rounds and gives epsilon at
``dp-delta``. Why the run config needs the plain unweighted mean: example
counts are private (weights would leak them and break the sensitivity bound),
and a clipping bound taken from the round's updates (``clip-updates``) is
data-dependent.
"""

from __future__ import annotations

import math
import secrets

import dp_accounting
import torch
from dp_accounting.rdp import rdp_privacy_accountant

from ..config import PrivacySettings
from ..engine.robust import AggregationRule


def private_rule(rule: AggregationRule, privacy: PrivacySettings) -> AggregationRule:
    """``rule`` with the mechanism's noise: std z·C on every element's sum over its holders."""
    if not privacy.enabled:
        return rule
    return AggregationRule(rule.statistic, rule.trim_fraction, rule.weighting, rule.weight_cap, rule.clip, privacy.noise_multiplier * privacy.clip)


def round_event(noise_multiplier: float, sampled: int, population: int) -> dp_accounting.DpEvent:
    """One round as a DP event under replace-one adjacency (sensitivity 2C, noise z·C: multiplier z/2)."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    if sampled >= population:
        return gaussian
    return dp_accounting.SampledWithoutReplacementDpEvent(population, sampled, gaussian)


def epsilon(noise_multiplier: float, rounds: int, sampled: int, population: int, delta: float) -> float:
    """The (epsilon, ``delta``) guarantee after ``rounds`` rounds of ``sampled`` of ``population`` participants."""
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    accountant = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(round_event(noise_multiplier, sampled, population), rounds)
    return float(accountant.get_epsilon(delta))


def noise_generator() -> torch.Generator:
    """A generator for one round's noise, seeded from the operating system's entropy.

    Not from the run seed: noise anyone can recompute from the config could be
    subtracted. So runs with noise are not bit-reproducible, and a resumed run
    draws fresh noise (its epsilon counts every round, before and after).
    """
    return torch.Generator().manual_seed(secrets.randbits(63))
