"""The README.md of a model that `diffutron train` wrote: what the run was, not peft's empty template."""

from __future__ import annotations

import json
from pathlib import Path

OBJECTIVES = {
    "mdlm": "continual pre-training under the masked-diffusion (MDLM) objective",
    "mlm": "masked-LM training at a fixed mask ratio",
    "sft": "supervised fine-tuning under the masked-diffusion objective (prompts never masked)",
}


def last_metrics(metrics: Path) -> tuple[dict | None, dict | None]:
    """The last training row and the last evaluation row of a metrics.jsonl."""
    train = evaluation = None
    if Path(metrics).is_file():
        for line in Path(metrics).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("loss") is not None:
                train = row
            if "eval_ppl" in row:
                evaluation = row
    return train, evaluation


def run_card(recipe, state: dict, metrics: Path, kept_base: str | None = None, processes: int = 1) -> str:
    """Markdown with YAML front matter, for the `final/` folder of a run (and what `export` copies);
    `kept_base`: the folder where the run keeps a base that exists nowhere else."""
    r = recipe
    adapter = r.lora.enabled
    base = f"`{r.model.name}`" + (f" (kept in `{kept_base}`, which the adapter names)" if kept_base else "")
    train_row, eval_row = last_metrics(metrics)
    data = r.data.sft if r.objective.kind == "sft" else (r.data.dataset or r.data.recipe)
    lora = (
        f"r={r.lora.r}, alpha={r.lora.alpha}, targets {r.lora.targets}" if r.lora.enabled else "no (full fine-tuning)"
    )
    rows = [
        ("base model", base),
        ("objective", f"{r.objective.kind}: {OBJECTIVES[r.objective.kind]}"),
        ("LoRA", lora),
        ("data", f"`{data}`"),
        ("optimizer", f"AdamW, lr {r.optim.lr:g}, {r.optim.schedule} schedule, weight decay {r.optim.weight_decay:g}"),
        (
            "steps",
            f"{state['step']:,} of {r.train.batch_size} sequences x {r.train.grad_accum} accumulation x "
            f"{processes} process{'es' * (processes > 1)} ({state.get('tokens', 0):,} tokens), seed {r.train.seed}",
        ),
        ("training time", f"{state.get('seconds', 0):,.0f} s"),
    ]
    if train_row:
        rows.append(("final training loss", f"{train_row['loss']:.4f} (step {train_row['step']})"))
    if eval_row:
        rows.append(
            (
                "held-out PPL @ 15% masked",
                f"{eval_row['eval_ppl']:.2f} (ELBO bound on the generative perplexity "
                f"{eval_row['eval_elbo_ppl']:.2f}; step {eval_row['step']}, "
                f"first {r.data.eval_documents} documents of `{r.data.eval}`)",
            )
        )
    library = "peft" if adapter else "transformers"
    load = (
        "A peft adapter: `peft.AutoPeftModel.from_pretrained(folder)` loads it on the base that "
        "`adapter_config.json` names (`diffutron export RUN --out DIR --merge-lora` makes a standalone model)."
        if adapter
        else "A standard Hugging Face folder: `AutoModelForMaskedLM.from_pretrained(folder)` loads it."
    )
    lines = [
        "---",
        f"library_name: {library}",
        "pipeline_tag: fill-mask",
        f"tags: [diffutron, masked-diffusion, {r.objective.kind}]",
        "---",
        f"# {Path(r.train.out).name}",
        "",
        f"Trained by `diffutron train`: {OBJECTIVES[r.objective.kind]} of `{r.model.name}`.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in rows],
        "",
        "## Use",
        "",
        "```bash",
        'diffutron generate FOLDER "Türkiye Cumhuriyeti" -n 32',
        'diffutron fill-mask FOLDER "Ankara <mask> başkentidir."',
        "```",
        "",
        load,
        "The whole recipe is `recipe.json` in the run folder; per-step numbers are in its `metrics.jsonl`.",
        "",
    ]
    return "\n".join(lines)
