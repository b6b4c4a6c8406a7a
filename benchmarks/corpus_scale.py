"""`data prepare` at scale: a generated corpus of N GB through the reference recipe, then a training
process opening the prepared folder.

    python benchmarks/corpus_scale.py [--json] [--gb 1] [--num-proc 2] [--tmp /tmp] [--keep]

The corpus: distinct Turkish-like documents from a seeded word-level bigram chain over the bundled
train split (each word drawn from the words that follow the previous one there; a document starts with
a word that starts a sentence), with lengths drawn log-normally around 250 words (the reference
corpus: ~1.05B tokens in 2-3M documents); a planted share of them are copies of the document before
(`--exact-dups`) or copies with one word changed (`--near-dups`), which deduplication should drop.
It is written twice, in the same document order: as `--files` `.jsonl.zst` files and as a local
`datasets` folder of `--files` parquet shards (read through the `hf:` path).

`data prepare` runs the reference recipe (configs/data/diffutron-cpt.yaml: cleaning with min_chars
200, exact and near-duplicate removal, 512-token blocks, tail dropped) with the bundled tokenizer
(mmBERT's needs the network) and without its token budgets, on the `.jsonl.zst` files with 1 and
`--num-proc` processes and on the `hf:` folder with 1, each run its own process. Reported per run:
wall seconds, input MB/s (of UTF-8 text) and tokens/s, CPU seconds of the main process and of the
workers, peak RSS of the main process (VmHWM) and of the largest worker, output bytes per token, the
share of documents kept, the near-duplicate index's bytes per document; checked: the runs' shards are
byte-identical. Projection: hours for 1.05B tokens (the reference corpus) at the one-process rate,
and per core at the `--num-proc` run's CPU time.

The training side, in a fresh process on the prepared folder, as diffutron.train opens it
(`load_training_data`, memory-mapped Arrow, then the epoch loader at batch 16): seconds to the first
batch, RSS then (anonymous and file-backed, so that mapped pages are not taken for loaded ones), and a
whole epoch of batches read without training: the loader's own milliseconds per step.

The corpus lives under --tmp, deleted at the end unless --keep (a kept corpus is reused by a run with
the same settings, and left as it is). With --json, the table goes to stderr and stdout holds one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import _status_mb, peak_rss_mb, run_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_RECIPE = ROOT / "configs" / "data" / "diffutron-cpt.yaml"
REFERENCE_TOKENS = 1_050_000_000
MEDIAN_WORDS, SIGMA_WORDS, MIN_WORDS, MAX_WORDS = 250, 0.8, 30, 20_000
CHAINS = 2048  # documents generated side by side


class BigramChain:
    """Words of the bundled train split and, for each, the words that follow it there (with repeats,
    so that a uniform draw from them is a draw by bigram frequency)."""

    def __init__(self):
        from diffutron.data import bundled_documents

        index: dict[str, int] = {}
        pairs, firsts = [], []
        for doc in bundled_documents("train"):
            ids = [index.setdefault(w, len(index)) for w in doc.text.split()]
            firsts += ids[:1]
            pairs += zip(ids, ids[1:], strict=False)
        self.words = np.array(list(index), dtype=object)
        first, then = np.array(pairs, dtype=np.int64).T
        ends_sentence = np.array([w[-1] in ".!?" for w in self.words])
        self.starts = np.concatenate([firsts, then[ends_sentence[first]]]).astype(np.int64)
        order = np.argsort(first, kind="stable")
        self.following = then[order]
        self.offsets = np.searchsorted(first[order], np.arange(len(self.words)))
        self.counts = np.bincount(first, minlength=len(self.words))

    def step(self, current: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A following word for each current one (a sentence start where a word has none)."""
        counts = self.counts[current]
        drawn = self.offsets[current] + (rng.random(len(current)) * np.maximum(counts, 1)).astype(np.int64)
        restart = self.starts[rng.integers(len(self.starts), size=len(current))]
        return np.where(counts > 0, self.following[np.minimum(drawn, len(self.following) - 1)], restart)


