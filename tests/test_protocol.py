"""Message protocol: index plans survive the ConfigRecord round trip; array bytes are counted exactly."""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, Metadata, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from msfusion_flwr.config import DEFAULTS, RunConfig
from msfusion_flwr.engine.policies import DoubleShift
from msfusion_flwr.models import build_model
from msfusion_flwr.protocol import (
    CLIENT_KEYS,
    SERVER_ROUND,
    SPLIT_RATE,
    STATE_TAG,
    TrainInstructions,
    array_bytes,
    client_config,
    decode_plan,
    encode_plan,
    message_array_bytes,
)

group_names = st.from_regex(r"[a-z][a-z0-9_.]{0,8}", fullmatch=True)


@st.composite
def plans(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    names = draw(st.lists(group_names, min_size=1, max_size=5, unique=True))
    plan, widths = {}, {}
    for name in names:
        width = draw(st.integers(min_value=1, max_value=600))
        units = draw(st.lists(st.integers(0, width - 1), min_size=1, max_size=min(width, 40), unique=True))
        plan[name] = torch.tensor(units, dtype=torch.long)
        widths[name] = width
    return plan, widths


@settings(max_examples=150, deadline=None)
@given(plan_widths=plans())
def test_encode_decode_round_trip(plan_widths):
    """decode_plan(encode_plan(plan, widths)) gives back the same indices (same order, int64) and widths."""
    plan, widths = plan_widths
    decoded, decoded_widths = decode_plan(encode_plan(plan, widths))
    assert decoded_widths == widths
    assert set(decoded) == set(plan)
    for name, index in plan.items():
        assert decoded[name].dtype == torch.int64
        assert decoded[name].tolist() == index.tolist()


def test_round_trip_of_policy_plan():
    """A real double-shift plan of the CNN round-trips, and the record holds plain int lists."""
    widths = {"conv1": 64, "conv2": 128, "conv3": 256, "fc": 512}
    plan = DoubleShift().plan(widths, 0.25, 3, 4, 7)
    record = encode_plan(plan, widths)
    assert set(record) == {f"{kind}.{g}" for g in widths for kind in ("index", "width")}
    assert record["width.fc"] == 512
    assert record["index.fc"] == plan["fc"].tolist()
    decoded, decoded_widths = decode_plan(record)
    assert decoded_widths == widths
    assert all(torch.equal(decoded[g], plan[g]) for g in widths)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool]


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    n = draw(st.integers(min_value=0, max_value=6))
    out = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
        dtype = draw(st.sampled_from(DTYPES))
        out[f"t{i}"] = torch.zeros(shape, dtype=dtype)
    return out


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@settings(max_examples=100, deadline=None)
@given(state=state_dicts())
def test_array_bytes_is_sum_of_tensor_bytes(state):
    """array_bytes of an ArrayRecord built from a state dict is the sum of numel * element_size."""
    assert array_bytes(ArrayRecord(state)) == nbytes(state)


def test_array_bytes_of_cnn_and_messages():
    """The full CNN counts 4 bytes per parameter; a message sums all its ArrayRecords and nothing else."""
    full = build_model("cnn").state_dict()
    narrow = build_model("cnn", {"conv1": 16, "conv2": 32, "conv3": 64, "fc": 128}).state_dict()
    assert array_bytes(ArrayRecord(full)) == 4 * sum(t.numel() for t in full.values())
    content = RecordDict(
        {
            "a": ArrayRecord(full),
            "b": ArrayRecord(narrow),
            "config": ConfigRecord({"x": [1, 2, 3]}),
        }
    )
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    message = Message(content, metadata=metadata)
    assert message_array_bytes(message) == nbytes(full) + nbytes(narrow)
    assert array_bytes(ArrayRecord({"x": torch.zeros(3, 4)})) == 48


def test_client_config_carries_client_keys():
    """client_config copies exactly the keys a ClientApp needs, with their values, and tags them with the run."""
    record = client_config(RunConfig())
    assert set(record) == set(CLIENT_KEYS) | {STATE_TAG}
    assert all(record[k] == DEFAULTS[k] for k in CLIENT_KEYS)
    assert record[STATE_TAG] == RunConfig().fingerprint()


def test_a_participant_reads_the_server_config_back_typed():
    """TrainInstructions from a train message's record equal the server's typed sections, for changed values too."""
    run = RunConfig.from_mapping({"dataset": "wikitext-2", "model": "gpt2", "partitioner": "contiguous",
                                  "learning-rate": 1, "seq-len": 32, "output-scaling": "none",
                                  "dropout-rate": 0.25, "round-timeout": 9, "participant-state-dir": "/tmp/s"})
    record = client_config(run)
    record[SERVER_ROUND], record[SPLIT_RATE] = 3, 0.5
    got = TrainInstructions.from_record(record)
    assert (got.model, got.data, got.local, got.faults) == (run.model, run.data, run.local, run.faults)
    assert got.local.learning_rate == 1.0 and isinstance(got.local.learning_rate, float)
    assert (got.round_timeout, got.participant_state_dir, got.server_round, got.split_rate) == (9.0, "/tmp/s", 3, 0.5)
    assert got.state_tag == run.fingerprint()


@settings(max_examples=60, deadline=None)
@given(rounds=st.integers(1, 500), rate=st.floats(1e-4, 1.0))
def test_a_cosine_schedule_sends_each_round_its_annealed_rate(rounds, rate):
    """Round t of T is sent rate (1 + cos(pi (t - 1) / T)) / 2: the full rate first, falling every round, never 0;
    the constant schedule sends the rate unchanged."""
    run = RunConfig.from_mapping({"learning-rate": rate, "learning-rate-schedule": "cosine", "num-server-rounds": rounds})
    sent = [client_config(run, t)["learning-rate"] for t in range(1, rounds + 1)]
    assert sent == [rate * (1 + math.cos(math.pi * (t - 1) / rounds)) / 2 for t in range(1, rounds + 1)]
    assert sent[0] == rate and all(0 < b < a for a, b in zip(sent, sent[1:]))
    constant = RunConfig.from_mapping({"learning-rate": rate, "num-server-rounds": rounds})
    assert {client_config(constant, t)["learning-rate"] for t in (1, rounds)} == {rate}
