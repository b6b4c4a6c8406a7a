"""The run planner (`diffutron train --plan`): counts that add up, the FLOPs formula against the architecture's
arithmetic, measured steps and the projection they give, a run length in tokens (train.max_tokens)."""

from __future__ import annotations

import json
import math

import pytest
from cli_run import last_json, run

from diffutron.config import load_config, override
from diffutron.train import TrainRecipe, train
from diffutron.train.plan import plan


def _tiny(dataset, tmp_path, **changes) -> TrainRecipe:
    base = {
        "model.name": "preset:tiny",
        "data.dataset": dataset,
        "data.eval": None,
        "train.out": str(tmp_path / "run"),
        "train.batch_size": 4,
        "train.grad_accum": 2,
        "train.max_steps": 30,
        "train.plot": False,
        "lora.r": 4,
        "lora.alpha": 8,
    }
    return override(TrainRecipe(), base | changes)


def test_counts_add_up_for_any_number_of_processes(bundled_128, tmp_path):
    from datasets import load_from_disk

    sequences = len(load_from_disk(bundled_128))
    for processes in (1, 3, 8):
        result = plan(_tiny(bundled_128, tmp_path), processes=processes, measure=0)
        assert result["max_length"] == 128 and result["sequences"] == sequences
        assert result["tokens_per_step"] == 4 * 2 * processes * 128
        assert result["tokens_total"] == result["steps"] * result["tokens_per_step"] == 30 * 4 * 2 * processes * 128
        assert result["epochs"] == pytest.approx(30 * 4 * 2 * processes / sequences)
        assert result["flops_total"] == pytest.approx(result["flops_per_token"] * result["tokens_total"])
        assert "seconds_per_step" not in result  # --measure-steps 0: counts only


def test_max_tokens_trains_the_same_tokens_on_any_number_of_processes(bundled_128, tmp_path):
    recipe = _tiny(bundled_128, tmp_path, **{"train.max_tokens": 100_000})
    one, four = plan(recipe, processes=1, measure=0), plan(recipe, processes=4, measure=0)
    assert one["steps"] == math.ceil(100_000 / (4 * 2 * 128)) == 98
    assert four["steps"] == math.ceil(100_000 / (4 * 2 * 4 * 128)) == 25
    for result in (one, four):  # the tokens asked for, rounded up to a whole step
        assert 100_000 <= result["tokens_total"] < 100_000 + result["tokens_per_step"]


def test_a_run_of_max_tokens_stops_at_its_steps(bundled_128, tmp_path):
    recipe = _tiny(bundled_128, tmp_path, **{"train.max_tokens": 3 * 4 * 2 * 128 - 5, "train.save_every": 100})
    summary = train(recipe)
    assert summary["step"] == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-1] == 3


def test_flops_per_token_of_the_reference_recipe_is_the_architectures_arithmetic():
    """mmBERT-base (22 layers, d 768, GLU MLP 1152, vocabulary 256,000; every third layer global, the rest a
    128-token window) with LoRA r=256 on Wqkv, Wo, Wi, Wo, at 512 tokens, MDLM's linear schedule."""
    recipe = load_config(TrainRecipe, "configs/diffutron-0.3b-cpt.yaml")
    recipe = override(recipe, {"model.name": "preset:mmbert-base", "data.dataset": None})
    result = plan(recipe, processes=4, measure=0, length=512)
    d, layers, mlp, vocab, r = 768, 22, 1152, 256_000, 256
    dense = layers * (d * 3 * d + d * d + d * 2 * mlp + mlp * d)  # Wqkv, attention Wo, Wi (GLU: 2 x), MLP Wo
    lora = layers * r * ((d + 3 * d) + (d + d) + (d + 2 * mlp) + (mlp + d))
    keys = 8 * 512 + 14 * 129  # global layers see the sequence, local ones their window of +-64
    head = d * d + vocab * d
    masked = (1 + 1e-3) / 2  # E[t], t uniform on [eps, 1]
    expected = 4 * (dense + lora) + 2 * lora + 12 * d * keys + masked * 4 * head
    assert (result["encoder_linear_params"], result["lora_params"], result["head_params"]) == (dense, lora, head)
    assert result["flops_per_token"] == pytest.approx(expected, rel=1e-6)
    assert result["params_trainable"] == 54_067_200 and result["trainable_percent"] == 14.94
    assert result["steps"] == math.ceil(1_024_000_000 / (16 * 4 * 512))  # train.max_tokens on 4 processes


def test_measured_steps_give_the_projection(bundled_128, tmp_path, capsys):
    code, out, err = run(
        capsys, "train", "configs/tiny-cpt.yaml", "--dataset", bundled_128, "--out", str(tmp_path / "r"),
        "--plan", "--measure-steps", "2", "--processes", "2", "--json",
    )  # fmt: skip
    assert code == 0, err
    result = last_json(out)
    assert result["measured_steps"] == 2 and len(result["step_seconds"]) == 2
    assert result["tokens_per_s"] == pytest.approx(8 * 128 / result["seconds_per_step"])
    assert result["achieved_flops"] == pytest.approx(result["flops_per_token"] * result["tokens_per_s"])
    assert result["projected_hours"] == pytest.approx(result["steps"] * result["seconds_per_step"] / 3600)
    assert result["device_hours"] == pytest.approx(2 * result["projected_hours"])
    assert 0 < result["mfu"] < 1 and result["peak_memory_mb"] > 0
    assert not (tmp_path / "r").exists()  # planning writes nothing
