"""`data prepare` vs the standard recipe (datasets.map tokenize + group_texts, as in Hugging Face's
run_mlm.py and dllm), on the bundled corpus (1x) and a synthetic corpus 10x its size.

    python benchmarks/data_pipeline.py [--json] [--scales 1,10]

Each run is its own process (peak RSS is Linux's VmHWM of that process). diffutron is measured twice:
with its cleaning and deduplication (what `data prepare` does by default) and with them off (the same
work as the standard recipe: tokenize and pack). The synthetic corpus is made of bundled sentences
shuffled into new documents, so deduplication does not simply drop the copies. The last line of
--json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb, run_worker  # noqa: E402


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


def worker(kind: str, corpus: str, out: str) -> dict:
    started = time.perf_counter()
    if kind == "standard":
        from datasets import load_dataset

        from diffutron.tokenizer import load_bundled_tokenizer

        tokenizer = load_bundled_tokenizer()
        raw = load_dataset("json", data_files=corpus, split="train", cache_dir=out + "-cache")
        tokenized = raw.map(
            lambda b: tokenizer(b["text"], return_special_tokens_mask=False), batched=True, remove_columns=["text"]
        )
        block = 512

        def group_texts(examples):  # run_mlm.py's group_texts
            concatenated = {k: sum(examples[k], []) for k in examples}
            total = (len(concatenated["input_ids"]) // block) * block
            return {k: [t[i : i + block] for i in range(0, total, block)] for k, t in concatenated.items()}

        grouped = tokenized.map(group_texts, batched=True)
        grouped.save_to_disk(out)
        tokens, sequences = sum(len(x) for x in tokenized["input_ids"]), len(grouped)
    else:
        from diffutron.data.prepare import DataRecipe, SourceSpec, prepare

        recipe = DataRecipe(sources=[SourceSpec(corpus)])
        if kind == "diffutron-pack-only":
            recipe.clean.dedup_exact = recipe.clean.dedup_near = recipe.clean.turkish_filter = False
            recipe.clean.remove_boilerplate = recipe.clean.repair_mojibake = False
            recipe.clean.min_chars = 0
        stats = prepare(recipe, out)
        tokens, sequences = stats["tokens"], stats["sequences"]
    return {
        "seconds": time.perf_counter() - started,
        "tokens": tokens,
        "sequences": sequences,
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--scales", default="1,10")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "CORPUS", "OUT"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (int(s) for s in args.scales.split(",")):
            corpus, documents = make_corpus(Path(tmp), scale)
            for kind in ("standard", "diffutron-pack-only", "diffutron"):
                out = str(Path(tmp) / f"{kind}-{scale}")
                r = run_worker(__file__, kind, str(corpus), out)
                r.update(
                    kind=kind,
                    scale=scale,
                    documents=documents,
                    docs_per_s=documents / r["seconds"],
                    tokens_per_s=r["tokens"] / r["seconds"],
                )
                results.append(r)
                print(
                    f"{scale:>3}x {kind:<20} {r['seconds']:7.1f} s  {r['docs_per_s']:8.0f} docs/s  "
                    f"{r['tokens_per_s']:10.0f} tokens/s  peak RSS {r['peak_rss_mb']:6.0f} MB"
                )
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(out + "-cache", ignore_errors=True)
    by = {(r["kind"], r["scale"]): r for r in results}
    scales = sorted({r["scale"] for r in results})
    top = scales[-1]
    summary = {
        "speedup_pack_only": by[("standard", top)]["seconds"] / by[("diffutron-pack-only", top)]["seconds"],
        "speedup_full": by[("standard", top)]["seconds"] / by[("diffutron", top)]["seconds"],
        "peak_rss_growth_diffutron": by[("diffutron", top)]["peak_rss_mb"]
        / by[("diffutron", scales[0])]["peak_rss_mb"],
        "peak_rss_growth_standard": by[("standard", top)]["peak_rss_mb"] / by[("standard", scales[0])]["peak_rss_mb"],
        "scale": top,
        "runs": results,
    }
    print(
        f"at {top}x: diffutron tokenize+pack {summary['speedup_pack_only']:.2f}x the standard recipe's speed, "
        f"with cleaning and dedup {summary['speedup_full']:.2f}x; peak RSS from {scales[0]}x to {top}x: "
        f"diffutron x{summary['peak_rss_growth_diffutron']:.2f}, standard x{summary['peak_rss_growth_standard']:.2f}"
    )
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
