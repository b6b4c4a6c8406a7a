"""The training loop on accelerate: one process, or many under `accelerate launch` (DDP, FSDP2, DeepSpeed).

Rerunning the same command on the same folder resumes from the newest complete checkpoint: weights,
optimizer, scheduler, RNG states, the position in the data and the running window of logged losses, so
a run killed and resumed ends, and logs, as an uninterrupted one does. The masks of step s come from a
generator seeded by (seed, s, micro-batch, rank). One process trains in a run folder at a time (a lock);
a finished run is reported, not retrained.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from diffutron.atomic import write_json
from diffutron.config import TrainRecipe, flatten, to_dict
from diffutron.errors import DiffutronError
from diffutron.run_folder import RECIPE_FILE, RunLock, prune, read_state, recover, trim_metrics
from diffutron.train import build, distributed, plan
from diffutron.train import state as run_state

PRECISION_NAMES = {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def mask_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1009 + micro * 31 + rank) % 2**63)


def record_batch(batch: dict, state: dict, rank: int) -> None:
    """With DIFFUTRON_RECORD_BATCHES=<folder>: each process appends the dataset indices of its micro-batches
    to <folder>/batches-<rank>.jsonl (which sequences each step saw, for tests and debugging)."""
    folder = os.environ.get("DIFFUTRON_RECORD_BATCHES")
    if folder:
        row = {"step": state["step"] + 1, "epoch": state["epoch"], "rank": rank, "index": batch["index"].tolist()}
        with open(Path(folder) / f"batches-{rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def compute_loss(lm, forward, batch: dict, recipe: TrainRecipe, generator: torch.Generator):
    """The recipe's objective on one micro-batch; `forward` is the (possibly wrapped) model."""
    from diffutron.objective import mdlm_loss

    ids = batch["input_ids"]
    attention = batch.get("attention_mask")
    o = recipe.objective
    common = dict(generator=generator, forward=forward, ce_chunk=o.ce_chunk)
    if o.kind == "mlm":
        t = torch.full((ids.shape[0],), o.mlm_ratio)
        return mdlm_loss(lm, ids, attention, t=t, weighting="uniform", normalization="masked", **common)
    maskable = None
    if o.kind == "sft":  # the response, with its end-of-sequence padding; never the prompt
        maskable = attention.bool() & ~batch["prompt_mask"]
    return mdlm_loss(
        lm,
        ids,
        attention,
        maskable=maskable,
        schedule=o.schedule,
        weighting=o.weighting,
        normalization=o.normalization,
        eps=o.eps,
        antithetic=o.antithetic,
        **common,
    )


@contextmanager
def _quiet():
    """No library chatter during a run: accelerate's note on the tied decoder weight it leaves out of
    model.safetensors (expected: the weights are tied), peft's note when it cannot look a base up and
    the deprecation its calls trigger in transformers, transformers' bar for every checkpoint it writes."""
    from transformers.utils import logging as hf_logging

    accelerate_log = logging.getLogger("accelerate.utils.other")
    level, bars = accelerate_log.level, hf_logging.is_progress_bar_enabled()
    accelerate_log.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Could not find a config file", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            yield
    finally:
        accelerate_log.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def train(recipe: TrainRecipe, progress: Callable[[dict], None] | None = None, dry_run: bool = False) -> dict:
    """Train (or, with dry_run, build everything and describe it). Returns a summary dict.

    A run already finished in `train.out` is not retrained: the summary then has `already_complete`.
    """
    recipe.validate()
    recipe = build.resolve_paths(recipe)
    precision = recipe.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    precision = {"fp32": "no"}.get(precision, precision)  # accelerate's spelling
    out = Path(recipe.train.out)
    if not dry_run:
        run_state.resume_point(recipe, out)  # a resume with other settings is refused before anything is prepared
        # before the process group forms: the other processes wait on a file lock, not at a barrier
        # whose timeout (10 minutes for NCCL) the preparation of a large corpus would outlast
        build.prepare_data_once(recipe, out)
    accelerator = distributed.make_accelerator(precision, recipe.train)
    if dry_run:
        return _describe(recipe, accelerator, precision)
    lock = RunLock(out)
    distributed.on_main_process(accelerator, lock.acquire)
    try:
        with _quiet():
            return _run(recipe, accelerator, precision, progress)
    finally:
        lock.release()


