"""Discrete diffusion sampling: start from [MASK]s, reveal tokens step by step."""

from diffutron.sampling.canvas import Canvas, generation_canvas, infill_canvas
from diffutron.sampling.config import SamplingConfig, user_config
from diffutron.sampling.policies import POLICIES
from diffutron.sampling.sampler import (
    Denoiser,
    GenerationResult,
    RowResult,
    StepState,
    denoise,
    generate,
    infill,
)

__all__ = [
    "POLICIES",
    "Canvas",
    "Denoiser",
    "GenerationResult",
    "RowResult",
    "SamplingConfig",
    "StepState",
    "denoise",
    "generate",
    "generation_canvas",
    "infill",
    "infill_canvas",
    "user_config",
]
