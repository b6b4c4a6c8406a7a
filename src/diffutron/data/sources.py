"""Documents from a file or the bundled corpus, for evaluation and (later) corpus preparation.

A source spec is `bundled:train`, `bundled:heldout` (`bundled` alone means train), a `.txt` file
(documents separated by blank lines) or a `.jsonl` file (one object per line, text in `text_field`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from diffutron.errors import DiffutronError


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    id: str


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DiffutronError(
            f"{path}: invalid UTF-8 at byte {err.start} (line {line}); re-encode the file as UTF-8"
        ) from None


def _txt_documents(path: Path) -> Iterator[Document]:
    blocks = _decode(path).replace("\r\n", "\n").split("\n\n")
    for number, block in enumerate(blocks):
        if block.strip():
            yield Document(text=block.strip(), source=path.name, id=f"{path.name}#{number}")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    for number, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DiffutronError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DiffutronError(f"{path}:{number}: no string field {text_field!r}; choose it with --text-field")
        if text.strip():
            yield Document(text=text.strip(), source=path.name, id=f"{path.name}:{number}")


def read_documents(spec: str, text_field: str = "text") -> list[Document]:
    """All non-empty documents of `spec`; an error that names the problem if there are none."""
    if spec == "bundled" or spec.startswith("bundled:"):
        from diffutron.data.bundled import bundled_documents

        docs = list(bundled_documents(spec.partition(":")[2] or "train"))
    else:
        path = Path(spec)
        if not path.is_file():
            raise DiffutronError(f"data file not found: {spec}")
        if path.suffix == ".jsonl":
            docs = list(_jsonl_documents(path, text_field))
        elif path.suffix == ".txt":
            docs = list(_txt_documents(path))
        else:
            raise DiffutronError(
                f"{spec}: unsupported data format {path.suffix!r}; use .txt, .jsonl or bundled:heldout"
            )
    if not docs:
        raise DiffutronError(f"{spec}: contains no text")
    return docs
