"""The `diffutron` command: thin wrappers over the library. Results go to stdout (a table, or one JSON
object with --json); progress and errors go to stderr. Errors are one line, exit code 2 for a bad
request and 1 for a failure at run time; --debug shows the traceback."""

from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

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
from rich.table import Table
from rich.text import Text
from typer.exceptions import TyperException

from diffutron.errors import DiffutronError, UsageError

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


def _print_json(obj: dict) -> None:
    print(json.dumps(obj, ensure_ascii=False))


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "?/s", style="progress.data.speed")


@contextmanager
def _progress(description: str):
    """A rich progress bar on stderr with rate and ETA; yields update(done, total)."""
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _default_model() -> str:
    from diffutron.assets import shipped_model

    return str(shipped_model(DEFAULT_MODEL))


@contextmanager
def _training_progress(label: str, total: int):
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


def _load(model: str | None, device: str | None = None):
    from diffutron.model import DiffusionLM

    name = model or _default_model()
    with err.status(f"loading {name}"):
        return DiffusionLM.from_pretrained(name, device=device)


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

    lm = DiffusionLM.skeleton(model or _default_model())
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
        return _print_json(result)
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
    lm = _load(model, device)
    with _progress(f"eval {data}") as update:
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
        return _print_json(payload)
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

    model, text = _model_and_text(args, "fill-mask")
    lm = _load(model, device)
    masks = fill_mask(lm, text, top_k=top_k)
    if as_json:
        return _print_json({"model": lm.name, "text": text, "masks": [[c.to_dict() for c in m] for m in masks]})
    for number, candidates in enumerate(masks, start=1):
        table = Table(title=f"<mask> {number} of {len(masks)}")
        for column in ("token", "prob", "text"):
            table.add_column(column)
        for c in candidates:
            table.add_row(repr(c.token), f"{c.prob:.4f}", c.sequence)
        out.print(table)


# Sampling options, shared by generate and infill.
StepsOpt = typer.Option(None, "--steps", min=1, help="denoising steps [default: one token per step]")
PolicyOpt = typer.Option("confidence", "--policy", help="confidence, margin, entropy, random, threshold, ancestral")
TemperatureOpt = typer.Option(0.0, "--temperature", help="0 is greedy")
TopKOpt = typer.Option(0, "--top-k", min=0, help="0 is off")
TopPOpt = typer.Option(1.0, "--top-p", help="1 is off")
PenaltyOpt = typer.Option(1.0, "--repetition-penalty", help="1 is off (the reference chat settings used 1.2)")
# generate's default: on the shipped model, greedy decoding with 1.2 repeats a token half as often,
# with more distinct bigrams and lower trigram perplexity (docs/benchmarks.md, sampling policies)
GeneratePenaltyOpt = typer.Option(
    1.2, "--repetition-penalty", help="CTRL's penalty on tokens already present; 1 is off"
)
ThresholdOpt = typer.Option(0.9, "--threshold", help="confidence tau of the threshold policy")
CfgOpt = typer.Option(0.0, "--cfg", help="classifier-free guidance scale, 0 is off")
SeedOpt = typer.Option(0, "--seed")
ScheduleOpt = typer.Option("linear", "--schedule", help="how many tokens each step reveals: linear, cosine")
LiveOpt = typer.Option(None, "--live/--no-live", help="show the denoising step by step [default: on a terminal]")


def _sampling_config(options: dict, **explicit):
    """A validated SamplingConfig from a command's options of the same names (plus explicit values)."""
    import dataclasses

    from diffutron.sampling import SamplingConfig

    names = {f.name for f in dataclasses.fields(SamplingConfig)}
    config = SamplingConfig(**{**{k: v for k, v in options.items() if k in names}, **explicit})
    config.validate()
    return config


def _model_and_text(args: list[str], what: str) -> tuple[str | None, str]:
    if len(args) > 2:
        raise UsageError(f"{what} takes [MODEL] TEXT: quote the text")
    return (None, args[0]) if len(args) == 1 else (args[0], args[1])


def _live_view(lm, canvas_row: int = 0):
    """A callback that shows row `canvas_row` of the canvas resolving, masks as ░, on stderr."""
    from rich.live import Live

    live = Live(console=err, refresh_per_second=12, transient=False)

    def render(state) -> None:
        ids = state.ids[canvas_row].tolist()
        pieces, run = [], []
        for token in ids:
            if token == lm.mask_id:
                pieces.append(lm.tokenizer.decode(run, skip_special_tokens=True))
                pieces.append("░")
                run = []
            else:
                run.append(token)
        pieces.append(lm.tokenizer.decode(run, skip_special_tokens=True))
        live.update(Text(f"step {state.step}: ", style="dim") + Text("".join(pieces)))

    return live, render


