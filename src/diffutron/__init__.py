"""diffutron: masked diffusion language models on bidirectional encoders, made first for Turkish.

The public API is re-exported here and imported lazily (PEP 562), so that `diffutron --help` does not
pay for importing torch and transformers.

Two public functions share their module's name (`evaluate` in diffutron/evaluate.py, `fill_mask` in
diffutron/fill_mask.py). Importing a submodule makes Python bind it onto the package under that name,
which would turn `diffutron.evaluate` from the function into the module the first time anything
imports diffutron.evaluate. The package's class below keeps the function bound instead, so a public
name means the same object whatever was imported before. The submodules stay importable by path
(`from diffutron.evaluate import make_windows`); only `import diffutron.evaluate as m`, which Python
resolves as an attribute, gives the function.
"""

import sys
import types
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
    "WordCandidate": "word_fill",
    "fill_words": "word_fill",
    "LoraSettings": "lora",
    "apply_lora": "lora",
    "count_parameters": "lora",
    "mdlm_loss": "objective",
    "mlm_loss": "objective",
    "sft_maskable": "objective",
    "SamplingConfig": "sampling",
    "generate": "sampling",
    "infill": "sampling",
    "get_schedule": "schedules",
    "sample_times": "schedules",
}
__all__ = sorted(_EXPORTS)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # The import system's `setattr(package, "evaluate", <module diffutron.evaluate>)`: keep the function.
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffutron' has no attribute {name!r}")
    value = getattr(import_module(f"diffutron.{_EXPORTS[name]}"), name)
    globals()[name] = value  # bound once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return __all__
