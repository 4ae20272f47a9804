"""The participant's side: build the narrow model it was sent, train it, reply.

The participant never allocates the full model: it builds the architecture at
the widths of its index plan, loads the sliced tensors it received, trains with
CE + contrastive loss and sends its slices back. Its sub-model as it leaves the
round is kept in ``Context.state`` for the next round's ``z_p``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from .checkpoint import load_participant_state, save_participant_state
from .config import data_settings
from .data import DataSettings, load_partition, model_kwargs
from .models import build_model, model_class
from .protocol import ARRAYS, CONFIG, METRICS, PLAN, decode_plan, encode_plan
from .splitting import Axis, axis_positions, plan_widths
from .training import Representation, TrainSettings, train_local

PREVIOUS_ARRAYS = "msfusion.previous-arrays"
PREVIOUS_PLAN = "msfusion.previous-plan"
PREVIOUS_CONFIG = "msfusion.previous-config"
STATE_TAG = "state-tag"
"""Config entry the server adds to train messages: the run's fingerprint, tagging state files."""


def node_partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as missing:
        raise ValueError(f"node config lacks {missing.args[0]!r}; set it with --node-config") from None


def training_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Independent, reproducible seed per (run seed, round, participant)."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


def train_settings(config: Mapping[str, Any], seed: int) -> TrainSettings:
    """Local-training settings from a message's config record."""
    return TrainSettings(
        epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]),
        learning_rate=float(config["learning-rate"]),
        momentum=float(config["momentum"]),
        weight_decay=float(config["weight-decay"]),
        contrastive_weight=float(config["contrastive-weight"]),
        contrastive_temperature=float(config["contrastive-temperature"]),
        optimizer=str(config["optimizer"]),
        seed=seed,
    )


