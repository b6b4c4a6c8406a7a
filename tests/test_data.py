import gzip
import hashlib
import json
from collections import Counter

import numpy as np
import pytest
import zstandard

from diffutron.data.clean import CleanConfig, CleanStats, Deduplicator, clean_text, looks_turkish, turkish_lower
from diffutron.data.pack import PackConfig, Packer
from diffutron.data.prepare import DataRecipe, Mixture, SourceSpec, prepare
from diffutron.data.sources import iter_documents
from diffutron.errors import DiffutronError, UsageError

TR = "Bugün hava çok güzel ve biz de arkadaşlarımızla birlikte parka gitmeye karar verdik."
TR2 = "Ankara, Türkiye Cumhuriyeti'nin başkentidir ve İç Anadolu Bölgesi'nde yer alır."


# -- sources --------------------------------------------------------------------------------------
def test_txt_blank_and_line_modes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(f"{TR}\nikinci satır\n\n\n{TR2}\n")
    assert [d.text for d in iter_documents(str(path))] == [f"{TR}\nikinci satır", TR2]
    assert len(list(iter_documents(str(path), txt_mode="line"))) == 3


def test_compressed_jsonl_parquet_csv_and_globs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = "".join(json.dumps({"metin": t}) + "\n" for t in (TR, TR2)).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(rows))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(rows))
    pq.write_table(pa.table({"metin": [TR, None, TR2]}), tmp_path / "c.parquet")
    (tmp_path / "d.csv").write_text(f'id,metin\n1,"{TR}"\n2,"{TR2}"\n')
    rejects = Counter()
    docs = list(iter_documents(str(tmp_path), "metin", errors="count", rejects=rejects))
    assert [d.source for d in docs] == ["a.jsonl.gz"] * 2 + ["b.jsonl.zst"] * 2 + ["c.parquet"] * 2 + ["d.csv"] * 2
    assert rejects == {"wrong_type": 1}
    assert len(list(iter_documents(str(tmp_path / "*.jsonl.*"), "metin"))) == 4


def test_bad_records_are_counted_or_raised(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "iyi"}\nnot json\n{"body": 1}\n{"text": 5}\n{"text": "k\xff\xfet\xc3\xbc"}\n')
    rejects = Counter()
    assert [d.text for d in iter_documents(str(path), errors="count", rejects=rejects)] == ["iyi"]
    assert rejects == {"bad_json": 1, "missing_field": 1, "wrong_type": 1, "invalid_utf8": 1}
    with pytest.raises(DiffutronError, match=r"bad.jsonl:2: not valid JSON"):
        list(iter_documents(str(path)))


def test_heldout_never_enters_training():
    with pytest.raises(UsageError, match="held-out"):
        next(iter_documents("bundled:heldout", training=True))


def test_hf_sources_from_local_folders(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"text": [TR, TR2]}).save_to_disk(tmp_path / "saved")
    assert [d.text for d in iter_documents(f"hf:{tmp_path / 'saved'}")] == [TR, TR2]
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text(json.dumps({"text": TR}) + "\n")
    assert [d.text for d in iter_documents(f"hf:{tmp_path / 'files'}")] == [TR]


def test_hf_hub_failure_names_the_dataset_and_the_offline_way():
    with pytest.raises(DiffutronError, match=r"turkish-nlp-suite/Havadis.*Offline\?"):
        next(iter_documents("hf:turkish-nlp-suite/Havadis"))


# -- cleaning -------------------------------------------------------------------------------------
def _clean(text, **config):
    stats = CleanStats()
    return clean_text(text, CleanConfig(**config), stats), stats


def test_turkish_casing():
    assert turkish_lower("IĞDIR İSTANBUL Işık") == "ığdır istanbul ışık"


