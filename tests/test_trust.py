"""Reference-scored aggregation (server/trust.py): trust and rescaling against their definitions, and what a
hostile update can still do to the fused model (nothing, once its trust is 0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message
from test_reply_fuzz import WIDTHS, honest_metrics, reply_to
from torch.utils.data import TensorDataset

from msfusion_flwr.config import ConfigError, RunConfig
from msfusion_flwr.engine import SplitSpec
from msfusion_flwr.experiments.loopback import LoopbackGrid
from msfusion_flwr.models import build_model
from msfusion_flwr.protocol import ARRAYS, client_config
from msfusion_flwr.server.methods import make_strategy
from msfusion_flwr.server.trust import ReferenceTrust, rescaled, trust_and_scale

NODES = 5
ATTACKER = 1
STEPS = 2  # honest_metrics' train-steps: the references take as many
REFERENCE = {"method": "msfusion", "split-ratio": 0.5, "min-available-nodes": NODES, "aggregation-weights": "reference",
             "server-data-fraction": 0.05, "contrastive-weight": 0.0}  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
def test_trust_and_scale_follow_their_definition(seed):
    rng = np.random.default_rng(seed)
    sent = {"w": torch.tensor(rng.normal(size=(3, 4)), dtype=torch.float32), "b": torch.tensor(rng.normal(size=5), dtype=torch.float32),
            "count": torch.tensor(7)}  # fmt: skip
    received = {k: v + torch.tensor(rng.normal(size=v.shape), dtype=v.dtype) if v.is_floating_point() else torch.tensor(99) for k, v in sent.items()}
    reference = {k: v + torch.tensor(rng.normal(size=v.shape), dtype=v.dtype) if v.is_floating_point() else v for k, v in sent.items()}
    d = np.concatenate([(received[k] - sent[k]).double().numpy().ravel() for k in ("w", "b")])
    r = np.concatenate([(reference[k] - sent[k]).double().numpy().ravel() for k in ("w", "b")])
    trust, scale = trust_and_scale(sent, received, reference)
    assert trust == pytest.approx(max(0.0, d @ r / np.linalg.norm(d) / np.linalg.norm(r)), abs=1e-6)
    assert scale == pytest.approx(np.linalg.norm(r) / np.linalg.norm(d), rel=1e-6)
    flipped = {k: sent[k] - 10 * (reference[k] - sent[k]) if sent[k].is_floating_point() else sent[k] for k in sent}
    assert trust_and_scale(sent, flipped, reference)[0] == 0.0  # pointing away from the reference: no weight at all
    big = rescaled(sent, reference, 1e6)  # the reference's own direction, a million times larger: full trust, scaled back
    assert trust_and_scale(sent, big, reference)[0] == pytest.approx(1.0)
    back = rescaled(sent, big, trust_and_scale(sent, big, reference)[1])
    assert all(torch.allclose(back[k], reference[k], atol=1e-3) for k in ("w", "b")) and back["count"] == 7
    assert trust_and_scale(sent, sent, reference) == (0.0, 0.0)  # a participant that sends back what it got


def round_one(replies_of):
    """Round 1 of a ReferenceTrust strategy on NODES loopback nodes; ``replies_of(strategy, messages)`` -> replies.
    Returns the fused state and the strategy."""
    config = RunConfig.from_mapping(REFERENCE)
    torch.manual_seed(0)
    model = build_model("cnn", WIDTHS)
    generator = torch.Generator().manual_seed(1)
    server_set = TensorDataset(torch.randn(40, 1, 28, 28, generator=generator), torch.randint(0, 10, (40,), generator=generator))
    strategy = make_strategy(config, SplitSpec.from_model(model), server_set=server_set)
    assert isinstance(strategy, ReferenceTrust)
    grid = LoopbackGrid(NODES)
    strategy.nodes.learn(grid, grid.get_node_ids())
    messages = list(strategy.configure_train(1, ArrayRecord(model.state_dict()), client_config(config), grid))
    merged, _ = strategy.aggregate_train(1, replies_of(strategy, messages))
    return merged.to_torch_state_dict(), strategy


def replies(strategy: ReferenceTrust, messages: list[Message], attacker: str | None, skip: int | None = None) -> list[Message]:
    """Honest replies (half the way to the node's reference, plus noise); the ATTACKER's sign-flipped x10 or
    scaled x1e4, or absent (``attacker`` None); node ``skip`` does not reply."""
    out = []
    for message in messages:
        node = message.metadata.dst_node_id
        if node == skip or (node == ATTACKER and attacker is None):
            continue
        sent = message.content.array_records[ARRAYS].to_torch_state_dict()
        reference = strategy.reference(1, node, strategy._plans[node], sent, STEPS)
        rng = np.random.default_rng(node)
        arrays = {}
        for key, value in sent.items():
            if not value.is_floating_point():
                arrays[key] = reference[key].numpy()
                continue
            delta = reference[key] - value
            if node == ATTACKER and attacker == "sign-flip":
                arrays[key] = (value - 10 * delta).numpy()
            elif node == ATTACKER and attacker == "scale":
                arrays[key] = (value + 1e4 * delta).numpy()
            else:
                arrays[key] = (value + 0.5 * delta + 0.01 * torch.tensor(rng.normal(size=tuple(value.shape)), dtype=value.dtype)).numpy()
        out.append(reply_to(message, arrays, honest_metrics(node)))
    return out


def test_a_sign_flipped_update_gets_no_weight_and_leaves_no_trace_in_the_fused_model():
    attacked, strategy = round_one(lambda s, m: replies(s, m, "sign-flip"))
    assert strategy.last_trust[ATTACKER] == 0.0
    assert all(t > 0.5 for node, t in strategy.last_trust.items() if node != ATTACKER), strategy.last_trust
    clean, _ = round_one(lambda s, m: replies(s, m, None))  # the attacker never replied
    for key, value in clean.items():
        assert torch.equal(attacked[key], value), key


def test_an_outsized_update_in_the_honest_direction_moves_the_model_no_further_than_its_reference():
    scaled, strategy = round_one(lambda s, m: replies(s, m, "scale"))
    assert strategy.last_trust[ATTACKER] > 0.99
    clean, _ = round_one(lambda s, m: replies(s, m, None))
    initial = build_model("cnn", WIDTHS).state_dict()
    for key, value in clean.items():
        if value.is_floating_point():  # the 1e4-times update ends up no further from the clean result than an honest step
            assert (scaled[key] - value).abs().max() <= 2 * (value - initial[key]).abs().max() + 1e-6, key


def test_without_any_trusted_update_the_model_keeps_its_values():
    def all_hostile(strategy, messages):
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            sent = message.content.array_records[ARRAYS].to_torch_state_dict()
            reference = strategy.reference(1, node, strategy._plans[node], sent, STEPS)
            arrays = {k: (v - (reference[k] - v)).numpy() if v.is_floating_point() else v.numpy() for k, v in sent.items()}
            out.append(reply_to(message, arrays, honest_metrics(node)))
        return out

    fused, strategy = round_one(all_hostile)
    assert set(strategy.last_trust.values()) == {0.0}
    torch.manual_seed(0)
    initial = build_model("cnn", WIDTHS).state_dict()  # what round_one started from
    for key, value in initial.items():
        assert torch.equal(fused[key], value), key


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"server-data-fraction": 0.0}, "server-data-fraction"),
        ({"aggregation": "median"}, "aggregation"),
        ({"clip-updates": 1.0}, "clip-updates"),
        ({"method": "feddf"}, "method"),
    ],
)
def test_reference_weights_need_server_data_and_no_other_reweighting(overrides, named):
    with pytest.raises(ConfigError, match=f"aggregation-weights.*got {named}|server-data-fraction"):
        RunConfig.from_mapping({**REFERENCE, **overrides})


def test_references_train_at_the_rate_of_their_round(monkeypatch):
    """Under a cosine schedule the server's references take the round's learning rate, as its participants do."""
    from msfusion_flwr.server import trust

    built = []
    make_optimizer = trust.make_optimizer
    monkeypatch.setattr(trust, "make_optimizer", lambda model, name, rate, *rest: built.append(rate) or make_optimizer(model, name, rate, *rest))
    config = RunConfig.from_mapping({**REFERENCE, "learning-rate-schedule": "cosine", "num-server-rounds": 4})
    torch.manual_seed(0)
    model = build_model("cnn", WIDTHS)
    server_set = TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    strategy = make_strategy(config, SplitSpec.from_model(model), server_set=server_set)
    grid = LoopbackGrid(NODES)
    strategy.nodes.learn(grid, grid.get_node_ids())
    message = next(iter(strategy.configure_train(3, ArrayRecord(model.state_dict()), client_config(config, 3), grid)))
    node = message.metadata.dst_node_id
    sent = message.content.array_records[ARRAYS].to_torch_state_dict()
    strategy.reference(3, node, strategy._plans[node], sent, 1)
    assert built == [pytest.approx(client_config(config, 3)["learning-rate"])] and built[0] == pytest.approx(0.05 * 0.5)
