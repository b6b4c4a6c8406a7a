"""The run folder of `diffutron train`: one run per folder, its recipe, and checkpoints that survive a kill.

    recipe.json            the resolved recipe of the run; a resume must match it (config.resume_conflicts)
    .lock                  held (flock) by the training process for the run's lifetime; names its pid
    checkpoint-<step>/     complete once trainer_state.json (written last, atomically) is in it
    final/                 the model at the end; its trainer_state.json says which step it is
    .tmp-<name>/           a folder being written;  .old-<name>/  a complete one being replaced

A folder is replaced without ever deleting its last complete copy first: the old one is renamed
aside, the new one renamed in, and only then the old one deleted. `recover` finishes or undoes
whatever a kill interrupted, so that the newest complete checkpoint is never lost. Filesystem
only: no torch here.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from diffutron.atomic import replace_folder, write_text
from diffutron.errors import DiffutronError

COMPLETE_MARKER = "trainer_state.json"
RECIPE_FILE = "recipe.json"
LOCK_FILE = ".lock"


class RunLock:
    """An exclusive lock on a run folder (flock: the kernel drops it when its process dies, so the lock
    of a killed run never blocks the resume)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.file = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 -- held open while the lock is held
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise DiffutronError(
                f"{self.path.parent} is in use by another training run (pid {holder}): "
                "wait for it to finish, or train into another --out"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(str(os.getpid()))
        file.flush()
        self.file = file

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the flock; the file stays (another run may hold it by now)
            self.file = None


def step_of(path: Path) -> int | None:
    """The step of a checkpoint-<step> folder, else None."""
    tail = path.name.removeprefix("checkpoint-")
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else None


def read_state(folder: Path) -> dict | None:
    """The trainer state of a complete checkpoint or final folder, else None."""
    try:
        return json.loads((Path(folder) / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in Path(out).glob("checkpoint-*") if p.is_dir() and step_of(p) is not None]
    return sorted((p for p in found if (p / COMPLETE_MARKER).is_file()), key=step_of)


def publish(tmp: Path, final: Path, between: Callable[[], None] = lambda: None) -> None:
    """Move the complete folder `tmp` to `final`, replacing any earlier `final` only once `tmp` is in place
    (the earlier one waits at `.old-<name>`, where `recover` finds it after a kill)."""
    replace_folder(tmp, final, final.with_name(f".old-{final.name}"), between)


def recover(out: Path) -> list[str]:
    """Finish or undo what a killed run left half-done; returns what was done, one line per folder.

    A complete `.tmp-X` whose `X` is missing is promoted (the kill came before it was moved in);
    `.old-X` is restored when `X` is missing, else deleted; incomplete temporaries are deleted.
    """
    out = Path(out)
    done = []
    for tmp in sorted(out.glob(".tmp-*")):
        final = out / tmp.name[len(".tmp-") :]
        if tmp.is_dir() and (tmp / COMPLETE_MARKER).is_file() and not final.exists():
            os.replace(tmp, final)
            done.append(f"promoted {tmp.name} to {final.name}")
        else:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            done.append(f"deleted the unfinished {tmp.name}")
    for old in sorted(out.glob(".old-*")):
        final = out / old.name[len(".old-") :]
        if not final.exists():
            os.replace(old, final)
            done.append(f"restored {final.name}")
        else:
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"deleted the replaced {old.name}")
    return done


def prune(out: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0: keep them all)."""
    for old in checkpoints(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def trim_metrics(path: Path, step: int) -> None:
    """Keep the rows of steps <= `step` (those a resume from checkpoint-<step> does not repeat)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _row_step(line) <= step]
    write_text(path, "".join(line + "\n" for line in kept))


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn or foreign line goes
