"""The comparison harness: matrix expansion, summaries, tables, and one short resumable run."""

from __future__ import annotations

import csv
import json
import math
import random

import pytest

from msfusion_flwr.config import ConfigError
from msfusion_flwr.experiments.comparison import (
    MatrixError,
    can_resume,
    change_over_last_rounds,
    curve_styles,
    expand,
    is_complete,
    load_matrix,
    markdown_table,
    rounds_to_reach,
    run_matrix,
    select,
    summarize_run,
    write_report,
)

MATRIX = """
{head}
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


def write_matrix(tmp_path, rounds=1, variants='["msfusion", "msfusion-no-round-shift"]', seeds="[0]", points="", head="target-accuracy = 0.3"):
    path = tmp_path / "matrix.toml"
    path.write_text(MATRIX.format(rounds=rounds, variants=variants, seeds=seeds, points=points, head=head))
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
        {"round": 0, "accuracy": 0.1, "loss": 2.3, "failures": [], "coverage": 0.0},
        {"round": 1, "accuracy": 0.5, "loss": 1.0, "flops_max": 10.0, "failures": ["x"], "cum_flops_per_participant_max": 10.0, "coverage": 0.3},
        {"round": 2, "accuracy": 0.7, "loss": 0.8, "flops_max": 30.0, "failures": [], "cum_flops_per_participant_max": 40.0, "coverage": 0.5},
        {"round": 3, "accuracy": 0.6, "loss": 0.9, "flops_max": 20.0, "failures": [], "cum_flops_per_participant_max": 60.0, "elapsed_s": 5.0, "coverage": 0.6},
    ]
    assert rounds_to_reach(rows, 0.65) == 2 and rounds_to_reach(rows, 0.9) is None
    summary = summarize_run(spec, rows, target=0.65)
    assert summary["final_accuracy"] == 0.6 and summary["best_accuracy"] == 0.7
    assert summary["flops_max_per_round"] == 20.0 and summary["cum_flops_per_participant_max"] == 60.0
    assert summary["failed_replies"] == 1 and summary["rounds_to_target"] == 2
    assert summary["final_coverage"] == 0.6
    other = {**summary, "final_accuracy": 0.8, "rounds_to_target": None, "seed": 1, "final_coverage": 0.8}
    table = markdown_table([other, summary], ["variant"], target=0.65)
    assert "0.7000 ± 0.1414" in table  # mean and sample std of 0.6 and 0.8
    assert "| 0.6000 / 0.8000 |" in table  # per seed, in seed order (seed 0 first)
    assert "2.0 (1/2 reached) | 0.700 |" in table  # coverage at the end: mean of 0.6 and 0.8
    assert "| variant | seeds | final acc | best acc | final acc per seed | change over last 10 rounds per seed (points) | rounds to 65% | coverage at end | FLOPs" in table
    assert summary["change_last_10_rounds"] is None  # 3 rounds: no evaluation 10 rounds before the last
    assert "| 0.6000 / 0.8000 | — / — |" in table
    assert "final_perplexity" not in summary  # classification rows (no perplexity key) add no column


def test_attack_matrix_summaries_count_screened_attackers_and_epsilon(tmp_path):
    """Screened-out replies are split into the simulated attackers' and honest ones (from the seeded choice of
    attackers); a private run's epsilon at the end gets a column, "∞" for a run without noise."""
    from msfusion_flwr.config import FaultSettings
    from msfusion_flwr.device.faults import is_attacker

    spec = expand(load_matrix(write_matrix(tmp_path, rounds=2)))[0]
    spec.config.update({"attack": "sign-flip", "attack-fraction": 0.5})
    n = spec.num_supernodes
    attackers = [p for p in range(n) if is_attacker(FaultSettings(attack="sign-flip", attack_fraction=0.5), spec.run.seed, p, n)]
    honest = [p for p in range(n) if p not in attackers]
    rows = [
        {"round": 0, "accuracy": 0.1, "loss": 2.3, "failures": []},
        {"round": 1, "accuracy": 0.5, "loss": 1.0, "failures": [], "screened_out": [*attackers, honest[0]], "dp_epsilon": 3.0},
        {"round": 2, "accuracy": 0.6, "loss": 0.9, "failures": [], "screened_out": attackers[:1], "dp_epsilon": 4.5},
    ]
    summary = summarize_run(spec, rows, target=0.65)
    assert summary["screened_attackers"] == len(attackers) + 1 and summary["screened_honest"] == 1
    assert summary["final_dp_epsilon"] == 4.5
    clean = {**summary, "variant": "clean", "screened_attackers": 0, "screened_honest": 0, "final_dp_epsilon": None}
    table = markdown_table([summary, clean], ["variant"], target=None)
    header = table.splitlines()[0]
    assert "epsilon at end" in header and header.endswith("screened out: attackers / honest (replies) |")
    assert f"| {len(attackers) + 1} / 1 |" in table and "| 4.5 |" in table and "| ∞ |" in table
    plain = markdown_table([clean], ["variant"], target=None)
    assert "epsilon" not in plain and "screened" not in plain


