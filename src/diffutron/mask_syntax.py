"""The mask syntax of user text. Fill-mask and the infilling canvas both read text this way:

- `<mask>` is one token to fill, `<mask*N>` is N, and the tokenizer's own mask token works too;
- `<mask*?>` is a span of unknown length (1 to SPAN_LIMIT tokens), `<mask*A-B>` one of A to B tokens:
  infill tries every length (word_fill.py);
- `<word>` is one whole word of unknown length: fill-mask proposes words (word_fill.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from diffutron.errors import UsageError

PLACEHOLDER = "<mask>"
WORD = "<word>"
SPAN_LIMIT = 8  # the longest length `<mask*?>` tries: a short phrase
# every placeholder: <mask>, <mask*N>, <mask*?>, <mask*A-B>, <word>
SPAN = re.compile(r"<mask(?:\*(?:(\d+)|(\?)|(\d+)-(\d+)))?>|<word>")
_HUGE = 10**18  # a count of more digits than this is not parsed (no 4,300-digit int())


@dataclass(frozen=True)
class Blank:
    """One placeholder of a text: where it is and the token counts it may hold."""

    start: int  # its characters in the text: text[start:end]
    end: int
    shortest: int
    longest: int
    word: bool = False  # <word>: a whole word, its length the search's to choose

    @property
    def variable(self) -> bool:
        return self.word or self.longest > self.shortest

    @property
    def lengths(self) -> range:
        return range(self.shortest, self.longest + 1)


def blanks(text: str, word_limit: int = 1) -> list[Blank]:
    """The placeholders of `text` in order (not the tokenizer's own mask token: one token each, counted
    apart). `word_limit`: the longest length of a `<word>` (only counted here)."""
    found = []
    for match in SPAN.finditer(text):
        fixed, unknown, low, high = match.groups()
        if match.group(0) == WORD:
            shortest, longest, word = 1, word_limit, True
        elif unknown:
            shortest, longest, word = 1, SPAN_LIMIT, False
        elif low is not None:
            shortest, longest, word = _number(low), _number(high), False
            if shortest > longest:
                raise UsageError(f"{match.group(0)}: a range of lengths goes up (write <mask*{high}-{low}>)")
        else:
            shortest = longest = 1 if fixed is None else _number(fixed)
            word = False
        if shortest == 0:
            raise UsageError(f"{match.group(0)} asks for no token: write <mask*N> with N >= 1, or leave it out")
        found.append(Blank(match.start(), match.end(), shortest, longest, word))
    return found


def expand(lm, text: str, lengths: list[int] | None = None) -> str:
    """`text` with each placeholder as its mask tokens; the variable ones (<mask*?>, <mask*A-B>, <word>),
    in order, take `lengths` (each within its range)."""
    own = lm.tokenizer.mask_token
    found = blanks(text, word_limit=_HUGE)
    variable = [b for b in found if b.variable]
    if lengths is None and variable:
        first = text[variable[0].start : variable[0].end]
        raise UsageError(
            f"{first} has no fixed length: "
            + ("`fill-mask` proposes whole words at <word>" if variable[0].word else "`infill` fills it")
        )
    chosen = iter(lengths or [])
    pieces, end = [], 0
    for blank in found:
        count = next(chosen) if blank.variable else blank.shortest
        pieces += [text[end : blank.start], own * count]
        end = blank.end
    return "".join(pieces + [text[end:]])


def encode_with_masks(lm, text: str, lengths: list[int] | None = None) -> list[int]:
    """Token ids of `text` with every placeholder (`lengths` for the variable ones: see `expand`) or the
    tokenizer's own mask token as the mask id."""
    found = blanks(text, word_limit=_HUGE)
    if not found and lm.tokenizer.mask_token not in text:
        raise UsageError(f"the text has no {PLACEHOLDER} to fill")
    # checked before the text is built: <mask*10**9> would be 6 GB of text
    asked = count_masks(lm, text, lengths)
    if asked > lm.context_length:
        raise UsageError(f"the text asks for {asked:,} masks, more than the model's context of {lm.context_length}")
    ids = lm.tokenizer(expand(lm, text, lengths), verbose=False)["input_ids"]
    if len(ids) > lm.context_length:
        raise UsageError(f"the text is {len(ids)} tokens long, more than the model's context of {lm.context_length}")
    return ids


def count_masks(lm, text: str, lengths: list[int] | None = None, word_limit: int = 1) -> int:
    """How many masks `text` asks for, without tokenising it (cheap, for a limit checked up front): the
    variable placeholders count `lengths` if given, else their longest (`word_limit` for a <word>)."""
    own = lm.tokenizer.mask_token
    found = blanks(text, word_limit)
    chosen = iter(lengths or [])
    counted = sum(next(chosen) if lengths is not None and b.variable else b.longest for b in found)
    return counted + SPAN.sub("\0", text).count(own)


def _number(digits: str) -> int:
    return int(digits) if len(digits) <= 18 else _HUGE
