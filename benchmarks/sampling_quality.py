"""Sampling policies and canvas frames on the shipped tiny Diffutron: passes per token, speed, quality, stopping.

    python benchmarks/sampling_quality.py [--json] [--model PATH] [--prompts 32] [--new-tokens 32]
        [--frames closed,open] [--temperature 0] [--top-p 1] [--repetition-penalty 1] [--seeds 1]

Prompts are the first 8 tokens of held-out documents that have at least 8 + new-tokens tokens.
Quality is judged without the model itself, by an interpolated trigram model of the bundled train
split (same tokenizer): the perplexity of the generated continuations, and of the documents' own
held-out continuations of the same length after the same prompts, scored the same way (the
comparable reference); the standard error is over prompts (and seeds). Also distinct-2 and the share
of repeated tokens within a sample, and forward passes per token (each prompt's own passes: rows leave
the batch when done). Quality runs generate the full length (EOS banned); a second run per setting
lets rows stop at EOS and reports how often they do, how long the texts are, and how often the text
ends with "." (the closed frame puts [SEP] right after the masks, which may pull a "." before it).
The last line of --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter

POLICIES = [
    ("confidence", None),
    ("margin", None),
    ("entropy", None),
    ("random", None),
    ("threshold", 0.9),
    ("threshold", 0.7),
    ("threshold", 0.5),
    ("threshold", 0.3),
]


class TrigramModel:
    """Linear interpolation of trigram, bigram and add-one unigram estimates."""

    def __init__(self, sequences: list[list[int]], vocab: int, weights=(0.6, 0.3, 0.1)):
        self.uni, self.bi, self.tri = Counter(), Counter(), Counter()
        self.ctx1, self.ctx2 = Counter(), Counter()
        for seq in sequences:
            for i, token in enumerate(seq):
                self.uni[token] += 1
                if i >= 1:
                    self.bi[(seq[i - 1], token)] += 1
                    self.ctx1[seq[i - 1]] += 1
                if i >= 2:
                    self.tri[(seq[i - 2], seq[i - 1], token)] += 1
                    self.ctx2[(seq[i - 2], seq[i - 1])] += 1
        self.total, self.vocab, self.weights = sum(self.uni.values()), vocab, weights

    def prob(self, a: int, b: int, token: int) -> float:
        p1 = (self.uni[token] + 1) / (self.total + self.vocab)
        p2 = self.bi[(b, token)] / self.ctx1[b] if self.ctx1[b] else 0.0
        p3 = self.tri[(a, b, token)] / self.ctx2[(a, b)] if self.ctx2[(a, b)] else 0.0
        w3, w2, w1 = self.weights
        return w3 * p3 + w2 * p2 + w1 * p1

    def nll(self, context: list[int], tokens: list[int]) -> float:
        """Mean negative log-likelihood per token of `tokens` after `context`."""
        seq = context + tokens
        total = -sum(
            math.log(self.prob(seq[i - 2] if i >= 2 else -1, seq[i - 1], seq[i])) for i in range(len(context), len(seq))
        )
        return total / max(len(tokens), 1)


def ppl_with_stderr(nlls: list[float]) -> tuple[float, float]:
    """exp(mean per-sample NLL) and its standard error (delta method) over samples."""
    mean = statistics.fmean(nlls)
    se = statistics.stdev(nlls) / math.sqrt(len(nlls)) if len(nlls) > 1 else 0.0
    return math.exp(mean), math.exp(mean) * se


def frame_pairs(rows: list[dict]) -> dict:
    """Per policy: the closed frame's trigram PPL over the open frame's, paired over the same prompts."""
    by = {(r["frame"], r["policy"]): r["nll_per_prompt"] for r in rows}
    pairs = {}
    for (frame, policy), closed in by.items():
        if frame == "closed" and ("open", policy) in by:
            diffs = [a - b for a, b in zip(closed, by[("open", policy)], strict=True)]
            ratio, se = ppl_with_stderr(diffs)
            pairs[policy] = {"ppl_ratio_closed_over_open": ratio, "stderr": se}
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model", default=None, help="default: the shipped tiny Diffutron")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--frames", default="closed,open")
    parser.add_argument("--policies", default=None, help="comma-separated subset, e.g. confidence,threshold")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=1, help="seeds per prompt (useful with a temperature)")
    args = parser.parse_args()
    say = lambda line: print(line, file=sys.stderr if args.json else sys.stdout)  # noqa: E731 -- stdout: JSON only

    from diffutron.assets import shipped_model
    from diffutron.data import bundled_documents
    from diffutron.model import DiffusionLM
    from diffutron.sampling import SamplingConfig, generate

    lm = DiffusionLM.from_pretrained(args.model or str(shipped_model("tiny-diffutron")), device="cpu")
    tok = lm.tokenizer
    train_ids = tok([d.text for d in bundled_documents("train")], add_special_tokens=False, verbose=False)["input_ids"]
    ngram = TrigramModel(train_ids, len(tok))
    heldout = tok([d.text for d in bundled_documents("heldout")], add_special_tokens=False, verbose=False)["input_ids"]
    n = args.new_tokens
    docs = [ids for ids in heldout if len(ids) >= 8 + n][: args.prompts]
    prompts = [tok.decode(ids[:8]) for ids in docs]
    contexts = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    reference = ppl_with_stderr([ngram.nll(ids[:8], ids[8 : 8 + n]) for ids in docs])
    policies = [(p, t) for p, t in POLICIES if not args.policies or p in args.policies.split(",")]
    rows = []
    generate(lm, prompts[:2], max_new_tokens=4, steps=2, stop_at_eos=False)  # warm-up
    for frame in args.frames.split(","):
        for policy, tau in policies:
            settings = dict(
                steps=n,
                policy=policy,
                threshold=tau or 0.9,
                temperature=args.temperature,
                top_p=args.top_p,
                repetition_penalty=args.repetition_penalty,
                frame=frame,
            )
            nlls, tokens, passes, seconds = [], [], 0, 0.0
            for seed in range(args.seeds):
                started = time.perf_counter()
                full = generate(lm, prompts, n, SamplingConfig(**settings, ban_eos=True, seed=seed * len(prompts)))
                seconds += time.perf_counter() - started
                nlls += [ngram.nll(c, t) for c, t in zip(contexts, full.token_ids, strict=True)]
                tokens += full.token_ids
                passes += sum(full.row_passes)
            stopping = generate(lm, prompts, n, SamplingConfig(**settings))
            bigrams = [tuple(t[i : i + 2]) for t in tokens for i in range(len(t) - 1)]
            ppl, ppl_se = ppl_with_stderr(nlls)
            rows.append(
                {
                    "frame": frame,
                    "policy": policy if tau is None else f"threshold {tau}",
                    "forward_passes_per_token": passes / sum(len(t) for t in tokens),
                    "tokens_per_s": sum(len(t) for t in tokens) / seconds,
                    "ngram_ppl": ppl,
                    "ngram_ppl_stderr": ppl_se,
                    "distinct_2": len(set(bigrams)) / max(len(bigrams), 1),
                    "repeated_share": sum(len(t) - len(set(t)) for t in tokens) / sum(len(t) for t in tokens),
                    "eos_share": stopping.finished_by.count("eos") / len(prompts),
                    "mean_tokens_with_eos": statistics.fmean(len(t) for t in stopping.token_ids),
                    "ends_with_period_share": sum(t.rstrip().endswith(".") for t in stopping.texts) / len(prompts),
                    "example": full.texts[0],
                    "nll_per_prompt": nlls,
                }
            )
            r = rows[-1]
            say(
                f"{frame:<7} {r['policy']:<14} passes/token {r['forward_passes_per_token']:.3f} "
                f"{r['tokens_per_s']:6.1f} tok/s  trigram PPL {r['ngram_ppl']:7.1f} ± {r['ngram_ppl_stderr']:5.1f}  "
                f"distinct-2 {r['distinct_2']:.2f}  repeated {r['repeated_share']:.2f}  "
                f"EOS {r['eos_share']:.0%} (mean {r['mean_tokens_with_eos']:.1f} tokens, "
                f"'.' last {r['ends_with_period_share']:.0%})"
            )
    say(
        f"held-out continuations ({n} tokens after the same prompts): "
        f"trigram PPL {reference[0]:.1f} ± {reference[1]:.1f}"
    )
    paired = frame_pairs(rows)
    for policy, pair in paired.items():
        say(
            f"{policy}: trigram PPL closed / open = {pair['ppl_ratio_closed_over_open']:.3f} "
            f"± {pair['stderr']:.3f} (paired over prompts)"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "rows": rows,
                    "frame_paired": paired,
                    "heldout_ngram_ppl": reference[0],
                    "heldout_ngram_ppl_stderr": reference[1],
                    "prompts": len(prompts),
                    "new_tokens": n,
                    "seeds": args.seeds,
                    "temperature": args.temperature,
                    "top_p": args.top_p,
                    "repetition_penalty": args.repetition_penalty,
                },
                ensure_ascii=False,
            )
        )


if __name__ == "__main__":
    main()
