"""The cached encoder forward (sampling/cache.py) against the model's own layers, and cached decoding in the
sampler: exact where it must be, the refresh schedule it promises, rows leaving with their cache."""

import pytest
import torch
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

from diffutron.errors import UsageError
from diffutron.model import DiffusionLM
from diffutron.sampling import Denoiser, SamplingConfig, generate, generation_canvas, infill
from diffutron.sampling.cache import EncoderCache, spans
from diffutron.sampling.policies import select_factor

PROMPTS = ["Bugün hava", "Türkiye Büyük Millet Meclisi 1920 yılında", "Ey Türk gençliği! Birinci vazifen"]


@pytest.fixture(scope="module")
def lm():
    # A wider init than the preset's: a random model with varied predictions makes a sharper test.
    return DiffusionLM.from_preset("tiny", seed=0, initializer_range=0.2).eval()


@pytest.fixture(scope="module", params=["modernbert", "bert", "roberta"])
def arch_lm(request, model_folders):
    """Tiny random models of each architecture (ModernBERT's local layers see +-8 tokens)."""
    return DiffusionLM.from_pretrained(model_folders[request.param], device="cpu", dtype=torch.float32)


@torch.no_grad()
def reference_forward(lm, cached_ids, ids, attention, positions):
    """The model's own layers, whole sequences at a time: each layer's input is the input it had for the
    canvas `cached_ids`, except at `positions`, where it is the value computed here for `ids`. Its
    output at `positions` is what a cache of `cached_ids` should give: their keys/values fresh, every
    other position's from the cached canvas. With cached_ids == ids, it is the full forward."""
    encoder = lm.hf_model.base_model
    modern = lm.hf_model.config.model_type == "modernbert"
    layers = encoder.layers if modern else encoder.encoder.layer

    def embed(x):
        return encoder.embeddings(input_ids=x)

    old, new = embed(cached_ids), embed(ids)
    mask_args = dict(config=encoder.config, inputs_embeds=old, attention_mask=attention)
    masks = {"full_attention": create_bidirectional_mask(**mask_args)}
    if modern:
        masks["sliding_attention"] = create_bidirectional_sliding_window_mask(**mask_args)
        where = torch.arange(ids.shape[1])[None]
        rotary = {t: encoder.rotary_emb(old, where, t) for t in masks}

    def run(layer, h):
        if modern:
            kind = layer.attention_type
            return layer(h, attention_mask=masks[kind], position_embeddings=rotary[kind])
        return layer(h, masks["full_attention"])

    index = positions[..., None].expand(-1, -1, old.shape[-1])
    for layer in layers:
        mixed = old.scatter(1, index, new.gather(1, index))
        old, new = run(layer, old), run(layer, mixed)
    new = encoder.final_norm(new) if modern else new
    return new.gather(1, index)


def a_batch(lm, new_tokens=12):
    """Three canvases of different prompt lengths (padded), the second with its first 4 tokens written."""
    canvas = generation_canvas(lm, PROMPTS, new_tokens)
    written = torch.tensor(lm.tokenizer(" bir iki üç dört", add_special_tokens=False)["input_ids"][:4])
    after = canvas.ids.clone()
    for row, start in enumerate(canvas.gen_start.tolist()):
        after[row, start : start + 4] = written
    return canvas.ids, after, canvas.attention_mask, canvas.gen_start


def span_after_written(span: str, attention, start):
    """The columns a cached step recomputes after the 4 written tokens: the next 4 (dual) or all after them."""
    since = start + 4
    return spans(since, since + 4 if span == "block" else attention.sum(dim=1))


@pytest.mark.parametrize("span", ["block", "block and after"])
def test_cached_forward_is_exact_on_the_same_canvas(arch_lm, span):
    lm = arch_lm
    ids, _, attention, start = a_batch(lm)
    positions, valid = span_after_written(span, attention, start)
    cache = EncoderCache(lm)
    with torch.no_grad():
        cache.refresh(ids, attention)
        hidden = cache.forward(ids, attention, positions)
        exact = lm.encode(ids, attention)
        torch.testing.assert_close(hidden[valid], exact.gather(1, positions[..., None].expand_as(hidden))[valid])
        chosen = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, positions, valid)
        torch.testing.assert_close(lm.head(hidden[valid]), lm(ids, attention, positions=chosen), atol=1e-5, rtol=0)
        # the refresh is the model's own forward
        torch.testing.assert_close(cache.refresh(ids, attention)[attention.bool()], exact[attention.bool()])


def test_reference_is_the_full_forward_on_the_same_canvas(arch_lm):
    ids, _, attention, start = a_batch(arch_lm)
    positions, _ = spans(start, start + 6)
    with torch.no_grad():
        exact = arch_lm.encode(ids, attention)
    exact = exact.gather(1, positions[..., None].expand(-1, -1, exact.shape[-1]))
    torch.testing.assert_close(reference_forward(arch_lm, ids, ids, attention, positions), exact)


