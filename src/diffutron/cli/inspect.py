"""`diffutron info`, `eval` and `fill-mask`: what a model is and how well it predicts masked text."""

from __future__ import annotations

import typer
from rich.table import Table

from diffutron.cli.common import (
    DeviceOpt,
    JsonOpt,
    ModelArg,
    app,
    default_model,
    load_model,
    model_and_text,
    out,
    print_json,
    progress,
)
from diffutron.errors import UsageError


@app.command()
def info(
    model: str | None = ModelArg,
    lora_r: int | None = typer.Option(
        None, "--lora-r", min=1, help="count the parameters LoRA of this rank would train"
    ),
    lora_alpha: int | None = typer.Option(None, "--lora-alpha", min=1, help="LoRA alpha [default: the rank]"),
    lora_targets: str = typer.Option(
        "default",
        "--lora-targets",
        help="default (attention + MLP linears), all-linear, or comma-separated module names",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Parameters, context, vocabulary and mask token; with --lora-r, what LoRA would train."""
    from diffutron.lora import LoraSettings, apply_lora, count_parameters
    from diffutron.model import DiffusionLM

    lm = DiffusionLM.skeleton(model or default_model())
    total, _ = count_parameters(lm.model)
    result = {
        "model": lm.name,
        "model_type": lm.hf_model.config.model_type,
        "params_total": total,
        "context_length": lm.context_length,
        "vocab_size": lm.vocab_size,
        "tokenizer_size": len(lm.tokenizer),
        "mask_token": lm.tokenizer.mask_token,
        "mask_id": lm.mask_id,
    }
    if lora_r is not None:
        targets = lora_targets if lora_targets in ("default", "all-linear") else lora_targets.split(",")
        try:
            wrapped = apply_lora(lm.model, LoraSettings(r=lora_r, alpha=lora_alpha or lora_r, targets=targets))
        except ValueError as e:
            raise UsageError(str(e).splitlines()[0]) from e
        with_lora, trainable = count_parameters(wrapped)
        result.update(
            lora_r=lora_r,
            lora_alpha=lora_alpha or lora_r,
            lora_targets=lora_targets,
            params_with_lora=with_lora,
            params_trainable=trainable,
            trainable_percent=round(100 * trainable / with_lora, 2),
        )
    else:
        result.update(params_trainable=total, trainable_percent=100.0)
    if as_json:
        return print_json(result)
    table = Table(show_header=False, title=lm.name)
    for key, value in result.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    out.print(table)


@app.command("eval")
def eval_(
    model: str | None = ModelArg,
    data: str = typer.Option(..., "--data", help=".txt (documents split by blank lines), .jsonl, or bundled:heldout"),
    mask_ratio: float = typer.Option(0.15, "--mask-ratio", help="share of tokens masked, in (0, 1)"),
    seed: int = typer.Option(0, "--seed"),
    samples: int = typer.Option(1, "--samples", min=1, help="passes with fresh masks (mean and standard error)"),
    elbo_samples: int | None = typer.Option(
        None, "--elbo-samples", min=0, help="passes for the ELBO bound (0 skips it) [default: max(--samples, 4)]"
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    text_field: str = typer.Option("text", "--text-field", help="the text field of .jsonl records"),
    bert_corruption: bool = typer.Option(
        False, "--bert-corruption", help="BERT's 80/10/10: of the chosen tokens 10%% random, 10%% kept"
    ),
    device: str | None = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Perplexity at a mask ratio (the reference metric), the ELBO bound and fill-mask accuracy."""
    from diffutron.data import read_documents
    from diffutron.evaluate import evaluate

    if not 0.0 < mask_ratio < 1.0:
        raise UsageError(f"--mask-ratio must be in (0, 1), got {mask_ratio}")
    texts = [d.text for d in read_documents(data, text_field=text_field)]
    lm = load_model(model, device)
    with progress(f"eval {data}") as update:
        result = evaluate(
            lm,
            texts,
            mask_ratio=mask_ratio,
            samples=samples,
            seed=seed,
            batch_size=batch_size,
            elbo_samples=elbo_samples,
            bert_corruption=bert_corruption,
            progress=update,
        )
    payload = {"model": lm.name, "data": data, **result.to_dict()}
    if as_json:
        return print_json(payload)
    table = Table(title=f"{lm.name} on {data}", show_header=False)
    table.add_row(
        f"PPL @ {mask_ratio:.0%} masked",
        f"{result.ppl:.3f} ± {result.ppl_stderr:.3f}  ({samples} pass{'es' * (samples > 1)})",
    )
    if result.elbo_ppl is not None:
        table.add_row("ELBO bound (upper bound on PPL)", f"{result.elbo_ppl:.3f}")
    table.add_row("fill-mask top-1 / top-5", f"{result.top1:.2%} / {result.top5:.2%}")
    table.add_row("tokens / windows", f"{result.tokens:,} / {result.windows:,}")
    table.add_row("seconds", f"{result.seconds:.1f}")
    out.print(table)


@app.command("fill-mask")
def fill_mask_(
    args: list[str] = typer.Argument(..., metavar="[MODEL] TEXT", help="TEXT with one or more <mask>"),
    top_k: int = typer.Option(5, "--top-k", min=1),
    device: str | None = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Top-k candidates, with probabilities, for every <mask> in TEXT."""
    from diffutron.fill_mask import fill_mask

    model, text = model_and_text(args, "fill-mask")
    lm = load_model(model, device)
    masks = fill_mask(lm, text, top_k=top_k)
    if as_json:
        return print_json({"model": lm.name, "text": text, "masks": [[c.to_dict() for c in m] for m in masks]})
    for number, candidates in enumerate(masks, start=1):
        table = Table(title=f"<mask> {number} of {len(masks)}")
        for column in ("token", "prob", "text"):
            table.add_column(column)
        for c in candidates:
            table.add_row(repr(c.token), f"{c.prob:.4f}", c.sequence)
        out.print(table)
