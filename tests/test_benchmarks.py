"""Every benchmark script runs: the smallest settings of each, on tiny shapes, print the JSON that
docs/benchmarks.md quotes. Figures are not checked here (they need a quiet machine and the real
shapes); a script that breaks when the code under it changes is."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script -> (the smallest arguments, keys its JSON must have)
CASES = {
    "batch_invariance": ("--models preset:tiny --prompts 2 --new-tokens 8 --settings greedy", ["models"]),
    "packed_head": ("--vocab 2000 --hidden 64 --rows 1,16 --repeats 1", ["table"]),
    "decode_step_profile": ("--preset tiny --steps 2", ["speedup_dual"]),
    "fast_decoding": (
        "--preset tiny --batches 1,2 --prompt-tokens 8 --new-tokens 16 --steps 16 --block-length 8 "
        "--quality-prompts 2 --quality-new-tokens 16",
        ["speedup_dual", "speedup_prefix", "agreement_dual", "agreement_prefix"],
    ),
    "generate": (
        "--preset tiny --batches 1 --new-tokens 16 --steps 16 --block-length 16",
        ["speedup", "identical_tokens"],
    ),
    "sample_draw": ("--rows 16 --repeats 1", []),
    "sampling_quality": ("--prompts 2 --new-tokens 8 --frames open --policies confidence", []),
    "eval_throughput": ("--preset tiny --sequences 1 --length 64 --repeats 1", []),
    "train_step": ("--preset tiny --batch 1 --length 64 --repeats 1", []),
    "harness_throughput": ("--preset tiny --questions 2 --mc-num 2 --repeats 1", []),
    "train_precision": ("--steps 3 --warmup 1 --rounds 1 --batch-size 2", []),
    "threads": ("--repeats 1 --settings diffutron --workloads generate", ["results"]),
    "serve_load": (
        "--clients 2 --max-tokens 8 --rounds 1 --time-limit 120",
        ["speedup", "identical", "sequential_forward_passes", "concurrent_forward_passes"],
    ),
    "data_pipeline": ("--scales 1 --num-proc 1 --repeats 1", []),
    "corpus_scale": (
        "--gb 0.002 --files 2",
        ["peak_rss_mb", "tokens_per_s", "kept_share", "bytes_per_token", "projected_hours_reference"],
    ),
    "task_pack_paired": ("--mc-num 1 --limit 8", []),
    "word_fill": (
        "--words 8 --timed 2",
        [
            "top1_word",
            "top5_word",
            "top5_oracle",
            "top5_pipeline",
            "length_accuracy",
            "time_ratio",
            "time_ratio_search_only",
        ],
    ),
    "checkpoint_size": ("--preset tiny", ["whole_checkpoint_mb", "trained_only_checkpoint_mb", "ratio"]),
    "cpu_precision": (
        "--models tiny-diffutron --batches 1,2 --prompt-tokens 8 --new-tokens 8 --block-length 8 --rounds 1 "
        "--ppl-docs 2 --agreement-prompts 2",
        ["speedup_bf16_exact", "speedup_bf16_dual", "ppl_rel_diff", "agreement", "floor_ms", "step_ms"],
    ),
}


def _run(script: str) -> subprocess.CompletedProcess:
    args, _keys = CASES[script]
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--json", *args.split()],
        capture_output=True,
        text=True,
        cwd=ROOT,  # as docs/benchmarks.md runs them: recipes name their data relative to the repository
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )


@pytest.fixture(scope="module")
def runs(request):
    """Every selected script started up front, two at a time: most of a smoke run is one process
    importing torch and transformers (one core), so two side by side keep both cores busy."""
    selected = [
        item.callspec.params["script"]
        for item in request.session.items
        if item.originalname == "test_benchmark_runs_and_prints_its_json"
    ]
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        yield {script: pool.submit(_run, script) for script in selected}
    finally:  # a stopped session (-x, Ctrl-C) starts no more of them
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs_and_prints_its_json(script, runs):
    done = runs[script].result()
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    keys = CASES[script][1]
    assert set(keys) <= set(report), f"{script} printed {sorted(report)}"
