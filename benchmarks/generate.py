"""Greedy generation on the mmBERT-base shape: diffutron's sampler vs LLaDA's reference loop.

    python benchmarks/generate.py [--json] [--preset mmbert-base] [--batches 2,1]

16-token prompts from the held-out split, 64 new tokens, 64 steps, blocks of 32, greedy `confidence`
policy (LLaDA's low-confidence remasking), on LLaDA's own canvas (frame "open": prompt then masks; `--frame
closed` puts the encoder's [SEP] after the masks in both). The reference (tests/reference_sampler.py) runs the full
model -- the 256k-vocabulary decoder at every position -- on the whole canvas each step and a per-row
top-k; ours runs the head only at the current block's masks. Same weights, same prompts; tokens must
be identical. With --json, stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def prompts_of_length(lm, n: int, length: int) -> list[str]:
    """n held-out prompts that encode to exactly `length` tokens (decode then re-encode is checked)."""
    from diffutron.data import read_documents

    found = []
    for doc in read_documents("bundled:heldout"):
        ids = lm.tokenizer(doc.text[: 40 * length], add_special_tokens=False)["input_ids"][:length]
        text = lm.tokenizer.decode(ids)
        if len(ids) == length and lm.tokenizer(text, add_special_tokens=False)["input_ids"] == ids:
            found.append(text)
        if len(found) == n:
            return found
    raise SystemExit("not enough held-out prompts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--preset", default="mmbert-base")
    parser.add_argument("--batches", default="2,1")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--frame", default="open", choices=["open", "closed"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()

    import torch
    from reference_sampler import llada_generate_batch

    from diffutron.model import DiffusionLM
    from diffutron.sampling import generate

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    lm = DiffusionLM.from_pretrained(f"preset:{args.preset}", device=args.device, dtype=dtype, seed=0)
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    shape = dict(gen_length=args.new_tokens, steps=args.steps, block_length=args.block_length, frame=args.frame)
    runs = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = prompts_of_length(lm, batch, args.prompt_tokens)
        generate(lm, prompts, max_new_tokens=8, steps=2, stop_at_eos=False)  # warm-up
        llada_generate_batch(lm, prompts, gen_length=8, steps=2, block_length=8, frame=args.frame)
        sync()
        start = time.perf_counter()
        fast = generate(
            lm,
            prompts,
            max_new_tokens=args.new_tokens,
            steps=args.steps,
            block_length=args.block_length,
            policy="confidence",
            stop_at_eos=False,
            frame=args.frame,
        )
        sync()
        fast_s = time.perf_counter() - start
        start = time.perf_counter()
        reference = llada_generate_batch(lm, prompts, **shape)
        sync()
        ref_s = time.perf_counter() - start
        tokens = batch * args.new_tokens
        runs.append(
            {
                "batch": batch,
                "seconds_fast": fast_s,
                "seconds_reference": ref_s,
                "tokens_per_s_fast": tokens / fast_s,
                "tokens_per_s_reference": tokens / ref_s,
                "speedup": ref_s / fast_s,
                "identical_tokens": fast.token_ids == reference,
                "forward_passes": fast.forward_passes,
            }
        )
        r = runs[-1]
        print(
            f"batch {batch}: sampler {r['tokens_per_s_fast']:.2f} tok/s ({fast_s:.1f} s), reference "
            f"{r['tokens_per_s_reference']:.2f} tok/s ({ref_s:.1f} s): {r['speedup']:.2f}x, "
            f"identical tokens: {r['identical_tokens']}",
            file=sys.stderr if args.json else sys.stdout,  # with --json, stdout is the JSON object only
        )
    first = runs[0]
    summary = {
        "speedup": first["speedup"],
        "identical_tokens": all(r["identical_tokens"] for r in runs),
        "tokens_per_s_fast": first["tokens_per_s_fast"],
        "tokens_per_s_reference": first["tokens_per_s_reference"],
        "batch": first["batch"],
        "runs": runs,
        "preset": args.preset,
        "threads": torch.get_num_threads(),
        "frame": args.frame,
        "device": str(lm.device),
        "dtype": args.dtype,
        "shape": f"{args.prompt_tokens}+{args.new_tokens} tokens, {args.steps} steps, block {args.block_length}",
    }
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
