"""The denoising loop: one forward per step over the canvas, the head only at the current block's masks.

LLaDA's generate (Nie et al. 2025, Alg. 4/5), vectorised over the batch:

    for each block of the generated region (semi-autoregressive when block_length < max_new_tokens):
        for each step of the block:
            logits   = model(canvas) at the block's masked positions only
            x0       = argmax (temperature 0) or a sample of softmax(logits / T), top-k / top-p
            score    = confidence p(x0) | margin | -entropy | random            (policies.py)
            reveal   = the k best per row (k from the schedule), or >= tau (threshold), or ancestral
            canvas[reveal] = x0[reveal]
        rows whose text is settled up to EOS or a stop sequence leave the batch

Stop sequences are matched on token ids in the settled prefix, never by decoding the canvas.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from diffutron.errors import UsageError
from diffutron.sampling import policies
from diffutron.sampling.canvas import Canvas, generation_canvas, infill_canvas
from diffutron.schedules import get_schedule


@dataclass
class SamplingConfig:
    steps: int | None = None  # default: one token per step (max_new_tokens, or the number of masks)
    block_length: int | None = None  # default: the whole generated region as one block
    policy: str = "confidence"
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off (the reference chat settings used 1.2; we never add it silently)
    threshold: float = 0.9  # tau of the threshold policy
    cfg_scale: float = 0.0  # classifier-free guidance (LLaDA): 0 is off; the prompt masked is the unconditional
    schedule: str = "linear"  # how many tokens each step reveals
    stop: tuple[str, ...] = ()  # stop strings, matched as token ids
    stop_at_eos: bool = True
    seed: int = 0
    truncate_prompt: bool = False  # left-truncate a prompt that does not fit, instead of refusing it
    history: bool = False  # keep every step's canvas in the result

    def validate(self) -> None:
        if self.policy not in policies.POLICIES:
            raise UsageError(f"unknown policy {self.policy!r}: choose one of {', '.join(policies.POLICIES)}")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"steps must be at least 1, got {self.steps}")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.repetition_penalty <= 0 or not 0 < self.threshold <= 1:
            raise UsageError("top-k must be >= 0, repetition penalty > 0 and threshold in (0, 1]")
        try:
            get_schedule(self.schedule)
        except ValueError as e:
            raise UsageError(str(e)) from None


@dataclass
class StepState:
    """What a step did, for streaming: the whole batch's canvas after it."""

    step: int
    block: int
    ids: torch.Tensor  # [B, L] on the model's device, updated in place by the next step: clone it to keep it
    revealed: torch.Tensor  # [B, L] bool, revealed at this step
    active: torch.Tensor  # [B] bool, rows still being generated


@dataclass
class GenerationResult:
    texts: list[str]  # the generated continuation (generate) or the filled text (infill)
    token_ids: list[list[int]]  # the tokens of `texts`
    forward_passes: int  # model calls (one per step for the whole batch; x2 with guidance)
    steps: int
    seconds: float
    new_tokens: int  # tokens generated over all rows
    finished_by: list[str]  # per row: "eos", "stop", or "length"
    history: list[torch.Tensor] = field(default_factory=list)  # per step [B, L] canvases, if asked

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def _blocks(canvas: Canvas, block_length: int | None, steps: int | None) -> tuple[int, int, int]:
    """(number of blocks, block length, steps per block), validated."""
    span = int(canvas.gen_length.max())
    block_length = block_length or span
    if block_length < 1 or span % block_length:
        raise UsageError(f"block_length {block_length} must divide the generated length {span}")
    num_blocks = span // block_length
    steps = steps or span
    if steps % num_blocks:
        raise UsageError(f"steps {steps} must be a multiple of the number of blocks {num_blocks}")
    return num_blocks, block_length, steps // num_blocks


def _sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """x0 at each candidate: argmax, or a draw from the tempered, top-k / top-p filtered distribution."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if config.top_k:
        kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1:
        logits = top_p_filter(logits, config.top_p)
    return draw(logits.softmax(dim=-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `probs` [N, V] by inverse CDF: one uniform a row, where Gumbel-max draws
    one per entry; same distribution as torch.multinomial, 10.7x faster on a CPU for 512 x 16k
    (benchmarks/sample_draw.py)."""
    cumulative = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cumulative[:, -1:]
    tokens = torch.searchsorted(cumulative, u, right=True).squeeze(1).clamp(max=probs.shape[1] - 1)
    # rounding can land on a zero-probability entry at the very end: take the mode there
    unlucky = probs.gather(1, tokens[:, None]).squeeze(1) == 0
    return torch.where(unlucky, probs.argmax(dim=-1), tokens)


