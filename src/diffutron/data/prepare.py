"""`diffutron data prepare`: sources -> mixture -> clean -> deduplicate -> tokenize -> pack -> shards.

Streaming end to end: documents flow through in chunks, so memory holds one chunk, the packer's
buffer, one shard being filled and the deduplication index (a few bytes per distinct document),
never the corpus. With `num_proc > 1`, cleaning, hashing and tokenization run in worker processes
(ordered, so the output is the same for any num_proc); deduplication and packing stay in the main
process, which sees every document.

Rerunning the same recipe on the same `out` is idempotent: a finished folder is left as it is, and an
interrupted one is rebuilt without rewriting the shards already complete.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffutron.data.clean import CleanConfig, CleanStats, Deduplicator, clean_text, dedup_keys
from diffutron.data.pack import PackConfig, Packer, ShardWriter, _write_json
from diffutron.data.sources import Document, iter_documents
from diffutron.errors import DiffutronError, UsageError
from diffutron.tokenizer import special_affixes

CHUNK = 256  # documents per unit of work


@dataclass
class SourceSpec:
    spec: str  # see diffutron.data.sources
    weight: float | None = None  # sampling proportion in the mixture
    tokens: int | None = None  # or a token budget: the source stops contributing past it
    text_field: str = "text"
    split: str = "train"  # for hf: sources
    txt_mode: str = "blank"  # .txt: documents split by blank lines ("blank") or one per line ("line")
    name: str = ""  # shown in stats [default: the spec]
    # keep the documents whose id hashes into [fraction_offset, fraction_offset + fraction): the same
    # ones on every run, and disjoint parts of one source for two stages (pre-training, then CPT)
    fraction: float | None = None
    fraction_offset: float = 0.0


@dataclass
class DataRecipe:
    sources: list[SourceSpec] = field(default_factory=lambda: [SourceSpec("bundled")])
    tokenizer: str = "bundled"  # a tokenizer folder or hub id; "bundled" is diffutron's own
    clean: CleanConfig = field(default_factory=CleanConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    seed: int = 0
    num_proc: int = 1
    max_documents: int | None = None  # stop after reading this many (a sample of a large corpus)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    from diffutron.tokenizer import load_bundled_tokenizer

    if name == "bundled":
        return load_bundled_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise DiffutronError(f"could not load tokenizer {name!r}: {str(err).splitlines()[0]}") from err


def _keep_fraction(documents: Iterator[Document], source: SourceSpec) -> Iterator[Document]:
    """The documents of `source.fraction`, chosen by a hash of their id (a seeded draw would differ by order)."""
    if source.fraction is None:
        return documents
    low, high = source.fraction_offset, source.fraction_offset + source.fraction
    if not (0 < source.fraction <= 1 and low >= 0 and high <= 1 + 1e-9):
        raise UsageError(f"{source.spec}: fraction and fraction_offset must lie in [0, 1], their sum at most 1")
    return (doc for doc in documents if low <= _unit_hash(doc.id) < high)


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


class Mixture:
    """Interleaves the sources' documents: by weight (seeded draws) or by token budget.

    A source that runs out (or reaches its budget) leaves; the others go on in their proportions.
    """

    def __init__(self, sources: list[SourceSpec], seed: int, rejects: dict[str, Counter]):
        self.names = [s.name or s.spec for s in sources]
        if len(set(self.names)) != len(self.names):
            raise UsageError("two sources have the same name: give them distinct `name`s")
        self.iterators = {
            name: _keep_fraction(
                iter_documents(
                    s.spec,
                    s.text_field,
                    errors="count",
                    rejects=rejects[name],
                    txt_mode=s.txt_mode,
                    split=s.split,
                    training=True,
                ),
                s,
            )
            for name, s in zip(self.names, sources, strict=True)
        }
        self.weights = {
            name: (s.weight if s.weight is not None else 1.0) for name, s in zip(self.names, sources, strict=True)
        }
        self.budgets = {name: s.tokens for name, s in zip(self.names, sources, strict=True) if s.tokens}
        self.tokens: Counter = Counter()
        self.rng = random.Random(seed)

    def consume(self, name: str, tokens: int) -> None:
        self.tokens[name] += tokens
        if name in self.budgets and self.tokens[name] >= self.budgets[name]:
            self.iterators.pop(name, None)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        while self.iterators:
            names = list(self.iterators)
            name = self.rng.choices(names, weights=[self.weights[n] for n in names])[0] if len(names) > 1 else names[0]
            try:
                yield name, next(self.iterators[name]).text
            except StopIteration:
                self.iterators.pop(name, None)


# -- work done per chunk, in the main process or in workers -----------------------------------------
_worker: dict = {}


def _init_worker(tokenizer_name: str, clean: CleanConfig) -> None:
    _worker["tokenizer"], _worker["clean"] = load_tokenizer(tokenizer_name), clean


def _process_chunk(texts: list[str]) -> tuple[list[str | tuple], Counter]:
    """Per document: its rejection reason, or (dedup digest, MinHash or None, token ids); and the
    counts of the cleaning rules that modified documents."""
    clean, modified = _worker["clean"], Counter()
    cleaned, results = [], []
    for text in texts:
        stats = CleanStats()
        cleaned.append(clean_text(text, clean, stats))
        modified.update(stats.modified)
        results.append(next(iter(stats.rejected), None))
    kept = [text for text in cleaned if text is not None]
    encoded = iter(_worker["tokenizer"](kept, add_special_tokens=False, verbose=False)["input_ids"] if kept else [])
    for i, text in enumerate(cleaned):
        if text is not None:
            results[i] = (*dedup_keys(text, clean), next(encoded))
    return results, modified


def _chunks(mixture: Mixture, limit: int | None) -> Iterator[tuple[list[str], list[str]]]:
    names, texts, read = [], [], 0
    for name, text in mixture:
        names.append(name)
        texts.append(text)
        read += 1
        if len(texts) == CHUNK or (limit and read >= limit):
            yield names, texts
            names, texts = [], []
            if limit and read >= limit:
                return
    if texts:
        yield names, texts


def prepare(recipe: DataRecipe, out: str | Path, progress: Callable[[dict], None] | None = None) -> dict:
    """Build the dataset folder `out` from `recipe`; returns the stats (also written to stats.json)."""
    recipe.pack.validate()
    out = Path(out)
    fingerprint = recipe.fingerprint()
    stats_path = out / "stats.json"
    if stats_path.is_file():
        previous = json.loads(stats_path.read_text())
        if previous.get("fingerprint") == fingerprint:
            return {**previous, "reused": True}
        raise UsageError(f"{out} holds a dataset prepared from another recipe; choose a new --out or delete it")
    tokenizer = load_tokenizer(recipe.tokenizer)
    prefix, suffix = special_affixes(tokenizer)
    if not suffix:
        raise DiffutronError("the tokenizer adds no end-of-sequence token to separate packed documents")
    started = time.perf_counter()
    rejects: dict[str, Counter] = defaultdict(Counter)
    read, kept, modified = Counter(), Counter(), Counter()
    mixture = Mixture(recipe.sources, recipe.seed, rejects)
    dedup = Deduplicator(recipe.clean)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else suffix[-1]
    packer = Packer(recipe.pack, prefix, suffix, pad_id)
    writer = ShardWriter(out, recipe.pack)
    totals = Counter()  # sequences, padding

    def write(blocks) -> None:
        totals["sequences"] += len(blocks)
        totals["padding"] += sum(recipe.pack.max_length - n for _, n in blocks)
        writer.add(blocks)

    def consume(names: list[str], results: list, chunk_modified: Counter) -> None:
        modified.update(chunk_modified)
        for name, result in zip(names, results, strict=True):
            read[name] += 1
            if isinstance(result, str):  # rejected while cleaning
                rejects[name][result] += 1
                continue
            digest, signature, ids = result
            reason = dedup.check(digest, signature)
            if reason is None and len(ids) < recipe.clean.min_tokens:
                reason = "too_few_tokens"
            if reason is None and recipe.clean.max_tokens and len(ids) > recipe.clean.max_tokens:
                reason = "too_many_tokens"
            if reason:
                rejects[name][reason] += 1
                continue
            kept[name] += 1
            mixture.consume(name, len(ids))
            write(packer.add(ids))
        if progress:
            progress({"documents": sum(read.values()), "sequences": totals["sequences"]})

    chunks = _chunks(mixture, recipe.max_documents)
    if recipe.num_proc > 1:
        context = multiprocessing.get_context("spawn")
        with context.Pool(recipe.num_proc, _init_worker, (recipe.tokenizer, recipe.clean)) as pool:
            in_flight: list = []  # a bounded window of chunks, consumed in order
            for names, texts in chunks:
                in_flight.append((names, pool.apply_async(_process_chunk, (texts,))))
                if len(in_flight) >= 2 * recipe.num_proc:
                    names, job = in_flight.pop(0)
                    consume(names, *job.get())
            for names, job in in_flight:
                consume(names, *job.get())
    else:
        _worker["tokenizer"], _worker["clean"] = tokenizer, recipe.clean
        for names, texts in chunks:
            consume(names, *_process_chunk(texts))
    all_rejects = sum(rejects.values(), Counter())
    for name in mixture.names:
        if read[name] == 0:
            bad = ", ".join(f"{k}: {v}" for k, v in rejects[name].most_common())
            raise DiffutronError(f"source {name} yields no document{f' ({bad})' if bad else ''}")
    write(packer.finish())
    if totals["sequences"] == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in all_rejects.most_common())
        raise DiffutronError(f"no document survived cleaning, nothing written ({reasons})")
    writer.close()
    total_tokens = sum(mixture.tokens.values())
    stats = {
        "fingerprint": fingerprint,
        "recipe": asdict(recipe),
        "documents": {"read": sum(read.values()), "kept": sum(kept.values()), "rejected": sum(all_rejects.values())},
        "sources": {
            name: {
                "read": read[name],
                "kept": kept[name],
                "rejected": dict(rejects[name]),
                "tokens": mixture.tokens[name],
                "token_share": mixture.tokens[name] / max(total_tokens, 1),
            }
            for name in mixture.names
        },
        "rejected_by_reason": dict(all_rejects),
        "duplicates": all_rejects["duplicate_exact"] + all_rejects["duplicate_near"],
        "modified_by_rule": dict(modified),
        "tokens": total_tokens,
        "sequences": totals["sequences"],
        "padding_tokens": totals["padding"],
        "max_length": recipe.pack.max_length,
        "shards": len(writer.shards),
        "shards_reused": writer.skipped,
        "seconds": time.perf_counter() - started,
    }
    _write_json(stats_path, stats)
    return stats
