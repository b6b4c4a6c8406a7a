"""Loads the pack's JSONL files from this folder, in memory: no network, no cache, any working directory."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(file: str, **_metadata) -> datasets.DatasetDict:
    """lm-eval calls this with the task's dataset_kwargs (file) and its metadata (ignored)."""
    lines = (HERE / file).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})
