"""The cached encoder forward: per-layer keys/values of a canvas, and hidden states of only some positions.

A bidirectional encoder has no causal order to cache by, but between two denoising steps only a few
positions of the canvas change. Fast-dLLM (Wu et al. 2025, "Fast-dLLM: Training-free Acceleration of
Diffusion LLM by Enabling KV Cache and Parallel Decoding", Alg. 1) keeps the keys/values (KV) of the
positions outside the current block from the last full forward and recomputes only

    prefix cache -- the block and everything after it (the prefix's KV reused),
    dual cache   -- the block alone (the prefix's and the suffix's KV reused),

with a full forward at every block start. Here the cache holds every position's KV at every layer,
and `EncoderCache.forward(ids, attention, positions)` computes the hidden states of the chosen
positions only: their queries, keys and values are computed fresh, layer by layer, written into the
cache in place, and attend to the cached keys/values of all positions. It runs on the model's own
modules (its embeddings, layers, norms, rotary embedding; LoRA layers in place), with

  * true positions for ModernBERT's rotary embedding (the column of each position);
  * ModernBERT's local layers' sliding window (|i - j| <= local_attention // 2, as transformers' mask)
    rebuilt from the true positions, and only the keys within reach of the queries read;
  * padding masked as keys, every row on its own (rows of different prompt lengths in one batch).

Exact when the cache holds the KV of the same canvas (tests/test_cache.py, fp32 atol 1e-5); an
approximation when other positions changed since (the point of it). Architectures: ModernBERT, and
BERT / RoBERTa / XLM-R / CamemBERT (absolute positions: the embeddings of the whole canvas are
computed, cheap, and read at the chosen positions).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

MODERNBERT = ("modernbert",)
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert")
SUPPORTED = MODERNBERT + BERT_LIKE


def supports(lm) -> bool:
    return lm.hf_model.config.model_type in SUPPORTED


def spans(first: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, Q] covering each row's range [first, end) (first < end), Q the longest range; a
    shorter row repeats its last position (a duplicate computes and writes the same values), and
    `valid` [B, Q] marks its own positions."""
    count = end - first
    steps = torch.arange(int(count.max()), device=first.device)
    valid = steps[None, :] < count[:, None]
    return first[:, None] + torch.minimum(steps[None, :], count[:, None] - 1), valid


