"""Where text comes from: documents streamed from files, Hugging Face datasets or the bundled corpus.

A source spec is one of
  * `bundled` / `bundled:train` -- the corpus shipped with the package (`bundled:heldout` is for
    evaluation only and refused where `training=True`);
  * `hf:NAME[:CONFIG]` -- a Hugging Face dataset, streamed (NAME may be a local dataset folder);
  * a file, a folder (every supported file under it) or a glob: `.txt` (documents separated by
    blank lines, or one per line with `txt_mode="line"`), `.jsonl`, `.parquet`, `.csv`, each
    optionally `.gz` or `.zst` compressed.
Records that cannot be read (malformed JSON, a missing or non-string text field, invalid UTF-8) are
counted in `rejects` by reason when `errors="count"`, or raise a one-line error naming the file and
line when `errors="raise"`.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from diffutron.errors import DiffutronError, UsageError

FORMATS = (".txt", ".jsonl", ".parquet", ".csv")
COMPRESSIONS = ("", ".gz", ".zst")


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    id: str


class _Rejects:
    """Counts bad records, or raises on the first one."""

    def __init__(self, errors: str, counter: Counter | None):
        if errors not in ("raise", "count"):
            raise ValueError(f"errors must be 'raise' or 'count', got {errors!r}")
        self.errors, self.counter = errors, counter if counter is not None else Counter()

    def __call__(self, reason: str, message: str) -> None:
        if self.errors == "raise":
            raise DiffutronError(message)
        self.counter[reason] += 1


def _suffixes(path: Path) -> tuple[str, str]:
    """(format, compression) of a file name: data.jsonl.gz -> (.jsonl, .gz)."""
    compression = path.suffix if path.suffix in (".gz", ".zst") else ""
    stem = path.with_suffix("") if compression else path
    return stem.suffix, compression


class _ZstdRaw(io.RawIOBase):
    """A .zst file's bytes, frame after frame. zstandard's stream_reader ends quietly where a file is
    cut short; this one raises EOFError, as gzip does."""

    def __init__(self, path: Path):
        import zstandard

        self.file, self.context = open(path, "rb"), zstandard.ZstdDecompressor()
        self.frame, self.fed, self.buffer = self.context.decompressobj(), False, b""

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while not self.buffer:
            data = self.file.read(1 << 16)
            if not data:
                if self.fed and not self.frame.eof:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                return 0
            while data:
                if self.frame.eof:  # the next frame
                    self.frame, self.fed = self.context.decompressobj(), False
                self.buffer += self.frame.decompress(data)
                self.fed = True
                data = self.frame.unused_data if self.frame.eof else b""
        size = min(len(target), len(self.buffer))
        target[:size], self.buffer = self.buffer[:size], self.buffer[size:]
        return size

    def close(self) -> None:
        self.file.close()
        super().close()


def _open_binary(path: Path, compression: str):
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        return io.BufferedReader(_ZstdRaw(path), buffer_size=1 << 16)
    return open(path, "rb")


def _unreadable(path: Path, err: Exception) -> DiffutronError:
    """A compressed file that cannot be read to its end: one line naming it."""
    if isinstance(err, EOFError):
        return DiffutronError(f"{path} is truncated: the compressed data ends early (an interrupted download or copy?)")
    return DiffutronError(f"{path} is corrupt: {str(err).splitlines()[0] if str(err) else type(err).__name__}")


def _lines(path: Path, compression: str, reject: _Rejects) -> Iterator[tuple[int, str | None]]:
    """(line number, text) per line; text is None for a line that is not valid UTF-8."""
    import zlib

    from zstandard import ZstdError

    try:
        with _open_binary(path, compression) as raw:
            for number, line in enumerate(raw, start=1):
                try:
                    text = line.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as err:
                    reject(
                        "invalid_utf8",
                        f"{path}: invalid UTF-8 at byte {err.start} of line {number}; re-encode the file as UTF-8",
                    )
                    text = None
                yield number, text
    except (EOFError, gzip.BadGzipFile, zlib.error, ZstdError) as err:
        raise _unreadable(path, err) from err


def _txt(path: Path, compression: str, reject: _Rejects, txt_mode: str) -> Iterator[Document]:
    if txt_mode == "line":
        for number, line in _lines(path, compression, reject):
            if line and line.strip():
                yield Document(line.strip(), path.name, f"{path.name}:{number}")
        return
    block, first, broken = [], 0, False
    for number, line in itertools.chain(_lines(path, compression, reject), [(-1, "")]):  # "" ends the last
        if line is None:
            broken = True
        elif line.strip():
            block.append(line)
            first = first or number
        elif block or broken:
            if block and not broken:
                yield Document("\n".join(block).strip(), path.name, f"{path.name}:{first}")
            block, first, broken = [], 0, False


def _jsonl(path: Path, compression: str, reject: _Rejects, text_field: str) -> Iterator[Document]:
    for number, line in _lines(path, compression, reject):
        if line is None or not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            reject("bad_json", f"{path}:{number}: not valid JSON ({err.msg})")
            continue
        if not isinstance(record, dict) or text_field not in record:
            reject("missing_field", f"{path}:{number}: no field {text_field!r}; choose it with --text-field")
            continue
        text = record[text_field]
        if not isinstance(text, str):
            reject("wrong_type", f"{path}:{number}: field {text_field!r} is {type(text).__name__}, not text")
            continue
        if text.strip():
            yield Document(text.strip(), path.name, f"{path.name}:{number}")


def _parquet(path: Path, compression: str, reject: _Rejects, text_field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DiffutronError(f"{path} is not a readable parquet file (truncated?): {str(err).splitlines()[0]}") from err
    if text_field not in parquet.schema_arrow.names:
        raise DiffutronError(f"{path}: no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)})")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                reject("wrong_type", f"{path}: row {row}: {text_field!r} is not text")
            elif text.strip():
                yield Document(text.strip(), path.name, f"{path.name}#{row}")


def _csv(path: Path, compression: str, reject: _Rejects, text_field: str) -> Iterator[Document]:
    decoded = (line for _, line in _lines(path, compression, reject) if line is not None)
    reader = csv.DictReader(decoded)
    if reader.fieldnames is not None and text_field not in reader.fieldnames:
        raise DiffutronError(f"{path}: no column {text_field!r} (columns: {', '.join(reader.fieldnames)})")
    for number, record in enumerate(reader, start=2):
        text = record.get(text_field)
        if text is None:
            reject("missing_field", f"{path}:{number}: row has no {text_field!r} value")
        elif text.strip():
            yield Document(text.strip(), path.name, f"{path.name}:{number}")


def local_files(spec: str) -> list[Path]:
    """The files a path, folder or glob names, sorted; an error if there are none."""
    path = Path(spec)
    if path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.is_file())
    elif any(ch in spec for ch in "*?["):
        candidates = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    elif path.is_file():
        return [path]
    else:
        raise DiffutronError(f"data file not found: {spec}")
    files = [p for p in candidates if _suffixes(p)[0] in FORMATS and _suffixes(p)[1] in COMPRESSIONS]
    if not files:
        raise DiffutronError(f"{spec}: no {', '.join(FORMATS)} files (optionally .gz / .zst) found")
    return files


def _file_documents(path: Path, text_field: str, reject: _Rejects, txt_mode: str) -> Iterator[Document]:
    fmt, compression = _suffixes(path)
    if fmt not in FORMATS or compression not in COMPRESSIONS:
        raise DiffutronError(f"{path}: unsupported data format; use {', '.join(FORMATS)} (optionally .gz / .zst)")
    if fmt == ".txt":
        return _txt(path, compression, reject, txt_mode)
    if fmt == ".jsonl":
        return _jsonl(path, compression, reject, text_field)
    if fmt == ".parquet":
        return _parquet(path, compression, reject, text_field)
    return _csv(path, compression, reject, text_field)


def _hf_documents(spec: str, text_field: str, split: str, reject: _Rejects) -> Iterator[Document]:
    """`hf:NAME[:CONFIG]`, streamed; NAME may also be a local folder (data files or save_to_disk)."""
    name, _, config = spec[len("hf:") :].partition(":")
    local = Path(name)
    try:
        if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
            from datasets import load_from_disk

            dataset = load_from_disk(str(local))
            dataset = dataset[split] if hasattr(dataset, "keys") else dataset
        else:
            from datasets import load_dataset

            dataset = load_dataset(name, config or None, split=split, streaming=True)
    except Exception as err:  # datasets raises many types: connection, FileNotFound, ValueError...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DiffutronError(
            f"could not open dataset {name!r}{f' (config {config})' if config else ''}: {first}. Offline? "
            "Download it where the Hub is reachable and pass the local folder (hf:PATH or files)"
        ) from err
    for number, record in enumerate(dataset):
        text = record.get(text_field)
        if not isinstance(text, str):
            reject(
                "missing_field" if text is None else "wrong_type", f"{name}: record {number} has no text {text_field!r}"
            )
        elif text.strip():
            yield Document(text.strip(), name, f"{name}#{number}")


def iter_documents(
    spec: str,
    text_field: str = "text",
    *,
    errors: str = "raise",
    rejects: Counter | None = None,
    txt_mode: str = "blank",
    split: str = "train",
    training: bool = False,
) -> Iterator[Document]:
    """Stream the documents of one source spec (see the module docstring)."""
    reject = _Rejects(errors, rejects)
    if spec == "bundled" or spec.startswith("bundled:"):
        from diffutron.data.bundled import bundled_documents

        part = spec.partition(":")[2] or "train"
        if training and part != "train":
            raise UsageError(f"{spec} is the held-out evaluation split: it never enters training data")
        yield from bundled_documents(part)
    elif spec.startswith("hf:"):
        yield from _hf_documents(spec, text_field, split, reject)
    else:
        for path in local_files(spec):
            yield from _file_documents(path, text_field, reject, txt_mode)


def input_files(spec: str) -> list[Path] | None:
    """The local files `spec` reads (the bundled corpus's too); None for a dataset on the Hub."""
    if spec == "bundled" or spec.startswith("bundled:"):
        from diffutron.data.bundled import corpus_file

        return [corpus_file(spec.partition(":")[2] or "train")]
    if spec.startswith("hf:"):
        local = Path(spec[len("hf:") :].partition(":")[0])
        return sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else None
    return local_files(spec)


def read_documents(spec: str, text_field: str = "text") -> list[Document]:
    """All documents of `spec`, strictly: the first bad record is an error; so is no text at all."""
    docs = list(iter_documents(spec, text_field, errors="raise"))
    if not docs:
        raise DiffutronError(f"{spec}: contains no text")
    return docs