def _print_generation(result, as_json: bool, extra: dict) -> None:
    if as_json:
        return _print_json(
            {
                **extra,
                "text": result.texts[0],
                "tokens": result.token_ids[0],
                "forward_passes": result.forward_passes,
                "steps": result.steps,
                "finished_by": result.finished_by[0],
                "seconds": result.seconds,
                "tokens_per_s": result.tokens_per_s,
            }
        )
    out.print(result.texts[0], markup=False, highlight=False)
    err.print(
        f"[dim]{result.new_tokens} tokens, {result.forward_passes} forward passes, "
        f"{result.seconds:.1f} s ({result.tokens_per_s:.1f} tokens/s), finished by {result.finished_by[0]}[/]"
    )


def _sample(model: str | None, device: str | None, live: bool | None, as_json: bool, run):
    """Load the model, then run(lm, callback) with a live view of row 0 when wanted."""
    lm = _load(model, device)
    if live is None:
        live = err.is_terminal and not as_json
    if not live:
        return lm, run(lm, None)
    view, render = _live_view(lm)
    with view:
        return lm, run(lm, render)


@app.command("generate")
def generate_(
    args: list[str] = typer.Argument(..., metavar="[MODEL] PROMPT", help='PROMPT, "" for unconditional'),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    steps: int | None = StepsOpt,
    block_length: int | None = typer.Option(None, "--block-length", min=1, help="semi-autoregressive block size"),
    policy: str = PolicyOpt,
    temperature: float = TemperatureOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    repetition_penalty: float = GeneratePenaltyOpt,
    threshold: float = ThresholdOpt,
    cfg_scale: float = CfgOpt,
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable), matched on token ids"),
    no_eos: bool = typer.Option(False, "--no-eos", help="do not stop at the end-of-sequence token"),
    truncate_prompt: bool = typer.Option(False, "--truncate-prompt", help="left-truncate a prompt that does not fit"),
    schedule: str = ScheduleOpt,
    seed: int = SeedOpt,
    live: bool | None = LiveOpt,
    device: str | None = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Continue PROMPT by discrete diffusion: start from masks, reveal tokens step by step."""
    from diffutron.sampling import generate

    model, prompt = _model_and_text(args, "generate")
    config = _sampling_config(locals(), stop=tuple(stop), stop_at_eos=not no_eos)
    lm, result = _sample(
        model,
        device,
        live,
        as_json,
        lambda lm, callback: generate(lm, [prompt], max_new_tokens, config, callback=callback),
    )
    _print_generation(result, as_json, {"model": lm.name, "prompt": prompt})


@app.command("infill")
def infill_(
    args: list[str] = typer.Argument(..., metavar="[MODEL] TEXT", help="TEXT with <mask> (one token) or <mask*N>"),
    steps: int | None = StepsOpt,
    policy: str = PolicyOpt,
    temperature: float = TemperatureOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    repetition_penalty: float = PenaltyOpt,
    threshold: float = ThresholdOpt,
    seed: int = SeedOpt,
    live: bool | None = LiveOpt,
    device: str | None = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Fill every <mask> of TEXT jointly, keeping every given token."""
    from diffutron.sampling import infill

    model, text = _model_and_text(args, "infill")
    config = _sampling_config(locals())
    lm, result = _sample(
        model, device, live, as_json, lambda lm, callback: infill(lm, [text], config, callback=callback)
    )
    _print_generation(result, as_json, {"model": lm.name, "input": text})


data_app = typer.Typer(no_args_is_help=True, help="Prepare and inspect training corpora.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train subword tokenizers.")
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")
SourceOpt = typer.Option([], "--source", help="bundled, hf:NAME[:CONFIG], or a file / folder / glob (repeatable)")
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
        _RateColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("prepare", total=None, documents=0, sequences=0)
        stats = prepare(recipe, out, progress=lambda s: bar.update(task, completed=s["documents"], **s))
    if as_json:
        return _print_json({"out": out, **{k: v for k, v in stats.items() if k != "recipe"}})
    _print_stats(stats, out)