def generate(chain: BigramChain, text_bytes: float, seed: int, exact_dups: float, near_dups: float):
    """Documents (str) until about `text_bytes` of UTF-8 text; returns (documents, planted counts) via yield."""
    rng = np.random.default_rng(seed)
    written = 0
    while written < text_bytes:
        lengths = np.clip(
            rng.lognormal(np.log(MEDIAN_WORDS), SIGMA_WORDS, size=4 * CHAINS), MIN_WORDS, MAX_WORDS
        ).astype(np.int64)
        steps = int(lengths.sum()) // CHAINS + 1
        ends = np.cumsum(lengths)
        start = np.zeros(CHAINS * steps, dtype=bool)
        start[np.concatenate([[0], ends[:-1]])] = True
        start = start.reshape(CHAINS, steps)
        start[:, 0] = True
        grid = np.empty((CHAINS, steps), dtype=np.int64)
        current = np.zeros(CHAINS, dtype=np.int64)
        for t in range(steps):
            following = chain.step(current, rng)
            restart = chain.starts[rng.integers(len(chain.starts), size=CHAINS)]
            current = np.where(start[:, t], restart, following)
            grid[:, t] = current
        flat = grid.reshape(-1)
        previous = None
        for ids in np.split(flat[: ends[-1]], ends[:-1]):
            kind = "distinct"
            draw = rng.random()
            if previous is not None and draw < exact_dups:
                ids, kind = previous, "exact"
            elif previous is not None and draw < exact_dups + near_dups:
                ids = previous.copy()
                ids[rng.integers(len(ids))] = rng.integers(len(chain.words))
                kind = "near"
            text = " ".join(chain.words[ids])
            written += len(text.encode())
            previous = ids
            yield text, kind
            if written >= text_bytes:
                return


def write_corpus(folder: Path, gb: float, files: int, seed: int, exact_dups: float, near_dups: float) -> dict:
    """The generated corpus as `files` .jsonl.zst files and a folder of as many parquet shards, the
    same documents in the same order (each file about 1/`files` of the text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    started = time.perf_counter()
    total = gb * 1e9
    zst_dir, hf_dir = folder / "jsonl", folder / "hf" / "data"
    zst_dir.mkdir(parents=True)
    hf_dir.mkdir(parents=True)
    schema = pa.schema([("text", pa.string())])
    planted = {"distinct": 0, "exact": 0, "near": 0}
    text_bytes = file_bytes = 0
    number, rows = 0, []
    sinks = []

    def open_files(number: int) -> None:
        raw = open(zst_dir / f"corpus-{number:05d}.jsonl.zst", "wb")
        sinks[:] = [raw, zstandard.ZstdCompressor(level=3).stream_writer(raw)]
        sinks.append(pq.ParquetWriter(hf_dir / f"train-{number:05d}-of-{files:05d}.parquet", schema))

    def write_rows() -> None:
        lines = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in rows)
        sinks[1].write(lines.encode())
        sinks[2].write_table(pa.table({"text": rows}, schema=schema))
        rows.clear()

    def close_files() -> None:
        write_rows()
        sinks[2].close()
        sinks[1].close()

    open_files(0)
    for text, kind in generate(BigramChain(), total, seed, exact_dups, near_dups):
        planted[kind] += 1
        size = len(text.encode())
        rows.append(text)
        text_bytes += size
        file_bytes += size
        if len(rows) == 4096:
            write_rows()
        if file_bytes >= total / files and number < files - 1:
            close_files()
            number, file_bytes = number + 1, 0
            open_files(number)
    close_files()
    return {
        "documents": sum(planted.values()),
        "planted": planted,
        "text_mb": text_bytes / 1e6,
        "jsonl_zst_mb": sum(p.stat().st_size for p in zst_dir.iterdir()) / 1e6,
        "parquet_mb": sum(p.stat().st_size for p in hf_dir.iterdir()) / 1e6,
        "files": number + 1,
        "seconds": time.perf_counter() - started,
        "jsonl": str(zst_dir),
        "hf": "hf:" + str(folder / "hf"),
    }


def corpus(tmp: Path, gb: float, files: int, seed: int, exact_dups: float, near_dups: float) -> dict:
    """The corpus of these settings under `tmp`, generated once: a later run with the same settings reuses it."""
    folder = tmp / f"diffutron-corpus-{gb:g}gb-{files}f-seed{seed}-e{exact_dups:g}-n{near_dups:g}"
    manifest = folder / "manifest.json"
    if manifest.is_file():
        return {**json.loads(manifest.read_text()), "reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    made = {**write_corpus(folder, gb, files, seed, exact_dups, near_dups), "folder": str(folder)}
    manifest.write_text(json.dumps(made))
    return {**made, "reused": False}


def reference_recipe(source: str, num_proc: int):
    """configs/data/diffutron-cpt.yaml on `source`: its cleaning and packing, the bundled tokenizer, no budgets."""
    from diffutron.config import load_config
    from diffutron.data.prepare import DataRecipe, SourceSpec

    recipe = load_config(DataRecipe, REFERENCE_RECIPE)
    recipe.sources, recipe.tokenizer, recipe.num_proc = [SourceSpec(source, name="corpus")], "bundled", num_proc
    return recipe


class ChildrenPeakRss(threading.Thread):
    """The largest VmHWM among this process's children, sampled every `interval` seconds. (ru_maxrss of
    RUSAGE_CHILDREN would not do: a spawned child starts as a fork, and the parent's pages count.)"""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.peak_mb, self.done = interval, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            for task in Path(f"/proc/{os.getpid()}/task").iterdir():
                for child in (task / "children").read_text().split():
                    try:
                        status = Path(f"/proc/{child}/status").read_text()
                    except OSError:  # gone meanwhile
                        continue
                    for line in status.splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)


