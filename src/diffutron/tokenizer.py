"""The subword tokenizer: training one on Turkish text, and loading the bundled one.

Byte-level BPE: every string round-trips exactly (ç ğ ı İ ö ş ü, apostrophes, digits, any
punctuation or whitespace), and nothing is ever `[UNK]`. No normaliser: cleaning (NFC, ...) is the
data pipeline's job, and a tokenizer that rewrites text could not round-trip it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from diffutron.atomic import replace_folder
from diffutron.errors import DiffutronError, UsageError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def bundled_tokenizer_path() -> Path:
    return Path(str(resources.files("diffutron") / "assets" / "tokenizer"))


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out: str | Path, model_max_length: int = 512, overwrite: bool = False
):
    """Train a byte-level BPE on `texts` and save it as a Hugging Face tokenizer folder.

    Nothing is written unless there is text; the folder appears whole (written beside it, then
    renamed), and an existing non-empty `out` is replaced only with `overwrite`.
    """
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not overwrite):
        raise UsageError(f"{out} exists and is not an empty folder: choose another output, or overwrite it (--force)")
    texts = iter(texts)
    first = next(texts, None)  # reading the first text also surfaces a missing or unreadable source now
    if first is None:
        raise DiffutronError("the sources hold no text: nothing to train a tokenizer on")
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
    tok.train_from_iterator(itertools.chain([first], texts), trainer=trainer)
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
    _write_folder(out, lambda tmp: save_tokenizer(hf, tmp))
    return hf


def _write_folder(out: Path, write) -> None:
    """write(tmp) fills a fresh folder beside `out`, which then replaces `out` (atomic.py)."""
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        replace_folder(tmp, out, out.with_name(f".old-{out.name}-{os.getpid()}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# transformers 5 saves a fast tokenizer under its internal class name, which 4.x cannot import; the
# public alias loads in both. Keys that describe how it was loaded, not the tokenizer, are dropped.
PORTABLE_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
LOAD_TIME_KEYS = ("is_local", "local_files_only")


def save_tokenizer(tokenizer, path: str | Path) -> None:
    """`tokenizer.save_pretrained(path)`, written so that transformers 4.x (>= 4.57) and 5.x both load it."""
    tokenizer.save_pretrained(str(path))
    make_portable(path)


def make_portable(folder: str | Path) -> None:
    """Rewrite a saved tokenizer_config.json with a class name both transformers 4.x and 5.x know."""
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    name = config.get("tokenizer_class")
    config["tokenizer_class"] = PORTABLE_CLASSES.get(name, name)
    for key in LOAD_TIME_KEYS:
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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
