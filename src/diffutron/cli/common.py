"""What every verb of the `diffutron` command shares: the app, the consoles, model loading, progress.

Results go to stdout (a table, or one JSON object with --json); progress and errors go to stderr:
a rich bar on a terminal, otherwise a plain line every few seconds (logs, CI, `2> file`).
"""

from __future__ import annotations

import json
import math
import sys
import time
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
DtypeOpt = typer.Option(
    "auto",
    "--dtype",
    help="auto, fp32, bf16: auto is bf16 on CUDA, and on a CPU bf16 only where it has bf16 matrix instructions "
    "(AVX512-BF16, AMX) and a quick check at load finds it faster, else fp32",
)


def _print_version(value: bool) -> None:
    if value:
        from diffutron import __version__

        print(f"diffutron {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="show Python tracebacks on errors"),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="print the version and exit"
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="CPU threads for torch [default: the CPUs idle at start; OMP_NUM_THREADS if set]"
    ),
) -> None:
    """Masked diffusion language models on bidirectional encoders, made first for Turkish."""
    from diffutron.threads import configure

    configure(threads)  # before any command imports torch


def print_json(obj: dict) -> None:
    print(json.dumps(obj, ensure_ascii=False))


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "?/s", style="progress.data.speed")


# Without a terminal (a log file, CI), progress is a plain line on stderr at most this often.
PROGRESS_INTERVAL_S = 5.0


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


class PlainProgress:
    """update(done, total=None, info="") prints one line, with rate and ETA, every PROGRESS_INTERVAL_S."""

    def __init__(self, label: str, unit: str = ""):
        self.label, self.unit = label, f" {unit}" if unit else ""
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, total: int | None = None, info: str = "") -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last, elapsed = now, now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        line = f"{self.label}: {done:,}" + (f"/{total:,}" if total else "") + self.unit
        line += (f" ({done / total:.0%})" if total else "") + f", {rate:.2f}/s, elapsed {_clock(elapsed)}"
        if total and rate and done < total:
            line += f", ETA {_clock((total - done) / rate)}"
        print(line + (f", {info}" if info else ""), file=sys.stderr, flush=True)


@contextmanager
def progress(description: str, unit: str = ""):
    """Progress on stderr: a rich bar with rate and ETA on a terminal, else a plain line every few
    seconds. Yields update(done, total=None); without a total it counts up."""
    if not err.is_terminal:
        yield PlainProgress(description, unit)
        return
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
        yield lambda done, total=None: bar.update(task, completed=done, total=total)


def default_model() -> str:
    return DEFAULT_MODEL


@contextmanager
def training_progress(label: str, total: int):
    """A bar over training steps showing loss, lr and tokens/s (plain lines without a terminal);
    yields (update(record), the bar: its console logs above it)."""
    columns = [
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    plain = None if err.is_terminal else PlainProgress(label, "steps")
    with Progress(*columns, console=err, transient=True, disable=plain is not None) as bar:
        task = bar.add_task(label, total=total, info="starting")

        def update(record: dict) -> None:
            info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
            bar.update(task, completed=record["step"], total=record["max_steps"], info=info)
            if plain:
                plain(record["step"], record["max_steps"], info)

        yield update, bar


def check_fraction(value: float, option: str) -> float:
    """A finite value in (0, 1), or a usage error naming the option."""
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise UsageError(f"{option} must be in (0, 1), got {value}")
    return value


def load_model(model: str | None, device: str | None = None, dtype: str = "auto"):
    from diffutron.model import DiffusionLM
    from diffutron.precision import CHOICES

    name = model or default_model()
    if dtype not in CHOICES:
        raise UsageError(f"unknown --dtype {dtype!r}: choose {', '.join(CHOICES)}")
    with err.status(f"loading {name}"):
        return DiffusionLM.from_pretrained(name, device=device, dtype=dtype)


def dtype_name(lm) -> str:
    """The precision a loaded model runs in, as --dtype names it (fp32, bf16): --json outputs say it."""
    from diffutron.precision import name_of

    return name_of(lm.dtype)


def model_and_text(args: list[str], what: str) -> tuple[str | None, str]:
    if len(args) > 2:
        raise UsageError(f"{what} takes [MODEL] TEXT: quote the text")
    return (None, args[0]) if len(args) == 1 else (args[0], args[1])


SourceOpt = typer.Option([], "--source", help="bundled, hf:NAME[:CONFIG], or a file / folder / glob (repeatable)")
