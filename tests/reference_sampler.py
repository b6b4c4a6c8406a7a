"""A slow, obviously-correct reference: LLaDA's generate() loop (low-confidence remasking, greedy).

One prompt at a time, no padding, full logits over the whole canvas at every step, a Python top-k per
step -- as in LLaDA's generate.py. Special tokens other than EOS are never proposed (as in ours).
Shared by tests/test_sampling.py and benchmarks/generate.py.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def llada_generate(lm, prompt: str, gen_length: int, steps: int, block_length: int) -> list[int]:
    prefix, suffix = lm.special_affixes
    prompt_ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    x = torch.tensor([prefix + prompt_ids + [lm.mask_id] * gen_length + suffix], device=lm.device)
    start = len(prefix) + len(prompt_ids)
    vocab = len(lm.tokenizer)
    eos = lm.tokenizer.eos_token_id or lm.tokenizer.sep_token_id
    banned = [i for i in lm.special_ids if i != eos and i < vocab]
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for block in range(num_blocks):
        block_end = start + (block + 1) * block_length
        n = int((x[0, start + block * block_length : block_end] == lm.mask_id).sum())
        counts = [n // steps_per_block + (1 if i < n % steps_per_block else 0) for i in range(steps_per_block)]
        for i in range(steps_per_block):
            mask_index = x[0] == lm.mask_id
            logits = lm.full_logits(x)[0, :, :vocab].float()
            logits[:, banned] = float("-inf")
            x0 = logits.argmax(dim=-1)
            p = torch.softmax(logits, dim=-1)
            x0_p = p[torch.arange(x.shape[1]), x0]
            x0_p[block_end:] = float("-inf")
            x0 = torch.where(mask_index, x0, x[0])
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), device=x.device))
            chosen = torch.topk(confidence, counts[i]).indices
            x[0, chosen] = x0[chosen]
    return x[0, start : start + gen_length].tolist()
