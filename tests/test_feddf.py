"""FedDF: the server's held-out slice, ensemble distillation, its wiring and an end-to-end run."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from torch.utils.data import Dataset, TensorDataset

from msfusion_flwr.apps import run_experiment
from msfusion_flwr.config import ConfigError, DistillSettings, RunConfig, resolve_config
from msfusion_flwr.data import DataSettings, load_partition, load_server_set, partition_indices
from msfusion_flwr.data.fashion_mnist import load_fashion_mnist, normalize_images
from msfusion_flwr.data.partitioning import make_partitioner, server_split, training_subset
from msfusion_flwr.engine import SplitSpec, plan_widths
from msfusion_flwr.engine.policies import StaticPrefix
from msfusion_flwr.experiments.loopback import LoopbackGrid
from msfusion_flwr.models import FashionCNN, build_model
from msfusion_flwr.protocol import ARRAYS, CONFIG, METRICS, PLAN, SERVER_ROUND, TrainInstructions, client_config, decode_plan
from msfusion_flwr.server.distillation import ensemble_logits, kl_to_teacher, teacher_mode
from msfusion_flwr.server.feddf import EnsembleDistillation
from msfusion_flwr.server.methods import make_strategy
from msfusion_flwr.server.nodes import Budgets
from msfusion_flwr.server.reporting import MODEL_FILE, read_metrics
from msfusion_flwr.server.strategy import SubmodelStrategy

FEDDF = {"method": "feddf", "server-data-fraction": 0.05}


@pytest.fixture(autouse=True)
def clear_caches():
    partition_indices.cache_clear()
    yield
    partition_indices.cache_clear()


# --------------------------------------------------------------------------- (a) the server slice


def reference_partitions(settings: DataSettings, num_partitions: int) -> list[np.ndarray]:
    """Fashion-MNIST partitions as computed before server-data-fraction existed."""
    from datasets import Dataset as HFDataset

    _, labels = load_fashion_mnist(settings.data_dir)["train"]
    subset = training_subset(len(labels), settings.data_fraction, settings.seed)
    partitioner = make_partitioner(settings, num_partitions)
    partitioner.dataset = HFDataset.from_dict({"label": labels.numpy()[subset], "index": subset})
    return [np.asarray(partitioner.load_partition(p)["index"], dtype=np.int64) for p in range(num_partitions)]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_server_slice_is_disjoint_from_every_partition_and_deterministic(partitioner):
    """The slice is a seeded round(f n) of the data-fraction subset, in no partition; the rest is partitioned."""
    settings = DataSettings(partitioner=partitioner, dirichlet_alpha=1.0, data_fraction=0.05, seed=3, server_fraction=0.1)
    subset = training_subset(60000, 0.05, 3)
    pool, held = server_split(60000, 0.05, 0.1, 3)
    assert len(held) == round(0.1 * len(subset)) and set(held) <= set(subset)
    assert set(pool) == set(subset) - set(held)
    parts = partition_indices(settings, 4)
    in_parts = np.concatenate(parts)
    assert len(in_parts) == len(set(in_parts.tolist()))  # partitions disjoint
    assert not set(in_parts.tolist()) & set(held.tolist())
    assert set(in_parts.tolist()) == set(pool.tolist())  # iid and Dirichlet use every pool example
    # deterministic, and the same slice whatever the partitioner or number of partitions
    partition_indices.cache_clear()
    again = partition_indices(DataSettings(**settings.__dict__), 4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert np.array_equal(server_split(60000, 0.05, 0.1, 3)[1], held)
    assert not np.array_equal(server_split(60000, 0.05, 0.1, 4)[1], held)  # another seed, another slice
    assert not np.array_equal(server_split(100, 1.0, 0.1, 3)[1], server_split(100, 1.0, 0.1, 4)[1])
    # load_server_set: those rows, normalised, labels present
    images, labels = load_fashion_mnist("")["train"]
    x, y = load_server_set(settings).tensors
    idx = torch.from_numpy(held)
    assert torch.equal(x, normalize_images(images[idx])) and torch.equal(y, labels[idx])


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_no_server_slice_leaves_partitions_unchanged(partitioner):
    """server-data-fraction = 0: exactly the partitions of before; > 0: different ones."""
    settings = DataSettings(partitioner=partitioner, dirichlet_alpha=1.0, data_fraction=0.05, seed=3)
    reference = reference_partitions(settings, 4)
    assert all(np.array_equal(a, b) for a, b in zip(partition_indices(settings, 4), reference))
    assert len(load_server_set(settings)) == 0
    held_out = partition_indices(DataSettings(**{**settings.__dict__, "server_fraction": 0.1}), 4)
    assert sum(map(len, held_out)) < sum(map(len, reference))


def test_participants_hold_out_the_same_slice_as_the_server():
    """The client config carries server-data-fraction: a participant's data settings equal the server's."""
    for method in ("feddf", "heterofl", "fedavg"):
        config = RunConfig.from_mapping({"method": method, "server-data-fraction": 0.05, "data-fraction": 0.05})
        record = client_config(config)
        record[SERVER_ROUND] = 1
        on_node = TrainInstructions.from_record(record).data
        assert on_node == config.data and on_node.server_fraction == 0.05
        _, held = server_split(60000, 0.05, 0.05, 0)
        x, _ = load_partition(on_node, 0, 3).tensors
        server_x, _ = load_server_set(on_node).tensors
        assert len(x) > 0 and len(server_x) == len(held)


# --------------------------------------------------------------------------- (b), (c) distillation


SMALL = {"conv1": 8, "conv2": 16, "conv3": 16, "fc": 32}


def hand_made_round(
    server_set: Dataset, distill: DistillSettings, strategy_cls: type = EnsembleDistillation
) -> tuple[SubmodelStrategy, list[Message], list[torch.nn.Module]]:
    """A small global model, two participants (r = 0.5 and 1) whose replies are their own random models.

    Built with the classifier Scaler on, where running the teachers as trained matters most.
    """
    torch.manual_seed(0)
    global_model = build_model("cnn", SMALL)
    spec = SplitSpec.from_model(global_model)
    kwargs = {"min_available_nodes": 2, "seed": 7}
    if strategy_cls is EnsembleDistillation:
        kwargs.update(make_model=partial(build_model, "cnn", classifier_scaling=True), server_set=server_set, distill=distill)
    strategy = strategy_cls(spec, StaticPrefix(), Budgets(0.5, (0.5, 1.0)), **kwargs)
    grid = LoopbackGrid(2)
    messages = strategy.configure_train(1, ArrayRecord(global_model.state_dict()), client_config(RunConfig()), grid)
    replies, models = [], []
    for message in messages:
        plan, _ = decode_plan(message.content.config_records[PLAN])
        rate = float(message.content.config_records[CONFIG]["split-rate"])
        torch.manual_seed(100 + message.metadata.dst_node_id)
        model = build_model("cnn", plan_widths(plan), rate, classifier_scaling=True)
        models.append(model)
        content = RecordDict({ARRAYS: ArrayRecord(model.state_dict()), METRICS: MetricRecord({"num-examples": 10.0 * (1 + len(replies)), "train-loss": 1.0, "partition-id": float(message.metadata.dst_node_id)})})
        replies.append(Message(content, reply_to=message))
    return strategy, replies, models


def fused(strategy: SubmodelStrategy, replies: list[Message]) -> FashionCNN:
    arrays, _ = strategy.aggregate_train(1, replies)
    model = build_model("cnn", SMALL)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def server_inputs(n: int = 256) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_distillation_moves_the_fused_model_toward_the_ensemble():
    """KL(teacher || student) on the server set falls; the student starts from the overlap-aware aggregate."""
    x = server_inputs()
    server_set = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    strategy, replies, models = hand_made_round(server_set, DistillSettings(steps=30, batch_size=64, learning_rate=1e-2))
    teacher = ensemble_logits(models, x)
    reference, _, _ = hand_made_round(server_set, DistillSettings(), strategy_cls=SubmodelStrategy)
    before = fused(reference, replies)
    after = fused(strategy, replies)
    kl_before, kl_after = kl_to_teacher(before, teacher, x), kl_to_teacher(after, teacher, x)
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)
    # the teachers are the participants' own models, run as trained (Scaler on, r = 0.5 and 1)
    assert [m.head_scaler.rate for m in models] == [0.5, 1.0]
    assert teacher_mode(models[0]).head_scaler.training and not models[0].fc_norm.training
    # with a vanishing learning rate the result is HeteroFL's fusion itself
    frozen, _, _ = hand_made_round(server_set, DistillSettings(steps=2, learning_rate=1e-12))
    for key, value in fused(frozen, replies).state_dict().items():
        torch.testing.assert_close(value, before.state_dict()[key], rtol=0, atol=1e-6)
    # the round's metrics and server cost carry the distillation
    traffic = strategy.meter.rounds[1]
    assert traffic.participants == [0, 1] and traffic.server_costs["distill_flops"] > 0


class PoisonLabel:
    """A label that fails on any use."""

    def __getattr__(self, name):
        raise AssertionError("a label was read")


class InputsAndPoisonLabels(Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], PoisonLabel()


def test_distillation_never_reads_labels():
    """The same inputs with other random labels, or labels that fail when read, give the identical model."""
    x = server_inputs(128)
    results = []
    for labels in (
        torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(2)),
        torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(3)),
        None,
    ):
        server_set = InputsAndPoisonLabels(x) if labels is None else TensorDataset(x, labels)
        strategy, replies, _ = hand_made_round(server_set, DistillSettings(steps=5, batch_size=32))
        results.append(fused(strategy, replies).state_dict())
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])
    # and the distillation did change the model (the comparison is not vacuous)
    reference, replies, _ = hand_made_round(TensorDataset(x), DistillSettings(), strategy_cls=SubmodelStrategy)
    assert any(not torch.equal(results[0][k], v) for k, v in fused(reference, replies).state_dict().items())


# --------------------------------------------------------------------------- wiring, config, end to end


@pytest.mark.parametrize("scaling", ["scaler", "none", "calibrated"])
def test_feddf_teachers_are_built_as_the_participants_trained_them(scaling):
    """The server rebuilds each teacher with the run's output scaling: head Scaler rate r with the Scaler, else 1."""
    enabled = scaling == "scaler"
    config = RunConfig.from_mapping({**FEDDF, "output-scaling": scaling})
    server_set = TensorDataset(server_inputs(8), torch.zeros(8, dtype=torch.long))
    strategy = make_strategy(config, SplitSpec.from_model(build_model("cnn")), server_set=server_set)
    teacher = strategy.make_model(SMALL, 0.25)
    assert teacher.head_scaler.rate == (0.25 if enabled else 1.0)
    assert teacher.fc.weight.shape == (SMALL["fc"], SMALL["conv3"])