def lm_rows():
    """A language-model run: perplexity falls from 1000 to 150 at round 2, then 180; round 1 not evaluated."""
    ppl = {0: 1000.0, 2: 150.0, 3: 180.0}
    accuracy = {0: 0.05, 2: 0.25, 3: 0.2}
    rows = []
    for t in range(4):
        evaluated = t in ppl
        rows.append({
            "round": t, "accuracy": accuracy.get(t), "loss": math.log(ppl[t]) if evaluated else None,
            "perplexity": ppl.get(t), "participants": [0, 1] if t else [], "bytes_down": 8, "bytes_up": 8,
            "failures": [], "wall_s": 1.0, "elapsed_s": float(t), "flops_max": 5.0,
            "cum_flops_per_participant_max": 5.0 * t, "cum_bytes_down_per_participant_max": 8.0 * t,
            "cum_bytes_up_per_participant_max": 8.0 * t,
        })
    return rows


def test_rounds_to_reach_honours_the_metric_direction():
    """Accuracy reaches at >= target, perplexity and loss at <= target; unevaluated and old rows never reach."""
    rows = lm_rows()
    assert rounds_to_reach(rows, 0.2) == 2 and rounds_to_reach(rows, 0.25, "accuracy") == 2
    assert rounds_to_reach(rows, 0.3, "accuracy") is None
    assert rounds_to_reach(rows, 1000.0, "perplexity") == 0  # equality reaches
    assert rounds_to_reach(rows, 200.0, "perplexity") == 2
    assert rounds_to_reach(rows, 160.0, "perplexity") == 2
    assert rounds_to_reach(rows, 149.0, "perplexity") is None
    assert rounds_to_reach(rows, math.log(180.0), "loss") == 2
    assert rounds_to_reach(rows, 5.0, "loss") is None
    old = [{k: v for k, v in r.items() if k != "perplexity"} for r in rows]  # metrics.jsonl written before perplexity
    assert rounds_to_reach(old, 1e9, "perplexity") is None
    with pytest.raises(ValueError, match="bleu"):
        rounds_to_reach(rows, 1.0, "bleu")


