"""The cached encoder forward (sampling/cache.py) against the model's own layers, and cached decoding in the
sampler against a reference sampler on those layers (tests/reference_cache.py): exact where it must be, the
keys/values of the last full forward elsewhere, the refresh schedule it promises, rows joining and leaving.
Tokens are compared exactly where the reference found no decision near a tie: there the arithmetic's
rounding (another order of sums than the reference's, or than alone) cannot change them."""

import pytest
import torch
from precisions import PRECISIONS, TOLERANCE, fp32_only
from reference_cache import cached_generate, frozen_forward, layer_inputs

from diffutron.errors import UsageError
from diffutron.model import DiffusionLM
from diffutron.precision import DTYPES
from diffutron.sampling import Denoiser, SamplingConfig, generate, generation_canvas, infill
from diffutron.sampling.cache import EncoderCache, spans
from diffutron.sampling.policies import select_factor

PROMPTS = ["Bugün hava", "Türkiye Büyük Millet Meclisi 1920 yılında", "Ey Türk gençliği! Birinci vazifen"]
# 110 tokens: with 32 new ones the canvas is longer than the +-64 reach of the tiny preset's local layers
LONG_PROMPT = ("Türkiye Büyük Millet Meclisi 1920 yılında Ankara'da toplandı. " * 10).strip()


@pytest.fixture(scope="module", params=PRECISIONS)
def lm(request):
    # A wider init than the preset's: a random model with varied predictions makes a sharper test. Every
    # test runs in both precisions: the sampler's code paths are the same, its logits bf16's.
    return DiffusionLM.from_preset("tiny", seed=0, initializer_range=0.2).to(DTYPES[request.param]).eval()


@pytest.fixture(
    scope="module", params=[(arch, dtype) for arch in ("modernbert", "bert", "roberta") for dtype in PRECISIONS]
)
def arch_lm(request, model_folders):
    """Tiny random models of each architecture (ModernBERT's local layers see +-8 tokens), in each precision."""
    arch, dtype = request.param
    return DiffusionLM.from_pretrained(model_folders[arch], device="cpu", dtype=dtype)


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
    torch.testing.assert_close(
        frozen_forward(arch_lm, layer_inputs(arch_lm, ids, attention), ids, attention, positions), exact
    )


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
    expected = frozen_forward(lm, layer_inputs(lm, before, attention), after, attention, positions)
    torch.testing.assert_close(hidden[valid], expected[valid], **TOLERANCE[lm.dtype])
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
    torch.testing.assert_close(hidden[attention.bool()], exact[attention.bool()], **TOLERANCE[arch_lm.dtype])


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


@pytest.mark.parametrize(
    "options",
    [dict(cache="dual"), dict(cache="prefix", cfg_scale=1.5, frame="closed")],  # refresh_every: the joining test
)
def test_cached_steps_equal_the_frozen_reference(lm, options):
    """Blocks of 8, two tokens a step: each block's first step is a full forward, its three others are cached
    steps, and they give the tokens of the reference whose other positions keep the keys/values of the
    row's last full forward. Rows of 2, 110 and 7 prompt tokens share the batch; the long
    one's canvas (143 tokens) is longer than the local layers' reach, so its late blocks see only part."""
    fp32_only(lm)
    prompts = [PROMPTS[0], LONG_PROMPT, PROMPTS[2]]
    window = lm.hf_model.config.local_attention // 2
    start_of_last_block = 1 + len(lm.tokenizer(LONG_PROMPT, add_special_tokens=False)["input_ids"]) + 24
    assert start_of_last_block > window  # the columns before it are out of the local layers' reach
    run = dict(max_new_tokens=32, steps=16, block_length=8, stop_at_eos=False)
    result = generate(lm, prompts, **run, **options)
    assert result.token_ids == [cached_generate(lm, p, 32, 16, 8, **options) for p in prompts]
    exact = generate(lm, prompts, **run, cfg_scale=options.get("cfg_scale", 0.0), frame=options.get("frame", "open"))
    assert all(a != b for a, b in zip(result.token_ids, exact.token_ids, strict=True))  # the cached steps ran


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_rows_leave_the_batch_with_their_cache(lm, cfg_scale):
    """A short row with a long prompt (the batch narrows when it leaves) and a long one, blocks of 4: after
    the short row is done, the long one goes on with its own cache rows and gets the reference's tokens."""
    fp32_only(lm)
    config = SamplingConfig(cache="dual", cfg_scale=cfg_scale, block_length=4, stop_at_eos=False)
    denoiser = Denoiser(lm, config)
    denoiser.add(generation_canvas(lm, [LONG_PROMPT], 4), config, keys=["short"])
    denoiser.add(generation_canvas(lm, [PROMPTS[0]], 12), config, keys=["long"])
    together, widths = {}, []
    while len(denoiser):
        together.update((f.key, f.token_ids) for f in denoiser.step().finished if f)
        widths.append(denoiser.rows["ids"].shape[1] if len(denoiser) else 0)
    assert together == {
        "short": cached_generate(lm, LONG_PROMPT, 4, 4, 4, "dual", cfg_scale=cfg_scale),
        "long": cached_generate(lm, PROMPTS[0], 12, 12, 4, "dual", cfg_scale=cfg_scale),
    }
    assert widths[3] < widths[2]  # the short row left after its 4th step, and its columns went with it


@pytest.mark.parametrize(
    "options", [dict(cache="dual"), dict(cache="prefix", refresh_every=3), dict(cache="dual", cfg_scale=1.5)]
)
def test_a_row_joining_a_cached_batch_changes_no_row(lm, options):
    """Each row refreshes its cache on its own rhythm (its block starts, its refresh_every), so a row that
    joins mid-block (and widens the batch: its prompt is long) and the rows already there each get the
    reference's tokens."""
    fp32_only(lm)
    config = SamplingConfig(block_length=4, stop_at_eos=False, **options)
    denoiser = Denoiser(lm, config)
    denoiser.add(generation_canvas(lm, PROMPTS[:2], 12), config, keys=["a", "b"])
    together = {}
    for _ in range(2):  # the early rows are mid-block when the late one joins
        together.update((f.key, f.token_ids) for f in denoiser.step().finished if f)
    denoiser.add(generation_canvas(lm, [LONG_PROMPT], 8), config, keys=["late"])
    while len(denoiser):
        together.update((f.key, f.token_ids) for f in denoiser.step().finished if f)
    assert together == {
        "a": cached_generate(lm, PROMPTS[0], 12, 12, 4, **options),
        "b": cached_generate(lm, PROMPTS[1], 12, 12, 4, **options),
        "late": cached_generate(lm, LONG_PROMPT, 8, 8, 4, **options),
    }


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
