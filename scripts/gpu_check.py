"""The GPU check: what only a GPU can tell, in one call of at most 8 minutes, written to one JSON.

    bash scripts/gpu_check.sh [--out gpu_check.json]     # on a machine with one CUDA GPU
    bash scripts/gpu_check.sh --cpu                       # the same code paths at tiny sizes (tests/test_gpu_check.py)

Parts (each timed; a part that fails is recorded with its error and the others still run):
  cuda_tests   the test suite's CUDA tests (the chunked cross-entropy in bf16 / fp16 against the dense one)
  train_step   the reference recipe (LoRA r=256 CPT) on the mmBERT-base shape in bf16, micro-batch 16 x 512:
               a few measured optimizer steps with and without gradient checkpointing (the planner's
               measurement: tokens/s, MFU against the device's dense bf16 peak, peak memory)
  projection   the planner's projection of configs/diffutron-0.3b-cpt.yaml on 1 and 8 GPUs
  eval         PPL@15% throughput on 512-token windows: the sparse head vs full logits (same masks)
  generation   generation tokens/s at batch 1, 8 and 32: exact decoding vs the dual cache
  fsdp         `accelerate launch` with configs/accelerate/fsdp.yaml on one GPU: a few LoRA steps of the
               tiny recipe, its summary (FSDP's wrapper, weights held)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# sizes on a GPU, and on a CPU (--cpu: the same code paths, a check that the script does not rot)
SIZES = {
    "gpu": dict(preset="mmbert-base", batch=16, length=512, lora_r=256, steps=3, windows=16, gen_batches=(1, 8, 32),
                gen_prompt=64, gen_new=64, fsdp_config="fsdp.yaml"),
    "cpu": dict(preset="tiny", batch=2, length=64, lora_r=8, steps=1, windows=4, gen_batches=(1, 2),
                gen_prompt=8, gen_new=8, fsdp_config="fsdp-cpu.yaml"),
}  # fmt: skip


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_tests(size: dict, device) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "tests/test_linear_ce.py", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = done.stdout.strip().splitlines()
    cuda = [line for line in lines if line.startswith(("PASSED", "FAILED", "SKIPPED")) and "cuda" in line]
    return {"returncode": done.returncode, "summary": lines[-1] if lines else "", "cuda_cases": cuda}


def _recipe(size: dict, **changes):
    from diffutron.config import load_config, override
    from diffutron.train import TrainRecipe

    recipe = load_config(TrainRecipe, ROOT / "configs" / "diffutron-0.3b-cpt.yaml")
    return override(
        recipe,
        {
            "model.name": f"preset:{size['preset']}",
            "train.batch_size": size["batch"],
            "lora.r": size["lora_r"],
            "lora.alpha": size["lora_r"],
            **changes,
        },
    )


MEASURED = (
    "seconds_per_step", "tokens_per_s", "achieved_flops", "peak_flops", "mfu", "peak_memory_mb", "peak_memory_kind",
    "flops_per_token", "compute_dtype", "device", "params_total", "params_trainable",
)  # fmt: skip


def train_step(size: dict, device) -> dict:
    from diffutron.train.plan import plan

    rows = {}
    for checkpointing in (False, True):
        recipe = _recipe(size, **{"model.gradient_checkpointing": checkpointing})
        result = plan(recipe, processes=1, measure=size["steps"], device=str(device), length=size["length"])
        rows["checkpointing" if checkpointing else "plain"] = {k: result[k] for k in MEASURED}
    return rows


def projection(size: dict, device, measured: dict | None) -> dict:
    """The reference recipe's run on 1 and 8 GPUs from the measured step (without gradient checkpointing)."""
    from diffutron.train.plan import plan

    if not measured:
        raise RuntimeError("no measured step (train_step failed)")
    seconds = measured["plain"]["seconds_per_step"]
    rows = {}
    for gpus in (1, 8):
        counts = plan(_recipe(size), processes=gpus, measure=0, length=size["length"])
        hours = counts["steps"] * seconds / 3600
        rows[f"{gpus}_gpu"] = {
            "steps": counts["steps"],
            "tokens_total": counts["tokens_total"],
            "seconds_per_step": seconds,
            "projected_hours": hours,
            "device_hours": hours * gpus,
        }
    return rows


