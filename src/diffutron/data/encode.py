"""Texts -> token ids as int32 arrays, through the tokenizers library's batch encoder.

Calling a `transformers` tokenizer builds, for every token, Python ints for the ids, the attention
mask and the offsets; the pipeline needs the ids only. `TokenEncoder` calls the Rust tokenizer's
`encode_batch_fast` (no offsets) on a private copy of the backend, with truncation, padding and
special tokens off, and hands the ids on as numpy arrays: 4 bytes a token instead of a Python int.

Long documents are encoded in pieces of about `piece_chars` characters, so the tokenizer never holds
a whole 50 MB document's encoding (tens of bytes a token) and the pieces encode in parallel. A piece
ends just before a space that follows a non-space character and precedes one (`word| word`): with a
byte-level BPE as GPT-2's and the bundled tokenizer's, whose pre-tokenizer splits there anyway, the
ids are those of the whole text; other tokenizers (SentencePiece-style) may differ in the token at a
cut, one per `piece_chars` characters. With no such space in reach, a piece is cut where it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

PIECE_CHARS = 1 << 16  # characters of a long document encoded at a time
BATCH_CHARS = 1 << 20  # characters per call of the Rust encoder: bounds its memory (~150 bytes a token)
_CUT = re.compile(r"(?<=\S) (?=\S)")


def cut_points(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[int]:
    """Where `text` is cut into pieces (see the module docstring); nothing for a short text."""
    start = 0
    while len(text) - start > piece_chars:
        found = _CUT.search(text, start + piece_chars, start + 2 * piece_chars)
        start = found.start() if found else start + piece_chars
        yield start


class TokenEncoder:
    """`encoder(texts)` -> one int32 array of token ids per text, no special tokens added."""

    def __init__(self, tokenizer, piece_chars: int = PIECE_CHARS, batch_chars: int = BATCH_CHARS):
        self.piece_chars, self.batch_chars = piece_chars, batch_chars
        self.tokenizer, self.backend = tokenizer, None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            self.backend = _private_backend(backend.to_str(), bool(getattr(tokenizer, "split_special_tokens", False)))

    def portable(self):
        """What a worker process needs to build the same encoder without loading `transformers`
        (seconds a worker): the Rust tokenizer as JSON, or None where there is no Rust tokenizer."""
        return None if self.backend is None else (self.backend.to_str(), self.backend.encode_special_tokens)

    @classmethod
    def from_portable(cls, portable) -> TokenEncoder:
        encoder = cls.__new__(cls)
        encoder.piece_chars, encoder.batch_chars, encoder.tokenizer = PIECE_CHARS, BATCH_CHARS, None
        encoder.backend = _private_backend(*portable)
        return encoder

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        ids: list[list[np.ndarray]] = [[] for _ in texts]
        batch, owner, size = [], [], 0
        for i, piece in self._pieces(texts):  # pieces are cut as the batches fill: one batch in memory
            if batch and size + len(piece) > self.batch_chars:
                self._encode_into(ids, batch, owner)
                batch, owner, size = [], [], 0
            batch.append(piece)
            owner.append(i)
            size += len(piece)
        if batch:
            self._encode_into(ids, batch, owner)
        return [parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in ids]

    def _pieces(self, texts: list[str]) -> Iterator[tuple[int, str]]:
        for i, text in enumerate(texts):
            start = 0
            for cut in cut_points(text, self.piece_chars):
                yield i, text[start:cut]
                start = cut
            yield i, text[start:] if start else text

    def _encode_into(self, ids: list[list[np.ndarray]], batch: list[str], owner: list[int]) -> None:
        for i, piece_ids in zip(owner, self._encode(batch), strict=True):
            ids[i].append(piece_ids)

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        if self.backend is not None:
            encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
            return [np.array(e.ids, dtype=np.int32) for e in encodings]
        batch = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.array(x, dtype=np.int32) for x in batch]


def _private_backend(json: str, split_special_tokens: bool):
    """A Rust tokenizer of our own, truncation and padding off (the caller's settings stay its own)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(json)
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = split_special_tokens
    return backend
