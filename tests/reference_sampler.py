"""Slow, obviously-correct references: LLaDA's generate() loop (low-confidence remasking, greedy),
and the textbook nucleus (top-p) filter.

One prompt at a time, no padding, full logits over the whole canvas at every step, a Python top-k per
step -- as in LLaDA's generate.py. Special tokens other than EOS are never proposed (as in ours).
Shared by tests/test_sampling.py and benchmarks/generate.py, benchmarks/sample_draw.py.
"""

from __future__ import annotations

import torch


def llada_generate(lm, prompt: str, gen_length: int, steps: int, block_length: int, frame: str = "open") -> list[int]:
    return llada_generate_batch(lm, [prompt], gen_length, steps, block_length, frame)[0]


@torch.no_grad()
def llada_generate_batch(
    lm, prompts: list[str], gen_length: int, steps: int, block_length: int, frame: str = "open"
) -> list[list[int]]:
    """Prompts of equal token length in one batch (LLaDA's generate has no padding).

    frame "open" is LLaDA's own canvas, prompt then masks; "closed" adds the encoder's [SEP] after them.
    """
    prefix, suffix = lm.special_affixes
    suffix = suffix if frame == "closed" else []
    prompt_ids = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert len({len(p) for p in prompt_ids}) == 1, "the reference needs prompts of equal token length"
    x = torch.tensor([prefix + p + [lm.mask_id] * gen_length + suffix for p in prompt_ids], device=lm.device)
    start = len(prefix) + len(prompt_ids[0])
    vocab = len(lm.tokenizer)
    eos = lm.tokenizer.eos_token_id or lm.tokenizer.sep_token_id
    banned = [i for i in lm.special_ids if i != eos and i < vocab]
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for block in range(num_blocks):
        block_end = start + (block + 1) * block_length
        n = block_length  # every position of the block is a mask when the block starts
        counts = [n // steps_per_block + (1 if i < n % steps_per_block else 0) for i in range(steps_per_block)]
        for i in range(steps_per_block):
            mask_index = x == lm.mask_id
            logits = lm.full_logits(x)[:, :, :vocab].float()
            logits[:, :, banned] = float("-inf")
            x0 = logits.argmax(dim=-1)
            p = torch.softmax(logits, dim=-1)
            x0_p = p.gather(-1, x0[..., None]).squeeze(-1)
            x0_p[:, block_end:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), device=x.device))
            for row in range(x.shape[0]):  # LLaDA's per-row top-k
                chosen = torch.topk(confidence[row], counts[i]).indices
                x[row, chosen] = x0[row, chosen]
    return x[:, start : start + gen_length].tolist()


def nucleus_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Top-p as in the papers: sort every row, keep the prefix before the mass reaches p, -inf elsewhere."""
    values, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    keep_sorted = values.cumsum(dim=-1) - values < p
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))
