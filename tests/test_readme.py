"""The README's examples run, so the documentation cannot drift from the code.

Python blocks run in a fresh interpreter. Every `diffutron ...` line of a bash block runs in order
(later lines use what earlier ones wrote) in one scratch folder that links configs/, through the
CLI's own entry point in this process. Training lines run a few steps and harness lines a few
documents per task (`--max-steps` / `--limit` appended: the recipe, data, model and code path are the
same, only shorter). A line is skipped only for a
reason named in SKIP: the network, many GPUs, the blocking `serve` command (tests/test_serve.py), or
the setup itself. The client examples (curl, the openai package) talk to a server this test starts on
127.0.0.1 with the shipped model, at the port it got in place of the README's 8000.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffutron.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

SKIP = {  # a piece of the line -> why it does not run here
    "make demo": "the setup command itself: CI runs `make test`, tests/test_demo.py runs the demo",
    "make test": "the setup command itself",
    "pip install": "setup",
    "configs/data/diffutron-cpt.yaml": "the reference corpus streams from the Hugging Face Hub (network)",
    "jhu-clsp/": "a tokenizer from the Hub (network)",
    "accelerate launch": "several processes: tests/test_distributed.py launches every config and shape shown",
    "cetvel/": "a CETVEL checkout and its datasets (network)",
    "python -m diffutron.harness": "lm-eval's own CLI with placeholders; tests/test_harness.py runs it",
    "diffutron serve": "it blocks: tests/test_serve.py starts and stops it (the client examples get a server here)",
    "MODEL ": "a placeholder for the reader's model",
    "--measure-steps 3": "the 0.3B model from the Hub (network), timed on a GPU",
    "sbatch ": "a SLURM cluster: tests/test_distributed.py checks the script with bash -n",
}
README_SERVER = "http://127.0.0.1:8000"
SHORTER = {  # command -> what is appended (the same code paths, less of the data)
    "train": ["--max-steps", "3", "--set", "data.eval_documents=4"],
    "lm-eval": ["--limit", "5"],
    "eval": ["--elbo-samples", "2", "--samples", "1"],
}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def commands() -> list[str]:
    """The bash lines, continuation lines joined, comments dropped."""
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def argv_of(line: str) -> list[str]:
    """The words of a shell line up to its comment, with bash's $'...' strings understood."""
    escapes = {"n": "\n", "t": "\t", "\\": "\\", "'": "'"}
    unescape = lambda text: re.sub(r"\\(.)", lambda e: escapes.get(e.group(1), e.group(0)), text)  # noqa: E731
    line = re.sub(r"\$'((?:[^'\\]|\\.)*)'", lambda m: shlex.quote(unescape(m.group(1))), line)
    return shlex.split(line, comments=True)


def skip_reason(line: str) -> str | None:
    return next((why for piece, why in SKIP.items() if piece in line), None)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    (folder / "configs").symlink_to(ROOT / "configs")
    documents = ["Ankara Türkiye'nin başkentidir.", "İstanbul Boğazı iki kıtayı ayırır."]
    (folder / "my_docs.jsonl").write_text(
        "".join(json.dumps({"body": d}, ensure_ascii=False) + "\n" for d in documents), encoding="utf-8"
    )
    return folder


def test_every_bash_line_is_run_or_skipped_for_a_reason():
    lines = commands()
    assert len(lines) > 20
    for line in lines:
        assert line.startswith(("diffutron ", "curl ")) or skip_reason(line), f"the README test cannot run: {line}"


def test_the_bash_examples_run(scratch, monkeypatch, capsys):
    monkeypatch.chdir(scratch)
    ran = 0
    for line in commands():
        if skip_reason(line) or line.startswith("curl "):
            continue
        argv = argv_of(line)[1:]
        if "--dry-run" not in argv:
            argv += SHORTER.get(argv[0], [])
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 0, f"`{line}` exited {code}: {captured.err.strip()[-500:]}"
        if "--json" in argv:
            json.loads(captured.out.strip().splitlines()[-1])  # one JSON object
        ran += 1
    assert ran >= 15


@pytest.fixture(scope="module")
def server():
    from diffutron.model import DiffusionLM
    from diffutron.serve import create_app, serving

    with serving(create_app(DiffusionLM.from_pretrained("tiny-diffutron", device="cpu"))) as url:
        yield url


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_examples_run(server):
    lines = [line for line in commands() if line.startswith("curl ")]
    assert lines
    for line in lines:
        done = subprocess.run(
            ["bash", "-c", line.replace(README_SERVER, server)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0 and done.stdout.strip(), f"`{line}`: {done.stderr[-500:]}"
        assert '"error"' not in done.stdout, done.stdout[-500:]


@pytest.mark.parametrize("number", range(len(blocks("python"))))
def test_the_python_examples_run(number, tmp_path, request):
    code = blocks("python")[number]
    if README_SERVER in code:
        code = code.replace(README_SERVER, request.getfixturevalue("server"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
