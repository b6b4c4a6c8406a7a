"""`/v1/score` on the engine thread: bounded by the work it asks of the model, run a forward pass at a time.

Work is counted in forward tokens: summed over the request's forward passes, rows x padded length, a
pass counted as at least one window of the model's context (a pass has a fixed cost, whatever its
rows). A request gets at most SCORE_WORK / (the model's parameters) forward tokens — a bound on its
forward FLOPs (about 2 x parameters per token), so the same for any model in compute, not characters:
tiny-diffutron (6.5M parameters) 614,721 forward tokens, the mmBERT-base shape (307.8M) 12,996. The windows
are batched by tokens (up to SLICE_TOKENS per pass, or one window), and each pass is one slice of the
engine's loop: a denoising step runs between two of them, so streams keep moving while a text is scored.
"""

from __future__ import annotations

import inspect
from collections.abc import Generator

from diffutron.evaluate import EvalResult, iter_evaluation, make_windows, pass_shapes
from diffutron.serve.schemas import BadRequest

SCORE_WORK = 4e12  # parameters x forward tokens one score request may ask for
SLICE_TOKENS = 1024  # tokens of one forward pass (a slice) at most, unless one window is longer

_DEFAULTS = {name: p.default for name, p in inspect.signature(iter_evaluation).parameters.items()}


def work_budget(lm) -> int:
    """The forward tokens one score request may ask of `lm`."""
    return int(SCORE_WORK / sum(p.numel() for p in lm.parameters()))


def score_slices(lm, texts: list[str], options: dict, budget: int) -> Generator[None, None, EvalResult]:
    """`evaluate(lm, texts, **options)` a forward pass per next(), after refusing (BadRequest) a request
    whose work is over `budget` forward tokens."""
    windows = make_windows(lm, texts)
    if not windows:
        raise BadRequest("the text has no tokens to score", "text")
    batch_size = max(1, SLICE_TOKENS // max(len(w) for w in windows))
    passes = options.get("samples", _DEFAULTS["samples"]) + options.get("elbo_samples", _DEFAULTS["elbo_samples"])
    work = passes * sum(max(rows * length, lm.context_length) for rows, length in pass_shapes(windows, batch_size))
    if work > budget:
        raise BadRequest(
            f"scoring this takes {work:,} forward tokens ({passes} passes over {len(windows):,} windows), over "
            f"this model's {budget:,}: score fewer or shorter texts, or ask for fewer samples / elbo_samples",
            "text",
        )
    return (yield from iter_evaluation(lm, windows, batch_size=batch_size, **options))
