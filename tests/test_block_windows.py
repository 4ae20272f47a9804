"""``window-layout = "blocks"``: double shifting over disjoint blocks, and a fused model that is exactly an ensemble.

Definition (groups of widths K_g, block ratio r, M participants, rank j, 1-based round t, shift step d):

* block length ``w_g = max(1, round(r * K_g))``, block count ``B = min_g floor(K_g / w_g)``;
* block ``b = (j + (t - 1) * d) mod B`` (``b = (t - 1) * d mod B`` without the inter-participant shift);
* index set of group g: ``{b * w_g, ..., (b + 1) * w_g - 1}``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from msfusion_flwr.config import RunConfig
from msfusion_flwr.engine import (
    BlockShift,
    PlanRequest,
    SplitSpec,
    SubmodelUpdate,
    aggregate,
    plan_widths,
    slice_state,
)
from msfusion_flwr.engine.coverage import zero_outside
from msfusion_flwr.models import build_model
from msfusion_flwr.server.methods import global_widths, make_strategy

SMALL = {"conv1": 8, "conv2": 16, "conv3": 16, "fc": 32}


def request(widths: dict[str, int], ratio: float, rank: int, m: int, t: int) -> PlanRequest:
    return PlanRequest(widths, ratio, rank, m, t, partition_id=rank)


@settings(max_examples=150, deadline=None)
@given(
    widths=st.dictionaries(st.sampled_from("abcd"), st.integers(1, 300), min_size=1, max_size=4),
    ratio=st.floats(0.01, 1.0),
    m=st.integers(1, 40),
    data=st.data(),
    t=st.integers(1, 60),
    d=st.integers(0, 7),
    inter=st.booleans(),
)
def test_plan_matches_definition(widths, ratio, m, data, t, d, inter):
    rank = data.draw(st.integers(0, m - 1))
    lengths = {g: max(1, round(ratio * k)) for g, k in widths.items()}
    count = min(k // lengths[g] for g, k in widths.items())
    block = ((rank if inter else 0) + (t - 1) * d) % count
    assignment = BlockShift(ratio, d, inter).assign(request(widths, ratio, rank, m, t))
    assert assignment.rate == 1.0  # a block reads only its own block's units, in training as in the fused model
    for g in widths:
        assert assignment.plan[g].dtype == torch.int64
        assert assignment.plan[g].tolist() == list(range(block * lengths[g], (block + 1) * lengths[g]))


def test_blocks_are_disjoint_and_rotate_through_every_participant():
    """At r = 1/4: four disjoint blocks per group; each block held by ranks j = b mod 4 in round 1; over four
    rounds every participant holds every block once."""
    widths = {"conv1": 64, "fc": 512}
    policy = BlockShift(0.25)
    support = policy.support(widths)
    assert len(support) == 4
    for g, k in widths.items():
        units = torch.cat([plan[g] for plan in support])
        assert sorted(units.tolist()) == list(range(k))
    held = {j: {int(policy.assign(request(widths, 0.25, j, 10, t)).plan["fc"][0]) // 128 for t in range(1, 5)} for j in range(10)}
    assert all(blocks == {0, 1, 2, 3} for blocks in held.values())


def test_a_budget_below_the_block_ratio_is_refused_naming_the_partition():
    with pytest.raises(ValueError, match="partition 3 has a budget of 0.125") as info:
        BlockShift(0.25).assign(request(SMALL, 0.125, 3, 4, 1))
    assert "\n" not in str(info.value)
    assert BlockShift(0.25).assign(request(SMALL, 0.5, 3, 4, 1)).rate == 1.0  # a larger budget trains a block


def test_zero_outside_keeps_exactly_the_block_diagonal():
    """Every weight between unit i of one group and unit o of the next survives iff both lie in one block."""
    model = build_model("cnn", SMALL)
    spec = SplitSpec.from_model(model)
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}  # no zero by chance
    kept = zero_outside(state, spec, BlockShift(0.25).support(spec.widths))
    w_in, w_out = SMALL["conv1"] // 4, SMALL["conv2"] // 4
    conv2 = kept["conv2.0.weight"]
    for o in range(SMALL["conv2"]):
        for i in range(SMALL["conv1"]):
            assert bool((conv2[o, i] != 0).all()) == (o // w_out == i // w_in)
    torch.testing.assert_close(kept["head.bias"], state["head.bias"])  # unsplit tensors are whole
    torch.testing.assert_close(kept["conv1.0.weight"], state["conv1.0.weight"])  # its input channel is never split


@pytest.mark.parametrize(("blocks", "shared"), [(0, ""), (2, ""), (2, "conv1,conv2"), (0, "conv1")])
def test_the_fused_model_is_the_ensemble_of_its_blocks_before_and_after_a_round(blocks, shared):
    """From the strategy's initial state, and after fusing trained slices, the global model's logits equal the
    mean of its block models' logits (each sliced from it as a participant receives it), and the weights between
    blocks stay zero: for the full model (4 blocks at r = 1/4), for a global model 2 blocks wide, and for block
    models that branch off a shared trunk (``shared-groups``: one block wide, held whole by every participant)."""
    torch.manual_seed(0)
    run = RunConfig.from_mapping({"window-layout": "blocks", "split-ratio": 0.25, "block-count": blocks, "shared-groups": shared})
    model = build_model("cnn", {g: (1 if g in shared else blocks or 4) * (k // 4) for g, k in SMALL.items()})
    spec = SplitSpec.from_model(model)
    strategy = make_strategy(run, spec)
    state = strategy.initial_state(model.state_dict())
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def check(global_state: dict[str, torch.Tensor]) -> None:
        fused = build_model("cnn", spec.widths)
        fused.load_state_dict(global_state)
        fused.eval()
        members = []
        for plan in strategy.policy.support(spec.widths):
            narrow = build_model("cnn", plan_widths(plan), 1 / len(strategy.policy.support(spec.widths)))
            narrow.load_state_dict(slice_state(global_state, spec, plan, calibrate=True))
            narrow.eval()
            members.append(narrow(x))
        with torch.no_grad():
            torch.testing.assert_close(fused(x), torch.stack(members).mean(0), rtol=1e-5, atol=1e-5)
        zeroed = zero_outside(global_state, spec, strategy.policy.support(spec.widths))
        for key, value in global_state.items():
            torch.testing.assert_close(value, zeroed[key], rtol=0, atol=0)

    check(state)
    updates = []
    for rank in range(8):
        assignment = strategy.policy.assign(request(spec.widths, 0.25, rank, 8, 3))
        assert all(len(units) == SMALL[g] // 4 for g, units in assignment.plan.items())
        narrow = build_model("cnn", plan_widths(assignment.plan), assignment.rate)
        narrow.load_state_dict(slice_state(state, spec, assignment.plan, calibrate=True))
        optimizer = torch.optim.SGD(narrow.parameters(), lr=0.1)
        for step in range(3):
            batch = slice(step * 16 + rank, step * 16 + rank + 16)
            loss = F.cross_entropy(narrow(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        updates.append(SubmodelUpdate(assignment.plan, narrow.state_dict(), 10.0 + rank))
    fused_state = aggregate(state, spec, updates, calibrate=True)
    assert any(not torch.equal(fused_state[k], state[k]) for k in state)
    check(fused_state)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 40), t=st.integers(1, 30), d=st.integers(0, 3), blocks=st.integers(1, 16), data=st.data())
def test_a_block_count_narrows_the_global_model_to_that_many_blocks(m, t, d, blocks, data):
    """block-count n: the global model is n blocks of w = round(r K) units per group, block (j + (t-1) d) mod n."""
    rank = data.draw(st.integers(0, m - 1))
    run = RunConfig.from_mapping({"window-layout": "blocks", "split-ratio": 0.0625, "block-count": blocks, "shift-step": d})
    widths = global_widths(run)
    assert widths == {g: blocks * round(k / 16) for g, k in {"conv1": 64, "conv2": 128, "conv3": 256, "fc": 512}.items()}
    policy = make_strategy(run, SplitSpec.from_model(build_model("cnn", widths))).policy
    assignment = policy.assign(request(widths, 0.0625, rank, m, t))
    block = (rank + (t - 1) * d) % blocks
    for g, k in widths.items():
        w = k // blocks
        assert assignment.plan[g].tolist() == list(range(block * w, (block + 1) * w))
    assert assignment.rate == 1.0  # every block reads only itself: its Scalers are identity, as in the fused model


def test_one_block_is_fedavg_small():
    """block-count 1: the global model is fedavg-small's and every participant holds all of it, at rate 1."""
    run = RunConfig.from_mapping({"window-layout": "blocks", "block-count": 1})
    small = RunConfig.from_mapping({"method": "fedavg-small"})
    assert global_widths(run) == global_widths(small)
    spec = SplitSpec.from_model(build_model("cnn", global_widths(run)))
    for rank in range(5):
        blocks = make_strategy(run, spec).policy.assign(request(spec.widths, 0.25, rank, 5, rank + 1))
        full = make_strategy(small, spec).policy.assign(request(spec.widths, 0.25, rank, 5, rank + 1))
        assert blocks.rate == full.rate == 1.0
        assert {g: u.tolist() for g, u in blocks.plan.items()} == {g: u.tolist() for g, u in full.plan.items()}


