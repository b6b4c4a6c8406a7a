"""Blanks of unknown length: whole-word candidates at `<word>` (fill-mask) and the best length of
`<mask*?>` / `<mask*A-B>` (infill), ranked by one score that is comparable across lengths.

The score. A masked LM gives no left-to-right probability, so a filling is scored by pseudo-log-
likelihood: Salazar et al. 2020 ("Masked Language Model Scoring", ACL) score a sentence by the sum over
its tokens of log p(x_t | the sentence with x_t masked). For a word of several tokens that sum is
inflated: each of its tokens is predicted with the word's other tokens visible ("Cumhuriyet" + "i"
makes "i" nearly certain). Kauf & Ivanova 2023 ("A Better Way to Do Masked Language Model Scoring",
ACL) fix it with PLL-word-l2r: token t is predicted with t *and the tokens after it within its word*
masked, so a word's tokens are scored left to right as a chain,
    log p(w) ~ sum_i log p(w_i | context, w_<i, [MASK] x (n - i + 1)),
which is also one term of the masked-diffusion ELBO that likelihood.py estimates (MDLM, Sahoo et al.
2024; LLaDA's conditional form, Nie et al. 2025): that bound averages such chains over random
orders (the any-order autoregressive view of absorbing diffusion, Ou et al. 2024), and for a one-token
filling every one of them is the same number, log p(w | context), exact. The l2r chain is the one
order a beam search computes for free, so the search and the score agree.

Comparable across lengths. The number of masks tells the model the length: a span's own chain,
log p(w | n), is conditioned on n, and a fragment ("Cumhur" where "Cumhuriyeti" belongs) can score
well at a short length. So a filling's score adds the PLL-word-l2r terms of the `context` words on each
side of the blank (SCORE_CONTEXT by default): the next word is predicted after the filling, and
"şehridir" after a fragment is unlikely. Every candidate's score is then the same sum over the same
context tokens plus its own tokens, a PLL-word-l2r of the sentence restricted to a window (context=None:
the whole sentence, Kauf & Ivanova's sentence score exactly). Longer fillings pay for each token, as a
likelihood does. One word a side is the default; `benchmarks/word_fill.py --context N` measures others.

Search (`<word>`). For each length n in 1..K (K: the tokenizer's word lengths on the bundled corpus,
`word_length_limit`), a beam search fills the span left to right, keeping the `beam` best chains; a
token is allowed only where it keeps the span one whole word (its first token starts a word, the
others continue it: `WordPieces`). The lengths run batched, one forward per step. The chains' sums are
the span's PLL-word-l2r terms; the final candidates of every length get their context terms, one
forward for all, and are deduplicated by text (the best tokenisation of a word kept). The search runs
left to right only: that is the order whose chain is the score. A search in confidence order (LLaDA's
most-confident-first, then rescored left to right) is not implemented, so not measured against it.

Unknown length (`<mask*?>`). The sampler fills the span at every length, one row per length batched,
each as `<mask*n>` alone would be filled; each filling is scored as above and the best one is the answer.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass

import torch

from diffutron.errors import UsageError
from diffutron.mask_syntax import Blank, blanks, count_masks, expand

DEFAULT_BEAM = 8
SCORE_CONTEXT = 1  # words on each side of a blank whose terms join its score
WORD_COVERAGE = 0.99  # K covers this share of the words of the bundled corpus
MAX_WORD_TOKENS = 16  # the most tokens a word blank may be asked to try
ROWS_PER_FORWARD = 256  # rows of one scoring forward pass

_LETTERS = r"[^\W_]+"  # letters and digits
_PIECE = re.compile(rf"^['’]?{_LETTERS}(?:['’]{_LETTERS})*['’]?$|^['’]$")
_WORD = re.compile(rf"{_LETTERS}(?:['’]{_LETTERS})*")


@dataclass
class WordCandidate:
    text: str  # the word, without the space before it
    tokens: list[int]
    length: int  # tokens
    score: float  # PLL-word-l2r of the word and the context words around it (comparable across lengths)
    sequence: str | None = None  # the text with the word in place (other blanks left as placeholders)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "sequence" or v is not None}


class WordCandidates(list):
    """The candidates of one `<word>`, best first (a list of WordCandidate, typed so that fill-mask's
    answer tells them from a mask's)."""


# -- what counts as a word -------------------------------------------------------------------------
@dataclass(frozen=True)
class WordPieces:
    """Per token of the vocabulary: may it be part of a word (letters and digits, an apostrophe inside
    a word: "Cumhuriyeti'nin"), does it start with a space, does it begin or end with an apostrophe."""

    usable: torch.Tensor  # [V] bool
    space: torch.Tensor
    lead_apostrophe: torch.Tensor
    trail_apostrophe: torch.Tensor

    def first(self, space: bool) -> torch.Tensor:
        """[V] tokens that may start a word after a space (`space`) or after punctuation / at the start."""
        return self.usable & (self.space == space) & ~self.lead_apostrophe

    def after(self, previous: torch.Tensor) -> torch.Tensor:
        """[H, V] tokens that may continue words whose last tokens are `previous` [H] (no "''")."""
        joined = self.usable & ~self.space
        return joined[None, :] & ~(self.trail_apostrophe[previous][:, None] & self.lead_apostrophe[None, :])

    def continues(self, ids: Sequence[int]) -> list[bool]:
        """For each token of a sequence: does it continue the word of the token before it?"""
        joined = (self.usable & ~self.space).tolist()
        usable = self.usable.tolist()
        size = len(usable)
        ok = [0 <= t < size and joined[t] for t in ids]
        return [i > 0 and ok[i] and 0 <= ids[i - 1] < size and usable[ids[i - 1]] for i in range(len(ids))]


@functools.lru_cache(maxsize=4)
def word_pieces(tokenizer) -> WordPieces:
    """The classes of every token, read from how it decodes after a letter (a leading space shows there
    for byte-level BPE, SentencePiece and WordPiece alike)."""
    reference = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
    prefix = len(tokenizer.decode(reference, clean_up_tokenization_spaces=False))
    size = len(tokenizer)
    joined = tokenizer.batch_decode([reference + [i] for i in range(size)], clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids)
    usable, space, lead, trail = [], [], [], []
    for i, text in enumerate(joined):
        text = text[prefix:]
        piece = text[1:] if text.startswith(" ") else text
        usable.append(i not in special and bool(_PIECE.match(piece)))
        space.append(text.startswith(" "))
        lead.append(piece[:1] in ("'", "’"))
        trail.append(piece[-1:] in ("'", "’"))
    return WordPieces(*(torch.tensor(flags) for flags in (usable, space, lead, trail)))


@functools.lru_cache(maxsize=4)
def word_length_limit(tokenizer, coverage: float = WORD_COVERAGE, sample: int = 5000) -> int:
    """K: the fewest tokens that hold `coverage` of the words of the bundled corpus (a sample of `sample`
    words spread over its train split), each tokenised after a space as in running text."""
    from diffutron.data.bundled import bundled_documents

    words = [w for d in bundled_documents("train") for w in _WORD.findall(d.text)]
    chosen = words[:: max(1, len(words) // sample)]
    lengths = sorted(len(ids) for ids in tokenizer([" " + w for w in chosen], add_special_tokens=False)["input_ids"])
    return max(1, lengths[min(len(lengths) - 1, math.ceil(coverage * len(lengths)) - 1)])


# -- the score -------------------------------------------------------------------------------------
def word_ends(pieces: WordPieces, ids: Sequence[int], breaks: Collection[int] = ()) -> list[int]:
    """For each position, the last position of its word; a word also starts at each of `breaks` (a
    blank's edges: the filling is a word of its own)."""
    continues = pieces.continues(ids)
    ends = list(range(len(ids)))
    for i in range(len(ids) - 2, -1, -1):
        if continues[i + 1] and i + 1 not in breaks:
            ends[i] = ends[i + 1]
    return ends


def scored_positions(
    pieces: WordPieces, ids: Sequence[int], span: tuple[int, int], context: int | None, breaks: Collection[int] = ()
) -> list[int]:
    """The positions whose terms make the score of `span` [start, end): its own tokens and those of
    `context` words on each side of it (None: the whole sequence)."""
    start, end = span
    if context is None:
        return list(range(len(ids)))
    ends = word_ends(pieces, ids, breaks)
    starts = [i for i in range(len(ids)) if i == 0 or ends[i - 1] == i - 1]
    before = [s for s in starts if s < start][-context:] if context else []
    after = [s for s in starts if s >= end]
    lo = before[0] if before else start
    hi = after[context] if len(after) > context else len(ids)
    return list(range(lo, hi))


@torch.no_grad()
def l2r_terms(
    lm,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    breaks: Sequence[Collection[int]] | None = None,
) -> list[list[float]]:
    """PLL-word-l2r terms: for each sequence (with the frame: [CLS] ... [SEP]) and each of its `positions`
    t, log p(x_t | the sequence with t and the rest of t's word masked); 0 in the frame. `breaks`: per
    sequence, positions where a word starts whatever the tokens say (see `word_ends`)."""
    pieces = word_pieces(lm.tokenizer)
    prefix, suffix = (len(a) for a in lm.special_affixes)
    rows, where = [], []
    for s, (ids, wanted) in enumerate(zip(sequences, positions, strict=True)):
        ends = word_ends(pieces, ids, breaks[s] if breaks is not None else ())
        for t in wanted:
            if t < prefix or t >= len(ids) - suffix:
                continue
            row = list(ids)
            row[t : ends[t] + 1] = [lm.mask_id] * (ends[t] + 1 - t)
            rows.append((row, [t], [ids[t]]))
            where.append((s, t))
    terms = [dict.fromkeys(wanted, 0.0) for wanted in positions]
    for (s, t), value in zip(where, _target_logprobs(lm, rows), strict=True):
        terms[s][t] = value
    return [[terms[s][t] for t in wanted] for s, wanted in enumerate(positions)]


def _target_logprobs(lm, rows: list[tuple[list[int], list[int], list[int]]]) -> list[float]:
    """For rows (ids, positions, targets): log p(target) at each position, all in order, a batch of
    rows at a time."""
    values: list[float] = []
    for chunk in range(0, len(rows), ROWS_PER_FORWARD):
        part = rows[chunk : chunk + ROWS_PER_FORWARD]
        logp = _logprobs(lm, [r[0] for r in part], [r[1] for r in part])
        targets = torch.tensor([t for r in part for t in r[2]], device=logp.device)
        values += logp.gather(1, targets[:, None]).squeeze(1).tolist()
    return values


def _logprobs(lm, rows: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """log-softmax [N, V] (float32) at the given positions of each row, in row-major order: the rows
    padded into one batch, the head only at those positions (each row lists its positions in order)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), lm.pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    at = torch.zeros_like(ids, dtype=torch.bool)
    for i, (row, where) in enumerate(zip(rows, positions, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        at[i, where] = True
    logits = lm(ids.to(lm.device), attention.to(lm.device), positions=at.to(lm.device))
    return logits.float().log_softmax(dim=-1)


def span_scores(
    lm,
    sequences: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    context: int | None = SCORE_CONTEXT,
    word: bool = False,
) -> list[float]:
    """The comparable score of each filled sequence's span [start, end): the sum of the PLL-word-l2r
    terms of its tokens and of `context` words on each side (None: the whole sequence). `word`: the span
    is one word of its own (a <word> blank), whatever the tokens beside it."""
    pieces = word_pieces(lm.tokenizer)
    breaks = [set(span) if word else set() for span in spans]
    positions = [
        scored_positions(pieces, ids, span, context, b) for ids, span, b in zip(sequences, spans, breaks, strict=True)
    ]
    return [sum(terms) for terms in l2r_terms(lm, sequences, positions, breaks)]


# -- the search ------------------------------------------------------------------------------------
@dataclass
class Chain:
    tokens: list[int]
    score: float  # the sum of its tokens' l2r terms


@torch.no_grad()
def search_words(
    lm, left: list[int], right: list[int], lengths: Sequence[int], beam: int, space: bool
) -> dict[int, list[Chain]]:
    """Per length n, the `beam` best one-word chains of n tokens between `left` and `right` (ids with the
    frame) by the sum of their l2r terms, best first: a beam search left to right, the lengths batched
    (one forward a step). `space`: the word's first token carries the space before it."""
    pieces = word_pieces(lm.tokenizer)
    size = len(pieces.usable)
    first = pieces.first(space).to(lm.device)
    no_trail = (~pieces.trail_apostrophe).to(lm.device)
    beams = {n: [Chain([], 0.0)] for n in lengths}
    for i in range(max(lengths)):
        owners = [(n, chain) for n in lengths if n > i for chain in beams[n]]
        if not owners:
            break
        rows = [left + chain.tokens + [lm.mask_id] * (n - i) + right for n, chain in owners]
        logp = _logprobs(lm, rows, [[len(left) + i]] * len(rows))[:, :size]
        if i == 0:
            allowed = first.expand(len(rows), -1)
        else:
            allowed = pieces.after(torch.tensor([chain.tokens[-1] for _, chain in owners])).to(lm.device)
        ending = torch.tensor([n == i + 1 for n, _ in owners], device=lm.device)
        allowed = allowed & (no_trail[None, :] | ~ending[:, None])  # a word does not end on an apostrophe
        scores = torch.tensor([chain.score for _, chain in owners], device=lm.device, dtype=torch.float64)
        totals = (scores[:, None] + logp.double()).masked_fill(~allowed, float("-inf"))
        row = 0
        for n in lengths:
            if n <= i:
                continue
            chains = beams[n]
            block = totals[row : row + len(chains)].flatten()
            row += len(chains)
            best = block.topk(min(beam, int(torch.isfinite(block).sum())))
            beams[n] = [
                Chain(chains[k // size].tokens + [k % size], value)
                for value, k in zip(best.values.tolist(), best.indices.tolist(), strict=True)
            ]
    return beams


def fill_words(
    lm,
    text: str,
    top_k: int = 5,
    max_tokens: int | None = None,
    beam: int = DEFAULT_BEAM,
    context: int | None = SCORE_CONTEXT,
    sequences: bool = True,
    lengths: Sequence[int] | None = None,
) -> list[WordCandidates]:
    """For each `<word>` of `text`, in order, its `top_k` whole-word candidates of 1..`max_tokens` tokens
    (default: `word_length_limit`), best first. The other blanks stay masked meanwhile: `<mask*N>` as N
    masks, another `<word>` as one. `lengths` fixes the lengths tried (the benchmark's oracle)."""
    if top_k < 1 or beam < 1:
        raise UsageError(f"top-k and beam must be at least 1, got {top_k} and {beam}")
    lengths = list(lengths) if lengths is not None else list(range(1, word_limit(lm, max_tokens) + 1))
    found = blanks(text)
    variable = [b for b in found if b.variable]
    if any(not b.word for b in variable):
        raise UsageError("fill-mask fills <mask>, <mask*N> and <word>; a span of unknown length (<mask*?>) is infill's")
    return [_fill_one(lm, text, blank, variable, lengths, top_k, beam, context, sequences) for blank in variable]


def word_limit(lm, max_tokens: int | None) -> int:
    """K: `max_tokens`, or the tokenizer's word lengths on the bundled corpus."""
    limit = max_tokens if max_tokens is not None else word_length_limit(lm.tokenizer)
    if not 1 <= limit <= MAX_WORD_TOKENS:
        raise UsageError(f"max-tokens must be in 1..{MAX_WORD_TOKENS}, got {limit}")
    return limit


def _fill_one(lm, text, blank, variable, lengths, top_k, beam, context, sequences) -> WordCandidates:
    space = _space_before(lm, text, blank)
    ones = [1] * len(variable)
    ids = lm.tokenizer(expand(lm, text, ones), verbose=False)["input_ids"]
    before = [b for b in variable if b.start < blank.start]
    at = [i for i, t in enumerate(ids) if t == lm.mask_id][count_masks(lm, text[: blank.start], [1] * len(before))]
    left, right = ids[:at], ids[at + 1 :]
    if len(left) + max(lengths) + len(right) > lm.context_length:
        raise UsageError(
            f"the text with a word of {max(lengths)} tokens is {len(left) + max(lengths) + len(right)} tokens long, "
            f"more than the model's context of {lm.context_length}"
        )
    chains = search_words(lm, left, right, lengths, beam, space)
    finals = [chain for n in lengths for chain in chains[n]]
    filled = [left + chain.tokens + right for chain in finals]
    spans = [(at, at + len(chain.tokens)) for chain in finals]
    pieces = word_pieces(lm.tokenizer)
    positions = [
        [p for p in scored_positions(pieces, row, span, context, span) if not span[0] <= p < span[1]]
        for row, span in zip(filled, spans, strict=True)
    ]
    around = l2r_terms(lm, filled, positions, spans)
    best: dict[str, WordCandidate] = {}
    for chain, terms in zip(finals, around, strict=True):
        word = lm.tokenizer.decode(chain.tokens, clean_up_tokenization_spaces=False).strip()
        candidate = WordCandidate(word, chain.tokens, len(chain.tokens), chain.score + sum(terms))
        if word not in best or candidate.score > best[word].score:
            best[word] = candidate  # one word, several tokenisations: the best kept
    ranked = WordCandidates(sorted(best.values(), key=lambda c: -c.score)[:top_k])
    if sequences:
        for c in ranked:
            c.sequence = text[: blank.start] + c.text + text[blank.end :]
    return ranked


def _space_before(lm, text: str, blank: Blank) -> bool:
    """Whether the word's first token carries a space: a space before the blank that the mask token
    swallows (an lstrip mask, as the shipped tokenizer's). A <word> must stand apart from letters."""
    before, after = text[: blank.start][-1:], text[blank.end :][:1]
    if _LETTER.match(before) or _LETTER.match(after):
        raise UsageError("<word> is a whole word: put a space or punctuation between it and the letters beside it")
    added = lm.tokenizer.added_tokens_decoder.get(lm.mask_id)
    return before.isspace() and bool(getattr(added, "lstrip", False))


_LETTER = re.compile(r"[^\W_]")


# -- unknown length --------------------------------------------------------------------------------
@dataclass
class LengthChoice:
    row: int  # the row kept for the text
    lengths: list[dict] | None  # every length tried, in order: {"length", "score", "text"}; None: a fixed text


def best_lengths(
    lm,
    spans: Sequence[tuple[int, tuple[int, int] | None]],
    rows: Sequence[Sequence[int]],
    texts: Sequence[str],
    context: int | None = SCORE_CONTEXT,
) -> list[LengthChoice]:
    """Per text, in order, the filled row to keep: of the rows of its unknown-length span (`spans`: per
    row, the text it fills and the span's [start, end) in the row's tokens `rows`, with the frame), the one
    whose filling has the best `span_scores`; a text without such a span keeps its one row."""
    scored = [i for i, (_, span) in enumerate(spans) if span is not None]
    values = span_scores(lm, [rows[i] for i in scored], [spans[i][1] for i in scored], context)
    values = dict(zip(scored, values, strict=True))
    choices: dict[int, LengthChoice] = {}
    for i, (text, span) in enumerate(spans):
        if span is None:
            choices[text] = LengthChoice(i, None)
            continue
        choice = choices.setdefault(text, LengthChoice(i, []))
        choice.lengths.append({"length": span[1] - span[0], "score": values[i], "text": texts[i]})
        if values[i] > values[choice.row]:
            choice.row = i
    return [choices[t] for t in sorted(choices)]