def _received_plan(content: RecordDict, model_name: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The plan sent with the message, or the full plan when none was (full-model methods)."""
    if PLAN in content.config_records:
        return decode_plan(content.config_records[PLAN])
    widths = dict(model_class(model_name).FULL_WIDTHS)  # type: ignore[attr-defined]
    return {name: torch.arange(k) for name, k in widths.items()}, widths


def representation(model: torch.nn.Module, plan: Mapping[str, torch.Tensor], widths: Mapping[str, int]) -> Representation:
    """``model``'s features placed in the global feature space: its feature group's units
    times ``feature_unit`` channels each (e.g. GPT-2's residual width counts heads)."""
    group, unit = model.feature_group, model.feature_unit  # type: ignore[attr-defined]
    index = axis_positions(Axis("features", 1, unit), widths[group], plan[group])
    return Representation(model, index, widths[group] * unit)


def _previous_representation(state: RecordDict, make_model: Callable[..., torch.nn.Module]) -> Representation | None:
    """The participant's sub-model of its previous round, if it kept one."""
    if PREVIOUS_ARRAYS not in state.array_records:
        return None
    plan, widths = decode_plan(state.config_records[PREVIOUS_PLAN])
    rate = float(state.config_records[PREVIOUS_CONFIG]["split-rate"])  # type: ignore[arg-type]
    model = make_model(plan_widths(plan), rate)
    model.load_state_dict(state.array_records[PREVIOUS_ARRAYS].to_torch_state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    return representation(model, plan, widths)


def _keep_as_previous(state: RecordDict, model: torch.nn.Module, plan: Mapping[str, torch.Tensor], widths: Mapping[str, int], rate: float) -> None:
    state[PREVIOUS_ARRAYS] = ArrayRecord(model.state_dict())
    state[PREVIOUS_PLAN] = encode_plan(plan, widths)
    state[PREVIOUS_CONFIG] = ConfigRecord({"split-rate": rate})


def _restore_previous(state: RecordDict, config: Mapping[str, Any], partition_id: int, server_round: int) -> None:
    """Fill Context.state's previous sub-model from ``participant-state-dir`` when it lacks one."""
    state_dir = str(config.get("participant-state-dir", ""))
    if not state_dir or PREVIOUS_ARRAYS in state.array_records:
        return
    found = load_participant_state(state_dir, partition_id, str(config.get(STATE_TAG, "")), server_round)
    if found is None:
        return
    _, entry = found
    state[PREVIOUS_ARRAYS] = ArrayRecord(entry["arrays"])
    state[PREVIOUS_PLAN] = ConfigRecord(entry["plan"])
    state[PREVIOUS_CONFIG] = ConfigRecord({"split-rate": float(entry["rate"])})


def _persist_previous(state: RecordDict, config: Mapping[str, Any], partition_id: int, server_round: int) -> None:
    """Write Context.state's previous sub-model to ``participant-state-dir`` (if set), atomically."""
    state_dir = str(config.get("participant-state-dir", ""))
    if not state_dir:
        return
    save_participant_state(
        state_dir,
        partition_id,
        str(config.get(STATE_TAG, "")),
        server_round,
        state.array_records[PREVIOUS_ARRAYS].to_torch_state_dict(),
        dict(state.config_records[PREVIOUS_PLAN]),
        float(state.config_records[PREVIOUS_CONFIG]["split-rate"]),  # type: ignore[arg-type]
        int(config.get("checkpoint-every", 0)),  # type: ignore[arg-type]
    )


class SimulatedDropout(RuntimeError):
    """This participant plays a device that failed this round."""


def simulate_faults(config: Mapping[str, Any], server_round: int, partition_id: int) -> None:
    """Non-ideal network, for experiments: drop out or straggle with the configured rates.

    One seeded draw per (run seed, round, participant): below ``dropout-rate``
    the participant fails (an error reply); within the next ``straggler-rate``
    it first sleeps past ``round-timeout``, so its reply comes too late.
    """
    dropout, straggler = float(config.get("dropout-rate", 0.0)), float(config.get("straggler-rate", 0.0))
    if dropout == 0 and straggler == 0:
        return
    draw = np.random.default_rng([int(config["seed"]), server_round, partition_id, 0xFA17]).random()
    if draw < dropout:
        raise SimulatedDropout(f"simulated dropout (dropout-rate {dropout})")
    if draw < dropout + straggler:
        time.sleep(float(config["round-timeout"]) + 2.0)


def participant_model_factory(config: Mapping[str, Any], settings: DataSettings) -> Callable[..., torch.nn.Module]:
    """``make_model(widths, rate)``: how a participant builds its narrow model from the run config.

    The FedDF server rebuilds the participants' models with it, so its teachers
    run exactly as the participants trained them (``classifier-scaler`` included).
    """
    return partial(
        build_model, str(config["model"]), classifier_scaling=bool(config["classifier-scaler"]), **model_kwargs(settings)
    )


def train(message: Message, context: Context) -> Message:
    """Handle one train message: narrow model in, trained narrow model out."""
    content = message.content
    config = content.config_records[CONFIG]
    partition_id, num_partitions = node_partition(context)
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    rate = float(config.get("split-rate", 1.0))  # type: ignore[arg-type]
    simulate_faults(config, server_round, partition_id)
    model_name = str(config["model"])
    settings = data_settings({**config, "data-dir": context.node_config.get("data-dir", config["data-dir"])})
    make_model = participant_model_factory(config, settings)

    plan, full_widths = _received_plan(content, model_name)
    model = make_model(plan_widths(plan), rate)
    model.load_state_dict(content.array_records[ARRAYS].to_torch_state_dict())

    dataset = load_partition(settings, partition_id, num_partitions)
    local = train_settings(config, training_seed(settings.seed, server_round, partition_id))
    current = representation(model, plan, full_widths)
    previous = None
    if local.contrastive_weight > 0:
        _restore_previous(context.state, config, partition_id, server_round)
        previous = _previous_representation(context.state, make_model)

    metrics = train_local(model, dataset, local, current, previous)
    if local.contrastive_weight > 0:
        _keep_as_previous(context.state, model, plan, full_widths, rate)
        _persist_previous(context.state, config, partition_id, server_round)

    metrics["partition-id"] = float(partition_id)
    reply = RecordDict({ARRAYS: ArrayRecord(model.state_dict()), METRICS: MetricRecord(metrics)})
    return Message(reply, reply_to=message)


def query(message: Message, context: Context) -> Message:
    """Tell the server this node's partition id (its rank) and, if set, its split-ratio budget."""
    partition_id, num_partitions = node_partition(context)
    profile = ConfigRecord({"partition-id": partition_id, "num-partitions": num_partitions})
    if "split-ratio" in context.node_config:
        profile["split-ratio"] = float(context.node_config["split-ratio"])  # type: ignore[arg-type]
    return Message(RecordDict({"profile": profile}), reply_to=message)
