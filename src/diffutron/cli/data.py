"""`diffutron data prepare` and `data stats`: training corpora."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.progress import Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from diffutron.cli import common
from diffutron.cli.common import (
    JsonOpt,
    PlainProgress,
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
    force: bool = typer.Option(
        False, "--force", help="replace a folder prepared from another recipe (only the files data prepare writes)"
    ),
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
    with _prepare_progress() as update:
        stats = prepare(recipe, out, progress=update, force=force)
    if as_json:
        return print_json({"out": out, **{k: v for k, v in stats.items() if k != "recipe"}})
    _print_report(_stats_report(stats, out))


@data_app.command("stats")
def data_stats(folder: str = typer.Argument(..., help="a folder written by data prepare"), as_json: bool = JsonOpt):
    """What a prepared dataset holds: documents kept and rejected by reason and source, tokens, mixture."""
    from diffutron.data.folder import STATS, read_json

    path = Path(folder) / STATS
    if not path.is_file():
        raise DiffutronError(f"{folder} is not a prepared dataset: stats.json is missing")
    stats = read_json(path, "rerun data prepare (with --force) to rebuild it")
    try:
        report = _stats_report(stats, folder)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DiffutronError(
            f"{path} is malformed ({type(e).__name__}: {e}): rerun data prepare (with --force) to rebuild it"
        ) from e
    if as_json:
        return print_json({k: v for k, v in stats.items() if k != "recipe"})
    _print_report(report)


@contextmanager
def _prepare_progress():
    """update(counts): a live line on a terminal; elsewhere a line on stderr every PROGRESS_INTERVAL_S."""
    if err.is_terminal:
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
            yield lambda counts: bar.update(task, completed=counts["documents"], **counts)
        return
    counts = {"documents": 0, "sequences": 0, "tokens": 0}
    line, stop = PlainProgress("preparing", "documents"), threading.Event()

    def report() -> None:  # a thread: a line even while one long document is being tokenized
        while not stop.wait(common.PROGRESS_INTERVAL_S):
            line(counts["documents"], info=f"{counts['sequences']:,} sequences, {counts['tokens']:,} tokens")

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        yield counts.update
    finally:
        stop.set()
        thread.join()


def _print_report(report: list) -> None:
    out.print(*report, sep="\n")


def _stats_report(stats: dict, folder: str) -> list:
    """The summary line, the table of sources and the modifications, ready to print."""
    docs = stats["documents"]
    reused = " (already prepared: reused)" if stats.get("reused") else ""
    report = [
        f"[bold]{folder}[/]{reused}: {stats['sequences']:,} sequences of {stats['max_length']} tokens in "
        f"{stats['shards']} shards, {stats['tokens']:,} tokens; documents read {docs['read']:,} = "
        f"kept {docs['kept']:,} + rejected {docs['rejected']:,}"
    ]
    table = Table(title="sources")
    for column in ("source", "read", "kept", "rejected", "tokens", "share", "rejected by reason"):
        table.add_column(column, justify="left" if column in ("source", "rejected by reason") else "right")
    for name, s in stats["sources"].items():
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(s["rejected"].items(), key=lambda kv: -kv[1])) or "-"
        table.add_row(
            name,
            f"{s['read']:,}",
            f"{s['kept']:,}",
            f"{sum(s['rejected'].values()):,}",
            f"{s['tokens']:,}",
            f"{s['token_share']:.1%}",
            reasons,
        )
    report.append(table)
    if stats.get("modified_by_rule"):
        report.append("modified: " + ", ".join(f"{k} {v:,}" for k, v in stats["modified_by_rule"].items()))
    return report