def test_perplexity_summaries_and_table_from_hand_made_lm_rows(tmp_path):
    """metric=perplexity: final/best (minimum) perplexity, rounds to perplexity <= target, and the table's columns."""
    spec = expand(load_matrix(write_matrix(tmp_path, rounds=3, head='metric = "perplexity"\ntarget = 200')))[0]
    summary = summarize_run(spec, lm_rows(), target=200.0, metric="perplexity")
    assert summary["final_perplexity"] == 180.0 and summary["best_perplexity"] == 150.0
    assert summary["rounds_to_target"] == 2
    assert summary["final_accuracy"] == pytest.approx(0.2) and summary["final_loss"] == pytest.approx(math.log(180.0))
    assert "best_accuracy" not in summary
    columns = list(summary)
    assert columns.index("final_perplexity") < columns.index("best_perplexity") < columns.index("rounds_to_target")
    assert summarize_run(spec, lm_rows(), target=149.0, metric="perplexity")["rounds_to_target"] is None
    assert summarize_run(spec, lm_rows(), target=None, metric="perplexity")["rounds_to_target"] is None
    by_loss = summarize_run(spec, lm_rows(), target=5.5, metric="loss")
    assert by_loss["best_loss"] == pytest.approx(math.log(150.0)) and by_loss["rounds_to_target"] == 2
    assert by_loss["final_perplexity"] == 180.0

    other = {**summary, "final_perplexity": 150.0, "best_perplexity": 120.0, "rounds_to_target": None}
    table = markdown_table([summary, other], ["variant"], target=200.0, metric="perplexity")
    header, _, row = table.splitlines()
    assert ("| final perplexity | best perplexity | final perplexity per seed | change over last 10 rounds per seed (%)"
            " | rounds to perplexity <= 200 | coverage at end | FLOPs") in header
    assert "| 165.00 ± 21.21 | 135.00 ± 21.21 | 180.00 / 150.00 | — / — | 2.0 (1/2 reached) | — |" in row  # 180 and 150; 150 and 120; no coverage in these rows
    assert "rounds to" not in markdown_table([summary], ["variant"], target=None, metric="perplexity")
    accuracy_table = markdown_table([{**summary, "best_accuracy": 0.3}], ["variant"], target=0.25, metric="accuracy")
    assert "rounds to 25%" in accuracy_table
    assert "rounds to loss <= 5.5" in markdown_table([by_loss], ["variant"], target=5.5, metric="loss")


def naive_change(rows, metric, rounds):
    """Issue 12's flatness measure, read off the rows by hand: final evaluation against the latest one at least
    ``rounds`` rounds before it."""
    evaluated = {r["round"]: r[metric] for r in rows if r.get(metric) is not None}
    last = max(evaluated)
    before = [t for t in evaluated if t <= last - rounds]
    if not before:
        return None
    then, now = evaluated[max(before)], evaluated[last]
    return 100 * (now - then) if metric == "accuracy" else 100 * (now / then - 1)


@pytest.mark.parametrize("eval_every", [1, 2, 4, 7])
@pytest.mark.parametrize("metric", ["accuracy", "perplexity", "loss"])
def test_change_over_last_rounds_matches_the_definition(eval_every, metric):
    """Random curves evaluated every k rounds (and always at the last): the change over the last 10 rounds is the
    final value against the latest evaluation at least 10 rounds earlier, in points for accuracy and in percent
    otherwise; None when the run is too short; a flat curve is 0."""
    rng = random.Random(eval_every)
    for rounds in (5, 10, 11, 30, 60):
        rows = [{"round": t, **({metric: rng.uniform(0.1, 300.0)} if t % eval_every == 0 or t == rounds else {})}
                for t in range(rounds + 1)]
        expected = naive_change(rows, metric, 10)
        got = change_over_last_rounds(rows, metric)
        assert (got is None) == (expected is None) == (rounds < 10)
        if expected is not None:
            assert got == pytest.approx(expected)
    flat = [{"round": t, metric: 0.5} for t in range(20)]
    assert change_over_last_rounds(flat, metric) == 0.0
    assert change_over_last_rounds([{"round": 0}], metric) is None


def test_change_over_last_rounds_in_summaries_and_table(tmp_path):
    """A 60-round run evaluated every 4 rounds: the window is 12 rounds (48 to 60); per seed in the table, signed."""
    spec = expand(load_matrix(write_matrix(tmp_path, rounds=60)))[0]
    rows = [{"round": t, "accuracy": 0.8 + t / 10000, "loss": 1.0, "failures": []} for t in range(0, 61, 4)]
    summary = summarize_run(spec, rows, target=None)
    assert summary["change_last_10_rounds"] == pytest.approx(100 * 12 / 10000)
    falling = {**summary, "seed": 1, "change_last_10_rounds": -0.5}
    row = markdown_table([summary, falling], ["variant"], target=None).splitlines()[2]
    assert "| +0.12 / -0.50 |" in row


