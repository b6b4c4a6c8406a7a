"""Fast decoding: the exact sampler vs the prefix and dual key/value caches, and parallel decoding.

    python benchmarks/fast_decoding.py [--json] [--device cpu|cuda] [--dtype fp32|bf16] [--batches 1,4]
        [--preset mmbert-base]
        [--steps 256] [--rounds 1] [--skip-speed] [--skip-quality]

Speed (random weights, speed only): the mmBERT-base shape, prompts of 64 held-out tokens, 256 new
tokens, blocks of 32, `--steps` (default 256: one token per step), greedy `confidence`, no stop at EOS
(every row writes all 256 tokens). Per batch size, the three modes -- `cache none` (the exact sampler),
`prefix`, `dual` -- denoise the same prompts in lockstep, one `Denoiser.step()` of each in turn (the
order rotating every step), each step timed alone: on a shared machine whose load drifts over minutes,
every mode sees the same load (`--rounds N` repeats the whole generation N times). tokens/s from the
summed wall-clock step times, and the CPU seconds of this process; speedup = cached tokens/s over
exact tokens/s. (A step is the whole of the sampler's work: forward, head, draw, policy, bookkeeping;
`generate` adds only tokenizing the prompts and decoding the texts.)

Quality: the shipped tiny Diffutron, 16 held-out prompts of 16 tokens, 64 new tokens, blocks of 16,
greedy. For each mode and for threshold / factor decoding: the share of generated tokens equal (same
position) to exact one-token-per-step decoding, the ELBO of the generated continuations under the
exact model (diffutron.likelihood, 32 stratified samples, the masks seeded by prompt, so that every
decoding of a prompt is scored on the same masks; nats per token; higher = likelier), and the
forward passes per generated token (a cached pass computes only part of the canvas).

With --json, stdout is one JSON object (progress goes to stderr): speedup_dual and speedup_prefix (the
smaller over the batch sizes: the targets must hold at each), agreement_dual and agreement_prefix
(confidence decoding), and the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("none", "prefix", "dual")
# (label, cache, sampling settings) of the quality table; agreement is against the first row
QUALITY_RUNS = [
    ("exact", "none", {}),
    ("prefix", "prefix", {}),
    ("dual", "dual", {}),
    ("dual, refresh every 4", "dual", {"refresh_every": 4}),
    ("threshold 0.9", "none", {"policy": "threshold", "threshold": 0.9}),
    ("threshold 0.5", "none", {"policy": "threshold", "threshold": 0.5}),
    ("threshold 0.5 + dual", "dual", {"policy": "threshold", "threshold": 0.5}),
    ("factor 1", "none", {"policy": "factor", "factor": 1.0}),
    ("factor 2", "none", {"policy": "factor", "factor": 2.0}),
    ("factor 4", "none", {"policy": "factor", "factor": 4.0}),
    ("factor 4 + dual", "dual", {"policy": "factor", "factor": 4.0}),
]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def speed(args, device, dtype) -> dict:
    from generate import prompts_of_length

    from diffutron.model import DiffusionLM
    from diffutron.sampling import Denoiser, SamplingConfig, generate, generation_canvas

    lm = DiffusionLM.from_pretrained(f"preset:{args.preset}", device=device, dtype=dtype, seed=0)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = prompts_of_length(lm, max(batches), args.prompt_tokens)
    options = dict(block_length=args.block_length, stop_at_eos=False)
    for mode in MODES:  # warm-up: kernels, allocator
        generate(lm, prompts[:1], max_new_tokens=args.block_length, steps=4, cache=mode, **options)
    table = {}
    for batch in batches:
        row = {mode: {"seconds": 0.0, "cpu_seconds": 0.0, "new_tokens": 0, "forward_passes": 0} for mode in MODES}
        for _ in range(args.rounds):
            running = {}
            for mode in MODES:
                config = SamplingConfig(steps=args.steps, cache=mode, **options)
                running[mode] = Denoiser(lm, config)
                running[mode].add(generation_canvas(lm, prompts[:batch], args.new_tokens), config)
            turn = 0
            while running:  # one step of each mode in turn, the order rotating: load drifts weigh on all
                order = list(running)[turn % len(running) :] + list(running)[: turn % len(running)]
                for mode in order:
                    sync(device)
                    wall, cpu = time.perf_counter(), time.process_time()
                    finished = running[mode].step().finished
                    sync(device)
                    row[mode]["seconds"] += time.perf_counter() - wall
                    row[mode]["cpu_seconds"] += time.process_time() - cpu
                    row[mode]["new_tokens"] += sum(len(f.token_ids) for f in finished if f)
                    row[mode]["forward_passes"] += 1
                    if not len(running[mode]):
                        del running[mode]
                turn += 1
        for mode in MODES:
            row[mode]["tokens_per_s"] = row[mode]["new_tokens"] / row[mode]["seconds"]
        for mode in ("prefix", "dual"):
            row[mode]["speedup"] = row[mode]["tokens_per_s"] / row["none"]["tokens_per_s"]
            row[mode]["speedup_cpu_time"] = row["none"]["cpu_seconds"] / row[mode]["cpu_seconds"]
        table[str(batch)] = row
        print(
            f"batch {batch}: "
            + "  ".join(f"{m} {row[m]['tokens_per_s']:.2f} tok/s" for m in MODES)
            + f"  -> prefix {row['prefix']['speedup']:.2f}x, dual {row['dual']['speedup']:.2f}x"
            + f" (CPU time: {row['prefix']['speedup_cpu_time']:.2f}x, {row['dual']['speedup_cpu_time']:.2f}x)",
            file=sys.stderr if args.json else sys.stdout,
            flush=True,
        )
    return table


def quality(args, device, dtype) -> list[dict]:
    from generate import prompts_of_length

    from diffutron.assets import shipped_model
    from diffutron.likelihood import continuation_logprobs
    from diffutron.model import DiffusionLM
    from diffutron.sampling import generate

    lm = DiffusionLM.from_pretrained(str(shipped_model("tiny-diffutron")), device=device, dtype=dtype)
    prompts = prompts_of_length(lm, args.quality_prompts, 16)
    contexts = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    new = args.quality_new_tokens
    rows, exact = [], None
    for label, cache, settings in QUALITY_RUNS:
        sync(device)
        started = time.perf_counter()
        result = generate(
            lm, prompts, max_new_tokens=new, block_length=16, cache=cache, stop_at_eos=False, seed=0, **settings
        )
        sync(device)
        seconds = time.perf_counter() - started
        tokens = result.token_ids
        exact = exact or tokens
        same = sum(a == b for t, e in zip(tokens, exact, strict=True) for a, b in zip(t, e, strict=True))
        pairs = list(zip(contexts, tokens, strict=True))
        # keyed by prompt: every decoding of a prompt is scored on the same masks (a paired comparison)
        scored = continuation_logprobs(lm, pairs, mc_num=32, seed=0, keys=prompts)
        rows.append(
            {
                "decoding": label,
                "agreement": same / sum(len(e) for e in exact),
                "elbo_per_token": sum(s.logprob for s in scored) / sum(len(t) for t in tokens),
                "forward_passes_per_token": sum(result.row_passes) / sum(len(t) for t in tokens),
                "tokens_per_s": result.new_tokens / seconds,
            }
        )
        r = rows[-1]
        print(
            f"{label:<24} agreement {r['agreement']:.3f}  ELBO {r['elbo_per_token']:.3f} nats/token  "
            f"passes/token {r['forward_passes_per_token']:.3f}  {r['tokens_per_s']:.0f} tok/s",
            file=sys.stderr if args.json else sys.stdout,
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--preset", default="mmbert-base", help="the shape of the speed runs")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="timed generations per mode")
    parser.add_argument("--quality-prompts", type=int, default=16)
    parser.add_argument("--quality-new-tokens", type=int, default=64)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()

    import torch

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    from diffutron.packed_linear import enabled

    out = {
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "packed_head": enabled() and device.type == "cpu",  # packed_linear.py; DIFFUTRON_PACKED_HEAD=0: F.linear
        "settings": vars(args),
    }
    if not args.skip_speed:
        table = speed(args, device, dtype)
        out["speed"] = table
        for mode in ("prefix", "dual"):
            out[f"speedup_{mode}"] = min(row[mode]["speedup"] for row in table.values())
    if not args.skip_quality:
        rows = quality(args, device, dtype)
        out["quality"] = rows
        by_label = {r["decoding"]: r for r in rows}
        out["agreement_prefix"], out["agreement_dual"] = by_label["prefix"]["agreement"], by_label["dual"]["agreement"]
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
