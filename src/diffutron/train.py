"""One training loop on accelerate: CPT under the MDLM objective, fixed-ratio MLM, or SFT; LoRA or full.

The same code runs on a CPU, one GPU, or many (`accelerate launch`, DDP / FSDP / DeepSpeed through
accelerate's config files in configs/accelerate/). A run folder (run_folder.py) holds

    recipe.json            the resolved recipe; a resume with other settings is refused
    metrics.jsonl          one JSON object per logged step and per evaluation, each step once
    checkpoint-<step>/     accelerate state (model, optimizer, scheduler, RNG) + model/ (HF folder or
                           peft adapter) + trainer_state.json; written to a temporary folder and renamed
    final/                 the model at the end, as an HF folder or adapter, with its model card
    base/                  for LoRA on a base that exists nowhere else (a preset's random weights, an
                           adapter folder merged into its base): that base, which the adapters name
    curves.png             loss and held-out PPL curves

Rerunning the same command on the same folder resumes from the newest complete checkpoint: weights,
optimizer, scheduler, RNG states and the position in the data, so a run killed and resumed ends
where an uninterrupted one does. The masks of step s come from a generator seeded by (seed, s, rank).
One process trains in a run folder at a time (a lock); a finished run is reported, not retrained.
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
from diffutron.config import TrainRecipe, flatten, override, resume_conflicts, to_dict
from diffutron.errors import DiffutronError, UsageError
from diffutron.run_folder import (
    COMPLETE_MARKER,
    RECIPE_FILE,
    RunLock,
    checkpoints,
    prune,
    publish,
    read_state,
    recover,
    trim_metrics,
)

PRECISION_NAMES = {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


# -- the recipe's model and data -------------------------------------------------------------------
def resolve_paths(recipe: TrainRecipe) -> TrainRecipe:
    """The recipe with local paths made absolute (adapters and recipe.json then hold paths that work from
    any directory; hub ids and presets stay names) and shipped model names (`tiny-base`) as their folders."""
    from diffutron.assets import MODELS, shipped_model

    def absolute(value: str | None) -> str | None:
        return str(Path(value).expanduser().resolve()) if value and Path(value).expanduser().exists() else value

    name = recipe.model.name
    if name in MODELS and not Path(name).exists():
        name = str(shipped_model(name))
    folder = Path(name).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in ("config.json", "adapter_config.json")):
        from diffutron.export import model_folder

        name = str(model_folder(folder))  # a run folder: its final/ model (else its newest checkpoint's)
    return override(
        recipe,
        {
            "model.name": absolute(name),
            "data.dataset": absolute(recipe.data.dataset),
            "data.recipe": absolute(recipe.data.recipe),
            "data.sft": absolute(recipe.data.sft),
            "train.out": str(Path(recipe.train.out).expanduser().resolve()),
        },
    )


def base_exists_elsewhere(name: str) -> bool:
    """Whether plain transformers can load the base by its name: a model folder or a hub id, not a preset
    (random weights diffutron builds) nor an adapter folder (merged into its base in memory)."""
    from diffutron.model import PRESET_PREFIX

    return not (name.startswith(PRESET_PREFIX) or (Path(name) / "adapter_config.json").is_file())


def build_model(
    recipe: TrainRecipe,
    skeleton: bool = False,
    base_dir: Path | None = None,
    write_base: bool = True,
    fresh: bool = True,
):
    """The model to train, in fp32 (autocast handles bf16); `skeleton`: on the meta device, for counts.

    An adapter folder as the model is merged into its base first: LoRA then trains on the merged model
    (or the merged model trains in full). With LoRA on a base that exists nowhere else, the base is
    kept in `base_dir` and the adapter names it: written by the process with `write_base`, anew at a
    `fresh` start (a resume keeps the one its checkpoints were trained on).
    """
    from diffutron.lora import LoraSettings, apply_lora
    from diffutron.model import DiffusionLM

    name, remote = recipe.model.name, recipe.model.trust_remote_code
    if skeleton:
        lm = DiffusionLM.skeleton(name, trust_remote_code=remote)
    else:
        lm = DiffusionLM.from_pretrained(name, device="cpu", dtype=torch.float32, trust_remote_code=remote)
    if hasattr(lm.model, "merge_and_unload"):  # a peft adapter folder: its weights become part of the base
        lm.model = lm.model.merge_and_unload()
    if recipe.lora.enabled:
        base_name = name
        if base_dir is not None and not base_exists_elsewhere(name):
            if write_base and (fresh or not base_dir.is_dir()):
                tmp = base_dir.with_name(f".tmp-{base_dir.name}")
                lm.save_pretrained(tmp)
                publish(tmp, base_dir)
            base_name = str(base_dir.resolve())
        lora = recipe.lora
        try:
            lm.model = apply_lora(
                lm.model, LoraSettings(lora.r, lora.alpha, lora.dropout, lora.targets, list(lora.modules_to_save))
            )
        except ValueError as err:
            raise UsageError(str(err).splitlines()[0]) from err
        lm.model.peft_config["default"].base_model_name_or_path = base_name
    if recipe.model.gradient_checkpointing:
        lm.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if recipe.lora.enabled:
            lm.model.enable_input_require_grads()
    return lm.train()


def load_training_data(recipe: TrainRecipe, lm, out: Path):
    """A map-style dataset of dicts of tensors (input_ids, attention_mask[, prompt_mask])."""
    if recipe.objective.kind == "sft":
        from diffutron.data.sft import load_sft

        tensors = load_sft(recipe.data.sft, lm.tokenizer, min(recipe.sft.max_length, lm.context_length))
        return _TensorDataset(tensors)
    from datasets import load_from_disk

    folder = recipe.data.dataset or str(out / "data")
    if not (Path(folder) / "state.json").is_file():
        if not recipe.data.recipe:
            raise DiffutronError(f"{folder} is not a prepared dataset (run `diffutron data prepare` first)")
        from diffutron.config import load_config
        from diffutron.data.prepare import DataRecipe, prepare

        prepare(load_config(DataRecipe, recipe.data.recipe), folder)
    dataset = load_from_disk(folder).with_format("torch")
    sample = dataset[: min(len(dataset), 64)]["input_ids"]
    if int(sample.max()) >= lm.vocab_size:
        raise DiffutronError(
            f"{folder} holds token ids up to {int(sample.max())}, beyond the model's vocabulary "
            f"of {lm.vocab_size}: prepare it with the model's tokenizer"
        )
    if sample.shape[1] > lm.context_length:
        raise DiffutronError(
            f"{folder} holds sequences of {sample.shape[1]} tokens, more than the model's "
            f"context of {lm.context_length}"
        )
    return dataset


def _check_one_batch(sequences: int, recipe: TrainRecipe, processes: int) -> None:
    needed = recipe.train.batch_size * processes
    if sequences < needed:
        per = f" x {processes} processes" if processes > 1 else ""
        raise UsageError(
            f"the data holds {sequences} sequences, fewer than one batch ({recipe.train.batch_size}{per}): "
            f"lower --batch-size (train.batch_size) or add data"
        )


class _TensorDataset(torch.utils.data.Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index):
        return {k: v[index] for k, v in self.tensors.items()}


def _epoch_loader(dataset, epoch: int, recipe: TrainRecipe):
    """The data of one epoch in a seeded order: the same order again on resume."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(recipe.train.seed * 7919 + epoch))
    subset = torch.utils.data.Subset(dataset, order.tolist())
    return torch.utils.data.DataLoader(subset, batch_size=recipe.train.batch_size, shuffle=False, drop_last=True)


