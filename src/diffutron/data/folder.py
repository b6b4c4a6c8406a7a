"""The folder `data prepare` writes, and the rules that make a rerun safe.

    recipe.json          written first: the fingerprint of the recipe and of its input files
    parts/part-*.arrow   `shard_size` rows each, written while the corpus streams through
    data-*.arrow         at the end, the same rows in the same order cut into shards of equal size
                         (± 1 row), so that `split_dataset_by_node` on the streamed shards gives every
                         training process as many rows; then the parts are deleted
    dataset_info.json, state.json   what `datasets.load_from_disk` reads (state.json once every shard exists)
    stats.json           written last: the folder is complete

Every file is written under a temporary name and renamed when complete, so a killed run leaves
whole files only. A rerun with the same fingerprint reuses a complete folder as it is and finishes an
interrupted one, skipping the files that exist (the corpus is read again; the files it would write
are the same bytes). A folder with another fingerprint is refused, unless `force`, which deletes the
files listed above and nothing else; a folder holding such files without a recipe.json (not written
by `data prepare`) is refused even then.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from diffutron.atomic import partial_name, write_json
from diffutron.data.pack import PackConfig
from diffutron.errors import DiffutronError, UsageError

RECIPE, STATS, STATE, INFO, PARTS = "recipe.json", "stats.json", "state.json", "dataset_info.json", "parts"
MARK = "diffutron data prepare"  # in recipe.json: whose folder this is
_SHARD = re.compile(r"data-\d{5}\.arrow(\.tmp)?")
_PART = re.compile(r"part-\d{5}\.arrow(\.tmp)?")
_OWN = {RECIPE, STATS, STATE, INFO} | {partial_name(name) for name in (RECIPE, STATS, STATE, INFO)}


def read_json(path: Path, what: str) -> dict:
    """A JSON object written by this module; a malformed one is a one-line error naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DiffutronError(f"{path} is malformed ({err}): {what}") from err
    if not isinstance(value, dict):
        raise DiffutronError(f"{path} is malformed (not a JSON object): {what}")
    return value


