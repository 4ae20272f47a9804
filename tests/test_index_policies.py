"""Property tests of MSfusion's double-shift index policy against its definition.

Definition (for a group of width K, split ratio r, M participants, rank j,
1-based round t, shift step d):

* window length ``w = max(1, round(r * K))`` (Python round);
* start ``s = (floor(j * K / M) + (t - 1) * d) mod K`` for ``overlap="auto"``,
  ``s = (floor(j * (1 - x) * w) + (t - 1) * d) mod K`` for ``overlap=x``;
* index set ``{s, ..., s + w - 1} mod K``, returned ascending, int64, unique.

The references below use plain Python ints (and exact fractions for x) only.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msfusion_flwr.engine.policies import DoubleShift

SETTINGS = settings(max_examples=150, deadline=None)

widths_st = st.integers(min_value=1, max_value=200)
ratio_st = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False)
round_st = st.integers(min_value=1, max_value=60)
step_st = st.integers(min_value=0, max_value=300)
# Fixed overlaps as exact decimals k/100, so the reference floor is exact.
overlap_pct_st = st.integers(min_value=0, max_value=99)


@st.composite
def rank_and_count(draw: st.DrawFn) -> tuple[int, int]:
    m = draw(st.integers(min_value=1, max_value=16))
    return draw(st.integers(min_value=0, max_value=m - 1)), m


def ref_length(ratio: float, width: int) -> int:
    return max(1, round(ratio * width))


def ref_start(width: int, ratio: float, rank: int, m: int, t: int, d: int, overlap_pct: int | None) -> int:
    w = ref_length(ratio, width)
    if overlap_pct is None:
        offset = (rank * width) // m
    else:
        offset = math.floor(rank * (1 - Fraction(overlap_pct, 100)) * w)
    return (offset + (t - 1) * d) % width


def ref_set(width: int, ratio: float, rank: int, m: int, t: int, d: int, overlap_pct: int | None) -> list[int]:
    s = ref_start(width, ratio, rank, m, t, d, overlap_pct)
    w = ref_length(ratio, width)
    return sorted({(s + i) % width for i in range(w)})


def policy(overlap_pct: int | None, d: int) -> DoubleShift:
    return DoubleShift(shift_step=d, overlap="auto" if overlap_pct is None else overlap_pct / 100)


def window_start(indices: list[int], width: int) -> int:
    """The unit that starts a cyclic window strictly shorter than the width."""
    held = set(indices)
    starts = [i for i in indices if (i - 1) % width not in held]
    assert len(starts) == 1, f"{indices} is not one cyclic window of {width}"
    return starts[0]


@SETTINGS
@given(
    width=widths_st,
    ratio=ratio_st,
    rank_m=rank_and_count(),
    t=round_st,
    d=step_st,
    overlap_pct=st.none() | overlap_pct_st,
)
def test_plan_matches_definition(width, ratio, rank_m, t, d, overlap_pct):
    """The plan's index set equals the defined window, sorted, int64 and unique."""
    rank, m = rank_m
    idx = policy(overlap_pct, d).plan({"g": width}, ratio, rank, m, t)["g"]
    assert idx.dtype == torch.int64
    assert idx.dim() == 1
    values = idx.tolist()
    assert values == ref_set(width, ratio, rank, m, t, d, overlap_pct)
    assert len(values) == len(set(values)) == ref_length(ratio, width)
    assert values == sorted(values)
    assert all(0 <= v < width for v in values)


@SETTINGS
@given(
    group_widths=st.lists(widths_st, min_size=1, max_size=5),
    ratio=ratio_st,
    rank_m=rank_and_count(),
    t=round_st,
    d=step_st,
    overlap_pct=st.none() | overlap_pct_st,
)
def test_every_group_uses_its_own_width(group_widths, ratio, rank_m, t, d, overlap_pct):
    """Each group of a multi-group plan is the window computed from that group's own K."""
    rank, m = rank_m
    widths = {f"group{i}": k for i, k in enumerate(group_widths)}
    plan = policy(overlap_pct, d).plan(widths, ratio, rank, m, t)
    assert set(plan) == set(widths)
    for name, k in widths.items():
        assert plan[name].tolist() == ref_set(k, ratio, rank, m, t, d, overlap_pct)


@SETTINGS
@given(width=st.integers(min_value=2, max_value=200), data=st.data())
def test_window_crossing_the_end_wraps_to_zero(width, data):
    """A window whose start + length exceeds K holds both K-1 and 0, in ascending order."""
    w = data.draw(st.integers(min_value=2, max_value=width), label="w")
    ratio = w / width
    assert ref_length(ratio, width) == w
    # rank 0, auto overlap: start = (t - 1) * d mod K; pick it so the window wraps.
    start = data.draw(st.integers(min_value=width - w + 1, max_value=width - 1), label="start")
    idx = DoubleShift(shift_step=start).plan({"g": width}, ratio, 0, 1, 2)["g"].tolist()
    assert 0 in idx and width - 1 in idx
    assert idx == sorted(list(range(0, start + w - width)) + list(range(start, width)))
    assert len(idx) == w