def _describe(recipe: TrainRecipe, accelerator, precision: str) -> dict:
    """The dry run: the model's counts on the meta device, the data's shape, nothing written."""
    lm = build.build_model(recipe, skeleton=True)
    summary = _summary(recipe, lm, accelerator, precision)
    prepared = recipe.data.dataset and build.is_prepared(Path(recipe.data.dataset))
    if recipe.objective.kind != "sft" and not prepared and recipe.data.recipe:
        # a dry run never prepares data: the recipe's max length says what the sequences will be
        from diffutron.config import load_config
        from diffutron.data.prepare import DataRecipe

        summary["max_length"] = load_config(DataRecipe, recipe.data.recipe).pack.max_length
    else:
        dataset = build.load_training_data(recipe, lm, Path(recipe.train.out))
        build.check_one_batch(len(dataset), recipe, accelerator.num_processes)
        summary["max_length"] = int(dataset[0]["input_ids"].shape[-1])
        summary["sequences"] = len(dataset)
    shape = plan.run_shape(recipe, accelerator.num_processes, summary["max_length"], summary.get("sequences"))
    return summary | {
        "tokens_per_step": shape["tokens_per_step"],
        "max_steps": shape["steps"],
        "total_tokens": shape["tokens_total"],
        "epochs": shape["epochs"],
    }


def _summary(recipe: TrainRecipe, lm, accelerator, precision: str) -> dict:
    return build.describe_model(recipe, lm) | {
        "max_length": None,
        "batch_size": recipe.train.batch_size,
        "grad_accum": recipe.train.grad_accum,
        "processes": accelerator.num_processes,
        "distributed": accelerator.distributed_type.name,
        "precision": PRECISION_NAMES[precision],
        "out": recipe.train.out,
    }


def _finished_summary(finished: dict, out: Path, processes: int) -> dict:
    return {
        "already_complete": True,
        "step": finished["step"],
        "seconds": finished.get("seconds"),
        "train_seconds": finished.get("seconds"),
        "final": str(out / "final"),
        "final_loss": _last_loss(out / "metrics.jsonl"),
        "bad_steps": finished.get("bad_steps", 0),
        "out": str(out),
        "processes": processes,
    }


def _new_window(carried: dict | None = None) -> dict:
    """The running window of logged steps: losses, gradient norms, non-finite steps, tokens, and its start; a
    resumed run carries on the window its checkpoint saved (its curve then equals an uninterrupted one)."""
    carried = carried or {}
    return {
        "losses": list(carried.get("losses", [])),
        "grad_norms": list(carried.get("grad_norms", [])),
        "non_finite": carried.get("non_finite", 0),
        "tokens": carried.get("tokens", 0),
        "started": time.perf_counter() - carried.get("seconds", 0.0),
    }


def _saved_window(window: dict) -> dict:
    kept = {k: window[k] for k in ("losses", "grad_norms", "non_finite", "tokens")}
    return kept | {"seconds": time.perf_counter() - window["started"]}


