"""Training throughput in fp32 and with bf16 autocast on this machine, through diffutron's own loop.

    python benchmarks/train_precision.py [--json] [--recipe configs/tiny-base-mlm.yaml] [--steps 40] [--warmup 10]
                                         [--rounds 2] [--batch-size B]

Runs `train()` on the recipe (default: the shipped tiny base's MLM recipe) for a few steps with
train.precision fp32 and bf16, alternating rounds so that both see the same machine load; reports
the median tokens/s after the first `--warmup` steps and the loss each ends with (same seed, same data).
bf16 autocast pays off on CPUs with native bf16 matrix instructions (AVX-512 BF16, AMX); on others
it can be slower than fp32. The last line of --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_worker  # noqa: E402


def one_run(
    recipe_path: str, precision: str, steps: int, warmup: int, batch_size: int | None, data: Path, out: Path
) -> dict:
    from diffutron.config import load_config, override
    from diffutron.train import TrainRecipe, train

    recipe = override(
        load_config(TrainRecipe, recipe_path),
        {
            "data.dataset": str(data),
            "data.recipe": None,
            "data.eval": None,
            "train.out": str(out),
            "train.max_steps": steps,
            "train.log_every": 1,
            "train.save_every": 10**9,
            "train.plot": False,
            "train.precision": precision,
        }
        | ({"train.batch_size": batch_size} if batch_size else {}),
    )
    records = []
    summary = train(recipe, progress=records.append)
    speeds = [r["tokens_per_s"] for r in records if r["step"] > warmup]
    return {"tokens_per_s": statistics.median(speeds), "final_loss": summary["final_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--recipe", default="configs/tiny-base-mlm.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the median")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, help="instead of the recipe's (a quick check)")
    # each run in its own process: accelerate fixes the precision once per process
    parser.add_argument("--worker", choices=["fp32", "bf16"])
    parser.add_argument("--data")
    parser.add_argument("--out")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 0 and less than --steps")
    if args.worker:
        print(
            json.dumps(
                one_run(
                    args.recipe, args.worker, args.steps, args.warmup, args.batch_size, Path(args.data), Path(args.out)
                )
            )
        )
        return

    from diffutron.config import load_config
    from diffutron.data.prepare import DataRecipe, prepare
    from diffutron.train import TrainRecipe

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_recipe = load_config(TrainRecipe, args.recipe).data.recipe
        prepare(load_config(DataRecipe, data_recipe), tmp / "data")
        runs: dict[str, list[dict]] = {"fp32": [], "bf16": []}
        for round_ in range(args.rounds):
            for precision in runs:
                runs[precision].append(
                    run_worker(
                        __file__,
                        precision,
                        *("--recipe", args.recipe, "--steps", str(args.steps), "--warmup", str(args.warmup)),
                        *(("--batch-size", str(args.batch_size)) if args.batch_size else ()),
                        *("--data", str(tmp / "data"), "--out", str(tmp / f"{precision}-{round_}")),
                    )
                )
    speed = {p: statistics.median(r["tokens_per_s"] for r in rs) for p, rs in runs.items()}
    loss = {p: rs[0]["final_loss"] for p, rs in runs.items()}
    result = {
        "recipe": args.recipe,
        "steps": args.steps,
        "batch_size": args.batch_size or load_config(TrainRecipe, args.recipe).train.batch_size,
        "fp32_tokens_per_s": round(speed["fp32"]),
        "bf16_tokens_per_s": round(speed["bf16"]),
        "bf16_speedup": round(speed["bf16"] / speed["fp32"], 2),
        "fp32_final_loss": loss["fp32"],
        "bf16_final_loss": loss["bf16"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