def evaluation(size: dict, device, dtype) -> dict:
    import torch

    from diffutron.data import read_documents
    from diffutron.evaluate import evaluate_windows, make_windows
    from diffutron.model import DiffusionLM

    lm = DiffusionLM.from_preset(size["preset"], seed=0).to(device=device, dtype=dtype).eval()
    texts = [d.text for d in read_documents("bundled:heldout")]
    windows = [w[: size["length"]] for w in make_windows(lm, texts) if len(w) >= size["length"]][: size["windows"]]
    rows = {}
    for name, sparse in (("sparse_head", True), ("full_logits", False)):
        options = dict(mask_ratio=0.15, samples=1, elbo_samples=0, batch_size=4, seed=0, sparse_head=sparse)
        evaluate_windows(lm, windows, **options)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        started = time.perf_counter()
        result = evaluate_windows(lm, windows, **options)
        _sync(device)
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        rows[name] = {"seconds": seconds, "tokens_per_s": result.tokens / seconds, "ppl": result.ppl, "peak_mb": peak}
    rows["speedup"] = rows["full_logits"]["seconds"] / rows["sparse_head"]["seconds"]
    rows["ppl_rel_diff"] = abs(rows["sparse_head"]["ppl"] / rows["full_logits"]["ppl"] - 1)
    return rows


def generation(size: dict, device, dtype) -> dict:
    from diffutron.data import read_documents
    from diffutron.model import DiffusionLM
    from diffutron.sampling import generate

    lm = DiffusionLM.from_preset(size["preset"], seed=0).to(device=device, dtype=dtype).eval()
    words = " ".join(d.text for d in read_documents("bundled:heldout")).split()
    rows = {}
    for batch in size["gen_batches"]:
        prompts = [" ".join(words[i * 40 : i * 40 + size["gen_prompt"]]) for i in range(batch)]
        row = {}
        block = min(32, size["gen_new"])
        for cache in ("none", "dual"):
            options = dict(max_new_tokens=size["gen_new"], block_length=block, cache=cache, stop_at_eos=False, seed=0)
            generate(lm, prompts, **(options | {"max_new_tokens": block}))  # warm-up
            _sync(device)
            started = time.perf_counter()
            result = generate(lm, prompts, **options)
            _sync(device)
            row[cache] = {"tokens_per_s": result.new_tokens / (time.perf_counter() - started)}
        row["dual_speedup"] = row["dual"]["tokens_per_s"] / row["none"]["tokens_per_s"]
        rows[str(batch)] = row
    return rows


def fsdp(size: dict, device) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / size["fsdp_config"]), "--num_processes", "1",
            "-m", "diffutron", "train", "configs/tiny-cpt.yaml", "--out", f"{scratch}/run", "--max-steps", "4",
            "--save-every", "2", "--set", "data.eval=null", "--set", "train.plot=false", "--json",
        ]  # fmt: skip
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    keep = ("distributed", "wrapper", "weights_held", "precision", "step", "final_loss", "seconds")
    return {k: summary.get(k) for k in keep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (a dry run of the script)")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--parts", default="cuda_tests,train_step,projection,eval,generation,fsdp")
    args = parser.parse_args()

    import torch

    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --cpu for a dry run)")
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.bfloat16
    size = SIZES["cpu" if args.cpu else "gpu"]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "sizes": size,
        "parts": {},
    }
    wanted = args.parts.split(",")
    runs = {
        "cuda_tests": lambda: cuda_tests(size, device),
        "train_step": lambda: train_step(size, device),
        "projection": lambda: projection(size, device, report["parts"].get("train_step", {}).get("result")),
        "eval": lambda: evaluation(size, device, dtype),
        "generation": lambda: generation(size, device, dtype),
        "fsdp": lambda: fsdp(size, device),
    }
    for name in wanted:
        started = time.perf_counter()
        try:
            entry = {"ok": True, "result": runs[name]()}
        except Exception as error:  # noqa: BLE001 -- recorded; the other parts still run
            failure = f"{type(error).__name__}: {error}"
            entry = {"ok": False, "error": failure, "traceback": traceback.format_exc()[-2000:]}
        entry["seconds"] = round(time.perf_counter() - started, 1)
        report["parts"][name] = entry
        print(f"{name}: {'ok' if entry['ok'] else entry['error']} ({entry['seconds']} s)", flush=True)
        Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")  # what is done survives a timeout
    print(json.dumps({k: v["ok"] for k, v in report["parts"].items()}))
    sys.exit(0 if all(v["ok"] for v in report["parts"].values()) else 1)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
