"""Discrete diffusion sampling: start from [MASK]s, reveal tokens step by step."""

from diffutron.sampling.canvas import Canvas, generation_canvas, infill_canvas
from diffutron.sampling.policies import POLICIES
from diffutron.sampling.sampler import GenerationResult, SamplingConfig, StepState, denoise, generate, infill

__all__ = [
    "POLICIES",
    "Canvas",
    "GenerationResult",
    "SamplingConfig",
    "StepState",
    "denoise",
    "generate",
    "generation_canvas",
    "infill",
    "infill_canvas",
]
