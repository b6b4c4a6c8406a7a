"""Tokenized documents -> fixed blocks of `max_length` tokens -> Arrow shards that `load_from_disk` opens.

Packing (`mode="pack"`, the reference recipe): documents are concatenated into one stream with the
tokenizer's end-of-sequence tokens ([SEP]) between them, and cut into blocks that each start with
its beginning tokens ([CLS]): `[CLS] doc1 [SEP] doc2 [SEP] doc3...`. No token is lost or repeated; the
stream's tail is padded (`tail="pad"`, with an attention mask), kept shorter (`"keep"`) or dropped.
Document-aligned (`mode="document"`): each document alone, `[CLS] chunk [SEP]`, padded.

The blocks go to `diffutron.data.folder`, which writes them as Arrow shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("pack", "document")
TAILS = ("pad", "keep", "drop")


@dataclass
class PackConfig:
    max_length: int = 512
    mode: str = "pack"
    tail: str = "pad"
    shard_size: int = 4096  # sequences per shard, at most (shards are of equal size, ± 1)

    def validate(self) -> None:
        from diffutron.errors import UsageError

        if self.mode not in MODES or self.tail not in TAILS:
            raise UsageError(f"pack mode must be one of {MODES} and tail one of {TAILS}")
        if self.max_length < 8 or self.shard_size < 1:
            raise UsageError("max_length must be at least 8 and shard_size at least 1")

    @property
    def padded(self) -> bool:
        return self.mode == "document" or self.tail == "pad"


class Packer:
    """Documents' token ids in (int32 arrays, in order), complete blocks out.

    `take()` returns the blocks completed so far as (ids [n, max_length], lengths [n]): every row is
    `max_length` wide, padded with `pad_id` after its `length` real tokens.
    """

    def __init__(self, config: PackConfig, prefix: list[int], suffix: list[int], pad_id: int):
        self.config, self.pad_id = config, pad_id
        self.prefix, self.suffix = np.asarray(prefix, dtype=np.int32), np.asarray(suffix, dtype=np.int32)
        self.room = config.max_length - len(prefix)  # tokens of the stream per block
        self.stream: list[np.ndarray] = []  # pack mode: documents and separators not yet in a block
        self.documents: list[tuple[np.ndarray, np.ndarray]] = []  # document mode: blocks made

    def add(self, ids: np.ndarray) -> None:
        if self.config.mode == "document":
            room = self.room - len(self.suffix)
            pieces = [ids[i : i + room] for i in range(0, max(len(ids), 1), room)]
            self.documents.append(self._rows([np.concatenate([p, self.suffix]) for p in pieces]))
        else:
            self.stream += [ids, self.suffix]

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        if self.config.mode == "document":
            done, self.documents = self.documents, []
            return _stack(done, self.config.max_length)
        stream = np.concatenate(self.stream) if self.stream else np.zeros(0, np.int32)
        count = len(stream) // self.room
        self.stream = [stream[count * self.room :]]
        ids = np.empty((count, self.config.max_length), dtype=np.int32)
        ids[:, : len(self.prefix)] = self.prefix
        ids[:, len(self.prefix) :] = stream[: count * self.room].reshape(count, self.room)
        return ids, np.full(count, self.config.max_length, dtype=np.int32)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """The blocks still to take, with the stream's tail as the config says (pad, keep or drop)."""
        ids, lengths = self.take()
        tail = self.stream[0] if self.stream else np.zeros(0, np.int32)
        self.stream = []
        if self.config.mode == "document" or not len(tail) or self.config.tail == "drop":
            return ids, lengths
        last_ids, last_lengths = self._rows([tail])
        return np.concatenate([ids, last_ids]), np.concatenate([lengths, last_lengths])

    def _rows(self, bodies: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """[prefix + body], padded to max_length."""
        ids = np.full((len(bodies), self.config.max_length), self.pad_id, dtype=np.int32)
        ids[:, : len(self.prefix)] = self.prefix
        lengths = np.empty(len(bodies), dtype=np.int32)
        for row, body in enumerate(bodies):
            ids[row, len(self.prefix) : len(self.prefix) + len(body)] = body
            lengths[row] = len(self.prefix) + len(body)
        return ids, lengths


def _stack(blocks: list[tuple[np.ndarray, np.ndarray]], width: int) -> tuple[np.ndarray, np.ndarray]:
    if not blocks:
        return np.zeros((0, width), np.int32), np.zeros(0, np.int32)
    return np.concatenate([ids for ids, _ in blocks]), np.concatenate([lengths for _, lengths in blocks])
