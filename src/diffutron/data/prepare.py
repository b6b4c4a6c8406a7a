"""`diffutron data prepare`: sources -> mixture -> clean -> deduplicate -> tokenize -> pack -> shards.

Streaming end to end: documents flow through in chunks (of `CHUNK` documents or `CHUNK_CHARS`
characters), so memory holds a few chunks, the packer's buffer, one shard being filled and the
deduplication index (48 bytes per distinct document at the default settings: 64-bit keys, one for
the exact hash and one per MinHash band, see `clean.Deduplicator`), never the corpus; a single
document of any length is cleaned, hashed and tokenized piece by piece (see `clean` and `encode`).
With `num_proc > 1`, cleaning, hashing (down to the band keys) and tokenization run in worker
processes (results consumed in order, so the output is the same for any num_proc); deduplication and
packing stay in the main process, which sees every document (a small share of the CPU: see
`benchmarks/corpus_scale.py` in docs/benchmarks.md).

The output folder and its rerun rules are `diffutron.data.folder`'s: the fingerprint of the recipe
and of its input files is written first; a rerun with the same fingerprint reuses a finished folder
and finishes an interrupted one, anything else is refused unless `force`.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffutron.data.clean import CleanConfig, CleanStats, Deduplicator, clean_text, dedup_keys
from diffutron.data.encode import TokenEncoder
from diffutron.data.folder import DatasetFolder
from diffutron.data.pack import PackConfig, Packer
from diffutron.data.sources import Document, input_files, iter_documents
from diffutron.errors import DiffutronError, UsageError
from diffutron.tokenizer import special_affixes

CHUNK = 256  # documents per unit of work ...
CHUNK_CHARS = 1 << 22  # ... or fewer, once they hold this many characters
# A source that reaches its token budget stops being drawn from the chunk BUDGET_LAG chunks after the
# one that reached it; the documents it yields meanwhile are dropped ("over_token_budget"). A fixed lag,
# not "as soon as the main process learns of it", keeps the output the same for any num_proc.
BUDGET_LAG = 32


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

    def identity(self) -> dict:
        """What the output depends on: the recipe but its num_proc, and the identity of its inputs
        (each file's size and content hash, or its modification time past HASH_BYTES of a source)."""
        recipe = {k: v for k, v in asdict(self).items() if k != "num_proc"}
        inputs = {s.name or s.spec: _files_identity(input_files(s.spec), s.spec) for s in self.sources}
        if self.tokenizer == "bundled":
            from importlib import resources

            folder = Path(str(resources.files("diffutron") / "assets" / "tokenizer"))
        else:
            folder = Path(self.tokenizer)
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else None
        inputs["tokenizer"] = _files_identity(files, self.tokenizer)
        return {"recipe": recipe, "inputs": inputs}

    def fingerprint(self, identity: dict | None = None) -> str:
        identity = identity or self.identity()
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


HASH_BYTES = 1 << 26  # of a source's files are hashed; the files beyond are known by size and modification time


def _files_identity(files: list[Path] | None, name: str) -> list:
    """[file, size, sha256 or mtime] per file (named relative to their common folder, so that the same
    files elsewhere are the same input); [name] for what is not a local file (a Hub dataset)."""
    if files is None:
        return [name]
    root = Path(os.path.commonpath([p.parent for p in files])) if files else Path()
    identity, budget = [], HASH_BYTES
    for path in files:
        stat = path.stat()
        if stat.st_size <= budget:
            budget -= stat.st_size
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            content = digest.hexdigest()
        else:
            content = stat.st_mtime_ns
        identity.append([path.relative_to(root).as_posix(), stat.st_size, content])
    return identity


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

    A source that runs out (or reaches its budget, see BUDGET_LAG) leaves; the others go on in their
    proportions.
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
        self.reached: dict[str, int] = {}  # source -> the chunk in which it reached its budget
        self.rng = random.Random(seed)

    def consume(self, name: str, tokens: int, chunk: int = 0) -> bool:
        """Count a kept document's tokens; False (drop it) if its source had already reached its budget."""
        budget = self.budgets.get(name)
        if budget is not None and self.tokens[name] >= budget:
            return False
        self.tokens[name] += tokens
        if budget is not None and self.tokens[name] >= budget:
            self.reached[name] = chunk
        return True

    def settle(self, chunk: int) -> None:
        """Stop drawing from the sources that reached their budget in chunk `chunk` or before."""
        for name, reached in self.reached.items():
            if reached <= chunk:
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


def _init_worker(tokenizer_name: str, portable, clean: CleanConfig) -> None:
    from diffutron.data.encode import TokenEncoder

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: num_proc workers fill the cores
    encoder = TokenEncoder.from_portable(portable) if portable else TokenEncoder(load_tokenizer(tokenizer_name))
    _worker["encode"], _worker["clean"] = encoder, clean


def _process_chunk(texts: list[str]) -> tuple[list, Counter]:
    """Per document: its rejection reason, or (dedup digest or None, band keys or None, token ids);
    and the counts of the cleaning rules that modified documents. Small to send back: bytes and
    int32 arrays."""
    clean, modified = _worker["clean"], Counter()
    cleaned, results = [], []
    for text in texts:
        stats = CleanStats()
        cleaned.append(clean_text(text, clean, stats))
        modified.update(stats.modified)
        results.append(next(iter(stats.rejected), None))
    kept = [text for text in cleaned if text is not None]
    encoded = iter(_worker["encode"](kept))
    dedup = clean.enabled and (clean.dedup_exact or clean.dedup_near)
    for i, text in enumerate(cleaned):
        if text is not None:
            digest, bands = dedup_keys(text, clean) if dedup else (None, None)
            results[i] = (digest, bands, next(encoded))
    return results, modified


def _chunks(mixture: Mixture, limit: int | None) -> Iterator[list[tuple[str, str]]]:
    """Chunks of (source, text); before drawing chunk k, the budgets reached by chunk k - BUDGET_LAG apply."""
    chunk, chars, read, index = [], 0, 0, 0
    documents = iter(mixture)
    while True:
        mixture.settle(index - BUDGET_LAG)
        for name, text in documents:
            chunk.append((name, text))
            chars += len(text)
            read += 1
            if len(chunk) == CHUNK or chars >= CHUNK_CHARS or (limit and read >= limit):
                break
        if not chunk:
            return
        yield chunk
        if limit and read >= limit:
            return
        chunk, chars, index = [], 0, index + 1


@contextmanager
def _worker_pool(recipe: DataRecipe, encoder: TokenEncoder):
    """Worker processes that ignore Ctrl-C (from their start: SIGINT is ignored while they spawn).

    However the block ends (done, Ctrl-C, an error), the workers finish the chunks in flight and exit:
    never `Pool.terminate()`, which kills workers that may be writing a result while holding the
    result queue's lock, on which its task thread then waits for good (a Ctrl-C hung once in ~40)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        context = multiprocessing.get_context("spawn")
        pool = context.Pool(recipe.num_proc, _init_worker, (recipe.tokenizer, encoder.portable(), recipe.clean))
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    try:
        yield pool
    finally:
        pool.close()
        pool.join()


def prepare(
    recipe: DataRecipe,
    out: str | Path,
    progress: Callable[[dict], None] | None = None,
    force: bool = False,
) -> dict:
    """Build the dataset folder `out` from `recipe`; returns the stats (also written to stats.json).

    `force` replaces a folder prepared from another recipe (deleting only the files data prepare writes).
    """
    recipe.pack.validate()
    out = Path(out)
    identity = recipe.identity()
    fingerprint = recipe.fingerprint(identity)
    folder = DatasetFolder(out, recipe.pack)
    finished = folder.claim(fingerprint, identity, force)
    if finished is not None:
        return {**finished, "reused": True}
    tokenizer = load_tokenizer(recipe.tokenizer)
    prefix, suffix = special_affixes(tokenizer)
    if not suffix:
        raise DiffutronError("the tokenizer adds no end-of-sequence token to separate packed documents")
    started = time.perf_counter()
    rejects: dict[str, Counter] = defaultdict(Counter)
    drawn, kept, modified = Counter(), Counter(), Counter()  # drawn: documents that left their source
    mixture = Mixture(recipe.sources, recipe.seed, rejects)
    dedup = Deduplicator(recipe.clean) if recipe.clean.enabled else None
    encoder = TokenEncoder(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else suffix[-1]
    packer = Packer(recipe.pack, prefix, suffix, pad_id)
    totals = Counter()  # sequences, padding
    consumed = 0  # chunks

    def write(blocks) -> None:
        ids, lengths = blocks
        totals["sequences"] += len(ids)
        totals["padding"] += int(recipe.pack.max_length * len(ids) - lengths.sum())
        folder.add(ids, lengths)

    def consume(chunk: list[tuple[str, str]], results: list, chunk_modified: Counter) -> None:
        nonlocal consumed
        modified.update(chunk_modified)
        cleaned = [result for result in results if not isinstance(result, str)]
        duplicates = iter(dedup.check_many([keys[:2] for keys in cleaned]) if dedup else [None] * len(cleaned))
        for (name, _), result in zip(chunk, results, strict=True):
            drawn[name] += 1
            if isinstance(result, str):  # rejected while cleaning
                rejects[name][result] += 1
                continue
            ids = result[2]
            reason = next(duplicates)
            if reason is None and len(ids) < recipe.clean.min_tokens:
                reason = "too_few_tokens"
            if reason is None and recipe.clean.max_tokens and len(ids) > recipe.clean.max_tokens:
                reason = "too_many_tokens"
            if reason is None and not mixture.consume(name, len(ids), consumed):
                reason = "over_token_budget"
            if reason:
                rejects[name][reason] += 1
                continue
            kept[name] += 1
            packer.add(ids)
        write(packer.take())
        consumed += 1
        if progress:
            documents = sum(kept.values()) + sum(sum(r.values()) for r in rejects.values())
            progress({"documents": documents, "sequences": totals["sequences"], "tokens": sum(mixture.tokens.values())})

    chunks = _chunks(mixture, recipe.max_documents)
    if recipe.num_proc > 1:
        window = min(2 * recipe.num_proc, BUDGET_LAG)  # chunks in flight: bounded memory, budgets on time
        with _worker_pool(recipe, encoder) as pool:
            in_flight: deque = deque()
            for chunk in chunks:
                in_flight.append((chunk, pool.apply_async(_process_chunk, ([text for _, text in chunk],))))
                while len(in_flight) >= window:
                    done, job = in_flight.popleft()
                    consume(done, *job.get())
            for done, job in in_flight:
                consume(done, *job.get())
    else:
        _worker["encode"], _worker["clean"] = encoder, recipe.clean
        for chunk in chunks:
            consume(chunk, *_process_chunk([text for _, text in chunk]))
    all_rejects = sum(rejects.values(), Counter())
    read = {name: kept[name] + sum(rejects[name].values()) for name in mixture.names}
    for name in mixture.names:
        if drawn[name] == 0:
            bad = ", ".join(f"{k}: {v}" for k, v in rejects[name].most_common())
            raise DiffutronError(f"source {name} yields no document{f' ({bad})' if bad else ''}")
    write(packer.finish())
    if totals["sequences"] == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in all_rejects.most_common())
        raise DiffutronError(f"no document survived cleaning, nothing written ({reasons})")
    folder.finish()
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
        "dedup_index_bytes": dedup.nbytes if dedup else 0,
        "modified_by_rule": dict(modified),
        "tokens": total_tokens,
        "sequences": totals["sequences"],
        "padding_tokens": totals["padding"],
        "max_length": recipe.pack.max_length,
        "shards": len(folder.shards),
        "shard_rows": folder.shard_rows,
        "reused_files": folder.reused,
        "seconds": time.perf_counter() - started,
    }
    folder.write_stats(stats)
    return stats