def _run(recipe: TrainRecipe, accelerator, precision: str, progress) -> dict:
    from transformers import get_scheduler

    out = Path(recipe.train.out)

    def start() -> None:
        out.mkdir(parents=True, exist_ok=True)
        recover(out)
        prune(out, recipe.train.keep_last)  # a kill may have come between a save and its pruning

    distributed.on_main_process(accelerator, start)
    accelerator.wait_for_everyone()
    distributed.check_shared_folder(accelerator, out)
    recipe = plan.with_steps(recipe, accelerator.num_processes)  # train.max_tokens: steps for this launch
    checkpoint, resumed = run_state.resume_point(recipe, out)
    if resumed is not None:
        run_state.check_launch(resumed, accelerator, checkpoint)
    metrics_path = out / "metrics.jsonl"
    if resumed and resumed["step"] >= recipe.train.max_steps:
        final_state = read_state(out / "final")
        if final_state and final_state["step"] == resumed["step"]:  # final/'s state: the run's whole time
            return _finished_summary(final_state, out, accelerator.num_processes)
    if resumed is None and (out / "base").exists() and not (out / RECIPE_FILE).is_file():
        raise DiffutronError(f"{out} holds a base/ folder that no diffutron run wrote: train into another --out")
    if accelerator.is_main_process:
        write_json(out / RECIPE_FILE, to_dict(recipe))
        trim_metrics(metrics_path, resumed["step"] if resumed else -1)

    from accelerate.utils import set_seed

    set_seed(recipe.train.seed)  # LoRA's initial weights, dropout: the same run twice is the same run
    lm = build.build_model(recipe, base_dir=out / "base", write_base=accelerator.is_main_process, fresh=resumed is None)
    accelerator.wait_for_everyone()
    summary = _summary(recipe, lm, accelerator, precision)
    dataset = build.load_training_data(recipe, lm, out)
    build.check_one_batch(len(dataset), recipe, accelerator.num_processes)
    summary["max_length"] = int(dataset[0]["input_ids"].shape[-1])
    summary["sequences"] = len(dataset)

    o = recipe.optim
    optimizer = torch.optim.AdamW(
        [p for p in lm.parameters() if p.requires_grad],
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )
    warmup = o.warmup_steps or int(o.warmup_ratio * recipe.train.max_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[o.schedule]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=recipe.train.max_steps)
    model, optimizer, scheduler = accelerator.prepare(lm, optimizer, scheduler)
    raw_lm = accelerator.unwrap_model(model)
    params = distributed.trainable_parameters(model)  # the live ones: FSDP replaced those above
    summary["wrapper"] = type(model).__name__
    summary["weights_held"] = round(distributed.weights_held(model), 4)

    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "bad_steps": 0, "tokens": 0, "seconds": 0.0}
    state |= distributed.launch_shape(accelerator)
    save_options, load_options = run_state.save_only_what_trains(accelerator, recipe.lora.enabled)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint), **load_options)
        state |= resumed
        summary["resumed_from"] = checkpoint.name
    if recipe.train.trackers:
        flat = flatten(to_dict(recipe)).items()
        accelerator.init_trackers(
            "diffutron", config={k: v if isinstance(v, int | float | str) else str(v) for k, v in flat}
        )
    eval_texts = _eval_texts(recipe)
    base_name = raw_lm.model.peft_config["default"].base_model_name_or_path if recipe.lora.enabled else None
    processes = accelerator.num_processes

    def card() -> str:
        from diffutron.model_card import run_card

        kept = base_name if base_name and base_name != recipe.model.name else None
        return run_card(recipe, state, metrics_path, kept, processes)

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def evaluate(step: int) -> None:
        log(_evaluate(raw_lm, accelerator, eval_texts, recipe, step))

    def save() -> Path:
        state["seconds"] = seconds_before + time.perf_counter() - started
        state["window"] = _saved_window(window)
        return run_state.save_checkpoint(
            accelerator, model, raw_lm, out, state, recipe.train.keep_last, card(), save_options
        )

    if state["step"] == 0 and recipe.train.eval_every and eval_texts:  # the curve's starting point
        evaluate(0)
    stop = {"signal": None}
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(signal="SIGINT"))
    started = time.perf_counter()
    seconds_before = state["seconds"]
    window = _new_window(state.pop("window", None))
    micro, step_tokens, step_bad = 0, 0, False
    try:
        while state["step"] < recipe.train.max_steps and stop["signal"] is None:
            loader = accelerator.prepare(build.epoch_loader(dataset, state["epoch"], recipe))
            batches = (
                accelerator.skip_first_batches(loader, state["micro_in_epoch"]) if state["micro_in_epoch"] else loader
            )
            for batch in batches:
                record_batch(batch, state, accelerator.process_index)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        generator = mask_generator(recipe.train.seed, state["step"], micro, accelerator.process_index)
                        output = compute_loss(raw_lm, model, batch, recipe, generator)
                    loss = output.loss.detach().float()
                    finite = bool(torch.isfinite(loss))
                    # how many processes have a finite loss, and their sum: every process decides alike
                    totals = accelerator.reduce(
                        torch.stack([torch.tensor(float(finite)), loss.cpu() if finite else torch.tensor(0.0)]).to(
                            accelerator.device
                        ),
                        "sum",
                    )
                    if int(totals[0]) == processes:
                        accelerator.backward(output.loss)  # outside autocast, as PyTorch recommends
                        window["losses"].append(float(totals[1]) / processes)
                    else:  # a non-finite loss anywhere: the whole optimizer step is dropped everywhere
                        step_bad = True
                    if accelerator.sync_gradients:
                        if step_bad:
                            state["bad_steps"] += 1
                            window["non_finite"] += 1
                            if state["bad_steps"] > recipe.train.max_bad_steps:
                                raise DiffutronError(
                                    f"{state['bad_steps']} steps with non-finite losses: stopping (lower the "
                                    "learning rate, or check the data)"
                                )
                        else:
                            if recipe.train.max_grad_norm > 0:
                                norm = accelerator.clip_grad_norm_(params, recipe.train.max_grad_norm)
                                if norm is not None:  # before clipping, over every process's gradients
                                    window["grad_norms"].append(float(norm))
                            optimizer.step()
                        scheduler.step()  # the schedule follows the step count, dropped steps included
                        optimizer.zero_grad()
                micro += 1
                state["micro_in_epoch"] += 1
                real = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
                step_tokens += int(real) * processes
                if not accelerator.sync_gradients:
                    continue
                state["step"] += 1
                micro, step_bad = 0, False
                step = state["step"]
                state["tokens"] += step_tokens
                window["tokens"] += step_tokens
                step_tokens = 0
                if step % recipe.train.log_every == 0 or step == recipe.train.max_steps:
                    losses = window["losses"]
                    record = {
                        "step": step,
                        "loss": sum(losses) / len(losses) if losses else None,
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": window["tokens"] / (time.perf_counter() - window["started"]),
                        "tokens": state["tokens"],
                        "bad_steps": state["bad_steps"],
                    }
                    if window["grad_norms"]:
                        record["grad_norm"] = sum(window["grad_norms"]) / len(window["grad_norms"])
                    if window["non_finite"]:
                        record["non_finite_steps"] = window["non_finite"]
                    log(record)
                    if progress and accelerator.is_main_process:
                        shown = record if losses else record | {"loss": float("nan")}
                        progress({**shown, "max_steps": recipe.train.max_steps})
                    window = _new_window()
                run_state.fault_point("step", step)
                if recipe.train.eval_every and step % recipe.train.eval_every == 0 and eval_texts:
                    evaluate(step)
                if step % recipe.train.save_every == 0 and step < recipe.train.max_steps:
                    save()
                if step >= recipe.train.max_steps or stop["signal"] is not None:
                    break
            else:
                state["epoch"] += 1
                state["micro_in_epoch"] = 0
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    if stop["signal"] is not None:  # Ctrl-C: save where we are, say how to go on
        path = save()
        summary.update(interrupted=True, checkpoint=str(path), step=state["step"])
        return summary
    if resumed is None or resumed["step"] < recipe.train.max_steps:  # else: saved and evaluated already
        if eval_texts and (not recipe.train.eval_every or state["step"] % recipe.train.eval_every):
            evaluate(state["step"])
        save()
    state["seconds"] = seconds_before + time.perf_counter() - started
    state.pop("window", None)
    run_state.save_final(accelerator, model, raw_lm, out, state, card())
    if accelerator.is_main_process and recipe.train.plot:
        from diffutron.plots import plot_metrics

        plot_metrics(metrics_path, out / "curves.png")
    summary["replicas_in_sync"] = distributed.replicas_in_sync(accelerator, model)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary.update(
        step=state["step"],
        seconds=time.perf_counter() - started,
        train_seconds=state["seconds"],  # over every session of the run
        final=str(out / "final"),
        bad_steps=state["bad_steps"],
        final_loss=_last_loss(metrics_path),
    )
    return summary


def _eval_texts(recipe: TrainRecipe) -> list[str]:
    if not recipe.data.eval:
        return []
    from diffutron.data.sources import read_documents

    return [d.text for d in read_documents(recipe.data.eval)][: recipe.data.eval_documents]


@torch.no_grad()
def _evaluate(lm, accelerator, texts: list[str], recipe: TrainRecipe, step: int) -> dict:
    """Held-out PPL@15% and the ELBO bound, the documents split across the processes (same figures as one)."""
    from diffutron.evaluate import evaluate

    lm.eval()
    try:
        result = evaluate(
            lm,
            texts,
            mask_ratio=0.15,
            samples=1,
            elbo_samples=2,
            seed=0,
            batch_size=recipe.data.eval_batch_size,
            shard=distributed.evaluation_shard(accelerator),
        )
    finally:
        lm.train()
    return {
        "step": step,
        "eval_ppl": result.ppl,
        "eval_elbo_ppl": result.elbo_ppl,
        "eval_top1": result.top1,
        "eval_tokens": result.tokens,
    }


def _last_loss(path: Path) -> float | None:
    from diffutron.model_card import last_metrics

    row, _ = last_metrics(path)
    return row["loss"] if row else None
