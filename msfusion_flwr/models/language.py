"""Causal language models, their width groups derived from their graphs with two hints.

Two models, one protocol (that of :mod:`msfusion_flwr.models.vision`: a ``widths`` /
``rate`` constructor, ``FULL_WIDTHS``, ``width_groups()`` traced by
:func:`~msfusion_flwr.models.derived.traced_width_groups` and named by
``GROUP_NAMES``, ``feature_group``, ``features(x)`` and ``outputs(x) -> (logits, features)``):

* :class:`TransformerLM` (``model = "transformer"``), our pre-LayerNorm
  decoder-only Transformer;
* :class:`GPT2LM` (``model = "gpt2"``), a Hugging Face ``transformers``
  ``GPT2LMHeadModel`` built from a ``GPT2Config`` (random init, no Hub
  weights). Its sub-models are real, narrower ``GPT2LMHeadModel``s that run
  their own forward: the splitting engine only learns, through axis rules for
  ``transformers``' transposed ``Conv1D``, which tensor axes its groups index.

Width groups (the vocabulary and the head dimension are never split), as
tracing finds them given what it cannot see: ``UNIT_HINTS`` (a head is a unit of
``HEAD_DIM`` channels) and, for GPT-2, ``STACKED_HINTS`` (its fused q/k/v
projection stacks 3 copies of the heads):

* ``embed``: the residual/embedding width, one group coupled across all layers
  (token and position embeddings, every LayerNorm, every projection writing to
  or reading from the residual stream, the LM head's input);
* ``<layer>.heads``: the attention heads of one layer; a head is a unit of
  ``HEAD_DIM`` rows of q, k and v and ``HEAD_DIM`` columns of the output
  projection, so the rows and columns of a selected head move together;
* ``<layer>.ffn``: the FFN hidden units of one layer.

GPT-2 derives its head size as ``n_embd / n_head``, so there the ``embed``
group counts units of ``HEAD_DIM`` channels, as the heads do: at any split
ratio a sub-model keeps as many heads as it keeps ``HEAD_DIM``-wide slices of
the residual stream. Word embeddings and the LM head are untied (a tied matrix
would travel twice, under both names).

Representation for the contrastive loss: the mean over the sequence of the
final hidden states (after the final LayerNorm). As in the image models, a
HeteroFL scaler divides, while training, the output of every projection whose
input is split (q, k, v, attention output, both FFN layers, the LM head) by
the sub-model's rate; at evaluation it is the identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.groups import INPUT_RULES, OUTPUT_RULES, WidthGroup
from .derived import traced_width_groups
from .layers import Scaler, classifier_scaler

HEAD_DIM = 32
"""Channels per attention head (never split)."""
NUM_LAYERS = 2
EMBED_WIDTH = 128
"""Full residual width in channels (4 heads of ``HEAD_DIM``)."""
FFN_WIDTH = 512
LM_EVAL_BATCH_SIZE = 32
"""Sequences per evaluation batch: logits are (batch, seq-len, vocabulary)."""
TRACE_TOKENS = (2, 2)
"""The token ids (batch, length) a language model's groups are traced on: their structure depends on neither."""
TRACE_ARGUMENTS = {"vocab_size": 2, "max_len": 2}
"""The traced copy's vocabulary and context: never split, so they change no group."""


