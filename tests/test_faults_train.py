"""Training under faults: SIGKILL at random points then a resume that must equal the uninterrupted run;
a checkpoint saved twice, two runs in one folder, a resume with another recipe, invalid recipes.

    DIFFUTRON_FAULT_ITERATIONS=40 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 \\
        .venv/bin/python -m pytest -q -s tests/test_faults_train.py -k random_kills

runs more kills than the default 3 (seeded by DIFFUTRON_FAULT_SEED, default 0) and prints how each
case ended. The kills hit named points of the loop (DIFFUTRON_TEST_KILL=<site>:<step>, see
train/state.py: fault_point) or a random moment; at least half of the cases, whatever their number,
must be killed mid-run (after a logged step, before final/ is in place), or the suite proves nothing.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch

import diffutron.train.build as train_build
import diffutron.train.loop as train_loop
import diffutron.train.state as train_state
from diffutron.config import override
from diffutron.errors import DiffutronError, UsageError
from diffutron.run_folder import RunLock, recover
from diffutron.train import TrainRecipe, train

ITERATIONS = int(os.environ.get("DIFFUTRON_FAULT_ITERATIONS", "3"))
SEED = int(os.environ.get("DIFFUTRON_FAULT_SEED", "0"))
# where the loop can be killed (train/state.py: fault_point), and at which steps of the recipe below
SITES = {
    "step": [1, 2, 3, 4, 5, 6],
    "checkpoint-written": [2, 4, 6],
    "checkpoint-swap": [2, 4, 6],
    "checkpoint-saved": [2, 4, 6],
    "final-swap": [6],
    "random moment": [None],
}


def _recipe(dataset: str, out: Path, **changes) -> TrainRecipe:
    base = {
        "model.name": "tiny-base",
        "data.dataset": dataset,
        "data.eval": "bundled:heldout",
        "data.eval_documents": 2,
        "train.eval_every": 3,
        "train.out": str(out),
        "train.max_steps": 6,
        "train.batch_size": 4,
        "train.log_every": 1,
        "train.save_every": 2,
        "train.keep_last": 2,
        "lora.r": 4,
        "lora.alpha": 8,
        "optim.lr": 1e-3,
        "optim.warmup_steps": 2,
        "train.plot": False,
    }
    return override(TrainRecipe(), {**base, **changes})


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("tokens_per_s", None)  # wall-clock
    return rows


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(bundled_128, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "straight"
    train(_recipe(bundled_128, out))
    return out


def _child(recipe: TrainRecipe, kill: str | None) -> None:
    if kill:
        os.environ["DIFFUTRON_TEST_KILL"] = kill
    code = 1
    try:
        train(recipe)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _assert_same_run(out: Path, reference: Path) -> None:
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == [
        p.name for p in sorted(reference.glob("checkpoint-*"))
    ]
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))
    got, want = _rows(out), _rows(reference)
    assert [(r["step"], "loss" in r) for r in got] == [(r["step"], "loss" in r) for r in want]  # each row once
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6), (a["step"], key)
    a, b = _adapter(out), _adapter(reference)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def _phase(out: Path) -> str:
    """Where a killed run was, judged by what it left."""
    if (out / "final").is_dir():
        return "killed after final/ was in place"
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.read_text().strip():
        return "killed mid-run"
    return "killed before its first step"


def test_random_kills_then_resume_equal_the_uninterrupted_run(bundled_128, reference, tmp_path):
    """SIGKILL at a seeded random point (a named point of the loop or a random moment), then resume."""
    rng = random.Random(SEED)
    # children fork from a server that has imported the libraries but never run a thread pool (a fork of
    # this process, which has, can deadlock in OpenMP): a child starts in well under a second
    fork = multiprocessing.get_context("forkserver")
    fork.set_forkserver_preload(["torch", "transformers", "peft", "accelerate", "diffutron.train", "diffutron.model"])
    tried = Counter()
    for i in range(ITERATIONS):
        site = rng.choice(sorted(SITES))
        step = rng.choice(SITES[site])
        out = tmp_path / f"run-{i}"
        recipe = _recipe(bundled_128, out)
        kill = f"{site}:{step}" if step is not None else None
        child = fork.Process(target=_child, args=(recipe, kill))
        child.start()
        if kill is None:
            time.sleep(rng.uniform(0.2, 6.0))
            if child.is_alive():
                os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=300)
        exitcode = child.exitcode
        child.close()
        assert exitcode in (0, -signal.SIGKILL), (site, step, exitcode)
        tried[_phase(out) if exitcode == -signal.SIGKILL else "finished before the kill"] += 1
        try:
            assert train(recipe)["step"] == 6
            _assert_same_run(out, reference)
        except AssertionError as failure:
            raise AssertionError(f"case {i}, killed at {site}:{step}: {failure}") from failure
    print(f"\nfault injection: {ITERATIONS} cases (seed {SEED}), each resumed to the uninterrupted run: {dict(tried)}")
    # kills that land before the first step or after the end test little: most must land mid-run
    assert tried["killed mid-run"] >= math.ceil(ITERATIONS / 2), dict(tried)


def test_a_checkpoint_saved_again_is_never_lost(bundled_128, reference, tmp_path, monkeypatch):
    """Ctrl-C right after checkpoint-2 saves step 2 a second time; a crash while that copy replaces the
    first (between the two renames) must not lose step 2: the next start resumes from it."""
    out = tmp_path / "run"

    def interrupt_then_crash(site: str, step: int) -> None:
        if (site, step) == ("checkpoint-saved", 2):
            os.kill(os.getpid(), signal.SIGINT)  # the loop's handler: stop and save
        if (site, step) == ("checkpoint-swap", 2) and (out / ".old-checkpoint-2").exists():
            raise KeyboardInterrupt("crash between the renames")

    monkeypatch.setattr(train_state, "fault_point", interrupt_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(_recipe(bundled_128, out))
    assert not (out / "checkpoint-2").exists()  # the crash came between the renames
    monkeypatch.undo()
    summary = train(_recipe(bundled_128, out))
    assert summary["resumed_from"] == "checkpoint-2"
    _assert_same_run(out, reference)


def test_recover_promotes_restores_and_cleans(tmp_path):
    def folder(name: str, complete: bool) -> Path:
        path = tmp_path / name
        path.mkdir()
        if complete:
            (path / "trainer_state.json").write_text("{}")
        return path

    folder(".tmp-checkpoint-4", complete=True)  # killed before the rename: promoted
    folder(".tmp-checkpoint-6", complete=False)  # killed while writing: deleted
    folder(".old-checkpoint-2", complete=True)  # killed between the renames of a second save: restored
    folder("checkpoint-8", complete=True)
    folder(".old-checkpoint-8", complete=True)  # killed before its deletion: deleted
    recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-8"]


def test_a_second_run_in_the_folder_is_refused_and_a_killed_holder_does_not_block(bundled_128, reference, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from diffutron.run_folder import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
            "print('locked', flush=True); time.sleep(600)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DiffutronError, match=f"in use by another training run \\(pid {holder.pid}\\)"):
            train(_recipe(bundled_128, out))
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written beside the lock
    finally:
        holder.kill()
        holder.wait()
    assert train(_recipe(bundled_128, out))["step"] == 6  # the lock of a killed process is gone with it
    lock = RunLock(out)
    lock.acquire()  # released at the end of the run
    lock.release()


@pytest.fixture(scope="module")
def finished(bundled_128, tmp_path_factory):
    """A finished run of 2 steps (checkpoint-1, checkpoint-2, final)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    recipe = _recipe(bundled_128, out, **{"train.max_steps": 2, "train.save_every": 1, "data.eval": None})
    train(recipe)
    return recipe