@pytest.mark.parametrize("span", ["block", "block and after"])
def test_cached_forward_after_a_change_reads_the_cached_keys_and_values(arch_lm, span):
    """The cache holds the canvas before 4 tokens were written; the block after them is recomputed."""
    lm = arch_lm
    before, after, attention, start = a_batch(lm)
    positions, valid = span_after_written(span, attention, start)
    cache = EncoderCache(lm)
    with torch.no_grad():
        cache.refresh(before, attention)
        hidden = cache.forward(after, attention, positions)
    expected = reference_forward(lm, before, after, attention, positions)
    torch.testing.assert_close(hidden[valid], expected[valid], atol=1e-5, rtol=1e-5)
    exact = lm.encode(after, attention).gather(1, positions[..., None].expand_as(hidden))
    assert not torch.allclose(hidden[valid], exact[valid], atol=1e-3)  # approximate: stale keys/values read


def test_recomputing_every_position_is_the_full_forward_of_the_new_canvas(arch_lm):
    """Fresh keys/values are written before a layer attends, so all positions of a new canvas is exact."""
    before, after, attention, _ = a_batch(arch_lm)
    everything = torch.arange(before.shape[1]).expand_as(before)
    cache = EncoderCache(arch_lm)
    with torch.no_grad():
        cache.refresh(before, attention)
        hidden = cache.forward(after, attention, everything)
        exact = arch_lm.encode(after, attention)
    torch.testing.assert_close(hidden[attention.bool()], exact[attention.bool()], atol=1e-5, rtol=1e-5)


# -- the sampler with a cache ------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        dict(block_length=4),
        dict(block_length=6, cfg_scale=1.5),
        dict(policy="threshold", threshold=0.2, block_length=4),
        dict(policy="factor", factor=2.0, temperature=1.0, top_k=50, repetition_penalty=1.3),
        dict(stop=("a",), block_length=4),  # rows stop at different steps and leave
    ],
)
def test_refreshing_at_every_step_is_the_exact_sampler(lm, options):
    """With refresh_every=1 every step is the cache's own full forward (prefix and dual alike)."""
    runs = {}
    for mode in ("none", "dual"):
        seen = []
        result = generate(
            lm,
            PROMPTS,
            max_new_tokens=12,
            cache=mode,
            refresh_every=1,
            seed=3,
            callback=lambda s, seen=seen: seen.append((s.step, s.ids.clone(), s.revealed.clone(), s.active.clone())),
            **options,
        )
        runs[mode] = (result.token_ids, result.finished_by, seen)
    (exact_ids, exact_by, exact_seen), (ids, by, seen) = runs["none"], runs["dual"]
    assert ids == exact_ids and by == exact_by
    assert all(
        a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:], strict=True))
        for a, b in zip(exact_seen, seen, strict=True)
    )
    if "stop" in options:
        assert "stop" in by and len({len(t) for t in ids}) > 1


def test_infill_refreshing_at_every_step_is_exact(lm):
    texts = ["Ankara <mask*3> başkentidir.", "Bu <mask> çok <mask*2> güzel bir gün, değil mi?"]
    assert infill(lm, texts, cache="dual", refresh_every=1).texts == infill(lm, texts).texts


@pytest.mark.parametrize(
    "cache, every, expected",
    [
        # 8 tokens, blocks of 4, one token per step: a full forward (None) at each block start
        ("dual", None, [None, 4, 4, 4, None, 4, 4, 4]),
        ("dual", 2, [None, 4, None, 4, None, 4, None, 4]),
        ("prefix", None, [None, 8, 8, 8, None, 4, 4, 4]),  # the block and the rest of the masks (open frame)
    ],
)
def test_a_cached_step_recomputes_only_its_columns(lm, monkeypatch, cache, every, expected):
    computed = []
    original = EncoderCache.forward

    def spy(self, ids, attention, positions):
        computed.append(None if positions is None else positions.shape[1])
        return original(self, ids, attention, positions)

    monkeypatch.setattr(EncoderCache, "forward", spy)
    generate(lm, ["Bugün"], max_new_tokens=8, block_length=4, cache=cache, refresh_every=every, stop_at_eos=False)
    assert computed == expected


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_rows_leave_the_batch_with_their_cache(lm, cfg_scale):
    """A short row (long prompt: the batch narrows when it leaves) and a long one, each one block: after
    the short row is done, the long one goes on with its own cache rows, as it does alone."""
    config = SamplingConfig(cache="dual", cfg_scale=cfg_scale, stop_at_eos=False, seed=2)
    short = SamplingConfig(**{**config.__dict__, "block_length": 4, "steps": 4})
    alone = {
        "long": generate(lm, [PROMPTS[0]], max_new_tokens=6, config=config).token_ids[0],
        "short": generate(lm, [PROMPTS[1]], max_new_tokens=4, config=short).token_ids[0],
    }
    denoiser = Denoiser(lm, config)
    denoiser.add(generation_canvas(lm, [PROMPTS[1]], 4), short, keys=["short"])
    denoiser.add(generation_canvas(lm, [PROMPTS[0]], 6), config, keys=["long"])
    together, widths = {}, []
    while len(denoiser):
        together.update((f.key, f.token_ids) for f in denoiser.step().finished if f)
        widths.append(denoiser.rows["ids"].shape[1] if len(denoiser) else 0)
    assert together == alone
    assert widths[3] < widths[2]  # the short row left after its 4th step, and its columns went with it


