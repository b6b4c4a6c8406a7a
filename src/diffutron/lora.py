"""LoRA adapters (peft) on the encoder's attention and MLP linears, as the reference model was trained."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

# The reference recipe: every attention and MLP linear of every layer, never the prediction head.
# ModernBERT: attn.Wqkv, attn.Wo, mlp.Wi, mlp.Wo ("Wo" names both). BERT-style encoders spell them
# out per layer; a regex keeps the head's own `dense` and the pooler out.
_BERT_LAYERS = (
    r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "modernbert": ["Wqkv", "Wo", "Wi"],
    "bert": _BERT_LAYERS,
    "roberta": _BERT_LAYERS,
    "xlm-roberta": _BERT_LAYERS,
    "camembert": _BERT_LAYERS,
    "distilbert": r".*\.layer\.\d+\.(attention\.(q_lin|k_lin|v_lin|out_lin)|ffn\.(lin1|lin2))",
}


@dataclass
class LoraSettings:
    r: int = 256
    alpha: int = 256
    dropout: float = 0.0
    # "default": the reference targets above for the model's architecture; "all-linear": peft's
    # choice (which also takes the head's dense layer); or explicit module names.
    targets: list[str] | str = "default"
    modules_to_save: list[str] = field(default_factory=list)


def target_modules(model_type: str, targets: list[str] | str) -> list[str] | str:
    if targets != "default":
        return targets
    try:
        return DEFAULT_TARGETS[model_type]
    except KeyError:
        raise ValueError(
            f"no default LoRA targets for model type {model_type!r}; name them (e.g. --lora-targets all-linear)"
        ) from None


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap an HF masked-LM in a peft LoraConfig; only the adapters (and modules_to_save) train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules(model.config.model_type, settings.targets),
        modules_to_save=settings.modules_to_save or None,
        bias="none",
    )
    return get_peft_model(model, config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters, each tied tensor counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable
