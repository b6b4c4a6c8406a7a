"""Training objectives as pure tensor functions: the MDLM loss, its SFT variant, fixed-ratio MLM.

MDLM (Sahoo et al. 2024, eq. 10): for clean tokens x and one time t ~ U[eps, 1) per sequence,
mask each maskable token with probability 1 - alpha(t), and minimise

    NELBO = E_t [ w(t) * sum_{masked i} -log p(x_i | z_t) ],     w(t) = -alpha'(t) / (1 - alpha(t)).

Normalisation of the summed, weighted cross-entropy (`normalization`):
  * "token":    / number of maskable tokens in the batch. With `elbo` weighting this is the NELBO
                per token, whose exp() bounds the perplexity.
  * "sequence": each sequence's sum / its own maskable tokens, then the mean over sequences
                (LLaDA's and the reference model's per-sequence average: short sequences weigh
                as much as long ones).
  * "masked":   / number of masked tokens: the plain masked-LM average.
Weighting (`weighting`): "elbo" uses w(t); "uniform" uses 1 for every masked token.

All randomness is drawn on the CPU from a `torch.Generator`, so a seed gives the same masks on
any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffutron.schedules import Schedule, get_schedule, sample_times

NORMALIZATIONS = ("token", "sequence", "masked")
WEIGHTINGS = ("elbo", "uniform")


@dataclass
class LossOutput:
    loss: torch.Tensor
    t: torch.Tensor  # [B] the diffusion time of each sequence
    masked: torch.Tensor  # [B, L] bool, positions that were masked
    num_masked: int


def corrupt(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_prob: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each maskable token independently with its row's probability mask_prob [B].

    Returns (noisy ids, masked bool [B, L]).
    """
    u = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    masked = maskable & (u < mask_prob.to(input_ids.device)[:, None])
    return input_ids.masked_fill(masked, mask_id), masked


def normalize(
    token_losses: torch.Tensor, rows: torch.Tensor, maskable: torch.Tensor, normalization: str
) -> torch.Tensor:
    """Reduce weighted per-masked-token losses [N] (of batch rows `rows` [N]) to a scalar."""
    if normalization == "token":
        return token_losses.sum() / maskable.sum().clamp(min=1)
    if normalization == "sequence":
        per_row = torch.zeros(maskable.shape[0], device=token_losses.device, dtype=token_losses.dtype)
        per_row = per_row.index_add(0, rows, token_losses)
        return (per_row / maskable.sum(dim=1).clamp(min=1)).mean()
    if normalization == "masked":
        return token_losses.sum() / max(token_losses.numel(), 1)
    raise ValueError(f"unknown normalization {normalization!r}: choose one of {', '.join(NORMALIZATIONS)}")


def mdlm_loss(
    lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    maskable: torch.Tensor | None = None,
    schedule: Schedule | str = "linear",
    weighting: str = "elbo",
    normalization: str = "token",
    eps: float = 1e-3,
    antithetic: bool = True,
    t: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    forward=None,
    ce_chunk: int = 256,
) -> LossOutput:
    """The MDLM loss of a DiffusionLM on a batch of clean sequences.

    `maskable` defaults to every non-special, non-padding token; SFT passes its response positions
    so that prompt tokens are never masked and never in the loss. `forward` is the module to call
    (the DiffusionLM itself, or its distributed wrapper in training).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    schedule = get_schedule(schedule) if isinstance(schedule, str) else schedule
    maskable = lm.maskable(input_ids) if maskable is None else maskable
    if t is None:
        t = sample_times(input_ids.shape[0], eps=eps, antithetic=antithetic, generator=generator)
    noisy, masked = corrupt(input_ids, maskable, schedule.mask_prob(t), lm.mask_id, generator)
    weights = schedule.elbo_weight(t) if weighting == "elbo" else torch.ones_like(t)
    ce = (forward or lm)(noisy, attention_mask, positions=masked, targets=input_ids[masked], ce_chunk=ce_chunk)
    rows = masked.nonzero(as_tuple=True)[0]
    loss = normalize(ce * weights.to(ce.device)[rows], rows, maskable, normalization)
    return LossOutput(loss=loss, t=t, masked=masked, num_masked=int(masked.sum()))


def sft_maskable(maskable: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """SFT: the prompt (prompt_mask True) is never masked, so the loss covers the response only."""
    return maskable & ~prompt_mask


def mlm_loss(
    lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    ratio: float = 0.15,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """Fixed-ratio masked-LM loss (BERT's objective without 80/10/10): mean CE over masked tokens."""
    t = torch.full((input_ids.shape[0],), ratio)
    return mdlm_loss(
        lm,
        input_ids,
        attention_mask,
        schedule="linear",
        weighting="uniform",
        normalization="masked",
        t=t,
        generator=generator,
    )
