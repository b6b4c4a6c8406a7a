"""diffutron: masked diffusion language models on bidirectional encoders, made first for Turkish.

The public API is re-exported here and imported lazily (PEP 562), so that `diffutron --help` does not
pay for importing torch and transformers.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "DiffusionLM": "model",
    "DiffutronError": "errors",
    "UsageError": "errors",
    "Document": "data",
    "bundled_documents": "data",
    "read_documents": "data",
    "EvalResult": "evaluate",
    "evaluate": "evaluate",
    "evaluate_windows": "evaluate",
    "fill_mask": "fill_mask",
    "LoraSettings": "lora",
    "apply_lora": "lora",
    "count_parameters": "lora",
    "mdlm_loss": "objective",
    "mlm_loss": "objective",
    "sft_maskable": "objective",
    "get_schedule": "schedules",
    "sample_times": "schedules",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffutron' has no attribute {name!r}")
    return getattr(import_module(f"diffutron.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
