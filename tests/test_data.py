import gzip
import json
from collections import Counter

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


# -- packing --------------------------------------------------------------------------------------
DOCS = [[10 + i] * n for i, n in enumerate([5, 17, 3, 40, 1, 22])]


@pytest.mark.parametrize("tail", ["pad", "keep", "drop"])
def test_packing_loses_and_repeats_no_token(tail):
    packer = Packer(PackConfig(max_length=16, tail=tail), prefix=[2], suffix=[3], pad_id=0)
    blocks = [b for d in DOCS for b in packer.add(d)] + packer.finish()
    stream = [t for d in DOCS for t in d + [3]]
    body = [t for ids, n in blocks for t in ids[1:n]]
    assert all(ids[0] == 2 for ids, _ in blocks)
    if tail == "drop":
        assert all(len(ids) == 16 for ids, _ in blocks) and body == stream[: len(body)]
        assert len(stream) - len(body) < 15
    else:
        assert body == stream
        lengths = [len(ids) for ids, _ in blocks]
        assert all(n == 16 for n in lengths[:-1]) and (lengths[-1] == 16 if tail == "pad" else lengths[-1] <= 16)


def test_document_aligned_packing():
    packer = Packer(PackConfig(max_length=16, mode="document"), prefix=[2], suffix=[3], pad_id=0)
    blocks = [b for d in DOCS for b in packer.add(d)] + packer.finish()
    assert all(len(ids) == 16 and ids[0] == 2 and ids[n - 1] == 3 for ids, n in blocks)
    assert [t for ids, n in blocks for t in ids[1 : n - 1]] == [t for d in DOCS for t in d]


# -- mixture and prepare --------------------------------------------------------------------------
def _corpus(tmp_path, name, prefix, n):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": f"{prefix} {i}. {TR} {TR2}"}) + "\n" for i in range(n)))
    return str(path)


def test_mixture_weights_and_budgets_are_seeded(tmp_path):
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
    seen = Counter()
    for name, _ in budget:
        seen[name] += 1
        budget.consume(name, 30)
    assert seen["a"] == 4 and seen["b"] == 400


def test_fractions_split_a_source_into_stable_disjoint_parts(tmp_path):
    def texts(**part):
        return [text for _, text in Mixture([SourceSpec("bundled", name="b", **part)], 0, {"b": Counter()})]

    first, rest, whole = texts(fraction=0.5), texts(fraction=0.5, fraction_offset=0.5), texts()
    assert sorted(first + rest) == sorted(whole)  # disjoint, and together the whole source
    assert 0.4 < len(first) / len(whole) < 0.6
    assert texts(fraction=0.5) == first  # the same documents on every run
    with pytest.raises(UsageError, match="fraction"):
        texts(fraction=0.6, fraction_offset=0.5)


def test_prepare_counts_bad_lines_writes_shards_and_resumes(tmp_path):
    from datasets import load_from_disk
    from datasets.distributed import split_dataset_by_node

    good = _corpus(tmp_path, "good", "Belge", 300)
    with open(good, "a") as f:
        f.write('not json\n{"text": 3}\n{"başka": "x"}\n')
    recipe = DataRecipe(sources=[SourceSpec(good)], pack=PackConfig(max_length=64, shard_size=50))
    recipe.clean.dedup_near = False  # the documents differ by one number only
    stats = prepare(recipe, tmp_path / "out")
    assert stats["sources"][good]["rejected"] == {"bad_json": 1, "wrong_type": 1, "missing_field": 1}
    assert stats["documents"]["kept"] == 300 and stats["shards"] > 2
    dataset = load_from_disk(str(tmp_path / "out"))
    assert len(dataset) == stats["sequences"] and all(len(r) == 64 for r in dataset["input_ids"])
    real = sum(sum(m) for m in dataset["attention_mask"])
    assert real == 64 * stats["sequences"] - stats["padding_tokens"]
    assert real == stats["tokens"] + 300 + stats["sequences"]  # + a [SEP] per document, a [CLS] per block
    parts = [split_dataset_by_node(dataset.to_iterable_dataset(num_shards=4), rank=r, world_size=2) for r in (0, 1)]
    assert sum(1 for p in parts for _ in p) == len(dataset)
    # a second run reuses the finished folder; a killed run (no stats.json) rewrites only missing shards
    assert prepare(recipe, tmp_path / "out")["reused"]
    (tmp_path / "out" / "stats.json").unlink()
    (tmp_path / "out" / "data-00001.arrow").unlink()
    again = prepare(recipe, tmp_path / "out")
    assert again["shards_reused"] == stats["shards"] - 1
    assert load_from_disk(str(tmp_path / "out"))["input_ids"] == dataset["input_ids"]
    with pytest.raises(UsageError, match="another recipe"):
        prepare(DataRecipe(sources=[SourceSpec(good)], seed=5), tmp_path / "out")


def test_prepare_is_the_same_with_worker_processes(tmp_path):
    from datasets import load_from_disk

    source = _corpus(tmp_path, "c", "Belge", 600)
    one = DataRecipe(sources=[SourceSpec(source)], pack=PackConfig(max_length=128))
    two = DataRecipe(sources=[SourceSpec(source)], pack=PackConfig(max_length=128), num_proc=2)
    a, b = prepare(one, tmp_path / "one"), prepare(two, tmp_path / "two")
    assert (a["tokens"], a["sequences"], a["rejected_by_reason"]) == (
        b["tokens"],
        b["sequences"],
        b["rejected_by_reason"],
    )
    assert load_from_disk(str(tmp_path / "one"))["input_ids"] == load_from_disk(str(tmp_path / "two"))["input_ids"]


def test_a_source_without_documents_is_an_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(DiffutronError, match="yields no document"):
        prepare(DataRecipe(sources=[SourceSpec(str(bad))]), tmp_path / "out")
