"""Training on several processes, on this CPU: `accelerate launch` with the shipped configs (DDP, FSDP2,
DeepSpeed ZeRO-2 on gloo), two simulated machines on loopback, kills and resumes, exports.

The references are DDP runs with the same 2 processes: each process draws its own masks, so a
1-process run agrees only in expectation. In fp32, logged losses, learning rates and gradient norms agree
to 1e-5 relative and weights to 1e-5 absolute (observed: LoRA bit-equal; full fine-tuning within 2e-6, the
gradients being reduced in another order).

    DIFFUTRON_FAULT_ITERATIONS=10 HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_distributed.py -k kill

runs more seeded kill scenarios than the default one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_run import last_json, run
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
ITERATIONS = int(os.environ.get("DIFFUTRON_FAULT_ITERATIONS", "1"))
SEED = int(os.environ.get("DIFFUTRON_FAULT_SEED", "0"))
MAX_STEPS, SAVE_EVERY, WARMUP = 6, 3, 2
# where processes are killed (train/state.py: fault_point): <site>:<step>, @<rank> for one of them (the
# checkpoint sites are the main process's), nothing for both; and where the rerun takes over: the newest
# complete checkpoint (a checkpoint killed before its marker is written does not count), nothing before
# the first one, or the finished run (a kill while final/ was swapped in, complete)
KILLS = {
    "step:5@1": "checkpoint-3",
    "step:5@0": "checkpoint-3",
    "step:4": "checkpoint-3",
    "step:2@1": None,
    "checkpoint-written:3@0": None,
    "checkpoint-swap:3@0": "checkpoint-3",
    "checkpoint-saved:3@0": "checkpoint-3",
    "final-swap:6@0": "finished",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """About 20 sequences of 64 tokens: an epoch is a few steps of 2 processes x 2 sequences."""
    from diffutron.data.pack import PackConfig
    from diffutron.data.prepare import DataRecipe, prepare

    folder = tmp_path_factory.mktemp("data") / "small"
    prepare(DataRecipe(pack=PackConfig(max_length=64), max_documents=4), folder)
    return str(folder)


def _recipe(folder: Path, data: str, **train) -> Path:
    """A LoRA CPT recipe of the shipped tiny base; `train` overrides its train section."""
    recipe = {
        "model": {"name": "tiny-base"},
        "data": {"dataset": data, "eval": "bundled:heldout", "eval_documents": 10, "eval_batch_size": 4},
        "objective": {"kind": "mdlm", "ce_chunk": 16},  # several chunks of the cross-entropy
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "optim": {"lr": 1.0e-3, "warmup_steps": WARMUP},
        "train": {
            "max_steps": MAX_STEPS,
            "batch_size": 2,
            "log_every": 1,
            "save_every": SAVE_EVERY,
            "keep_last": 2,
            "max_grad_norm": 0.05,  # below the gradients' norm: clipping acts at every step
            "plot": False,
            **train,
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def _command(config: str, recipe: Path, out: Path | str, *extra: str, launch: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / config),
        *(launch or ("--main_process_port", str(_free_port()))),
        "-m",
        "diffutron",
        "train",
        str(recipe),
        "--out",
        str(out),
        "--json",
        *extra,
    ]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _launch(config: str, recipe: Path, out: Path, *extra: str, env: dict | None = None, timeout: int = 300):
    """(return code, the summary printed, stderr) of one `accelerate launch`; its batches go to batches-<out>/."""
    record = out.parent / f"batches-{out.name}"
    record.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        _command(config, recipe, out, *extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(DIFFUTRON_RECORD_BATCHES=str(record), **(env or {})),
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, json.loads(lines[-1]) if lines else None, done.stderr


def _trained(config: str, recipe: Path, out: Path, *extra: str) -> dict:
    code, summary, stderr = _launch(config, recipe, out, *extra)
    assert code == 0, _failure(stderr)
    return summary


def _failure(stderr: str) -> str:
    """What went wrong in a launch: the processes' own errors, not torchrun's report of them."""
    return "\n".join(line for line in stderr.splitlines() if "Error" in line or "diffutron:" in line)[-4000:]


def _steps(out: Path) -> list[dict]:
    """The logged steps of a run, without their timing."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows if "loss" in row]