class EncoderCache:
    """Keys/values of every layer for a batch of canvases, and the encoder forward that uses them."""

    def __init__(self, lm):
        config = lm.hf_model.config
        if config.model_type not in SUPPORTED:
            raise ValueError(f"no cached forward for model type {config.model_type!r}")
        self.lm = lm
        self.modern = config.model_type in MODERNBERT
        self.window = config.local_attention // 2 if self.modern else None
        self.keys: list[torch.Tensor] = []  # per layer [B, heads, L, head_dim], after the rotary embedding
        self.values: list[torch.Tensor] = []

    @property
    def empty(self) -> bool:
        return not self.keys

    def clear(self) -> None:
        self.keys, self.values = [], []

    def refresh(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The full forward: last hidden states [B, L, H] of every position; the cache rebuilt from it."""
        return self.forward(ids, attention, None)

    def remap(self, rows: torch.Tensor, width: int) -> None:
        """Row j becomes the old row `rows[j]`, or a row of zeros where `rows[j] < 0` (a row that joins: to be
        refreshed before it is read), over `width` columns: cut (padding of every row kept) or padded with
        zeros (columns that are padding for the old rows, masked as keys)."""
        have = rows >= 0

        def one(t: torch.Tensor) -> torch.Tensor:
            if bool(have.all()) and width <= t.shape[2]:
                return t[rows, :, :width]
            out = t.new_zeros((len(rows), t.shape[1], width, t.shape[3]))
            kept = min(width, t.shape[2])
            out[have, :, :kept] = t[rows[have], :, :kept]
            return out

        self.keys, self.values = [one(k) for k in self.keys], [one(v) for v in self.values]

    def part(self, rows: torch.Tensor) -> EncoderCache:
        """A cache of the rows `rows` alone (copies): refreshed or stepped on its own, then `put` back."""
        part = copy.copy(self)
        part.keys, part.values = [k[rows] for k in self.keys], [v[rows] for v in self.values]
        return part

    def put(self, rows: torch.Tensor, part: EncoderCache) -> None:
        """Write a part's keys/values back into the rows `rows`."""
        for mine, theirs in zip(self.keys + self.values, part.keys + part.values, strict=True):
            mine[rows] = theirs

    def forward(self, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Hidden states [B, Q, H] at `positions` [B, Q] (column indices, any order), the cache's keys/values
        at those positions replaced by fresh ones; `positions=None`: every position, a new cache."""
        encoder = self.lm.hf_model.base_model
        batch, length = ids.shape
        full = positions is None
        if full:
            positions = torch.arange(length, device=ids.device).expand(batch, length)
        elif self.empty:
            raise RuntimeError("the cache is empty: refresh it with a full forward first")
        hidden = encoder.embeddings(input_ids=ids)  # position-wise: read at the positions below
        if not full:
            hidden = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        masks = _Masks(attention.bool(), positions, self.window, full)
        if self.modern:
            layers, rotary = encoder.layers, {}
            for layer_type in {layer.attention_type for layer in layers}:
                rotary[layer_type] = encoder.rotary_emb(hidden, positions, layer_type)
        else:
            layers = encoder.encoder.layer
        if full:
            self.clear()
        for i, layer in enumerate(layers):
            if self.modern:
                hidden = self._modernbert_layer(i, layer, hidden, positions, masks, rotary[layer.attention_type])
            else:
                hidden = self._bert_layer(i, layer, hidden, positions, masks)
        return encoder.final_norm(hidden) if self.modern else hidden

    # -- one layer -----------------------------------------------------------------------------------
    def _modernbert_layer(self, i, layer, hidden, positions, masks, rotary) -> torch.Tensor:
        from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

        attn = layer.attn
        batch, queries, _ = hidden.shape
        qkv = attn.Wqkv(layer.attn_norm(hidden)).view(batch, queries, 3, -1, attn.head_dim)
        query, key, value = qkv.transpose(1, 3).unbind(dim=2)  # each [B, heads, Q, head_dim]
        query, key = apply_rotary_pos_emb(query, key, *rotary, unsqueeze_dim=1)
        local = layer.attention_type == "sliding_attention"
        out = self._attend(i, query, key, value, positions, masks, local)
        hidden = hidden + attn.out_drop(attn.Wo(out))
        return hidden + layer.mlp(layer.mlp_norm(hidden))

    def _bert_layer(self, i, layer, hidden, positions, masks) -> torch.Tensor:
        attention = layer.attention
        heads = attention.self.num_attention_heads
        batch, queries, _ = hidden.shape

        def split(linear):
            return linear(hidden).view(batch, queries, heads, -1).transpose(1, 2)

        this = attention.self
        out = self._attend(i, split(this.query), split(this.key), split(this.value), positions, masks, False)
        attended = attention.output(out, hidden)
        return layer.output(layer.intermediate(attended), attended)

    def _attend(self, i, query, key, value, positions, masks, local: bool) -> torch.Tensor:
        """Write the fresh keys/values at `positions`, attend to the layer's cache; [B, Q, heads * head_dim]."""
        if masks.full:  # a new cache
            self.keys.append(key.contiguous())
            self.values.append(value.contiguous())
        else:
            index = positions[:, None, :, None].expand_as(key)
            self.keys[i].scatter_(2, index, key)
            self.values[i].scatter_(2, index, value)
        keys, values, mask = self.keys[i], self.values[i], masks.local if local else masks.glob
        if local and masks.reach is not None:  # only the keys within the window of some query
            keys, values = keys[:, :, masks.reach[0] : masks.reach[1]], values[:, :, masks.reach[0] : masks.reach[1]]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=query.shape[-1] ** -0.5)
        return out.transpose(1, 2).flatten(2)


class _Masks:
    """The boolean attention masks [B, 1, Q, L'] of one forward (True: attend), built once for all layers:
    padding masked as keys; for local layers also |i - j| <= window, over the key columns `reach`.
    A query always sees itself, so that a padding query whose window holds only padding attends to
    something (its output is never read, but it must stay finite: it is cached as a key/value)."""

    def __init__(self, valid: torch.Tensor, positions: torch.Tensor, window: int | None, full: bool):
        self.full = full  # every position: the keys/values start a new cache
        length = valid.shape[1]
        columns = torch.arange(length, device=valid.device)
        itself = columns[None, None, :] == positions[..., None]  # [B, Q, L]
        self.glob = None if bool(valid.all()) else (valid[:, None, :] | itself)[:, None]
        self.local, self.reach = None, None
        if window is not None:
            lo = max(int(positions.min()) - window, 0)
            hi = min(int(positions.max()) + window + 1, length)
            self.reach = (lo, hi) if hi - lo < length else None
            lo, hi = self.reach or (0, length)
            near = (columns[None, None, lo:hi] - positions[..., None]).abs() <= window
            self.local = ((valid[:, None, lo:hi] & near) | itself[..., lo:hi])[:, None]
