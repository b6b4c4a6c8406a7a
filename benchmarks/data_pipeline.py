"""`data prepare` vs the recipe of Hugging Face's run_mlm.py, side by side, on the bundled corpus (1x) and a
synthetic corpus 10x its size, with one process and with --num-proc.

    python benchmarks/data_pipeline.py [--json] [--scales 1,10] [--num-proc 2] [--repeats 3]
    python benchmarks/data_pipeline.py [--json] --huge-mb 54     # memory on one document of 54 MB, one line

The baseline is transformers' examples/pytorch/language-modeling/run_mlm.py as it runs on a JSON file:
`load_dataset("json")`, `map(tokenize_function, batched=True, num_proc, remove_columns)` with
`return_special_tokens_mask=True`, then `map(group_texts, batched=True, num_proc)` where group_texts
joins each column with `list(chain(*examples[k]))` and cuts blocks of max_seq_length (512); its
output is the cache's Arrow files that the two maps write. diffutron runs with its cleaning and
deduplication off (`clean.enabled: false`: the same work, tokenize and pack) and with its defaults
(cleaning + exact and near-duplicate removal, which run_mlm does not do).

Each run is its own process; the runs are interleaved (every kind once, then again) and each figure
is the median of --repeats. Peak RSS is the main process's VmHWM (worker processes not counted);
CPU seconds are the process's and its workers' (user + system), a check on a machine that others
share. With --json, the table goes to stderr and stdout holds one JSON object.

--huge-mb N writes one JSONL line of N MB (the bundled train split's text, repeated) and reports how
far `data prepare` (cleaning on, max_chars lifted) raises its process's peak RSS above what it was
after a warm-up run on 50 documents: the memory one huge document costs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb, reset_peak_rss, rss_mb, run_worker  # noqa: E402

BLOCK = 512
KINDS = ("run_mlm", "diffutron-pack", "diffutron-clean")


def make_corpus(folder: Path, scale: int) -> tuple[Path, int]:
    """bundled train x scale, as JSONL; scale 1 is the bundled train split itself."""
    from diffutron.data import bundled_documents

    docs = [d.text for d in bundled_documents("train")]
    path = folder / f"corpus-{scale}x.jsonl"
    rng = random.Random(scale)
    sentences = [s for d in docs for s in re.split(r"(?<=[.!?])\s+", d) if s]
    with open(path, "w", encoding="utf-8") as f:
        for copy in range(scale):
            for doc in docs:
                if copy == 0:
                    text = doc
                else:  # a new document of as many sentences, drawn from the whole corpus
                    text = " ".join(rng.choices(sentences, k=max(1, doc.count(". ") + 1)))
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path, len(docs) * scale


def run_mlm(corpus: str, out: str, num_proc: int) -> tuple[float, int, int]:
    """run_mlm.py's preprocessing (not line_by_line); returns (seconds, tokens, sequences)."""
    from itertools import chain

    from datasets import load_dataset

    from diffutron.tokenizer import load_bundled_tokenizer

    started = time.perf_counter()
    tokenizer = load_bundled_tokenizer()
    raw = load_dataset("json", data_files={"train": corpus}, cache_dir=out)
    column_names = raw["train"].column_names
    text_column = "text" if "text" in column_names else column_names[0]
    workers = num_proc if num_proc > 1 else None  # run_mlm's --preprocessing_num_workers, unset by default

    def tokenize_function(examples):
        return tokenizer(examples[text_column], return_special_tokens_mask=True)

    tokenized = raw.map(tokenize_function, batched=True, num_proc=workers, remove_columns=column_names)

    def group_texts(examples):
        joined = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = len(joined[list(examples.keys())[0]])
        if total >= BLOCK:
            total = (total // BLOCK) * BLOCK
        return {k: [t[i : i + BLOCK] for i in range(0, total, BLOCK)] for k, t in joined.items()}

    grouped = tokenized.map(group_texts, batched=True, num_proc=workers)
    seconds = time.perf_counter() - started
    tokens = sum(len(ids) for ids in tokenized["train"]["input_ids"])  # counted after the clock stops
    return seconds, tokens, len(grouped["train"])


def diffutron(corpus: str, out: str, num_proc: int, clean: bool) -> tuple[float, int, int]:
    from diffutron.data.pack import PackConfig
    from diffutron.data.prepare import DataRecipe, SourceSpec, prepare

    started = time.perf_counter()
    recipe = DataRecipe(sources=[SourceSpec(corpus)], pack=PackConfig(max_length=BLOCK), num_proc=num_proc)
    recipe.clean.enabled = clean
    stats = prepare(recipe, out)
    return time.perf_counter() - started, stats["tokens"], stats["sequences"]


def make_huge(folder: Path, megabytes: float) -> Path:
    from diffutron.data import bundled_documents

    text = " ".join(d.text.replace("\n", " ") for d in bundled_documents("train"))
    size = len(text.encode())
    huge = " ".join([text] * (int(megabytes * 1e6) // size + 1))[: int(megabytes * 1e6 * len(text) / size)]
    path = folder / f"huge-{megabytes}mb.jsonl"
    path.write_text(json.dumps({"text": huge}, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def huge_worker(corpus: str, out: str) -> dict:
    from diffutron.data.prepare import DataRecipe, SourceSpec, prepare

    prepare(DataRecipe(max_documents=50), out + "-warm-up")  # every import and cache, first
    reset_peak_rss()
    before = rss_mb()
    recipe = DataRecipe(sources=[SourceSpec(corpus)])
    recipe.clean.max_chars = 10**12
    started = time.perf_counter()
    stats = prepare(recipe, out)
    return {
        "seconds": time.perf_counter() - started,
        "rss_before_mb": before,
        "peak_rss_mb": peak_rss_mb(),
        "growth_mb": peak_rss_mb() - before,
        "tokens": stats["tokens"],
    }


def worker(kind: str, num_proc: int, corpus: str, out: str) -> dict:
    if kind == "huge":
        return huge_worker(corpus, out)
    if kind == "run_mlm":
        seconds, tokens, sequences = run_mlm(corpus, out, num_proc)
    else:
        seconds, tokens, sequences = diffutron(corpus, out, num_proc, clean=kind == "diffutron-clean")
    return {"seconds": seconds, "tokens": tokens, "sequences": sequences, "peak_rss_mb": peak_rss_mb()}


def measure(kind: str, num_proc: int, corpus: Path, out: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_worker(__file__, kind, str(num_proc), str(corpus), str(out))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--scales", default="1,10")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--huge-mb", type=float, help="measure the memory of one document of this size instead")
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "NUM_PROC", "CORPUS", "OUT"))
    args = parser.parse_args()
    if args.worker:
        kind, num_proc, corpus, out = args.worker
        print(json.dumps(worker(kind, int(num_proc), corpus, out)))
        return
    if args.huge_mb:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = make_huge(Path(tmp), args.huge_mb)
            result = {"megabytes": corpus.stat().st_size / 1e6, **measure("huge", 1, corpus, Path(tmp) / "out")}
        print(
            f"one document of {result['megabytes']:.1f} MB: {result['seconds']:.0f} s, {result['tokens']:,} tokens, "
            f"peak RSS {result['peak_rss_mb']:.0f} MB, {result['growth_mb']:.0f} MB above the warm process",
            file=sys.stderr if args.json else sys.stdout,
        )
        if args.json:
            print(json.dumps(result))
        return
    report = sys.stderr if args.json else sys.stdout
    procs = sorted({1, args.num_proc})
    load_start = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (int(s) for s in args.scales.split(",")):
            corpus, documents = make_corpus(Path(tmp), scale)
            measured: dict[tuple[str, int], list[dict]] = {}
            for repeat in range(args.repeats):
                for kind in KINDS:
                    for num_proc in procs:
                        r = measure(kind, num_proc, corpus, Path(tmp) / f"{kind}-{num_proc}-{scale}-{repeat}")
                        measured.setdefault((kind, num_proc), []).append(r)
                        print(
                            f"{scale:>3}x  {kind:<16} num_proc {num_proc}  {r['seconds']:7.2f} s  "
                            f"cpu {r['cpu_seconds']:7.2f} s  peak RSS {r['peak_rss_mb']:5.0f} MB",
                            file=report,
                            flush=True,
                        )
            for (kind, num_proc), rs in measured.items():
                seconds = statistics.median(r["seconds"] for r in rs)
                runs.append(
                    {
                        "scale": scale,
                        "kind": kind,
                        "num_proc": num_proc,
                        "documents": documents,
                        "seconds": seconds,
                        "seconds_all": [r["seconds"] for r in rs],
                        "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rs),
                        "tokens": rs[0]["tokens"],
                        "sequences": rs[0]["sequences"],
                        "tokens_per_s": rs[0]["tokens"] / seconds,
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                    }
                )
    by = {(r["kind"], r["num_proc"], r["scale"]): r for r in runs}
    top = max(r["scale"] for r in runs)

    def ratio(a, b, field="seconds"):
        return by[a + (top,)][field] / by[b + (top,)][field]

    summary = {
        "scale": top,
        "num_proc": args.num_proc,
        "load_average": {"start": load_start, "end": os.getloadavg()},  # others' work on the same machine
        # > 1: diffutron is faster (run_mlm's seconds / diffutron's)
        "pack_vs_run_mlm": {f"num_proc_{n}": ratio(("run_mlm", n), ("diffutron-pack", n)) for n in procs},
        "clean_vs_run_mlm": {f"num_proc_{n}": ratio(("run_mlm", n), ("diffutron-clean", n)) for n in procs},
        "pack_vs_run_mlm_cpu": {
            f"num_proc_{n}": ratio(("run_mlm", n), ("diffutron-pack", n), "cpu_seconds") for n in procs
        },
        "num_proc_speedup": {kind: ratio((kind, 1), (kind, args.num_proc)) for kind in KINDS if args.num_proc > 1},
        "runs": runs,
    }
    print(f"\nat {top}x, median of {args.repeats} (> 1: diffutron faster than run_mlm.py's recipe)", file=report)
    for n in procs:
        print(
            f"  num_proc {n}: tokenize+pack {summary['pack_vs_run_mlm'][f'num_proc_{n}']:.2f}x "
            f"(CPU time {summary['pack_vs_run_mlm_cpu'][f'num_proc_{n}']:.2f}x), "
            f"with cleaning and dedup {summary['clean_vs_run_mlm'][f'num_proc_{n}']:.2f}x",
            file=report,
        )
    for kind, speedup in summary["num_proc_speedup"].items():
        print(f"  {kind}: num_proc {args.num_proc} is {speedup:.2f}x num_proc 1", file=report)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
