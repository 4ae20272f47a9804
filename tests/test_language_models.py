"""Split language models: sliced attention, plans' head counts and FFN widths, transformers' GPT-2 sub-models, perplexity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from msfusion_flwr.config import MSFUSION_PAPER, RunConfig
from msfusion_flwr.device.losses import representation
from msfusion_flwr.device.training import TrainSettings, train_local
from msfusion_flwr.engine import SplitSpec, SubmodelUpdate, aggregate, plan_widths, slice_state
from msfusion_flwr.engine.policies import PlanRequest
from msfusion_flwr.models import build_model
from msfusion_flwr.models.evaluation import evaluate, token_cross_entropy
from msfusion_flwr.models.language import HEAD_DIM, NUM_LAYERS, CausalSelfAttention
from msfusion_flwr.server.methods import POLICIES

VOCAB, LENGTH = 50, 12
LM_KWARGS = {"vocab_size": VOCAB, "max_len": LENGTH}


def tokens(batch: int = 3, seed: int = 0) -> Tensor:
    return torch.randint(0, VOCAB, (batch, LENGTH), generator=torch.Generator().manual_seed(seed))


def sub_model(name: str, global_model: nn.Module, plan: dict[str, Tensor], rate: float) -> nn.Module:
    spec = SplitSpec.from_model(global_model)
    model = build_model(name, plan_widths(plan), rate, **LM_KWARGS)
    model.load_state_dict(slice_state(global_model.state_dict(), spec, plan))
    return model


def policy_plan(method: str, name: str, rate: float = 0.25, rank: int = 3) -> dict[str, Tensor]:
    """A plan over the full model's widths; msfusion with the paper's rolling windows (its default blocks plan over
    a global model 2 blocks wide, server.methods.global_widths)."""
    paper = MSFUSION_PAPER if method == "msfusion" else {}
    config = RunConfig.from_mapping({"method": method, "model": name, "dataset": "wikitext-2", "partitioner": "iid", **paper})
    widths = build_model(name, **LM_KWARGS).FULL_WIDTHS  # type: ignore[attr-defined]
    request = PlanRequest(widths=widths, ratio=rate, rank=rank, num_participants=10, server_round=4, partition_id=rank)
    return POLICIES[method](config.method).assign(request).plan


def test_sliced_attention_block_at_full_width_equals_the_full_block_exactly():
    """r = 1: slicing the whole model and rebuilding it gives bit-identical attention-block and model outputs."""
    for name in ("transformer", "gpt2"):
        torch.manual_seed(0)
        full = build_model(name, **LM_KWARGS).eval()
        spec = SplitSpec.from_model(full)
        rebuilt = sub_model(name, full, spec.full_plan(), 1.0).eval()
        x = tokens()
        assert torch.equal(rebuilt(x), full(x))
        hidden = torch.randn(2, LENGTH, 128)
        block = (lambda m: m.layers[0].attn) if name == "transformer" else (lambda m: m.model.transformer.h[0].attn)
        out_full, out_rebuilt = block(full)(hidden), block(rebuilt)(hidden)
        out_full = out_full[0] if isinstance(out_full, tuple) else out_full
        out_rebuilt = out_rebuilt[0] if isinstance(out_rebuilt, tuple) else out_rebuilt
        assert torch.equal(out_rebuilt, out_full)


def test_sliced_heads_give_the_full_block_with_the_other_heads_removed():
    """Heads {1, 3} of 4: the sub-block's output equals the full block's with heads 0 and 2's out-projection columns zeroed."""
    torch.manual_seed(1)
    full = CausalSelfAttention(128, 4, HEAD_DIM, rate=1.0).eval()
    keep = torch.tensor([1, 3])
    rows = (keep[:, None] * HEAD_DIM + torch.arange(HEAD_DIM)).reshape(-1)
    sub = CausalSelfAttention(128, 2, HEAD_DIM, rate=1.0).eval()
    with torch.no_grad():
        for proj in ("q", "k", "v"):
            getattr(sub, proj).weight.copy_(getattr(full, proj).weight[rows])
            getattr(sub, proj).bias.copy_(getattr(full, proj).bias[rows])
        sub.out.weight.copy_(full.out.weight[:, rows])
        sub.out.bias.copy_(full.out.bias)
        masked = CausalSelfAttention(128, 4, HEAD_DIM, rate=1.0).eval()
        masked.load_state_dict(full.state_dict())
        dropped = torch.ones(4 * HEAD_DIM, dtype=torch.bool)
        dropped[rows] = False
        masked.out.weight[:, dropped] = 0.0
    x = torch.randn(2, LENGTH, 128)
    torch.testing.assert_close(sub(x), masked(x), rtol=0, atol=1e-6)
    assert not torch.allclose(sub(x), full(x), atol=1e-3)


