"""The shipped models on the pack's cloze tasks, compared item by item (a paired difference).

    python benchmarks/task_pack_paired.py [--json] [--mc-num 32] [--seed 0] [--limit N]

Each item is scored as `diffutron lm-eval` scores it (the same requests, masks and seed: the
accuracies equal the harness's), so the difference CPT - base per item gives a standard error far
tighter than either accuracy's, which is mostly the items' own spread.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

PACK = Path(__file__).resolve().parents[1] / "configs" / "eval" / "tasks" / "diffutron_tr"
MODELS = ("tiny-base", "tiny-diffutron")


def correct_answers(name: str, items: list[dict], mc_num: int, seed: int) -> list[bool]:
    from diffutron.harness import load
    from diffutron.likelihood import continuation_logprobs, encode_pair, question_key

    lm = load(name, device="cpu")
    texts = [[(item["context"], " " + choice) for choice in item["choices"]] for item in items]
    pairs = [encode_pair(lm.tokenizer, *text) for question in texts for text in question]
    keys = [question_key(question) for question in texts for _ in question]  # as the harness seeds them
    scores = [s.logprob for s in continuation_logprobs(lm, pairs, mc_num=mc_num, seed=seed, keys=keys)]
    return [
        max(range(len(item["choices"])), key=lambda j: scores[4 * k + j]) == item["label"]
        for k, item in enumerate(items)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--mc-num", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, help="the first N items of each task (a quick check)")
    args = parser.parse_args()
    if args.limit is not None and args.limit < 2:
        parser.error("--limit must be at least 2 (a paired standard error needs two items)")
    result = {}
    for task in ("tr_cloze", "tr_suffix"):
        lines = (PACK / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
        items = [json.loads(line) for line in lines][: args.limit]
        base, cpt = (correct_answers(name, items, args.mc_num, args.seed) for name in MODELS)
        diff = [int(b) - int(a) for a, b in zip(base, cpt, strict=True)]
        mean = sum(diff) / len(diff)
        spread = math.sqrt(sum((d - mean) ** 2 for d in diff) / (len(diff) - 1))
        result[task] = {
            "acc_base": sum(base) / len(base),
            "acc_cpt": sum(cpt) / len(cpt),
            "cpt_minus_base": mean,
            "paired_stderr": spread / math.sqrt(len(diff)),
        }
    if args.json:
        print(json.dumps(result))
        return
    for task, row in result.items():
        print(
            f"{task}: base {row['acc_base']:.4f}, CPT {row['acc_cpt']:.4f}, "
            f"CPT - base {row['cpt_minus_base']:+.4f} +- {row['paired_stderr']:.4f} (paired)"
        )


if __name__ == "__main__":
    main()
