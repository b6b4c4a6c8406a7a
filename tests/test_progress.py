"""Progress on stderr for long commands: plain periodic lines when stderr is not a terminal."""

import json

from diffutron.cli import common, main


def test_plain_progress_lines_without_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(common, "PROGRESS_INTERVAL_S", 0.0)
    with common.progress("eval x", unit="windows") as update:
        update(3, None)
        update(5, 10)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("eval x: 3 windows, ") and "elapsed 0:00:0" in lines[0]
    assert lines[1].startswith("eval x: 5/10 windows (50%), ") and "ETA" in lines[1]
    monkeypatch.setattr(common, "PROGRESS_INTERVAL_S", 3600.0)
    with common.progress("quiet") as update:
        update(1, 2)
    assert capsys.readouterr().err == ""  # at most one line per interval


def test_eval_reports_progress_on_stderr_and_labels_the_elbo(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(common, "PROGRESS_INTERVAL_S", 0.0)
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(["Ankara Türkiye'nin başkentidir ve büyük bir şehirdir."] * 5))
    argv = ["eval", "preset:tiny", "--data", str(data), "--elbo-samples", "2", "--batch-size", "2"]
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert {"elbo_ppl_stderr", "elbo_samples", "pass_ppl"} <= result.keys() and result["ppl_stderr"] is None
    assert f"eval {data}: 2 windows" in captured.err and f"eval {data}: 5 windows" in captured.err
    assert main(argv) == 0
    table = " ".join(capsys.readouterr().out.split())
    assert "ELBO bound on generative PPL" in table and "not comparable with PPL @ 15%" in table


def test_eval_float_options_and_the_default_strata(capsys):
    for ratio in ("nan", "inf", "-0.0", "1"):
        assert main(["eval", "--data", "bundled:heldout", "--mask-ratio", ratio]) == 2
        assert "--mask-ratio must be in (0, 1)" in capsys.readouterr().err
    from diffutron.cli.inspect import ELBO_STRATA
    from diffutron.evaluate import ELBO_STRATA as library_default

    assert ELBO_STRATA == library_default  # the CLI keeps its own copy so that --help does not import torch


def test_version(capsys):
    from diffutron import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out == f"diffutron {__version__}\n"
