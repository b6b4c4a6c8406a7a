"""Evaluation: perplexity at a fixed mask ratio, the MDLM ELBO bound, fill-mask accuracy.

PPL@r (the reference model's metric, r = 0.15): documents are cut into windows of the model's
context (with the tokenizer's special tokens around each), every maskable token is masked with
probability r, and PPL = exp(mean cross-entropy over the masked tokens). With several passes (each
draws new masks) the cross-entropies are pooled: PPL = exp(mean CE over every masked token of every
pass); its standard error comes from the spread of the passes' mean CE, and each pass's own PPL is
kept for paired comparisons (pass k masks the same positions for any model with this tokenizer).

ELBO bound: exp(NELBO per token), MDLM's upper bound on the model's perplexity as a generative
model of the text, the figure masked-diffusion papers report as test perplexity. It is not a PPL at
a mask ratio and not comparable with PPL@15%, which lets the model see 85% of the text. It is
estimated as LLaDA does (Nie et al. 2025, eq. 14): a window of L maskable tokens gets l of them
masked, l uniform in 1..L, and (L / l) x the sum of their cross-entropies. For an encoder that is not
told t, this has the same expectation as MDLM's continuous-time NELBO under any schedule, with far
less variance than weighting by 1/t (a small t masks a token or two, weighted by up to 1000). l is
stratified: each window draws one l in each of `elbo_samples` strata of 1..L. The standard error
collapses the strata in pairs (the usual estimator for one draw per stratum, slightly conservative).

Masks come from generators seeded by (seed, pass, window index): the same for any batch size, and
the ELBO's do not depend on the number of PPL passes. Windows are streamed: the text is tokenized a
piece at a time and memory stays bounded by a buffer of batches, whatever the size of the input.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from diffutron.errors import UsageError

# Strata of the ELBO bound by default: on the shipped tiny-diffutron and the held-out split its
# standard error is then 1.5% of the value (docs/benchmarks.md); it shrinks as 1/sqrt(strata x windows).
ELBO_STRATA = 16
# The ELBO's masks are drawn from pass ids far from the PPL passes', so that they do not move with `samples`.
_ELBO_STREAM = 1 << 20
# Text is tokenized in pieces of about this many characters (cut at a space between two words).
CHUNK_CHARS = 1 << 16
# Windows are sorted by length within this many batches, so that a batch needs little padding.
_SORT_BATCHES = 16


@dataclass
class EvalResult:
    ppl: float  # PPL at mask_ratio: exp of the mean cross-entropy over the masked tokens of all passes
    ppl_stderr: float | None  # standard error of ppl from the passes' spread; None with one pass
    elbo_ppl: float | None  # upper bound on the generative perplexity (MDLM's), NOT a PPL at mask_ratio
    elbo_ppl_stderr: float | None  # Monte Carlo standard error of elbo_ppl; None with fewer than 2 strata
    elbo_samples: int  # strata of the ELBO bound (0: not computed)
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


def iter_windows(lm, texts: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[list[int]]:
    """Token windows of at most the model's context, each wrapped in the tokenizer's special tokens.

    A document is cut every `room` tokens; its last window holds the rest. Streamed: memory holds one
    piece of text and its tokens, never the whole input.
    """
    prefix, suffix = lm.special_affixes
    room = lm.context_length - len(prefix) - len(suffix)
    buffer: list[int] = []
    for ids, ends_document in _token_pieces(lm.tokenizer, texts, chunk_chars):
        buffer.extend(ids)
        start = 0
        while len(buffer) - start >= room:
            yield prefix + buffer[start : start + room] + suffix
            start += room
        del buffer[:start]
        if ends_document and buffer:
            yield prefix + buffer + suffix
            buffer = []


def make_windows(lm, texts: Iterable[str]) -> list[list[int]]:
    """All the windows of `texts` as a list (iter_windows, for inputs that fit in memory)."""
    return list(iter_windows(lm, texts))


def _token_pieces(tokenizer, texts: Iterable[str], chunk_chars: int) -> Iterator[tuple[list[int], bool]]:
    """(token ids, ends its document) for each piece of each text, tokenized many pieces per call."""
    batch: list[tuple[str, bool]] = []
    size = 0

    def flush():
        encoded = tokenizer([piece for piece, _ in batch], add_special_tokens=False, verbose=False)["input_ids"]
        return zip(encoded, [last for _, last in batch], strict=True)

    for text in texts:
        for piece in _pieces(text, chunk_chars):
            batch.append(piece)
            size += len(piece[0])
            if size >= chunk_chars:
                yield from flush()
                batch, size = [], 0
    if batch:
        yield from flush()


def _pieces(text: str, size: int) -> Iterator[tuple[str, bool]]:
    """`text` in pieces of at most about `size` characters, each cut just before a space that stands
    between two non-spaces: byte-level BPE, WordPiece and SentencePiece all start a word there, so the
    pieces tokenize as the whole text does. (Text without such a space is cut at `size`.)"""
    start = 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind(" ", start + 1, end)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else end
        yield text[start:cut], False
        start = cut
    yield text[start:], True


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


def _mask_stratum(lm, ids: torch.Tensor, stratum: int, strata: int, g: torch.Generator):
    """(corrupted ids, masked positions, weight L / l): l of the window's L maskable tokens masked, l
    drawn uniformly from stratum `stratum` of `strata` equal parts of 1..L."""
    maskable = lm.maskable(ids).nonzero().flatten()
    u = (stratum + torch.rand(1, generator=g, dtype=torch.float64).item()) / strata
    count = min(len(maskable), int(u * len(maskable)) + 1)
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[maskable[torch.randperm(len(maskable), generator=g)[:count]]] = True
    return ids.masked_fill(masked, lm.mask_id), masked, len(maskable) / count


def _batched_ce(
    lm,
    noisy: list[torch.Tensor],
    masked: list[torch.Tensor],
    clean: list[torch.Tensor],
    sparse_head: bool,
    ranks: bool = True,
):
    """Cross-entropy [N] (and, with `ranks`, the target's rank [N]) at the masked positions of a batch.
    Without ranks, the sparse head never holds [N, V] logits at once (the model's chunked CE)."""
    length = max(len(x) for x in noisy)
    pad = lambda xs, value: torch.stack([F.pad(x, (0, length - len(x)), value=value) for x in xs])  # noqa: E731
    device = lm.device
    ids, pos, tgt = pad(noisy, lm.pad_id).to(device), pad(masked, False).to(device), pad(clean, lm.pad_id).to(device)
    attention = pad([torch.ones_like(x) for x in noisy], 0).to(device)
    if sparse_head and not ranks:  # CE chunk by chunk: an ELBO stratum near t = 1 masks every token
        return lm(ids, attention, positions=pos, targets=tgt[pos]).float().cpu(), None
    logits = lm(ids, attention, positions=pos) if sparse_head else lm.full_logits(ids, attention)[pos]
    logits = logits.float()
    targets = tgt[pos]
    ce = F.cross_entropy(logits, targets, reduction="none")
    if not ranks:
        return ce.cpu(), None
    rank = (logits > logits.gather(1, targets[:, None])).sum(dim=1)  # 0 = the target is the top-1 prediction
    return ce.cpu(), rank.cpu()


def evaluate(lm, texts: Iterable[str], **options) -> EvalResult:
    """Evaluate on documents (any iterable, streamed): `evaluate_windows(lm, iter_windows(lm, texts), **options)`."""
    return evaluate_windows(lm, iter_windows(lm, texts), **options)


def _batches(windows: Iterable[Sequence[int]], batch_size: int) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """Batches of (window index, ids), longest first within a buffer of a few batches: less padding,
    and the index (which seeds the masks) is the window's place in the input."""
    numbered = ((i, torch.tensor(w)) for i, w in enumerate(windows))
    while buffer := list(itertools.islice(numbered, batch_size * _SORT_BATCHES)):
        buffer.sort(key=lambda item: -len(item[1]))
        for b in range(0, len(buffer), batch_size):
            yield buffer[b : b + batch_size]


def pass_shapes(windows: Iterable[Sequence[int]], batch_size: int) -> list[tuple[int, int]]:
    """(rows, padded length) of each batch `evaluate_windows` forms from `windows`: every PPL pass and ELBO
    stratum runs one forward pass of each (what a caller needs to know the work before it starts)."""
    return [(len(batch), len(batch[0][1])) for batch in _batches(windows, batch_size)]


def _collapsed_strata_variance(x: torch.Tensor) -> torch.Tensor:
    """Estimated variance of sum_k x[k] for x [N strata, W windows], one draw per stratum: strata in
    consecutive pairs (the last three together when N is odd), sum over groups of n/(n-1) * sum of
    squared deviations from the group mean. [W]"""
    n = x.shape[0]
    bounds = list(range(0, n - 1, 2))
    groups = [(b, b + 2) for b in bounds[:-1]] + [(bounds[-1], n)] if n >= 2 else []
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for lo, hi in groups:
        group = x[lo:hi]
        total += (hi - lo) / (hi - lo - 1) * ((group - group.mean(dim=0)) ** 2).sum(dim=0)
    return total


@dataclass(frozen=True)
class Shard:
    """This process's share of an evaluation that several processes run together: the batches are formed
    alike everywhere and batch b is evaluated by process b % count (its masks are seeded by its windows'
    places in the input, so the figures equal one process's); `reduce` sums a tensor over the processes.
    `lockstep`: every process runs as many forward passes (under FSDP each forward is a collective), so a
    process with one batch fewer evaluates one more and drops it."""

    index: int
    count: int
    reduce: Callable[[torch.Tensor], torch.Tensor]
    lockstep: bool = False


class _Totals:
    """The sums an evaluation adds up: cross-entropy sum and count per pass, top-1 / top-5 hits, tokens,
    windows, the ELBO's sum and variance. One float64 vector, so processes add theirs in one reduce."""

    SCALARS = ("top1", "top5", "tokens", "windows", "nelbo_sum", "nelbo_var")

    def __init__(self, samples: int):
        self.samples = samples
        self.vector = torch.zeros(2 * samples + len(self.SCALARS), dtype=torch.float64)

    def _place(self, name: str, k: int | None) -> slice | int:
        if name in ("ce_sum", "ce_count"):
            first = 0 if name == "ce_sum" else self.samples
            return slice(first, first + self.samples) if k is None else first + k
        return 2 * self.samples + self.SCALARS.index(name)

    def add(self, name: str, value: float, k: int | None = None) -> None:
        self.vector[self._place(name, k)] += value

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.vector[self._place(name, None)]


def _add_batch(totals: _Totals, lm, batch, mask_ratio, seed, elbo_samples, bert_corruption, sparse_head) -> Iterator:
    """The sums of one batch of (window index, ids), added to `totals`; yields after each forward pass."""
    clean = [ids for _, ids in batch]
    for k in range(totals.samples):
        drawn = [_mask_window(lm, ids, mask_ratio, _generator(seed, k, i), bert_corruption) for i, ids in batch]
        ce, rank = _batched_ce(lm, [d[0] for d in drawn], [d[1] for d in drawn], clean, sparse_head)
        yield
        totals.add("ce_sum", float(ce.double().sum()), k)
        totals.add("ce_count", ce.numel(), k)
        totals.add("top1", int((rank == 0).sum()))
        totals.add("top5", int((rank < 5).sum()))
    if elbo_samples:
        x = torch.zeros(elbo_samples, len(batch), dtype=torch.float64)  # weighted CE sum per stratum, window
        for k in range(elbo_samples):
            drawn = [_mask_stratum(lm, ids, k, elbo_samples, _generator(seed, _ELBO_STREAM + k, i)) for i, ids in batch]
            ce, _ = _batched_ce(lm, [d[0] for d in drawn], [d[1] for d in drawn], clean, sparse_head, ranks=False)
            yield
            per_window = torch.split(ce.double(), [int(d[1].sum()) for d in drawn])
            x[k] = torch.stack([part.sum() * d[2] for part, d in zip(per_window, drawn, strict=True)])
        totals.add("nelbo_sum", float(x.sum()) / elbo_samples)
        totals.add("nelbo_var", float(_collapsed_strata_variance(x).sum()) / elbo_samples**2)
    totals.add("tokens", int(sum(lm.maskable(ids).sum() for ids in clean)))
    totals.add("windows", len(batch))


def evaluate_windows(lm, token_windows: Iterable[Sequence[int]], **options) -> EvalResult:
    """PPL at a mask ratio, the ELBO bound, top-1/top-5 accuracy: `iter_evaluation` run to its end (its
    options, its result)."""
    steps = iter_evaluation(lm, token_windows, **options)
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


@torch.no_grad()
def iter_evaluation(
    lm,
    token_windows: Iterable[Sequence[int]],
    *,
    mask_ratio: float = 0.15,
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    elbo_samples: int = ELBO_STRATA,
    bert_corruption: bool = False,
    sparse_head: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
    shard: Shard | None = None,
) -> Generator[None, None, EvalResult]:
    """PPL at `mask_ratio` (pooled over `samples` passes), the ELBO bound from `elbo_samples` strata
    (0 skips it), top-1/top-5 accuracy. `token_windows` may be any iterable: it is read once.
    `shard`: this process's share when several evaluate together (every process gets the whole result).

    A generator: it yields after each forward pass and returns the EvalResult, so a caller can run other
    work between two passes (the server's engine); `evaluate_windows` runs it to the end.
    progress(windows done, None) is called after each batch (the total is not known in advance).
    """
    if not (math.isfinite(mask_ratio) and 0.0 < mask_ratio < 1.0):
        raise UsageError(f"mask ratio must be in (0, 1), got {mask_ratio}")
    if samples < 1 or batch_size < 1:
        raise UsageError("samples and batch size must be at least 1")
    if elbo_samples < 0:
        raise UsageError(f"elbo_samples must be >= 0, got {elbo_samples}")
    start = time.perf_counter()
    totals = _Totals(samples)
    options = (mask_ratio, seed, elbo_samples, bert_corruption, sparse_head)
    batches = mine = 0
    spare = None  # a batch to run and drop (lockstep)
    for b, batch in enumerate(_batches(token_windows, batch_size)):
        batches, spare = b + 1, spare or batch
        if shard is not None and b % shard.count != shard.index:
            continue
        yield from _add_batch(totals, lm, batch, *options)
        mine += 1
        if progress:
            progress(int(totals["windows"]), None)
    if shard is not None:
        if shard.lockstep and spare is not None:
            for _ in range(-(-batches // shard.count) - mine):
                yield from _add_batch(_Totals(samples), lm, spare, *options)
        totals.vector = shard.reduce(totals.vector)

    tokens, masked_tokens = int(totals["tokens"]), int(totals["ce_count"].sum())
    if tokens == 0:
        raise UsageError("the data has no tokens to evaluate")
    if (totals["ce_count"] == 0).any():
        raise UsageError("no token was masked in a pass: the data is too short for this mask ratio")
    pass_ce = totals["ce_sum"] / totals["ce_count"]
    ppl = math.exp(float(totals["ce_sum"].sum()) / masked_tokens)
    elbo_ppl = math.exp(float(totals["nelbo_sum"]) / tokens) if elbo_samples else None
    return EvalResult(
        ppl=ppl,
        ppl_stderr=ppl * float(pass_ce.std() / math.sqrt(samples)) if samples > 1 else None,
        elbo_ppl=elbo_ppl,
        elbo_ppl_stderr=elbo_ppl * math.sqrt(float(totals["nelbo_var"])) / tokens
        if elbo_ppl and elbo_samples >= 2
        else None,
        elbo_samples=elbo_samples,
        tokens=tokens,
        masked_tokens=masked_tokens,
        top1=float(totals["top1"]) / masked_tokens,
        top5=float(totals["top5"]) / masked_tokens,
        mask_ratio=mask_ratio,
        samples=samples,
        pass_ppl=[math.exp(float(c)) for c in pass_ce],
        windows=int(totals["windows"]),
        seconds=time.perf_counter() - start,
    )
