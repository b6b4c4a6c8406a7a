"""Counter-based uniforms: u = hash(seed, counter, stream), one independent number per (row, step, position).

A row's random numbers depend only on its own seed, its own step count and the position, never on
which other rows share the batch or on the device, so a seeded request draws the same numbers alone
or beside others (what a server batching requests step by step needs; its text can still differ by
the encoder's rounding, sampler.py), and `n` samples of one prompt are just n seeds. torch.Generator
cannot do this without a Python loop over rows.

The hash is a 32-bit integer mixer (xor-shift / multiply rounds, multipliers below 2**31 so that every
product fits an int64 without overflow), applied to the 32-bit halves of the inputs in turn; two
outputs give a 53-bit double. Pure tensor functions, on any device.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MULTIPLIERS = (0x7FEB352D, 0x5BD1E995)  # both < 2**31: x * m < 2**63 for x < 2**32

# streams: independent families of numbers for the same (seed, counter)
TOKEN_DRAW, REVEAL_ORDER = 1, 2


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mixer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIERS[0]) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MULTIPLIERS[1]) & _MASK32
    return x ^ (x >> 16)


def uniforms(seed: torch.Tensor, counter: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniform float64 numbers in [0, 1), one per element of the broadcast of `seed` and `counter`
    (non-negative int64 tensors)."""
    seed, counter = torch.broadcast_tensors(seed.long(), counter.long())
    h = _mix(torch.full_like(seed, (stream * 0x9E3779B9) & _MASK32))
    for word in (seed & _MASK32, (seed >> 32) & _MASK32, counter & _MASK32, (counter >> 32) & _MASK32):
        h = _mix(h ^ word)
    low = _mix(h ^ 0x68E31DA4)
    return ((h << 21) | (low >> 11)).double() / 2.0**53