class DatasetFolder:
    """Claims `out` for one fingerprint, then takes blocks of token ids and writes the shards."""

    def __init__(self, out: Path, pack: PackConfig):
        from datasets import Features, List, Value

        self.out, self.pack = out, pack
        columns = {"input_ids": List(Value("int32"))}
        if pack.padded:
            columns["attention_mask"] = List(Value("int8"))
        self.features = Features(columns)
        self.parts: list[int] = []  # rows of each part so far
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []  # (ids [n, max_length], lengths [n])
        self.pending_rows = 0
        self.reused = {"parts": 0, "shards": 0}

    # -- claiming the folder ------------------------------------------------------------------------
    def claim(self, fingerprint: str, description: dict, force: bool) -> dict | None:
        """The stats of a complete folder with this fingerprint, or None once `out` is ready to be written."""
        recipe_path = self.out / RECIPE
        if recipe_path.is_file():
            previous = read_json(recipe_path, "remove the folder or choose a new --out")
            if previous.get("written_by") != MARK:
                raise UsageError(f"{recipe_path} was not written by data prepare: choose a new --out")
            if previous.get("fingerprint") == fingerprint:
                if (self.out / STATS).is_file():
                    return read_json(self.out / STATS, "rerun data prepare with --force to rebuild the folder")
                return None  # interrupted: finish it
            if not force and self._own_files() != [recipe_path]:  # recipe.json alone: no data to mix with
                raise UsageError(
                    f"{self.out} holds a dataset prepared (or being prepared) from another recipe or other input "
                    "files: choose a new --out, or rerun with --force to replace it"
                )
            self._remove_own_files()
        elif self._own_files():
            raise UsageError(
                f"{self.out} holds {self._own_files()[0].name} but no {RECIPE}: not a folder data prepare "
                "can resume or replace; choose a new --out"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(recipe_path, {"written_by": MARK, "fingerprint": fingerprint, **description})
        return None

    def _own_files(self) -> list[Path]:
        if not self.out.is_dir():
            return []
        files = [p for p in self.out.iterdir() if p.is_file() and (p.name in _OWN or _SHARD.fullmatch(p.name))]
        parts = self.out / PARTS
        if parts.is_dir():
            files += [p for p in parts.iterdir() if p.is_file() and _PART.fullmatch(p.name)]
        return sorted(files)

    def _remove_own_files(self) -> None:
        for path in self._own_files():
            if path.name != RECIPE:
                path.unlink()
        _remove_if_empty(self.out / PARTS)
        (self.out / RECIPE).unlink()

    # -- writing ------------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Blocks in stream order: ids [n, max_length] (padded), lengths [n] (real tokens of each)."""
        if len(ids):
            self.pending.append((ids, lengths))
            self.pending_rows += len(ids)
        while self.pending_rows >= self.pack.shard_size:
            self._write_part(self.pack.shard_size)

    def finish(self) -> int:
        """Cut the rows into balanced shards, write the dataset's metadata, delete the parts; returns the rows."""
        if self.pending_rows:
            self._write_part(self.pending_rows)
        total = sum(self.parts)
        count = -(-total // self.pack.shard_size)
        size, extra = divmod(total, count) if count else (0, 0)
        names, start = [], 0
        self.shard_rows = [size + (index < extra) for index in range(count)]
        for index, rows in enumerate(self.shard_rows):
            names.append(self._write_shard(index, start, rows))
            start += rows
        write_json(self.out / INFO, {"features": self.features.to_dict(), "description": f"{MARK}: see {STATS}"})
        write_json(
            self.out / STATE,
            {
                "_data_files": [{"filename": name} for name in names],
                "_fingerprint": "diffutron",
                "_format_columns": None,
                "_format_kwargs": {},
                "_format_type": None,
                "_output_all_columns": False,
                "_split": None,
            },
        )
        for path in self._own_files():  # the parts, and temporary files of a killed run
            if path.parent.name == PARTS or path.name.endswith(".tmp"):
                path.unlink()
        _remove_if_empty(self.out / PARTS)
        self.shards = names
        return total

    def write_stats(self, stats: dict) -> None:
        write_json(self.out / STATS, stats)

    def _write_part(self, rows: int) -> None:
        ids, lengths = _take(self.pending, rows)
        self.pending_rows -= rows
        path = self.out / PARTS / f"part-{len(self.parts):05d}.arrow"
        self.parts.append(rows)
        if path.exists():  # written by an interrupted run of the same fingerprint: the same rows
            self.reused["parts"] += 1
            return
        path.parent.mkdir(exist_ok=True)
        self._write_table(path, self._table(ids, lengths))

    def _write_shard(self, index: int, start: int, rows: int) -> str:
        """Shard `index`: rows [start, start + rows) of the stream, read back from the parts."""
        import pyarrow as pa

        name = f"data-{index:05d}.arrow"
        path = self.out / name
        if path.exists():
            self.reused["shards"] += 1
            return name
        pieces, offset = [], 0
        for number, part_rows in enumerate(self.parts):
            low, high = max(start, offset), min(start + rows, offset + part_rows)
            if low < high:
                part = self.out / PARTS / f"part-{number:05d}.arrow"
                if (low, high) == (offset, offset + part_rows) == (start, start + rows):
                    os.replace(part, path)  # the shard is this part, whole: no copy
                    return name
                with pa.memory_map(str(part)) as source:
                    pieces.append(pa.ipc.open_stream(source).read_all().slice(low - offset, high - low))
            offset += part_rows
        self._write_table(path, pa.concat_tables(pieces).combine_chunks())
        return name

    def _table(self, ids: np.ndarray, lengths: np.ndarray):
        import pyarrow as pa

        width = ids.shape[1]
        if self.pack.padded:
            offsets = np.arange(len(ids) + 1, dtype=np.int32) * width
            columns = {"input_ids": pa.ListArray.from_arrays(offsets, ids.reshape(-1))}
            mask = (np.arange(width) < lengths[:, None]).astype(np.int8)
            columns["attention_mask"] = pa.ListArray.from_arrays(offsets, mask.reshape(-1))
        else:  # rows of their own length (a kept tail is shorter)
            keep = np.arange(width) < lengths[:, None]
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            columns = {"input_ids": pa.ListArray.from_arrays(offsets, ids[keep])}
        return pa.Table.from_pydict(columns, schema=self.features.arrow_schema)

    @staticmethod
    def _write_table(path: Path, table) -> None:
        import pyarrow as pa

        tmp = path.with_name(path.name + ".tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)


def _take(pending: list[tuple[np.ndarray, np.ndarray]], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `rows` blocks of `pending`, removed from it."""
    ids, lengths, need = [], [], rows
    while need:
        block_ids, block_lengths = pending[0]
        if len(block_ids) <= need:
            pending.pop(0)
        else:
            pending[0] = (block_ids[need:], block_lengths[need:])
            block_ids, block_lengths = block_ids[:need], block_lengths[:need]
        ids.append(block_ids)
        lengths.append(block_lengths)
        need -= len(block_ids)
    return np.concatenate(ids), np.concatenate(lengths)


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
