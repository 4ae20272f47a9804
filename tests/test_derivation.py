"""Width groups derived from a model's graph (engine/derivation.py) and models split by them (models/derived.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from msfusion_flwr.config import ConfigError, RunConfig
from msfusion_flwr.device.losses import representation
from msfusion_flwr.engine import (
    SplitSpec,
    SubmodelUpdate,
    aggregate,
    flat_positions,
    plan_widths,
    slice_state,
)
from msfusion_flwr.engine.derivation import DerivationError, derive_groups, narrow_to
from msfusion_flwr.engine.groups import GroupDecl, resolve_groups
from msfusion_flwr.models import build_model, model_class
from msfusion_flwr.models.derived import (
    Architecture,
    derived_model_class,
    materialize,
    parameters_on_meta,
    transformers_architecture,
)
from msfusion_flwr.models.language import GPT2LM, HEAD_DIM, NUM_LAYERS, register_conv1d_pruner

GPT2 = "model.transformer"


def _axis_sets(groups) -> dict[frozenset, int]:
    return {frozenset(group.axes): group.width for group in groups}


def _cnn_declarations(model) -> list[GroupDecl]:
    """FashionCNN's width groups as they were written by hand before derivation replaced them."""
    return [
        GroupDecl("conv1", outputs=("conv1.0", "conv1.2"), inputs=("conv2.0",)),
        GroupDecl("conv2", outputs=("conv2.0", "conv2.2"), inputs=("conv3.0",)),
        GroupDecl("conv3", outputs=("conv3.0", "conv3.2"), inputs=("fc",)),
        GroupDecl("fc", outputs=("fc", "fc_norm"), inputs=("head",)),
    ]


def _preresnet_declarations(model) -> list[GroupDecl]:
    """PreResNet-18's width groups as they were written by hand: one group per residual stream, one per block."""
    outputs: dict[str, list[str]] = {stage: [] for stage, _, _ in model.STAGES}
    inputs: dict[str, list[str]] = {stage: [] for stage, _, _ in model.STAGES}
    inner, stream = [], model.STAGES[0][0]
    outputs[stream].append("conv1")
    for stage, _, _ in model.STAGES:
        for b, block in enumerate(getattr(model, stage)):
            name, source = f"{stage}.{b}", stream if b == 0 else stage
            outputs[source].append(f"{name}.n1")
            inputs[source].append(f"{name}.conv1")
            if block.shortcut is not None:
                inputs[source].append(f"{name}.shortcut")
                outputs[stage].append(f"{name}.shortcut")
            outputs[stage].append(f"{name}.conv2")
            inner.append(GroupDecl(name, outputs=(f"{name}.conv1", f"{name}.n2"), inputs=(f"{name}.conv2",)))
        stream = stage
    outputs[stream].append("n4")
    inputs[stream].append("head")
    return [GroupDecl(s, outputs=tuple(outputs[s]), inputs=tuple(inputs[s])) for s, _, _ in model.STAGES] + inner


def _transformer_declarations(model) -> list[GroupDecl]:
    """Our Transformer's width groups as they were written by hand: the residual stream, and per layer its heads
    (units of HEAD_DIM channels) and its FFN."""
    layers = [f"layers.{i}" for i in range(NUM_LAYERS)]
    embed = GroupDecl(
        "embed",
        outputs=("tok", "pos", *[f"{l}.{m}" for l in layers for m in ("ln1", "attn.out", "ln2", "ffn.fc2")], "norm"),
        inputs=(*[f"{l}.{m}" for l in layers for m in ("attn.q", "attn.k", "attn.v", "ffn.fc1")], "head"),
    )
    per_layer = []
    for l in layers:
        per_layer.append(
            GroupDecl(f"{l}.heads", outputs=(f"{l}.attn.q", f"{l}.attn.k", f"{l}.attn.v"), inputs=(f"{l}.attn.out",), unit=HEAD_DIM)
        )
        per_layer.append(GroupDecl(f"{l}.ffn", outputs=(f"{l}.ffn.fc1",), inputs=(f"{l}.ffn.fc2",)))
    return [embed, *per_layer]