def prepare_worker(source: str, num_proc: int, out: str) -> dict:
    from diffutron.data.prepare import prepare

    recipe = reference_recipe(source, num_proc)
    children = ChildrenPeakRss()
    children.start()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    stats = prepare(recipe, out)
    seconds = time.perf_counter() - started
    children.done.set()
    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pool's processes, joined by now
    return {
        "seconds": seconds,
        "main_cpu_s": own.ru_utime + own.ru_stime - before.ru_utime - before.ru_stime,
        "workers_cpu_s": workers.ru_utime + workers.ru_stime,
        "peak_rss_mb": peak_rss_mb(),
        "worker_peak_rss_mb": children.peak_mb,
        "tokens": stats["tokens"],
        "sequences": stats["sequences"],
        "documents": stats["documents"],
        "rejected_by_reason": stats["rejected_by_reason"],
        "dedup_index_bytes": stats.get("dedup_index_bytes"),
        "output_bytes": sum(p.stat().st_size for p in Path(out).glob("data-*.arrow")),
    }


def dedup_side_by_side(source: str, documents: int) -> dict:
    """The deduplication index on the first `documents` documents: datasketch's MinHashLSH as diffutron
    used it before (every band's values kept, a bucket per band; exact hashes in a set) against
    `Deduplicator`; memory held after all of them (tracemalloc) and the main process's CPU per document."""
    import itertools
    import tracemalloc

    from datasketch import MinHashLSH

    from diffutron.data.clean import CleanConfig, Deduplicator, dedup_keys, minhash, normalized_for_dedup
    from diffutron.data.sources import iter_documents

    config = CleanConfig()
    texts = [d.text for d in itertools.islice(iter_documents(source), documents)]
    keys = [dedup_keys(text, config) for text in texts]
    signatures = [minhash(normalized_for_dedup(text), config.num_perm) for text in texts]

    def before() -> tuple:
        seen, lsh, dropped = set(), MinHashLSH(threshold=config.near_threshold, num_perm=config.num_perm), 0
        for number, ((digest, _), signature) in enumerate(zip(keys, signatures, strict=True)):
            duplicate = digest in seen or (signature is not None and bool(lsh.query(signature)))
            seen.add(digest)
            if signature is not None and not duplicate:
                lsh.insert(number, signature)
            dropped += duplicate
        return (seen, lsh), dropped

    def after() -> tuple:
        dedup, dropped = Deduplicator(config), 0
        for start in range(0, len(keys), 256):  # as data prepare checks a chunk
            dropped += sum(reason is not None for reason in dedup.check_many(keys[start : start + 256]))
        return dedup, dropped

    result = {"documents": len(texts)}
    for name, run in (("datasketch_lsh", before), ("diffutron", after)):
        started = time.process_time()
        run()
        cpu = time.process_time() - started
        tracemalloc.start()
        index, dropped = run()
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del index
        result[name] = {
            "bytes_per_document": held / len(texts),
            "peak_bytes_per_document": peak / len(texts),
            "us_per_document": 1e6 * cpu / len(texts),
            "dropped": dropped,
        }
    return result


def _rss() -> dict:
    """Resident memory, and its anonymous and file-backed parts (pages of a memory-mapped file are the latter)."""
    return {
        name: _status_mb(field) for name, field in (("rss_mb", "VmRSS"), ("anon_mb", "RssAnon"), ("file_mb", "RssFile"))
    }


