"""Which masked positions to reveal at a step, and how many. Pure tensor functions over a batch.

Scores (higher = reveal first), from the model's untempered probabilities at the candidates:
  * confidence -- p(sampled token): LLaDA's low-confidence remasking (Nie et al. 2025, Alg. 5).
  * margin     -- p(top-1) - p(top-2) (Kim et al. 2025, "Train for the worst, plan for the best").
  * entropy    -- minus the entropy of the position's distribution (Ben-Hamu et al. 2025).
  * random     -- a uniform random order: MDLM's sampler with the schedule's count per step.
Selection:
  * top-k per row by score, k from `reveal_count` (LLaDA, dllm);
  * threshold  -- every candidate with confidence >= tau, at least the best one per row
                  (Fast-dLLM parallel decoding, Wu et al. 2025);
  * factor     -- the n most confident candidates, n the largest with (n + 1)(1 - c_(n)) < f, c_(n) the
                  n-th highest confidence, at least one: Fast-dLLM's factor rule, from its Theorem 1 (greedy
                  parallel decoding of n tokens each surer than 1 - eps equals sequential greedy decoding
                  when (n + 1) eps <= 1; f = 1 is that bound, a larger f trades exactness for speed);
  * ancestral  -- each candidate independently with probability (alpha_s - alpha_t) / (1 - alpha_t),
                  MDLM's ancestral sampler (Sahoo et al. 2024, eq. 7): the count is random.
"""

from __future__ import annotations

import torch

from diffutron.sampling.config import POLICIES
from diffutron.schedules import Schedule


def scores(policy: str, probs: torch.Tensor, sampled: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per-candidate reveal scores [N] from probabilities [N, V], the sampled tokens [N] and one uniform
    number per candidate [N] (the random order of `random` and `ancestral`)."""
    if policy in ("confidence", "threshold", "factor"):
        return probs.gather(1, sampled[:, None]).squeeze(1)
    if policy == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if policy == "entropy":
        return (probs * probs.clamp_min(1e-12).log()).sum(dim=-1)  # = -H: low entropy first
    if policy in ("random", "ancestral"):
        return uniforms.to(probs.dtype)
    raise ValueError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")


def reveal_count(
    block_masks: torch.Tensor, step: torch.Tensor, steps: torch.Tensor, schedule: Schedule
) -> torch.Tensor:
    """How many tokens each row reveals at its step `step` of `steps` [B], for a block that held
    `block_masks` masks when it started; over the steps the counts add up to block_masks.

    Linear: LLaDA's split, n // steps each and one more in the first n % steps steps. Other schedules:
    the masks left after step i are round(n * (1 - alpha(t_i))), t_i = 1 - i / steps.
    """
    if schedule.name == "linear":
        return block_masks // steps + (step < block_masks % steps).long()

    def left(i: torch.Tensor) -> torch.Tensor:
        rounded = torch.round(block_masks.double() * schedule.mask_prob(1.0 - i.double() / steps)).long()
        return torch.where(i <= 0, block_masks, torch.where(i >= steps, 0, rounded))

    return left(step) - left(step + 1)


def select_top(row_scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: the counts[b] best-scored positions of each row (non-candidates score -inf)."""
    order = row_scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return (ranks < counts[:, None]) & (row_scores > float("-inf"))


def select_threshold(row_conf: torch.Tensor, tau: float) -> torch.Tensor:
    """bool [B, L]: candidates with confidence >= tau, and each row's best candidate in any case."""
    best = row_conf.argmax(dim=1, keepdim=True)
    has_candidate = (row_conf > float("-inf")).any(dim=1, keepdim=True)
    forced = torch.zeros_like(row_conf, dtype=torch.bool).scatter_(1, best, has_candidate)
    return (row_conf >= tau) | forced


def select_factor(row_conf: torch.Tensor, factor: float) -> torch.Tensor:
    """bool [B, L]: each row's n most confident candidates, n the largest with (n + 1)(1 - c_(n)) < factor
    (at least one). The bound on c_(n) rises with n while c_(n) falls, so the n that pass are 1..n."""
    ranked = row_conf.sort(dim=1, descending=True).values
    n = torch.arange(1, ranked.shape[1] + 1, device=ranked.device, dtype=ranked.dtype)
    passes = (n + 1) * (1 - ranked) < factor  # -inf (not a candidate) never passes
    return select_top(row_conf, passes.sum(dim=1).clamp(min=1))


def ancestral_prob(step: torch.Tensor, steps: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """[B] the probability (alpha_s - alpha_t) / (1 - alpha_t) that a mask is revealed at this step;
    1 at the last step, so the block ends full."""
    t, s = 1.0 - step.double() / steps, 1.0 - (step.double() + 1) / steps
    prob = (schedule.alpha(s) - schedule.alpha(t)) / (1.0 - schedule.alpha(t))
    return torch.where(step + 1 >= steps, 1.0, prob)


def select_ancestral(candidates: torch.Tensor, uniforms: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: each candidate revealed independently with its row's probability `prob` [B]."""
    return candidates & (uniforms < prob[:, None])
