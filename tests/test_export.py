"""Export: adapters that plain peft loads on the right base, absolute base paths, LoRA on an adapter folder,
and an --out that never costs the user a file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffutron.config import override
from diffutron.errors import UsageError
from diffutron.export import export
from diffutron.model import DiffusionLM
from diffutron.train import TrainRecipe, train

SHIPPED_BASE = "src/diffutron/assets/models/tiny-base"


def _train(dataset: str, out: Path, model: str) -> Path:
    recipe = {
        "model.name": model,
        "data.dataset": dataset,
        "data.eval": None,
        "train.out": str(out),
        "train.max_steps": 2,
        "train.batch_size": 4,
        "train.save_every": 100,
        "lora.r": 4,
        "lora.alpha": 8,
        "optim.lr": 1e-2,
        "train.plot": False,
    }
    train(override(TrainRecipe(), recipe))
    return out


@pytest.fixture(scope="module")
def preset_run(bundled_128, tmp_path_factory):
    return _train(bundled_128, tmp_path_factory.mktemp("export") / "preset-run", "preset:tiny")


def _ids(lm):
    return lm.tokenizer(["Ankara Türkiye'nin başkentidir, İstanbul en büyük şehridir."], return_tensors="pt")[
        "input_ids"
    ]


def _plain_peft_logits(adapter: Path, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the adapter loaded without diffutron: AutoPeftModel, and PeftModel on the named base."""
    from peft import AutoPeftModel, PeftModel
    from transformers import AutoModelForMaskedLM

    named = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    auto = AutoPeftModel.from_pretrained(str(adapter)).eval()
    on_base = PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(named), str(adapter)).eval()
    with torch.no_grad():
        return auto(input_ids=ids).logits, on_base(input_ids=ids).logits


def test_the_adapter_of_a_preset_run_loads_with_plain_peft_on_the_right_base(preset_run, tmp_path):
    result = export(preset_run, tmp_path / "adapter")
    assert result["adapter"] and result["base"] == str(tmp_path / "adapter" / "base")
    lm = DiffusionLM.from_pretrained(str(preset_run / "final"), device="cpu")
    ids = _ids(lm)
    with torch.no_grad():
        reference = lm.full_logits(ids)
    for logits in _plain_peft_logits(tmp_path / "adapter", ids):
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    assert "base/" in (tmp_path / "adapter" / "README.md").read_text()
    from transformers import AutoModelForMaskedLM

    kept = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "adapter" / "base")).state_dict()
    preset = DiffusionLM.from_preset("tiny").model.state_dict()  # the weights the run started from
    assert kept.keys() == preset.keys() and all(torch.equal(kept[k], v) for k, v in preset.items())


def test_a_local_base_is_named_by_its_absolute_path(bundled_128, tmp_path, monkeypatch):
    run = _train(bundled_128, tmp_path / "run", SHIPPED_BASE)  # relative to the repository root
    named = json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str(Path(SHIPPED_BASE).resolve())
    card = (run / "final" / "README.md").read_text()
    assert "More Information Needed" not in card and "final training loss" in card
    monkeypatch.chdir(tmp_path)  # loads from anywhere
    assert DiffusionLM.from_pretrained(str(run / "final"), device="cpu").vocab_size > 0


def test_lora_on_an_adapter_folder_trains_on_the_merged_model(bundled_128, preset_run, tmp_path):
    import shutil

    # what an earlier attempt on another base, killed before its first checkpoint, leaves behind
    (tmp_path / "run").mkdir()
    shutil.copytree(preset_run / "base", tmp_path / "run" / "base")
    shutil.copy(preset_run / "recipe.json", tmp_path / "run" / "recipe.json")
    run = _train(bundled_128, tmp_path / "run", str(preset_run))  # a run folder: its final/ adapter
    named = json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str(run / "base")  # the merged model exists nowhere else: the run keeps it
    from transformers import AutoModelForMaskedLM

    merged = DiffusionLM.from_pretrained(str(preset_run / "final"), device="cpu").model.merge_and_unload()
    kept = AutoModelForMaskedLM.from_pretrained(named).state_dict()
    assert all(torch.equal(kept[k], v) for k, v in merged.state_dict().items())  # the base it trained on
    lm = DiffusionLM.from_pretrained(str(run / "final"), device="cpu")
    ids = _ids(lm)
    with torch.no_grad():
        reference = lm.full_logits(ids)
    result = export(run, tmp_path / "adapter")
    assert result["base"] == str(tmp_path / "adapter" / "base")
    for logits in _plain_peft_logits(tmp_path / "adapter", ids):
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("where", ["the run", "the run's parent", "inside the run", "inside final"])
def test_export_never_writes_over_or_into_its_source(preset_run, where):
    out = {
        "the run": preset_run,
        "the run's parent": preset_run.parent,
        "inside the run": preset_run / "exported",
        "inside final": preset_run / "final" / "exported",
    }[where]
    before = sorted(p.name for p in preset_run.iterdir())
    with pytest.raises(UsageError, match="is, holds or lies inside the source"):
        export(preset_run if where != "inside final" else preset_run / "final", out)
    assert sorted(p.name for p in preset_run.iterdir()) == before


def test_export_replaces_only_an_earlier_export_unless_forced(preset_run, tmp_path, capsys):
    from diffutron.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code = main(["export", str(preset_run), "--out", str(mine)])
    assert code == 2 and "--force" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"
    export(preset_run, tmp_path / "export")
    export(preset_run, tmp_path / "export", merge_lora=True)  # an earlier export: replaced
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert not (tmp_path / "export" / "adapter_config.json").exists()
    export(preset_run, mine, force=True)
    assert not (mine / "notes.txt").exists() and (mine / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mine"]


def test_a_failed_export_leaves_the_earlier_one_and_no_temporary_folder(preset_run, tmp_path, monkeypatch):
    import diffutron.export as export_module

    export(preset_run, tmp_path / "export")
    before = sorted(p.name for p in (tmp_path / "export").iterdir())

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(export_module.shutil, "copytree", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export(preset_run, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == before
