"""Files and folders replaced whole: the old copy survives until the new one is in place."""

import json
import os

import pytest

from diffutron import atomic


def _folder(path, text):
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def test_a_file_is_written_whole_and_no_partial_is_left(tmp_path):
    path = tmp_path / "x.json"
    atomic.write_json(path, {"a": "ğ"})
    atomic.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_folder_replaces_the_old_one_only_once_in_place(tmp_path):
    final, new, aside = _folder(tmp_path / "final", "old"), _folder(tmp_path / "new", "new"), tmp_path / "aside"
    seen = []
    atomic.replace_folder(new, final, aside, between=lambda: seen.append((final.exists(), aside.exists())))
    assert seen == [(False, True)]  # the old copy is aside, not deleted, while the new one moves in
    assert (final / "f.txt").read_text() == "new" and not aside.exists() and not new.exists()


def test_the_old_folder_comes_back_when_the_move_fails(tmp_path, monkeypatch):
    final, new, aside = _folder(tmp_path / "final", "old"), _folder(tmp_path / "new", "new"), tmp_path / "aside"
    real = os.replace

    def fail_moving_new_in(src, dst):
        if str(src) == str(new):
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", fail_moving_new_in)
    with pytest.raises(OSError, match="disk full"):
        atomic.replace_folder(new, final, aside)
    assert (final / "f.txt").read_text() == "old" and not aside.exists()


def test_a_stale_aside_folder_is_cleared_first(tmp_path):
    final, new = _folder(tmp_path / "final", "old"), _folder(tmp_path / "new", "new")
    aside = _folder(tmp_path / "aside", "stale")
    atomic.replace_folder(new, final, aside)
    assert (final / "f.txt").read_text() == "new" and not aside.exists()
