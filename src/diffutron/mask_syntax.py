"""The mask syntax of user text: `<mask>` is one token to fill, `<mask*N>` is N, and the tokenizer's
own mask token works too. Fill-mask and the infilling canvas both read text this way.
"""

from __future__ import annotations

import re

from diffutron.errors import UsageError

PLACEHOLDER = "<mask>"
SPAN = re.compile(r"<mask(?:\*(\d+))?>")


def encode_with_masks(lm, text: str) -> list[int]:
    """Token ids of `text` with every `<mask>` (one token), `<mask*N>` (N tokens) or the tokenizer's
    own mask token as the mask id."""
    own = lm.tokenizer.mask_token
    counts = [_count(m) for m in SPAN.finditer(text)]
    if not counts and own not in text:
        raise UsageError(f"the text has no {PLACEHOLDER} to fill")
    if 0 in counts:
        raise UsageError("<mask*0> asks for no token: write <mask*N> with N >= 1, or leave it out")
    if sum(counts) > lm.context_length:  # checked before the text is built: <mask*10**9> would be 6 GB of text
        raise UsageError(
            f"the text asks for {sum(counts):,} masks, more than the model's context of {lm.context_length}"
        )
    ids = lm.tokenizer(SPAN.sub(lambda m: own * _count(m), text), verbose=False)["input_ids"]
    if len(ids) > lm.context_length:
        raise UsageError(f"the text is {len(ids)} tokens long, more than the model's context of {lm.context_length}")
    return ids


def count_masks(lm, text: str) -> int:
    """How many masks `text` asks for, without tokenising it (cheap, for a limit checked up front)."""
    own = lm.tokenizer.mask_token
    return sum(_count(m) for m in SPAN.finditer(text)) + SPAN.sub("\0", text).count(own)


def _count(match: re.Match) -> int:
    digits = match.group(1)
    return 1 if digits is None else int(digits) if len(digits) <= 18 else 10**18  # no 4,300-digit int()
