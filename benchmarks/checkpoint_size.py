"""The size of one checkpoint of the reference recipe (LoRA r=256 on every attention and MLP linear of the
mmBERT-base shape), as accelerate writes it whole and as diffutron writes it: the adapters, the optimizer,
scheduler and RNG, not the frozen base (train/state.py: save_only_what_trains), each beside the same
model/ folder (the peft adapter).

    python benchmarks/checkpoint_size.py [--json] [--preset mmbert-base]

One process on the CPU, one optimizer step (so the optimizer has its state), then both ways of saving the
same state, timed. The last line of --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def measure(preset: str) -> dict:
    import torch
    from accelerate import Accelerator

    from diffutron.config import load_config, override
    from diffutron.train import TrainRecipe, build_model, compute_loss
    from diffutron.train.loop import mask_generator
    from diffutron.train.state import save_only_what_trains

    recipe = load_config(TrainRecipe, ROOT / "configs" / "diffutron-0.3b-cpt.yaml")
    recipe = override(recipe, {"model.name": f"preset:{preset}", "train.batch_size": 1})
    lm = build_model(recipe)
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(lm, optimizer)
    ids = torch.randint(1000, 2000, (1, 64))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    compute_loss(lm, model, batch, recipe, mask_generator(0, 0, 0, 0)).loss.backward()
    optimizer.step()
    result = {"preset": preset, "params": sum(p.numel() for p in lm.parameters())}
    result["params_trained"] = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as scratch:
        lm.save_pretrained(Path(scratch) / "model")
        result["model_folder_mb"] = folder_mb(Path(scratch) / "model")
        for name in ("whole", "trained_only"):
            if name == "trained_only":
                save_only_what_trains(accelerator, lora=True)
            folder = Path(scratch) / name
            started = time.perf_counter()
            accelerator.save_state(str(folder))
            result[f"{name}_seconds"] = time.perf_counter() - started
            result[f"{name}_state_mb"] = folder_mb(folder)
            result[f"{name}_checkpoint_mb"] = result[f"{name}_state_mb"] + result["model_folder_mb"]
    result["ratio"] = result["whole_checkpoint_mb"] / result["trained_only_checkpoint_mb"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--preset", default="mmbert-base")
    args = parser.parse_args()
    result = measure(args.preset)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{args.preset}: {result['params']:,} parameters, {result['params_trained']:,} trained; one checkpoint "
        f"{result['whole_checkpoint_mb']:,.0f} MB whole, {result['trained_only_checkpoint_mb']:,.0f} MB with the "
        f"trained weights only ({result['ratio']:.1f}x smaller); saved in {result['whole_seconds']:.1f} s vs "
        f"{result['trained_only_seconds']:.1f} s",
        file=sys.stdout,
    )


if __name__ == "__main__":
    main()
