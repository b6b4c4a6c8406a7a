"""Typed configuration: dataclasses loaded from YAML, unknown keys rejected with the valid ones listed.

    recipe = load_config(DataRecipe, "configs/data/diffutron-cpt.yaml")
    recipe = override(recipe, {"pack.max_length": 256})

Nested dataclasses, lists of dataclasses and Optional fields are built from plain YAML mappings.
The training recipe (`TrainRecipe`) lives here too: its `validate()` checks every value, ranges and
finiteness included, before any model or data loads; `resume_conflicts` says which of its settings
a resumed run may not change.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from diffutron.errors import UsageError

T = TypeVar("T")
# words YAML 1.1 reads as booleans; a text field gets them back as text from parse_value
BOOLEAN_WORDS = {"yes": True, "no": False, "on": True, "off": False, "true": True, "false": False}


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a mapping; nested mappings become nested dataclasses."""
    data = data or {}
    if not isinstance(data, dict):
        raise UsageError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(
            f"{where or cls.__name__}: unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
            f"valid keys: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], value, f"{where}{name}") for name, value in data.items()}
    return cls(**values)


def _convert(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in args if a is not type(None)]
        hint, origin, args = options[0], typing.get_origin(options[0]), typing.get_args(options[0])
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where + ".")
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise UsageError(f"{where}: expected a list")
        return [from_dict(args[0], item, f"{where}[{i}].") for i, item in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 2e-3 (no dot) as text
            return float(value)
        except ValueError:
            pass
    if hint is bool and isinstance(value, str) and value.lower() in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[value.lower()]
    if hint is str and isinstance(value, bool):
        # YAML 1.1 reads no/yes/off/on as booleans
        raise UsageError(f"{where}: expected text, got {value!r} (YAML reads no/yes/on/off as booleans: quote it)")
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise UsageError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def parse_value(text: str):
    """A command-line value: YAML (numbers, lists, null), but yes/no/on/off stay text until a field's
    type says otherwise, so `--set train.precision=no` means the text and `--set train.plot=no` False."""
    if text.strip().lower() in BOOLEAN_WORDS.keys() - {"true", "false"}:
        return text.strip()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"{text!r} is not a valid value ({str(e).splitlines()[0]})") from None


def load_config(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(cls, data, where=f"{path.name}: ")


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def override(config: T, changes: dict[str, Any]) -> T:
    """A copy of `config` with dotted keys ("pack.max_length") replaced (None sets a field to None)."""
    data = to_dict(config)
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return from_dict(type(config), data)


# -- the training recipe ---------------------------------------------------------------------------
PRECISIONS = ("auto", "bf16", "fp16", "fp32", "no")
OBJECTIVES = ("mdlm", "mlm", "sft")
LR_SCHEDULES = ("cosine", "linear", "constant")


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
    # the run's length in tokens: when set, max_steps follows from it and the number of processes, so a
    # recipe trains on as many tokens on 1 GPU as on 8
    max_tokens: int | None = None
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
    # how long a process may wait for the others (a collective, a barrier) before the run fails
    timeout_minutes: float = 30.0


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
        """Every value checked (types by from_dict, here names, ranges and finiteness), before anything loads."""
        from diffutron.objective import NORMALIZATIONS, WEIGHTINGS
        from diffutron.schedules import SCHEDULES

        flat = flatten(to_dict(self))
        choices = {
            "objective.kind": OBJECTIVES,
            "objective.schedule": tuple(SCHEDULES),
            "objective.weighting": WEIGHTINGS,
            "objective.normalization": NORMALIZATIONS,
            "optim.schedule": LR_SCHEDULES,
            "train.precision": PRECISIONS,
        }
        for key, allowed in choices.items():
            if flat[key] not in allowed:
                raise UsageError(f"{key} must be one of {', '.join(allowed)}, got {flat[key]!r}")
        for key, value in flat.items():  # every float finite, even where no range is set
            numbers = value if isinstance(value, list) else [value]
            for number in numbers:
                if isinstance(number, float) and not math.isfinite(number):
                    raise UsageError(f"{key} must be a finite number, got {number}")
        for key, interval in RANGES.items():
            value = flat[key]
            numbers = value if isinstance(value, list) else [] if value is None else [value]
            for number in numbers:
                if not _within(number, interval):
                    raise UsageError(f"{key} must be in {interval}, got {number!r}")
        if len(self.optim.betas) != 2:
            raise UsageError(f"optim.betas must be two numbers, got {self.optim.betas!r}")
        if self.objective.kind == "sft" and not self.data.sft:
            raise UsageError("an SFT recipe needs data.sft (a JSONL of prompt/response records)")
        if self.objective.kind != "sft" and not (self.data.dataset or self.data.recipe):
            raise UsageError("name the training data: data.dataset (a prepared folder) or data.recipe")


# Ranges of the recipe's numbers, as intervals; a list (optim.betas) is checked element by element.
RANGES = {
    "objective.eps": "(0, 1)",
    "objective.mlm_ratio": "(0, 1]",
    "objective.ce_chunk": "[1, inf)",
    "lora.r": "[1, inf)",
    "lora.alpha": "(0, inf)",
    "lora.dropout": "[0, 1)",
    "optim.lr": "(0, inf)",
    "optim.weight_decay": "[0, inf)",
    "optim.betas": "[0, 1)",
    "optim.eps": "(0, inf)",
    "optim.warmup_steps": "[0, inf)",
    "optim.warmup_ratio": "[0, 1)",
    "train.max_steps": "[1, inf)",
    "train.max_tokens": "[1, inf)",
    "train.batch_size": "[1, inf)",
    "train.grad_accum": "[1, inf)",
    "train.max_grad_norm": "[0, inf)",  # 0: no clipping
    "train.log_every": "[1, inf)",
    "train.eval_every": "[0, inf)",  # 0: at the end only
    "train.save_every": "[1, inf)",
    "train.keep_last": "[0, inf)",  # 0: keep every checkpoint
    "train.max_bad_steps": "[0, inf)",
    "train.timeout_minutes": "(0, inf)",
    "data.eval_documents": "[1, inf)",
    "data.eval_batch_size": "[1, inf)",
    "sft.max_length": "[2, inf)",
}
# What a resumed run may change: how long, how often it logs, evaluates and saves, where it reports,
# and how it computes (precision, checkpointing) -- not what it learns from or how it steps.
RESUMABLE = (
    "train.out",
    "train.max_steps",
    "train.max_tokens",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_last",
    "train.max_bad_steps",
    "train.trackers",
    "train.plot",
    "train.timeout_minutes",
    "train.precision",
    "model.gradient_checkpointing",
    "data.eval",
    "data.eval_documents",
    "data.eval_batch_size",
)


def _within(number, interval: str) -> bool:
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = low <= number if interval[0] == "[" else low < number
    below = number <= high if interval[-1] == "]" else number < high
    return above and below


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """The recipe keys (dotted) that differ between a run's saved recipe and the current one and that a
    resumed run may not change; keys one side lacks (a newer recipe) count only if the other sets them."""
    old, new = flatten(saved), flatten(current)
    keys = sorted((old.keys() | new.keys()) - set(RESUMABLE))
    return [key for key in keys if old.get(key) != new.get(key)]
