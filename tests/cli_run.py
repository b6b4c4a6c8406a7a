"""Running the `diffutron` command in-process for the CLI tests: exit code, stdout, stderr."""

import json

from diffutron.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(stdout: str) -> dict:
    """The JSON object a --json command printed last."""
    return json.loads(stdout.strip().splitlines()[-1])
