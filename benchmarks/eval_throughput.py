"""PPL@15% on the mmBERT-base shape: the sparse head (encoder everywhere, head + 256k decoder only at
the masked positions) vs the full-logits path of transformers + dllm (decoder at every position,
[4, 512, 256000] logits), on the same windows and masks.

    python benchmarks/eval_throughput.py [--json] [--sequences 4] [--repeats 3]

Each path runs in its own process, one after the other, so that peak memory is its own; the weights
(seeded) and the masks (seeded) are identical. The last line of --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_seconds, peak_rss_mb, reset_peak_rss, rss_mb, run_worker  # noqa: E402


def worker(path: str, sequences: int, length: int, repeats: int, preset: str) -> dict:
    import torch

    from diffutron.data import read_documents
    from diffutron.evaluate import evaluate_windows, make_windows
    from diffutron.model import DiffusionLM

    lm = DiffusionLM.from_pretrained(f"preset:{preset}", device="cpu", dtype=torch.float32, seed=0)
    texts = [d.text for d in read_documents("bundled:heldout")]
    windows = [w for w in make_windows(lm, texts) if len(w) == lm.context_length][:sequences]
    windows = [w[:length] for w in windows]
    assert len(windows) == sequences, "not enough held-out text for that many full windows"
    run = lambda: evaluate_windows(
        lm,
        windows,
        mask_ratio=0.15,
        samples=1,
        elbo_samples=0,  # noqa: E731
        batch_size=sequences,
        sparse_head=(path == "fast"),
        seed=0,
    )
    result = run()  # warm-up, and the PPL
    reset_peak_rss()
    loaded_mb = rss_mb()
    seconds = median_seconds(run, repeats)
    return {
        "path": path,
        "seconds": seconds,
        "ppl": result.ppl,
        "masked_tokens": result.masked_tokens,
        "peak_rss_mb": peak_rss_mb(),
        "model_rss_mb": loaded_mb,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="mmbert-base")
    parser.add_argument("--worker", choices=["fast", "dense"])
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.sequences, args.length, args.repeats, args.preset)))
        return
    common = [
        f"--sequences={args.sequences}",
        f"--length={args.length}",
        f"--repeats={args.repeats}",
        f"--preset={args.preset}",
    ]
    fast = run_worker(__file__, "fast", *common)
    dense = run_worker(__file__, "dense", *common)
    summary = {
        "speedup": dense["seconds"] / fast["seconds"],
        "ppl_fast": fast["ppl"],
        "ppl_dense": dense["ppl"],
        "ppl_rel_diff": abs(fast["ppl"] - dense["ppl"]) / dense["ppl"],
        "seconds_fast": fast["seconds"],
        "seconds_dense": dense["seconds"],
        "peak_rss_mb_fast": fast["peak_rss_mb"],
        "peak_rss_mb_dense": dense["peak_rss_mb"],
        "peak_mem_ratio": dense["peak_rss_mb"] / fast["peak_rss_mb"],
        "model_rss_mb": fast["model_rss_mb"],
        "working_mb_fast": fast["peak_rss_mb"] - fast["model_rss_mb"],
        "working_mb_dense": dense["peak_rss_mb"] - dense["model_rss_mb"],
        "masked_tokens": fast["masked_tokens"],
        "shape": f"{args.sequences}x{args.length}",
        "preset": args.preset,
        "threads": fast["threads"],
        "dtype": "float32",
        "device": "cpu",
    }
    print(
        f"PPL@15% on preset:{args.preset}, {args.sequences} x {args.length} tokens, CPU fp32, "
        f"{summary['threads']} threads, median of {args.repeats}"
    )
    for name, r in (("sparse head", fast), ("full logits", dense)):
        print(
            f"  {name} : {r['seconds']:.2f} s   PPL {r['ppl']:.4f}   peak RSS {r['peak_rss_mb']:.0f} MB "
            f"(model {r['model_rss_mb']:.0f} MB + {r['peak_rss_mb'] - r['model_rss_mb']:.0f} MB working)"
        )
    print(
        f"  speedup {summary['speedup']:.2f}x, peak memory {summary['peak_mem_ratio']:.2f}x lower, "
        f"PPL relative difference {summary['ppl_rel_diff']:.1e}"
    )
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