@pytest.mark.parametrize(
    "text, expected, rule",
    [
        ("Gu\u0308zel " + TR, "Güzel " + TR, "nfc"),
        ("Bu\x00gün\x07 " + TR, "Bugün " + TR, "control_chars"),
        (
            "Ã‡ok gÃ¼zel bir gÃ¼n, bugÃ¼n hava Ã§ok iyi ve biz de parka gittik.",
            "Çok güzel bir gün, bugün hava çok iyi ve biz de parka gittik.",
            "mojibake_repaired",
        ),
        (f"{TR}\n© 2024 Haber Sitesi. Tüm hakları saklıdır.\nPaylaş:", TR, "boilerplate_lines"),
        (f"{TR}   \n\n\n\n{TR2}", f"{TR}\n\n{TR2}", "whitespace"),
    ],
)
def test_modifying_rules(text, expected, rule):
    cleaned, stats = _clean(text)
    assert cleaned == expected and stats.modified[rule] >= 1


@pytest.mark.parametrize(
    "text, config, reason",
    [
        ("Kısa.", {}, "too_short"),
        (TR * 10, {"max_chars": 200}, "too_long"),
        (
            "The quick brown fox jumps over the lazy dog and then some more words here to make twenty words in total",
            {},
            "not_turkish",
        ),
        ("Быстрая коричневая лиса прыгает через ленивую собаку", {}, "not_turkish"),
        ("Ã‡ok gÃ¼zel bir gÃ¼n, bugÃ¼n hava Ã§ok iyi ve biz de parka gittik.", {"repair_mojibake": False}, "mojibake"),
    ],
)
def test_rejecting_rules(text, config, reason):
    cleaned, stats = _clean(text, **config)
    assert cleaned is None and stats.rejected == {reason: 1}


def test_turkish_filter_keeps_real_turkish():
    from diffutron.data import bundled_documents

    docs = [d.text for d in bundled_documents("heldout")]
    assert sum(looks_turkish(t, CleanConfig()) for t in docs) == len(docs)


def test_exact_and_near_duplicates():
    dedup, stats = Deduplicator(CleanConfig()), CleanStats()
    long_text = " ".join([TR, TR2, "Türkiye'nin en kalabalık şehri İstanbul'dur ve iki kıtaya yayılır."] * 3)
    assert not dedup.is_duplicate(long_text, stats)
    assert dedup.is_duplicate(turkish_lower(long_text).replace(",", ""), stats)  # same once normalised
    assert dedup.is_duplicate(long_text + " Ek.", stats)  # nearly the same
    assert not dedup.is_duplicate("Bambaşka bir metin: " + TR2 + " Kars, Erzurum ve Van doğudadır.", stats)
    assert stats.rejected == {"duplicate_exact": 1, "duplicate_near": 1}


def _with_planted_duplicates(texts, seed=0):
    """`texts`, with every 3rd of more than 20 words again with one word changed (a near duplicate or
    not: one word is 5 shingles of a short text) and every 13th again as it is, later."""
    import random

    rng, out = random.Random(seed), list(texts)
    for i, text in enumerate(texts):
        words = text.split()
        if i % 3 == 0 and len(words) > 20:
            words[rng.randrange(len(words))] = "değişti"
            out.insert(rng.randrange(i + 1, len(out) + 1), " ".join(words))
        if i % 13 == 0:
            out.insert(rng.randrange(i + 1, len(out) + 1), text)
    return out


def test_key_set_answers_as_a_python_set():
    from diffutron.data.clean import KeySet

    rng, keys, reference = np.random.default_rng(0), KeySet(), set()
    for size in [1, 0, 3, 7, 2, 50, 1, 1, 300, 5, 1000, 2, 64]:
        new = rng.integers(0, 2**64, size=size, dtype=np.uint64, endpoint=False)
        new = np.concatenate([new, new[:2], np.array([0, 2**64 - 1][: size % 3], dtype=np.uint64)])
        new = np.array([k for k in dict.fromkeys(new.tolist()) if k not in reference], dtype=np.uint64)
        asked = np.concatenate([new, np.array(sorted(reference)[:20], dtype=np.uint64), new + np.uint64(1)])
        assert keys.contains(asked).tolist() == [k in reference for k in asked.tolist()]
        keys.add(np.concatenate([new, new[:2]]))  # repeated within one call: kept once
        reference.update(new.tolist())
        assert keys.contains(asked).tolist() == [k in reference for k in asked.tolist()]
        assert keys.nbytes == 8 * len(reference)
        assert all((np.diff(level.astype(object)) > 0).all() for level in keys.levels)  # sorted, no repeats


