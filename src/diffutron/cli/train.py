"""`diffutron train`, `export` and `demo`: training runs and the models they produce."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.table import Table

from diffutron.cli.common import (
    JsonOpt,
    app,
    err,
    out,
    print_json,
    training_progress,
)
from diffutron.errors import UsageError


@app.command("train")
def train_(
    recipe_path: str = typer.Argument(..., metavar="RECIPE.yaml", help="a training recipe (configs/)"),
    model: str | None = typer.Option(None, "--model", help="override model.name"),
    dataset: str | None = typer.Option(None, "--dataset", help="override data.dataset"),
    out_dir: str | None = typer.Option(None, "--out", help="override train.out (the run folder)"),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1),
    lr: float | None = typer.Option(None, "--lr"),
    save_every: int | None = typer.Option(None, "--save-every", min=1),
    eval_every: int | None = typer.Option(None, "--eval-every", min=0),
    seed: int | None = typer.Option(None, "--seed"),
    settings: list[str] = typer.Option([], "--set", help="any recipe value, e.g. --set lora.r=8 (repeatable)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="build everything, describe it, do not train"),
    plan_run: bool = typer.Option(
        False, "--plan", help="the run's tokens, steps, FLOPs; measured steps and the projected time (no training)"
    ),
    measure_steps: int = typer.Option(3, "--measure-steps", min=0, help="with --plan: steps to time (0: none)"),
    processes: int | None = typer.Option(
        None, "--processes", min=1, help="with --plan: processes (GPUs) to plan for [default: this launch's]"
    ),
    device: str | None = typer.Option(None, "--device", help="with --plan: where to time the steps (cpu, cuda)"),
    as_json: bool = JsonOpt,
) -> None:
    """Train: CPT (MDLM), MLM or SFT, LoRA or full; rerun the same command to resume."""
    from diffutron.config import load_config, override, parse_value
    from diffutron.train import TrainRecipe, train

    recipe = load_config(TrainRecipe, recipe_path)
    changes = {
        "model.name": model,
        "data.dataset": dataset,
        "train.out": out_dir,
        "train.max_steps": max_steps,
        "train.batch_size": batch_size,
        "optim.lr": lr,
        "train.save_every": save_every,
        "train.eval_every": eval_every,
        "train.seed": seed,
    }
    changes = {key: value for key, value in changes.items() if value is not None}  # options not given
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise UsageError(f"--set takes KEY=VALUE, got {setting!r}")
        changes[key] = parse_value(value)
    try:
        recipe = override(recipe, changes)
    except KeyError as e:
        raise UsageError(f"--set: unknown recipe key {e.args[0]!r}") from None
    if plan_run:
        return _plan(recipe, processes, measure_steps, device, as_json)
    with training_progress("step", recipe.train.max_steps) as (update, _):
        summary = train(recipe, progress=update, dry_run=dry_run)
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch, one process reports
        return
    if as_json:
        return print_json(summary)
    if dry_run:
        for key, value in summary.items():
            out.print(f"{key}: {_plain(value)}", highlight=False, soft_wrap=True)
        return
    if summary.get("already_complete"):
        seconds = summary.get("seconds")
        took = f", trained in {seconds:.0f} s" if seconds is not None else ""
        out.print(
            f"{summary['out']} already holds a finished run of {summary['step']:,} steps{took}; model in "
            f"{summary['final']}. Nothing to do: raise --max-steps to train on, or use a new --out (or delete "
            "the folder) to start afresh",
            highlight=False,
            soft_wrap=True,
        )
        return
    if summary.get("interrupted"):
        err.print(
            f"interrupted at step {summary['step']}: saved {summary['checkpoint']}; rerun the same command to resume"
        )
        raise typer.Exit(130)
    curves = Path(summary["out"]) / "curves.png"
    resumed = f" (resumed from {summary['resumed_from']})" if summary.get("resumed_from") else ""
    loss = summary["final_loss"]
    out.print(
        f"trained to step {summary['step']:,}{resumed} in {summary['seconds']:.0f} s, final loss "
        + (f"{loss:.4f}" if loss is not None else "non-finite")
        + f"; model in {summary['final']}"
        + (f", curves in {curves}" if curves.is_file() else ""),
        highlight=False,
        soft_wrap=True,
    )


def _plan(recipe, processes: int | None, measure_steps: int, device: str | None, as_json: bool) -> None:
    from diffutron.train.plan import plan

    world = processes or int(os.environ.get("WORLD_SIZE", "1"))
    with err.status(f"planning: {measure_steps} measured steps" if measure_steps else "planning"):
        result = plan(recipe, processes=world, measure=measure_steps, device=device)
    if as_json:
        return print_json(result)
    lines = [
        f"model {result['model']}: {result['params_total']:,} parameters, {result['params_trainable']:,} trained "
        f"({result['trainable_percent']}%)",
        f"run on {result['processes']} process(es): {result['steps']:,} steps x {result['tokens_per_step']:,} tokens "
        f"= {result['tokens_total']:,} tokens"
        + (f", {result['epochs']:.2f} epochs of {result['sequences']:,} sequences" if result["epochs"] else ""),
        f"{result['flops_per_token'] / 1e9:.3f} GFLOP per token (masked share {result['masked_share']:.3f}), "
        f"{result['flops_total']:.3g} FLOPs in all",
    ]
    if "seconds_per_step" in result:
        mfu = f", MFU {result['mfu']:.1%} of {result['peak_flops'] / 1e12:.3g} TFLOP/s" if result["mfu"] else ""
        lines += [
            f"measured on {result['device']} ({result['compute_dtype']}): {result['seconds_per_step']:.3f} s per step, "
            f"{result['tokens_per_s']:,.0f} tokens/s per process, {result['achieved_flops'] / 1e12:.3g} TFLOP/s{mfu}, "
            f"peak {result['peak_memory_mb']:,.0f} MB ({result['peak_memory_kind']})",
            f"projected: {result['projected_hours']:.2f} h on {result['processes']} process(es), "
            f"{result['device_hours']:.2f} device-hours",
        ]
    for line in lines:
        out.print(line, highlight=False, soft_wrap=True)


def _plain(value) -> str:
    """true/false for booleans, thousands separators for counts."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:,}" if isinstance(value, int) else str(value)


