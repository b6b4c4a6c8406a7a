"""Curves of a run from its metrics.jsonl: training loss and held-out perplexity."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics: str | Path, png: str | Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_ppl"], r.get("eval_elbo_ppl")) for r in records if "eval_ppl" in r]
    if not train and not evals:
        return None
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue")
    ax.set(title="training loss", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    if evals:
        ax = axes[0][1]
        steps = [e[0] for e in evals]
        ax.plot(steps, [e[1] for e in evals], marker="o", label="PPL @ 15% masked")
        if all(e[2] is not None for e in evals):
            ax.plot(steps, [e[2] for e in evals], marker="s", linestyle="--", label="ELBO bound")
        ax.set(title="held-out perplexity", xlabel="step", ylabel="perplexity", yscale="log")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)