def train_worker(folder: str, batch_size: int) -> dict:
    """What a training process does with the folder before its first step, then one epoch of batches."""
    from types import SimpleNamespace

    import datasets  # noqa: F401  (imported before the clock starts: a training process has it already)

    from diffutron.config import TrainRecipe
    from diffutron.train.build import epoch_loader, load_training_data

    recipe = TrainRecipe()
    recipe.data.dataset, recipe.train.batch_size = folder, batch_size
    model = SimpleNamespace(vocab_size=1 << 30, context_length=1 << 30)  # the checks need these two only
    before = _rss()
    started = time.perf_counter()
    dataset = load_training_data(recipe, model, Path(folder))
    batches = iter(epoch_loader(dataset, 0, recipe))
    first = next(batches)
    first_s = time.perf_counter() - started
    opened = _rss()
    steps, rows, epoch_start = 1, len(first["input_ids"]), time.perf_counter()
    for batch in batches:
        steps += 1
        rows += len(batch["input_ids"])
    epoch_s = time.perf_counter() - epoch_start
    return {
        "sequences": len(dataset),
        "first_batch_s": first_s,
        "before": before,
        "after_first_batch": opened,
        "after_epoch": _rss(),
        "steps": steps,
        "epoch_s": epoch_s,
        "ms_per_step": 1000 * epoch_s / max(steps - 1, 1),
        "rows": rows,
    }


def worker(kind: str, *args: str) -> dict:
    if kind == "prepare":
        source, num_proc, out = args
        return prepare_worker(source, int(num_proc), out)
    if kind == "dedup":
        source, documents = args
        return dedup_side_by_side(source, int(documents))
    folder, batch_size = args
    return train_worker(folder, int(batch_size))


def same_shards(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("data-*.arrow"))
    if names != sorted(p.name for p in b.glob("data-*.arrow")):
        return False
    return all(_digest(a / name) == _digest(b / name) for name in names)


