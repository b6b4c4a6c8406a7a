"""`diffutron lm-eval`: lm-evaluation-harness tasks (the shipped Turkish pack, CETVEL, the harness's own) in process."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import typer
from rich.table import Table

from diffutron.cli.common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    app,
    dtype_name,
    err,
    load_model,
    out,
    print_json,
)
from diffutron.errors import DiffutronError, UsageError

# The task pack shipped in the repository (configs/eval/tasks), found from a clone or an editable install.
SHIPPED_TASKS = Path(__file__).resolve().parents[3] / "configs" / "eval" / "tasks"


@app.command("lm-eval")
def lm_eval_(
    model: str | None = ModelArg,
    tasks: str = typer.Option(..., "--tasks", help="comma-separated task, group or tag names (tr_cloze,tr_order)"),
    include_path: list[str] = typer.Option(
        [], "--include-path", help="a folder of task YAMLs (repeatable); the shipped pack is always included"
    ),
    num_fewshot: int | None = typer.Option(None, "--num-fewshot", min=0, help="[default: each task's own]"),
    limit: float | None = typer.Option(None, "--limit", min=0, help="documents per task (N), or a fraction (< 1)"),
    mc_num: int = typer.Option(128, "--mc-num", min=1, help="Monte Carlo samples per continuation (ELBO)"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="rows per forward pass"),
    seed: int = typer.Option(0, "--seed", min=0, help="masks and the harness's own seeds"),
    model_args: str = typer.Option(
        "", "--model-args", help="more harness model arguments: key=value,... (steps, block_length, temperature ...)"
    ),
    output: Path | None = typer.Option(None, "--output", help="write the harness's results JSON here (a new file)"),
    device: str | None = DeviceOpt,
    dtype: str = DtypeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Run lm-evaluation-harness tasks on a model: the ELBO for likelihoods, the sampler for generation."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UsageError("--tasks names no task")
    if output is not None and output.exists():
        raise UsageError(f"{output} exists: choose a new --output file (results are never overwritten)")
    folders = [str(SHIPPED_TASKS)] if SHIPPED_TASKS.is_dir() else []
    for folder in include_path:
        if not Path(folder).is_dir():
            raise UsageError(f"--include-path {folder} is not a folder")
        folders.append(str(Path(folder).resolve()))
    if limit is not None and limit >= 1 and limit != int(limit):
        raise UsageError("--limit is a whole number of documents, or a fraction below 1")

    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffutron.harness import HarnessModel  # without the eval extra: a one-line install hint

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices are not the user's business
    from lm_eval import simple_evaluate
    from lm_eval.utils import simple_parse_args_string

    extra = simple_parse_args_string(model_args)
    for key in ("pretrained", "device", "dtype"):  # the model is loaded here: in extra they would be ignored
        if key in extra:
            raise UsageError(f"--model-args {key}: set it with the command's own MODEL, --device, --dtype")
    manager = _task_manager(folders, names)
    lm = load_model(model, device, dtype)
    harness_model = HarnessModel(lm=lm, batch_size=batch_size, mc_num=mc_num, seed=seed, **extra)
    started = time.perf_counter()
    results = simple_evaluate(
        model=harness_model,
        tasks=names,
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,  # per-document outputs: lm-eval's own CLI (--log_samples) writes them, not here
    )
    seconds = time.perf_counter() - started
    results["config"]["model"] = lm.name
    results["config"]["model_args"] = {"mc_num": mc_num, "batch_size": batch_size, "seed": seed, **extra}
    if output is not None:
        _write_new(output, json.dumps(results, indent=2, ensure_ascii=False, default=str))
    if as_json:
        return print_json(
            {"results": results["results"], "model": lm.name, "dtype": dtype_name(lm), "seconds": round(seconds, 1)}
        )
    table = Table(title=f"{lm.name}: {', '.join(names)} ({seconds:.0f} s, mc_num {mc_num})")
    for column in ("task", "metric", "value", "stderr"):
        table.add_column(column)
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            shown = f"± {stderr:.4f}" if isinstance(stderr, float) and math.isfinite(stderr) else ""
            table.add_row(task, metric if filt == "none" else key, f"{value:.4f}", shown)
    out.print(table)
    if output is not None:
        err.print(f"[dim]harness results: {output}[/]")


def _task_manager(folders: list[str], names: list[str]):
    """Only the given folders when they hold every task named (fast: the harness's own ~15k task configs
    take seconds to index), else the harness's tasks too."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=folders or None, include_defaults=False) if folders else None
    if manager is None or not all(name in manager.all_tasks for name in names):
        manager = TaskManager(include_path=folders or None)
    missing = [name for name in names if name not in manager.all_tasks]
    if missing:
        raise UsageError(f"unknown task(s): {', '.join(missing)} (lm-eval ls tasks lists them; --include-path adds)")
    return manager


def _write_new(path: Path, text: str) -> None:
    """Write a new file atomically: a partial file never stands under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        if path.exists():
            raise DiffutronError(f"{path} appeared while the evaluation ran; results left in {tmp}")
        tmp.replace(path)
    except OSError as e:
        raise DiffutronError(f"could not write {path}: {e}") from e
