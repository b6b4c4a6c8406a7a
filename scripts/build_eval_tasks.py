"""Build the offline Turkish task pack (configs/eval/tasks/diffutron_tr/) from the bundled held-out split.

    python scripts/build_eval_tasks.py            # rewrites the tasks' JSONL files, byte for byte

- tr_cloze: a sentence's beginning, then four candidates for its next content word: the original and
  three distractors of about the same frequency in the *train* split (so a unigram prior cannot
  tell them apart), never a word of the sentence, never one sharing the original's first four letters.
- tr_suffix: the same question with three other inflections of the original's stem as the distractors
  (Turkish morphology: which case, person, tense fits what came before).
- tr_order: two consecutive sentences of a document, in their order and swapped: which is original?

Only `heldout` documents are read for the items; the train split gives only word frequencies.
Deterministic: a fixed seed, documents and sentences in their stored order.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path

from diffutron.data.bundled import bundled_documents

OUT = Path(__file__).resolve().parents[1] / "configs" / "eval" / "tasks" / "diffutron_tr"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-ZÇĞİÖŞÜ\"“‘(])")
WORD = re.compile(r"[^\W\d_]+")
# frequent function words: never a cloze target or distractor
STOPWORDS = set(
    "ve ile için gibi kadar daha çok her bir bu şu o da de ki ne ise ama fakat lakin veya yahut hem "
    "olan olarak oldu olur olmak olduğu olduğunu değil sonra önce bütün bizim sizin onların bunu bunun "
    "şey diye göre karşı ancak eğer yani şimdi artık yine böyle öyle".split()
)
MIN_LETTERS, MIN_COUNT, NEIGHBOURS = 4, 3, 30


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]


def candidate(word: str) -> bool:
    return len(word) >= MIN_LETTERS and word.islower() and word not in STOPWORDS


def train_vocabulary() -> tuple[list[str], dict[str, int]]:
    """Candidate words of the train split with at least MIN_COUNT occurrences, most frequent first."""
    counts = Counter(w for d in bundled_documents("train") for w in WORD.findall(d.text) if candidate(w))
    words = sorted((w for w, c in counts.items() if c >= MIN_COUNT), key=lambda w: (-counts[w], w))
    return words, {w: i for i, w in enumerate(words)}


def frequency_distractors(words: list[str], rank: dict[str, int]):
    """tr_cloze: words of about the target's train frequency, unrelated to it (another first four letters)."""

    def pick(word: str, present: set[str], rng: random.Random) -> list[str] | None:
        near = words[max(0, rank[word] - NEIGHBOURS) : rank[word] + NEIGHBOURS + 1]
        pool = [w for w in near if w not in present and w[:4] != word[:4]]
        return rng.sample(pool, 3) if len(pool) >= 3 else None

    return pick


def inflection_distractors(words: list[str]):
    """tr_suffix: other forms of the target's stem in the train split (the longest stem, at least four
    letters and at most four shorter than the word, that three other train words share)."""
    by_prefix: dict[str, list[str]] = {}
    for w in words:
        for n in range(4, len(w) + 1):
            by_prefix.setdefault(w[:n], []).append(w)

    def pick(word: str, present: set[str], rng: random.Random) -> list[str] | None:
        for n in range(len(word) - 1, max(3, len(word) - 5), -1):
            forms = [w for w in by_prefix.get(word[:n], []) if w != word and w not in present]
            if len(forms) >= 3:
                return rng.sample(sorted(forms), 3)
        return None

    return pick


def cloze_items(docs, rank: dict[str, int], distractors, rng: random.Random, limit: int) -> list[dict]:
    """A held-out sentence's beginning, its next candidate word and three distractors for it."""
    items = []
    for doc in docs:
        for number, sentence in enumerate(sentences(doc.text)):
            if not 8 <= len(sentence.split()) <= 40:
                continue
            matches = [m for m in WORD.finditer(sentence) if candidate(m.group()) and m.group() in rank]
            # a whole word after a space (the harness joins context and choice with one), some context first
            matches = [m for m in matches if sentence[m.start() - 1] == " " and len(sentence[: m.start()].split()) >= 4]
            if not matches:
                continue
            target = rng.choice(matches)
            word = target.group()
            others = distractors(word, set(WORD.findall(sentence)), rng)
            if others is None:
                continue
            choices = [word] + others
            rng.shuffle(choices)
            context = sentence[: target.start() - 1]
            items.append(
                {"id": f"{doc.id}-{number}", "context": context, "choices": choices, "label": choices.index(word)}
            )
    rng.shuffle(items)
    return items[:limit]


def order_items(docs, rng: random.Random, limit: int) -> list[dict]:
    items = []
    for doc in docs:
        sents = sentences(doc.text)
        for number in range(0, len(sents) - 1, 2):  # disjoint pairs: no sentence in two items
            first, second = sents[number], sents[number + 1]
            if not all(5 <= len(s.split()) <= 25 for s in (first, second)):
                continue
            label = rng.randrange(2)
            orders = [f"{first} {second}", f"{second} {first}"]
            choices = orders if label == 0 else orders[::-1]
            items.append({"id": f"{doc.id}-{number}", "choices": choices, "label": label})
    rng.shuffle(items)
    return items[:limit]


def write_jsonl(path: Path, items: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cloze", type=int, default=300, help="at most this many cloze items")
    parser.add_argument("--suffix", type=int, default=300, help="at most this many suffix items")
    parser.add_argument("--order", type=int, default=200, help="at most this many order items")
    args = parser.parse_args()
    docs = list(bundled_documents("heldout"))
    words, rank = train_vocabulary()
    args.out.mkdir(parents=True, exist_ok=True)
    cloze = cloze_items(docs, rank, frequency_distractors(words, rank), random.Random(args.seed), args.cloze)
    suffix = cloze_items(docs, rank, inflection_distractors(words), random.Random(args.seed + 2), args.suffix)
    order = order_items(docs, random.Random(args.seed + 1), args.order)
    write_jsonl(args.out / "tr_cloze.jsonl", cloze)
    write_jsonl(args.out / "tr_suffix.jsonl", suffix)
    write_jsonl(args.out / "tr_order.jsonl", order)
    print(f"{len(cloze)} cloze, {len(suffix)} suffix and {len(order)} order items -> {args.out}")


if __name__ == "__main__":
    main()