def _digest(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--gb", type=float, default=1.0, help="gigabytes of UTF-8 text to generate")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--files", type=int, default=4, help=".jsonl.zst files, and parquet shards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact-dups", type=float, default=0.01, help="share of documents copied from the one before")
    parser.add_argument("--near-dups", type=float, default=0.02, help="... copied with one word changed")
    parser.add_argument("--batch-size", type=int, default=16, help="of the training loader (reference: 16 per GPU)")
    parser.add_argument("--dedup-documents", type=int, default=20_000, help="of the deduplication side by side")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the corpus and the outputs go")
    parser.add_argument(
        "--keep", action="store_true", help="keep the corpus (a rerun with the same settings reuses it)"
    )
    parser.add_argument("--worker", nargs="+")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    report = sys.stderr if args.json else sys.stdout
    load_start = os.getloadavg()
    tmp = Path(args.tmp)
    made = corpus(tmp, args.gb, args.files, args.seed, args.exact_dups, args.near_dups)
    print(
        f"corpus: {made['documents']:,} documents, {made['text_mb']:.0f} MB of text "
        f"({made['jsonl_zst_mb']:.0f} MB .jsonl.zst, {made['parquet_mb']:.0f} MB parquet), planted duplicates "
        f"{made['planted']['exact']:,} exact + {made['planted']['near']:,} near"
        f"{', reused' if made['reused'] else ', generated in {:.0f} s'.format(made['seconds'])}",
        file=report,
        flush=True,
    )
    outputs = Path(tempfile.mkdtemp(prefix="diffutron-prepared-", dir=tmp))
    runs = {}
    try:
        plan = [("jsonl.zst", made["jsonl"], 1), ("jsonl.zst", made["jsonl"], args.num_proc), ("hf", made["hf"], 1)]
        for source_kind, source, num_proc in dict.fromkeys(plan):
            name = f"{source_kind} num_proc {num_proc}"
            out = outputs / name.replace(" ", "-")
            r = run_worker(__file__, "prepare", source, str(num_proc), str(out))
            r |= {
                "input_mb_per_s": made["text_mb"] / r["seconds"],
                "tokens_per_s": r["tokens"] / r["seconds"],
                "cpu_s": r["main_cpu_s"] + r["workers_cpu_s"],
                "bytes_per_token": r["output_bytes"] / r["tokens"],
                "kept_share": r["documents"]["kept"] / r["documents"]["read"],
                "out": out,
            }
            r["tokens_per_cpu_s"] = r["tokens"] / r["cpu_s"]
            runs[name] = r
            print(
                f"{name:<22} {r['seconds']:7.1f} s  {r['input_mb_per_s']:5.2f} MB/s  "
                f"{r['tokens_per_s'] / 1e3:5.0f}k tokens/s"
                f"  cpu main {r['main_cpu_s']:6.1f} s workers {r['workers_cpu_s']:6.1f} s  peak RSS "
                f"{r['peak_rss_mb']:4.0f} MB (worker {r['worker_peak_rss_mb']:4.0f} MB)  kept {r['kept_share']:.2%}",
                file=report,
                flush=True,
            )
        dedup = run_worker(__file__, "dedup", made["jsonl"], str(args.dedup_documents))
        print(
            f"near-duplicate index on {dedup['documents']:,} documents, bytes per document held (peak), main "
            f"process CPU per document: datasketch MinHashLSH {dedup['datasketch_lsh']['bytes_per_document']:,.0f} "
            f"({dedup['datasketch_lsh']['peak_bytes_per_document']:,.0f}), "
            f"{dedup['datasketch_lsh']['us_per_document']:.1f} us; diffutron "
            f"{dedup['diffutron']['bytes_per_document']:,.0f} ({dedup['diffutron']['peak_bytes_per_document']:,.0f}), "
            f"{dedup['diffutron']['us_per_document']:.1f} us",
            file=report,
            flush=True,
        )
        one = runs["jsonl.zst num_proc 1"]
        identical = all(same_shards(one["out"], r["out"]) for r in runs.values())
        training = run_worker(__file__, "train", str(one["out"]), str(args.batch_size))
    finally:
        shutil.rmtree(outputs, ignore_errors=True)
        if not args.keep and not made["reused"]:
            shutil.rmtree(made["folder"], ignore_errors=True)
    many = runs[f"jsonl.zst num_proc {args.num_proc}"]
    summary = {
        "gb": args.gb,
        "corpus": {k: v for k, v in made.items() if k not in ("jsonl", "hf")},
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs.values()),
        "tokens_per_s": one["tokens_per_s"],
        "tokens_per_cpu_s": one["tokens_per_cpu_s"],
        "kept_share": one["kept_share"],
        "bytes_per_token": one["bytes_per_token"],
        "dedup_index_bytes_per_document": (one["dedup_index_bytes"] or 0) / one["documents"]["read"],
        "projected_hours_reference": REFERENCE_TOKENS / one["tokens_per_s"] / 3600,
        "projected_core_hours_reference": REFERENCE_TOKENS / many["tokens_per_cpu_s"] / 3600,
        "main_cpu_share": many["main_cpu_s"] / many["cpu_s"],  # of the --num-proc run: what bounds its scaling
        "num_proc_speedup": one["seconds"] / many["seconds"],
        "identical_outputs": identical,
        "dedup_index": dedup,
        "training": training,
        "runs": {name: {k: v for k, v in r.items() if k != "out"} for name, r in runs.items()},
    }
    print(
        f"kept {summary['kept_share']:.2%} of documents ({one['rejected_by_reason']}), "
        f"{summary['bytes_per_token']:.2f} output bytes per token, near-dup index "
        f"{summary['dedup_index_bytes_per_document']:.0f} bytes per document; outputs identical: {identical}\n"
        f"num_proc {args.num_proc}: {summary['num_proc_speedup']:.2f}x num_proc 1, the main process "
        f"{summary['main_cpu_share']:.1%} of its CPU; 1.05B tokens: "
        f"{summary['projected_hours_reference']:.2f} h in one process, "
        f"{summary['projected_core_hours_reference']:.2f} core-hours with {args.num_proc}\n"
        f"training: first batch after {training['first_batch_s']:.2f} s, RSS {training['before']['rss_mb']:.0f} -> "
        f"{training['after_first_batch']['rss_mb']:.0f} MB "
        f"(anonymous {training['after_first_batch']['anon_mb']:.0f} MB); "
        f"an epoch of {training['steps']:,} batches read in {training['epoch_s']:.1f} s = "
        f"{training['ms_per_step']:.2f} ms a step (RSS then {training['after_epoch']['rss_mb']:.0f} MB, anonymous "
        f"{training['after_epoch']['anon_mb']:.0f} MB)",
        file=report,
    )
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
