"""PPL@15% on the mmBERT-base shape, three ways on the same windows and masks:

- fast: diffutron's evaluate_windows, the sparse head (encoder everywhere, head + 256k decoder only
  at the masked positions), plus the top-1/top-5 ranks it reports;
- dense: the full-logits path of dllm (the model's own forward, decoder at every position,
  [4, 512, 256000] logits, cross-entropy at the masked positions);
- sparse_prediction: what a careful ModernBERT user runs: `ModernBertConfig(sparse_prediction=True)`
  and `model(input_ids, attention_mask, labels=...)`, labels -100 where nothing is masked, so that
  transformers itself runs the head only at the labelled positions; PPL = exp(loss).

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

PATHS = ("fast", "dense", "sparse_prediction")


def worker(path: str, sequences: int, length: int, repeats: int, preset: str) -> dict:
    import math

    import torch

    from diffutron.data import read_documents
    from diffutron.evaluate import _generator, _mask_window, evaluate_windows, make_windows
    from diffutron.model import DiffusionLM

    torch.manual_seed(0)
    # sparse_prediction changes no weight: the same seed gives the same model
    overrides = {"sparse_prediction": True} if path == "sparse_prediction" else {}
    lm = DiffusionLM.from_preset(preset, seed=0, **overrides).to(dtype=torch.float32).eval()
    texts = [d.text for d in read_documents("bundled:heldout")]
    windows = [w for w in make_windows(lm, texts) if len(w) == lm.context_length][:sequences]
    windows = [w[:length] for w in windows]
    assert len(windows) == sequences, "not enough held-out text for that many full windows"

    def diffutron_eval():
        result = evaluate_windows(
            lm,
            windows,
            mask_ratio=0.15,
            samples=1,
            elbo_samples=0,
            batch_size=sequences,
            sparse_head=(path == "fast"),
            seed=0,
        )
        return result.ppl, result.masked_tokens

    @torch.no_grad()
    def transformers_sparse_prediction():
        clean = torch.tensor(windows)
        drawn = [_mask_window(lm, ids, 0.15, _generator(0, 0, i), False) for i, ids in enumerate(clean)]
        noisy = torch.stack([d[0] for d in drawn])
        masked = torch.stack([d[1] for d in drawn])
        labels = clean.masked_fill(~masked, -100)
        loss = lm.hf_model(input_ids=noisy, attention_mask=torch.ones_like(noisy), labels=labels).loss
        return math.exp(loss.item()), int(masked.sum())

    run = transformers_sparse_prediction if path == "sparse_prediction" else diffutron_eval
    ppl, masked_tokens = run()  # warm-up, and the PPL
    reset_peak_rss()
    loaded_mb = rss_mb()
    seconds = median_seconds(run, repeats)
    return {
        "path": path,
        "seconds": seconds,
        "ppl": ppl,
        "masked_tokens": masked_tokens,
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
    parser.add_argument("--worker", choices=PATHS)
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
    runs = {path: run_worker(__file__, path, *common) for path in PATHS}
    fast, dense, hf_sparse = runs["fast"], runs["dense"], runs["sparse_prediction"]
    assert fast["masked_tokens"] == dense["masked_tokens"] == hf_sparse["masked_tokens"], "the masks differ"
    summary = {
        "speedup": dense["seconds"] / fast["seconds"],
        "speedup_vs_sparse_prediction": hf_sparse["seconds"] / fast["seconds"],
        "ppl_fast": fast["ppl"],
        "ppl_dense": dense["ppl"],
        "ppl_sparse_prediction": hf_sparse["ppl"],
        "ppl_rel_diff": abs(fast["ppl"] - dense["ppl"]) / dense["ppl"],
        "ppl_rel_diff_sparse_prediction": abs(fast["ppl"] - hf_sparse["ppl"]) / hf_sparse["ppl"],
        "seconds_fast": fast["seconds"],
        "seconds_dense": dense["seconds"],
        "seconds_sparse_prediction": hf_sparse["seconds"],
        "peak_rss_mb_fast": fast["peak_rss_mb"],
        "peak_rss_mb_dense": dense["peak_rss_mb"],
        "peak_rss_mb_sparse_prediction": hf_sparse["peak_rss_mb"],
        "peak_mem_ratio": dense["peak_rss_mb"] / fast["peak_rss_mb"],
        "peak_mem_ratio_vs_sparse_prediction": hf_sparse["peak_rss_mb"] / fast["peak_rss_mb"],
        "model_rss_mb": fast["model_rss_mb"],
        "working_mb_fast": fast["peak_rss_mb"] - fast["model_rss_mb"],
        "working_mb_dense": dense["peak_rss_mb"] - dense["model_rss_mb"],
        "working_mb_sparse_prediction": hf_sparse["peak_rss_mb"] - hf_sparse["model_rss_mb"],
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
    names = (("diffutron sparse head", fast), ("full logits (dllm)", dense), ("HF sparse_prediction", hf_sparse))
    for name, r in names:
        print(
            f"  {name:22}: {r['seconds']:.2f} s   PPL {r['ppl']:.4f}   peak RSS {r['peak_rss_mb']:.0f} MB "
            f"(model {r['model_rss_mb']:.0f} MB + {r['peak_rss_mb'] - r['model_rss_mb']:.0f} MB working)"
        )
    print(
        f"  vs full logits: {summary['speedup']:.2f}x faster, peak memory {summary['peak_mem_ratio']:.2f}x lower, "
        f"PPL relative difference {summary['ppl_rel_diff']:.1e}"
    )
    print(
        f"  vs sparse_prediction: {summary['speedup_vs_sparse_prediction']:.2f}x, peak memory "
        f"{summary['peak_mem_ratio_vs_sparse_prediction']:.2f}x, "
        f"PPL relative difference {summary['ppl_rel_diff_sparse_prediction']:.1e}"
    )
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