def test_metric_and_target_keys_alias_and_one_line_errors(tmp_path):
    """metric/target parse; target-accuracy is accuracy's target; misuse and unknown metrics are one-line MatrixErrors."""
    def load(head):
        return load_matrix(write_matrix(tmp_path, head=head))

    default = load("")
    assert (default.metric, default.target) == ("accuracy", 0.8)
    assert (load("target-accuracy = 0.3").metric, load("target-accuracy = 0.3").target) == ("accuracy", 0.3)
    assert load("target = 0.4").target == 0.4
    lm = load('metric = "perplexity"\ntarget = 150')
    assert (lm.metric, lm.target) == ("perplexity", 150.0)
    assert load('metric = "loss"').target is None  # no default target for lower-is-better metrics
    bad = {
        'metric = "bleu"': "metric 'bleu'",
        "metric = 3": "metric 3",
        "target = 0.5\ntarget-accuracy = 0.5": "not both",
        'metric = "perplexity"\ntarget-accuracy = 0.5': "target-accuracy is for metric accuracy",
        'target = "high"': "target must be a number",
    }
    for head, message in bad.items():
        with pytest.raises(MatrixError, match=message) as error:
            load(head)
        assert "\n" not in str(error.value)


def test_perplexity_report_from_hand_made_runs(tmp_path):
    """write_report with metric=perplexity: CSV/Markdown columns and perplexity_vs_*.png, from runs written by hand."""
    from msfusion_flwr.config import resolve_config
    from msfusion_flwr.server.reporting import CONFIG_FILE, METRICS_FILE

    matrix = load_matrix(write_matrix(tmp_path, rounds=3, head='metric = "perplexity"\ntarget = 200'))
    specs = expand(matrix)
    results = tmp_path / "results"
    for spec in specs:
        out = spec.output_dir(results)
        out.mkdir(parents=True)
        (out / CONFIG_FILE).write_text(json.dumps({**resolve_config(spec.config), "output-dir": str(out)}))
        (out / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lm_rows()))
    paths = write_report(matrix, specs, results)
    assert {p.name for p in paths} == {"results.csv", "results.md", "perplexity_vs_round.png",
                                       "perplexity_vs_participant_flops.png", "perplexity_vs_participant_bytes.png",
                                       "coverage_vs_round.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths if p.suffix == ".png")
    with open(results / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["final_perplexity"]), float(r["best_perplexity"]), int(r["rounds_to_target"])) for r in rows] == [(180.0, 150.0, 2)] * 2
    md = (results / "results.md").read_text()
    assert "2 of 2 runs finished" in md and "rounds to perplexity <= 200" in md and "180.00 ± 0.00 | 150.00 ± 0.00" in md


def test_short_harness_run_end_to_end_and_resumes(tmp_path):
    """Two 1-round runs write runs/, results.csv, results.md and plots; a second call runs nothing."""
    matrix = load_matrix(write_matrix(tmp_path))
    specs = expand(matrix)
    results = tmp_path / "results"
    ran = run_matrix(specs, results)
    assert [s.run_id for s in ran] == [s.run_id for s in specs]
    assert run_matrix(specs, results) == []  # resumable: finished runs are skipped
    first = specs[0].output_dir(results) / "config.json"
    stored = json.loads(first.read_text())
    first.write_text(json.dumps({k: v for k, v in stored.items() if k != "vocab-size"}))  # a run from before the key
    assert is_complete(specs[0], results)
    first.write_text(json.dumps({**stored, "learning-rate": 0.5}))  # a run with another config
    assert not is_complete(specs[0], results)
    first.write_text(json.dumps(stored))
    paths = write_report(matrix, specs, results)
    assert {p.name for p in paths} >= {"results.csv", "results.md", "accuracy_vs_round.png",
                                        "accuracy_vs_participant_flops.png", "accuracy_vs_participant_bytes.png"}
    with open(results / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["variant"] for r in rows) == ["msfusion", "msfusion-no-round-shift"]
    assert all(float(r["final_accuracy"]) > 0.1 and float(r["flops_max_per_round"]) > 0 for r in rows)
    assert "2 of 2 runs finished" in (results / "results.md").read_text()


