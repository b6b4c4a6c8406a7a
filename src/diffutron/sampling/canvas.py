"""The canvas: a batch of token rows holding the fixed tokens (prompt, given text) and the masks to fill.

Generation: `[CLS] prompt [MASK] x max_new_tokens [SEP]` (frame "closed": the frame the encoder saw in
training) or `[CLS] prompt [MASK] x max_new_tokens` (frame "open": LLaDA's and dllm's canvas, which
ends with the masks), rows of different prompt lengths padded on the right. Infill: the user's text
with every `<mask>` (one token) or `<mask*N>` (N tokens) as masks; a text with a span of unknown length
(`<mask*?>`, `<mask*A-B>`) is one row per length, each row its own number of steps (word_fill.py
then keeps the best filling).
Each row records where its generated region starts and how long it is, so that blocks, stopping and
decoding are tensor operations over the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffutron.errors import UsageError
from diffutron.mask_syntax import blanks, count_masks, encode_with_masks
from diffutron.sampling.config import SamplingConfig


@dataclass
class Canvas:
    ids: torch.Tensor  # [B, L] token ids, masks where still to fill
    attention_mask: torch.Tensor  # [B, L] 1 for real tokens, 0 for padding
    fillable: torch.Tensor  # [B, L] bool: the positions the sampler may write (the initial masks)
    gen_start: torch.Tensor  # [B] first position of the generated region
    gen_length: torch.Tensor  # [B] its length (max_new_tokens for generation)
    # Set by the sampler: where each row's text ends (relative to gen_start; -1 while open) and why
    # (0 length, 1 EOS, 2 stop sequence).
    end: torch.Tensor | None = None
    reason: torch.Tensor | None = None
    # Per row, its steps when rows need different numbers (the lengths of an unknown-length span)
    steps: torch.Tensor | None = None
    # Infill of unknown-length spans (None when no text has one): per row, the text it fills and the
    # span's positions [start, end), or None for a text without such a span
    spans: list[tuple[int, tuple[int, int] | None]] | None = None


def generation_canvas(
    lm, prompts: list[str], max_new_tokens: int, truncate_prompt: bool = False, frame: str = SamplingConfig.frame
) -> Canvas:
    prefix, suffix = lm.special_affixes
    suffix = suffix if frame == "closed" else []
    encoded = lm.tokenizer(list(prompts), add_special_tokens=False, verbose=False)["input_ids"]
    room = lm.context_length - len(prefix) - len(suffix) - max_new_tokens
    if room < 0:
        raise UsageError(
            f"max_new_tokens {max_new_tokens} does not fit the model's context of {lm.context_length} tokens"
        )
    rows, starts = [], []
    for prompt in encoded:
        if len(prompt) > room:
            if not truncate_prompt:
                raise UsageError(
                    f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                    f"context of {lm.context_length} tokens; shorten the prompt or use truncate_prompt"
                )
            prompt = prompt[len(prompt) - room :]  # keep the end: it is what the continuation follows
        rows.append(prefix + prompt + [lm.mask_id] * max_new_tokens + suffix)
        starts.append(len(prefix) + len(prompt))
    canvas = _pad(lm, rows)
    canvas.gen_start = torch.tensor(starts)
    canvas.gen_length = torch.full((len(rows),), max_new_tokens)
    position = torch.arange(canvas.ids.shape[1])
    canvas.fillable = (position >= canvas.gen_start[:, None]) & (
        position < (canvas.gen_start + max_new_tokens)[:, None]
    )
    return canvas


def infill_canvas(lm, texts: list[str]) -> Canvas:
    """`<mask>` is one token to fill, `<mask*N>` is N; the tokenizer's own mask token works too. A text
    with one `<mask*?>` (1 to SPAN_LIMIT tokens) or `<mask*A-B>` is a row per length (`spans`)."""
    rows, spans = [], []
    for index, text in enumerate(texts):
        variable = [b for b in blanks(text) if b.variable]
        if not variable:
            rows.append(encode_with_masks(lm, text))
            spans.append((index, None))
            continue
        if variable[0].word:
            raise UsageError("<word> is fill-mask's (whole-word candidates); infill fills <mask*?> or <mask*A-B>")
        if len(variable) > 1:
            raise UsageError("infill takes one span of unknown length (<mask*?> or <mask*A-B>) per text")
        blank = variable[0]
        ids = encode_with_masks(lm, text, [blank.longest])  # the longest row must fit the context
        start = [i for i, t in enumerate(ids) if t == lm.mask_id][count_masks(lm, text[: blank.start])]
        left, right = ids[:start], ids[start + blank.longest :]
        for n in blank.lengths:
            rows.append(left + [lm.mask_id] * n + right)
            spans.append((index, (start, start + n)))
    canvas = _pad(lm, rows)
    canvas.fillable = canvas.ids == lm.mask_id
    position = torch.arange(canvas.ids.shape[1]).expand_as(canvas.ids)
    first = torch.where(canvas.fillable, position, canvas.ids.shape[1]).min(dim=1).values
    last = torch.where(canvas.fillable, position, -1).max(dim=1).values
    canvas.gen_start, canvas.gen_length = first, last - first + 1
    canvas.spans = spans if any(span is not None for _, span in spans) else None
    return canvas


def infill_steps(canvas: Canvas, steps: int | None) -> int:
    """The steps of an infill: `steps`, or one token a step for the row with the most masks. With spans of
    unknown length, each row is filled as it would be alone: `canvas.steps` gets its own masks (at most
    `steps`)."""
    masks = canvas.fillable.sum(dim=1)
    if canvas.spans is not None:
        canvas.steps = masks.clamp(max=steps) if steps else masks
    return steps or int(masks.max())


def _pad(lm, rows: list[list[int]]) -> Canvas:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), lm.pad_id)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
    empty = torch.zeros(len(rows), dtype=torch.long)
    return Canvas(ids, attention, torch.zeros_like(ids, dtype=torch.bool), empty, empty)