def _evals(out: Path) -> list[dict]:
    return [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_ppl" in row]


def _same_steps(a: Path, b: Path, steps: int = MAX_STEPS) -> None:
    rows_a, rows_b = _steps(a), _steps(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == list(range(1, steps + 1))
    for x, y in zip(rows_a, rows_b, strict=True):
        assert x.keys() == y.keys()
        assert all(x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-9) for k in x), (x, y)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(folder / name)


def _same_evals(a: Path, b: Path) -> None:
    rows_a, rows_b = _evals(a), _evals(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for x, y in zip(rows_a, rows_b, strict=True):
        assert all(x[k] == pytest.approx(y[k], rel=1e-6) for k in x), (x, y)


def _same_weights(a: Path, b: Path) -> None:
    x, y = _weights(a), _weights(b)
    assert x.keys() == y.keys()
    worst = max((x[k] - y[k]).abs().max().item() for k in x)
    assert worst <= 1e-5, worst


def _batches(out: Path) -> list[dict]:
    folder = out.parent / f"batches-{out.name}"
    return [json.loads(line) for path in sorted(folder.glob("*.jsonl")) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data) -> dict:
    """The reference runs every test compares with: LoRA CPT under DDP and under FSDP2, 2 processes each."""
    root = tmp_path_factory.mktemp("runs")
    recipe = _recipe(root, small_data)
    result = {"root": root, "recipe": recipe}
    for name, config in (("ddp", "ddp-cpu.yaml"), ("fsdp", "fsdp-cpu.yaml")):
        result[name] = _trained(config, recipe, root / name)
    return result


def test_every_gpu_config_is_its_tested_cpu_twin_with_gpus():
    """No accelerate config ships untested: each GPU file differs from the CPU twin these tests launch only in
    the device, the precision and the process count."""
    files = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert files == {"ddp", "ddp-cpu", "fsdp", "fsdp-cpu", "zero2", "zero2-cpu"}
    for gpu in ("ddp", "fsdp", "zero2"):
        on_gpu = yaml.safe_load((CONFIGS / f"{gpu}.yaml").read_text())
        on_cpu = yaml.safe_load((CONFIGS / f"{gpu}-cpu.yaml").read_text())
        assert (on_gpu["use_cpu"], on_gpu["mixed_precision"]) == (False, "bf16")
        assert (on_cpu["use_cpu"], on_cpu["mixed_precision"], on_cpu["num_processes"]) == (True, "no", 2)
        differ = {k for k in on_gpu.keys() | on_cpu.keys() if on_gpu.get(k) != on_cpu.get(k)}
        assert differ <= {"use_cpu", "mixed_precision", "num_processes"}, differ


def test_fsdp2_shards_and_trains_as_ddp_does(runs, small_data):
    """The FSDP config really shards (FSDP2's wrapper, half the weights per process) and gives, step for step,
    DDP's loss, learning rate and gradient norm, the same weights, and DDP's held-out figures."""
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert (ddp["distributed"], ddp["wrapper"], ddp["weights_held"]) == ("MULTI_CPU", "DistributedDataParallel", 1.0)
    assert fsdp["distributed"] == "FSDP" and fsdp["wrapper"].startswith("FSDP")
    assert 0.45 < fsdp["weights_held"] < 0.55
    assert ddp["replicas_in_sync"] is True and fsdp["replicas_in_sync"] is None
    root = runs["root"]
    _same_steps(root / "ddp", root / "fsdp")
    # clipping acts on the live parameters (a list taken before prepare would clip nothing under FSDP)
    assert all(row["grad_norm"] > 0.05 for row in _steps(root / "fsdp"))
    _same_weights(root / "ddp" / "final", root / "fsdp" / "final")
    assert (root / "fsdp" / "checkpoint-6" / "pytorch_model_fsdp_0").is_dir()  # sharded (distributed checkpoint)
    _same_evals(root / "ddp", root / "fsdp")


def test_evaluation_split_across_processes_equals_one_process(runs):
    """The end-of-run evaluation, split across 2 processes (3 batches: one process evaluates one more, under
    FSDP the other runs one to keep step), gives the figures one process gets on the final model."""
    from diffutron.data.sources import read_documents
    from diffutron.evaluate import evaluate
    from diffutron.model import DiffusionLM

    texts = [d.text for d in read_documents("bundled:heldout")][:10]
    lm = DiffusionLM.from_pretrained(str(runs["root"] / "fsdp" / "final"), device="cpu")
    alone = evaluate(lm, texts, mask_ratio=0.15, samples=1, elbo_samples=2, seed=0, batch_size=4)
    last = _evals(runs["root"] / "fsdp")[-1]
    assert last["eval_ppl"] == pytest.approx(alone.ppl, rel=1e-9)
    assert last["eval_elbo_ppl"] == pytest.approx(alone.elbo_ppl, rel=1e-9)
    assert last["eval_tokens"] == alone.tokens


def test_each_sequence_once_per_epoch_across_processes(runs, small_data):
    """The processes share each epoch's sequences: none twice, none skipped (but the last, incomplete batch)."""
    from datasets import load_from_disk

    sequences = len(load_from_disk(small_data))
    per_step = 2 * 2  # processes x batch
    seen: dict[int, list[int]] = {}
    for row in _batches(runs["root"] / "fsdp"):
        seen.setdefault(row["epoch"], []).extend(row["index"])
    assert len(seen) >= 2, "the run should cross an epoch"
    first = seen[0]
    assert len(first) == len(set(first)) == sequences // per_step * per_step
    assert all(len(indices) == len(set(indices)) for indices in seen.values())


@pytest.mark.parametrize("iteration", range(ITERATIONS))
def test_kill_under_fsdp_then_resume_equals_the_uninterrupted_run(runs, tmp_path, iteration):
    """SIGKILL of one or both processes at a seeded point; the same command again resumes and ends with the
    uninterrupted FSDP run's metrics, weights and batches."""
    kills = list(KILLS)
    kill = kills[(random.Random(SEED).randrange(len(kills)) + iteration) % len(kills)]  # every one in 8 runs
    out = tmp_path / "run"
    code, _, stderr = _launch("fsdp-cpu.yaml", runs["recipe"], out, env={"DIFFUTRON_TEST_KILL": kill})
    assert code != 0, f"{kill} did not kill the run"
    summary = _trained("fsdp-cpu.yaml", runs["recipe"], out)
    taken_over = "finished" if summary.get("already_complete") else summary.get("resumed_from")
    assert taken_over == KILLS[kill], (kill, summary)
    reference = runs["root"] / "fsdp"
    _same_steps(out, reference)
    _same_weights(out / "final", reference / "final")
    _same_evals(out, reference)
    # the batches after the resume point are the uninterrupted run's, process by process
    resumed = int(summary.get("resumed_from", "checkpoint-0").split("-")[1])
    seen = [r for r in _batches(out) if r["step"] > resumed]
    redone = {(r["step"], r["rank"]): r["index"] for r in seen}
    expected = {(r["step"], r["rank"]): r["index"] for r in _batches(reference) if r["step"] > resumed}
    assert redone == expected, kill


def test_a_checkpoint_resumes_only_under_the_launch_that_wrote_it(runs, tmp_path):
    """An FSDP checkpoint asked to resume in one process: a one-line refusal naming both launches."""
    from diffutron.config import load_config, override
    from diffutron.errors import UsageError
    from diffutron.train import TrainRecipe, train

    out = tmp_path / "copy"
    shutil.copytree(runs["root"] / "fsdp", out)
    recipe = override(load_config(TrainRecipe, runs["recipe"]), {"train.out": str(out), "train.max_steps": 8})
    with pytest.raises(UsageError, match=r"written by FSDP on 2 processes, this launch is no sharding on 1 process"):
        train(recipe)


def test_fsdp_final_and_export_are_plain_folders(runs, tmp_path, capsys):
    """final/ of an FSDP run is a peft adapter plain peft loads, equal to the DDP run's; exported and merged it
    is a plain HF folder that `diffutron eval` and `generate` use."""
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM

    final = runs["root"] / "fsdp" / "final"
    base_name = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    adapted = PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(base_name), str(final))
    assert any("lora_A" in name for name, _ in adapted.named_parameters())
    merged = tmp_path / "merged"
    code, _, err = run(capsys, "export", str(runs["root"] / "fsdp"), "--out", str(merged), "--merge-lora")
    assert code == 0, err
    assert AutoModelForMaskedLM.from_pretrained(str(merged)).config.model_type == "modernbert"
    text = tmp_path / "held-out.txt"
    text.write_text("Ankara Türkiye'nin başkentidir.\n\nİstanbul boğazın iki yakasına kurulmuştur.\n")
    code, out, err = run(capsys, "eval", str(merged), "--data", str(text), "--elbo-samples", "0", "--json")
    assert code == 0 and last_json(out)["ppl"] > 1, err
    code, out, err = run(capsys, "generate", str(merged), "-p", "Ankara", "-n", "8", "--json")
    assert code == 0 and len(last_json(out)["results"][0]["tokens"]) == 8, err


def test_full_finetuning_under_fsdp_with_checkpointing_equals_ddp(tmp_path, small_data):
    """Full fine-tuning: every weight trains, the decoder tied to the embeddings; FSDP2 with gradient
    checkpointing gives DDP's steps and weights, and final/ is a plain HF folder with the tie kept."""
    from transformers import AutoModelForMaskedLM

    recipe = _recipe(tmp_path, small_data, max_steps=4)
    full = ("--set", "lora.enabled=false", "--set", "optim.lr=1e-4", "--set", "data.eval=null")
    _trained("ddp-cpu.yaml", recipe, tmp_path / "ddp", *full)
    summary = _trained("fsdp-cpu.yaml", recipe, tmp_path / "fsdp", *full, "--set", "model.gradient_checkpointing=true")
    assert summary["distributed"] == "FSDP" and summary["params_trainable"] == summary["params_total"]
    _same_steps(tmp_path / "ddp", tmp_path / "fsdp", steps=4)
    # one weight for the embeddings and the decoder, trained (FSDP's loading must not untie them)
    saved = _weights(tmp_path / "fsdp" / "final")
    assert "decoder.weight" not in saved
    _same_weights(tmp_path / "ddp" / "final", tmp_path / "fsdp" / "final")
    model = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "fsdp" / "final"))
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight
    trained = saved["model.embeddings.tok_embeddings.weight"]
    start = AutoModelForMaskedLM.from_pretrained(str(ROOT / "src/diffutron/assets/models/tiny-base"))
    assert not torch.equal(trained, start.model.embeddings.tok_embeddings.weight)  # the tied weight trained