@pytest.mark.parametrize("method", ["msfusion", "heterofl", "fedrolex", "fd", "fjord"])
@pytest.mark.parametrize("name", ["transformer", "gpt2"])
def test_sub_model_head_count_and_ffn_width_are_the_plans(method, name):
    """Every layer's head count and FFN width, and the residual width, are those the policy's plan holds."""
    plan = policy_plan(method, name)
    widths = plan_widths(plan)
    model = sub_model(name, build_model(name, **LM_KWARGS), plan, 0.25)
    for i in range(NUM_LAYERS):
        if name == "transformer":
            layer = model.layers[i]
            assert layer.attn.heads == widths[f"layers.{i}.heads"]
            assert layer.attn.q.out_features == widths[f"layers.{i}.heads"] * HEAD_DIM
            assert layer.ffn.fc1.out_features == widths[f"layers.{i}.ffn"]
            assert layer.ln1.normalized_shape == (widths["embed"],)
        else:
            block = model.model.transformer.h[i]
            assert block.attn.num_heads == widths[f"h.{i}.heads"] == model.model.config.n_head
            assert block.attn.c_attn.nf == 3 * widths[f"h.{i}.heads"] * HEAD_DIM
            assert block.mlp.c_fc.nf == widths[f"h.{i}.ffn"]
            assert model.model.config.n_embd == widths["embed"] * HEAD_DIM
    assert model(tokens()).shape == (3, LENGTH, VOCAB)  # the vocabulary is never split


def test_transformers_sub_model_is_a_real_gpt2_that_runs_its_own_forward():
    """A GPT2LMHeadModel whose parameter count is the plan's element count, and whose own forward computes the LM loss."""
    from transformers import GPT2LMHeadModel

    full = build_model("gpt2", **LM_KWARGS)
    spec = SplitSpec.from_model(full)
    plan = policy_plan("msfusion", "gpt2")
    sliced = slice_state(full.state_dict(), spec, plan)
    model = sub_model("gpt2", full, plan, 0.25).eval()
    assert type(model.model) is GPT2LMHeadModel
    params = sum(p.numel() for p in model.parameters())
    assert params == sum(t.numel() for t in sliced.values())
    e, f, n = HEAD_DIM, plan_widths(plan)["h.0.ffn"], NUM_LAYERS  # one head: embed width = head_dim
    per_layer = 2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * f + f) + (f * e + e)
    assert params == VOCAB * e + LENGTH * e + n * per_layer + 2 * e + e * VOCAB
    x = tokens()
    out = model.model(input_ids=x, labels=x)
    shifted = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, shifted)


@pytest.mark.parametrize("name", ["transformer", "gpt2"])
def test_slice_then_aggregate_is_lossless_and_partial_updates_touch_only_their_slice(name):
    """Full-plan round trip is the identity; a quarter-width update changes exactly its own elements."""
    full = build_model(name, **LM_KWARGS)
    spec = SplitSpec.from_model(full)
    state = full.state_dict()
    same = aggregate(state, spec, [SubmodelUpdate(spec.full_plan(), slice_state(state, spec, spec.full_plan()), 1.0)])
    assert all(torch.equal(same[k], state[k]) for k in state)
    plan = policy_plan("heterofl", name)
    bumped = {k: v + 1 for k, v in slice_state(state, spec, plan).items()}
    merged = aggregate(state, spec, [SubmodelUpdate(plan, bumped, 1.0)])
    changed = sum(int((merged[k] != state[k]).sum()) for k in state)
    assert changed == sum(v.numel() for v in bumped.values())


