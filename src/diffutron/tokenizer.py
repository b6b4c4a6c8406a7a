"""The subword tokenizer: training one on Turkish text, and loading the bundled one.

Byte-level BPE: every string round-trips exactly (ç ğ ı İ ö ş ü, apostrophes, digits, any
punctuation or whitespace), and nothing is ever `[UNK]`. No normaliser: cleaning (NFC, ...) is the
data pipeline's job, and a tokenizer that rewrites text could not round-trip it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def bundled_tokenizer_path() -> Path:
    return Path(str(resources.files("diffutron") / "assets" / "tokenizer"))


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: str | Path, model_max_length: int = 512):
    """Train a byte-level BPE on `texts` and save it as a Hugging Face tokenizer folder."""
    from transformers import PreTrainedTokenizerFast

    # lstrip: "Bugün [MASK] güzel" -- the mask stands for a whole word with its leading space,
    # as byte-level words carry their space ("Ġhava"), the RoBERTa convention.
    mask = AddedToken("[MASK]", lstrip=True, rstrip=False, special=True, normalized=False)
    specials = [mask if token == "[MASK]" else token for token in SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        bos_token="[CLS]",
        eos_token="[SEP]",
        mask_token=mask,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(str(out))
    _name_portable_class(Path(out) / "tokenizer_config.json")
    return hf


def _name_portable_class(config_path: Path) -> None:
    """transformers 5 writes its internal class name; the public alias loads in 4.x and 5.x alike."""
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load_bundled_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundled_tokenizer_path()))


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a single sequence ([CLS] ... [SEP], <s> ... </s>)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []
