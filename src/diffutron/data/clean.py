"""Turkish-aware cleaning: every rule counted in the stats with its reason.

Order: Unicode NFC -> control characters and broken surrogates removed -> mojibake repaired (ftfy's
`fix_encoding`, which only undoes wrong decodings) or rejected -> boilerplate lines removed ->
whitespace normalised -> length limits -> Turkish-language filter. Deduplication (exact on
normalised text, near-duplicates by MinHash from `datasketch` and LSH banding, each band kept as a
64-bit key) is `Deduplicator`, run in the main process so that it sees every document.

Turkish casing: `turkish_lower` maps I -> ı and İ -> i before lowering; Python's `str.lower()`
would turn "I" into "i" and "İ" into "i̇" (i + combining dot).

Memory stays a small multiple of the document's size, whatever its length (one 50 MB line is a
document too): no rule builds a Python object per character, and the word-level work (the language
filter's word counts, deduplication keys) runs on pieces of `PIECE` characters cut at whitespace,
which gives the same result as the whole text at once.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

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


PIECE = 1 << 18  # characters of a long text normalised at a time
SHINGLE_BATCH = 1 << 13  # shingles hashed into a MinHash at a time


@dataclass
class CleanConfig:
    enabled: bool = True  # false: no cleaning rule and no deduplication, documents are tokenized as read
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
    if not config.enabled:
        return text
    normalized = text
    if not unicodedata.is_normalized("NFC", text):  # a check that copies nothing
        normalized = "".join(unicodedata.normalize("NFC", piece) for piece in text_pieces(text))
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
    spaced = normalize_whitespace(text)
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


def normalize_whitespace(text: str) -> str:
    """Runs of spaces and tabs within a line become one space, lines are stripped, at most one blank
    line in a row; the same as splitting every line into words and joining them, without the words."""
    text = _LINE_END_SPACE.sub("", _INNER_SPACE.sub(" ", text))
    return _BLANK_LINES.sub("\n\n", text).strip()


# whitespace as str.split() sees it, but the line break: runs, or one character that is not a space
# (a single space matches nothing, so that substituting in common text copies it once, not word by word)
_INNER_SPACE = re.compile(r"[^\S\n]{2,}|[^\S\n ]")
_LINE_END_SPACE = re.compile(r"(?m)^ | $")
_BLANK_LINES = re.compile(r"\n{3,}")
# Letters outside the Turkish alphabet: what remains once Turkish letters, non-word characters, digits
# and "_" are removed (a letter is a word character that is not a digit or "_", as `[^\W\d_]`).
_NON_TURKISH_LETTERS = re.compile(f"[{''.join(sorted(TURKISH_LETTERS))}\\W\\d_]+")
_WHITESPACE = re.compile(r"\s")


def text_pieces(text: str, size: int = PIECE) -> Iterator[str]:
    """`text` in consecutive pieces of about `size` characters, each cut just before a whitespace
    character: word-level work on the pieces sees the same words as on the whole text."""
    start = 0
    while len(text) - start > size:
        cut = _WHITESPACE.search(text, start + size)
        if cut is None:
            break
        yield text[start : cut.start()]
        start = cut.start()
    yield text[start:]


def looks_turkish(text: str, config: CleanConfig) -> bool:
    """Letters mostly of the Turkish alphabet; for longer texts also Turkish-only letters or function words."""
    turkish = letters = specific = words = stopwords = 0
    for piece in text_pieces(text):
        lowered = turkish_lower(piece)
        turkish += sum(lowered.count(ch) for ch in TURKISH_LETTERS)  # str.count: no object per character
        letters += len(_NON_TURKISH_LETTERS.sub("", lowered))  # letters outside the Turkish alphabet
        specific += sum(lowered.count(ch) for ch in TURKISH_ONLY)
        piece_words = normalized_for_dedup(piece).split()
        words += len(piece_words)
        stopwords += sum(map(STOPWORDS.__contains__, piece_words))
    letters += turkish
    if not letters or turkish / letters < config.min_turkish_letter_share:
        return False
    if words < 20:
        return True
    return specific / letters >= config.min_specific_share or stopwords / words >= config.min_stopword_share


class KeySet:
    """A growing set of 64-bit keys, 8 bytes a key (a Python set of ints takes ~70): sorted numpy arrays
    of decreasing size; new keys join the arrays no larger than they are, so a key is copied O(log n)
    times and a lookup searches O(log n) arrays."""

    def __init__(self):
        self.levels: list[np.ndarray] = []

    def contains(self, keys: np.ndarray) -> np.ndarray:
        order = np.argsort(keys)
        ordered = keys[order]  # searched in order: neighbouring searches share cache lines (2x faster)
        found = np.zeros(len(keys), dtype=bool)
        for level in self.levels:
            at = np.minimum(np.searchsorted(level, ordered), len(level) - 1)
            found |= level[at] == ordered
        result = np.empty_like(found)
        result[order] = found
        return result

    def add(self, keys: np.ndarray) -> None:
        """Add keys that are not in the set yet."""
        merging = [np.unique(keys)]
        size = len(merging[0])
        while self.levels and len(self.levels[-1]) <= size:
            merging.append(self.levels.pop())
            size += len(merging[-1])
        merged = np.concatenate(merging) if len(merging) > 1 else merging[0]
        del merging  # the arrays merged are freed before the sort: at most twice the keys at any moment
        merged.sort(kind="stable")  # timsort: sorted runs merge in linear time, with half their size of scratch
        if len(merged):
            self.levels.append(merged)

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for level in self.levels)


class Deduplicator:
    """Exact duplicates by a hash of the normalised text; near duplicates by MinHash LSH.

    The banding is datasketch's MinHashLSH's for the threshold (b bands of r MinHash values), but
    where MinHashLSH keeps every band's values and a bucket per band (~2 KB a document at num_perm
    64), a band is kept as a 64-bit hash of its values (`band_keys`) in a `KeySet`: 8 bytes for the
    exact hash and 8 per band (48 bytes a document at num_perm 64, threshold 0.8: 5 bands; up
    to twice that for a moment while the largest arrays merge). A
    document is a near duplicate where one of its band keys was seen, as MinHashLSH finds it where a
    band's values were seen; the keys add false matches only where two distinct bands' hashes
    collide: with n keys kept, a new document's b keys collide with probability <= b n / 2**64
    (1e-11 for the 2-3M documents of the reference corpus; over all of them, 3e-5).
    """

    def __init__(self, config: CleanConfig):
        self.config = config
        self.exact = KeySet() if config.dedup_exact else None
        self.near = KeySet() if config.dedup_near else None
        if config.dedup_near:
            band_ranges(config.near_threshold, config.num_perm)  # the parameters checked now, not at a document

    def is_duplicate(self, text: str, stats: CleanStats) -> bool:
        reason = self.check(*dedup_keys(text, self.config))
        if reason:
            stats.rejected[reason] += 1
        return reason is not None

    def check(self, digest: bytes | None, bands: bytes | None) -> str | None:
        """ "duplicate_exact" / "duplicate_near" if a document with these keys was seen, else remember it."""
        return self.check_many([(digest, bands)])[0]

    def check_many(self, keys: list[tuple[bytes | None, bytes | None]]) -> list[str | None]:
        """`check` of each document's (digest, band keys) in order: the index is searched once for all
        of them, and the documents among them are seen as they come."""
        exact_seen = _seen(self.exact, [digest for digest, _ in keys])
        near_seen = _seen(self.near, [bands for _, bands in keys])
        exact_new, near_new = set(), set()
        reasons: list[str | None] = []
        for (digest, bands), in_exact, in_near in zip(keys, exact_seen, near_seen, strict=True):
            reason = None
            if self.exact is not None and digest is not None:
                if in_exact or digest in exact_new:
                    reason = "duplicate_exact"
                else:
                    exact_new.add(digest)
            if reason is None and self.near is not None and bands is not None:
                band_list = [bands[i : i + 8] for i in range(0, len(bands), 8)]
                if in_near or any(band in near_new for band in band_list):
                    reason = "duplicate_near"
                else:
                    near_new.update(band_list)
            reasons.append(reason)
        for index, new in ((self.exact, exact_new), (self.near, near_new)):
            if index is not None and new:
                index.add(np.frombuffer(b"".join(new), dtype=np.uint64))
        return reasons

    @property
    def nbytes(self) -> int:
        """Memory of the index (the keys' arrays)."""
        return sum(index.nbytes for index in (self.exact, self.near) if index is not None)


def _seen(index: KeySet | None, keys: list[bytes | None]) -> list[bool]:
    """Per document, whether one of its keys (8 bytes each, joined) is in `index`; False where it has none."""
    present = [key for key in keys if key is not None]
    if index is None or not present:
        return [False] * len(keys)
    found = index.contains(np.frombuffer(b"".join(present), dtype=np.uint64))
    per_document = iter(found.reshape(len(present), -1).any(axis=1).tolist())
    return [key is not None and next(per_document) for key in keys]


@functools.cache
def band_ranges(threshold: float, num_perm: int) -> tuple[tuple[int, int], ...]:
    """MinHashLSH's bands for the threshold: (start, end) of each band's MinHash values."""
    from datasketch import MinHashLSH

    try:
        return tuple(MinHashLSH(threshold=threshold, num_perm=num_perm).hashranges)
    except ValueError as err:
        from diffutron.errors import UsageError

        raise UsageError(f"near-duplicate settings (near_threshold {threshold}, num_perm {num_perm}): {err}") from None


def band_keys(hashvalues: np.ndarray, threshold: float, num_perm: int) -> bytes:
    """A MinHash's bands as 64-bit hashes, joined (8 bytes a band): two bands of the same index have
    the same key where they have the same values, and otherwise with probability 2**-64."""
    return b"".join(
        hashlib.blake2b(hashvalues[start:end].tobytes(), digest_size=8, salt=band.to_bytes(8, "little")).digest()
        for band, (start, end) in enumerate(band_ranges(threshold, num_perm))
    )


def dedup_keys(text: str, config: CleanConfig, piece: int = PIECE) -> tuple[bytes, bytes | None]:
    """(exact digest, band keys or None) of a cleaned text; computed where the work is parallel.

    The digest is `blake2b(normalized_for_dedup(text))`; the band keys are `band_keys` of
    `minhash(normalized_for_dedup(text))`, None for texts too short to shingle. Computed piece by
    piece, so that a long text never exists as a list of its words or shingles.
    """
    digest = hashlib.blake2b(digest_size=8)
    signature = _new_minhash(config.num_perm) if config.dedup_near else None
    carry: list[str] = []  # the last 4 words so far: shingles span pieces
    count = 0
    for part in text_pieces(text, piece):
        words = normalized_for_dedup(part).split()
        if not words:
            continue
        digest.update(((" " if count else "") + " ".join(words)).encode())
        count += len(words)
        if signature is not None:
            window = carry + words
            shingles = list({" ".join(window[i : i + 5]).encode() for i in range(len(window) - 4)})
            for start in range(0, len(shingles), SHINGLE_BATCH):  # datasketch hashes a [num_perm, batch] matrix
                signature.update_batch(shingles[start : start + SHINGLE_BATCH])
            carry = window[-4:]
    if signature is None or count < 5:
        return digest.digest(), None
    return digest.digest(), band_keys(signature.hashvalues, config.near_threshold, config.num_perm)


@functools.cache
def _minhash_template(num_perm: int):
    """datasketch draws a MinHash's permutations at construction: draw them once and share them."""
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=1)


def _new_minhash(num_perm: int):
    import xxhash
    from datasketch import MinHash

    template = _minhash_template(num_perm)
    return MinHash(
        num_perm=num_perm,
        seed=1,
        hashfunc=xxhash.xxh32_intdigest,
        scheme=template.scheme,
        permutations=template.permutations,
    )


def minhash(normal_text: str, num_perm: int):
    """MinHash of word 5-gram shingles; None for texts too short to shingle (exact dedup covers them)."""
    words = normal_text.split()
    if len(words) < 5:
        return None
    signature = _new_minhash(num_perm)
    signature.update_batch(list({" ".join(words[i : i + 5]).encode() for i in range(len(words) - 4)}))
    return signature
