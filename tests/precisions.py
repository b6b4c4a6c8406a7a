"""The precisions the sampler tests run in (the `lm` fixtures of test_sampling.py and test_cache.py), and what a
comparison with a slow reference needs in each.

The same function computed through other kernel shapes rounds differently: a row padded to its batch's width
against the row unpadded (the masked columns change the attention kernel's blocking, not the maths), a cached
step's attention over a block's few queries against the reference's full-width layers. In fp32 that is ~1e-7
and has flipped no token in these tests; in bf16 it is a bf16 step (8 significant bits), which flips
near-tied tokens, and the row goes its own way. So in bf16:
- a row is compared with a per-prompt (unpadded) reference when sampled alone: the same code, a batch of one;
- hidden states and logits are compared within TOLERANCE;
- token-for-token comparisons through other shapes (rows joining and leaving a batch, cached steps against
  the frozen reference) run in fp32 only; their bf16 counterparts are the hidden states within TOLERANCE
  (test_cache.py's architecture tests) and rows of one width (test_precision.py).
"""

import pytest
import torch

PRECISIONS = ["fp32", "bf16"]
# fp32: its rounding; bf16: 1/16 absolute, a few bf16 steps (2**-7 relative each) of the largest hidden values
# (~4 on the tiny models), and 2**-6 relative -- measured: 0.055 for a padded row, 0.008 for a cached step
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2**-4, rtol=2**-6)}
# logits of a row padded in company against the row alone (test_sampling.py): fp32 its rounding; bf16 half a
# logit, 8 bf16 steps (2**-4 each) of the largest logits (|logit| up to 14 on the tiny models) -- measured:
# 0.28 at most through the model, 0.05 through the cached forward, over two seeds
LOGITS_TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=0.5, rtol=0)}
OTHER_SHAPES = "bf16: a reference through other kernel shapes rounds otherwise, tokens may differ (tests/precisions.py)"


def reference_batches(lm, prompts: list[str]) -> list[list[str]]:
    """The batches to sample `prompts` in for a per-prompt reference: one in fp32, each prompt alone in bf16."""
    return [[p] for p in prompts] if lm.dtype == torch.bfloat16 else [list(prompts)]


def fp32_only(lm) -> None:
    """Skip, in bf16, a token-for-token comparison with a reference computed through other kernel shapes."""
    if lm.dtype == torch.bfloat16:
        pytest.skip(OTHER_SHAPES)