def test_compact_band_keys_drop_the_documents_datasketch_lsh_drops():
    """The reference: datasketch's MinHashLSH holding every band's values, on the bundled corpus with
    planted duplicates; the Deduplicator drops the same documents, one at a time or chunk by chunk."""
    from datasketch import MinHashLSH

    from diffutron.data import bundled_documents
    from diffutron.data.clean import dedup_keys, minhash, normalized_for_dedup

    config = CleanConfig()
    texts = _with_planted_duplicates([d.text for d in bundled_documents("train")])
    seen, lsh, expected = set(), MinHashLSH(threshold=config.near_threshold, num_perm=config.num_perm), []
    for number, text in enumerate(texts):
        normal = normalized_for_dedup(text)
        digest, signature = hashlib.blake2b(normal.encode(), digest_size=8).digest(), minhash(normal, config.num_perm)
        if digest in seen:
            expected.append("duplicate_exact")
            continue
        seen.add(digest)
        if signature is not None and lsh.query(signature):
            expected.append("duplicate_near")
            continue
        if signature is not None:
            lsh.insert(number, signature)
        expected.append(None)
    counts = Counter(expected)
    assert counts["duplicate_near"] > 150 and counts["duplicate_exact"] > 150  # the test has something to find
    keys = [dedup_keys(text, config) for text in texts]
    assert keys[:300] == [dedup_keys(text, config, piece=50) for text in texts[:300]]  # long texts in pieces
    one_by_one = Deduplicator(config)
    assert [one_by_one.check(*k) for k in keys] == expected
    chunked = Deduplicator(config)
    assert [r for start in range(0, len(keys), 100) for r in chunked.check_many(keys[start : start + 100])] == expected
    kept_with_bands = sum(1 for k, r in zip(keys, expected, strict=True) if r is None and k[1] is not None)
    # 8 bytes a key: the digest of each document not an exact duplicate, 5 band keys of each one kept
    assert chunked.nbytes == one_by_one.nbytes == 8 * (len(texts) - counts["duplicate_exact"]) + 40 * kept_with_bands


def test_the_near_duplicate_index_takes_few_bytes_a_document():
    """20k distinct documents: the index holds 6 keys of 8 bytes each, 48 bytes a document (datasketch's
    MinHashLSH before: ~1.9 KB)."""
    import random
    import tracemalloc

    from diffutron.data.clean import dedup_keys

    config, rng = CleanConfig(), random.Random(0)
    words = sorted({w for t in (TR, TR2) for w in t.split()} | {f"kelime{i}" for i in range(5000)})
    keys = [dedup_keys(" ".join(rng.choices(words, k=30)), config) for _ in range(20_000)]
    dedup = Deduplicator(config)
    tracemalloc.start()
    try:
        for start in range(0, len(keys), 256):  # as data prepare checks a chunk
            assert dedup.check_many(keys[start : start + 256]) == [None] * len(keys[start : start + 256])
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held / len(keys) < 64 and peak / len(keys) < 100  # while arrays merge: at most twice the keys


# -- packing --------------------------------------------------------------------------------------
DOCS = [[10 + i] * n for i, n in enumerate([5, 17, 3, 40, 1, 22, 0, 15])]


def _reference_blocks(docs, config, prefix=(2,), suffix=(3,), pad=0):
    """The packing rules, written plainly: [(ids padded to max_length, real length)]."""
    prefix, suffix, room, blocks = list(prefix), list(suffix), config.max_length - len(prefix), []
    if config.mode == "document":
        room -= len(suffix)
        for d in docs:
            for i in range(0, max(len(d), 1), room):
                block = prefix + d[i : i + room] + suffix
                blocks.append((block + [pad] * (config.max_length - len(block)), len(block)))
        return blocks
    stream = [t for d in docs for t in d + suffix]
    while len(stream) >= room:
        blocks.append((prefix + stream[:room], config.max_length))
        stream = stream[room:]
    if stream and config.tail != "drop":
        block = prefix + stream
        blocks.append((block + [pad] * (config.max_length - len(block)), len(block)))
    return blocks


