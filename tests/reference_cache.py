"""Slow, obviously-correct references for the cached sampler (Fast-dLLM's approximate KV cache), written on
the model's own Hugging Face layers, not on sampling/cache.py:

  frozen_forward  -- the encoder's output at some positions of a canvas when every other position's
                     keys/values are those of an older canvas (the one of the last full forward, held
                     as the input of each of its layers: `layer_inputs`);
  cached_generate -- LLaDA's greedy low-confidence loop for one prompt (no padding), whose steps after a
                     refresh read the logits of `frozen_forward` at the columns a cached step recomputes.

Shared by tests/test_cache.py.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask


def _layers(lm, attention):
    """The encoder's embeddings, its layers as functions of their input, and its final norm."""
    encoder = lm.hf_model.base_model
    modern = lm.hf_model.config.model_type == "modernbert"
    like = torch.zeros(*attention.shape, 1, device=attention.device)
    mask_args = dict(config=encoder.config, inputs_embeds=like, attention_mask=attention)
    masks = {"full_attention": create_bidirectional_mask(**mask_args)}
    if modern:
        masks["sliding_attention"] = create_bidirectional_sliding_window_mask(**mask_args)
        where = torch.arange(attention.shape[1])[None]
        rotary = {t: encoder.rotary_emb(like, where, t) for t in masks}

    def run(layer):
        if modern:
            kind = layer.attention_type
            return lambda h: layer(h, attention_mask=masks[kind], position_embeddings=rotary[kind])
        return lambda h: layer(h, masks["full_attention"])

    layers = encoder.layers if modern else encoder.encoder.layer
    final = encoder.final_norm if modern else torch.nn.Identity()
    return lambda x: encoder.embeddings(input_ids=x), [run(layer) for layer in layers], final


@torch.no_grad()
def layer_inputs(lm, frozen_ids, attention) -> list[torch.Tensor]:
    """The input of every layer in the full forward of the canvas `frozen_ids`: what its keys/values are
    computed from."""
    embed, layers, _ = _layers(lm, attention)
    inputs = [embed(frozen_ids)]
    for layer in layers[:-1]:
        inputs.append(layer(inputs[-1]))
    return inputs


@torch.no_grad()
def frozen_forward(lm, frozen, ids, attention, positions):
    """Last hidden states [B, Q, H] at `positions` [B, Q] of the canvas `ids`, with the keys/values of every
    other position taken from the frozen canvas (`frozen`: its `layer_inputs`).

    Each layer gets the input it had in the frozen canvas's full forward, except at `positions`, where it
    gets the value computed here: so the positions outside `positions` carry the frozen keys/values and
    those at `positions` fresh ones. With the frozen canvas equal to `ids`, it is the full forward."""
    embed, layers, final = _layers(lm, attention)
    index = positions[..., None].expand(-1, -1, frozen[0].shape[-1])
    new = embed(ids)
    for layer, old in zip(layers, frozen, strict=True):
        new = layer(old.scatter(1, index, new.gather(1, index)))
    return final(new).gather(1, index)


@torch.no_grad()
def cached_generate(
    lm,
    prompt: str,
    gen_length: int,
    steps: int,
    block_length: int,
    cache: str,
    refresh_every: int | None = None,
    cfg_scale: float = 0.0,
    frame: str = "open",
    near_tie: float = 2e-4,
) -> list[int]:
    """Greedy, low-confidence remasking, no EOS stop; frame "open" (`[CLS] prompt masks`) or "closed" (a
    [SEP] after the masks).

    A full forward (a refresh: its canvas becomes the frozen one) at each block start and every
    `refresh_every` steps; the other steps compute the columns of the block (`cache` "dual") or of the
    block and everything after it ("prefix") against the frozen canvas. With guidance, the unconditional
    canvas (the prompt masked) has its own frozen canvas, refreshed at the same steps. Fails where a
    decision (an argmax, or which masks a step reveals) was within `near_tie` of going the other way."""
    prefix, suffix = lm.special_affixes
    suffix = suffix if frame == "closed" else []
    prompt_ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    x = torch.tensor([prefix + prompt_ids + [lm.mask_id] * gen_length + suffix], device=lm.device)
    start, length = len(prefix) + len(prompt_ids), x.shape[1]
    attention = torch.ones_like(x)
    vocab = len(lm.tokenizer)
    eos = lm.tokenizer.eos_token_id or lm.tokenizer.sep_token_id
    banned = [i for i in lm.special_ids if i != eos and i < vocab]
    steps_per_block = steps // (gen_length // block_length)

    def unconditional(canvas):
        masked = canvas.clone()
        masked[:, len(prefix) : start] = lm.mask_id
        return masked

    def logits_at(frozen, canvas, columns):
        hidden = frozen_forward(lm, frozen, canvas, attention, columns[None])
        return lm.head(hidden)[0, :, :vocab].float()

    since_refresh, closest = 0, float("inf")
    for block in range(gen_length // block_length):
        lo, hi = start + block * block_length, start + (block + 1) * block_length
        n = block_length
        counts = [n // steps_per_block + (1 if i < n % steps_per_block else 0) for i in range(steps_per_block)]
        for i in range(steps_per_block):
            if i == 0 or (refresh_every is not None and since_refresh + 1 >= refresh_every):
                frozen = layer_inputs(lm, x, attention)  # a full forward: the keys/values of this canvas
                frozen_uncond = layer_inputs(lm, unconditional(x), attention) if cfg_scale > 0 else None
                since_refresh = 0
            else:
                since_refresh += 1
            columns = torch.arange(lo, hi if cache == "dual" else length, device=x.device)
            logits = logits_at(frozen, x, columns)
            if cfg_scale > 0:
                uncond = logits_at(frozen_uncond, unconditional(x), columns)
                logits = uncond + (cfg_scale + 1) * (logits - uncond)
            logits[:, banned] = float("-inf")
            x0 = logits.argmax(dim=-1)
            confidence = logits.softmax(dim=-1).gather(-1, x0[:, None]).squeeze(-1)
            in_block = (columns < hi) & (x[0, columns] == lm.mask_id)
            confidence = torch.where(in_block, confidence, float("-inf"))
            chosen = torch.topk(confidence, counts[i]).indices
            x[0, columns[chosen]] = x0[chosen]
            closest = min(closest, _margin(logits[in_block], confidence[in_block], counts[i]))
    # The sampler's arithmetic differs from this one's (and with the rows beside it) by rounding, up to ~3e-5
    # in a logit on the tiny preset: its tokens must be these only where no decision was near a tie.
    assert closest > near_tie, f"a decision {closest:.1e} from a tie: rounding alone could change it"
    return x[0, start : start + gen_length].tolist()


def _margin(logits: torch.Tensor, confidence: torch.Tensor, count: int) -> float:
    """How far a step's decisions were from a tie: the gap between the two best logits of each mask, and
    between the last confidence revealed and the first kept back."""
    top2 = logits.topk(2, dim=-1).values
    gaps = [float((top2[:, 0] - top2[:, 1]).min())]
    if count < len(confidence):
        ranked = confidence.sort(descending=True).values
        gaps.append(float(ranked[count - 1] - ranked[count]))
    return min(gaps)
