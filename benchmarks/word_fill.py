"""Whole-word blanks on held-out text with the shipped tiny Diffutron: `<word>` (length unknown) against the
oracle told the true token count and against transformers' fill-mask pipeline; the length `<mask*?>` infill
chooses; the time of a word blank against a `<mask*N>` infill of the true length.

    python benchmarks/word_fill.py [--json] [--model PATH] [--words 500] [--seed 0] [--beam 8]
        [--max-tokens K] [--context 1] [--timed 50]

Sentences of the bundled held-out split (6 to 40 words); one whole word per sentence is masked (seeded),
`--words` of them stratified by the word's token length in its sentence (1, 2, 3, 4+: a quarter each,
the rarest lengths drawn first, no sentence twice). A word is letters and digits with apostrophes inside
("Cumhuriyeti'nin"), with at least one letter. A candidate is right when its text is the word exactly.
  top1_word / top5_word  `<word>` (fill_words: 1..K tokens, K from the corpus unless --max-tokens)
  top5_oracle            the same search and score told the true length (`<mask*N>`, the span filled jointly)
  top5_pipeline          transformers' pipeline("fill-mask") with one mask token where the word was
  length_accuracy        `<mask*?>` infill (1..8 tokens, greedy): the chosen length is the true one;
                         `length_confusion` counts chosen lengths per true length
  time_ratio             over the first --timed words, alternating: the time of a word blank with K = 4
                         lengths and beam 8 over that of infill(`<mask*N>`) at the true length N (sum/sum)
  time_ratio_search_only the same for the beam search alone (context 0: no scoring pass), the floor of
                         any score computed on top of that search
Each accuracy also per token length. The last line of --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from collections import Counter, defaultdict

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
BUCKETS = ["1", "2", "3", "4+"]


def bucket(length: int) -> str:
    return BUCKETS[min(length, 4) - 1]


def sentences(documents) -> list[str]:
    found = []
    for document in documents:
        for line in document.text.splitlines():
            found += [s.strip() for s in SENTENCE_END.split(line) if 6 <= len(s.split()) <= 40]
    return found


def occurrences(tokenizer, sentence: str) -> list[tuple[int, int, int]]:
    """(start, end, tokens) of each whole word of the sentence whose tokens are its own (the first token
    starts at the word, or at the space before it; the last ends with it)."""
    encoded = tokenizer(sentence, add_special_tokens=False, return_offsets_mapping=True)
    spans = encoded["offset_mapping"]
    found = []
    for match in WORD.finditer(sentence):
        start, end = match.span()
        if not any(c.isalpha() for c in match.group()):
            continue
        inside = [i for i, (a, b) in enumerate(spans) if a < end and b > start]
        if not inside:
            continue
        first, last = spans[inside[0]], spans[inside[-1]]
        if first[0] in (start, start - 1) and last[1] == end and sentence[first[0] : start].strip() == "":
            found.append((start, end, len(inside)))
    return found


def draw(tokenizer, texts: list[str], words: int, seed: int) -> list[dict]:
    """`words` masked sentences, a quarter per token length, one word each."""
    rng = random.Random(seed)
    by_bucket = defaultdict(list)  # bucket -> [(sentence index, occurrence)]
    for index, sentence in enumerate(texts):
        for occurrence in occurrences(tokenizer, sentence):
            by_bucket[bucket(occurrence[2])].append((index, occurrence))
    used, chosen = set(), []
    for name in sorted(BUCKETS, key=lambda b: len(by_bucket[b])):  # the rarest first
        pool = by_bucket[name]
        rng.shuffle(pool)
        taken = 0
        for index, (start, end, length) in pool:
            if taken == words // len(BUCKETS):
                break
            if index in used:
                continue
            used.add(index)
            taken += 1
            sentence = texts[index]
            chosen.append({"sentence": sentence, "start": start, "end": end, "word": sentence[start:end],
                           "length": length})  # fmt: skip
    return sorted(chosen, key=lambda item: (item["sentence"], item["start"]))


def blanked(item: dict, placeholder: str) -> str:
    return item["sentence"][: item["start"]] + placeholder + item["sentence"][item["end"] :]


def accuracy(hits: list[bool], items: list[dict]) -> dict:
    """Overall and per token length."""
    per = {name: [h for h, item in zip(hits, items, strict=True) if bucket(item["length"]) == name] for name in BUCKETS}
    return {"all": round(statistics.fmean(hits), 4), **{k: round(statistics.fmean(v), 4) for k, v in per.items() if v}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model", default=None, help="default: the shipped tiny Diffutron")
    parser.add_argument("--words", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beam", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None, help="<word>'s K (default: from the corpus)")
    parser.add_argument("--context", type=int, default=1, help="words each side whose terms join the score")
    parser.add_argument("--timed", type=int, default=50, help="words timed for time_ratio")
    parser.add_argument("--infill-batch", type=int, default=8, help="texts per <mask*?> infill call")
    args = parser.parse_args()

    import torch
    from transformers import pipeline

    from diffutron.assets import shipped_model
    from diffutron.data import bundled_documents
    from diffutron.model import DiffusionLM
    from diffutron.sampling import infill, user_config
    from diffutron.word_fill import fill_words, word_length_limit

    torch.manual_seed(args.seed)
    path = args.model or str(shipped_model("tiny-diffutron"))
    lm = DiffusionLM.from_pretrained(path, device="cpu")
    tokenizer = lm.tokenizer
    items = draw(tokenizer, sentences(bundled_documents("heldout")), args.words, args.seed)
    limit = args.max_tokens or word_length_limit(tokenizer)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log(f"{len(items)} words: {dict(Counter(bucket(i['length']) for i in items))}; K = {limit}")
    word_top, oracle_top = [], []
    started = time.perf_counter()
    for n, item in enumerate(items):
        text = blanked(item, "<word>")
        options = {"top_k": 5, "beam": args.beam, "context": args.context, "sequences": False}
        word_top.append([c.text for c in fill_words(lm, text, max_tokens=limit, **options)[0]])
        oracle_top.append([c.text for c in fill_words(lm, text, lengths=[item["length"]], **options)[0]])
        if (n + 1) % 50 == 0:
            log(f"  <word> and oracle: {n + 1}/{len(items)} ({time.perf_counter() - started:.0f} s)")

    fill = pipeline("fill-mask", model=path, tokenizer=path, device="cpu")
    answers = fill([blanked(item, tokenizer.mask_token) for item in items], top_k=5, batch_size=16)
    pipeline_top = [[a["token_str"].strip() for a in answer] for answer in answers]
    log("  pipeline: done")

    config = user_config("infill")
    chosen = []
    for start in range(0, len(items), args.infill_batch):
        part = items[start : start + args.infill_batch]
        result = infill(lm, [blanked(item, "<mask*?>") for item in part], config)
        chosen += [max(lengths, key=lambda entry: entry["score"])["length"] for lengths in result.lengths]
        if (start // args.infill_batch + 1) % 10 == 0:
            log(f"  <mask*?> infill: {start + len(part)}/{len(items)} ({time.perf_counter() - started:.0f} s)")

    def timed(fn) -> float:
        begun = time.perf_counter()
        fn()
        return time.perf_counter() - begun

    word_seconds, search_seconds, mask_seconds = [], [], []
    for item in items[:: max(1, len(items) // args.timed)][: args.timed]:
        text = blanked(item, "<word>")
        word_seconds.append(timed(lambda text=text: fill_words(lm, text, top_k=5, max_tokens=4, beam=8)))
        # the beam search alone (no context terms: no scoring pass): the floor of any score on top of it
        search_seconds.append(timed(lambda text=text: fill_words(lm, text, max_tokens=4, beam=8, context=0)))
        span = blanked(item, f"<mask*{item['length']}>")
        mask_seconds.append(timed(lambda span=span: infill(lm, span, config)))

    def hits(tops: list[list[str]], k: int) -> list[bool]:
        return [item["word"] in top[:k] for item, top in zip(items, tops, strict=True)]

    confusion = {name: Counter() for name in BUCKETS}
    for item, length in zip(items, chosen, strict=True):
        confusion[bucket(item["length"])][str(length)] += 1
    report = {
        "model": path,
        "words": len(items),
        "seed": args.seed,
        "beam": args.beam,
        "max_tokens": limit,
        "context": args.context,
        "top1_word": accuracy(hits(word_top, 1), items),
        "top5_word": accuracy(hits(word_top, 5), items),
        "top1_oracle": accuracy(hits(oracle_top, 1), items),
        "top5_oracle": accuracy(hits(oracle_top, 5), items),
        "top1_pipeline": accuracy(hits(pipeline_top, 1), items),
        "top5_pipeline": accuracy(hits(pipeline_top, 5), items),
        "length_accuracy": accuracy([c == item["length"] for c, item in zip(chosen, items, strict=True)], items),
        "length_confusion": {k: dict(sorted(v.items(), key=lambda kv: int(kv[0]))) for k, v in confusion.items()},
        "timed_words": len(word_seconds),
        "word_seconds": round(sum(word_seconds), 3),
        "mask_seconds": round(sum(mask_seconds), 3),
        "time_ratio": round(sum(word_seconds) / sum(mask_seconds), 3),
        "search_seconds": round(sum(search_seconds), 3),
        "time_ratio_search_only": round(sum(search_seconds) / sum(mask_seconds), 3),
    }
    report["word_vs_oracle_top5"] = round(report["top5_word"]["all"] / max(report["top5_oracle"]["all"], 1e-9), 4)
    if not args.json:
        for key in ("top1_word", "top5_word", "top1_oracle", "top5_oracle", "top1_pipeline", "top5_pipeline"):
            print(f"{key:15s} {report[key]}")
        print(f"length_accuracy {report['length_accuracy']}")
        print(f"length_confusion (true -> chosen) {report['length_confusion']}")
        print(f"<word> / oracle top-5: {report['word_vs_oracle_top5']}")
        print(f"time_ratio {report['time_ratio']} ({report['word_seconds']} s vs {report['mask_seconds']} s)")
        print(f"  the beam search alone: {report['time_ratio_search_only']} ({report['search_seconds']} s)")
    print(json.dumps(report, ensure_ascii=False))


if __name__ == "__main__":
    main()