def _mask_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1009 + micro * 31 + rank) % 2**63)


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


# -- saving ----------------------------------------------------------------------------------------
def _fault_point(site: str, step: int) -> None:
    """Fault injection for tests: DIFFUTRON_TEST_KILL=<site>:<step> kills the process (SIGKILL) here."""
    if os.environ.get("DIFFUTRON_TEST_KILL") == f"{site}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _save_model(lm, folder: Path, card: str | None) -> None:
    lm.save_pretrained(folder)
    if card is not None:  # replaces peft's empty template
        (folder / "README.md").write_text(card, encoding="utf-8")


def _save_checkpoint(accelerator, lm, out: Path, state: dict, keep_last: int, card: str) -> Path:
    final = out / f"checkpoint-{state['step']}"
    tmp = out / f".tmp-{final.name}"
    if accelerator.is_main_process and tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's RNG state is in before the folder is marked complete
    if accelerator.is_main_process:
        _save_model(lm, tmp / "model", card)
        _fault_point("checkpoint-written", state["step"])
        write_json(tmp / COMPLETE_MARKER, state)
        publish(tmp, final, between=lambda: _fault_point("checkpoint-swap", state["step"]))
        prune(out, keep_last)
        _fault_point("checkpoint-saved", state["step"])
    accelerator.wait_for_everyone()
    return final


