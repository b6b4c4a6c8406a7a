"""The denoising loop: one forward per step over the batch, the head only at each row's current block.

LLaDA's generate (Nie et al. 2025, Alg. 4/5), vectorised over the batch, each row on its own clock:

    until every row is done:
        block    = the block of each row's first remaining mask (semi-autoregressive blocks)
        logits   = model(canvas) at the masks of each row's block only
        x0       = argmax (greedy) or a draw from softmax(logits / T), top-k / top-p
        score    = confidence p(x0) | margin | -entropy | random                 (policies.py)
        reveal   = the k best per row (k from the schedule at the row's step), or >= tau (threshold),
                   or the n best with (n + 1)(1 - c_n) < f (factor),
                   or each mask with probability (alpha_s - alpha_t)/(1 - alpha_t) (ancestral)
        canvas[reveal] = x0[reveal]
        rows whose text is settled up to EOS or a stop string, or that are full, leave the batch

Rows keep their own block and step and draw their own random numbers (rng.py), so no decision of a
row reads the rows beside it, and a `Denoiser` can take new rows between steps (a server batching
requests step by step). The arithmetic is shared: padded beside longer rows (and, cached, in a span as
wide as the widest row's) the encoder sums in another order, so a row's logits in company are its
logits alone only up to rounding (~3e-5 on the tiny models, fp32), and its text the same unless a
decision is a near tie at that rounding (docs/benchmarks.md, batch invariance, counts how often;
tests/rows_alone.py takes the rounding out to test the rest bit for bit).

With `cache` "prefix" or "dual" (cache.py, Fast-dLLM's approximate KV cache) a step recomputes only
each row's block (dual) or its block and everything after it (prefix) against the keys/values of its
last full forward. Each row is refreshed by a full forward of its own when it enters a block (a row
that joins starts its first) and every `refresh_every` of its steps, so cached rows, too, decide in
company what they decide alone, up to the same rounding. Rows leaving take their cache rows with them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

import torch

from diffutron.errors import UsageError
from diffutron.sampling import policies
from diffutron.sampling.cache import SUPPORTED, EncoderCache, spans, supports
from diffutron.sampling.canvas import Canvas, generation_canvas, infill_canvas
from diffutron.sampling.config import MAX_SEED, SamplingConfig
from diffutron.sampling.rng import REVEAL_ORDER, TOKEN_DRAW, uniforms
from diffutron.sampling.text import SettledText
from diffutron.schedules import get_schedule

REASONS = {0: "length", 1: "eos", 2: "stop"}
_POSITION_BITS = 20  # the random counter of a candidate: (row step << 20) + position


@dataclass
class StepState:
    """What a step did, for streaming: the whole batch's canvas after it."""

    step: int
    ids: torch.Tensor  # [B, L] on the model's device, updated in place by the next step: clone it to keep it
    revealed: torch.Tensor  # [B, L] bool, revealed at this step
    active: torch.Tensor  # [B] bool, rows still being generated after this step
    block: torch.Tensor  # [B] the block each row worked on (-1: the row was already done)


@dataclass
class GenerationResult:
    texts: list[str]  # the generated continuation (generate) or the filled text (infill)
    token_ids: list[list[int]]  # the tokens of `texts` (with a stop string: the tokens wholly before it)
    forward_passes: int  # model calls for the batch (one per step; x2 with guidance)
    steps: int
    seconds: float
    new_tokens: int  # tokens generated over all rows
    finished_by: list[str]  # per row: "eos", "stop", or "length"
    history: list[torch.Tensor] = field(default_factory=list)  # per step [B, L] canvases, if asked
    row_passes: list[int] = field(default_factory=list)  # per row: the forward passes it took part in

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class RowResult:
    """A row that left a Denoiser."""

    key: Hashable
    ids: torch.Tensor  # [L] its final canvas, on the CPU
    text: str  # the continuation up to its end (generate) or the whole filled text (infill)
    token_ids: list[int]  # the tokens of `text`
    finished_by: str
    steps: int  # steps the row took part in