@app.command("export")
def export_(
    source: str = typer.Argument(
        ..., metavar="RUN_OR_CHECKPOINT", help="a run folder (its final model) or a checkpoint"
    ),
    out_dir: str = typer.Option(..., "--out", help="the folder to write"),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="merge the adapter into the base: a standalone model"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out that is not an earlier export"),
    as_json: bool = JsonOpt,
) -> None:
    """Write a standard Hugging Face folder (or a peft adapter folder) from a run or checkpoint."""
    from diffutron.export import export

    result = export(source, out_dir, merge_lora=merge_lora, force=force)
    if as_json:
        return print_json(result)
    out.print(f"wrote {result['kind']} to {out_dir}")


@app.command()
def demo(
    out_dir: str = typer.Option("runs/demo", "--out", help="the run folder"),
    steps: int = typer.Option(300, "--steps", min=1, help="CPT steps"),
    as_json: bool = JsonOpt,
) -> None:
    """The reference experiment in miniature: CPT with LoRA of the shipped tiny base, PPL before and
    after, generation and infilling; offline, a few minutes on a CPU."""
    from diffutron.demo import run_demo

    with training_progress("CPT", steps) as (update, bar):
        result = run_demo(out_dir, max_steps=steps, progress=update, status=lambda m: bar.console.print(m))
    if as_json:
        return print_json(
            {k: result[k] for k in ("ppl_before", "ppl_after", "samples", "run_dir")}
            | {
                "infill": result["infill"],
                "elbo_ppl_before": result["elbo_ppl_before"],
                "elbo_ppl_after": result["elbo_ppl_after"],
                "reused": result["reused"],
                "train_seconds": result["train_seconds"],
            }
        )
    if result["reused"]:
        err.print(
            f"{result['run_dir']} already held a finished run of {result['steps']} steps (trained in "
            f"{result['train_seconds']:.0f} s): reused it; delete it or pass --out to train afresh",
            highlight=False,
            soft_wrap=True,
        )
    table = Table(title="bundled heldout split", caption="ELBO bound: on the generative perplexity, not PPL@15%")
    for column in ("model", "PPL @ 15% masked", "ELBO bound", "fill-mask top-1"):
        table.add_column(column)
    table.add_row(
        "tiny base (MLM)",
        f"{result['ppl_before']:.2f}",
        f"{result['elbo_ppl_before']:.2f}",
        f"{result['top1_before']:.1%}",
    )
    table.add_row(
        f"after {result['steps']} CPT steps",
        f"{result['ppl_after']:.2f}",
        f"{result['elbo_ppl_after']:.2f}",
        f"{result['top1_after']:.1%}",
    )
    out.print(table)
    for sample in result["samples"]:
        out.print(f"[bold]{sample['prompt']}[/] {sample['text']}", highlight=False)
    out.print(f"[bold]infill[/] {result['infill']['input']} -> {result['infill']['text']}", highlight=False)
    out.print("[dim]denoising, step by step:[/]")
    for line in result["denoising"]:
        out.print(f"  {line}", highlight=False, markup=False)
    out.print(f"run folder: {result['run_dir']} (report.md, metrics.jsonl, curves.png, checkpoint)")
