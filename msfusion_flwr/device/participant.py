"""The ClientApp's handlers: build the narrow model a train message describes, train it, reply.

The participant never allocates the full model: it builds the architecture at
the widths of its index plan, loads the sliced tensors it received, trains with
CE + contrastive loss (:mod:`.training`) and sends its slices back. Its
sub-model as it leaves the round is kept for the next round's ``z_p``
(:mod:`.state`). Everything it reads from the message's config record arrives
typed (:class:`~msfusion_flwr.protocol.TrainInstructions`).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from ..data import DataSettings, load_partition, model_kwargs
from ..engine.slicing import plan_widths
from ..models import model_class, model_factory
from ..models.placement import resolve_device
from ..protocol import ARRAYS, CONFIG, METRICS, PLAN, WEIGHT_KEY, TrainInstructions, decode_plan, encode_profile
from .faults import attack_update, is_attacker, simulate_faults
from .losses import representation
from .privacy import clip_update
from .state import keep_as_previous, persist_previous, previous_representation, restore_previous
from .training import train_local


def node_partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as missing:
        raise ValueError(f"node config lacks {missing.args[0]!r}; set it with --node-config") from None


def node_data(data: DataSettings, context: Context) -> DataSettings:
    """The run's data settings with this node's own ``data-dir`` (node config), if it has one."""
    if "data-dir" not in context.node_config:
        return data
    return dataclasses.replace(data, data_dir=str(context.node_config["data-dir"]))


def training_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Independent, reproducible seed per (run seed, round, participant)."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


def received_plan(content: RecordDict, model_name: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The plan sent with the message, or the full plan when none was (full-model methods)."""
    if PLAN in content.config_records:
        return decode_plan(content.config_records[PLAN])
    widths = dict(model_class(model_name).FULL_WIDTHS)  # type: ignore[attr-defined]
    return {name: torch.arange(k) for name, k in widths.items()}, widths


def train(message: Message, context: Context) -> Message:
    """Handle one train message: narrow model in, trained narrow model out.

    Reports, besides what local training measures, ``handler-time-s``: this
    handler's wall time up to the reply (decoding, the narrow model, the
    partition, training, the reply's arrays), so that a device's own work
    beyond training can be told from the engine's.
    """
    started = time.perf_counter()
    content = message.content
    run = TrainInstructions.from_record(content.config_records[CONFIG])
    partition_id, num_partitions = node_partition(context)
    simulate_faults(run.faults, run.round_timeout, run.data.seed, run.server_round, partition_id)
    device = resolve_device(run.local.device)
    data = node_data(run.data, context)
    make_model = model_factory(run.model, **model_kwargs(data))

    plan, full_widths = received_plan(content, run.model.name)
    model = make_model(plan_widths(plan), run.split_rate)
    model.load_state_dict(content.array_records[ARRAYS].to_torch_state_dict())
    attacker = is_attacker(run.faults, run.data.seed, partition_id, num_partitions)
    needs_received = attacker or run.privacy.clip > 0  # an honest participant without DP keeps one copy
    received = {k: v.detach().clone() for k, v in model.state_dict().items()} if needs_received else None

    dataset = load_partition(data, partition_id, num_partitions)
    local = dataclasses.replace(run.local, seed=training_seed(data.seed, run.server_round, partition_id))
    current = representation(model, plan, full_widths)
    previous = None
    if local.keeps_previous:
        restore_previous(context.state, run, partition_id)
        previous = previous_representation(context.state, make_model)

    metrics = train_local(model, dataset, local, current.to(device), previous and previous.to(device))
    model.cpu()  # what is kept and sent are CPU tensors, wherever training ran
    if local.keeps_previous:
        keep_as_previous(context.state, model, plan, full_widths, run.split_rate)
        persist_previous(context.state, run, partition_id)

    metrics["partition-id"] = float(partition_id)
    sent = model.state_dict()
    if received is not None and run.privacy.clip > 0:
        sent = clip_update(received, sent, run.privacy.clip)
    if received is not None and attacker:  # a simulated attacker (attack, attack-fraction)
        sent, metrics[WEIGHT_KEY] = attack_update(
            run.faults, received, sent, metrics[WEIGHT_KEY], run.data.seed, run.server_round, partition_id
        )
    arrays = ArrayRecord(sent)
    metrics["handler-time-s"] = time.perf_counter() - started
    return Message(RecordDict({ARRAYS: arrays, METRICS: MetricRecord(metrics)}), reply_to=message)


def query(message: Message, context: Context) -> Message:
    """Tell the server this node's partition id (its rank) and, if set, its split-ratio budget."""
    partition_id, num_partitions = node_partition(context)
    ratio = context.node_config.get("split-ratio")
    return Message(encode_profile(partition_id, num_partitions, None if ratio is None else float(ratio)), reply_to=message)  # type: ignore[arg-type]
