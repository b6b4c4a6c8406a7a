"""scripts/gpu_check.sh, dry-run on the CPU at tiny sizes: every part of the GPU check runs, so the script
is ready the moment a GPU is lent (its GPU figures are in docs/benchmarks.md when measured)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=480,
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
    )
    report = json.loads(out.read_text())
    failed = {name: part.get("error") for name, part in report["parts"].items() if not part["ok"]}
    assert done.returncode == 0 and not failed, (failed, done.stderr[-2000:])
    parts = report["parts"]
    assert set(parts) == {"cuda_tests", "train_step", "projection", "eval", "generation", "fsdp"}
    assert parts["train_step"]["result"]["plain"]["tokens_per_s"] > 0
    assert parts["projection"]["result"]["8_gpu"]["steps"] * 8 == parts["projection"]["result"]["1_gpu"]["steps"]
    assert parts["eval"]["result"]["ppl_rel_diff"] < 1e-4  # the sparse head computes the full logits' PPL
    assert parts["fsdp"]["result"]["distributed"] == "FSDP"


def test_the_cluster_script_parses():
    assert subprocess.run(["bash", "-n", "scripts/slurm/cpt.sbatch"], cwd=ROOT).returncode == 0