def _save_final(lm, out: Path, state: dict, card: str) -> Path:
    final, tmp = out / "final", out / ".tmp-final"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    _save_model(lm, tmp, card)
    write_json(tmp / COMPLETE_MARKER, state)
    publish(tmp, final, between=lambda: _fault_point("final-swap", state["step"]))
    return final


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


def _on_main_process(accelerator, action: Callable[[], None]) -> None:
    """Run `action` on the main process; a DiffutronError there is raised on every process."""
    from accelerate.utils import broadcast_object_list

    message = [None]
    if accelerator.is_main_process:
        try:
            action()
        except DiffutronError as err:
            message = [(type(err), str(err))]
    if accelerator.num_processes > 1:
        broadcast_object_list(message)
    if message[0] is not None:
        kind, text = message[0]
        raise kind(text)


# -- the loop --------------------------------------------------------------------------------------
def train(recipe: TrainRecipe, progress: Callable[[dict], None] | None = None, dry_run: bool = False) -> dict:
    """Train (or, with dry_run, build everything and describe it). Returns a summary dict.

    A run already finished in `train.out` is not retrained: the summary then has `already_complete`.
    """
    from accelerate import Accelerator

    recipe.validate()
    recipe = resolve_paths(recipe)
    precision = recipe.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    precision = {"fp32": "no"}.get(precision, precision)  # accelerate's spelling
    # cpu=True without CUDA: several processes on a CPU machine (torchrun) then use gloo DDP.
    # The scheduler steps once per optimizer step, by this loop: accelerate's own stepping would step
    # it once per process (it assumes a schedule sized in per-process batches).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=recipe.train.grad_accum,
        mixed_precision=precision,
        log_with=recipe.train.trackers or None,
        project_dir=recipe.train.out,
        step_scheduler_with_optimizer=False,
    )
    if dry_run:
        return _describe(recipe, accelerator, precision)
    out = Path(recipe.train.out)
    lock = RunLock(out)
    _on_main_process(accelerator, lock.acquire)
    try:
        with _quiet():
            return _run(recipe, accelerator, precision, progress)
    finally:
        lock.release()


def _describe(recipe: TrainRecipe, accelerator, precision: str) -> dict:
    """The dry run: the model's counts on the meta device, the data's shape, nothing written."""
    lm = build_model(recipe, skeleton=True)
    summary = _summary(recipe, lm, accelerator, precision)
    prepared = recipe.data.dataset and (Path(recipe.data.dataset) / "state.json").is_file()
    if recipe.objective.kind != "sft" and not prepared and recipe.data.recipe:
        # a dry run never prepares data: the recipe's max length says what the sequences will be
        from diffutron.config import load_config
        from diffutron.data.prepare import DataRecipe

        summary["max_length"] = load_config(DataRecipe, recipe.data.recipe).pack.max_length
    else:
        dataset = load_training_data(recipe, lm, Path(recipe.train.out))
        _check_one_batch(len(dataset), recipe, accelerator.num_processes)
        summary["max_length"] = int(dataset[0]["input_ids"].shape[-1])
        summary["sequences"] = len(dataset)
    tokens_per_step = (
        summary["max_length"] * recipe.train.batch_size * recipe.train.grad_accum * accelerator.num_processes
    )
    return summary | {"tokens_per_step": tokens_per_step, "total_tokens": tokens_per_step * recipe.train.max_steps}


