"""Model names and folders: shipped names, run folders, and one clear line for every folder that cannot load."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffutron.cli import main
from diffutron.errors import DiffutronError, UsageError
from diffutron.model import DiffusionLM


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_lm):
    folder = tmp_path_factory.mktemp("saved")
    tiny_lm.save_pretrained(folder)
    return folder


def _copy(saved, tmp_path, name="model"):
    return shutil.copytree(saved, tmp_path / name)


def test_a_weights_file_missing_tensors_is_refused_naming_them(saved, tmp_path, capsys):
    folder = _copy(saved, tmp_path)
    weights = load_file(folder / "model.safetensors")
    save_file(dict(list(weights.items())[:3]), folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DiffutronError, match=r"lacks \d+ of the model's tensors \(\S+, \S+, \S+ and \d+ more\)"):
        DiffusionLM.from_pretrained(str(folder), device="cpu")
    capsys.readouterr()  # transformers' own progress bar, outside the CLI
    code, out, err = run_cli(capsys, "eval", str(folder), "--data", "bundled:heldout", "--json")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "lacks" in err


def test_tied_and_foreign_weights_are_accepted(saved, model_folders, tmp_path):
    # the tiny model's decoder is tied to its embeddings and saved once: no complaint
    assert "decoder.weight" not in load_file(saved / "model.safetensors")
    DiffusionLM.from_pretrained(str(saved), device="cpu")
    # a pre-training checkpoint's pooler / next-sentence head: parts BertForMaskedLM does not have
    folder = shutil.copytree(model_folders["bert"], tmp_path / "bert")
    weights = load_file(folder / "model.safetensors")
    weights["bert.pooler.dense.weight"] = torch.zeros(64, 64)
    weights["cls.seq_relationship.weight"] = torch.zeros(2, 64)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    DiffusionLM.from_pretrained(str(folder), device="cpu")
    # but a tensor for a module the model has, which it does not expect, is a mismatch
    weights["bert.encoder.layer.0.output.dense.extra"] = torch.zeros(3)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DiffutronError, match="1 tensors the model does not expect"):
        DiffusionLM.from_pretrained(str(folder), device="cpu")


def test_config_that_does_not_match_the_weights(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    with pytest.raises(
        DiffutronError,
        match=r"config.json does not match the weights' shapes: .* \(\[256, 256\] in the weights, \[128, 128\]",
    ):
        DiffusionLM.from_pretrained(str(folder), device="cpu")


def test_not_a_masked_lm_and_custom_code_get_their_own_errors(saved, tokenizer, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer))).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    with pytest.raises(DiffutronError, match="gpt2 is not a masked-LM architecture"):
        DiffusionLM.from_pretrained(str(gpt2), device="cpu")
    custom = _copy(saved, tmp_path, "custom")
    config = json.loads((custom / "config.json").read_text())
    auto_map = {"AutoConfig": "conf.MyConfig", "AutoModelForMaskedLM": "model.MyModel"}
    (custom / "config.json").write_text(json.dumps({**config, "model_type": "mystery", "auto_map": auto_map}))
    with pytest.raises(DiffutronError, match="custom-code model .* trust_remote_code"):
        DiffusionLM.from_pretrained(str(custom), device="cpu")
    (custom / "config.json").write_text(json.dumps({**config, "model_type": "mystery"}))
    with pytest.raises(DiffutronError, match="model type 'mystery' is unknown to transformers"):
        DiffusionLM.from_pretrained(str(custom), device="cpu")
    capsys.readouterr()
    for folder, message in ((gpt2, "not a masked-LM"), (custom, "unknown to transformers")):
        code, _, err = run_cli(capsys, "info", str(folder))
        assert code == 1 and len(err.strip().splitlines()) == 1 and message in err and "incomplete" not in err


def test_shipped_models_load_by_name(tmp_path, monkeypatch):
    for name in ("tiny-base", "diffutron/tiny-diffutron"):
        lm = DiffusionLM.from_pretrained(name, device="cpu")
        assert lm.name == name and lm.vocab_size == 16384
    # a local folder of that name wins over the shipped model
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-base").mkdir()
    with pytest.raises(DiffutronError, match="config.json is missing"):
        DiffusionLM.from_pretrained("tiny-base", device="cpu")


def test_a_run_folder_loads_its_final_model_or_newest_checkpoint(saved, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(saved, run / "checkpoint-2" / "model")
    shutil.copytree(saved, run / "checkpoint-10" / "model")
    assert DiffusionLM.from_pretrained(str(run), device="cpu").name == str(run / "checkpoint-10" / "model")
    shutil.copytree(saved, run / "final")
    assert DiffusionLM.from_pretrained(str(run), device="cpu").name == str(run / "final")
    code, out, _ = run_cli(capsys, "fill-mask", str(run), "Bugün <mask> güzel.", "--top-k", "2", "--json")
    assert code == 0 and json.loads(out)["model"] == str(run / "final")
    code, out, _ = run_cli(capsys, "info", "tiny-base", "--json")
    assert code == 0 and json.loads(out)["model"] == "tiny-base"


def test_unknown_preset_is_a_usage_error(capsys):
    with pytest.raises(UsageError, match="unknown preset 'huge'"):
        DiffusionLM.from_pretrained("preset:huge")
    code, _, err = run_cli(capsys, "eval", "preset:huge", "--data", "bundled:heldout")
    assert code == 2 and err.startswith("error: unknown preset")