@pytest.mark.parametrize("mode, tail", [("pack", "pad"), ("pack", "keep"), ("pack", "drop"), ("document", "pad")])
def test_packing_matches_the_plain_rules(mode, tail):
    config = PackConfig(max_length=16, mode=mode, tail=tail)
    packer = Packer(config, prefix=[2], suffix=[3], pad_id=0)
    ids, lengths = [], []
    for i, doc in enumerate(DOCS):
        packer.add(np.array(doc, dtype=np.int32))
        if i % 3 == 1:  # blocks taken at any point are the same blocks
            block_ids, block_lengths = packer.take()
            ids += block_ids.tolist()
            lengths += block_lengths.tolist()
    block_ids, block_lengths = packer.finish()
    ids += block_ids.tolist()
    lengths += block_lengths.tolist()
    assert list(zip(ids, lengths, strict=True)) == _reference_blocks(DOCS, config)
    if mode == "pack" and tail != "drop":  # no token lost or repeated
        assert [t for row, n in zip(ids, lengths, strict=True) for t in row[1:n]] == [t for d in DOCS for t in d + [3]]


# -- encoding ------------------------------------------------------------------------------------
def test_token_encoder_matches_the_tokenizer_and_cuts_long_documents_where_ids_do_not_change(tokenizer):
    from diffutron.data import bundled_documents
    from diffutron.data.encode import TokenEncoder, cut_points

    texts = [d.text for d in bundled_documents("heldout")][:60] + ["", "[SEP] içinde özel belirteç"]
    reference = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert [ids.tolist() for ids in TokenEncoder(tokenizer)(texts)] == reference
    long = "  ".join(texts) + " 1234567890" * 30 + "\n\n" + "x" * 700  # double spaces, digits, no space at all
    small = TokenEncoder(tokenizer, piece_chars=300, batch_chars=1000)
    assert len(list(cut_points(long, 300))) > 20
    assert small([long, TR])[0].tolist() == tokenizer(long, add_special_tokens=False)["input_ids"]


# -- mixture and prepare --------------------------------------------------------------------------
def _corpus(tmp_path, name, prefix, n):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": f"{prefix} {i}. {TR} {TR2}"}) + "\n" for i in range(n)))
    return str(path)


def test_mixture_weights_are_seeded_and_budgets_stop_a_source(tmp_path):
    a, b = _corpus(tmp_path, "a", "Birinci kaynak belgesi", 400), _corpus(tmp_path, "b", "İkinci kaynak belgesi", 400)
    specs = [SourceSpec(a, weight=3, name="a"), SourceSpec(b, weight=1, name="b")]

    def draw():
        return [
            name for (name, _), _ in zip(Mixture(specs, 0, {"a": Counter(), "b": Counter()}), range(200), strict=False)
        ]

    draws, again = draw(), draw()
    assert 0.65 < draws.count("a") / 200 < 0.85
    assert draws == again
    budget = Mixture(
        [SourceSpec(a, tokens=100, name="a"), SourceSpec(b, name="b")], 0, {"a": Counter(), "b": Counter()}
    )
    documents, kept = iter(budget), Counter()
    for _ in range(10):
        name, _ = next(documents)
        kept[name] += budget.consume(name, 30, chunk=0)
    assert kept["a"] == 4  # 4 x 30 tokens reach 100: later documents of a are dropped ...
    budget.settle(0)  # ... and a is no longer drawn once the chunk that reached the budget is settled
    assert {name for name, _ in documents} == {"b"}


def test_fractions_split_a_source_into_stable_disjoint_parts(tmp_path):
    def texts(**part):
        return [text for _, text in Mixture([SourceSpec("bundled", name="b", **part)], 0, {"b": Counter()})]

    first, rest, whole = texts(fraction=0.5), texts(fraction=0.5, fraction_offset=0.5), texts()
    assert sorted(first + rest) == sorted(whole)  # disjoint, and together the whole source
    assert 0.4 < len(first) / len(whole) < 0.6
    assert texts(fraction=0.5) == first  # the same documents on every run
    with pytest.raises(UsageError, match="fraction"):
        texts(fraction=0.6, fraction_offset=0.5)