def test_deepspeed_zero2_trains_as_ddp_checkpoints_and_resumes(runs, tmp_path):
    """ZeRO-2 (gloo): without a dataloader given to prepare, the micro-batch comes from the recipe; killed in
    one process after its first ZeRO checkpoint, then run again, it ends with DDP's steps and weights."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero2"
    code, _, _ = _launch("zero2-cpu.yaml", runs["recipe"], out, env={"DIFFUTRON_TEST_KILL": "step:5@1"})
    assert code != 0
    summary = _trained("zero2-cpu.yaml", runs["recipe"], out)
    assert summary["distributed"] == "DEEPSPEED" and summary["wrapper"] == "DeepSpeedEngine"
    assert summary["resumed_from"] == "checkpoint-3" and summary["replicas_in_sync"] is True
    assert (out / "checkpoint-6" / "pytorch_model").is_dir()  # ZeRO's own checkpoint
    _same_steps(out, runs["root"] / "ddp")
    _same_weights(out / "final", runs["root"] / "ddp" / "final")


def test_a_deepspeed_config_that_contradicts_the_recipe_is_refused(runs, tmp_path):
    pytest.importorskip("deepspeed")
    config = yaml.safe_load((CONFIGS / "zero2-cpu.yaml").read_text())
    config["deepspeed_config"]["gradient_clipping"] = 1.0
    path = tmp_path / "zero2.yaml"
    path.write_text(yaml.safe_dump(config))
    command = _command(str(path), runs["recipe"], tmp_path / "run")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode != 0
    assert "the DeepSpeed config sets gradient_clipping 1.0, the recipe train.max_grad_norm 0.05" in done.stderr


def _two_machines(
    recipe: Path, outs: tuple[str, str], cwds: tuple[Path, Path], record: Path
) -> list[subprocess.CompletedProcess]:
    """`accelerate launch --num_machines 2` twice on this machine: machine 0 and 1, one process each."""
    port = str(_free_port())
    record.mkdir(parents=True, exist_ok=True)
    env = _env(DIFFUTRON_RECORD_BATCHES=str(record))
    procs = []
    for rank, (out, cwd) in enumerate(zip(outs, cwds, strict=True)):
        launch = ("--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1")
        launch += ("--main_process_port", port, "--num_processes", "2")
        command = _command("ddp-cpu.yaml", recipe, out, launch=launch)
        procs.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


def test_two_machines_on_loopback_train_as_two_processes(runs, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    out = tmp_path / "run"
    done = _two_machines(
        runs["recipe"], (str(out), str(out)), (tmp_path / "a", tmp_path / "b"), tmp_path / "batches-run"
    )
    assert all(d.returncode == 0 for d in done), _failure(done[0].stderr.decode() + done[1].stderr.decode())
    _same_steps(out, runs["root"] / "ddp")
    _same_weights(out / "final", runs["root"] / "ddp" / "final")
    # each machine's process read the sequences the DDP run's process of its rank read, step by step
    key = lambda rows: sorted((r["step"], r["rank"], r["index"]) for r in rows)  # noqa: E731
    assert key(_batches(out)) == key(_batches(runs["root"] / "ddp"))


def test_machines_that_do_not_share_the_run_folder_are_refused(runs, tmp_path):
    """A relative --out read on two machines with other working directories: two folders, so the run stops at
    once with one line naming the process that cannot see the main process's folder."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    done = _two_machines(runs["recipe"], ("run", "run"), (tmp_path / "a", tmp_path / "b"), tmp_path / "batches")
    assert all(d.returncode != 0 for d in done)
    stderr = b"".join(d.stderr for d in done).decode()
    assert "process 1 on" in stderr and "training on several machines needs --out on a filesystem" in stderr
    assert not (tmp_path / "b" / "run" / "checkpoint-3").exists()