@SETTINGS
@given(width=widths_st, ratio=ratio_st, m=st.integers(min_value=1, max_value=24), t=round_st, d=step_st)
def test_auto_overlap_coverage_counts(width, ratio, m, t, d):
    """With auto overlap every unit is held by floor(wM/K) or ceil(wM/K) of the M participants.

    Derivation: unit u is held by rank j iff floor(jK/M) falls in a cyclic run of
    w integers, i.e. iff j lies in a real interval of length wM/K, which contains
    floor(wM/K) or ceil(wM/K) integers. So wM >= K covers every unit, and the
    counts differ from r*M by less than 1 + M*|w - rK|/K.
    """
    shift = DoubleShift(shift_step=d)
    w = ref_length(ratio, width)
    counts = [0] * width
    naive = [0] * width
    for j in range(m):
        for u in shift.plan({"g": width}, ratio, j, m, t)["g"].tolist():
            counts[u] += 1
        for u in ref_set(width, ratio, j, m, t, d, None):
            naive[u] += 1
    assert counts == naive
    lo, hi = (w * m) // width, -((-w * m) // width)
    assert all(lo <= c <= hi for c in counts), (counts, lo, hi)
    assert max(counts) - min(counts) <= 1
    assert sum(counts) == w * m
    if w * m >= width:
        assert min(counts) >= 1
    bound = 1 + m * abs(w - ratio * width) / width
    assert all(abs(c - ratio * m) < bound + 1e-9 for c in counts)


@SETTINGS
@given(
    width=st.integers(min_value=2, max_value=200),
    ratio=ratio_st,
    m=st.integers(min_value=2, max_value=16),
    t=round_st,
    d=step_st,
    overlap_pct=st.none() | overlap_pct_st,
    data=st.data(),
)
def test_inter_participant_shift(width, ratio, m, t, d, overlap_pct, data):
    """Rank j+1's window starts later than rank j's by exactly the inter-participant term (mod K)."""
    w = ref_length(ratio, width)
    if w >= width:
        return  # a full window has no start to compare
    j = data.draw(st.integers(min_value=0, max_value=m - 2), label="j")
    shift = policy(overlap_pct, d)
    a = window_start(shift.plan({"g": width}, ratio, j, m, t)["g"].tolist(), width)
    b = window_start(shift.plan({"g": width}, ratio, j + 1, m, t)["g"].tolist(), width)
    if overlap_pct is None:
        term = ((j + 1) * width) // m - (j * width) // m
    else:
        spacing = (1 - Fraction(overlap_pct, 100)) * w
        term = math.floor((j + 1) * spacing) - math.floor(j * spacing)
    assert (b - a) % width == term % width


@SETTINGS
@given(
    width=st.integers(min_value=2, max_value=200),
    ratio=ratio_st,
    rank_m=rank_and_count(),
    t=round_st,
    d=step_st,
    overlap_pct=st.none() | overlap_pct_st,
)
def test_round_shift(width, ratio, rank_m, t, d, overlap_pct):
    """Round t+1's window starts d units (mod K) after round t's."""
    rank, m = rank_m
    if ref_length(ratio, width) >= width:
        return
    shift = policy(overlap_pct, d)
    a = window_start(shift.plan({"g": width}, ratio, rank, m, t)["g"].tolist(), width)
    b = window_start(shift.plan({"g": width}, ratio, rank, m, t + 1)["g"].tolist(), width)
    assert (b - a) % width == d % width


@SETTINGS
@given(
    group_widths=st.lists(widths_st, min_size=1, max_size=4),
    ratio=ratio_st,
    rank_m=rank_and_count(),
    rounds=st.lists(round_st, min_size=2, max_size=5),
    overlap_pct=st.none() | overlap_pct_st,
)
def test_shift_step_zero_is_static(group_widths, ratio, rank_m, rounds, overlap_pct):
    """With shift step 0 a participant gets the same plan in every round."""
    rank, m = rank_m
    widths = {f"g{i}": k for i, k in enumerate(group_widths)}
    shift = policy(overlap_pct, 0)
    first = shift.plan(widths, ratio, rank, m, rounds[0])
    for t in rounds[1:]:
        other = shift.plan(widths, ratio, rank, m, t)
        assert all(torch.equal(first[g], other[g]) for g in widths)


@SETTINGS
@given(
    group_widths=st.lists(widths_st, min_size=1, max_size=4),
    rank_m=rank_and_count(),
    t=round_st,
    d=step_st,
    overlap_pct=st.none() | overlap_pct_st,
)
def test_full_ratio_is_whole_model(group_widths, rank_m, t, d, overlap_pct):
    """r = 1 gives arange(K) for every group, participant and round."""
    rank, m = rank_m
    widths = {f"g{i}": k for i, k in enumerate(group_widths)}
    plan = policy(overlap_pct, d).plan(widths, 1.0, rank, m, t)
    for name, k in widths.items():
        assert torch.equal(plan[name], torch.arange(k, dtype=torch.int64))


def test_known_example():
    """A hand-worked case: K=10, r=0.3, M=4, round 3, d=2."""
    shift = DoubleShift(shift_step=2)
    # w = 3; starts = floor(j*10/4) + 4 = 4, 6, 9, 11 -> 1
    expected = [[4, 5, 6], [6, 7, 8], [0, 1, 9], [1, 2, 3]]
    got = [shift.plan({"g": 10}, 0.3, j, 4, 3)["g"].tolist() for j in range(4)]
    assert got == expected
    # fixed overlap 0.5: spacing 1.5 -> offsets 0, 1, 3, 4
    half = DoubleShift(shift_step=0, overlap=0.5)
    got = [half.plan({"g": 10}, 0.3, j, 4, 7)["g"].tolist() for j in range(4)]
    assert got == [[0, 1, 2], [1, 2, 3], [3, 4, 5], [4, 5, 6]]