@dataclass
class BatchStep:
    """One step of a Denoiser: the rows that took part, in batch order."""

    keys: list
    ids: torch.Tensor  # [R, L'] their canvases after the step
    revealed: torch.Tensor  # [R, L'] bool
    block: torch.Tensor  # [R]
    start: torch.Tensor  # [R] where each row's generated region starts
    finished: list[RowResult | None]  # per row: its result if it finished at this step


class Denoiser:
    """Rows being denoised together, one forward pass per step; rows join between steps and leave when done.

    All rows share the settings of `config.batch_key()` (policy, temperature, top-k/p, penalty,
    threshold, factor, guidance, schedule, cache); prompt, length, steps, blocks, seed, stop strings and EOS handling
    are per row. `mode` is "generate" (rows end at EOS, a stop string, or full length) or "infill"
    (rows end when every mask is filled).
    """

    def __init__(self, lm, config: SamplingConfig, mode: str = "generate"):
        config.validate()
        self.lm, self.config, self.mode = lm, config, mode
        self.schedule = get_schedule(config.schedule)
        self.device = lm.device
        tokenizer = lm.tokenizer
        self.vocab = len(tokenizer)  # a model's vocabulary may be padded beyond its tokenizer's
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.banned = torch.tensor([i for i in lm.special_ids if i != self.eos and i < self.vocab], device=self.device)
        self.specials = torch.tensor(lm.special_ids, device=self.device)
        self.rows: dict[str, torch.Tensor] = {}  # per-row tensors, first dimension = row
        self.keys: list = []
        self.texts: list[SettledText | None] = []
        self.forward_passes = 0
        self.steps = 0
        self.cache: EncoderCache | None = None  # keys/values of the rows' canvases (rows x2 with guidance)
        if config.cache != "none":
            if not supports(lm):
                raise UsageError(
                    f"cache {config.cache!r} needs a {'/'.join(SUPPORTED)} encoder, not "
                    f"{lm.hf_model.config.model_type!r}; use cache 'none'"
                )
            self.cache = EncoderCache(lm)

    def decode(self, ids: list[int]) -> str:
        return self.lm.tokenizer.decode(ids, skip_special_tokens=True)

    def __len__(self) -> int:
        return len(self.keys)

    # -- rows joining ---------------------------------------------------------------------------
    def add(self, canvas: Canvas, config: SamplingConfig, keys: list | None = None, track_text: bool = False) -> list:
        """Add the rows of `canvas` with their per-row settings from `config` (seed + i for row i).

        `track_text`: decode each row's settled text as it grows (for streaming); always on with stops.
        """
        config.validate()
        if config.batch_key() != self.config.batch_key():
            raise ValueError("rows with different sampling settings cannot share a batch")
        n = canvas.ids.shape[0]
        keys = list(range(len(self.keys), len(self.keys) + n)) if keys is None else list(keys)
        length = canvas.gen_length.long()
        block_length = torch.tensor([config.block_length or int(s) for s in length])
        if (block_length < 1).any() or (length % block_length).any():
            raise UsageError(f"block_length {config.block_length} must divide the generated length {int(length.max())}")
        num_blocks = length // block_length
        steps = torch.tensor([config.steps or int(s) for s in length])
        if (steps % num_blocks).any():
            raise UsageError(f"steps {config.steps} must be a multiple of the number of blocks {int(num_blocks.max())}")
        ids = canvas.ids.to(self.device)
        attention = canvas.attention_mask.to(self.device)
        fillable = canvas.fillable.to(self.device)
        prompt = attention.bool() & ~fillable & ~torch.isin(ids, self.specials)
        zeros = torch.zeros(n, dtype=torch.long)
        new = {
            "ids": ids,
            "attention": attention,
            "fillable": fillable,
            "prompt": prompt,
            "start": canvas.gen_start.long(),
            "length": length,
            "block_length": block_length,
            "steps_per_block": steps // num_blocks,
            "block": zeros - 1,
            "step": zeros,
            "block_masks": zeros,
            "row_steps": zeros,
            "since_refresh": zeros,  # cached steps since the row's last full forward
            "settled": zeros,
            "seed": (config.seed + torch.arange(n, dtype=torch.long)) % (MAX_SEED + 1),
            "stop_at_eos": torch.full((n,), config.stop_at_eos),
            "ban_eos": torch.full((n,), config.ban_eos),
        }
        new = {k: v.to(self.device) for k, v in new.items()}
        if self.rows:
            width = max(self.rows["ids"].shape[1], ids.shape[1])
            pad = {"ids": self.lm.pad_id}
            self.rows = {
                k: torch.cat([_pad_to(self.rows[k], width, pad.get(k, 0)), _pad_to(v, width, pad.get(k, 0))])
                for k, v in new.items()
            }
        else:
            self.rows = new
        if self.cache is not None and not self.cache.empty:  # the new rows' cache rows wait for their refresh
            old = len(self.keys)
            joined = torch.cat([torch.arange(old), torch.full((n,), -1)]).to(self.device)
            self.cache.remap(self._cache_rows(joined, old), self.rows["ids"].shape[1])
        self.keys += keys
        track = track_text or bool(config.stop)
        self.texts += [SettledText(self.decode, tuple(config.stop)) if track else None for _ in range(n)]
        return keys

    def cancel(self, keys) -> None:
        """Drop rows (a client went away) without results."""
        drop = set(keys)
        self._keep(torch.tensor([k not in drop for k in self.keys], dtype=torch.bool))

    # -- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> BatchStep:
        r = self.rows
        x = r["ids"]
        mask_id = self.lm.mask_id
        rel = torch.arange(x.shape[1], device=self.device)[None, :] - r["start"][:, None]
        masked = r["fillable"] & (x == mask_id)
        first = torch.where(masked, rel, x.shape[1]).min(dim=1).values
        block = first // r["block_length"]  # blocks before the first mask are full
        entering = block != r["block"]
        lo = block * r["block_length"]
        candidates = masked & (rel >= lo[:, None]) & (rel < (lo + r["block_length"])[:, None])
        r["step"] = torch.where(entering, 0, r["step"])
        r["block_masks"] = torch.where(entering, candidates.sum(dim=1), r["block_masks"])
        r["block"] = block

        # a cached step recomputes the columns [since, until): the block (dual), or the block and all after it
        since = r["start"] + lo
        until = since + r["block_length"] if self.config.cache == "dual" else r["attention"].sum(dim=1)
        refresh = self._refresh_due(entering)
        logits = self._logits(x, r["attention"], candidates, r["prompt"], since, until, refresh)
        logits = logits[:, : self.vocab].float()
        cand_rows, cand_pos = candidates.nonzero(as_tuple=True)
        logits[:, self.banned] = float("-inf")
        if self.eos is not None and self.eos < self.vocab:
            logits[:, self.eos] = logits[:, self.eos].masked_fill(r["ban_eos"][cand_rows], float("-inf"))
        config = self.config
        if config.repetition_penalty != 1.0:
            logits = penalise(logits, cand_rows, x, r["prompt"] | (r["fillable"] & ~masked), config.repetition_penalty)
        counter = (r["row_steps"][cand_rows] << _POSITION_BITS) + cand_pos
        seeds = r["seed"][cand_rows]
        sampled = sample_tokens(logits, config, uniforms(seeds, counter, TOKEN_DRAW))
        order = uniforms(seeds, counter, REVEAL_ORDER)
        score = policies.scores(config.policy, logits.softmax(dim=-1), sampled, order)
        row_scores = torch.full(x.shape, float("-inf"), device=self.device)
        row_scores[candidates] = score
        if config.policy == "threshold":
            reveal = policies.select_threshold(row_scores, config.threshold)
        elif config.policy == "factor":
            reveal = policies.select_factor(row_scores, config.factor)
        elif config.policy == "ancestral":
            row_uniforms = torch.ones(x.shape, dtype=torch.float64, device=self.device)
            row_uniforms[candidates] = order
            prob = policies.ancestral_prob(r["step"], r["steps_per_block"], self.schedule)
            reveal = policies.select_ancestral(candidates, row_uniforms, prob)
        else:
            counts = policies.reveal_count(r["block_masks"], r["step"], r["steps_per_block"], self.schedule)
            last = r["step"] + 1 >= r["steps_per_block"]  # a block ends full whatever the rounding
            reveal = policies.select_top(row_scores, torch.where(last, candidates.sum(dim=1), counts))
        proposal = torch.full_like(x, mask_id)
        proposal[candidates] = sampled
        r["ids"] = x = torch.where(reveal, proposal, x)
        r["step"] = r["step"] + 1
        r["row_steps"] = r["row_steps"] + 1
        self.steps += 1
        self.forward_passes += 2 if config.cfg_scale > 0 else 1

        finished = self._finished(x, rel)
        batch = BatchStep(list(self.keys), x, reveal, block, r["start"], finished)
        if any(f is not None for f in finished):
            self._keep(torch.tensor([f is None for f in finished], dtype=torch.bool))
        return batch

    def _logits(self, x, attention, candidates, prompt, since, until, refresh) -> torch.Tensor:
        """Logits at the candidates; with guidance, un + (w + 1)(cond - un), the prompt masked for `un`.
        With a cache: a full forward of the rows where `refresh` [B], the columns [since, until) of the others."""
        guidance = self.config.cfg_scale > 0
        if guidance:  # both branches in one batch (and one cache): conditional rows, then unconditional ones
            x = torch.cat([x, x.masked_fill(prompt, self.lm.mask_id)])
            attention, candidates = torch.cat([attention, attention]), torch.cat([candidates, candidates])
            since, until = torch.cat([since, since]), torch.cat([until, until])
            refresh = torch.cat([refresh, refresh]) if refresh is not None else None
        if self.cache is None:
            logits = self.lm(x, attention, positions=candidates, packed_decoder=True)
        else:
            hidden = self._cached_hidden(x, attention, candidates, since, until, refresh)
            logits = self.lm.head(hidden, packed_decoder=True)
        if not guidance:
            return logits
        cond, uncond = logits.chunk(2)
        return guided(cond, uncond, self.config.cfg_scale)

    def _refresh_due(self, entering: torch.Tensor) -> torch.Tensor | None:
        """Per row: a full forward this step? At a block start (a joining row is at its first block's
        start), after `refresh_every` steps of its own, and for every row while the cache is empty. Each
        row keeps its own rhythm, so a row's tokens do not depend on when others joined."""
        if self.cache is None:
            return None
        r, every = self.rows, self.config.refresh_every
        due = torch.full_like(entering, self.cache.empty) | entering
        if every is not None:
            due = due | (r["since_refresh"] + 1 >= every)
        r["since_refresh"] = torch.where(due, 0, r["since_refresh"] + 1)
        return due

    def _cache_rows(self, rows: torch.Tensor, count: int) -> torch.Tensor:
        """The cache rows of batch rows `rows` (of `count`): one per guidance branch (conditional rows,
        then unconditional ones); negative entries stay negative."""
        if self.config.cfg_scale <= 0:
            return rows
        return torch.cat([rows, torch.where(rows >= 0, rows + count, rows)])

    def _cached_hidden(self, x, attention, candidates, since, until, refresh: torch.Tensor) -> torch.Tensor:
        """Hidden states at the candidates: for the rows where `refresh`, a full forward that rebuilds their
        cache rows; for the others, the cached forward of the columns [since, until) (they hold the row's
        candidates)."""
        if bool(refresh.all()):
            return self.cache.refresh(x, attention)[candidates]
        if not bool(refresh.any()):
            return self._cached_span(self.cache, x, attention, candidates, since, until)
        hidden, row_of = None, candidates.nonzero()[:, 0]
        for fresh in (True, False):
            rows = (refresh == fresh).nonzero().flatten()
            part = EncoderCache(self.lm) if fresh else self.cache.part(rows)
            if fresh:
                got = part.refresh(x[rows], attention[rows])[candidates[rows]]
            else:
                got = self._cached_span(part, x[rows], attention[rows], candidates[rows], since[rows], until[rows])
            self.cache.put(rows, part)
            hidden = got.new_empty((len(row_of), got.shape[-1])) if hidden is None else hidden
            hidden[refresh[row_of] == fresh] = got  # each part keeps the row-major order of the candidates
        return hidden

    @staticmethod
    def _cached_span(cache: EncoderCache, x, attention, candidates, since, until) -> torch.Tensor:
        positions, valid = spans(since, until)
        hidden = cache.forward(x, attention, positions)
        return hidden[candidates.gather(1, positions) & valid]

    # -- rows leaving -------------------------------------------------------------------------
    def _finished(self, x: torch.Tensor, rel: torch.Tensor) -> list[RowResult | None]:
        """Per row: its result if it is done after this step."""
        r = self.rows
        masked = r["fillable"] & (x == self.lm.mask_id)
        if self.mode == "infill":
            done = ~masked.any(dim=1)
            return [self._result(i, None, 0) if d else None for i, d in enumerate(done.tolist())]
        big = x.shape[1] + 1
        length = r["length"]
        in_region = (rel >= 0) & (rel < length[:, None])
        first_mask = torch.where(in_region & masked, rel, big).min(dim=1).values.clamp(max=length)
        eos = in_region & (x == self.eos) & r["stop_at_eos"][:, None]
        eos_at = torch.where(eos, rel, big).min(dim=1).values
        settled = torch.minimum(first_mask, eos_at)  # the text is final up to here
        end = torch.where(eos_at < first_mask, eos_at, torch.where(first_mask >= length, length, -1))
        reason = torch.where(eos_at < first_mask, 1, 0)
        end, reason = end.tolist(), reason.tolist()
        if any(t is not None for t in self.texts):
            starts, old, new = r["start"].tolist(), r["settled"].tolist(), settled.tolist()
            for i, text in enumerate(self.texts):
                if text is not None and new[i] > old[i]:
                    text.extend(x[i, starts[i] + old[i] : starts[i] + new[i]].tolist())
                    if text.stop_at is not None:
                        end[i], reason[i] = text.tokens_before(text.stop_at), 2
            r["settled"] = settled
        return [self._result(i, e, why) if e >= 0 else None for i, (e, why) in enumerate(zip(end, reason, strict=True))]

    def _result(self, i: int, end: int | None, reason: int) -> RowResult:
        r = self.rows
        ids = r["ids"][i].cpu()
        if end is None:  # infill: the whole filled text
            token_ids = ids[r["attention"][i].cpu().bool()].tolist()
            text = self.decode(token_ids)
        else:
            start = int(r["start"][i])
            token_ids = ids[start : start + end].tolist()
            tracked = self.texts[i]
            text = tracked.text[: tracked.stop_at] if reason == 2 else self.decode(token_ids)
        return RowResult(self.keys[i], ids, text, token_ids, REASONS[reason], int(r["row_steps"][i]))

    def _keep(self, keep: torch.Tensor) -> None:
        """Keep only the rows where `keep`, and drop padding columns that no row needs any more."""
        index = keep.nonzero().flatten().tolist()
        self.keys = [self.keys[i] for i in index]
        self.texts = [self.texts[i] for i in index]
        keep = keep.to(self.device)
        self.rows = {k: v[keep] for k, v in self.rows.items()}
        if self.keys:
            width = int(self.rows["attention"].sum(dim=0).nonzero().max()) + 1
            for k in ("ids", "attention", "fillable", "prompt"):
                self.rows[k] = self.rows[k][:, :width]
            if self.cache is not None and not self.cache.empty:
                self.cache.remap(self._cache_rows(keep.nonzero().flatten(), len(keep)), width)
        elif self.cache is not None:
            self.cache.clear()


