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
