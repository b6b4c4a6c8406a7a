"""What a training recipe builds: the model (LoRA or full, on its base) and the data, in a seeded order."""

from __future__ import annotations

from pathlib import Path

import torch

from diffutron.config import TrainRecipe, override
from diffutron.errors import DiffutronError, UsageError
from diffutron.run_folder import publish


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
        hf = lm.hf_model  # transformers >= 5.2x names it activation checkpointing (the old name warns)
        if hasattr(hf, "activation_checkpointing_enable"):
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if recipe.lora.enabled:
            lm.model.enable_input_require_grads()
    return lm.train()


def describe_model(recipe: TrainRecipe, lm) -> dict:
    """The model a recipe trains, in numbers (each tied tensor counted once)."""
    from diffutron.lora import count_parameters

    total, trainable = count_parameters(lm.model)
    return {
        "model": recipe.model.name,
        "objective": recipe.objective.kind,
        "lora": recipe.lora.enabled,
        "params_total": total,
        "params_trainable": trainable,
        "trainable_percent": round(100 * trainable / total, 2),
    }


def prepared_folder(recipe: TrainRecipe, out: Path) -> Path:
    """Where the recipe's prepared data is: data.dataset, else <out>/data (prepared on the fly)."""
    return Path(recipe.data.dataset or out / "data")


def is_prepared(folder: Path) -> bool:
    return (Path(folder) / "state.json").is_file()


def prepare_data_once(recipe: TrainRecipe, out: Path) -> None:
    """Prepare data.recipe into the recipe's folder if it is not prepared yet (CPT and MLM recipes), one
    process at a time (a file lock in the run folder): under `accelerate launch` the first process prepares
    and the others, waiting on the lock, find the folder prepared. Called before the process group forms,
    so no process waits at a barrier meanwhile (whose timeout a large corpus would outlast)."""
    import fcntl
    import os
    import time

    folder = prepared_folder(recipe, out)
    if recipe.objective.kind == "sft" or is_prepared(folder) or not recipe.data.recipe:
        return  # nothing to prepare (load_training_data says if the folder is not a prepared dataset)
    from diffutron.config import load_config
    from diffutron.data.prepare import DataRecipe, prepare

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".data.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_prepared(folder):
            time.sleep(float(os.environ.get("DIFFUTRON_TEST_PREPARE_DELAY", "0")))  # tests: a slow preparation
            prepare(load_config(DataRecipe, recipe.data.recipe), folder)


def load_training_data(recipe: TrainRecipe, lm, out: Path):
    """A map-style dataset of dicts of tensors (input_ids, attention_mask[, prompt_mask]); CPT and MLM data
    from its prepared folder (prepare_data_once)."""
    if recipe.objective.kind == "sft":
        from diffutron.data.sft import load_sft

        tensors = load_sft(recipe.data.sft, lm.tokenizer, min(recipe.sft.max_length, lm.context_length))
        return TensorDataset(tensors)
    from datasets import load_from_disk

    folder = prepared_folder(recipe, out)
    if not is_prepared(folder):
        raise DiffutronError(f"{folder} is not a prepared dataset (run `diffutron data prepare` first)")
    dataset = load_from_disk(str(folder)).with_format("torch")
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


def check_one_batch(sequences: int, recipe: TrainRecipe, processes: int) -> None:
    needed = recipe.train.batch_size * processes
    if sequences < needed:
        per = f" x {processes} processes" if processes > 1 else ""
        raise UsageError(
            f"the data holds {sequences} sequences, fewer than one batch ({recipe.train.batch_size}{per}): "
            f"lower --batch-size (train.batch_size) or add data"
        )


class TensorDataset(torch.utils.data.Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index):
        return {k: v[index] for k, v in self.tensors.items()}


class _Numbered(torch.utils.data.Dataset):
    """The dataset in a given order, each item with its place in the dataset (`index`): which sequences a
    step trained on can be told (DIFFUTRON_RECORD_BATCHES, loop.py)."""

    def __init__(self, dataset, order: list[int]):
        self.dataset, self.order = dataset, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[self.order[i]], "index": self.order[i]}


def epoch_loader(dataset, epoch: int, recipe: TrainRecipe):
    """The data of one epoch in a seeded order: the same order again on resume."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(recipe.train.seed * 7919 + epoch))
    numbered = _Numbered(dataset, order.tolist())
    return torch.utils.data.DataLoader(numbered, batch_size=recipe.train.batch_size, shuffle=False, drop_last=True)
