"""How often a request's text differs alone vs in company: the encoder is not batch-invariant.

    python benchmarks/batch_invariance.py [--json] [--models tiny-diffutron,preset:mmbert-base]
        [--prompts 64,16] [--new-tokens 32,8] [--settings greedy,t0.8,t0.8-prefix] [--seeds 1]
        [--cost-rows 8] [--threads N]

A row's random numbers, blocks, steps and cache refreshes are its own (tests/test_sampling.py), and the
packed decoder is row-invariant; but its encoder forward is not: padded beside longer rows (and, with a
cache, in a span as wide as the widest row's) it sums in another order, so its logits move by rounding,
and a decision that is a near tie at that rounding can go the other way. This counts it.

For each model, `--prompts` held-out prompts of 2 to 8 words (so of different token lengths), each
as row 0 (its draws are those of the seed) of three companies, its text compared to its text alone:

  batch  -- all the prompts in one batch (row i draws with seed + i, and is compared to itself alone
            with seed + i): every row beside rows of other lengths;
  pair   -- row 0 of n=2 (the prompt twice, the second row with seed + 1): the same width, twice the rows;
  longer -- row 0 beside one prompt of 3x its words (wider: row 0 is padded).

Settings, on the defaults of `diffutron generate` and the server (repetition penalty 1.2): `greedy`
(confidence, temperature 0), `t0.8` (temperature 0.8, seeded), `t0.8-prefix` (the same with the prefix
cache, blocks of 8). Each row writes `--new-tokens` tokens, no stop at EOS (every decision counts). At a
temperature, `--seeds N` repeats it all with N base seeds (7, 1007, ...): N trials per prompt.
Also reported, per model: the largest logit difference at the first step between a row alone and in the
batch (the size of the rounding, fp32 on a CPU). `preset:mmbert-base` is the reference shape with random
weights: near-uniform distributions over 256k tokens, so near ties everywhere (a trained model's are
peaked). And the price of a batch-invariant path (`cost`): the same greedy generation of `--cost-rows`
rows with every row's forward computed alone (tests/rows_alone.py) vs batched. Threads: diffutron's
choice, as the CLI's (`--threads` to set). With --json, stdout is one JSON object (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SETTINGS = {
    "greedy": {},
    "t0.8": {"temperature": 0.8},
    "t0.8-prefix": {"temperature": 0.8, "cache": "prefix", "block_length": 8},
}
SEED = 7


def held_out_prompts(n: int) -> list[str]:
    """n held-out prompts, the first 2 to 8 words of a document (the count cycling, so lengths differ)."""
    from diffutron.data import read_documents

    found = []
    for doc in read_documents("bundled:heldout"):
        words = doc.text.split()
        count = 2 + len(found) % 7
        if len(words) > count:
            found.append(" ".join(words[:count]))
        if len(found) == n:
            return found
    raise SystemExit("not enough held-out prompts")


def longer_prompt(prompt: str) -> str:
    from diffutron.data import read_documents

    want = 3 * len(prompt.split())
    for doc in read_documents("bundled:heldout"):
        words = doc.text.split()
        if len(words) >= want and not doc.text.startswith(prompt):
            return " ".join(words[:want])
    raise SystemExit("no longer held-out prompt")


def first_step_logit_gap(lm, prompts: list[str], new_tokens: int) -> float:
    """Largest |logit alone - logit in the batch| at the masks of the first step, over the rows."""
    import torch

    from diffutron.sampling import generation_canvas

    together = generation_canvas(lm, prompts, new_tokens)
    with torch.no_grad():
        batch = lm(together.ids, together.attention_mask, positions=together.fillable, packed_decoder=True)
        alone = torch.cat(
            [
                lm(c.ids, c.attention_mask, positions=c.fillable, packed_decoder=True)
                for c in (generation_canvas(lm, [p], new_tokens) for p in prompts)
            ]
        )
    return float((batch - alone).abs().max())


def measure(lm, prompts: list[str], new_tokens: int, options: dict, seeds: int) -> dict:
    """Counts over `seeds` rounds (a round's row i draws with its base seed + i; greedy: one round)."""
    from diffutron.sampling import generate, user_config

    def texts(rows: list[str], seed: int) -> list[list[int]]:
        config = user_config("generate", seed=seed, stop_at_eos=False, **options)
        return generate(lm, rows, max_new_tokens=new_tokens, config=config).token_ids

    differ = {"batch": [], "pair": [], "longer": []}
    tokens = dict.fromkeys(differ, 0)
    rounds = 1 if not options.get("temperature") else seeds
    for base in range(SEED, SEED + 1000 * rounds, 1000):
        alone = [texts([p], base + i)[0] for i, p in enumerate(prompts)]
        company = {
            "batch": texts(prompts, base),
            "pair": [texts([p, p], base + i)[0] for i, p in enumerate(prompts)],
            "longer": [texts([p, longer_prompt(p)], base + i)[0] for i, p in enumerate(prompts)],
        }
        for way, got in company.items():
            differ[way] += [(prompts[i], base + i) for i in range(len(prompts)) if got[i] != alone[i]]
            tokens[way] += sum(a != b for i in range(len(prompts)) for a, b in zip(alone[i], got[i], strict=True))
    return {
        "trials": len(prompts) * rounds,
        **{f"differ_{k}": len(v) for k, v in differ.items()},
        "differ_any": len(set().union(*differ.values())),
        **{f"tokens_differ_{k}": v for k, v in tokens.items()},
        "tokens": len(prompts) * rounds * new_tokens,
        "examples": {k: v[:3] for k, v in differ.items()},
    }


def per_row_cost(lm, prompts: list[str], new_tokens: int, rounds: int = 3) -> dict:
    """A batch-invariant path, priced: every row's forward computed alone at its own width (the tests'
    harness, tests/rows_alone.py: a row's text is then its text alone, bit for bit) vs the batched forward,
    on the same rows, greedy; rounds alternate so that both see the same load. Median seconds of each."""
    import statistics

    import pytest
    from rows_alone import compute_rows_alone

    from diffutron.sampling import generate, user_config

    config = user_config("generate", stop_at_eos=False)
    times: dict[str, list[float]] = {"batched": [], "per_row": []}
    for _ in range(rounds):
        for way in times:
            with pytest.MonkeyPatch.context() as patch:
                if way == "per_row":
                    compute_rows_alone(patch)
                started = time.perf_counter()
                generate(lm, prompts, max_new_tokens=new_tokens, config=config)
                times[way].append(time.perf_counter() - started)
    batched, per_row = (statistics.median(times[w]) for w in ("batched", "per_row"))
    return {"rows": len(prompts), "batched_s": batched, "per_row_s": per_row, "slowdown": per_row / batched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--models", default="tiny-diffutron,preset:mmbert-base")
    parser.add_argument("--prompts", default="64,16", help="per model")
    parser.add_argument("--new-tokens", default="32,8", help="per model")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--seeds", type=int, default=1, help="rounds of seeds per prompt at a temperature")
    parser.add_argument("--cost-rows", type=int, default=8, help="rows of the per-row cost (0: not measured)")
    parser.add_argument("--threads", type=int, default=None, help="default: diffutron's choice, as the CLI's")
    args = parser.parse_args()

    from diffutron.threads import configure

    configure(args.threads)
    import torch

    from diffutron.model import DiffusionLM

    models = args.models.split(",")
    counts = [int(n) for n in args.prompts.split(",")]
    new_tokens = [int(n) for n in args.new_tokens.split(",")]
    if not len(models) == len(counts) == len(new_tokens):
        raise SystemExit("--models, --prompts and --new-tokens need one value per model")
    report = {"threads": torch.get_num_threads(), "seed": SEED, "models": {}}
    for name, n, tokens in zip(models, counts, new_tokens, strict=True):
        lm = DiffusionLM.from_pretrained(name, device="cpu", dtype=torch.float32).eval()
        prompts = held_out_prompts(n)
        entry = {"new_tokens": tokens, "logit_gap": first_step_logit_gap(lm, prompts, tokens)}
        print(f"{name}: first-step logit gap alone vs batch {entry['logit_gap']:.2e}", file=sys.stderr)
        for setting in [s for s in args.settings.split(",") if s]:
            started = time.perf_counter()
            entry[setting] = measure(lm, prompts, tokens, SETTINGS[setting], args.seeds)
            e = entry[setting]
            print(
                f"{name} {setting}: of {e['trials']} prompts x seeds, differ in the batch {e['differ_batch']}, "
                f"as row 0 of n=2 {e['differ_pair']}, beside a longer one {e['differ_longer']}, any {e['differ_any']} "
                f"({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
            )
        if args.cost_rows:
            entry["cost"] = per_row_cost(lm, prompts[: args.cost_rows], tokens)
            print(f"{name}: rows computed alone vs batched {entry['cost']}", file=sys.stderr)
        report["models"][name] = entry
        del lm
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