def _summary(recipe: TrainRecipe, lm, accelerator, precision: str) -> dict:
    from diffutron.lora import count_parameters

    total, trainable = count_parameters(lm.model)
    return {
        "model": recipe.model.name,
        "objective": recipe.objective.kind,
        "lora": recipe.lora.enabled,
        "params_total": total,
        "params_trainable": trainable,
        "trainable_percent": round(100 * trainable / total, 2),
        "max_length": None,
        "batch_size": recipe.train.batch_size,
        "grad_accum": recipe.train.grad_accum,
        "processes": accelerator.num_processes,
        "precision": PRECISION_NAMES[precision],
        "out": recipe.train.out,
    }


def _resume_point(recipe: TrainRecipe, out: Path) -> tuple[Path | None, dict | None]:
    """The newest complete checkpoint and its state, after checking that the run's recipe matches."""
    found = checkpoints(out)
    if not found:
        return None, None
    saved = out / RECIPE_FILE
    if saved.is_file():
        conflicts = resume_conflicts(json.loads(saved.read_text(encoding="utf-8")), to_dict(recipe))
        if conflicts:
            raise UsageError(
                f"{out} holds a run with other settings ({', '.join(conflicts)}): resume it with its own "
                f"settings (see {saved}), or train into another --out"
            )
    return found[-1], read_state(found[-1])


