"""The small Turkish corpus shipped with the package (see corpus/NOTICE.md)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from diffutron.data.sources import Document
from diffutron.errors import UsageError

SPLITS = ("train", "heldout")


def corpus_file(split: str) -> Path:
    if split not in SPLITS:
        raise UsageError(f"unknown bundled split {split!r}: choose one of {', '.join(SPLITS)}")
    return Path(str(resources.files("diffutron") / "data" / "corpus" / f"{split}.jsonl.gz"))


def bundled_documents(split: str = "train") -> Iterator[Document]:
    """Yield the documents of one split. `heldout` is for evaluation only: never train on it."""
    with corpus_file(split).open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            yield Document(text=record["text"], source=record["source"], id=record["id"])
