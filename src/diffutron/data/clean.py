"""Turkish-aware cleaning: every rule counted in the stats with its reason.

Order: Unicode NFC -> control characters and broken surrogates removed -> mojibake repaired (ftfy's
`fix_encoding`, which only undoes wrong decodings) or rejected -> boilerplate lines removed ->
whitespace normalised -> length limits -> Turkish-language filter. Deduplication (exact on
normalised text, near-duplicates by MinHash LSH from `datasketch`) is `Deduplicator`, run in the
main process so that it sees every document.

Turkish casing: `turkish_lower` maps I -> ı and İ -> i before lowering; Python's `str.lower()`
would turn "I" into "i" and "İ" into "i̇" (i + combining dot).
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

TURKISH_LETTERS = set("abcçdefgğhıijklmnoöprsştuüvyzâîû")
TURKISH_ONLY = set("çğıöşü")  # ~8% of the letters of Turkish text, ~0% of English
STOPWORDS = frozenset(
    "ve bir bu da de için ile ne çok daha gibi olarak ama en o ki mi mı mu mü var yok ben sen biz siz "
    "onlar şu her kadar sonra önce değil olan olduğu ya veya ise diye göre bile hem hiç kendi".split()
)
# Mojibake of UTF-8 Turkish read as Latin-1 / cp1252: "Ã¼" = ü, "ÅŸ" = ş, "Ä±" = ı, "Ä°" = İ, ...
MOJIBAKE = re.compile(r"Ã[\u0080-\u00bf¼¶§‡–—˜™]|Ä[±°Ÿž\u009f\u009e]|Å[Ÿž\u009f\u009e]")
# Boilerplate lines: notices anywhere in a short line, or a line that is nothing but a site widget.
BOILERPLATE_NOTICE = re.compile(
    r"tüm hakları saklıdır|her hakkı saklıdır|all rights reserved|copyright|©|çerez.{0,40}kullan|"
    r"cookie|gizlilik politikası|kişisel verilerin korunması kanunu",
    re.IGNORECASE,
)
BOILERPLATE_WIDGET = re.compile(
    r"^\W*(reklam|ilgili haberler|etiketler|paylaş|yorum yap|yorumlar|abone ol|devamını oku|"
    r"haberin devamı|bültenimize abone olun|önceki haber|sonraki haber)\W*\d*\W*$",
    re.IGNORECASE,
)
MAX_BOILERPLATE_LINE = 200


def is_boilerplate(line: str) -> bool:
    return len(line) <= MAX_BOILERPLATE_LINE and bool(BOILERPLATE_NOTICE.search(line) or BOILERPLATE_WIDGET.match(line))


CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffe\uffff]|[\ud800-\udfff]")


def turkish_lower(text: str) -> str:
    return text.replace("I", "ı").replace("İ", "i").lower()


def normalized_for_dedup(text: str) -> str:
    """Case-folded the Turkish way, punctuation dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", turkish_lower(text)).split())


@dataclass
class CleanConfig:
    min_chars: int = 20
    max_chars: int = 1_000_000
    min_tokens: int = 0  # checked after tokenization
    max_tokens: int = 0  # 0: no limit
    turkish_filter: bool = True
    min_turkish_letter_share: float = 0.9  # of alphabetic characters
    min_specific_share: float = 0.03  # of letters that are ç ğ ı ö ş ü, for texts of 20 words or more ...
    min_stopword_share: float = 0.02  # ... or of words that are Turkish function words
    remove_boilerplate: bool = True
    repair_mojibake: bool = True
    dedup_exact: bool = True
    dedup_near: bool = True
    near_threshold: float = 0.8  # estimated Jaccard similarity of word 5-gram shingles
    num_perm: int = 64


@dataclass
class CleanStats:
    """Counts of what each rule did: `rejected` by reason, `modified` by rule."""

    rejected: Counter = field(default_factory=Counter)
    modified: Counter = field(default_factory=Counter)