def test_a_node_budget_below_the_blocks_stops_the_round_with_a_one_line_config_error():
    """A node whose own split-ratio (node config) is below the block ratio: configure_train raises ConfigError,
    which the ServerApp logs as one line (apps.py)."""
    from flwr.app import ArrayRecord

    from msfusion_flwr.config import ConfigError
    from msfusion_flwr.experiments.loopback import LoopbackGrid
    from msfusion_flwr.protocol import client_config

    run = RunConfig.from_mapping({"window-layout": "blocks", "min-available-nodes": 2})
    model = build_model("cnn", SMALL)
    strategy = make_strategy(run, SplitSpec.from_model(model))
    grid = LoopbackGrid(2)
    grid.contexts[1].node_config["split-ratio"] = 0.125
    with pytest.raises(ConfigError, match="partition 1 has a budget of 0.125") as info:
        list(strategy.configure_train(1, ArrayRecord(model.state_dict()), client_config(run), grid))
    assert "\n" not in str(info.value)


@settings(max_examples=60, deadline=None)
@given(
    shared=st.sets(st.sampled_from(["conv1", "conv2", "conv3", "fc"]), max_size=3),
    blocks=st.integers(0, 4),
    m=st.integers(1, 20),
    t=st.integers(1, 30),
    d=st.integers(0, 3),
    data=st.data(),
)
def test_shared_groups_are_one_block_wide_and_held_whole_by_everyone(shared, blocks, m, t, d, data):
    """shared-groups S: a group in S is w = round(r K) units wide in the global model and every participant holds
    all of them; every other group is cut as without S, its block count taken over the groups outside S."""
    rank = data.draw(st.integers(0, m - 1))
    run = RunConfig.from_mapping(
        {"window-layout": "blocks", "split-ratio": 0.25, "block-count": blocks, "shift-step": d, "shared-groups": ",".join(sorted(shared))}
    )
    full = {"conv1": 64, "conv2": 128, "conv3": 256, "fc": 512}
    widths = global_widths(run) or full  # None: the full model
    count = blocks or 4
    assert widths == {g: (1 if g in shared else count) * round(k / 4) for g, k in full.items()}
    policy = make_strategy(run, SplitSpec.from_model(build_model("cnn", widths))).policy
    assignment = policy.assign(request(widths, 0.25, rank, m, t))
    block = (rank + (t - 1) * d) % count
    for g, k in widths.items():
        w = round(full[g] / 4)
        expected = range(w) if g in shared else range(block * w, (block + 1) * w)
        assert assignment.plan[g].tolist() == list(expected)