def _pad_to(t: torch.Tensor, width: int, value) -> torch.Tensor:
    if t.dim() < 2 or t.shape[1] == width:
        return t
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance as in LLaDA: uncond + (w + 1)(cond - uncond)."""
    return uncond + (scale + 1) * (cond - uncond)


def penalise(
    logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, counted: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL's repetition penalty on the tokens at the `counted` positions of each candidate's row
    (the prompt's and the generated ones: never the fixed frame, padding or masks)."""
    vocab = logits.shape[1]
    present = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    present.scatter_(1, torch.where(counted, ids.clamp(max=vocab - 1), vocab), True)  # column V: not counted
    hit = present[rows, :vocab]
    return torch.where(hit, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample_tokens(logits: torch.Tensor, config: SamplingConfig, u: torch.Tensor) -> torch.Tensor:
    """x0 at each candidate: argmax, or a draw (one uniform `u` each) from the tempered, top-k / top-p
    filtered distribution."""
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if config.top_k:
        kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1:
        logits = top_p_filter(logits, config.top_p)
    return draw(logits.softmax(dim=-1), u)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` [N, V] by inverse CDF with the row's uniform u [N] in [0, 1):
    one number a row, where Gumbel-max needs one per entry; same distribution as torch.multinomial,
    10.7x faster on a CPU for 512 x 16k (benchmarks/sample_draw.py)."""
    cumulative = probs.cumsum(dim=-1)
    target = u.to(cumulative.dtype)[:, None] * cumulative[:, -1:]
    tokens = torch.searchsorted(cumulative, target, right=True).squeeze(1).clamp(max=probs.shape[1] - 1)
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


# -- the offline drivers -------------------------------------------------------------------------
def denoise(lm, canvas: Canvas, config: SamplingConfig, mode: str = "generate") -> Iterator[tuple[StepState, list]]:
    """Denoise every row of `canvas` (its ids updated in place); yield (state, finished rows) per step."""
    denoiser = Denoiser(lm, config, mode)
    denoiser.add(canvas, config)
    x = canvas.ids.to(lm.device)
    active = torch.ones(x.shape[0], dtype=torch.bool, device=lm.device)
    while len(denoiser):
        batch = denoiser.step()
        rows = torch.tensor(batch.keys, device=lm.device)
        width = batch.ids.shape[1]
        x[rows, :width] = batch.ids
        revealed = torch.zeros_like(x, dtype=torch.bool)
        revealed[rows, :width] = batch.revealed
        block = torch.full((x.shape[0],), -1, device=lm.device)
        block[rows] = batch.block
        done = [f for f in batch.finished if f is not None]
        for result in done:
            active[result.key] = False
        yield StepState(denoiser.steps, x, revealed, active, block), done
    canvas.ids = x.cpu()


def _run(lm, canvas: Canvas, config: SamplingConfig, callback, mode: str, started: float) -> GenerationResult:
    results, history, steps = {}, [], 0
    for state, done in denoise(lm, canvas, config, mode):
        steps = state.step
        results.update((r.key, r) for r in done)
        if config.history:
            history.append(state.ids.to("cpu", copy=True))
        if callback:
            callback(state)
    rows = [results[i] for i in range(canvas.ids.shape[0])]
    multiplier = 2 if config.cfg_scale > 0 else 1
    new_tokens = int(canvas.fillable.sum()) if mode == "infill" else sum(len(r.token_ids) for r in rows)
    return GenerationResult(
        texts=[r.text for r in rows],
        token_ids=[r.token_ids for r in rows],
        forward_passes=steps * multiplier,
        steps=steps,
        seconds=time.perf_counter() - started,
        new_tokens=new_tokens,
        finished_by=[r.finished_by for r in rows],
        history=history,
        row_passes=[r.steps * multiplier for r in rows],
    )


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
    repetition_penalty, threshold, factor, cfg_scale, schedule, stop, stop_at_eos, ban_eos, frame, cache,
    refresh_every, seed, truncate_prompt, history. Row i draws with seed + i.
    """
    started = time.perf_counter()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    config = config or SamplingConfig(**options)
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    config.validate()
    canvas = generation_canvas(lm, prompts, max_new_tokens, truncate_prompt=config.truncate_prompt, frame=config.frame)
    return _run(lm, canvas, config, callback, "generate", started)


def infill(
    lm,
    texts: list[str] | str,
    config: SamplingConfig | None = None,
    callback: Callable[[StepState], None] | None = None,
    **options,
) -> GenerationResult:
    """Fill every `<mask>` (one token) / `<mask*N>` (N tokens) of each text jointly; given tokens never change.

    The masks of a row form one block; `steps` defaults to the most masks of a row.
    """
    started = time.perf_counter()
    texts = [texts] if isinstance(texts, str) else list(texts)
    config = config or SamplingConfig(**options)
    config.validate()
    canvas = infill_canvas(lm, texts)
    steps = config.steps or int(canvas.fillable.sum(dim=1).max())  # one token per step for the longest row
    config = SamplingConfig(**{**config.__dict__, "steps": steps, "block_length": None})
    return _run(lm, canvas, config, callback, "infill", started)
