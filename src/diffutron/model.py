"""DiffusionLM: a Hugging Face masked-LM encoder and its tokenizer, seen as a masked diffusion model.

The encoder runs on the whole sequence; the prediction head and the vocabulary decoder run only at
the positions asked for. On the mmBERT-base shape the 256k-vocabulary decoder is ~60% of a full
forward's FLOPs, and [4, 512, 256000] fp32 logits are 2 GB: never build them when a subset is needed.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import gelu

from diffutron import precision
from diffutron.errors import DiffutronError, UsageError
from diffutron.linear_ce import linear_cross_entropy
from diffutron.packed_linear import PackedLinear

PRESET_PREFIX = "preset:"
SHIPPED_PREFIX = "diffutron/"  # diffutron/tiny-diffutron: the shipped model, as a hub-style id

# How each architecture's MLM head maps hidden states [..., H] to logits [..., V]: a position-wise
# transform (dense, activation, norm) then the vocabulary decoder (a Linear). Position-wise, so
# applying them to a gathered subset is exact.
HEADS: dict[str, tuple[Callable[[nn.Module, torch.Tensor], torch.Tensor], Callable[[nn.Module], nn.Linear]]] = {
    "modernbert": (lambda m, h: m.head(h), lambda m: m.decoder),
    "bert": (lambda m, h: m.cls.predictions.transform(h), lambda m: m.cls.predictions.decoder),
    "distilbert": (
        lambda m, h: m.vocab_layer_norm(m.activation(m.vocab_transform(h))),
        lambda m: m.vocab_projector,
    ),
}
for _roberta_like in ("roberta", "xlm-roberta", "camembert"):
    HEADS[_roberta_like] = (lambda m, h: m.lm_head.layer_norm(gelu(m.lm_head.dense(h))), lambda m: m.lm_head.decoder)


POSITION_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert"}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype a model loads in when none is asked for: bf16 on CUDA, else fp32 (`dtype="auto"` asks
    for the CLI's rule instead: precision.py)."""
    return precision.resolve(None, device)