@data_app.command("stats")
def data_stats(folder: str = typer.Argument(..., help="a folder written by data prepare"), as_json: bool = JsonOpt):
    """What a prepared dataset holds: documents kept and rejected by reason and source, tokens, mixture."""
    path = Path(folder) / "stats.json"
    if not path.is_file():
        raise DiffutronError(f"{folder} is not a prepared dataset: stats.json is missing")
    stats = json.loads(path.read_text())
    if as_json:
        return _print_json({k: v for k, v in stats.items() if k != "recipe"})
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


@tokenizer_app.command("train")
def tokenizer_train(
    source: list[str] = SourceOpt,
    text_field: str = typer.Option("text", "--text-field"),
    vocab_size: int = typer.Option(16384, "--vocab-size", min=300),
    max_length: int = typer.Option(512, "--model-max-length", min=8),
    out: str = typer.Option(..., "--out"),
    as_json: bool = JsonOpt,
) -> None:
    """Train a byte-level BPE tokenizer with the special tokens a masked LM needs (the bundled one is one)."""
    from diffutron.data.sources import iter_documents
    from diffutron.tokenizer import train_tokenizer

    if not source:
        raise UsageError("name at least one --source (e.g. --source bundled)")
    counts: dict = {}

    def texts():
        for spec in source:
            for doc in iter_documents(spec, text_field, errors="count", training=True):
                counts["documents"] = counts.get("documents", 0) + 1
                yield doc.text

    with err.status("training the tokenizer"):
        tok = train_tokenizer(texts(), vocab_size, out, model_max_length=max_length)
    if not counts:
        raise DiffutronError("the sources hold no text")
    result = {"out": out, "vocab_size": len(tok), "documents": counts["documents"], "mask_token": tok.mask_token}
    if as_json:
        return _print_json(result)
    out.print(f"wrote {out}: {len(tok):,} tokens learned from {counts['documents']:,} documents")


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
    with _training_progress("step", recipe.train.max_steps) as (update, _):
        summary = train(recipe, progress=update, dry_run=dry_run)
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch, one process reports
        return
    if as_json:
        return _print_json(summary)
    if dry_run:
        for key, value in summary.items():
            out.print(f"{key}: {value:,}" if isinstance(value, int) else f"{key}: {value}")
        return
    if summary.get("interrupted"):
        err.print(
            f"interrupted at step {summary['step']}: saved {summary['checkpoint']}; rerun the same command to resume"
        )
        raise typer.Exit(130)
    curves = Path(summary["out"]) / "curves.png"
    out.print(
        f"trained {summary['step']} steps in {summary['seconds']:.0f} s, final loss {summary['final_loss']:.4f}; "
        f"model in {summary['final']}" + (f", curves in {curves}" if curves.is_file() else "")
    )


@app.command("export")
def export_(
    source: str = typer.Argument(
        ..., metavar="RUN_OR_CHECKPOINT", help="a run folder (its final model) or a checkpoint"
    ),
    out_dir: str = typer.Option(..., "--out", help="the folder to write"),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="merge the adapter into the base: a standalone model"),
    as_json: bool = JsonOpt,
) -> None:
    """Write a standard Hugging Face folder (or a peft adapter folder) from a run or checkpoint."""
    from diffutron.export import export

    result = export(source, out_dir, merge_lora=merge_lora)
    if as_json:
        return _print_json(result)
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

    with _training_progress("CPT", steps) as (update, bar):
        result = run_demo(out_dir, max_steps=steps, progress=update, status=lambda m: bar.console.log(m))
    if as_json:
        return _print_json(
            {k: result[k] for k in ("ppl_before", "ppl_after", "samples", "run_dir")}
            | {
                "infill": result["infill"],
                "elbo_ppl_before": result["elbo_ppl_before"],
                "elbo_ppl_after": result["elbo_ppl_after"],
            }
        )
    table = Table(title="held-out PPL @ 15% masked (bundled heldout split)")
    for column in ("model", "PPL", "ELBO bound", "top-1"):
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


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turn every error into one line on stderr and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:  # library chatter (deprecations, their own progress bars) is not the user's business
        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        # transformers reads the hub's setting when imported; if it already is (main() called in-process),
        # tell it directly, without paying its import at start-up otherwise
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    try:
        code = app(args=argv or ["--help"], prog_name="diffutron", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except TyperException as e:  # bad options or arguments: a usage error
        if debug:
            raise
        print(f"error: {e.format_message()}", file=sys.stderr)
        return 2
    except DiffutronError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 -- anything else is a bug or an environment problem
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"error: {type(e).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
