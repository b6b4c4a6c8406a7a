"""Fill-mask: the top-k candidates at every `<mask>` of a text, from one forward pass.

Each mask is predicted independently given the visible text (the masked-LM view). Filling several
masks jointly, each choice conditioning the next, is the sampler's job (`diffutron.sampling`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from diffutron.errors import UsageError

PLACEHOLDER = "<mask>"
SPAN = re.compile(r"<mask(?:\*(\d+))?>")
DEFAULT_TOP_K = 5


@dataclass
class Candidate:
    token: str  # the decoded token, with its leading space if it has one
    token_id: int
    prob: float
    sequence: str | None = None  # the text with this token at this mask (other masks left as placeholders)

    def to_dict(self) -> dict:
        """Without `sequence` when it was not asked for."""
        return {k: v for k, v in asdict(self).items() if k != "sequence" or v is not None}


def encode_with_masks(lm, text: str) -> list[int]:
    """Token ids of `text` with every `<mask>` (one token), `<mask*N>` (N tokens) or the tokenizer's
    own mask token as the mask id."""
    own = lm.tokenizer.mask_token
    counts = [_count(m) for m in SPAN.finditer(text)]
    if not counts and own not in text:
        raise UsageError(f"the text has no {PLACEHOLDER} to fill")
    if 0 in counts:
        raise UsageError("<mask*0> asks for no token: write <mask*N> with N >= 1, or leave it out")
    if sum(counts) > lm.context_length:  # checked before the text is built: <mask*10**9> would be 6 GB of text
        raise UsageError(
            f"the text asks for {sum(counts):,} masks, more than the model's context of {lm.context_length}"
        )
    ids = lm.tokenizer(SPAN.sub(lambda m: own * _count(m), text), verbose=False)["input_ids"]
    if len(ids) > lm.context_length:
        raise UsageError(f"the text is {len(ids)} tokens long, more than the model's context of {lm.context_length}")
    return ids


def count_masks(lm, text: str) -> int:
    """How many masks `text` asks for, without tokenising it (cheap, for a limit checked up front)."""
    own = lm.tokenizer.mask_token
    return sum(_count(m) for m in SPAN.finditer(text)) + SPAN.sub("\0", text).count(own)


def _count(match: re.Match) -> int:
    digits = match.group(1)
    return 1 if digits is None else int(digits) if len(digits) <= 18 else 10**18  # no 4,300-digit int()


@torch.no_grad()
def fill_mask(lm, text: str, top_k: int = DEFAULT_TOP_K, sequences: bool = True) -> list[list[Candidate]]:
    """For each mask of `text`, in order, its `top_k` candidates with their probabilities, and with
    `sequences` the text with each in place (a decoding of the whole text per candidate)."""
    if top_k < 1:
        raise UsageError(f"top-k must be at least 1, got {top_k}")
    ids = torch.tensor([encode_with_masks(lm, text)], device=lm.device)
    positions = ids == lm.mask_id
    probs = lm(ids, positions=positions).float().softmax(dim=-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    mask_columns = positions[0].nonzero().flatten().tolist()
    results = []
    for mask_index, column in enumerate(mask_columns):
        candidates = []
        for prob, token_id in zip(top.values[mask_index].tolist(), top.indices[mask_index].tolist(), strict=True):
            candidate = Candidate(token=lm.tokenizer.decode([token_id]), token_id=token_id, prob=prob)
            if sequences:
                filled = ids[0].clone()
                filled[column] = token_id
                candidate.sequence = _strip_specials(lm, lm.tokenizer.decode(filled, skip_special_tokens=False))
            candidates.append(candidate)
        results.append(candidates)
    return results


def _strip_specials(lm, text: str) -> str:
    """Remove [CLS]/[SEP]/padding but keep the other masks visible as the placeholder."""
    for token in lm.tokenizer.all_special_tokens:
        if token != lm.tokenizer.mask_token:
            text = text.replace(token, "")
    # A mask token that swallows the space before it (lstrip) gets that space back for display.
    mask_added = lm.tokenizer.added_tokens_decoder.get(lm.mask_id)
    shown = (" " if getattr(mask_added, "lstrip", False) else "") + PLACEHOLDER
    return text.replace(lm.tokenizer.mask_token, shown).strip()
