"""Drawing tokens with a temperature: the sampler's draw (inverse CDF) and top-p filter (topk first)
against the textbook versions (torch.multinomial; a full sort of every row), on the same logits.

    python benchmarks/sample_draw.py [--json] [--model PATH] [--rows 512] [--top-p 0.95] [--repeats 5]

The logits are the model's own (default: the shipped tiny Diffutron) at the masked positions of
held-out windows with 30% of tokens masked, tempered by 0.8: real rows, flat or peaked as the model
makes them. Also checks that both top-p filters keep the same tokens. The last line of --json is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import median_seconds  # noqa: E402
from reference_sampler import nucleus_filter  # noqa: E402


def model_logits(model: str | None, rows: int, temperature: float):
    import torch

    from diffutron.assets import shipped_model
    from diffutron.data import bundled_documents
    from diffutron.evaluate import make_windows
    from diffutron.model import DiffusionLM

    lm = DiffusionLM.from_pretrained(model or str(shipped_model("tiny-diffutron")), device="cpu")
    g = torch.Generator().manual_seed(0)
    found = []
    with torch.no_grad():
        for window in make_windows(lm, [d.text for d in bundled_documents("heldout")]):
            ids = torch.tensor(window)[None]
            masked = (torch.rand(ids.shape, generator=g) < 0.3) & lm.maskable(ids)
            found.append(lm(ids.masked_fill(masked, lm.mask_id), positions=masked)[:, : len(lm.tokenizer)])
            if sum(len(f) for f in found) >= rows:
                break
    return torch.cat(found)[:rows].float() / temperature


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model", default=None, help="default: the shipped tiny Diffutron")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from diffutron.sampling.rng import TOKEN_DRAW, uniforms
    from diffutron.sampling.sampler import draw, top_p_filter

    logits = model_logits(args.model, args.rows, temperature=0.8)
    probs = logits.softmax(dim=-1)
    g = torch.Generator().manual_seed(0)
    seconds = {
        "multinomial": median_seconds(lambda: torch.multinomial(probs, 1, generator=g), args.repeats),
        # with the counter-based uniforms the sampler draws (one per row), their cost included
        "draw": median_seconds(
            lambda: draw(probs, uniforms(torch.zeros(len(probs)), torch.arange(len(probs)), TOKEN_DRAW)), args.repeats
        ),
        "top_p_sort": median_seconds(lambda: nucleus_filter(logits, args.top_p), args.repeats),
        "top_p_filter": median_seconds(lambda: top_p_filter(logits, args.top_p), args.repeats),
    }
    same = torch.equal(top_p_filter(logits, args.top_p).isinf(), nucleus_filter(logits, args.top_p).isinf())
    nucleus = (~nucleus_filter(logits, args.top_p).isinf()).sum(dim=-1).float()
    result = {
        "rows": logits.shape[0],
        "vocab": logits.shape[1],
        "top_p": args.top_p,
        **{f"{name}_ms": round(1000 * s, 2) for name, s in seconds.items()},
        "draw_speedup": round(seconds["multinomial"] / seconds["draw"], 2),
        "top_p_speedup": round(seconds["top_p_sort"] / seconds["top_p_filter"], 2),
        "same_nucleus": same,
        "rows_with_nucleus_over_1024": int((nucleus > 1024).sum()),
        "median_nucleus_size": int(nucleus.median()),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")  # without --json only: stdout is one JSON object with it


if __name__ == "__main__":
    main()
