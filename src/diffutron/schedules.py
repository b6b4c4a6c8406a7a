"""Masking schedules alpha(t) of masked diffusion (MDLM, Sahoo et al. 2024, sec. 3).

alpha(t) is the probability that a token is still *unmasked* at time t in [0, 1]: alpha(0) = 1
(clean text), alpha(1) = 0 (all masks). The continuous-time NELBO (MDLM eq. 10) weighs the
cross-entropy at masked positions by

    w(t) = -alpha'(t) / (1 - alpha(t))        (= 1/t for the linear schedule).

Pure functions of a tensor t, so they work per sequence, batched, on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    name: str
    alpha: Fn
    alpha_prime: Fn

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at time t: 1 - alpha(t)."""
        return 1.0 - self.alpha(t)

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) = -alpha'(t) / (1 - alpha(t)), the NELBO weight of a masked token's cross-entropy."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t))


LINEAR = Schedule("linear", alpha=lambda t: 1.0 - t, alpha_prime=lambda t: -torch.ones_like(t))

# alpha(t) = cos(pi t / 2): masks slowly at first, fast near t = 1.
COSINE = Schedule(
    "cosine",
    alpha=lambda t: torch.cos(0.5 * math.pi * t),
    alpha_prime=lambda t: -0.5 * math.pi * torch.sin(0.5 * math.pi * t),
)

SCHEDULES = {s.name: s for s in (LINEAR, COSINE)}


def get_schedule(name: str) -> Schedule:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}") from None


def sample_times(
    batch_size: int,
    eps: float = 1e-3,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One t per sequence in [eps, 1).

    antithetic (MDLM's low-discrepancy sampler): t_i = (u + i/B) mod 1, one shared u, so the batch
    covers [0, 1) evenly and the loss has lower variance; each t_i is still uniform.
    """
    if antithetic:
        u = torch.rand(1, generator=generator, device=device)
        t = (u + torch.arange(batch_size, device=device) / batch_size) % 1.0
    else:
        t = torch.rand(batch_size, generator=generator, device=device)
    return eps + (1.0 - eps) * t
