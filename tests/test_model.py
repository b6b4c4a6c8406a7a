import warnings

import pytest
import torch
from transformers import AutoModelForMaskedLM, ElectraConfig

from diffutron.errors import DiffutronError
from diffutron.model import DiffusionLM


def _inputs(lm):
    enc = lm.tokenizer(
        ["Bugün hava çok güzel.", "Türkiye Büyük Millet Meclisi 1920'de açıldı ve çalışmaya başladı."],
        padding=True,
        return_tensors="pt",
    )
    positions = torch.rand(enc["input_ids"].shape, generator=torch.Generator().manual_seed(0)) < 0.4
    return enc["input_ids"], enc["attention_mask"], positions & enc["attention_mask"].bool()


@pytest.mark.parametrize("kind", ["modernbert", "bert", "roberta"])
def test_sparse_head_equals_full_forward_at_the_positions(model_folders, kind):
    lm = DiffusionLM.from_pretrained(model_folders[kind], device="cpu")
    ids, attention, positions = _inputs(lm)
    with torch.no_grad():
        sparse = lm(ids, attention, positions=positions)
        full = lm.full_logits(ids, attention)
    assert sparse.shape == (int(positions.sum()), lm.vocab_size)
    torch.testing.assert_close(sparse, full[positions], atol=1e-5, rtol=0)


def test_sparse_head_on_the_preset(tiny_lm):
    ids, attention, positions = _inputs(tiny_lm)
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_lm(ids, attention, positions), tiny_lm.full_logits(ids, attention)[positions], atol=1e-5, rtol=0
        )


def test_unknown_architecture_falls_back_with_one_warning(tokenizer):
    config = ElectraConfig(
        vocab_size=len(tokenizer),
        embedding_size=32,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = DiffusionLM(AutoModelForMaskedLM.from_config(config).eval(), tokenizer)
    assert sum("no sparse head" in str(w.message) for w in caught) == 1
    ids, attention, positions = _inputs(lm)
    with torch.no_grad():
        torch.testing.assert_close(lm(ids, attention, positions), lm.full_logits(ids, attention)[positions])


def test_special_ids_context_and_affixes(model_folders, tiny_lm):
    assert tiny_lm.mask_id == tiny_lm.tokenizer.mask_token_id
    assert tiny_lm.context_length == 512
    assert tiny_lm.special_affixes == ([tiny_lm.tokenizer.cls_token_id], [tiny_lm.tokenizer.sep_token_id])
    roberta = DiffusionLM.from_pretrained(model_folders["roberta"], device="cpu")
    assert roberta.context_length == 129  # 130 positions, counted from padding_idx (0) + 1
    assert DiffusionLM.from_pretrained(model_folders["bert"], device="cpu").context_length == 128


def test_presets_have_the_reference_shapes():
    tiny = DiffusionLM.from_preset("tiny", device="meta")
    assert 2e6 < sum(p.numel() for p in tiny.parameters()) < 2e7
    base = DiffusionLM.from_preset("mmbert-base", device="meta")
    config = base.hf_model.config
    assert sum(p.numel() for p in base.parameters()) == 307_786_240
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (
        256000,
        768,
        22,
        1152,
    )
    assert config.layer_types[:3] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert config.local_attention == 128 and base.context_length == 512


def test_preset_weights_are_seeded():
    a, b = DiffusionLM.from_preset("tiny", seed=1), DiffusionLM.from_preset("tiny", seed=1)
    c = DiffusionLM.from_preset("tiny", seed=2)
    wa, wb, wc = (next(m.hf_model.model.parameters()) for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_save_and_reload_gives_identical_logits_in_safetensors(tiny_lm, tmp_path):
    tiny_lm.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()
    reloaded = DiffusionLM.from_pretrained(str(tmp_path), device="cpu")
    ids, attention, positions = _inputs(tiny_lm)
    with torch.no_grad():
        assert torch.equal(tiny_lm(ids, attention, positions), reloaded(ids, attention, positions))


def test_lora_adapter_folder_loads_on_its_base(tiny_lm, tmp_path):
    from diffutron.lora import LoraSettings, apply_lora

    base_dir = tmp_path / "base"
    tiny_lm.save_pretrained(base_dir)
    base = DiffusionLM.from_pretrained(str(base_dir), device="cpu")
    wrapped = DiffusionLM(apply_lora(base.model, LoraSettings(r=4, alpha=8)), base.tokenizer)
    with torch.no_grad():  # make the adapter do something
        for name, p in wrapped.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    wrapped.save_pretrained(tmp_path / "adapter")
    loaded = DiffusionLM.from_pretrained(str(tmp_path / "adapter"), device="cpu")
    ids, attention, positions = _inputs(tiny_lm)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention, positions), wrapped(ids, attention, positions))
        assert not torch.allclose(loaded(ids, attention, positions), tiny_lm(ids, attention, positions))


def test_tokenizer_without_mask_token_is_refused(tiny_lm):
    class NoMask:
        mask_token_id = None

    with pytest.raises(DiffutronError, match="no mask token"):
        DiffusionLM(tiny_lm.model, NoMask())


def test_bad_model_names_give_clear_errors(tmp_path):
    with pytest.raises(DiffutronError, match="model folder not found"):
        DiffusionLM.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(DiffutronError, match="config.json is missing"):
        DiffusionLM.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "modernbert"}')
    with pytest.raises(DiffutronError, match="incomplete"):
        DiffusionLM.from_pretrained(str(tmp_path))
    with pytest.raises(DiffutronError, match="unreachable"):
        DiffusionLM.from_pretrained("some-org/no-such-model")
    with pytest.raises(DiffutronError, match="unknown preset"):
        DiffusionLM.from_pretrained("preset:huge")


def test_remote_code_is_off_by_default():
    import inspect

    assert inspect.signature(DiffusionLM.from_pretrained).parameters["trust_remote_code"].default is False
