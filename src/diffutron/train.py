"""One training loop on accelerate: CPT under the MDLM objective, fixed-ratio MLM, or SFT; LoRA or full.

The same code runs on a CPU, one GPU, or many (`accelerate launch`, DDP / FSDP / DeepSpeed through
accelerate's config files in configs/accelerate/). A run folder holds

    metrics.jsonl          one JSON object per logged step and per evaluation
    checkpoint-<step>/     accelerate state (model, optimizer, scheduler, RNG) + model/ (HF folder or
                           peft adapter) + trainer_state.json; written to a temporary folder and renamed
    final/                 the model at the end, as an HF folder or adapter (what `export` reads)
    curves.png             loss and held-out PPL curves

Rerunning the same command on the same folder resumes from the newest complete checkpoint: weights,
optimizer, scheduler, RNG states and the position in the data, so a run killed and resumed ends
where an uninterrupted one does. The masks of step s come from a generator seeded by (seed, s, rank).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffutron.errors import DiffutronError, UsageError

PRECISIONS = ("auto", "bf16", "fp16", "fp32", "no")
OBJECTIVES = ("mdlm", "mlm", "sft")


@dataclass
class ModelSection:
    name: str = "preset:tiny"  # a folder, hub id or preset:NAME
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    dataset: str | None = None  # a folder written by `diffutron data prepare`
    recipe: str | None = None  # ... or a data recipe, prepared on the fly into <out>/data
    sft: str | None = None  # SFT: a JSONL file of prompt/response or messages records
    eval: str | None = "bundled:heldout"  # held-out text for eval_ppl / eval_elbo_ppl
    eval_documents: int = 64  # the first N documents of it
    eval_batch_size: int = 8


@dataclass
class ObjectiveSection:
    kind: str = "mdlm"  # mdlm | mlm | sft
    schedule: str = "linear"
    weighting: str = "elbo"  # elbo | uniform
    normalization: str = "token"  # token | sequence | masked
    eps: float = 1e-3
    antithetic: bool = True
    mlm_ratio: float = 0.15  # for kind: mlm
    ce_chunk: int = 256  # masked positions per chunk of the cross-entropy


@dataclass
class LoraSection:
    enabled: bool = True  # false: full fine-tuning
    r: int = 256
    alpha: int = 256
    dropout: float = 0.0
    targets: list[str] | str = "default"
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)


@dataclass
class TrainSection:
    out: str = "runs/run"
    max_steps: int = 1000
    batch_size: int = 8  # sequences per process per micro-batch
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32 (alias: no)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: at the end only
    save_every: int = 500
    keep_last: int = 2
    max_bad_steps: int = 20  # non-finite losses skipped before the run stops
    trackers: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, ...
    plot: bool = True


@dataclass
class SFTSection:
    max_length: int = 512


@dataclass
class TrainRecipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    lora: LoraSection = field(default_factory=LoraSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    sft: SFTSection = field(default_factory=SFTSection)

    def validate(self) -> None:
        if self.objective.kind not in OBJECTIVES:
            raise UsageError(f"objective.kind must be one of {', '.join(OBJECTIVES)}, got {self.objective.kind!r}")
        if self.objective.kind == "sft" and not self.data.sft:
            raise UsageError("an SFT recipe needs data.sft (a JSONL of prompt/response records)")
        if self.objective.kind != "sft" and not (self.data.dataset or self.data.recipe):
            raise UsageError("name the training data: data.dataset (a prepared folder) or data.recipe")
        if self.train.max_steps < 1 or self.train.batch_size < 1 or self.train.grad_accum < 1:
            raise UsageError("max_steps, batch_size and grad_accum must be at least 1")
        if self.train.precision not in PRECISIONS:
            raise UsageError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.train.precision!r}")


# -- building blocks -------------------------------------------------------------------------------
def build_model(recipe: TrainRecipe, skeleton: bool = False):
    """The model to train, in fp32 (autocast handles bf16); `skeleton`: on the meta device, for counts."""
    from diffutron.lora import LoraSettings, apply_lora
    from diffutron.model import DiffusionLM

    remote = recipe.model.trust_remote_code
    if skeleton:
        lm = DiffusionLM.skeleton(recipe.model.name, trust_remote_code=remote)
    else:
        lm = DiffusionLM.from_pretrained(recipe.model.name, device="cpu", dtype=torch.float32, trust_remote_code=remote)
    if recipe.lora.enabled:
        lora = recipe.lora
        try:
            lm.model = apply_lora(
                lm.model, LoraSettings(lora.r, lora.alpha, lora.dropout, lora.targets, list(lora.modules_to_save))
            )
        except ValueError as err:
            raise UsageError(str(err).splitlines()[0]) from err
        # peft names the base by its path; presets are rebuilt from their name
        lm.model.peft_config["default"].base_model_name_or_path = recipe.model.name
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


# -- checkpoints -----------------------------------------------------------------------------------
def _checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a complete one has trainer_state.json, written last)."""
    found = [
        p
        for p in out.glob("checkpoint-*")
        if p.is_dir() and p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _save_checkpoint(accelerator, lm, out: Path, state: dict, keep_last: int) -> Path:
    final = out / f"checkpoint-{state['step']}"
    tmp = out / f".tmp-checkpoint-{state['step']}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        accelerator.unwrap_model(lm).save_pretrained(tmp / "model")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in _checkpoints(out)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# -- the loop --------------------------------------------------------------------------------------
def train(recipe: TrainRecipe, progress: Callable[[dict], None] | None = None, dry_run: bool = False) -> dict:
    """Train (or, with dry_run, build everything and describe it). Returns a summary dict."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from diffutron.lora import count_parameters

    recipe.validate()
    out = Path(recipe.train.out)
    precision = recipe.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    precision = {"fp32": "no"}.get(precision, precision)  # accelerate's spelling
    # cpu=True without CUDA: several processes on a CPU machine (torchrun) then use gloo DDP
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=recipe.train.grad_accum,
        mixed_precision=precision,
        log_with=recipe.train.trackers or None,
        project_dir=str(out),
    )
    set_seed(recipe.train.seed)
    lm = build_model(recipe, skeleton=dry_run)
    total, trainable = count_parameters(lm.model)
    summary = {
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
        "precision": precision,
        "out": str(out),
    }
    prepared = recipe.data.dataset and (Path(recipe.data.dataset) / "state.json").is_file()
    if dry_run and recipe.objective.kind != "sft" and not prepared and recipe.data.recipe:
        # a dry run never prepares data: the recipe's max length says what the sequences will be
        from diffutron.config import load_config
        from diffutron.data.prepare import DataRecipe

        summary["max_length"] = load_config(DataRecipe, recipe.data.recipe).pack.max_length
    else:
        with accelerator.main_process_first():  # one process prepares data on the fly, the others read it
            dataset = load_training_data(recipe, lm, out)
        summary["max_length"] = int(dataset[0]["input_ids"].shape[-1])
        summary["sequences"] = len(dataset)
    tokens_per_step = (
        summary["max_length"] * recipe.train.batch_size * recipe.train.grad_accum * accelerator.num_processes
    )
    summary["tokens_per_step"] = tokens_per_step
    summary["total_tokens"] = tokens_per_step * recipe.train.max_steps
    if dry_run:
        return summary
    if len(dataset) < recipe.train.batch_size * accelerator.num_processes:
        raise DiffutronError(f"the data holds {len(dataset)} sequences, fewer than one batch")

    o = recipe.optim
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    warmup = o.warmup_steps or int(o.warmup_ratio * recipe.train.max_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}.get(o.schedule)
    if name is None:
        raise UsageError(f"optim.schedule must be cosine, linear or constant, got {o.schedule!r}")
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=recipe.train.max_steps)
    model, optimizer, scheduler = accelerator.prepare(lm, optimizer, scheduler)
    raw_lm = accelerator.unwrap_model(model)

    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "bad_steps": 0, "tokens": 0}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    checkpoints = _checkpoints(out)
    if checkpoints:
        accelerator.load_state(str(checkpoints[-1]))
        state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
        summary["resumed_from"] = checkpoints[-1].name
    if recipe.train.trackers:
        accelerator.init_trackers("diffutron", config=_flat(asdict(recipe)))
    eval_texts = _eval_texts(recipe)
    metrics_path = out / "metrics.jsonl"
    stop = {"signal": None}
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(signal="SIGINT"))
    started, step_started, tokens_window, loss_window = time.perf_counter(), time.perf_counter(), 0, []
    micro, step_tokens = 0, 0
    try:
        while state["step"] < recipe.train.max_steps and stop["signal"] is None:
            loader = accelerator.prepare(_epoch_loader(dataset, state["epoch"], recipe))
            batches = (
                accelerator.skip_first_batches(loader, state["micro_in_epoch"]) if state["micro_in_epoch"] else loader
            )
            for batch in batches:
                with accelerator.accumulate(model), accelerator.autocast():
                    generator = _mask_generator(recipe.train.seed, state["step"], micro, accelerator.process_index)
                    output = compute_loss(raw_lm, model, batch, recipe, generator)
                    finite = accelerator.reduce(torch.isfinite(output.loss.detach()).float()[None], "sum").item()
                    if finite == accelerator.num_processes:
                        accelerator.backward(output.loss)
                        if accelerator.sync_gradients and recipe.train.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(params, recipe.train.max_grad_norm)
                        loss_window.append(output.loss.item())
                    else:  # skip: every process drops this micro-batch's gradient
                        optimizer.zero_grad()
                        state["bad_steps"] += 1
                        if state["bad_steps"] > recipe.train.max_bad_steps:
                            raise DiffutronError(
                                f"{state['bad_steps']} non-finite losses: stopping (lower the "
                                "learning rate, or check the data)"
                            )
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                micro += 1
                state["micro_in_epoch"] += 1
                real = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
                step_tokens += int(real) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                state["step"] += 1
                micro = 0
                step = state["step"]
                state["tokens"] += step_tokens
                tokens_window += step_tokens
                step_tokens = 0
                if step % recipe.train.log_every == 0 or step == recipe.train.max_steps:
                    elapsed = time.perf_counter() - step_started
                    record = {
                        "step": step,
                        "loss": sum(loss_window) / max(len(loss_window), 1),
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": tokens_window / elapsed,
                        "tokens": state["tokens"],
                        "bad_steps": state["bad_steps"],
                    }
                    _log(accelerator, metrics_path, record)
                    if progress and accelerator.is_main_process:
                        progress({**record, "max_steps": recipe.train.max_steps})
                    step_started, tokens_window, loss_window = time.perf_counter(), 0, []
                if recipe.train.eval_every and step % recipe.train.eval_every == 0 and eval_texts:
                    _log(accelerator, metrics_path, _evaluate(raw_lm, eval_texts, recipe, step))
                if step % recipe.train.save_every == 0 and step < recipe.train.max_steps:
                    _save_checkpoint(accelerator, model, out, state, recipe.train.keep_last)
                    _test_hook_kill(step)
                if step >= recipe.train.max_steps or stop["signal"] is not None:
                    break
            else:
                state["epoch"] += 1
                state["micro_in_epoch"] = 0
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    if stop["signal"] is not None:  # Ctrl-C: save where we are, say how to go on
        path = _save_checkpoint(accelerator, model, out, state, recipe.train.keep_last)
        summary.update(interrupted=True, checkpoint=str(path), step=state["step"])
        return summary
    if eval_texts and (not recipe.train.eval_every or state["step"] % recipe.train.eval_every):
        _log(accelerator, metrics_path, _evaluate(raw_lm, eval_texts, recipe, state["step"]))
    _save_checkpoint(accelerator, model, out, state, recipe.train.keep_last)
    if accelerator.is_main_process:
        final = out / "final"
        tmp = out / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        raw_lm.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if recipe.train.plot:
            from diffutron.plots import plot_metrics

            plot_metrics(metrics_path, out / "curves.png")
    summary["replicas_in_sync"] = _replicas_in_sync(accelerator, params)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary.update(
        step=state["step"],
        seconds=time.perf_counter() - started,
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
    return {"step": step, "eval_ppl": result.ppl, "eval_elbo_ppl": result.elbo_ppl, "eval_top1": result.top1}


def _log(accelerator, path: Path, record: dict) -> None:
    if accelerator.is_main_process:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def _last_loss(path: Path) -> float | None:
    if not path.is_file():
        return None
    losses = [json.loads(line).get("loss") for line in path.read_text().splitlines()]
    losses = [x for x in losses if x is not None]
    return losses[-1] if losses else None


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def _test_hook_kill(step: int) -> None:
    """Tests simulate a crash right after a checkpoint: DIFFUTRON_TEST_KILL_AFTER_SAVE=<step>."""
    if os.environ.get("DIFFUTRON_TEST_KILL_AFTER_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