def _rows(folder):
    from datasets import load_from_disk

    return load_from_disk(str(folder))["input_ids"]


def test_prepare_counts_bad_lines_writes_balanced_shards_and_resumes(tmp_path):
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    good = _corpus(tmp_path, "good", "Belge", 300)
    with open(good, "a") as f:
        f.write('not json\n{"text": 3}\n{"başka": "x"}\n')
    recipe = DataRecipe(sources=[SourceSpec(good)], pack=PackConfig(max_length=64, shard_size=100))
    recipe.clean.dedup_near = False  # the documents differ by one number only
    stats = prepare(recipe, tmp_path / "out")
    source = stats["sources"][good]
    assert source["rejected"] == {"bad_json": 1, "wrong_type": 1, "missing_field": 1}
    assert source["kept"] == 300 and source["read"] == 303 == source["kept"] + sum(source["rejected"].values())
    assert stats["documents"] == {"read": 303, "kept": 300, "rejected": 3}
    dataset = load_from_disk_checked(tmp_path / "out", stats)
    real = sum(sum(m) for m in dataset["attention_mask"])
    assert real == 64 * stats["sequences"] - stats["padding_tokens"]
    assert real == stats["tokens"] + 300 + stats["sequences"]  # + a [SEP] per document, a [CLS] per block
    # shards of equal size: streamed over 2 nodes, each gets half the rows (before: 100 and the rest)
    assert stats["shards"] == 2 and max(stats["shard_rows"]) - min(stats["shard_rows"]) <= 1
    shards = sorted(str(p) for p in (tmp_path / "out").glob("data-*.arrow"))
    streamed = load_dataset("arrow", data_files=shards, split="train", streaming=True)
    assert streamed.num_shards == 2
    counts = [sum(1 for _ in split_dataset_by_node(streamed, rank=r, world_size=2)) for r in (0, 1)]
    assert sum(counts) == len(dataset) and abs(counts[0] - counts[1]) <= 1
    # a second run reuses the finished folder; a killed one (no stats.json) writes only what is missing
    assert prepare(recipe, tmp_path / "out")["reused"]
    for name in ("stats.json", "state.json", "data-00001.arrow"):
        (tmp_path / "out" / name).unlink()
    again = prepare(recipe, tmp_path / "out")
    assert again["reused_files"]["shards"] == 1 and _rows(tmp_path / "out") == dataset["input_ids"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "data-00000.arrow",
        "data-00001.arrow",
        "dataset_info.json",
        "recipe.json",
        "state.json",
        "stats.json",
    ]


def load_from_disk_checked(folder, stats):
    from datasets import load_from_disk

    dataset = load_from_disk(str(folder))
    assert len(dataset) == stats["sequences"] == sum(stats["shard_rows"])
    assert all(len(r) == stats["max_length"] for r in dataset["input_ids"])
    return dataset


def _interrupted(recipe, out, after_chunks=1):
    """Run prepare and stop it as Ctrl-C would, once `after_chunks` chunks are written."""
    seen = []

    def stop(_):
        seen.append(1)
        if len(seen) >= after_chunks:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(recipe, out, progress=stop)


def test_a_rerun_never_mixes_an_interrupted_folder_with_another_recipe_or_other_inputs(tmp_path, monkeypatch):
    import diffutron.data.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "CHUNK", 50)
    source = _corpus(tmp_path, "c", "Belge", 300)

    def recipe(max_length):
        r = DataRecipe(sources=[SourceSpec(source)], pack=PackConfig(max_length=max_length, shard_size=20))
        r.clean.dedup_near = False
        return r

    out = tmp_path / "out"
    _interrupted(recipe(64), out, after_chunks=3)
    with pytest.raises(UsageError, match="another recipe.*--force"):  # 64- and 128-token rows, mixed
        prepare(recipe(128), out)
    with open(source, "a") as f:  # same recipe, other input: the shards written so far are stale
        f.write(json.dumps({"text": f"Yeni bir belge. {TR}"}) + "\n")
    with pytest.raises(UsageError, match="other input files"):
        prepare(recipe(64), out)
    (out / "notes.txt").write_text("mine")
    replaced = prepare(recipe(128), out, force=True)
    assert (out / "notes.txt").read_text() == "mine"  # --force deletes only what data prepare writes
    fresh = prepare(recipe(128), tmp_path / "fresh")
    assert _rows(out) == _rows(tmp_path / "fresh") and replaced["tokens"] == fresh["tokens"]
    # a finished folder rerun with only num_proc changed is the same recipe: reused, no worker started
    two = recipe(128)
    two.num_proc = 2
    assert prepare(two, tmp_path / "fresh")["reused"]


