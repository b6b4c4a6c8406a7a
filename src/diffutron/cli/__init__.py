"""The `diffutron` command: thin wrappers over the library, one module per verb group.

Errors are one line on stderr, exit code 2 for a bad request and 1 for a failure at run time;
--debug shows the traceback.
"""

from __future__ import annotations

import os
import sys
import warnings

import typer
from typer.exceptions import TyperException

from diffutron.cli import data, harness, inspect, sample, serve, tokenizer, train  # noqa: F401 -- they register their verbs
from diffutron.cli.common import app
from diffutron.errors import DiffutronError


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turn every error into one line on stderr and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:  # library chatter (deprecations, their own progress bars) is not the user's business
        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        # transformers reads the hub's setting when imported; if it already is (main() called in-process),
        # tell it directly, without paying its import at start-up otherwise
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    try:
        code = app(args=argv or ["--help"], prog_name="diffutron", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except TyperException as e:  # bad options or arguments: a usage error
        if debug:
            raise
        print(f"error: {e.format_message()}", file=sys.stderr)
        return 2
    except DiffutronError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 -- anything else is a bug or an environment problem
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"error: {type(e).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