def test_a_shared_trunk_is_held_by_every_block_and_the_branches_stay_apart():
    """With conv1 and conv2 shared, every weight into conv3 from the trunk survives zero_outside, while conv3 ->
    fc keeps only its block diagonal."""
    run = RunConfig.from_mapping({"window-layout": "blocks", "split-ratio": 0.25, "block-count": 0, "shared-groups": "conv1,conv2"})
    model = build_model("cnn", global_widths(run))
    spec = SplitSpec.from_model(model)
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    kept = zero_outside(state, spec, make_strategy(run, spec).policy.support(spec.widths))
    torch.testing.assert_close(kept["conv2.0.weight"], state["conv2.0.weight"])
    torch.testing.assert_close(kept["conv3.0.weight"], state["conv3.0.weight"])
    fc = kept["fc.weight"]
    assert fc.shape == (512, 256)
    nonzero = (fc != 0).nonzero()
    assert ((nonzero[:, 0] // 128) == (nonzero[:, 1] // 64)).all() and len(nonzero) == 4 * 128 * 64


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"window-layout": "blocks", "shared-groups": "conv9"}, "some but not all of model 'cnn'"),
        ({"window-layout": "blocks", "shared-groups": "conv1,conv2,conv3,fc"}, "some but not all"),
        ({"shared-groups": "conv1", "window-layout": "rolling"}, "needs method 'msfusion' with window-layout 'blocks'"),
        ({"shared-groups": "conv1", "method": "heterofl"}, "needs method 'msfusion' with window-layout 'blocks'"),
    ],
)
def test_shared_groups_refuse_what_they_cannot_do_in_one_line(overrides, message):
    from msfusion_flwr.config import ConfigError

    with pytest.raises(ConfigError, match=message) as info:
        RunConfig.from_mapping(overrides)
    assert "\n" not in str(info.value)


def test_a_block_model_trains_as_the_function_the_fused_model_evaluates():
    """Without shared groups a block's narrow model is built at rate 1, so its Scalers are identity in training too:
    the Transformer LM (Scalers on residual branches, no norm after them) gives the same outputs in train and eval
    mode, as the block-diagonal fused model computes it. At the block's share of the width it would not."""
    from msfusion_flwr.engine import PlanRequest
    from msfusion_flwr.models import build_model
    from msfusion_flwr.models.language import TransformerLM

    widths = TransformerLM.FULL_WIDTHS
    policy = BlockShift(0.25, blocks=2)
    assignment = policy.assign(PlanRequest(widths, 0.25, 0, 4, 1))
    assert assignment.rate == 1.0
    tokens = torch.randint(0, 50, (2, 8))
    for rate, same in ((assignment.rate, True), (0.5, False)):
        torch.manual_seed(0)
        model = build_model("transformer", plan_widths(assignment.plan), rate, vocab_size=50, max_len=8)
        with torch.no_grad():
            trained, evaluated = model.train()(tokens), model.eval()(tokens)
        assert torch.allclose(trained, evaluated) == same
    shared = BlockShift(0.25, blocks=2, shared=frozenset({"conv1"}))
    assert shared.assign(PlanRequest({"conv1": 8, "conv2": 16}, 0.25, 0, 4, 1)).rate == 0.5
