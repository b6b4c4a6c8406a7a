"""`diffutron data prepare` and `data stats`: training corpora."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from diffutron.cli.common import (
    JsonOpt,
    RateColumn,
    SourceOpt,
    app,
    err,
    out,
    print_json,
)
from diffutron.errors import DiffutronError

data_app = typer.Typer(no_args_is_help=True, help="Prepare and inspect training corpora.")
app.add_typer(data_app, name="data")
TextFieldOpt = typer.Option(None, "--text-field", help="the text field of .jsonl / .parquet / .csv / hf records")


@data_app.command("prepare")
def data_prepare(
    recipe_path: str | None = typer.Argument(None, metavar="[RECIPE.yaml]", help="a data recipe (configs/data/)"),
    source: list[str] = SourceOpt,
    text_field: str | None = TextFieldOpt,
    tokenizer: str | None = typer.Option(None, "--tokenizer", help='a tokenizer folder or hub id, or "bundled"'),
    max_length: int | None = typer.Option(None, "--max-length", min=8),
    num_proc: int | None = typer.Option(None, "--num-proc", min=1),
    max_documents: int | None = typer.Option(None, "--max-documents", min=1, help="read at most this many"),
    out: str = typer.Option(..., "--out", help="the dataset folder to write"),
    as_json: bool = JsonOpt,
) -> None:
    """Clean, deduplicate, tokenize and pack sources into a sharded dataset (load_from_disk)."""
    from diffutron.config import load_config, override
    from diffutron.data.prepare import DataRecipe, SourceSpec, prepare

    recipe = load_config(DataRecipe, recipe_path) if recipe_path else DataRecipe()
    if source:
        recipe.sources = [SourceSpec(spec) for spec in source]
    if text_field:
        for spec in recipe.sources:
            spec.text_field = text_field
    options = {
        "tokenizer": tokenizer,
        "pack.max_length": max_length,
        "num_proc": num_proc,
        "max_documents": max_documents,
    }
    recipe = override(recipe, {k: v for k, v in options.items() if v is not None})
    with Progress(
        TextColumn("preparing"),
        TextColumn("{task.fields[documents]:,} documents"),
        TextColumn("{task.fields[sequences]:,} sequences"),
        RateColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("prepare", total=None, documents=0, sequences=0)
        stats = prepare(recipe, out, progress=lambda s: bar.update(task, completed=s["documents"], **s))
    if as_json:
        return print_json({"out": out, **{k: v for k, v in stats.items() if k != "recipe"}})
    _print_stats(stats, out)


@data_app.command("stats")
def data_stats(folder: str = typer.Argument(..., help="a folder written by data prepare"), as_json: bool = JsonOpt):
    """What a prepared dataset holds: documents kept and rejected by reason and source, tokens, mixture."""
    path = Path(folder) / "stats.json"
    if not path.is_file():
        raise DiffutronError(f"{folder} is not a prepared dataset: stats.json is missing")
    stats = json.loads(path.read_text())
    if as_json:
        return print_json({k: v for k, v in stats.items() if k != "recipe"})
    _print_stats(stats, folder)


def _print_stats(stats: dict, folder: str) -> None:
    docs = stats["documents"]
    reused = " (already prepared: reused)" if stats.get("reused") else ""
    out.print(
        f"[bold]{folder}[/]{reused}: {stats['sequences']:,} sequences of {stats['max_length']} tokens in "
        f"{stats['shards']} shards, {stats['tokens']:,} tokens from {docs['kept']:,} of {docs['read']:,} documents"
    )
    table = Table(title="sources")
    for column in ("source", "read", "kept", "rejected", "tokens", "share"):
        table.add_column(column, justify="left" if column in ("source", "rejected") else "right")
    for name, s in stats["sources"].items():
        rejected = ", ".join(f"{k} {v:,}" for k, v in sorted(s["rejected"].items(), key=lambda kv: -kv[1])) or "-"
        table.add_row(name, f"{s['read']:,}", f"{s['kept']:,}", rejected, f"{s['tokens']:,}", f"{s['token_share']:.1%}")
    out.print(table)
    if stats.get("modified_by_rule"):
        out.print("modified: " + ", ".join(f"{k} {v:,}" for k, v in stats["modified_by_rule"].items()))
