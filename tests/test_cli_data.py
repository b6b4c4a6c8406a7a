"""`diffutron data prepare` / `data stats` as a user sees them: tables that add up, one-line errors, progress."""

import gzip
import json

from cli_run import run

from diffutron.data import bundled_documents


def _documents(n):
    return [d.text for d in bundled_documents("heldout")][:n]


def test_prepare_table_adds_up_reads_with_rejects(capsys, tmp_path):
    corpus = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in _documents(15)]
    corpus.write_text("\n".join(lines[:7] + ["not json", '{"text": 5}'] + lines[7:]) + "\n")
    code, out, _ = run(
        capsys, "data", "prepare", "--source", str(corpus), "--max-length", "64", "--out", str(tmp_path / "o")
    )
    assert code == 0
    assert "documents read 17 = kept 15 + rejected 2" in " ".join(out.split())
    code, out, _ = run(capsys, "data", "stats", str(tmp_path / "o"))
    assert code == 0 and "documents read 17 = kept 15 + rejected 2" in " ".join(out.split())
    assert "bad_json 1" in out and "wrong_type 1" in out


def test_stats_on_a_malformed_stats_json_is_one_line(capsys, tmp_path):
    for content in ("{", '{"documents": 3, "sources": {}}', "[]"):
        (tmp_path / "stats.json").write_text(content)
        for extra in ([], ["--json"]):
            code, out, err = run(capsys, "data", "stats", str(tmp_path), *extra)
            assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
            assert f"{tmp_path / 'stats.json'} is malformed" in err and "Traceback" not in err


def test_a_truncated_gzip_is_named_not_aborted(capsys, tmp_path):
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in _documents(40)).encode()
    packed = gzip.compress(data)
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    code, _, err = run(
        capsys, "data", "prepare", "--source", str(tmp_path / "cut.jsonl.gz"), "--out", str(tmp_path / "o")
    )
    assert code == 1 and err.strip() == (
        f"error: {tmp_path / 'cut.jsonl.gz'} is truncated: the compressed data ends early "
        "(an interrupted download or copy?)"
    )


def test_progress_lines_on_stderr_when_it_is_not_a_terminal(capsys, tmp_path, monkeypatch):
    import diffutron.cli.common as common

    monkeypatch.setattr(common, "PROGRESS_INTERVAL_S", 0.05)
    code, _, err = run(
        capsys,
        "data",
        "prepare",
        "--source",
        "bundled",
        "--max-documents",
        "400",
        "--out",
        str(tmp_path / "o"),
        "--json",
    )
    progress = [line for line in err.splitlines() if line.startswith("preparing: ")]
    assert code == 0 and len(progress) >= 2
    assert all(" documents, " in line and " sequences, " in line and "elapsed" in line for line in progress)
