"""Sampling policies on the shipped tiny Diffutron: forward passes per token, speed, and quality.

    python benchmarks/sampling_quality.py [--json] [--model PATH] [--prompts 16] [--new-tokens 32]
        [--temperature 0] [--top-p 1] [--repetition-penalty 1]

Forward passes per token count each prompt's own passes (rows leave the batch when full). Quality
is judged without the model itself: the perplexity of the generated tokens under an
interpolated trigram model of the bundled train split (same tokenizer), and distinct-2 / the share
of repeated tokens within a sample. Prompts are the first 8 tokens of held-out documents; the same
sampling settings (greedy by default) for every policy, seed 0, one block, steps = new tokens (the
threshold policy takes as many steps as it needs). The last line of --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
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

    def perplexity(self, contexts: list[list[int]], continuations: list[list[int]]) -> float:
        nll, n = 0.0, 0
        for context, tokens in zip(contexts, continuations, strict=True):
            seq = context + tokens
            for i in range(len(context), len(seq)):
                nll -= math.log(self.prob(seq[i - 2] if i >= 2 else -1, seq[i - 1], seq[i]))
                n += 1
        return math.exp(nll / max(n, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model", default=None, help="default: the shipped tiny Diffutron")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    args = parser.parse_args()

    from diffutron.assets import shipped_model
    from diffutron.data import bundled_documents
    from diffutron.model import DiffusionLM
    from diffutron.sampling import generate

    lm = DiffusionLM.from_pretrained(args.model or str(shipped_model("tiny-diffutron")), device="cpu")
    tok = lm.tokenizer
    train_ids = tok([d.text for d in bundled_documents("train")], add_special_tokens=False, verbose=False)["input_ids"]
    ngram = TrigramModel(train_ids, len(tok))
    heldout = [d.text for d in bundled_documents("heldout")]
    contexts = [ids[:8] for ids in tok(heldout, add_special_tokens=False, verbose=False)["input_ids"] if len(ids) >= 8]
    contexts = contexts[: args.prompts]
    prompts = [tok.decode(c) for c in contexts]
    contexts = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    reference = ngram.perplexity([c[:2] for c in contexts], [c[2:] for c in contexts])
    rows = []
    generate(lm, prompts[:2], max_new_tokens=4, steps=2, stop_at_eos=False)  # warm-up
    for policy, tau in POLICIES:
        # rows still active after each step: a row leaves the batch once full, so the passes each
        # prompt takes add up to all rows at step 1 plus the rows left active before every later step
        active_after = []
        started = time.perf_counter()
        result = generate(
            lm,
            prompts,
            max_new_tokens=args.new_tokens,
            steps=args.new_tokens,
            policy=policy,
            threshold=tau or 0.9,
            temperature=args.temperature,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            stop_at_eos=False,
            seed=0,
            callback=lambda state, after=active_after: after.append(int(state.active.sum())),
        )
        seconds = time.perf_counter() - started
        tokens = result.token_ids
        bigrams = [tuple(t[i : i + 2]) for t in tokens for i in range(len(t) - 1)]
        repeated = sum(len(t) - len(set(t)) for t in tokens) / max(sum(len(t) for t in tokens), 1)
        rows.append(
            {
                "policy": policy if tau is None else f"threshold {tau}",
                "forward_passes_per_token": (len(prompts) + sum(active_after[:-1])) / (len(prompts) * args.new_tokens),
                "tokens_per_s": result.new_tokens / seconds,
                "ngram_ppl": ngram.perplexity(contexts, tokens),
                "distinct_2": len(set(bigrams)) / max(len(bigrams), 1),
                "repeated_share": repeated,
                "example": result.texts[0],
            }
        )
        r = rows[-1]
        print(
            f"{r['policy']:<15} passes/token {r['forward_passes_per_token']:.3f}  {r['tokens_per_s']:7.1f} tok/s  "
            f"trigram PPL {r['ngram_ppl']:9.1f}  distinct-2 {r['distinct_2']:.2f}  repeated {r['repeated_share']:.2f}"
        )
    print(f"(held-out text itself under the trigram model: PPL {reference:.1f})")
    if args.json:
        print(
            json.dumps(
                {
                    "rows": rows,
                    "heldout_ngram_ppl": reference,
                    "prompts": len(prompts),
                    "new_tokens": args.new_tokens,
                    "temperature": args.temperature,
                    "top_p": args.top_p,
                    "repetition_penalty": args.repetition_penalty,
                },
                ensure_ascii=False,
            )
        )


if __name__ == "__main__":
    main()