@pytest.mark.parametrize(
    "changes, keys",
    [
        ({"model.name": "preset:tiny"}, "model.name"),
        ({"train.batch_size": 2}, "train.batch_size"),
        ({"train.grad_accum": 2}, "train.grad_accum"),
        ({"optim.lr": 2e-3}, "optim.lr"),
        ({"lora.r": 8, "lora.alpha": 16}, "lora.alpha, lora.r"),
        ({"objective.kind": "mlm"}, "objective.kind"),
        ({"data.dataset": "elsewhere", "train.seed": 1}, "data.dataset, train.seed"),
    ],
)
def test_a_resume_with_another_recipe_is_refused_before_loading(finished, changes, keys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_build, "build_model", no_model)
    with pytest.raises(UsageError, match=f"holds a run with other settings \\({keys}\\)"):
        train(override(finished, changes))


def test_a_resume_may_change_length_and_cadence_and_a_finished_run_is_reported(finished, capsys):
    out = Path(finished.train.out)
    before = (out / "final" / "adapter_model.safetensors").stat().st_mtime_ns
    rows = (out / "metrics.jsonl").read_text()
    summary = train(override(finished, {"train.log_every": 5, "train.save_every": 7, "data.eval_documents": 3}))
    assert summary["already_complete"] and summary["step"] == 2 and summary["train_seconds"] > 0
    assert (out / "final" / "adapter_model.safetensors").stat().st_mtime_ns == before
    assert (out / "metrics.jsonl").read_text() == rows
    import yaml

    from diffutron.cli import main
    from diffutron.config import to_dict

    recipe_file = out.parent / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(to_dict(finished)))
    assert main(["train", str(recipe_file)]) == 0
    printed = capsys.readouterr().out
    assert "already holds a finished run of 2 steps" in printed and "start afresh" in printed


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("optim.lr", float("nan"), "optim.lr must be a finite number"),
        ("optim.lr", 0.0, "optim.lr must be in (0, inf)"),
        ("optim.weight_decay", float("inf"), "optim.weight_decay must be a finite number"),
        ("optim.betas", [0.9, 1.0], "optim.betas must be in [0, 1)"),
        ("optim.warmup_ratio", -0.1, "optim.warmup_ratio must be in [0, 1)"),
        ("objective.eps", 0.0, "objective.eps must be in (0, 1)"),
        ("objective.eps", 1.0, "objective.eps must be in (0, 1)"),
        ("objective.mlm_ratio", float("nan"), "objective.mlm_ratio must be a finite number"),
        ("lora.dropout", 1.0, "lora.dropout must be in [0, 1)"),
        ("train.max_grad_norm", float("-inf"), "train.max_grad_norm must be a finite number"),
        ("train.log_every", 0, "train.log_every must be in [1, inf)"),
        ("train.save_every", 0, "train.save_every must be in [1, inf)"),
        ("train.eval_every", -1, "train.eval_every must be in [0, inf)"),
        ("objective.ce_chunk", 0, "objective.ce_chunk must be in [1, inf)"),
        ("optim.schedule", "cosin", "optim.schedule must be one of cosine, linear, constant"),
        ("objective.normalization", "tokens", "objective.normalization must be one of"),
    ],
)
def test_every_recipe_value_is_checked(key, value, message):
    recipe = override(TrainRecipe(), {"data.recipe": "x.yaml", key: value})
    with pytest.raises(UsageError, match=message.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[")):
        recipe.validate()


def test_a_bad_value_exits_2_before_anything_loads(capsys, monkeypatch, tmp_path):
    from diffutron.cli import main

    monkeypatch.setattr(train_build, "build_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["train", "configs/tiny-cpt.yaml", "--lr", "nan", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == "error: optim.lr must be a finite number, got nan"
    assert not (tmp_path / "run").exists()


def test_non_finite_steps_are_logged_as_non_finite(bundled_128, tmp_path, monkeypatch):
    """Steps 2 and 3 have NaN losses: skipped (no optimizer step), logged with loss null, never 0.0."""
    real = train_loop.compute_loss
    calls = {"n": 0}

    def nan_on_calls_2_and_3(*args, **kwargs):
        output = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (2, 3):
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(train_loop, "compute_loss", nan_on_calls_2_and_3)
    out = tmp_path / "run"
    recipe = _recipe(bundled_128, out, **{"train.max_steps": 4, "train.save_every": 100, "data.eval": None})
    summary = train(recipe)
    rows = _rows(out)
    assert summary["bad_steps"] == 2 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] is None for r in rows] == [False, True, True, False]
    assert [r.get("non_finite_steps") for r in rows] == [None, 1, 1, None]
    assert all(r["loss"] is None or r["loss"] > 1 for r in rows)
