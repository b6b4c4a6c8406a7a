"""Fill-mask: the top-k candidates at every `<mask>` of a text, from one forward pass, and whole words at
every `<word>` (word_fill.py).

Each mask is predicted independently given the visible text (the masked-LM view). Filling several
masks jointly, each choice conditioning the next, is the sampler's job (`diffutron.sampling`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from diffutron.errors import UsageError
from diffutron.mask_syntax import PLACEHOLDER, blanks, count_masks, encode_with_masks
from diffutron.word_fill import DEFAULT_BEAM, WordCandidates, fill_words, word_limit

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


@torch.no_grad()
def fill_mask(
    lm,
    text: str,
    top_k: int = DEFAULT_TOP_K,
    sequences: bool = True,
    max_tokens: int | None = None,
    beam: int = DEFAULT_BEAM,
) -> list[list[Candidate] | WordCandidates]:
    """For each blank of `text`, in order, its `top_k` candidates: at each mask token (`<mask>`, each of
    `<mask*N>`) `Candidate`s with their probabilities, at each `<word>` whole words (`WordCandidate`s of
    1..`max_tokens` tokens, `beam` chains a length: word_fill.py), as a `WordCandidates` list. With
    `sequences`, each candidate's text in place (for a mask, a decoding of the whole text per candidate)."""
    if top_k < 1:
        raise UsageError(f"top-k must be at least 1, got {top_k}")
    variable = [b for b in blanks(text) if b.variable]
    # fill_words refuses a <mask*?> (infill's)
    words = fill_words(lm, text, top_k, word_limit(lm, max_tokens), beam, sequences=sequences) if variable else []
    # the masks see every <word> as one mask
    ids = torch.tensor([encode_with_masks(lm, text, [1] * len(variable))], device=lm.device)
    positions = ids == lm.mask_id
    columns = positions[0].nonzero().flatten().tolist()
    word_at = {columns[count_masks(lm, text[: b.start], [1] * i)]: i for i, b in enumerate(variable)}
    masks = [column for column in columns if column not in word_at]
    if masks:
        positions[0, list(word_at)] = False
        probs = lm(ids, positions=positions).float().softmax(dim=-1)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    results = []
    for column in columns:
        if column in word_at:
            results.append(words[word_at[column]])
            continue
        mask_index = masks.index(column)
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
