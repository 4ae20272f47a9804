"""The comparison harness: matrix expansion, summaries, tables, and one short resumable run."""

from __future__ import annotations

import csv

import pytest

from msfusion_flwr.comparison import (
    MatrixError,
    expand,
    load_matrix,
    markdown_table,
    rounds_to_reach,
    run_matrix,
    select,
    summarize_run,
    write_report,
)
from msfusion_flwr.config import ConfigError

MATRIX = """
target-accuracy = 0.3
[base]
num-server-rounds = {rounds}
data-fraction = 0.02
partitioner = "iid"
eval-every = 1
[variants]
msfusion-no-round-shift = {{ method = "msfusion", shift-step = 0 }}
[matrix]
variant = {variants}
seed = {seeds}
num-supernodes = [2]
{points}
"""


def write_matrix(tmp_path, rounds=1, variants='["msfusion", "msfusion-no-round-shift"]', seeds="[0]", points=""):
    path = tmp_path / "matrix.toml"
    path.write_text(MATRIX.format(rounds=rounds, variants=variants, seeds=seeds, points=points))
    return path


def test_expand_takes_the_product_applies_variants_and_zips_points(tmp_path):
    """variants x seeds x points, each with its overrides, unique run ids, min-available-nodes = supernodes."""
    points = "[[points]]\nsplit-ratio = 0.5\n[[points]]\nsplit-ratio = 0.25\n"
    specs = expand(load_matrix(write_matrix(tmp_path, seeds="[0, 1, 2]", points=points)))
    assert len(specs) == 2 * 3 * 2
    assert len({s.run_id for s in specs}) == len(specs)
    ablation = [s for s in specs if s.variant == "msfusion-no-round-shift"]
    assert all(s.config["shift-step"] == 0 and s.config["method"] == "msfusion" for s in ablation)
    assert {s.config["split-ratio"] for s in specs} == {0.5, 0.25}
    assert all(s.config["min-available-nodes"] == 2 for s in specs)


def test_select_keeps_matching_runs_with_unchanged_ids(tmp_path):
    """--only seed=1 picks one seed of every variant; ids equal the full matrix's; bad filters are one-line errors."""
    specs = expand(load_matrix(write_matrix(tmp_path, seeds="[0, 1, 2]")))
    chosen = select(specs, ["seed=1"])
    assert [s.run_id for s in chosen] == [s.run_id for s in specs if s.labels["seed"] == 1]
    assert len(chosen) == 2 and all("seed=1" in s.run_id for s in chosen)
    assert select(specs, ["seed=1", "variant=msfusion"]) == [s for s in chosen if s.variant == "msfusion"]
    assert select(specs, []) == list(specs)
    with pytest.raises(MatrixError, match="not an axis"):
        select(specs, ["colour=red"])
    with pytest.raises(MatrixError, match="key=value"):
        select(specs, ["seed"])


def test_bad_matrices_fail_before_running(tmp_path):
    """An unknown variant is a MatrixError, a bad run-config value a ConfigError, both before any run."""
    with pytest.raises(MatrixError, match="fedsomething"):
        load_matrix(write_matrix(tmp_path, variants='["fedsomething"]'))
    bad = write_matrix(tmp_path, points="[[points]]\nsplit-ratio = 3.0\n")
    with pytest.raises(ConfigError, match="split-ratio"):
        expand(load_matrix(bad))


def test_summaries_and_table_from_hand_made_rows(tmp_path):
    """Rounds to target, final/best accuracy, per-round cost means, and mean ± std in the table."""
    spec = expand(load_matrix(write_matrix(tmp_path, rounds=3)))[0]
    rows = [
        {"round": 0, "accuracy": 0.1, "loss": 2.3, "failures": []},
        {"round": 1, "accuracy": 0.5, "loss": 1.0, "flops_max": 10.0, "failures": ["x"], "cum_flops_per_participant_max": 10.0},
        {"round": 2, "accuracy": 0.7, "loss": 0.8, "flops_max": 30.0, "failures": [], "cum_flops_per_participant_max": 40.0},
        {"round": 3, "accuracy": 0.6, "loss": 0.9, "flops_max": 20.0, "failures": [], "cum_flops_per_participant_max": 60.0, "elapsed_s": 5.0},
    ]
    assert rounds_to_reach(rows, 0.65) == 2 and rounds_to_reach(rows, 0.9) is None
    summary = summarize_run(spec, rows, target=0.65)
    assert summary["final_accuracy"] == 0.6 and summary["best_accuracy"] == 0.7
    assert summary["flops_max_per_round"] == 20.0 and summary["cum_flops_per_participant_max"] == 60.0
    assert summary["failed_replies"] == 1 and summary["rounds_to_target"] == 2
    other = {**summary, "final_accuracy": 0.8, "rounds_to_target": None}
    table = markdown_table([summary, other], ["variant"], target=0.65)
    assert "0.7000 ± 0.1414" in table  # mean and sample std of 0.6 and 0.8
    assert "2.0 (1/2 reached)" in table


def test_short_harness_run_end_to_end_and_resumes(tmp_path):
    """Two 1-round runs write runs/, results.csv, results.md and plots; a second call runs nothing."""
    matrix = load_matrix(write_matrix(tmp_path))
    specs = expand(matrix)
    results = tmp_path / "results"
    ran = run_matrix(specs, results)
    assert [s.run_id for s in ran] == [s.run_id for s in specs]
    assert run_matrix(specs, results) == []  # resumable: finished runs are skipped
    paths = write_report(matrix, specs, results)
    assert {p.name for p in paths} >= {"results.csv", "results.md", "accuracy_vs_round.png",
                                        "accuracy_vs_participant_flops.png", "accuracy_vs_participant_bytes.png"}
    with open(results / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["variant"] for r in rows) == ["msfusion", "msfusion-no-round-shift"]
    assert all(float(r["final_accuracy"]) > 0.1 and float(r["flops_max_per_round"]) > 0 for r in rows)
    assert "2 of 2 runs finished" in (results / "results.md").read_text()


def test_every_preset_in_conf_is_valid():
    """Every conf/*.toml is a valid run config, or (compare-*) a matrix whose runs all resolve."""
    import tomllib
    from pathlib import Path

    from msfusion_flwr.config import resolve_config

    presets = sorted((Path(__file__).resolve().parents[1] / "conf").glob("*.toml"))
    assert presets
    for path in presets:
        if path.name.startswith("compare-"):
            assert expand(load_matrix(path))
        else:
            resolve_config(tomllib.loads(path.read_text()))