def _gpt2_declarations(model) -> list[GroupDecl]:
    """GPT-2's width groups as they were written by hand: the residual stream in HEAD_DIM-channel units, and per
    layer its heads (q, k and v stacked in c_attn: 3 blocks) and its FFN."""
    layers = [f"{GPT2}.h.{i}" for i in range(NUM_LAYERS)]
    embed = GroupDecl(
        "embed",
        outputs=(f"{GPT2}.wte", f"{GPT2}.wpe", *[f"{l}.{m}" for l in layers for m in ("ln_1", "attn.c_proj", "ln_2", "mlp.c_proj")], f"{GPT2}.ln_f"),
        inputs=(*[f"{l}.{m}" for l in layers for m in ("attn.c_attn", "mlp.c_fc")], "model.lm_head"),
        unit=HEAD_DIM,
    )
    per_layer = []
    for i, l in enumerate(layers):
        per_layer.append(
            GroupDecl(f"h.{i}.heads", outputs=(f"{l}.attn.c_attn",), inputs=(f"{l}.attn.c_proj",), unit=HEAD_DIM, blocks_of={f"{l}.attn.c_attn": 3})
        )
        per_layer.append(GroupDecl(f"h.{i}.ffn", outputs=(f"{l}.mlp.c_fc",), inputs=(f"{l}.mlp.c_proj",)))
    return [embed, *per_layer]


HAND_WRITTEN = {  # model -> (its former declarations, constructor arguments to check them under)
    "cnn": (_cnn_declarations, [{}, {"in_channels": 3, "num_classes": 7}]),
    "preresnet18": (_preresnet_declarations, [{}, {"in_channels": 3, "num_classes": 7}]),
    "transformer": (_transformer_declarations, [{"vocab_size": 50, "max_len": 16}]),
    "gpt2": (_gpt2_declarations, [{"vocab_size": 50, "max_len": 16}]),
}