def test_feddf_sends_heterofl_sub_models_sized_by_the_budgets():
    """Participants get static-prefix slices at their budget and plain cross-entropy."""
    config = RunConfig.from_mapping({**FEDDF, "budgets": "0.25,0.5,1.0"})
    global_model = build_model("cnn")
    server_set = TensorDataset(server_inputs(8), torch.zeros(8, dtype=torch.long))
    strategy = make_strategy(config, SplitSpec.from_model(global_model), server_set=server_set)
    assert isinstance(strategy, EnsembleDistillation) and isinstance(strategy.policy, StaticPrefix)
    grid = LoopbackGrid(3)
    messages = strategy.configure_train(2, ArrayRecord(global_model.state_dict()), client_config(config), grid)
    for message in messages:
        pid = strategy.profile(message.metadata.dst_node_id).partition_id
        plan, widths = decode_plan(message.content.config_records[PLAN])
        budget = (0.25, 0.5, 1.0)[pid]
        assert message.content.config_records[CONFIG]["split-rate"] == budget
        assert message.content.config_records[CONFIG]["contrastive-weight"] == 0.0
        assert all(plan[g].tolist() == list(range(round(budget * k))) for g, k in widths.items())


def test_feddf_without_a_server_slice_is_a_config_error():
    """method = feddf needs server-data-fraction > 0: one line naming the key, before Ray starts."""
    with pytest.raises(ConfigError) as info:
        resolve_config({"method": "feddf"})
    assert "'server-data-fraction'" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="'server-data-fraction'"):
        run_experiment({"method": "feddf", "server-data-fraction": 0.0})
    assert resolve_config(FEDDF)["server-data-fraction"] == 0.05
    assert resolve_config({"server-data-fraction": 0.05})["method"] == "msfusion"  # any method may hold a slice out


def test_feddf_trains_through_the_simulation_engine(tmp_path):
    """2 rounds, 3 participants with budgets 0.25/0.5/0.25: learns, every reply distilled, cost recorded."""
    out = run_experiment(
        {
            **FEDDF,
            "distill-steps": 5,
            "num-server-rounds": 2,
            "data-fraction": 0.05, "test-examples": 1000,
            "partitioner": "iid",
            "budgets": "0.25,0.5",
            "min-available-nodes": 3,
            "output-dir": str(tmp_path / "feddf"),
        },
        num_supernodes=3,
    )
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["accuracy"] > 0.2  # chance is 0.1
    assert all(r["participants"] == [0, 1, 2] and r["failures"] == [] for r in rows[1:])
    assert all(r["server_costs"]["distill_flops"] > 0 and r["server_costs"]["distill_time_s"] > 0 for r in rows[1:])
    state = torch.load(out / MODEL_FILE)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in build_model("cnn").state_dict().items()}
