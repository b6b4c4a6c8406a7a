import hashlib
import json
from importlib import resources

from diffutron.data import bundled_documents, read_documents


def test_splits_are_disjoint_real_turkish_and_follow_the_hash_rule():
    train = list(bundled_documents("train"))
    heldout = list(bundled_documents("heldout"))
    assert len(train) > 2000 and len(heldout) > 50
    assert not {d.id for d in train} & {d.id for d in heldout}
    assert {d.source for d in train} == {d.source for d in heldout} == {"ataturk", "treebank-web", "treebank-wiki"}
    for d in heldout:
        assert int(hashlib.sha256(d.id.encode()).hexdigest(), 16) % 1000 < 50
    text = " ".join(d.text for d in train[:200])
    assert all(ch in text for ch in "çğıİöşü")


def test_manifest_matches_the_files_and_notice_names_the_licences():
    corpus = resources.files("diffutron") / "data" / "corpus"
    manifest = json.loads((corpus / "manifest.json").read_text())
    for split in ("train", "heldout"):
        docs = list(bundled_documents(split))
        assert sum(s["documents"] for s in manifest["splits"][split].values()) == len(docs)
    notice = (corpus / "NOTICE.md").read_text()
    assert "public domain" in notice and "Apache License 2.0" in notice


def test_bundled_default_is_train_and_never_heldout():
    assert [d.id for d in read_documents("bundled")] == [d.id for d in bundled_documents("train")]
