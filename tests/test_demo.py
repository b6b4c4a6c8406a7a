"""The demo: its table and its curve measure the same set, the last denoising frame is the finished text,
and a second run says it reused the finished run instead of reporting a fake timing."""

from __future__ import annotations

import json

import pytest
import torch

from diffutron.plots import smooth


def test_demo_twice(tmp_path, capsys):
    """Run once from Python, then again from the command line with --json: the second reuses the first
    (one demo's training for both the library's and the command's checks)."""
    from cli_run import last_json, run

    from diffutron.demo import run_demo

    out = tmp_path / "demo"
    first = run_demo(out, max_steps=1)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {row["step"]: row for row in evals if "eval_ppl" in row}
    assert sorted(evals) == [0, 1]  # a step-0 point
    # the table's numbers are the curve's: the same (whole) held-out set
    assert first["ppl_before"] == evals[0]["eval_ppl"] and first["ppl_after"] == evals[1]["eval_ppl"]
    assert evals[0]["eval_tokens"] == evals[1]["eval_tokens"] == _heldout_tokens()
    frames = first["denoising"]
    assert "░" in frames[0] and "░" not in frames[-1] and frames[-1].startswith("Türkiye Cumhuriyeti")
    assert not first["reused"] and len(first["samples"]) == 3
    for name in ("report.md", "metrics.jsonl", "curves.png", "final"):
        assert (out / name).exists()
    assert "PPL @ 15% masked" in (out / "report.md").read_text()

    code, stdout, _ = run(capsys, "demo", "--steps", "1", "--out", str(out), "--json")
    second = last_json(stdout)
    assert code == 0 and second["reused"] and len(second["samples"]) == 3
    assert second["train_seconds"] == first["train_seconds"]  # final/'s, not the last checkpoint's
    assert second["ppl_before"] == first["ppl_before"] and second["ppl_after"] == first["ppl_after"]
    report = (out / "report.md").read_text()
    assert "reused" in report and f"trained in {first['train_seconds']:.0f} s" in report  # not the save's time


def _heldout_tokens() -> int:
    from diffutron.assets import shipped_model
    from diffutron.data.sources import read_documents
    from diffutron.evaluate import make_windows
    from diffutron.model import DiffusionLM

    lm = DiffusionLM.from_pretrained(str(shipped_model("tiny-base")), device="cpu")
    windows = make_windows(lm, [d.text for d in read_documents("bundled:heldout")])
    return sum(int(lm.maskable(torch.tensor(w)).sum()) for w in windows)


def test_smoothing_follows_the_data_without_a_start_up_bias():
    assert smooth([5.0, 5.0, 5.0]) == pytest.approx([5.0, 5.0, 5.0])
    rising = smooth([0.0] * 20 + [1.0] * 20)
    assert rising[19] == pytest.approx(0.0) and 0.8 < rising[-1] < 1.0