def test_data_prepared_at_start_never_outlasts_the_process_group_timeout(tmp_path):
    """Data prepared on the fly by a 2-process run, more slowly than the process group's timeout: the processes
    wait on a file lock before the group forms, not at a barrier, and the run trains."""
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"pack": {"max_length": 64}, "max_documents": 4}))
    recipe = _recipe(tmp_path, None, max_steps=1, timeout_minutes=0.2)  # 12 s, less than the preparation
    command = ("--set", f"data.recipe={data}", "--set", "data.eval=null")
    code, summary, stderr = _launch(
        "ddp-cpu.yaml", recipe, tmp_path / "run", *command, env={"DIFFUTRON_TEST_PREPARE_DELAY": "16"}
    )
    assert code == 0, _failure(stderr)
    assert summary["step"] == 1 and (tmp_path / "run" / "data" / "state.json").is_file()


def test_a_sharded_launch_that_gets_no_sharding_fails_in_one_line(tmp_path, small_data, monkeypatch):
    """The FSDP variables of a launch without its process group (a plain `diffutron train`): no silent DDP."""
    from diffutron.config import load_config, override
    from diffutron.errors import DiffutronError
    from diffutron.train import TrainRecipe, train

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = override(load_config(TrainRecipe, _recipe(tmp_path, small_data)), {"train.out": str(tmp_path / "r")})
    with pytest.raises(DiffutronError, match="asks for FSDP but accelerate set up NO"):
        train(recipe)
