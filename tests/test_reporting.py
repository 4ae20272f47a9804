"""Per-run reports: the round log line and curves.png, for classification and language-model rows."""

from __future__ import annotations

import math

from msfusion_flwr.config import RunConfig
from msfusion_flwr.server.reporting import CURVES_FILE, RunReporter, plot_curves, read_metrics, round_line


def row(t, accuracy, loss, **extra):
    return {"round": t, "accuracy": accuracy, "loss": loss, "participants": [0, 1], "bytes_down": 2_000_000,
            "bytes_up": 1_000_000, "train_loss": 1.5, "failures": [], "wall_s": 2.0, **extra}


def test_round_line_shows_perplexity_only_for_language_model_rows():
    """An LM row gets 'ppl' beside acc/loss; a classification row (null or, in old files, no perplexity) does not."""
    lm = round_line(row(3, 0.21, math.log(148.4), perplexity=148.4), 10)
    assert "acc 0.2100 loss 4.9999" in lm and "ppl 148.40" in lm
    assert lm.startswith("round 3/10 | ")
    classification = row(3, 0.8, 0.5, perplexity=None)
    assert "ppl" not in round_line(classification, 10)
    old = row(3, 0.8, 0.5)  # metrics.jsonl written before the perplexity key
    assert round_line(old, 10) == round_line(classification, 10)
    assert round_line(old, 10) == ("round 3/10 | acc 0.8000 loss 0.5000 | train loss 1.5000 | 2 participants"
                                   " | down 2.00 MB up 1.00 MB | 2.0 s")
    assert "ppl" not in round_line(row(2, None, None, perplexity=None), 10)  # a round not evaluated


def test_plot_curves_writes_png_for_language_model_and_classification_rows(tmp_path):
    """curves.png for LM rows (perplexity, some rounds not evaluated) via RunReporter, and for classification rows."""
    reporter = RunReporter(tmp_path / "lm", RunConfig.from_mapping({"num-server-rounds": 3}))
    for t, ppl in [(0, 5000.0), (1, None), (2, 300.0), (3, 120.0)]:
        reporter.record_round(row(t, 0.1 * t if ppl else None, math.log(ppl) if ppl else None, perplexity=ppl))
    assert [r["perplexity"] for r in read_metrics(tmp_path / "lm")] == [5000.0, None, 300.0, 120.0]
    path = reporter.plot_curves()
    assert path == (tmp_path / "lm" / CURVES_FILE).resolve()
    assert path.read_bytes().startswith(b"\x89PNG")
    classification = [row(t, 0.5 + 0.1 * t, 1.0 / (t + 1)) for t in range(3)]
    other = plot_curves(classification, tmp_path / "classification.png")
    assert other.read_bytes().startswith(b"\x89PNG")
