"""Files shipped with the package: the bundled tokenizer and the tiny models."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from diffutron.errors import DiffutronError

MODELS = ("tiny-base", "tiny-diffutron")


def shipped_model(name: str) -> Path:
    """The folder of a model shipped with diffutron (a standard Hugging Face folder)."""
    path = Path(str(resources.files("diffutron") / "assets" / "models" / name))
    if not (path / "config.json").is_file():
        raise DiffutronError(f"the shipped model {name!r} is missing from this installation ({path})")
    return path
