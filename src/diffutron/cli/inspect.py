"""`diffutron info`, `eval` and `fill-mask`: what a model is and how well it predicts masked text."""

from __future__ import annotations

import itertools

import typer
from rich.table import Table

from diffutron.cli.common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    app,
    check_fraction,
    default_model,
    dtype_name,
    load_model,
    model_and_text,
    out,
    print_json,
    progress,
)
from diffutron.errors import DiffutronError, UsageError

# The default strata of the ELBO bound, without importing torch for --help.
ELBO_STRATA = 16


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
    samples: int = typer.Option(
        1, "--samples", min=1, help="passes with fresh masks, pooled (2+ give a standard error and per-pass PPL)"
    ),
    elbo_samples: int = typer.Option(
        ELBO_STRATA,
        "--elbo-samples",
        min=0,
        help="strata of the ELBO bound on the generative perplexity (0 skips it); its masks do not depend on --samples",
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    text_field: str = typer.Option("text", "--text-field", help="the text field of .jsonl records"),
    bert_corruption: bool = typer.Option(
        False, "--bert-corruption", help="BERT's 80/10/10: of the chosen tokens 10%% random, 10%% kept"
    ),
    device: str | None = DeviceOpt,
    dtype: str = DtypeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Perplexity at a mask ratio (the reference metric), the ELBO bound on the generative perplexity, and
    fill-mask accuracy. The input is streamed: memory does not grow with its size."""
    from diffutron.data.sources import iter_documents
    from diffutron.evaluate import evaluate

    check_fraction(mask_ratio, "--mask-ratio")
    documents = iter_documents(data, text_field, errors="raise")
    first = next(documents, None)  # a missing, unreadable or empty source fails before the model loads
    if first is None:
        raise DiffutronError(f"{data}: contains no text")
    lm = load_model(model, device, dtype)
    with progress(f"eval {data}", unit="windows") as update:
        result = evaluate(
            lm,
            (d.text for d in itertools.chain([first], documents)),
            mask_ratio=mask_ratio,
            samples=samples,
            seed=seed,
            batch_size=batch_size,
            elbo_samples=elbo_samples,
            bert_corruption=bert_corruption,
            progress=update,
        )
    payload = {"model": lm.name, "dtype": dtype_name(lm), "data": data, **result.to_dict()}
    if as_json:
        return print_json(payload)
    table = Table(title=f"{lm.name} on {data}", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column()
    passes = f"{samples} passes, pooled" if samples > 1 else "1 pass"
    stderr = f" ± {result.ppl_stderr:.3f}" if result.ppl_stderr is not None else ""
    table.add_row(f"PPL @ {mask_ratio:.0%} masked", f"{result.ppl:.3f}{stderr}  ({passes})")
    if samples > 1:
        table.add_row("  per pass", ", ".join(f"{p:.3f}" for p in result.pass_ppl))
    if result.elbo_ppl is not None:
        elbo_stderr = f" ± {result.elbo_ppl_stderr:.3f}" if result.elbo_ppl_stderr is not None else ""
        table.add_row(
            "ELBO bound on generative PPL", f"{result.elbo_ppl:.3f}{elbo_stderr}  ({result.elbo_samples} strata)"
        )
        table.caption = (
            "ELBO bound: an upper bound on the model's perplexity as a generative model of the text (MDLM's test "
            f"PPL), not comparable with PPL @ {mask_ratio:.0%}, which sees {1 - mask_ratio:.0%} of the text"
        )
    table.add_row("fill-mask top-1 / top-5", f"{result.top1:.2%} / {result.top5:.2%}")
    table.add_row("tokens / windows", f"{result.tokens:,} / {result.windows:,}")
    table.add_row("seconds", f"{result.seconds:.1f}")
    out.print(table)


@app.command("fill-mask")
def fill_mask_(
    args: list[str] = typer.Argument(..., metavar="[MODEL] TEXT", help="TEXT with one or more <mask> or <word>"),
    top_k: int = typer.Option(5, "--top-k", min=1),
    max_tokens: int | None = typer.Option(
        None,
        "--max-tokens",
        min=1,
        help="<word>: the longest word tried, in tokens [default: what holds 99%% of the bundled corpus's words]",
    ),
    beam: int = typer.Option(8, "--beam", min=1, help="<word>: the chains kept per length in the search"),
    device: str | None = DeviceOpt,
    dtype: str = DtypeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Top-k candidates, with probabilities, for every <mask> in TEXT; whole words, of any length up to
    --max-tokens, for every <word>."""
    from diffutron.fill_mask import fill_mask
    from diffutron.word_fill import WordCandidates

    model, text = model_and_text(args, "fill-mask")
    lm = load_model(model, device, dtype)
    found = fill_mask(lm, text, top_k=top_k, max_tokens=max_tokens, beam=beam)
    masks = [m for m in found if not isinstance(m, WordCandidates)]
    words = [w for w in found if isinstance(w, WordCandidates)]
    if as_json:
        payload = {"model": lm.name, "dtype": dtype_name(lm), "text": text}
        payload["masks"] = [[c.to_dict() for c in m] for m in masks]
        if words:
            payload["words"] = [[c.to_dict() for c in w] for w in words]
        return print_json(payload)
    for number, candidates in enumerate(masks, start=1):
        table = Table(title=f"<mask> {number} of {len(masks)}")
        for column in ("token", "prob", "text"):
            table.add_column(column)
        for c in candidates:
            table.add_row(repr(c.token), f"{c.prob:.4f}", c.sequence)
        out.print(table)
    for number, candidates in enumerate(words, start=1):
        table = Table(title=f"<word> {number} of {len(words)}")
        for column in ("word", "tokens", "score", "text"):
            table.add_column(column)
        for c in candidates:
            table.add_row(c.text, str(c.length), f"{c.score:.2f}", c.sequence)
        out.print(table)