def top_p_filter(logits: torch.Tensor, p: float, first_k: int = 1024) -> torch.Tensor:
    """-inf outside each row's smallest set of most probable tokens whose mass reaches p (nucleus).

    Rows whose nucleus lies within their `first_k` best tokens are settled by topk, the rest by a
    full sort: peaked rows are cheap, flat ones cost what they did (benchmarks/sample_draw.py).
    """
    probs = logits.softmax(dim=-1)
    k = min(first_k, probs.shape[-1])
    values, order = probs.topk(k, dim=-1)
    keep_sorted = values.cumsum(dim=-1) - values < p  # entries before the mass reaches p
    settled = (values.sum(dim=-1) >= p) | (k == probs.shape[-1])
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, keep_sorted & settled[:, None])
    rest = (~settled).nonzero().flatten()
    if rest.numel():
        values, order = probs[rest].sort(dim=-1, descending=True)
        keep[rest] = torch.zeros_like(values, dtype=torch.bool).scatter_(1, order, values.cumsum(dim=-1) - values < p)
    return logits.masked_fill(~keep, float("-inf"))


def _penalise(logits: torch.Tensor, rows: torch.Tensor, canvas: torch.Tensor, lm, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty on tokens already in the row's canvas."""
    present = torch.zeros(canvas.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device)
    present.scatter_(1, canvas.clamp(max=logits.shape[1] - 1), True)
    present[:, lm.mask_id] = False
    hit = present[rows]
    return torch.where(hit, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def _settled_end(x, start, length, lm, stop_ids: list[torch.Tensor], eos: int | None):
    """Per row: (end of the text relative to start, or -1 if not settled yet; reason 0 length, 1 eos, 2 stop).

    The text is settled up to the first mask of the generated region; EOS or a stop sequence that lies
    wholly inside the settled prefix ends it.
    """
    rel = torch.arange(x.shape[1], device=x.device)[None, :] - start[:, None]
    in_region = (rel >= 0) & (rel < length[:, None])
    big = x.shape[1] + 1
    first_mask = torch.where(in_region & (x == lm.mask_id), rel, big).min(dim=1).values.clamp(max=length)
    end = torch.full_like(first_mask, big)
    reason = torch.zeros_like(first_mask)  # 1 eos, 2 stop
    if eos is not None:
        eos_at = torch.where(in_region & (x == eos), rel, big).min(dim=1).values
        hit = eos_at < first_mask
        end, reason = torch.where(hit, eos_at, end), torch.where(hit, 1, reason)
    for seq in stop_ids:
        m = len(seq)
        if m > x.shape[1]:
            continue
        match = (x.unfold(1, m, 1) == seq.to(x.device)).all(dim=-1)  # [B, L - m + 1], match starting at j
        rel_j = rel[:, : match.shape[1]]
        ok = match & (rel_j >= 0) & (rel_j + m <= first_mask[:, None])
        at = torch.where(ok, rel_j, big).min(dim=1).values
        hit = at < end
        end, reason = torch.where(hit, at, end), torch.where(hit, 2, reason)
    done_by_length = first_mask >= length
    end = torch.where(end < big, end, torch.where(done_by_length, length, -1))
    return end, reason


@torch.no_grad()
def denoise(lm, canvas: Canvas, config: SamplingConfig, *, stop_checks: bool = True) -> Iterator[StepState]:
    """Run the loop on `canvas` (modified in place), yielding the state after every step."""
    config.validate()
    schedule = get_schedule(config.schedule)
    num_blocks, block_length, steps_per_block = _blocks(canvas, config.block_length, config.steps)
    device = lm.device
    x, attention = canvas.ids.to(device), canvas.attention_mask.to(device)
    fillable, start, length = canvas.fillable.to(device), canvas.gen_start.to(device), canvas.gen_length.to(device)
    rel = torch.arange(x.shape[1], device=device)[None, :] - start[:, None]
    generator = torch.Generator(device=device).manual_seed(config.seed)
    vocab = len(lm.tokenizer)  # a model's vocabulary may be padded beyond its tokenizer's
    eos = (lm.tokenizer.eos_token_id or lm.tokenizer.sep_token_id) if config.stop_at_eos and stop_checks else None
    banned = torch.tensor([i for i in lm.special_ids if i != eos and i < vocab], device=device)
    stop_ids = [torch.tensor(lm.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in config.stop if s]
    prompt = (rel < 0) & attention.bool() & ~torch.isin(x, torch.tensor(lm.special_ids, device=device))
    active = torch.ones(x.shape[0], dtype=torch.bool, device=device)
    end = torch.full((x.shape[0],), -1, device=device)
    reason = torch.zeros(x.shape[0], dtype=torch.long, device=device)
    step_number = 0
    for block in range(num_blocks):
        in_block = fillable & (rel >= block * block_length) & (rel < (block + 1) * block_length)
        counts = policies.reveal_counts((in_block & (x == lm.mask_id)).sum(dim=1), steps_per_block, schedule)
        # the threshold policy runs until the block is full, at least one token per step
        max_steps = block_length if config.policy == "threshold" else steps_per_block
        for step in range(max_steps):
            rows = active.nonzero().flatten()
            xa = x[rows]
            candidates = in_block[rows] & (xa == lm.mask_id)
            if not candidates.any():
                break
            logits = _logits(lm, xa, attention[rows], candidates, prompt[rows], config)[:, :vocab].float()
            logits[:, banned] = float("-inf")
            cand_rows = candidates.nonzero(as_tuple=True)[0]
            if config.repetition_penalty != 1.0:
                logits = _penalise(logits, cand_rows, xa, lm, config.repetition_penalty)
            sampled = _sample(logits, config, generator)
            probs = logits.softmax(dim=-1)
            score = policies.scores(config.policy, probs, sampled, generator)
            row_scores = torch.full(xa.shape, float("-inf"), device=device)
            row_scores[candidates] = score
            if config.policy == "threshold":
                reveal = policies.select_threshold(row_scores, config.threshold)
            elif config.policy == "ancestral":
                reveal = policies.select_ancestral(candidates, row_scores, step, steps_per_block, schedule)
            else:
                reveal = policies.select_top(row_scores, counts[rows, step])
            proposal = torch.full_like(xa, lm.mask_id)
            proposal[candidates] = sampled
            xa = torch.where(reveal, proposal, xa)
            x[rows] = xa
            step_number += 1
            revealed = torch.zeros_like(x, dtype=torch.bool)
            revealed[rows] = reveal
            if stop_checks:
                row_end, row_reason = _settled_end(xa, start[rows], length[rows], lm, stop_ids, eos)
                finished = row_end >= 0
                end[rows[finished]], reason[rows[finished]] = row_end[finished], row_reason[finished]
            else:
                finished = ~(fillable[rows] & (xa == lm.mask_id)).any(dim=1)
            active[rows[finished]] = False
            yield StepState(step_number, block, x, revealed, active)
            if not active.any():
                break
    canvas.ids, canvas.end, canvas.reason = x.cpu(), end.cpu(), reason.cpu()


def _logits(lm, xa, attention, candidates, prompt, config: SamplingConfig) -> torch.Tensor:
    """Logits at the candidates; with guidance, un + (w + 1)(cond - un), the prompt masked for `un`."""
    if config.cfg_scale <= 0:
        return lm(xa, attention, positions=candidates)
    unconditional = xa.masked_fill(prompt, lm.mask_id)
    both = lm(
        torch.cat([xa, unconditional]), torch.cat([attention, attention]), positions=torch.cat([candidates, candidates])
    )
    cond, uncond = both.chunk(2)
    return uncond + (config.cfg_scale + 1) * (cond - uncond)


def _run(
    lm, canvas: Canvas, config: SamplingConfig, callback, stop_checks: bool
) -> tuple[list[torch.Tensor], int, float]:
    history, steps = [], 0
    started = time.perf_counter()
    for state in denoise(lm, canvas, config, stop_checks=stop_checks):
        steps = state.step
        if config.history:
            history.append(state.ids.to("cpu", copy=True))
        if callback:
            callback(state)
    return history, steps, time.perf_counter() - started


def generate(
    lm,
    prompts: list[str] | str,
    max_new_tokens: int = 64,
    config: SamplingConfig | None = None,
    callback: Callable[[StepState], None] | None = None,
    **options,
) -> GenerationResult:
    """Continue each prompt ("" for unconditional) by `max_new_tokens` tokens, or fewer if it stops.

    Options are SamplingConfig fields: steps, block_length, policy, temperature, top_k, top_p,
    repetition_penalty, threshold, cfg_scale, schedule, stop, stop_at_eos, seed, truncate_prompt, history.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    config = config or SamplingConfig(**options)
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    config.validate()
    canvas = generation_canvas(lm, prompts, max_new_tokens, truncate_prompt=config.truncate_prompt)
    multiplier = 2 if config.cfg_scale > 0 else 1
    history, steps, seconds = _run(lm, canvas, config, callback, stop_checks=True)
    token_ids, reasons = [], []
    for row in range(len(prompts)):
        end = int(canvas.end[row]) if canvas.end[row] >= 0 else max_new_tokens
        start = int(canvas.gen_start[row])
        token_ids.append(canvas.ids[row, start : start + end].tolist())
        reasons.append({1: "eos", 2: "stop"}.get(int(canvas.reason[row]), "length"))
    texts = [lm.tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]
    return GenerationResult(
        texts, token_ids, steps * multiplier, steps, seconds, sum(len(t) for t in token_ids), reasons, history
    )


def infill(
    lm,
    texts: list[str] | str,
    config: SamplingConfig | None = None,
    callback: Callable[[StepState], None] | None = None,
    **options,
) -> GenerationResult:
    """Fill every `<mask>` (one token) / `<mask*N>` (N tokens) of each text jointly; given tokens never change."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    config = config or SamplingConfig(**options)
    config.validate()
    canvas = infill_canvas(lm, texts)
    steps = config.steps or int(canvas.fillable.sum(dim=1).max())
    config = SamplingConfig(**{**config.__dict__, "steps": steps, "block_length": None})
    history, steps_run, seconds = _run(lm, canvas, config, callback, stop_checks=False)
    token_ids = [canvas.ids[row][canvas.attention_mask[row].bool()].tolist() for row in range(len(texts))]
    filled = [lm.tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]
    new_tokens = int(canvas.fillable.sum())
    return GenerationResult(
        filled,
        token_ids,
        steps_run * (2 if config.cfg_scale > 0 else 1),
        steps_run,
        seconds,
        new_tokens,
        ["length"] * len(texts),
        history,
    )
