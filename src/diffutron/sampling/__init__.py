"""Discrete diffusion sampling: start from [MASK]s, reveal tokens step by step.

Names are imported lazily (PEP 562): the CLI reads settings from `sampling.config` without paying
for torch at start-up. No exported name is also a submodule's name.
"""

from importlib import import_module

_EXPORTS = {
    "Canvas": "canvas",
    "generation_canvas": "canvas",
    "infill_canvas": "canvas",
    "POLICIES": "config",
    "SamplingConfig": "config",
    "user_config": "config",
    "Denoiser": "sampler",
    "GenerationResult": "sampler",
    "RowResult": "sampler",
    "StepState": "sampler",
    "denoise": "sampler",
    "generate": "sampler",
    "infill": "sampler",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffutron.sampling' has no attribute {name!r}")
    value = getattr(import_module(f"diffutron.sampling.{_EXPORTS[name]}"), name)
    globals()[name] = value  # bound once: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