def test_a_checkpointed_run_continues_from_its_checkpoint_also_copied_and_longer(tmp_path):
    """With checkpoint-every, a run whose rows stop at its checkpoint (killed in the next round, or run with
    fewer rounds) continues from it in its folder, also a folder copied in from another results folder and with
    num-server-rounds raised, and ends as the uninterrupted run did, participants' state included (the contrastive
    term keeps each one's previous sub-model); a checkpoint of another config is not resumed."""
    import shutil

    import torch

    points = "[[points]]\ncheckpoint-every = 2\ncontrastive-weight = 1.0"
    (tmp_path / "m3").mkdir(), (tmp_path / "m2").mkdir()
    (longer,) = expand(load_matrix(write_matrix(tmp_path / "m3", rounds=3, variants='["msfusion"]', points=points)))
    (shorter,) = expand(load_matrix(write_matrix(tmp_path / "m2", rounds=2, variants='["msfusion"]', points=points)))
    assert longer.run_id == shorter.run_id
    run_matrix([longer], tmp_path / "reference", engine="in-process")  # no Ray: the harness is under test
    expected = (longer.output_dir(tmp_path / "reference") / "metrics.jsonl").read_text().splitlines()
    run_matrix([shorter], tmp_path / "short", engine="in-process")
    short = shorter.output_dir(tmp_path / "short")
    assert (short / "checkpoint.pt").is_file() and any((short / "participant-state").iterdir())
    results = tmp_path / "results"
    out = longer.output_dir(results)
    shutil.copytree(short, out)
    (out / "marker").write_text("kept")
    assert not is_complete(longer, results) and can_resume(longer, results)
    assert run_matrix([longer], results, engine="in-process") == [longer]
    assert (out / "marker").is_file()  # continued in place, not started again
    resumed = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in resumed] == [0, 1, 2, 3]
    for key in ("accuracy", "loss", "train_loss"):
        assert json.loads(resumed[3])[key] == json.loads(expected[3])[key]
    assert is_complete(longer, results)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["config"]["learning-rate"] = 0.5
    torch.save(checkpoint, out / "checkpoint.pt")
    assert not can_resume(longer, results)


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


def test_curve_styles_tell_twelve_variants_apart():
    """The Fashion-MNIST matrix plots 12 variants: no two may share colour and line style (tab10 has 10 colours)."""
    variants = [f"v{i}" for i in range(12)]
    styles = curve_styles(variants)
    assert len({(s["color"], s["linestyle"]) for s in styles.values()}) == 12
    assert styles["v0"] == {"color": "C0", "linestyle": "-"} and styles["v10"]["linestyle"] != "-"


def test_the_in_process_engine_runs_without_ray_and_resumes_on_another_device(tmp_path, monkeypatch):
    """--engine in-process never calls the simulation engine; a run checkpointed under torch-device 'auto' (the
    CPU here) continues under 'cpu' and ends as it did uninterrupted; an unknown engine is refused."""
    from msfusion_flwr import apps

    def no_ray(*args, **kwargs):
        raise AssertionError("the simulation engine was used")

    monkeypatch.setattr(apps, "run_experiment", no_ray)
    points = "[[points]]\ncheckpoint-every = 2\ncontrastive-weight = 1.0"
    (tmp_path / "m2").mkdir()
    (spec,) = expand(load_matrix(write_matrix(tmp_path, rounds=3, variants='["msfusion"]', points=points)))
    (stopped,) = expand(load_matrix(write_matrix(tmp_path / "m2", rounds=2, variants='["msfusion"]', points=points)))
    assert run_matrix([spec], tmp_path / "reference", engine="in-process", torch_device="auto") == [spec]
    rows = (spec.output_dir(tmp_path / "reference") / "metrics.jsonl").read_text().splitlines()
    results = tmp_path / "results"
    run_matrix([stopped], results, engine="in-process", torch_device="auto")  # as a run stopped after round 2
    out = spec.output_dir(results)
    assert json.loads((out / "config.json").read_text())["torch-device"] == "auto"
    assert can_resume(spec, results)
    assert run_matrix([spec], results, engine="in-process", torch_device="cpu") == [spec]
    resumed = (out / "metrics.jsonl").read_text().splitlines()
    for key in ("accuracy", "loss", "train_loss"):
        assert json.loads(resumed[3])[key] == json.loads(rows[3])[key]
    assert is_complete(spec, results)
    with pytest.raises(ValueError, match="engine must be one of simulation, in-process"):
        run_matrix([spec], results, engine="ray")
