"""Tokenized documents -> fixed blocks of `max_length` tokens -> Arrow shards that `load_from_disk` opens.

Packing (`mode="pack"`, the reference recipe): documents are concatenated into one stream with the
tokenizer's end-of-sequence tokens ([SEP]) between them, and cut into blocks that each start with
its beginning tokens ([CLS]): `[CLS] doc1 [SEP] doc2 [SEP] doc3...`. No token is lost or repeated; the
stream's tail is padded (`tail="pad"`, with an attention mask), kept shorter (`"keep"`) or dropped.
Document-aligned (`mode="document"`): each document alone, `[CLS] chunk [SEP]`, padded.

Shards (`data-00000.arrow`, ...) are written to a temporary name and renamed when complete, so a
killed run never leaves a half-written shard; a rerun skips shards that exist. Many shards let
`datasets.distributed.split_dataset_by_node` hand disjoint parts to many training processes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

MODES = ("pack", "document")
TAILS = ("pad", "keep", "drop")


@dataclass
class PackConfig:
    max_length: int = 512
    mode: str = "pack"
    tail: str = "pad"
    shard_size: int = 4096  # sequences per shard

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
    """A stream of documents' token ids in, complete blocks out: (input_ids, real length)."""

    def __init__(self, config: PackConfig, prefix: list[int], suffix: list[int], pad_id: int):
        self.config, self.prefix, self.suffix, self.pad_id = config, prefix, suffix, pad_id
        self.room = config.max_length - len(prefix)
        self.buffer: list[int] = []

    def add(self, ids: list[int]) -> list[tuple[list[int], int]]:
        if self.config.mode == "document":
            room = self.room - len(self.suffix)
            return [self._pad(self.prefix + ids[i : i + room] + self.suffix) for i in range(0, max(len(ids), 1), room)]
        self.buffer.extend(ids)
        self.buffer.extend(self.suffix)
        blocks = []
        while len(self.buffer) >= self.room:
            blocks.append((self.prefix + self.buffer[: self.room], self.config.max_length))
            del self.buffer[: self.room]
        return blocks

    def finish(self) -> list[tuple[list[int], int]]:
        tail, self.buffer = self.buffer, []
        if self.config.mode == "document" or not tail or self.config.tail == "drop":
            return []
        block = self.prefix + tail
        return [self._pad(block)] if self.config.tail == "pad" else [(block, len(block))]

    def _pad(self, block: list[int]) -> tuple[list[int], int]:
        return block + [self.pad_id] * (self.config.max_length - len(block)), len(block)


class ShardWriter:
    """Writes blocks into Arrow shards of `shard_size` sequences, atomically, skipping existing ones."""

    def __init__(self, out: Path, config: PackConfig):
        from datasets import Features, List, Value

        self.out, self.config = out, config
        columns = {"input_ids": List(Value("int32"))}
        if config.padded:
            columns["attention_mask"] = List(Value("int8"))
        self.features = Features(columns)
        self.pending: list[tuple[list[int], int]] = []
        self.shards: list[str] = []
        self.skipped = 0
        out.mkdir(parents=True, exist_ok=True)

    def add(self, blocks: list[tuple[list[int], int]]) -> None:
        self.pending.extend(blocks)
        while len(self.pending) >= self.config.shard_size:
            self._write(self.pending[: self.config.shard_size])
            del self.pending[: self.config.shard_size]

    def close(self) -> None:
        if self.pending:
            self._write(self.pending)
            self.pending = []
        state = {
            "_data_files": [{"filename": name} for name in self.shards],
            "_fingerprint": "diffutron",
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        _write_json(self.out / "state.json", state)
        _write_json(
            self.out / "dataset_info.json",
            {
                "features": self.features.to_dict(),
                "description": "Packed token blocks written by `diffutron data prepare`; see stats.json",
            },
        )

    def _write(self, blocks: list[tuple[list[int], int]]) -> None:
        import pyarrow as pa

        name = f"data-{len(self.shards):05d}.arrow"
        self.shards.append(name)
        path = self.out / name
        if path.exists():  # written completely by an earlier run of the same recipe
            self.skipped += 1
            return
        columns = {"input_ids": [ids for ids, _ in blocks]}
        if self.config.padded:
            columns["attention_mask"] = [[1] * n + [0] * (len(ids) - n) for ids, n in blocks]
        table = pa.Table.from_pydict(columns, schema=self.features.arrow_schema)
        tmp = path.with_suffix(".arrow.tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
