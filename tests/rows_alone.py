"""The encoder computing every row of a batch alone, at its own width: a harness for tests of row independence.

A row's random numbers, blocks, steps and cache refreshes are its own, but the encoder's arithmetic is
not: padded beside longer rows (or, cached, in a span as wide as the widest row's), a row's sums run in
another order and its logits move by rounding (tests/test_sampling.py bounds it). Under this harness
each row is computed exactly as it would be alone, so a row's text in any company must equal its text
alone, bit for bit: what the sampler and the server themselves guarantee. The batched arithmetic is
still what the cache's bookkeeping (its rows joining, leaving, refreshed apart) works on.
"""

from __future__ import annotations

import torch

from diffutron.model import DiffusionLM
from diffutron.sampling.cache import EncoderCache


def _width(attention: torch.Tensor, row: int) -> int:
    """The row's own width: up to its last real token (canvases are padded on the right)."""
    return int(attention[row].nonzero().max()) + 1


def _lm_forward(forward):
    def alone(self, input_ids, attention_mask=None, positions=None, **options):
        if attention_mask is None or positions is None or input_ids.shape[0] == 1:
            return forward(self, input_ids, attention_mask, positions, **options)
        rows = []
        for row in range(input_ids.shape[0]):
            width = _width(attention_mask, row)
            cut = slice(row, row + 1), slice(0, width)
            rows.append(forward(self, input_ids[cut], attention_mask[cut], positions[cut], **options))
        return torch.cat(rows)  # each row's positions in order: the row-major order of the whole batch

    return alone


def _cache_forward(forward):
    def alone(self, ids, attention, positions):
        batch, length = ids.shape
        full = positions is None
        keys, values, hidden = [], [], []
        for row in range(batch):
            width = _width(attention, row)
            own = EncoderCache(self.lm)
            if not full:
                own.keys = [k[row : row + 1, :, :width].clone() for k in self.keys]
                own.values = [v[row : row + 1, :, :width].clone() for v in self.values]
            # a shorter span repeats its last position (cache.spans): compute the distinct ones only
            mine = None if full else positions[row : row + 1, : int((positions[row] < positions[row, -1]).sum()) + 1]
            got = forward(own, ids[row : row + 1, :width], attention[row : row + 1, :width], mine)
            if full:  # every position: pad back to the batch's width (padding, masked as keys)
                got = torch.nn.functional.pad(got, (0, 0, 0, length - width))
            else:  # the repeated positions compute the same values as the last one
                got = torch.cat([got, got[:, -1:].expand(-1, positions.shape[1] - got.shape[1], -1)], dim=1)
            keys.append([torch.nn.functional.pad(k, (0, 0, 0, length - width)) for k in own.keys])
            values.append([torch.nn.functional.pad(v, (0, 0, 0, length - width)) for v in own.values])
            hidden.append(got)
        self.keys = [torch.cat(layer) for layer in zip(*keys, strict=True)]
        self.values = [torch.cat(layer) for layer in zip(*values, strict=True)]
        return torch.cat(hidden)

    return alone


def compute_rows_alone(monkeypatch) -> None:
    """From now on in this test, the model's forward and the cached forward compute every row alone."""
    monkeypatch.setattr(DiffusionLM, "forward", _lm_forward(DiffusionLM.forward))
    monkeypatch.setattr(EncoderCache, "forward", _cache_forward(EncoderCache.forward))
