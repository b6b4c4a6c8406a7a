"""What every verb of the `diffutron` command shares: the app, the consoles, model loading, progress bars.

Results go to stdout (a table, or one JSON object with --json); progress and errors go to stderr.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from diffutron.errors import UsageError

# The model of every command whose MODEL is optional: the tiny Diffutron shipped in the package.
DEFAULT_MODEL = "tiny-diffutron"

app = typer.Typer(
    name="diffutron",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Masked diffusion language models on bidirectional encoders, made first for Turkish.",
)
out = Console()
err = Console(stderr=True)

ModelArg = typer.Argument(
    None,
    metavar="[MODEL]",
    help=f"model folder, adapter folder, hub id or preset:NAME [default: the shipped {DEFAULT_MODEL}]",
)
JsonOpt = typer.Option(False, "--json", help="print one JSON object")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... [default: cuda if available]")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show Python tracebacks on errors")) -> None:
    """Masked diffusion language models on bidirectional encoders, made first for Turkish."""


def print_json(obj: dict) -> None:
    print(json.dumps(obj, ensure_ascii=False))


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "?/s", style="progress.data.speed")


@contextmanager
def progress(description: str):
    """A rich progress bar on stderr with rate and ETA; yields update(done, total)."""
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def default_model() -> str:
    from diffutron.assets import shipped_model

    return str(shipped_model(DEFAULT_MODEL))


@contextmanager
def training_progress(label: str, total: int):
    """A bar over training steps showing loss, lr and tokens/s; yields (update(record), the bar)."""
    columns = [
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=total, info="starting")

        def update(record: dict) -> None:
            info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
            bar.update(task, completed=record["step"], total=record["max_steps"], info=info)

        yield update, bar


def load_model(model: str | None, device: str | None = None):
    from diffutron.model import DiffusionLM

    name = model or default_model()
    with err.status(f"loading {name}"):
        return DiffusionLM.from_pretrained(name, device=device)


def model_and_text(args: list[str], what: str) -> tuple[str | None, str]:
    if len(args) > 2:
        raise UsageError(f"{what} takes [MODEL] TEXT: quote the text")
    return (None, args[0]) if len(args) == 1 else (args[0], args[1])


SourceOpt = typer.Option([], "--source", help="bundled, hf:NAME[:CONFIG], or a file / folder / glob (repeatable)")