def clean_text(text: str, config: CleanConfig, stats: CleanStats) -> str | None:
    """The cleaned text, or None (and the reason counted) when the document is rejected."""
    normalized = unicodedata.normalize("NFC", text)
    if normalized != text:
        stats.modified["nfc"] += 1
    text = CONTROL.sub("", normalized)
    if len(text) != len(normalized):
        stats.modified["control_chars"] += 1
    if MOJIBAKE.search(text):
        if config.repair_mojibake:
            import ftfy

            repaired = ftfy.fix_encoding(text)
            if not MOJIBAKE.search(repaired):
                stats.modified["mojibake_repaired"] += 1
                text = repaired
        if MOJIBAKE.search(text):
            stats.rejected["mojibake"] += 1
            return None
    if config.remove_boilerplate:
        lines = text.split("\n")
        kept = [line for line in lines if not is_boilerplate(line)]
        if len(kept) != len(lines):
            stats.modified["boilerplate_lines"] += len(lines) - len(kept)
            text = "\n".join(kept)
    spaced = re.sub(r"\n{3,}", "\n\n", "\n".join(" ".join(line.split()) for line in text.split("\n"))).strip()
    if spaced != text:
        stats.modified["whitespace"] += 1
    text = spaced
    if len(text) < config.min_chars:
        stats.rejected["too_short"] += 1
        return None
    if len(text) > config.max_chars:
        stats.rejected["too_long"] += 1
        return None
    if config.turkish_filter and not looks_turkish(text, config):
        stats.rejected["not_turkish"] += 1
        return None
    return text


_LETTER = re.compile(r"[^\W\d_]")
_TURKISH_LETTER = re.compile(f"[{''.join(sorted(TURKISH_LETTERS))}]")
_TURKISH_ONLY = re.compile(f"[{''.join(sorted(TURKISH_ONLY))}]")


def looks_turkish(text: str, config: CleanConfig) -> bool:
    """Letters mostly of the Turkish alphabet; for longer texts also Turkish-only letters or function words."""
    lowered = turkish_lower(text)
    letters = len(_LETTER.findall(lowered))
    if not letters:
        return False
    if len(_TURKISH_LETTER.findall(lowered)) / letters < config.min_turkish_letter_share:
        return False
    words = normalized_for_dedup(text).split()
    if len(words) < 20:
        return True
    specific = len(_TURKISH_ONLY.findall(lowered)) / letters
    stopwords = sum(w in STOPWORDS for w in words) / len(words)
    return specific >= config.min_specific_share or stopwords >= config.min_stopword_share


class Deduplicator:
    """Exact duplicates by a hash of the normalised text; near duplicates by MinHash LSH.

    Memory grows with the number of distinct documents (8 bytes a hash, num_perm/bands keys in the
    LSH index), not with their length.
    """

    def __init__(self, config: CleanConfig):
        self.config = config
        self.seen: set[bytes] = set()
        self.lsh = None
        if config.dedup_near:
            from datasketch import MinHashLSH

            self.lsh = MinHashLSH(threshold=config.near_threshold, num_perm=config.num_perm)
        self.count = 0

    def is_duplicate(self, text: str, stats: CleanStats) -> bool:
        reason = self.check(*dedup_keys(text, self.config))
        if reason:
            stats.rejected[reason] += 1
        return reason is not None

    def check(self, digest: bytes, signature) -> str | None:
        """ "duplicate_exact" / "duplicate_near" if a document with these keys was seen, else remember it."""
        if self.config.dedup_exact:
            if digest in self.seen:
                return "duplicate_exact"
            self.seen.add(digest)
        if self.lsh is not None and signature is not None:
            if self.lsh.query(signature):
                return "duplicate_near"
            self.lsh.insert(str(self.count), signature)
        self.count += 1
        return None


def dedup_keys(text: str, config: CleanConfig):
    """(exact digest, MinHash or None) of a cleaned text; computed where the work is parallel."""
    normal = normalized_for_dedup(text)
    digest = hashlib.blake2b(normal.encode(), digest_size=8).digest()
    return digest, minhash(normal, config.num_perm) if config.dedup_near else None


@functools.cache
def _minhash_template(num_perm: int):
    """datasketch draws a MinHash's permutations at construction: draw them once and share them."""
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=1)


def minhash(normal_text: str, num_perm: int):
    """MinHash of word 5-gram shingles; None for texts too short to shingle (exact dedup covers them)."""
    import xxhash
    from datasketch import MinHash

    words = normal_text.split()
    if len(words) < 5:
        return None
    shingles = {" ".join(words[i : i + 5]).encode() for i in range(len(words) - 4)}
    template = _minhash_template(num_perm)
    signature = MinHash(
        num_perm=num_perm,
        seed=1,
        hashfunc=xxhash.xxh32_intdigest,
        scheme=template.scheme,
        permutations=template.permutations,
    )
    signature.update_batch(list(shingles))
    return signature