def test_prepare_refuses_folders_it_did_not_write_and_replaces_a_bare_claim(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data-00000.arrow").write_text("someone else's")
    for force in (False, True):
        with pytest.raises(UsageError, match="no recipe.json"):
            prepare(DataRecipe(), foreign, force=force)
    assert (foreign / "data-00000.arrow").read_text() == "someone else's"
    claimed = tmp_path / "claimed"  # a run that failed before writing data leaves recipe.json alone
    with pytest.raises(UsageError, match="held-out"):
        prepare(DataRecipe(sources=[SourceSpec("bundled:heldout")]), claimed)
    assert [p.name for p in claimed.iterdir()] == ["recipe.json"]
    small = DataRecipe(max_documents=100, pack=PackConfig(max_length=128))
    assert prepare(small, claimed)["sequences"] > 0


def test_prepare_is_the_same_with_worker_processes_and_token_budgets(tmp_path, monkeypatch):
    import diffutron.data.prepare as prepare_module

    # small chunks and a short budget lag, so that the budget is reached with chunks in flight
    monkeypatch.setattr(prepare_module, "CHUNK", 16)
    monkeypatch.setattr(prepare_module, "BUDGET_LAG", 4, raising=False)
    a, b = _corpus(tmp_path, "a", "Belge", 400), _corpus(tmp_path, "b", "Başka bir kaynak", 400)

    def recipe(num_proc):
        sources = [SourceSpec(a, tokens=3000, name="a"), SourceSpec(b, name="b")]
        r = DataRecipe(sources=sources, pack=PackConfig(max_length=128, shard_size=100), num_proc=num_proc)
        r.clean.dedup_near = False  # the documents differ by one number only
        return r

    one, two = prepare(recipe(1), tmp_path / "one"), prepare(recipe(2), tmp_path / "two")
    assert 3000 <= one["sources"]["a"]["tokens"] < 3200 and one["sources"]["b"]["kept"] > 300
    drop = ("seconds", "recipe")
    assert {k: v for k, v in one.items() if k not in drop} == {k: v for k, v in two.items() if k not in drop}
    assert _rows(tmp_path / "one") == _rows(tmp_path / "two")
    for name in ("data-00000.arrow", "data-00001.arrow"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_near_duplicates_are_dropped_the_same_with_worker_processes(tmp_path, monkeypatch):
    """Duplicates within a chunk and across chunks, found by the main process from the workers' keys."""
    import diffutron.data.prepare as prepare_module
    from diffutron.data import bundled_documents

    monkeypatch.setattr(prepare_module, "CHUNK", 16)
    texts = _with_planted_duplicates([d.text for d in bundled_documents("train")][:500])
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def run(num_proc):
        recipe = DataRecipe(sources=[SourceSpec(str(path))], pack=PackConfig(max_length=128), num_proc=num_proc)
        return prepare(recipe, tmp_path / str(num_proc))

    one, two = run(1), run(2)
    assert one["rejected_by_reason"]["duplicate_near"] > 10 and one["rejected_by_reason"]["duplicate_exact"] > 10
    drop = ("seconds", "recipe")
    assert {k: v for k, v in one.items() if k not in drop} == {k: v for k, v in two.items() if k not in drop}
    assert (tmp_path / "1" / "data-00000.arrow").read_bytes() == (tmp_path / "2" / "data-00000.arrow").read_bytes()


def test_a_source_without_documents_is_an_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(DiffutronError, match="yields no document"):
        prepare(DataRecipe(sources=[SourceSpec(str(bad))]), tmp_path / "out")
