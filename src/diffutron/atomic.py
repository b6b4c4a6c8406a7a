"""Files and folders written so that a reader, or a kill, sees the old one or the new one, never half of one.

A file is written beside its name and renamed onto it (`os.replace` is atomic within a filesystem).
A folder is written beside its name and swapped in without deleting the last complete copy first: the
old one is renamed aside, the new one renamed in, and only then the old one deleted; if the rename
fails the old one comes back, and a kill in between leaves both for the caller's recovery to sort
out (run_folder.recover). Filesystem only.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def partial_name(name: str) -> str:
    """The name a file is written under before it is renamed onto `name`."""
    return f".{name}.partial"


def write_text(path: Path, text: str) -> None:
    partial = path.with_name(partial_name(path.name))
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def replace_folder(new: Path, final: Path, aside: Path, between: Callable[[], None] = lambda: None) -> None:
    """Move the complete folder `new` to `final`; an earlier `final` waits at `aside` (a stale `aside` is
    deleted first) until `new` is in place, comes back if the move fails, and is deleted after.
    `between` runs once the old folder is aside (the fault tests kill the process there)."""
    if aside.exists():
        shutil.rmtree(aside)
    if final.exists():
        os.replace(final, aside)
    between()
    try:
        os.replace(new, final)
    except OSError:
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)