def test_lm_representation_is_the_mean_final_hidden_state_in_global_channels():
    """GPT-2's embed group counts heads: features of a one-head slice land on that head's 32 channels."""
    full = build_model("gpt2", **LM_KWARGS)
    plan = policy_plan("fedrolex", "gpt2")
    model = sub_model("gpt2", full, plan, 0.25).eval()
    rep = representation(model, plan, full.FULL_WIDTHS)
    z = rep(tokens())
    unit = int(plan["embed"][0])
    assert z.shape == (3, 128)
    hidden = model.model.transformer(input_ids=tokens()).last_hidden_state.mean(1)
    torch.testing.assert_close(z[:, unit * HEAD_DIM : (unit + 1) * HEAD_DIM], hidden)
    assert int((z.abs().sum(0) > 0).sum()) == HEAD_DIM


class FixedLogits(nn.Module):
    """Predicts the same next-token distribution at every position."""

    def __init__(self, probabilities: list[float]) -> None:
        super().__init__()
        self.logits = torch.log(torch.tensor(probabilities))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(*x.shape, -1)


def test_perplexity_is_exp_of_the_mean_token_nll():
    """p = (1/2, 1/4, 1/4); targets 0, 1, 2, 0 -> NLLs ln2, ln4, ln4, ln2 -> perplexity exp(ln 8 / 2) = sqrt(8)."""
    x = torch.zeros(2, 2, dtype=torch.long)
    y = torch.tensor([[0, 1], [2, 0]])
    metrics = evaluate(FixedLogits([0.5, 0.25, 0.25]), TensorDataset(x, y), batch_size=1)
    assert metrics["loss"] == pytest.approx((2 * math.log(2) + 2 * math.log(4)) / 4)
    assert metrics["perplexity"] == pytest.approx(math.sqrt(8))
    assert metrics["accuracy"] == pytest.approx(0.5)  # argmax is token 0
    image_metrics = evaluate(FixedLogits([0.5, 0.25, 0.25]), TensorDataset(torch.zeros(4), torch.tensor([0, 1, 2, 0])))
    assert "perplexity" not in image_metrics


@torch.no_grad()
def scaled_loss(model: nn.Module, data: TensorDataset) -> float:
    """Token cross-entropy as the slice trains (scalers on: a narrow model in eval mode is not what it trained as)."""
    x, y = data.tensors
    model.train()
    return float(token_cross_entropy(model(x), y))


@pytest.mark.parametrize("name", ["transformer", "gpt2"])
def test_local_training_of_an_lm_slice_lowers_its_loss_and_is_metered(name):
    """Adam on a repetitive token stream: the narrow LM's loss falls; FLOPs and memory are measured; contrastive term runs."""
    pattern = torch.arange(LENGTH + 1) % 7
    data = TensorDataset(pattern[:-1].repeat(128, 1), pattern[1:].repeat(128, 1))
    full = build_model(name, **LM_KWARGS)
    plan = policy_plan("msfusion", name)
    model = sub_model(name, full, plan, 0.25)
    before = scaled_loss(model, data)
    previous = representation(sub_model(name, full, policy_plan("msfusion", name, rank=4), 0.25), policy_plan("msfusion", name, rank=4), full.FULL_WIDTHS)
    settings = TrainSettings(epochs=2, batch_size=16, learning_rate=3e-3, optimizer="adam", weight_decay=0.0, contrastive_weight=1.0)
    metrics = train_local(model, data, settings, representation(model, plan, full.FULL_WIDTHS), previous)
    assert scaled_loss(model, data) < 0.5 * before
    assert metrics["train-flops"] > 0 and metrics["peak-memory-bytes"] > 0 and metrics["train-contrastive"] > 0
