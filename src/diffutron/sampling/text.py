"""The text of a row's settled prefix, decoded incrementally, and the stop strings found in it.

A diffusion canvas settles left to right only in the sense that the text is final up to the first
mask. Stop strings are matched on that text, not on their stand-alone tokenization: " Soru" in running
text is one token while "Soru" alone is two, and "." is inside the token `."`. Decoding the whole
prefix every step would be quadratic, so new tokens are decoded with a few tokens of left context, as
incremental detokenizers do (the context fixes leading-space and multi-byte boundaries); text that
ends in an incomplete character waits for the next token.
"""

from __future__ import annotations


class SettledText:
    """Grows with the settled tokens of one row; `stop_at` is where the first stop string begins."""

    def __init__(self, decode, stops: tuple[str, ...] = ()):
        self.decode = decode  # ids -> text, the same function that decodes the final result
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.text = ""
        self.stop_at: int | None = None  # character index of the first stop string, once found
        self._prefix = 0  # tokens [_prefix, _read) give the left context of the next decode
        self._read = 0
        self._searched = 0  # characters already searched for stop strings

    def extend(self, new_ids: list[int]) -> str:
        """Add settled tokens; return the text they complete (may be "" while a character is split)."""
        if not new_ids:
            return ""
        self.ids.extend(new_ids)
        before = self.decode(self.ids[self._prefix : self._read])
        after = self.decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        self._find_stop()
        return delta

    def _find_stop(self) -> None:
        if self.stop_at is not None or not self.stops:
            return
        longest = max(len(s) for s in self.stops)
        start = max(0, self._searched - longest + 1)  # a stop may straddle the previous delta
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.stop_at = min(found)
        self._searched = len(self.text)

    def tokens_before(self, chars: int) -> int:
        """How many settled tokens decode to text that ends at or before character `chars`."""
        lo, hi = 0, len(self.ids)
        while lo < hi:  # the largest k with len(decode(ids[:k])) <= chars; only when a stop is found
            mid = (lo + hi + 1) // 2
            if len(self.decode(self.ids[:mid])) <= chars:
                lo = mid
            else:
                hi = mid - 1
        return lo
