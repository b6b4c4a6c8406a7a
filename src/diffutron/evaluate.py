"""Evaluation: perplexity at a fixed mask ratio, the MDLM ELBO perplexity bound, fill-mask accuracy.

PPL@r (the reference model's metric, r = 0.15): documents are cut into windows of the model's
context (with the tokenizer's special tokens around each), every maskable token is masked with
probability r, and PPL = exp(mean cross-entropy over the masked tokens). Each of `samples` passes
draws new masks; the mean and standard error of the per-pass PPL are reported.

ELBO bound: exp(NELBO per token), the MDLM bound on the model's true perplexity: t is stratified
over the passes (pass k of N draws t in [k/N, (k+1)/N)), a token is masked with probability
1 - alpha(t), and its cross-entropy weighted by w(t).

Masks come from a generator seeded by (seed, pass, window): the same for any batch size or order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from diffutron.errors import UsageError
from diffutron.schedules import get_schedule


@dataclass
class EvalResult:
    ppl: float
    ppl_stderr: float
    elbo_ppl: float | None  # an upper bound on the perplexity, not a perplexity
    tokens: int  # maskable tokens evaluated (per pass)
    masked_tokens: int  # masked tokens over all PPL passes
    top1: float
    top5: float
    mask_ratio: float
    samples: int
    windows: int
    seconds: float
    # PPL of each pass: pass k masks the same positions for any model with this tokenizer, so two
    # models compare pass by pass (a paired difference, far tighter than either stderr)
    pass_ppl: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def make_windows(lm, texts: Sequence[str]) -> list[list[int]]:
    """Token windows of at most the model's context, each wrapped in the tokenizer's special tokens."""
    prefix, suffix = lm.special_affixes
    room = lm.context_length - len(prefix) - len(suffix)
    encoded = lm.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [prefix + ids[i : i + room] + suffix for ids in encoded for i in range(0, len(ids), room)]


def _generator(seed: int, sample: int, window: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + sample * 0x85EBCA77 + window) % 2**63)


def _mask_window(lm, ids: torch.Tensor, prob: float, g: torch.Generator, bert_corruption: bool):
    """(corrupted ids, masked positions) of one window: masked positions are predicted."""
    masked = lm.maskable(ids) & (torch.rand(ids.shape, generator=g) < prob)
    noisy = ids.masked_fill(masked, lm.mask_id)
    if bert_corruption:  # BERT: of the chosen positions 80% [MASK], 10% a random token, 10% unchanged
        u = torch.rand(ids.shape, generator=g)
        random_ids = torch.randint(len(lm.tokenizer), ids.shape, generator=g)
        noisy = torch.where(masked & (u >= 0.8) & (u < 0.9), random_ids, noisy)
        noisy = torch.where(masked & (u >= 0.9), ids, noisy)
    return noisy, masked


def _batched_ce(
    lm, noisy: list[torch.Tensor], masked: list[torch.Tensor], clean: list[torch.Tensor], sparse_head: bool
):
    """Cross-entropy [N] and logits-derived ranks at the masked positions of a padded batch."""
    length = max(len(x) for x in noisy)
    pad = lambda xs, value: torch.stack([F.pad(x, (0, length - len(x)), value=value) for x in xs])  # noqa: E731
    device = lm.device
    ids, pos, tgt = pad(noisy, lm.pad_id).to(device), pad(masked, False).to(device), pad(clean, lm.pad_id).to(device)
    attention = pad([torch.ones_like(x) for x in noisy], 0).to(device)
    logits = lm(ids, attention, positions=pos) if sparse_head else lm.full_logits(ids, attention)[pos]
    logits = logits.float()
    targets = tgt[pos]
    ce = F.cross_entropy(logits, targets, reduction="none")
    target_logit = logits.gather(1, targets[:, None])
    rank = (logits > target_logit).sum(dim=1)  # 0 = the target is the top-1 prediction
    return ce.cpu(), rank.cpu()


def evaluate(lm, texts: Sequence[str], **options) -> EvalResult:
    """Evaluate on documents: cut into context windows, then `evaluate_windows(lm, windows, **options)`."""
    return evaluate_windows(lm, make_windows(lm, texts), **options)


@torch.no_grad()
def evaluate_windows(
    lm,
    token_windows: Sequence[Sequence[int]],
    *,
    mask_ratio: float = 0.15,
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    elbo_samples: int | None = None,
    schedule: str = "linear",
    bert_corruption: bool = False,
    sparse_head: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """PPL at `mask_ratio` (mean +- stderr over `samples` passes), ELBO bound, top-1/top-5 accuracy.

    progress(done, total) is called after each batch, counted in window forwards.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise UsageError(f"mask ratio must be in (0, 1), got {mask_ratio}")
    if samples < 1 or batch_size < 1:
        raise UsageError("samples and batch size must be at least 1")
    # One stratum alone is a noisy bound: at least 4 unless asked otherwise.
    elbo_samples = max(samples, 4) if elbo_samples is None else elbo_samples
    sched = get_schedule(schedule)
    start = time.perf_counter()
    windows = [torch.tensor(w) for w in token_windows]
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))  # less padding per batch
    tokens = int(sum(lm.maskable(w).sum() for w in windows))
    if tokens == 0:
        raise UsageError("the data has no tokens to evaluate")
    total_forwards, done = len(windows) * (samples + elbo_samples), 0

    def run_pass(draw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CE, weights and ranks of every masked token of one pass; draw(window index) -> masks."""
        nonlocal done
        ces, weights, ranks = [], [], []
        for b in range(0, len(order), batch_size):
            batch = order[b : b + batch_size]
            drawn = [draw(i) for i in batch]  # (noisy, masked, weight) per window
            ce, rank = _batched_ce(
                lm, [d[0] for d in drawn], [d[1] for d in drawn], [windows[i] for i in batch], sparse_head
            )
            ces.append(ce)
            ranks.append(rank)
            weights.append(torch.cat([torch.full((int(d[1].sum()),), d[2]) for d in drawn]))
            done += len(batch)
            if progress:
                progress(done, total_forwards)
        return torch.cat(ces), torch.cat(weights), torch.cat(ranks)

    pass_ppls, all_ranks, masked_tokens = [], [], 0
    for k in range(samples):

        def fixed_ratio(i: int, k=k):
            noisy, masked = _mask_window(lm, windows[i], mask_ratio, _generator(seed, k, i), bert_corruption)
            return noisy, masked, 1.0

        ce, _, ranks = run_pass(fixed_ratio)
        if ce.numel() == 0:
            raise UsageError("no token was masked: the data is too short for this mask ratio")
        pass_ppls.append(math.exp(ce.mean().item()))
        all_ranks.append(ranks)
        masked_tokens += ce.numel()

    nelbo = []
    for k in range(elbo_samples):

        def stratified(i: int, k=k):
            g = _generator(seed, samples + k, i)
            t = (k + torch.rand(1, generator=g)) / elbo_samples  # stratum k of N
            t = t.clamp(min=1e-3)
            noisy, masked = _mask_window(lm, windows[i], float(sched.mask_prob(t)), g, False)
            return noisy, masked, float(sched.elbo_weight(t))

        ce, weights, _ = run_pass(stratified)
        nelbo.append((ce * weights).sum().item() / tokens)

    ranks = torch.cat(all_ranks)
    ppl_tensor = torch.tensor(pass_ppls, dtype=torch.float64)
    stderr = float(ppl_tensor.std() / math.sqrt(samples)) if samples > 1 else 0.0
    return EvalResult(
        ppl=float(ppl_tensor.mean()),
        ppl_stderr=stderr,
        elbo_ppl=math.exp(sum(nelbo) / len(nelbo)) if nelbo else None,
        tokens=tokens,
        masked_tokens=masked_tokens,
        top1=float((ranks == 0).float().mean()),
        top5=float((ranks < 5).float().mean()),
        mask_ratio=mask_ratio,
        samples=samples,
        pass_ppl=pass_ppls,
        windows=len(windows),
        seconds=time.perf_counter() - start,
    )
