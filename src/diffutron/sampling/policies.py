"""Which masked positions to reveal at a step, and how many. Pure tensor functions over a batch.

Scores (higher = reveal first), from the model's untempered probabilities at the candidates:
  * confidence -- p(sampled token): LLaDA's low-confidence remasking (Nie et al. 2025, Alg. 5).
  * margin     -- p(top-1) - p(top-2) (Kim et al. 2025, "Train for the worst, plan for the best").
  * entropy    -- minus the entropy of the position's distribution (Ben-Hamu et al. 2025).
  * random     -- a uniform random order: MDLM's sampler with the schedule's count per step.
Selection:
  * top-k per row by score, k from `reveal_counts` (LLaDA, dllm);
  * threshold  -- every candidate with confidence >= tau, at least the best one per row
                  (Fast-dLLM parallel decoding, Wu et al. 2025);
  * ancestral  -- each candidate independently with probability (alpha_s - alpha_t) / (1 - alpha_t),
                  MDLM's ancestral sampler (Sahoo et al. 2024, eq. 7): the count is random.
"""

from __future__ import annotations

import torch

from diffutron.schedules import Schedule

SCORED = ("confidence", "margin", "entropy", "random")
POLICIES = (*SCORED, "threshold", "ancestral")


def scores(policy: str, probs: torch.Tensor, sampled: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Per-candidate reveal scores [N] from probabilities [N, V] and the sampled tokens [N]."""
    if policy in ("confidence", "threshold"):
        return probs.gather(1, sampled[:, None]).squeeze(1)
    if policy == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if policy == "entropy":
        return (probs * probs.clamp_min(1e-12).log()).sum(dim=-1)  # = -H: low entropy first
    if policy in ("random", "ancestral"):
        return torch.rand(probs.shape[0], generator=generator, device=probs.device)
    raise ValueError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")


def reveal_counts(num_masked: torch.Tensor, steps: int, schedule: Schedule) -> torch.Tensor:
    """How many tokens each row reveals at each of `steps` steps: [B, steps], rows summing to num_masked.

    Linear: LLaDA's split, n // steps each and one more in the first n % steps steps. Other schedules:
    the masks left after step i are round(n * (1 - alpha(t_i))) with t going from 1 to 0.
    """
    step = torch.arange(steps, device=num_masked.device)
    if schedule.name == "linear":
        base, extra = num_masked // steps, num_masked % steps
        return base[:, None] + (step[None, :] < extra[:, None]).long()
    t = 1.0 - torch.arange(steps + 1, device=num_masked.device, dtype=torch.float64) / steps
    left = torch.round(num_masked[:, None].double() * schedule.mask_prob(t)[None, :]).long()
    left[:, 0], left[:, -1] = num_masked, 0
    return left[:, :-1] - left[:, 1:]


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


def select_ancestral(
    candidates: torch.Tensor, uniforms: torch.Tensor, step: int, steps: int, schedule: Schedule
) -> torch.Tensor:
    """bool [B, L]: each candidate revealed with probability (alpha_s - alpha_t) / (1 - alpha_t)."""
    t = torch.tensor(1.0 - step / steps, dtype=torch.float64)
    s = torch.tensor(1.0 - (step + 1) / steps, dtype=torch.float64)
    prob = 1.0 if step == steps - 1 else float((schedule.alpha(s) - schedule.alpha(t)) / (1.0 - schedule.alpha(t)))
    return candidates & (uniforms < prob)
