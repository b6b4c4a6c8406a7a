"""Export a run's model as a standard Hugging Face folder, or as a peft adapter folder.

The output folder is written beside its destination and renamed into place, so a failed export leaves
nothing behind and an earlier export stays whole until the new one is complete. It replaces only an
empty folder or an earlier export (marked by `diffutron-export.json`) unless forced, and never the
source run, a folder inside it or a folder holding it.

An adapter names its base in `adapter_config.json`. When that base exists nowhere else (a preset's
random weights, or a base the run kept in its `base/` folder because it merged an adapter into it),
the export carries it in `<out>/base/` and names that folder, so plain peft loads the adapter on the
right weights.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from diffutron.atomic import replace_folder
from diffutron.errors import DiffutronError, UsageError

MARKER = "diffutron-export.json"


def model_folder(source: str | Path) -> Path:
    """The model folder inside a run (final/, else its newest checkpoint) or a checkpoint; refused if none."""
    from diffutron.model import model_folder as find_model_folder

    folder = find_model_folder(source)
    if folder is None:
        raise DiffutronError(f"{source} holds no model: expected a run folder, a checkpoint or a model folder")
    return folder


def _run_of(folder: Path) -> Path:
    """The run folder that holds a model folder (final/ or checkpoint-N/model), else the folder itself."""
    if folder.name == "final":
        return folder.parent
    if folder.name == "model" and folder.parent.name.startswith("checkpoint-"):
        return folder.parent.parent
    return folder


def _related(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_destination(source: Path, folder: Path, out: Path, force: bool) -> None:
    """Refuse an --out that is, holds or lies inside the source, or that holds files of someone else's."""
    out = out.resolve()
    for protected in {source.resolve(), folder.resolve(), _run_of(folder.resolve())}:
        if _related(out, protected):
            raise UsageError(f"--out {out} is, holds or lies inside the source {protected}: choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not force:
        raise UsageError(
            f"--out {out} is not empty and holds no earlier diffutron export: choose another folder, "
            "or pass --force to replace it"
        )


def export(source: str | Path, out: str | Path, merge_lora: bool = False, force: bool = False) -> dict:
    """Adapter folders are copied (they load on their base) or merged into it with `merge_lora`."""
    from diffutron.model import PRESET_PREFIX, DiffusionLM

    source = Path(source)
    folder = model_folder(source)
    out = Path(out).resolve()
    check_destination(source, folder, out, force)
    is_adapter = (folder / "adapter_config.json").is_file()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        if is_adapter and merge_lora:
            lm = DiffusionLM.from_pretrained(str(folder), device="cpu")
            lm.model = lm.model.merge_and_unload()
            lm.save_pretrained(tmp / "model")
            if (folder / "README.md").is_file():
                shutil.copy2(folder / "README.md", tmp / "model" / "README.md")
            kind = "a merged model"
        else:
            shutil.copytree(folder, tmp / "model")
            kind = "a peft adapter" if is_adapter else "a model"
        (tmp / "model" / "trainer_state.json").unlink(missing_ok=True)  # the run's bookkeeping, not the model's
        base = None
        if is_adapter and not merge_lora:
            config_path = tmp / "model" / "adapter_config.json"
            config = json.loads(config_path.read_text(encoding="utf-8"))
            named = config.get("base_model_name_or_path") or ""
            if named.startswith(PRESET_PREFIX):  # random weights diffutron builds from the name
                base = named
                DiffusionLM.from_pretrained(named, device="cpu").save_pretrained(tmp / "model" / "base")
            elif named and _related(Path(named).resolve(), _run_of(folder.resolve())):  # kept by the run
                base = named
                shutil.copytree(named, tmp / "model" / "base")
            if base is not None:
                config["base_model_name_or_path"] = str(out / "base")
                config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
                with open(tmp / "model" / "README.md", "a", encoding="utf-8") as card:
                    card.write(
                        f"\nThe base ({base}) is in `base/` here, and `adapter_config.json` names it by its "
                        "absolute path: after moving this folder, point `base_model_name_or_path` at `base/` "
                        "again, or export with `--merge-lora` for a standalone model.\n"
                    )
        provenance = {"from": str(folder.resolve()), "kind": kind, "base_copied_from": base}
        (tmp / "model" / MARKER).write_text(json.dumps(provenance, indent=2), encoding="utf-8")
        replace_folder(tmp / "model", out, aside=tmp / "replaced")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "kind": kind,
        "out": str(out),
        "from": str(folder),
        "adapter": is_adapter and not merge_lora,
        "base": str(out / "base") if base else None,
    }
