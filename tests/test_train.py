import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffutron.config import override
from diffutron.errors import DiffutronError
from diffutron.model import DiffusionLM
from diffutron.train import TrainRecipe, compute_loss, train

CLI = [sys.executable, "-m", "diffutron"]


@pytest.fixture(scope="module")
def dataset(bundled_128):
    return bundled_128


def _recipe(dataset, out, **changes):
    base = {
        "data.dataset": dataset,
        "data.eval": None,
        "train.out": str(out),
        "train.max_steps": 6,
        "train.batch_size": 4,
        "train.log_every": 1,
        "train.save_every": 3,
        "lora.r": 4,
        "lora.alpha": 8,
        "optim.lr": 1e-3,
        "train.plot": False,
    }
    return override(TrainRecipe(), {**base, **changes})


def _logged(out) -> list[dict]:
    return [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def _losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def _expected_lrs(lr: float, warmup: int, max_steps: int) -> list[float]:
    """The lr after each optimizer step of a one-process run: the cosine schedule, built directly."""
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)
    lrs = []
    for _ in range(max_steps):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def test_dry_run_prints_plain_values_and_catches_too_little_data(capsys):
    from diffutron.cli import main

    assert main(["train", "configs/tiny-sft.yaml", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "lora: true" in printed and "precision: fp32" in printed and "sequences: 42" in printed
    assert main(["train", "configs/tiny-sft.yaml", "--dry-run", "--batch-size", "64"]) == 2
    assert "fewer than one batch (64): lower --batch-size" in capsys.readouterr().err


def test_dry_run_of_the_reference_recipe():
    done = subprocess.run(
        CLI + ["train", "configs/diffutron-0.3b-cpt.yaml", "--model", "preset:mmbert-base", "--dry-run", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["trainable_percent"] == 14.94 and summary["max_length"] == 512
    assert summary["params_trainable"] == 54_067_200 and summary["tokens_per_step"] == 512 * 16


def test_loss_decreases(dataset, tmp_path):
    recipe = _recipe(
        dataset,
        tmp_path / "run",
        **{
            "lora.enabled": False,
            "train.max_steps": 30,
            "train.batch_size": 8,
            "train.log_every": 1,
            "train.eval_every": 15,
            "train.save_every": 100,  # no checkpoints of the full model and optimizer on the way
            "data.eval": "bundled:heldout",
            "data.eval_documents": 8,
            "train.plot": True,
        },
    )
    summary = train(recipe)
    losses = _losses(tmp_path / "run")
    assert summary["step"] == 30 and losses[-1] < losses[0] - 0.5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= records[1].keys()
    assert [r["lr"] for r in records if "lr" in r] == pytest.approx(_expected_lrs(1e-3, 0, 30), rel=1e-9)
    assert [r["step"] for r in records if "eval_ppl" in r] == [0, 15, 30]  # the curve starts at step 0
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def killed_and_resumed(dataset, tmp_path_factory):
    """The same 6-step LoRA run three ways: uninterrupted; killed (SIGKILL) after checkpoint-3; resumed. Losses
    are logged every 4 steps: the resumed run's first window straddles the checkpoint."""
    root = tmp_path_factory.mktemp("resume")
    args = [
        "train",
        "configs/tiny-cpt.yaml",
        "--dataset",
        dataset,
        "--max-steps",
        "6",
        "--save-every",
        "3",
        "--set",
        "data.eval=null",
        "--set",
        "train.log_every=4",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.plot=false",
    ]
    subprocess.run(CLI + args + ["--out", str(root / "straight")], check=True, capture_output=True)
    env = {**os.environ, "DIFFUTRON_TEST_KILL": "checkpoint-saved:3"}
    killed = subprocess.run(CLI + args + ["--out", str(root / "killed")], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert not (root / "killed" / "final").exists() and (root / "killed" / "checkpoint-3").is_dir()
    resumed = subprocess.run(
        CLI + args + ["--out", str(root / "killed"), "--json"], capture_output=True, text=True, check=True
    )
    return root, json.loads(resumed.stdout.strip().splitlines()[-1])


def test_sigkill_and_resume_equals_uninterrupted(killed_and_resumed):
    from safetensors.torch import load_file

    root, summary = killed_and_resumed
    assert summary["resumed_from"] == "checkpoint-3"
    # every logged row as the uninterrupted run's: the loss of steps 1-4 averages steps 1-3 of the killed
    # process (the window saved in checkpoint-3) and step 4 of the resumed one
    rows = {run: _logged(root / run) for run in ("straight", "killed")}
    assert [r["step"] for r in rows["killed"]] == [r["step"] for r in rows["straight"]] == [4, 6]
    for a, b in zip(rows["killed"], rows["straight"], strict=True):
        assert {k: v for k, v in a.items() if k != "tokens_per_s"} == pytest.approx(
            {k: v for k, v in b.items() if k != "tokens_per_s"}, rel=1e-6
        )
    # a LoRA checkpoint holds the adapters, not the frozen base (rebuilt from the model the recipe names)
    checkpoint = load_file(root / "killed" / "checkpoint-3" / "model.safetensors")
    assert checkpoint and all("lora_" in key for key in checkpoint)
    a = load_file(root / "straight" / "final" / "adapter_model.safetensors")
    b = load_file(root / "killed" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    assert sorted(p.name for p in (root / "killed").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_export_and_reload_give_identical_logits(killed_and_resumed, tmp_path, capsys):
    from cli_run import last_json, run
    from transformers import AutoModelForMaskedLM

    root, _ = killed_and_resumed
    assert run(capsys, "export", str(root / "straight"), "--out", str(tmp_path / "merged"), "--merge-lora")[0] == 0
    assert run(capsys, "export", str(root / "straight"), "--out", str(tmp_path / "adapter"))[0] == 0
    adapter = DiffusionLM.from_pretrained(str(tmp_path / "adapter"), device="cpu")
    merged = DiffusionLM.from_pretrained(str(tmp_path / "merged"), device="cpu")
    plain = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "merged")).eval()
    ids = adapter.tokenizer(["Ankara Türkiye'nin [MASK] başkentidir."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = adapter.full_logits(ids)
        torch.testing.assert_close(merged.full_logits(ids), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain(input_ids=ids).logits, reference, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    code, out, _ = run(capsys, "fill-mask", str(tmp_path / "adapter"), "Ankara <mask>.", "--json")
    assert code == 0 and last_json(out)["masks"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_hold_equal_weights_and_step_the_lr_once_per_step(dataset, tmp_path):
    """`accelerate launch` with two processes on the CPU (torchrun + gloo; `--cpu` alone would run one
    process unless mpirun is installed), two micro-batches per step: the lr of each optimizer step is a
    one-process run's (accelerate would step the schedule once per process)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "diffutron",
        "train",
        "configs/tiny-cpt.yaml",
        "--dataset",
        dataset,
        "--max-steps",
        "6",
        "--out",
        str(tmp_path / "ddp"),
        "--set",
        "data.eval=null",
        "--set",
        "train.plot=false",
        "--set",
        "train.log_every=1",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.grad_accum=2",
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["processes"] == 2 and summary["replicas_in_sync"] and summary["step"] == 6
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx(_expected_lrs(1e-3, 5, 6), rel=1e-9)  # configs/tiny-cpt.yaml: warmup 5


def test_sft_never_masks_the_prompt(tokenizer):
    from diffutron.data.sft import load_sft

    lm = DiffusionLM.from_preset("tiny")
    data = load_sft("bundled:instructions", lm.tokenizer, 64)
    recipe = override(TrainRecipe(), {"objective.kind": "sft", "data.sft": "bundled:instructions"})
    batch = {k: v[:8] for k, v in data.items()}
    sep = lm.tokenizer.sep_token_id
    assert (batch["input_ids"][:, -1] == sep).all()  # responses padded with end-of-sequence tokens
    for seed in range(10):
        with torch.no_grad():
            out = compute_loss(lm, lm, batch, recipe, torch.Generator().manual_seed(seed))
        assert not out.masked[batch["prompt_mask"]].any()
        assert out.masked[~batch["prompt_mask"]].any()
    assert (batch["input_ids"][~batch["prompt_mask"]] == sep).any()


def test_sft_recipe_runs(tmp_path):
    done = subprocess.run(
        CLI
        + [
            "train",
            "configs/tiny-sft.yaml",
            "--out",
            str(tmp_path / "sft"),
            "--max-steps",
            "4",
            "--set",
            "train.plot=false",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 4
    # a quiet run: progress lines only, no library noise (tied weights, peft warnings, source-file tags)
    noise = [line for line in done.stderr.splitlines() if re.search(r"Warning|Removed shared|\w+\.py:\d+", line)]
    assert not noise, noise
    card = (tmp_path / "sft" / "final" / "README.md").read_text()
    assert "More Information Needed" not in card and "final training loss" in card


def test_non_finite_losses_are_skipped_then_stop(dataset, tmp_path, monkeypatch):
    import diffutron.train.loop as train_module

    real = train_module.compute_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        output = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(train_module, "compute_loss", sometimes_nan)
    summary = train(_recipe(dataset, tmp_path / "a", **{"train.max_steps": 6, "train.save_every": 100}))
    assert summary["bad_steps"] == 3 and summary["step"] == 6
    with pytest.raises(DiffutronError, match="non-finite losses"):
        train(_recipe(dataset, tmp_path / "b", **{"train.max_bad_steps": 1, "train.save_every": 100}))


def test_ctrl_c_saves_and_exits(dataset, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        CLI
        + [
            "train",
            "configs/tiny-cpt.yaml",
            "--dataset",
            dataset,
            "--out",
            str(out),
            "--max-steps",
            "2000",
            "--set",
            "data.eval=null",
            "--set",
            "train.log_every=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and b"rerun the same command to resume" in err
    assert list(out.glob("checkpoint-*"))


def test_chunked_cross_entropy_equals_dense_autograd_with_gradients(tiny_lm):
    """The model's chunked CE (values and gradients of the head, shared with the embeddings) against
    plain autograd through its dense logits."""
    ids = tiny_lm.tokenizer(["Bugün hava çok güzel, parka gidelim mi?"] * 2, return_tensors="pt")["input_ids"]
    positions = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.6
    positions &= tiny_lm.maskable(ids)
    weights = torch.rand(int(positions.sum()), generator=torch.Generator().manual_seed(1))  # as MDLM's w(t)
    params = [tiny_lm.hf_model.head.dense.weight, tiny_lm.hf_model.decoder.weight, tiny_lm.hf_model.decoder.bias]
    chunked = tiny_lm(ids, positions=positions, targets=ids[positions], ce_chunk=3)
    chunked_grads = torch.autograd.grad((chunked * weights).sum(), params)
    dense = torch.nn.functional.cross_entropy(tiny_lm.full_logits(ids)[positions], ids[positions], reduction="none")
    dense_grads = torch.autograd.grad((dense * weights).sum(), params)
    torch.testing.assert_close(chunked, dense, atol=1e-5, rtol=1e-5)
    for a, b in zip(chunked_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_unknown_recipe_keys_are_listed(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_stepz: 3\n")
    done = subprocess.run(CLI + ["train", str(recipe)], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown key max_stepz" in done.stderr and "max_steps" in done.stderr


def test_yaml_booleans_in_text_fields_ask_for_quotes(tmp_path):
    from diffutron.errors import UsageError

    with pytest.raises(UsageError, match="quote it"):
        override(TrainRecipe(), {"train.precision": False})  # what YAML makes of `precision: no`
    recipe = override(TrainRecipe(), {"train.precision": "fp32", "data.recipe": "x.yaml"})
    recipe.validate()
    with pytest.raises(UsageError, match="train.precision must be one of"):
        override(recipe, {"train.precision": "fp64"}).validate()
    assert override(recipe, {"optim.lr": "2e-3"}).optim.lr == 2e-3  # YAML 1.1 reads 2e-3 as text


def test_command_line_values_keep_yes_no_as_text_until_typed():
    from diffutron.config import parse_value

    changes = {
        "train.precision": parse_value("no"),
        "train.plot": parse_value("off"),
        "train.log_every": parse_value("5"),
    }
    recipe = override(TrainRecipe(), changes)
    assert (recipe.train.precision, recipe.train.plot, recipe.train.log_every) == ("no", False, 5)
    assert parse_value("null") is None and parse_value("[a, b]") == ["a", "b"]