@pytest.mark.parametrize(("name", "kwargs"), [(name, kwargs) for name, (_, cases) in HAND_WRITTEN.items() for kwargs in cases])
def test_the_built_in_models_groups_are_their_former_declarations_in_name_and_order(name, kwargs):
    """No built-in model declares its groups any more (the language models give hints only): at full width
    and at a narrower width the derived groups are the hand-written ones, names, planning order and widths
    included, and every random plan slices every tensor exactly as the declarations did."""
    declarations = HAND_WRITTEN[name][0]
    narrow = {group: max(1, width * 3 // 8) for group, width in model_class(name).FULL_WIDTHS.items()}
    for widths in ({}, narrow):
        model = build_model(name, widths=widths, **kwargs)
        derived = SplitSpec.from_model(model)
        declared = SplitSpec(resolve_groups(model, declarations(model)), {k: v.shape for k, v in model.state_dict().items()})
        assert [(g.name, g.width) for g in derived.groups.values()] == [(g.name, g.width) for g in declared.groups.values()]
        assert _axis_sets(derived.groups.values()) == _axis_sets(declared.groups.values())
        for seed in range(3):
            plan = _random_plan(declared, 0.5, seed)
            expected = slice_state(model.state_dict(), declared, plan)
            got = slice_state(model.state_dict(), derived, plan)
            assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_fused_qkv_projection_without_its_stacked_hint_is_a_one_line_error():
    """Torch-Pruning maps GPT-2's 3d fused q/k/v outputs through attention onto the out-projection's d inputs;
    without the stacked hint that would index past the tensor, so derivation refuses, naming the layer."""
    register_conv1d_pruner()
    example = torch.zeros(2, 16, dtype=torch.long)
    with pytest.raises(DerivationError, match=rf"^{GPT2}.h.0.attn.c_proj: tracing maps 384 channels onto its 128 inputs"):
        derive_groups(build_model("gpt2", vocab_size=50, max_len=16), example, units=GPT2LM.UNIT_HINTS)


def test_a_unit_hint_applies_to_the_group_its_layer_produces_only():
    """Without the head hint the attention groups count channels; the hint makes them count heads and
    leaves the residual stream, which the hinted projection reads, in channels."""
    with torch.device("meta"):
        traced = build_model("transformer", vocab_size=50, max_len=16)
    example = torch.zeros(2, 16, dtype=torch.long, device="meta")
    plain = {g.name: g.width for g in derive_groups(traced, example)}
    hinted = {g.name: g.width for g in derive_groups(traced, example, units={"layers.0.attn.q": HEAD_DIM})}
    assert plain["layers.0.attn.q"] == 128 and hinted["layers.0.attn.q"] == 128 // HEAD_DIM
    assert hinted["tok"] == plain["tok"] == 128 and hinted["layers.1.attn.q"] == 128
    with pytest.raises(DerivationError, match=r"^group 'layers.0.attn.q': unit hints \[5\] do not divide its 128 channels"):
        derive_groups(traced, example, units={"layers.0.attn.q": 5})


TORCHVISION = ["torchvision:resnet18", "torchvision:mobilenet_v2"]
ENCODER = "transformers:bert"


def _random_plan(spec: SplitSpec, ratio: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {g: torch.randperm(k, generator=generator)[: max(1, round(ratio * k))].sort().values for g, k in spec.widths.items()}


def _small_bert():
    import transformers

    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return derived_model_class(transformers_architecture(config))


@dataclass
class Case:
    """A model class with derived groups, its constructor's data arguments and an input batch maker."""

    cls: type
    kwargs: dict
    batch: Callable[[int], torch.Tensor]

    def build(self, widths=None):
        return self.cls(widths, **self.kwargs)


def _small_vit_config(folder: Path) -> Path:
    """A local config folder of a small transformers ViT (what ``model = "hf:<folder>"`` reads)."""
    import transformers

    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    )  # fmt: skip
    config.save_pretrained(folder)
    return folder


HF_VIT = "hf:<small ViT config folder>"
DENSE = "a user's DenseNet-like module"


class _DenseLike(nn.Module):
    """Dense connections: a norm and a conv read the concatenation of the stem's and a conv's channels, and
    the classifier reads that concatenation with a third conv's channels appended."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem, self.a = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.norm, self.b = nn.BatchNorm2d(14), nn.Conv2d(14, 10, 3, padding=1)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        stem = self.stem(x)
        y = torch.relu(self.norm(torch.cat([stem, self.a(torch.relu(stem))], dim=1)))
        return self.head(torch.cat([y, self.b(y)], dim=1).mean((2, 3)))


@pytest.fixture(scope="module", params=[*TORCHVISION, ENCODER, HF_VIT, DENSE])
def derived(request, tmp_path_factory):
    """torchvision's ResNet-18 and MobileNetV2 on grayscale 28x28 images; a small BERT sequence classifier
    built from its config and a small ViT named by its config folder (heads as units, by the hint their
    attention modules give; the ViT's class token and position embeddings are bare parameters); a user's
    module with concatenations."""
    torch.manual_seed(0)
    if request.param == DENSE:
        architecture = Architecture("dense-like", _DenseLike, example_size=(8, 8))
        case = Case(derived_model_class(architecture), {"num_classes": 3}, lambda n: torch.randn(n, 3, 8, 8))
    elif request.param == ENCODER:
        case = Case(_small_bert(), {"num_classes": 3}, lambda n: torch.randint(0, 100, (n, 8)))
    elif request.param == HF_VIT:
        folder = _small_vit_config(tmp_path_factory.mktemp("vit"))
        case = Case(model_class(f"hf:{folder}"), {"num_classes": 10, "in_channels": 1}, lambda n: torch.randn(n, 1, 32, 32))
    else:
        case = Case(model_class(request.param), {"num_classes": 10, "in_channels": 1}, lambda n: torch.randn(n, 1, 28, 28))
    full = case.build()
    return case, full, SplitSpec.from_model(full)


def test_a_quarter_slice_of_a_derived_model_loads_and_runs(derived):
    """At r = 1/4 the narrow model built from the widths takes the slice strictly, holds exactly the
    plan's parameters and runs on the data's input; its representation is its head's input."""
    case, full, spec = derived
    plan = _random_plan(spec, 0.25, seed=1)
    sub = slice_state(full.state_dict(), spec, plan)
    narrow = case.build(plan_widths(plan))
    narrow.load_state_dict(sub)
    assert SplitSpec.from_model(narrow).widths == plan_widths(plan)  # a narrow global model (fedavg-small) splits too
    parameters = dict(narrow.named_parameters())
    assert sum(p.numel() for p in parameters.values()) == sum(sub[k].numel() for k in parameters)
    logits, features = narrow.outputs(case.batch(3))
    assert logits.shape == (3, case.kwargs["num_classes"])
    assert features.shape == (3, len(representation(narrow, plan, spec.widths).feature_index))


def test_concatenated_groups_follow_each_other_along_the_layers_that_read_them():
    """The DenseNet-like module: three groups (the stem's 8, a's 6, b's 10 channels); the norm reads parts
    0 and 1, the classifier parts 0, 1 and 2; a plan's positions along the classifier's inputs are each
    group's units after the full extent of the parts before it, and the representation is indexed the same way."""
    cls = derived_model_class(Architecture("dense-like", _DenseLike, example_size=(8, 8)))
    groups = {g.name: g for g in cls.GROUPS}
    assert {name: g.width for name, g in groups.items()} == {"stem": 8, "a": 6, "b": 10}
    parts = {name: {a.tensor: a.part for a in g.axes if a.tensor in ("norm.weight", "head.weight")} for name, g in groups.items()}
    assert parts == {"stem": {"norm.weight": 0, "head.weight": 0}, "a": {"norm.weight": 1, "head.weight": 1}, "b": {"head.weight": 2}}
    model = cls(num_classes=3)
    spec = SplitSpec.from_model(model)
    plan = {"stem": torch.tensor([1, 5]), "a": torch.tensor([0, 3]), "b": torch.tensor([2, 9])}
    head = dict(spec.positions(plan)["net.head.weight"])[1]
    assert head.tolist() == [1, 5, 8 + 0, 8 + 3, 14 + 2, 14 + 9]
    assert representation(model, plan, spec.widths).feature_index.tolist() == head.tolist()
    assert spec.calibration(plan) == {"net.head.weight": 6 / 24}  # the held share of the classifier's inputs
    narrow = cls(plan_widths(plan), num_classes=3)
    narrow.load_state_dict(slice_state(model.state_dict(), spec, plan))
    assert narrow.net.norm.num_features == 4 and narrow.net.head.in_features == 6


def test_a_transformers_vit_splits_heads_and_its_bare_parameters(tmp_path):
    """ViT (hf:<config folder>): 4 attention heads of 16 channels per layer; the class token and the position
    embeddings run along the residual stream's group."""
    cls = model_class(f"hf:{_small_vit_config(tmp_path)}")
    groups = {g.name: g for g in cls.GROUPS}
    stream = groups["vit.embeddings.patch_embeddings.projection"]
    assert stream.width == 64
    assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"} <= {a.tensor for a in stream.axes}
    attention = groups["vit.layers.0.attention.q_proj"]
    assert attention.width == 4 and {a.unit for a in attention.axes} == {16}


def test_the_encoders_attention_groups_count_heads():
    """BERT's attention groups are its 4 heads of 16 channels (q, k, v rows; the output projection's columns)."""
    groups = {g.name: g for g in _small_bert().GROUPS}
    attention = groups["bert.encoder.layer.0.attention.self.query"]
    assert attention.width == 4 and {a.unit for a in attention.axes} == {16}
    assert {a.tensor for a in attention.axes if a.consumes} == {"bert.encoder.layer.0.attention.output.dense.weight"}
    assert groups["bert.embeddings.word_embeddings"].width == 64


def test_the_full_plan_of_a_derived_model_is_the_model_itself(derived):
    """r = 1: slicing with the full plan and loading into a model built at full widths gives the same outputs, exactly."""
    case, full, spec = derived
    copy = case.build(spec.widths)
    copy.load_state_dict(slice_state(full.state_dict(), spec, spec.full_plan()))
    x = case.batch(4)
    assert torch.equal(full.eval()(x), copy.eval()(x))


def test_a_narrow_model_cut_at_full_width_from_meta_equals_the_model(derived):
    """The participant's path (parameters on meta, cut, allocated, loaded) at r = 1 reproduces the model exactly."""
    case, full, _ = derived
    cls = case.cls
    with parameters_on_meta():
        net = cls.architecture.network(case.kwargs["num_classes"])
    assert all(p.device.type == "meta" for p in net.parameters())
    narrow_to(net, cls.GROUPS, cls.FULL_WIDTHS)
    materialize(net).load_state_dict(full.net.state_dict())  # buffers stayed real (BERT's position ids)
    x = case.batch(4)
    if x.is_floating_point():
        x = x.expand(-1, 3, -1, -1)
    logits = cls.architecture.logits
    assert torch.equal(logits(full.net.eval()(x)), logits(net.eval()(x)))


def test_a_participant_never_builds_the_full_model(monkeypatch):
    """Every parameter of the architecture is on the meta device while a narrow model is built: the only
    CPU tensors it allocates are its own, at the narrow shapes."""
    cls = model_class("torchvision:resnet18")
    seen = []
    build = cls.architecture.build

    def spying_build(num_classes):
        net = build(num_classes)
        seen.append({p.device.type for p in net.parameters()})
        return net

    monkeypatch.setattr(cls, "architecture", Architecture(cls.architecture.name, spying_build))
    assert seen == []
    widths = {g: max(1, k // 4) for g, k in cls.FULL_WIDTHS.items()}
    narrow = cls(widths, num_classes=10, in_channels=3)
    assert seen == [{"meta"}]
    assert {p.device.type for p in narrow.parameters()} == {"cpu"}
    norms = [m for m in narrow.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in narrow.modules() if isinstance(m, nn.Conv2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)  # initialised by reset_parameters
    assert all(0 < m.weight.std() < 1 for m in convs)


def test_a_partial_update_touches_exactly_its_slice(derived):
    """Fusing one participant's changed slice changes the global elements its plan holds and no other."""
    _, full, spec = derived
    state = full.state_dict()
    plan = _random_plan(spec, 0.25, seed=2)
    trained = {k: (v + 1 if v.is_floating_point() else v) for k, v in slice_state(state, spec, plan).items()}
    merged = aggregate(state, spec, [SubmodelUpdate(plan, trained, 1.0)])
    positions = spec.positions(plan)
    for key, before in state.items():
        if not before.is_floating_point():
            continue
        held = torch.zeros(before.numel(), dtype=torch.bool)
        held[flat_positions(before.shape, positions.get(key, ())).reshape(-1)] = True
        changed = (merged[key] != before).reshape(-1)
        assert torch.equal(changed, held), key


class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.grouped(self.a(x)).mean((2, 3)))


@pytest.mark.parametrize(("model", "names"), [(_Grouped, "grouped")])
def test_what_derivation_cannot_split_is_a_one_line_error_naming_the_module(model, names):
    with pytest.raises(DerivationError, match=rf"^{names}: .*by hand") as error:
        derive_groups(model(), torch.zeros(2, 3, 8, 8))
    assert "\n" not in str(error.value)


def test_groups_skip_the_models_outputs_and_inputs():
    """The classes and the input channels are never a group's axis."""
    groups = derive_groups(build_model("torchvision:resnet18").net, torch.zeros(2, 3, 32, 32))
    axes = {(a.tensor, a.dim) for g in groups for a in g.axes}
    assert ("fc.weight", 0) not in axes and ("fc.bias", 0) not in axes and ("conv1.weight", 1) not in axes
    assert ("fc.weight", 1) in axes and ("conv1.weight", 0) in axes


def test_a_users_own_module_becomes_a_model_class(monkeypatch):
    """derived_model_class: a plain nn.Module, its groups derived, runs at any width through the engine,
    and a run config names it once it is in MODELS."""

    class Mlp(nn.Module):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.norm = nn.BatchNorm2d(16)
            self.hidden = nn.Linear(16 * 4 * 4, 32)
            self.out = nn.Linear(32, num_classes)

        def forward(self, x):
            x = nn.functional.adaptive_avg_pool2d(torch.relu(self.norm(self.conv(x))), 4).flatten(1)
            return self.out(torch.relu(self.hidden(x)))

    cls = derived_model_class(Architecture("mlp", Mlp, example_size=(8, 8)))
    assert cls.FULL_WIDTHS == {"conv": 16, "hidden": 32}
    assert cls.feature_group == "hidden" and cls.head_module == "out"
    full = cls(num_classes=3)
    spec = SplitSpec.from_model(full)
    assert spec.groups["conv"].axes[-1].unit == 16  # the flatten: 4x4 positions per channel
    plan = {"conv": torch.tensor([1, 5, 9, 13]), "hidden": torch.arange(0, 32, 4)}
    narrow = cls(plan_widths(plan), num_classes=3)
    narrow.load_state_dict(slice_state(full.state_dict(), spec, plan))
    assert narrow(torch.randn(2, 3, 8, 8)).shape == (2, 3)
    from msfusion_flwr.models import MODELS

    monkeypatch.setitem(MODELS, "mlp", cls)
    assert RunConfig.from_mapping({"model": "mlp", "block-count": 0}).model.name == "mlp"
    assert build_model("mlp", {"conv": 4, "hidden": 8}, num_classes=3).state_dict()["net.out.weight"].shape == (3, 8)


def test_config_takes_torchvision_names_and_refuses_what_it_cannot_run():
    assert RunConfig.from_mapping({"model": "torchvision:resnet18", "dataset": "fashion-mnist"}).model.name == "torchvision:resnet18"
    with pytest.raises(ConfigError, match=r"^config key 'model': torchvision has no classification model 'resnet7'"):
        RunConfig.from_mapping({"model": "torchvision:resnet7"})
    with pytest.raises(ConfigError, match=r"^config key 'output-scaling' must be 'calibrated' or 'none'"):
        RunConfig.from_mapping({"model": "torchvision:resnet18", "output-scaling": "scaler"})
    with pytest.raises(ConfigError, match=r"^config key 'model' must be one of .*torchvision:<name>"):
        RunConfig.from_mapping({"model": "resnet18"})
    with pytest.raises(ConfigError, match=r"^config key 'model': transformers model type 'bert' has no image-classification model"):
        RunConfig.from_mapping({"model": "hf:bert"})
    with pytest.raises(ConfigError, match=r"^config key 'model': .*grouped convolution"):
        RunConfig.from_mapping({"model": "hf:regnet"})


def test_msfusion_trains_a_torchvision_model_through_the_simulation_engine(tmp_path, monkeypatch):
    """One round of MSfusion (its default: 2 blocks) on torchvision's MobileNetV2 (depthwise convs; grayscale
    Fashion-MNIST, r = 1/4): both replies are fused into the global model, which the server builds 2 blocks wide
    (half of every width group) from the derived class, and the round's coverage is partial. The server
    evaluates on 500 test images (the full test set would take most of the test's time)."""
    from torch.utils.data import TensorDataset

    from msfusion_flwr.apps import run_experiment
    from msfusion_flwr.server import run as server_run
    from msfusion_flwr.server.reporting import MODEL_FILE, read_metrics

    load_test_set = server_run.load_test_set
    monkeypatch.setattr(server_run, "load_test_set", lambda data: TensorDataset(*load_test_set(data)[:500]))

    torch.manual_seed(0)
    out = run_experiment(
        {
            "model": "torchvision:mobilenet_v2", "num-server-rounds": 1, "data-fraction": 0.02, "partitioner": "iid",
            "min-available-nodes": 2, "output-dir": str(tmp_path),
        },
        num_supernodes=2,
    )  # fmt: skip
    rows = read_metrics(out)
    assert rows[-1]["participants"] == [0, 1] and rows[-1]["failures"] == []
    assert 0 < rows[-1]["coverage"] < 1
    fused = torch.load(out / MODEL_FILE)
    from msfusion_flwr.server.methods import global_widths

    widths = global_widths(RunConfig.from_mapping({"model": "torchvision:mobilenet_v2"}))
    assert widths == {g: 2 * round(k / 4) for g, k in model_class("torchvision:mobilenet_v2").FULL_WIDTHS.items()}
    assert {k: v.shape for k, v in fused.items()} == {k: v.shape for k, v in build_model("torchvision:mobilenet_v2", widths).state_dict().items()}