class DiffusionLM(nn.Module):
    """An HF `...ForMaskedLM` (optionally wrapped by peft) plus its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer, name: str = ""):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(self.hf_model.config, "_name_or_path", "")
        if tokenizer.mask_token_id is None:
            raise DiffutronError(
                f"the tokenizer of {self.name or 'this model'} has no mask token; "
                "a masked diffusion LM needs one (choose a masked-LM checkpoint)"
            )
        self.mask_id: int = tokenizer.mask_token_id
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.mask_id
        self.special_ids: list[int] = sorted(set(tokenizer.all_special_ids))
        config = self.hf_model.config
        self.vocab_size: int = config.vocab_size
        positions = getattr(config, "max_position_embeddings", None)
        if positions and config.model_type in POSITION_OFFSET_TYPES:
            # RoBERTa counts positions from padding_idx + 1: its 514 positions hold 512 tokens.
            positions -= (config.pad_token_id or 0) + 1
        limits = [positions, tokenizer.model_max_length]
        self.context_length: int = min(int(n) for n in limits if n and n < 1_000_000)
        self._head = HEADS.get(config.model_type)
        self._decoder = PackedLinear()  # the decoder of the sampler's steps on a CPU (packed_linear.py)
        if self._head is None:
            warnings.warn(
                f"diffutron has no sparse head for model type {config.model_type!r}: computing full "
                "logits and gathering (correct, but slower and memory-hungry)",
                stacklevel=2,
            )

    # -- loading and saving ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
    ) -> DiffusionLM:
        """Load a model folder, a run folder (its final/ or newest checkpoint), a peft adapter folder, a
        shipped model by name (`tiny-diffutron`, `tiny-base`), a hub id, or build `preset:NAME` (random weights).

        `dtype`: a torch dtype or its name (fp32, bf16, float32, ...); None: bf16 on CUDA, else fp32;
        "auto": bf16 on CUDA, and on a CPU bf16 only where it has bf16 matrix instructions and a quick
        check finds it faster (precision.py), else fp32."""
        device = torch.device(device) if device is not None else default_device()
        dtype = precision.parse(dtype)  # a bad name fails before the model loads
        if name_or_path.startswith(PRESET_PREFIX):
            lm = cls.from_preset(name_or_path[len(PRESET_PREFIX) :], seed=seed)
        else:
            lm = _load_hf(cls, resolve_model(name_or_path), trust_remote_code, name=display_name(name_or_path))
        dtype = precision.resolve(dtype, device, lm.hf_model)
        return lm.to(device=device, dtype=dtype).eval()

    @classmethod
    def from_preset(cls, preset: str, seed: int = 0, device: torch.device | str = "cpu", **overrides) -> DiffusionLM:
        """A ModernBERT of a preset shape with random weights (seeded) and the bundled tokenizer."""
        from transformers import AutoModelForMaskedLM

        from diffutron.presets import PRESETS, preset_config
        from diffutron.tokenizer import load_bundled_tokenizer

        if preset not in PRESETS:
            raise UsageError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
        tokenizer = load_bundled_tokenizer()
        config = preset_config(preset, tokenizer, **overrides)
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            model = AutoModelForMaskedLM.from_config(config)
        return cls(model, tokenizer, name=PRESET_PREFIX + preset)

    @classmethod
    def skeleton(cls, name_or_path: str, trust_remote_code: bool = False) -> DiffusionLM:
        """The model's structure on the meta device, without reading or initialising weights:
        instant parameter counts (`diffutron info`) even for the 307M reference shape."""
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        if name_or_path.startswith(PRESET_PREFIX):
            return cls.from_preset(name_or_path[len(PRESET_PREFIX) :], device="meta")
        path = Path(resolve_model(name_or_path))
        if path.is_dir() and (path / "config.json").is_file():
            config = _load_config(str(path), trust_remote_code, local=True)
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
            with torch.device("meta"):
                model = AutoModelForMaskedLM.from_config(config, trust_remote_code=trust_remote_code)
            return cls(model, tokenizer, name=display_name(name_or_path))
        return cls.from_pretrained(name_or_path, device="cpu", trust_remote_code=trust_remote_code)

    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        """A standard HF folder (safetensors + tokenizer) that transformers 4.57+ and 5.x both load; a peft
        model saves its adapter."""
        from diffutron.tokenizer import save_tokenizer

        self.model.save_pretrained(str(path), **kwargs)
        _write_legacy_rope_keys(Path(path) / "config.json")
        save_tokenizer(self.tokenizer, path)

    # -- the model ------------------------------------------------------------------------------
    @property
    def hf_model(self) -> nn.Module:
        """The transformers model, under any peft wrapper (its LoRA layers stay in place)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    # The embedding API of the model inside: accelerate's FSDP2 preparation finds tied embeddings by it and
    # ties them again after loading sharded weights (without it the decoder became a second, untrained copy).
    def get_input_embeddings(self) -> nn.Module:
        return self.hf_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.hf_model.get_output_embeddings()

    def tie_weights(self) -> None:
        self.hf_model.tie_weights()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def train(self, mode: bool = True) -> DiffusionLM:
        if mode:
            self._decoder.drop()  # training will change the weights: the packed copy would be stale memory
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._decoder.drop()  # .to(), .cuda(), .half(): the weights move or change type, the copy stays behind
        return super()._apply(fn, *args, **kwargs)

    def drop_packed_decoder(self) -> None:
        """Free the sampler's packed copy of the decoder weight (packed_linear.py); it is rebuilt when the
        sampler next needs it. Only needed after writing the weights through memory torch does not track."""
        self._decoder.drop()

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states [B, L, H] of the encoder."""
        return self.hf_model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def head(self, hidden: torch.Tensor, packed_decoder: bool = False) -> torch.Tensor:
        """The MLM head and decoder on hidden states [..., H] -> logits [..., V].

        `packed_decoder`: on a CPU, at inference, run the decoder through a prepacked copy of its
        weight (packed_linear.py): for the sampler's many calls of a few rows each; the copy costs
        a second decoder weight in memory, which one-shot and large-batch work does not repay."""
        if self._head is None:
            raise NotImplementedError("no sparse head for this architecture")
        transform, decoder = self._head
        hidden = transform(self.hf_model, hidden)
        layer = decoder(self.hf_model)
        return self._decoder(layer, hidden) if packed_decoder else layer(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        ce_chunk: int = 256,
        packed_decoder: bool = False,
    ) -> torch.Tensor:
        """Logits at `positions` (bool [B, L]) as [N, V] in row-major order, or all [B, L, V] if None.

        With `targets` ([N] token ids at the positions), the cross-entropy [N] instead, computed
        `ce_chunk` positions at a time so that [N, V] logits never exist at once (linear_ce.py).
        `packed_decoder`: see `head`.
        """
        if self._head is None:
            logits = self.full_logits(input_ids, attention_mask)
            logits = logits if positions is None else logits[positions]
            return logits if targets is None else F.cross_entropy(logits.float(), targets, reduction="none")
        hidden = self.encode(input_ids, attention_mask)
        hidden = hidden if positions is None else hidden[positions]
        if targets is None:
            return self.head(hidden, packed_decoder)
        transform, decoder = self._head
        layer = decoder(self.hf_model)
        return linear_cross_entropy(transform(self.hf_model, hidden), layer.weight, layer.bias, targets, ce_chunk)

    def full_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The dense reference: the model's own forward, [B, L, V] logits everywhere."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    @functools.cached_property
    def special_affixes(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a single sequence ([CLS] ... [SEP], <s> ... </s>)."""
        from diffutron.tokenizer import special_affixes

        return special_affixes(self.tokenizer)

    def maskable(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Positions that the diffusion may mask: every token that is neither padding nor special."""
        specials = torch.tensor(self.special_ids + [self.pad_id], device=input_ids.device)
        return ~torch.isin(input_ids, specials)


def resolve_model(name: str) -> str:
    """Where a model name points: a shipped model's name (`tiny-diffutron`, `diffutron/tiny-base`) -> its
    folder; a run folder -> its final/ or newest checkpoint (model_folder); anything else unchanged.
    An existing local path wins over a shipped name."""
    from diffutron.assets import MODELS, shipped_model

    if name.startswith(PRESET_PREFIX):
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        return str(model_folder(path) or path)
    shipped = name.removeprefix(SHIPPED_PREFIX)
    return str(shipped_model(shipped)) if shipped in MODELS else name


def display_name(name: str) -> str:
    """The name a loaded model goes by: the name given, or for a run folder the model folder inside it."""
    path = Path(name).expanduser()
    folder = model_folder(path) if not name.startswith(PRESET_PREFIX) and path.is_dir() else None
    return str(folder) if folder is not None and folder != path else name


def is_local(name: str) -> bool:
    """Whether a model name is a local path: a hub id is "org/name", anything else that looks like a path is one."""
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1


def model_folder(source: str | Path) -> Path | None:
    """The model folder inside a run (final/, else the newest checkpoint's model/), a checkpoint or a
    model folder itself; None if there is none."""
    source = Path(source)
    for candidate in (source / "final", source / "model", source):
        if (candidate / "config.json").is_file() or (candidate / "adapter_config.json").is_file():
            return candidate
    checkpoints = sorted(
        (p for p in source.glob("checkpoint-*/model") if p.parent.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.parent.name.split("-")[-1]),
    )
    return checkpoints[-1] if checkpoints else None


def _load_hf(cls, name_or_path: str, trust_remote_code: bool, name: str = "") -> DiffusionLM:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = Path(name_or_path)
    looks_local = is_local(name_or_path)
    if looks_local:
        if path.exists() and not path.is_dir():
            raise DiffutronError(
                f"{name_or_path} is not a model folder: it is a file (a model folder holds config.json)"
            )
        if not path.is_dir():
            raise DiffutronError(f"model folder not found: {name_or_path}")
        if (path / "adapter_config.json").is_file():
            return _load_adapter(cls, path, trust_remote_code)
        if not (path / "config.json").is_file():
            raise DiffutronError(
                f"{name_or_path} holds no model: config.json is missing (expected a model folder, a peft adapter "
                "folder, or a run folder with final/ or checkpoint-*/)"
            )
    elif not _hub_reachable() and not _in_hub_cache(name_or_path):
        raise DiffutronError(
            f"could not load model {name_or_path!r}: it is not a local folder, it is not in the Hugging Face "
            "cache, and the Hub is unreachable (offline?); pass a local folder or preset:tiny"
        )
    where = (
        "the folder is incomplete"
        if looks_local
        else (
            "it is not a local folder, and the Hugging Face Hub is unreachable or has no such model; "
            "pass a local folder or preset:tiny"
        )
    )
    config = _load_config(name_or_path, trust_remote_code, local=looks_local, where=where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        with _quiet_transformers():  # its load report goes to stderr; _check_weights says what matters
            model, info = AutoModelForMaskedLM.from_pretrained(
                name_or_path,
                config=config,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported by _check_weights in one line, not raised
            )
    except (OSError, ValueError) as err:
        raise DiffutronError(f"could not load model {name_or_path!r}: {where} ({_first_line(err)})") from err
    _check_weights(name_or_path, model, info)
    return cls(model, tokenizer, name=name or name_or_path)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _load_config(name: str, trust_remote_code: bool, local: bool, where: str = "the folder is incomplete"):
    """The model's config, or a one-line error for a custom-code model, a model type transformers does
    not know, or an architecture that is not a masked LM (GPT-2, ...)."""
    import transformers
    from transformers import MODEL_FOR_MASKED_LM_MAPPING, AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if local:
        try:
            raw = json.loads((Path(name) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DiffutronError(
                f"could not load model {name!r}: config.json is unreadable ({_first_line(err)})"
            ) from err
        if raw.get("auto_map") and not trust_remote_code:
            raise DiffutronError(
                f"could not load model {name!r}: it is a custom-code model (config.json has auto_map), and "
                "diffutron runs no code from a model folder unless trust_remote_code=True"
            )
        model_type = raw.get("model_type")
        if not raw.get("auto_map") and model_type not in CONFIG_MAPPING:
            raise DiffutronError(
                f"could not load model {name!r}: model type {model_type!r} is unknown to transformers "
                f"{transformers.__version__} (a custom-code model without auto_map, or a newer transformers?)"
            )
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise DiffutronError(f"could not load model {name!r}: {where} ({_first_line(err)})") from err
    if type(config) not in MODEL_FOR_MASKED_LM_MAPPING and "AutoModelForMaskedLM" not in (
        getattr(config, "auto_map", None) or {}
    ):
        raise DiffutronError(
            f"could not load model {name!r}: {config.model_type} is not a masked-LM architecture (transformers "
            "has no AutoModelForMaskedLM for it); diffutron needs a bidirectional encoder with a masked-LM head "
            "(ModernBERT, BERT, RoBERTa, XLM-R, ...)"
        )
    return config


def _check_weights(name: str, model: nn.Module, info: dict, shown: int = 3) -> None:
    """Refuse a model whose weights file does not fill it: transformers would leave random weights in
    place of missing tensors (or of tensors whose shape differs from the config) and carry on."""

    def some(keys) -> str:
        keys = sorted(keys)
        more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
        return ", ".join(keys[:shown]) + more

    mismatched = sorted(tuple(m) if isinstance(m, tuple | list) else (m,) for m in info.get("mismatched_keys") or [])
    if mismatched:
        first = mismatched[0]
        shapes = f" ({list(first[1])} in the weights, {list(first[2])} by config.json)" if len(first) == 3 else ""
        raise DiffutronError(
            f"could not load model {name!r}: config.json does not match the weights' shapes: "
            f"{some(m[0] for m in mismatched)}{shapes}"
        )
    # Tied weights (the decoder sharing the embedding matrix) are saved once: a tied name counts as
    # present when any of the names sharing its parameter was loaded.
    names_of: dict[int, list[str]] = {}
    param_id: dict[str, int] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(key)
        param_id[key] = id(param)
    missing = set(info.get("missing_keys") or [])
    missing = [k for k in missing if not any(other not in missing for other in names_of.get(param_id.get(k), []))]
    if missing:
        raise DiffutronError(
            f"could not load model {name!r}: the weights file lacks {len(missing)} of the model's tensors "
            f"({some(missing)}); transformers would put random weights there"
        )
    # Weights for parts this class does not have (a pre-training checkpoint's pooler or next-sentence
    # head) are dropped, as transformers does; a tensor for a module the model has is a mismatch.
    modules = dict(model.named_modules())
    unexpected = [k for k in info.get("unexpected_keys") or [] if k.rpartition(".")[0] in modules]
    if unexpected:
        raise DiffutronError(
            f"could not load model {name!r}: the weights file has {len(unexpected)} tensors the model does "
            f"not expect ({some(unexpected)}); is config.json the one these weights were saved with?"
        )


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _write_legacy_rope_keys(config_path: Path) -> None:
    """transformers 5 saves ModernBERT's RoPE bases only under rope_parameters, which 4.x ignores (it
    would silently use its defaults); the 4.x keys are written too, and 5.x reads rope_parameters first."""
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    if config.get("model_type") != "modernbert" or not rope:
        return
    for legacy, layer_type in (("global_rope_theta", "full_attention"), ("local_rope_theta", "sliding_attention")):
        if "rope_theta" in rope.get(layer_type, {}):
            config[legacy] = rope[layer_type]["rope_theta"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so that an offline machine fails at once instead of retrying for a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _load_adapter(cls, path: Path, trust_remote_code: bool) -> DiffusionLM:
    """A peft adapter folder: load its base model (folder, hub id or preset), then the adapter."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise DiffutronError(f"{path}/adapter_config.json does not name its base model")
    base = (
        DiffusionLM.from_preset(base_name[len(PRESET_PREFIX) :])
        if base_name.startswith(PRESET_PREFIX)
        else _load_hf(cls, os.path.expanduser(base_name), trust_remote_code)
    )
    has_tokenizer = (path / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(path)) if has_tokenizer else base.tokenizer
    return cls(PeftModel.from_pretrained(base.model, str(path)), tokenizer, name=str(path))