def _init_gpt_style(module: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q, k, v projections."""

    def __init__(self, embed: int, heads: int, head_dim: int, rate: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q = nn.Linear(embed, inner)
        self.k = nn.Linear(embed, inner)
        self.v = nn.Linear(embed, inner)
        self.out = nn.Linear(inner, embed)
        self.scaler = Scaler(rate)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape

        def per_head(projection: nn.Linear) -> Tensor:
            return self.scaler(projection(x)).view(batch, length, self.heads, self.head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(per_head(self.q), per_head(self.k), per_head(self.v), is_causal=True)
        return self.scaler(self.out(y.transpose(1, 2).reshape(batch, length, -1)))


class FeedForward(nn.Module):
    """Two linear layers with a GELU between them."""

    def __init__(self, embed: int, hidden: int, rate: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed, hidden)
        self.fc2 = nn.Linear(hidden, embed)
        self.scaler = Scaler(rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.scaler(self.fc2(F.gelu(self.scaler(self.fc1(x)))))


class DecoderBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln1(x))``, then ``x + ffn(ln2(x))``."""

    def __init__(self, embed: int, heads: int, ffn: int, rate: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(embed)
        self.attn = CausalSelfAttention(embed, heads, HEAD_DIM, rate)
        self.ln2 = nn.LayerNorm(embed)
        self.ffn = FeedForward(embed, ffn, rate)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class TransformerLM(nn.Module):
    """Decoder-only Transformer LM: token + learned position embeddings, blocks, final LN, LM head."""

    FULL_WIDTHS = {"embed": EMBED_WIDTH} | {
        f"layers.{i}.{part}": width
        for i in range(NUM_LAYERS)
        for part, width in (("heads", EMBED_WIDTH // HEAD_DIM), ("ffn", FFN_WIDTH))
    }
    GROUP_NAMES: ClassVar[Mapping[str, str]] = {"tok": "embed"} | {
        f"layers.{i}.{layer}": f"layers.{i}.{group}" for i in range(NUM_LAYERS) for layer, group in (("attn.q", "heads"), ("ffn.fc1", "ffn"))
    }
    UNIT_HINTS: ClassVar[Mapping[str, int]] = {f"layers.{i}.attn.q": HEAD_DIM for i in range(NUM_LAYERS)}
    input_kind = "text"
    feature_group = "embed"
    feature_unit = 1
    eval_batch_size = LM_EVAL_BATCH_SIZE

    def __init__(
        self,
        widths: Mapping[str, int] | None = None,
        rate: float = 1.0,
        vocab_size: int = 2,
        max_len: int = 64,
        classifier_scaling: bool = True,
    ) -> None:
        super().__init__()
        w = {**self.FULL_WIDTHS, **(widths or {})}
        self.widths = w
        embed = w["embed"]
        self.tok = nn.Embedding(vocab_size, embed)
        self.pos = nn.Embedding(max_len, embed)
        self.layers = nn.ModuleList(
            DecoderBlock(embed, w[f"layers.{i}.heads"], w[f"layers.{i}.ffn"], rate) for i in range(NUM_LAYERS)
        )
        self.norm = nn.LayerNorm(embed)
        self.head_scaler = classifier_scaler(rate, classifier_scaling)
        self.head = nn.Linear(embed, vocab_size)
        self.apply(_init_gpt_style)

    def width_groups(self) -> list[WidthGroup]:
        return traced_width_groups(self, TRACE_TOKENS, torch.long, **TRACE_ARGUMENTS)

    def hidden_states(self, tokens: Tensor) -> Tensor:
        """Final hidden states (batch, length, embed), after the final LayerNorm."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def features(self, tokens: Tensor) -> Tensor:
        return self.hidden_states(tokens).mean(dim=1)

    def outputs(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.hidden_states(tokens)
        return self.head(self.head_scaler(hidden)), hidden.mean(dim=1)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.outputs(tokens)[0]


# --------------------------------------------------------------------------- transformers' GPT-2


def _conv1d_out(module: nn.Module) -> list[tuple[str, int]]:
    return [("weight", 1), ("bias", 0)]  # Conv1D stores weight as (in, out)


def _conv1d_in(module: nn.Module) -> list[tuple[str, int]]:
    return [("weight", 0)]


def register_transformers_rules() -> None:
    """Teach the splitting engine ``transformers``' ``Conv1D`` (a Linear with a transposed weight)."""
    from transformers.pytorch_utils import Conv1D

    OUTPUT_RULES.setdefault(Conv1D, _conv1d_out)
    INPUT_RULES.setdefault(Conv1D, _conv1d_in)


def register_conv1d_pruner() -> None:
    """Teach derivation (Torch-Pruning) ``Conv1D``: imported here, not at module load, because a device
    never traces a model (the server derives the groups)."""
    from torch_pruning.pruner.function import BasePruningFunc
    from transformers.pytorch_utils import Conv1D

    from ..engine.derivation import PRUNERS

    class Conv1DPruner(BasePruningFunc):
        """Torch-Pruning's pruning functions for ``Conv1D``: outputs are weight columns, inputs its rows."""

        TARGET_MODULES = (Conv1D,)

        def prune_out_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
            keep = sorted(set(range(layer.nf)) - set(idxs))
            layer.nf = len(keep)
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
            return layer

        def prune_in_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
            keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
            return layer

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.nf

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.weight.shape[0]

    register_transformers_rules()
    PRUNERS.setdefault(Conv1D, Conv1DPruner())


class _ScaleOutput:
    """Forward hook applying a :class:`Scaler` module to a module's output."""

    def __init__(self, scaler: Scaler) -> None:
        self.scaler = scaler

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return self.scaler(output)


_GPT2 = "model.transformer"
"""Where ``GPT2LM`` keeps GPT-2's transformer."""


class GPT2LM(nn.Module):
    """A ``transformers.GPT2LMHeadModel`` (in ``self.model``) at the given widths.

    ``widths["embed"]`` and every layer's ``heads`` count ``HEAD_DIM``-wide
    units and must be equal (GPT-2 has one ``n_head`` and ``head_dim = n_embd /
    n_head``); the layers' ``ffn`` widths must be equal (one ``n_inner``).
    Dropout is off. Scalers are forward hooks on the projections.
    """

    FULL_WIDTHS = {"embed": EMBED_WIDTH // HEAD_DIM} | {
        f"h.{i}.{part}": width
        for i in range(NUM_LAYERS)
        for part, width in (("heads", EMBED_WIDTH // HEAD_DIM), ("ffn", FFN_WIDTH))
    }
    GROUP_NAMES: ClassVar[Mapping[str, str]] = {f"{_GPT2}.wte": "embed"} | {
        f"{_GPT2}.h.{i}.{layer}": f"h.{i}.{group}" for i in range(NUM_LAYERS) for layer, group in (("attn.c_attn", "heads"), ("mlp.c_fc", "ffn"))
    }
    UNIT_HINTS: ClassVar[Mapping[str, int]] = {f"{_GPT2}.wte": HEAD_DIM} | {f"{_GPT2}.h.{i}.attn.c_attn": HEAD_DIM for i in range(NUM_LAYERS)}
    """Heads of ``HEAD_DIM`` channels, and the residual stream in ``HEAD_DIM``-channel units too (GPT-2 ties ``n_head`` to ``n_embd``)."""
    STACKED_HINTS: ClassVar[Mapping[str, int]] = {f"{_GPT2}.h.{i}.attn.c_attn": 3 for i in range(NUM_LAYERS)}
    """``c_attn`` outputs q, k and v stacked: 3 copies of the layer's heads."""
    input_kind = "text"
    feature_group = "embed"
    feature_unit = HEAD_DIM
    eval_batch_size = LM_EVAL_BATCH_SIZE

    def __init__(
        self,
        widths: Mapping[str, int] | None = None,
        rate: float = 1.0,
        vocab_size: int = 2,
        max_len: int = 64,
        classifier_scaling: bool = True,
    ) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        register_transformers_rules()
        w = {**self.FULL_WIDTHS, **(widths or {})}
        self.widths = w
        heads = {w[f"h.{i}.heads"] for i in range(NUM_LAYERS)}
        ffn = {w[f"h.{i}.ffn"] for i in range(NUM_LAYERS)}
        if heads != {w["embed"]} or len(ffn) != 1:
            raise ValueError(
                f"GPT-2 sub-model needs one head count equal to the embed width in {HEAD_DIM}-channel units "
                f"and one FFN width across layers, got embed {w['embed']}, heads {sorted(heads)}, ffn {sorted(ffn)}"
            )
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_len,
            n_embd=w["embed"] * HEAD_DIM,
            n_layer=NUM_LAYERS,
            n_head=w["embed"],
            n_inner=ffn.pop(),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=False,
            use_cache=False,
            bos_token_id=None,
            eos_token_id=None,
        )
        self.model = GPT2LMHeadModel(config)
        self.scaler = Scaler(rate)  # a submodule, so train()/eval() switch it like the other models' scalers
        scale = _ScaleOutput(self.scaler)
        for i in range(NUM_LAYERS):
            block = self.model.transformer.h[i]
            for projection in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                projection.register_forward_hook(scale)
        self.head_scaler = classifier_scaler(rate, classifier_scaling)
        self.model.lm_head.register_forward_hook(_ScaleOutput(self.head_scaler))

    def width_groups(self) -> list[WidthGroup]:
        """Traced on the CPU (GPT-2's attention-mask code cannot run on the meta device), with a Torch-Pruning
        pruner for ``Conv1D``."""
        register_conv1d_pruner()
        return traced_width_groups(self, TRACE_TOKENS, torch.long, **TRACE_ARGUMENTS)

    def features(self, tokens: Tensor) -> Tensor:
        return self.model.transformer(input_ids=tokens).last_hidden_state.mean(dim=1)

    def outputs(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(input_ids=tokens, output_hidden_states=True)
        return out.logits, out.hidden_states[-1].mean(dim=1)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.outputs(tokens)[0]
