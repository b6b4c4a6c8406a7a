"""Export a run's model as a standard Hugging Face folder, or as a peft adapter folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from diffutron.errors import DiffutronError


def model_folder(source: str | Path) -> Path:
    """The model folder inside a run (final/, else its newest checkpoint) or a checkpoint."""
    source = Path(source)
    for candidate in (source / "final", source / "model", source):
        if (candidate / "config.json").is_file() or (candidate / "adapter_config.json").is_file():
            return candidate
    checkpoints = sorted(source.glob("checkpoint-*/model"), key=lambda p: int(p.parent.name.split("-")[-1]))
    if checkpoints:
        return checkpoints[-1]
    raise DiffutronError(f"{source} holds no model: expected a run folder, a checkpoint or a model folder")


def export(source: str | Path, out: str | Path, merge_lora: bool = False) -> dict:
    """Adapter folders are copied (they load on their base) or merged into it with `merge_lora`."""
    from diffutron.model import DiffusionLM

    folder = model_folder(source)
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    is_adapter = (folder / "adapter_config.json").is_file()
    if is_adapter and merge_lora:
        lm = DiffusionLM.from_pretrained(str(folder), device="cpu")
        lm.model = lm.model.merge_and_unload()
        lm.save_pretrained(tmp)
        kind = "a merged model"
    else:
        shutil.copytree(folder, tmp)
        kind = "a peft adapter" if is_adapter else "a model"
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"kind": kind, "out": str(out), "from": str(folder), "adapter": is_adapter and not merge_lora}
