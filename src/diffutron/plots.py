"""Curves of a run from its metrics.jsonl: training loss (raw, faint, and smoothed) and held-out perplexity."""

from __future__ import annotations

import json
from pathlib import Path


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average with bias correction (TensorBoard's smoothing): the first points are
    not pulled towards zero."""
    smoothed, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**i))
    return smoothed


def plot_metrics(metrics: str | Path, png: str | Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [r for r in records if "eval_ppl" in r]
    if not train and not evals:
        return None
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1, label="per logged step")
        ax.plot(steps, smooth(list(losses)), color="tab:blue", linewidth=2, label="smoothed (EMA 0.9)")
        ax.legend()
    ax.set(title="training loss", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    if evals:
        ax = axes[0][1]
        steps = [e["step"] for e in evals]
        ax.plot(steps, [e["eval_ppl"] for e in evals], marker="o", label="PPL @ 15% masked")
        if all(e.get("eval_elbo_ppl") is not None for e in evals):
            ax.plot(
                steps,
                [e["eval_elbo_ppl"] for e in evals],
                marker="s",
                linestyle="--",
                label="ELBO bound on the generative PPL",
            )
        tokens = evals[-1].get("eval_tokens")
        title = "held-out perplexity" + (f" ({tokens:,} tokens)" if tokens else "")
        ax.set(title=title, xlabel="step", ylabel="perplexity", yscale="log")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)