def _run(recipe: TrainRecipe, accelerator, precision: str, progress) -> dict:
    from transformers import get_scheduler

    out = Path(recipe.train.out)

    def start() -> None:
        out.mkdir(parents=True, exist_ok=True)
        recover(out)
        prune(out, recipe.train.keep_last)  # a kill may have come between a save and its pruning

    _on_main_process(accelerator, start)
    accelerator.wait_for_everyone()
    checkpoint, resumed = _resume_point(recipe, out)
    metrics_path = out / "metrics.jsonl"
    if resumed and resumed["step"] >= recipe.train.max_steps:
        final_state = read_state(out / "final")
        if final_state and final_state["step"] == resumed["step"]:
            return {
                "already_complete": True,
                "step": resumed["step"],
                "seconds": resumed.get("seconds"),
                "train_seconds": resumed.get("seconds"),
                "final": str(out / "final"),
                "final_loss": _last_loss(metrics_path),
                "bad_steps": resumed.get("bad_steps", 0),
                "out": str(out),
                "processes": accelerator.num_processes,
            }
    if resumed is None and (out / "base").exists() and not (out / RECIPE_FILE).is_file():
        raise DiffutronError(f"{out} holds a base/ folder that no diffutron run wrote: train into another --out")
    if accelerator.is_main_process:
        write_json(out / RECIPE_FILE, to_dict(recipe))
        trim_metrics(metrics_path, resumed["step"] if resumed else -1)

    from accelerate.utils import set_seed

    set_seed(recipe.train.seed)  # LoRA's initial weights, dropout: the same run twice is the same run
    lm = build_model(recipe, base_dir=out / "base", write_base=accelerator.is_main_process, fresh=resumed is None)
    accelerator.wait_for_everyone()
    summary = _summary(recipe, lm, accelerator, precision)
    with accelerator.main_process_first():  # one process prepares data on the fly, the others read it
        dataset = load_training_data(recipe, lm, out)
    _check_one_batch(len(dataset), recipe, accelerator.num_processes)
    summary["max_length"] = int(dataset[0]["input_ids"].shape[-1])
    summary["sequences"] = len(dataset)

    o = recipe.optim
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    warmup = o.warmup_steps or int(o.warmup_ratio * recipe.train.max_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[o.schedule]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=recipe.train.max_steps)
    model, optimizer, scheduler = accelerator.prepare(lm, optimizer, scheduler)
    raw_lm = accelerator.unwrap_model(model)

    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "bad_steps": 0, "tokens": 0, "seconds": 0.0}
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
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

    if state["step"] == 0 and recipe.train.eval_every and eval_texts:  # the curve's starting point
        log(_evaluate(raw_lm, eval_texts, recipe, 0))
    stop = {"signal": None}
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(signal="SIGINT"))
    started = time.perf_counter()
    seconds_before = state["seconds"]
    window = {"started": time.perf_counter(), "tokens": 0, "losses": [], "non_finite": 0}
    micro, step_tokens, step_bad = 0, 0, False
    try:
        while state["step"] < recipe.train.max_steps and stop["signal"] is None:
            loader = accelerator.prepare(_epoch_loader(dataset, state["epoch"], recipe))
            batches = (
                accelerator.skip_first_batches(loader, state["micro_in_epoch"]) if state["micro_in_epoch"] else loader
            )
            for batch in batches:
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        generator = _mask_generator(recipe.train.seed, state["step"], micro, accelerator.process_index)
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
                                accelerator.clip_grad_norm_(params, recipe.train.max_grad_norm)
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
                    if window["non_finite"]:
                        record["non_finite_steps"] = window["non_finite"]
                    log(record)
                    if progress and accelerator.is_main_process:
                        shown = record if losses else record | {"loss": float("nan")}
                        progress({**shown, "max_steps": recipe.train.max_steps})
                    window = {"started": time.perf_counter(), "tokens": 0, "losses": [], "non_finite": 0}
                _fault_point("step", step)
                if recipe.train.eval_every and step % recipe.train.eval_every == 0 and eval_texts:
                    log(_evaluate(raw_lm, eval_texts, recipe, step))
                if step % recipe.train.save_every == 0 and step < recipe.train.max_steps:
                    state["seconds"] = seconds_before + time.perf_counter() - started
                    _save_checkpoint(accelerator, raw_lm, out, state, recipe.train.keep_last, card())
                if step >= recipe.train.max_steps or stop["signal"] is not None:
                    break
            else:
                state["epoch"] += 1
                state["micro_in_epoch"] = 0
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    state["seconds"] = seconds_before + time.perf_counter() - started
    if stop["signal"] is not None:  # Ctrl-C: save where we are, say how to go on
        path = _save_checkpoint(accelerator, raw_lm, out, state, recipe.train.keep_last, card())
        summary.update(interrupted=True, checkpoint=str(path), step=state["step"])
        return summary
    if resumed is None or resumed["step"] < recipe.train.max_steps:  # else: saved and evaluated already
        if eval_texts and (not recipe.train.eval_every or state["step"] % recipe.train.eval_every):
            log(_evaluate(raw_lm, eval_texts, recipe, state["step"]))
        _save_checkpoint(accelerator, raw_lm, out, state, recipe.train.keep_last, card())
    if accelerator.is_main_process:
        _save_final(raw_lm, out, state, card())
        if recipe.train.plot:
            from diffutron.plots import plot_metrics

            plot_metrics(metrics_path, out / "curves.png")
    summary["replicas_in_sync"] = _replicas_in_sync(accelerator, params)
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


def _replicas_in_sync(accelerator, params: list[torch.Tensor]) -> bool:
    """Every process holds the same trainable weights (a checksum per process, gathered)."""
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in params]).sum()[None].to(accelerator.device)
    sums = accelerator.gather(checksum)
    return bool((sums == sums[0]).all())


def _eval_texts(recipe: TrainRecipe) -> list[str]:
    if not recipe.data.eval:
        return []
    from diffutron.data.sources import read_documents

    return [d.text for d in read_documents(recipe.data.eval)][: recipe.data.eval_documents]


@torch.no_grad()
def _evaluate(lm, texts: list[str], recipe: TrainRecipe, step: int) -> dict:
    from diffutron.evaluate import evaluate

    lm.eval()
    try:
        result = evaluate(
            lm, texts, mask_ratio=0.15, samples=1, elbo_samples=2, seed=0, batch_size=recipe.data.eval_batch_size
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
