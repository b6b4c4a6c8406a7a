import pytest
from transformers import AutoTokenizer

from diffutron.tokenizer import bundled_tokenizer_path, train_tokenizer

SAMPLES = [
    "İstanbul'da çığ düştü; Ağrı’nın 1923 yılı “şöyle” dedi: ÖĞRENCİ ISPARTA'ya gitti…",
    "ıİiI çÇ ğĞ öÖ şŞ üÜ — 3,14 %50 1.250.000 TL (12/05/2024) #etiket @kişi",
    "  iki  boşluk\tsekme\nyeni satır\n\nparagraf ",
    "Türkiye Büyük Millet Meclisi'nin açılışı 23 Nisan 1920'dir.",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_bundled_tokenizer_round_trips_turkish_exactly(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_bundled_tokenizer_has_the_special_tokens_a_masked_lm_needs(tokenizer):
    loaded = AutoTokenizer.from_pretrained(str(bundled_tokenizer_path()))
    assert 8000 <= len(loaded) <= 16384
    for token in ("pad", "unk", "cls", "sep", "mask"):
        assert getattr(loaded, f"{token}_token_id") is not None
    ids = loaded("Bugün [MASK] çok güzel.")["input_ids"]
    assert ids[0] == loaded.cls_token_id and ids[-1] == loaded.sep_token_id
    # The mask takes the word's leading space: the token after "Bugün" is the mask itself.
    assert ids[2] == loaded.mask_token_id
    assert ids == loaded("Bugün [MASK] çok güzel.")["input_ids"]


def test_train_tokenizer_writes_a_loadable_folder(tmp_path):
    texts = ["Ankara Türkiye'nin başkentidir.", "İzmir güzel bir şehirdir.", "Çalışkan öğrenciler ödül aldı."] * 20
    train_tokenizer(texts, vocab_size=400, out=tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.mask_token == "[MASK]"
    assert tok.decode(tok("Şu ığdır!")["input_ids"], skip_special_tokens=True) == "Şu ığdır!"


# --- folders that transformers 4.57 (the dllm ecosystem's pin) loads as well as 5.x -----------------
def _assert_portable(folder):
    """What transformers 4.57 needs of a saved tokenizer: tokenizer.json, and a tokenizer_config.json
    naming a class it has (5.x writes its internal TokenizersBackend, which 4.x cannot import)."""
    import json

    import transformers

    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast", folder  # a public class in 4.x and 5.x
    assert hasattr(transformers, config["tokenizer_class"])
    assert not {"is_local", "local_files_only"} & config.keys()  # how it was loaded, not what it is
    assert (folder / "tokenizer.json").is_file()
    assert config["mask_token"] == "[MASK]" and config["model_max_length"] == 512
    model_config = folder / "config.json"
    if model_config.is_file():  # ModernBERT: 4.x reads RoPE bases from the legacy keys only
        model = json.loads(model_config.read_text())
        rope = model["rope_parameters"]
        assert model["global_rope_theta"] == rope["full_attention"]["rope_theta"]
        assert model["local_rope_theta"] == rope["sliding_attention"]["rope_theta"]


def test_every_tokenizer_folder_diffutron_writes_loads_in_transformers_4(tmp_path):
    from diffutron.assets import MODELS, shipped_model
    from diffutron.model import DiffusionLM

    lm = DiffusionLM.from_preset("tiny", local_rope_theta=20000.0)
    lm.save_pretrained(tmp_path / "saved")  # checkpoints and exports are written by this
    train_tokenizer(["Ankara Türkiye'nin başkentidir."] * 20, vocab_size=300, out=tmp_path / "trained")
    for folder in [tmp_path / "saved", tmp_path / "trained", bundled_tokenizer_path()]:
        _assert_portable(folder)
    for name in MODELS:
        _assert_portable(shipped_model(name))
    assert json_of(tmp_path / "saved" / "config.json")["local_rope_theta"] == 20000.0


def json_of(path):
    import json

    return json.loads(path.read_text())


# --- tokenizer train never loses an existing folder ---------------------------------------------------
def test_train_checks_for_text_and_never_replaces_a_folder_it_did_not_write(tmp_path):
    from diffutron.errors import DiffutronError, UsageError

    texts = ["Ankara Türkiye'nin başkentidir.", "İzmir güzel bir şehirdir."] * 20
    existing = tmp_path / "tok"
    train_tokenizer(texts, vocab_size=320, out=existing)
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    with pytest.raises(UsageError, match="exists and is not an empty folder"):
        train_tokenizer(texts, vocab_size=300, out=existing)
    with pytest.raises(DiffutronError, match="no text"):
        train_tokenizer(iter([]), vocab_size=300, out=existing, overwrite=True)
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    train_tokenizer(texts, vocab_size=300, out=existing, overwrite=True)  # replaced whole
    assert len(AutoTokenizer.from_pretrained(str(existing))) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary folder left behind


def test_tokenizer_train_command_prints_and_refuses_to_overwrite(capsys, tmp_path):
    from diffutron.cli import main

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(["Ankara Türkiye'nin başkentidir.", "İzmir güzel bir şehirdir."] * 30))
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--source", str(text), "--vocab-size", "300", "--out", str(out)]
    assert main(argv) == 0 and f"wrote {out}" in capsys.readouterr().out  # the table output, not --json
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main([*argv[:3], str(empty), *argv[4:], "--force"]) == 1 and "no text" in capsys.readouterr().err
    assert len(AutoTokenizer.from_pretrained(str(out))) == 300