@pytest.mark.parametrize(
    "options",
    [dict(cache="dual"), dict(cache="prefix", refresh_every=3), dict(cache="dual", cfg_scale=1.5, temperature=1.0)],
)
def test_a_row_joining_a_cached_batch_changes_no_row(lm, options):
    """Each row refreshes its cache on its own rhythm (its block starts, its refresh_every), so a row that
    joins mid-block gets what it gets alone and the rows already there go on as they do alone."""
    config = SamplingConfig(block_length=4, stop_at_eos=False, seed=5, **options)
    early = SamplingConfig(**{**config.__dict__, "seed": 9})
    alone = {
        "late": generate(lm, [PROMPTS[2]], max_new_tokens=8, config=config).token_ids[0],
        "a": generate(lm, [PROMPTS[0]], max_new_tokens=12, config=early).token_ids[0],
        "b": generate(
            lm, [PROMPTS[1]], max_new_tokens=12, config=SamplingConfig(**{**early.__dict__, "seed": 10})
        ).token_ids[0],
    }
    denoiser = Denoiser(lm, config)
    denoiser.add(generation_canvas(lm, PROMPTS[:2], 12), early, keys=["a", "b"])
    together = {}
    for _ in range(2):  # the early rows are mid-block when the late one joins
        together.update((f.key, f.token_ids) for f in denoiser.step().finished if f)
    denoiser.add(generation_canvas(lm, [PROMPTS[2]], 8), config, keys=["late"])
    while len(denoiser):
        together.update((f.key, f.token_ids) for f in denoiser.step().finished if f)
    assert together == alone


def test_cache_needs_a_supported_architecture(lm, monkeypatch):
    monkeypatch.setattr(lm.hf_model.config, "model_type", "distilbert")
    with pytest.raises(UsageError, match="cache 'dual' needs"):
        Denoiser(lm, SamplingConfig(cache="dual"))


# -- the factor rule ----------------------------------------------------------------------------
def test_select_factor_equals_the_rule_row_by_row():
    generator = torch.Generator().manual_seed(0)
    conf = torch.rand(64, 12, generator=generator) ** 0.2
    conf[torch.rand(64, 12, generator=generator) < 0.3] = float("-inf")  # not candidates
    conf[0] = float("-inf")
    for factor in (0.5, 1.0, 2.0):
        chosen = select_factor(conf, factor)
        for row, c in zip(chosen, conf, strict=True):
            ranked = sorted((v for v in c.tolist() if v > float("-inf")), reverse=True)
            n = max([k for k in range(1, len(ranked) + 1) if (k + 1) * (1 - ranked[k - 1]) < factor], default=1)
            n = min(n, len(ranked))
            assert int(row.sum()) == n
            assert all(v >= ranked[n - 1] for v in c[row].tolist())


def test_the_factor_policy_reveals_the_n_sure_enough_tokens(lm, monkeypatch):
    """Confidences (softmax over 16k tokens) 0.964, 0.943, 0.154, 0.978 at the four masks: with f = 1 the
    three surest pass, (n + 1)(1 - c_n) = 0.04, 0.11, 0.23; the fourth is 5 * 0.85; with f = 0.1 only one."""
    start = len(lm.special_affixes[0]) + len(lm.tokenizer("Bugün", add_special_tokens=False)["input_ids"])
    table = [13.0, 12.5, 8.0, 13.5]

    def forward(input_ids, attention_mask=None, positions=None, **_):
        rows, columns = positions.nonzero(as_tuple=True)
        logits = torch.zeros(len(columns), lm.vocab_size)
        logits[torch.arange(len(columns)), 100 + columns - start] = torch.tensor(table)[columns - start]
        return logits

    monkeypatch.setattr(lm, "forward", forward)
    for factor, expected in ((1.0, [[0, 1, 3], [2]]), (0.1, [[3], [0], [1], [2]])):
        revealed = []
        generate(
            lm,
            ["Bugün"],
            max_new_tokens=4,
            policy="factor",
            factor=factor,
            stop_at_eos=False,
            callback=lambda s, seen=revealed: seen.append((s.revealed[0].nonzero().flatten() - start).tolist()),
        )
        assert revealed == expected
