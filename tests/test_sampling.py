import math

import pytest
import torch
from precisions import LOGITS_TOLERANCE, PRECISIONS, reference_batches
from reference_sampler import llada_generate, nucleus_filter
from rows_alone import compute_rows_alone

from diffutron.errors import UsageError
from diffutron.model import DiffusionLM
from diffutron.precision import DTYPES
from diffutron.sampling import Denoiser, SamplingConfig, generate, generation_canvas, infill, user_config
from diffutron.sampling.cache import EncoderCache, spans
from diffutron.sampling.policies import POLICIES, reveal_count, select_threshold, select_top
from diffutron.sampling.rng import TOKEN_DRAW, uniforms
from diffutron.sampling.sampler import draw, sample_tokens, top_p_filter
from diffutron.schedules import get_schedule

PROMPTS = ["Bugün hava", "Türkiye Büyük Millet Meclisi 1920 yılında", "Ey Türk gençliği! Birinci vazifen"]


@pytest.fixture(scope="module", params=PRECISIONS)
def lm(request):
    # A wider init than the preset's: a random model with varied predictions makes a sharper test. Every
    # test runs in both precisions: the sampler's code paths are the same, its logits bf16's.
    return DiffusionLM.from_preset("tiny", seed=0, initializer_range=0.2).to(DTYPES[request.param]).eval()


def ids_of(lm, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def script(lm, monkeypatch, start: int, table, unconditional=None):
    """Make `lm` a scripted model: at generated index j its logits are `table[j]` ({token: logit}, 0 elsewhere).
    With `unconditional`, rows whose prompt is masked (guidance's second branch) read that table instead."""

    def forward(input_ids, attention_mask=None, positions=None, **_):
        rows, columns = positions.nonzero(as_tuple=True)
        logits = torch.zeros(len(columns), lm.vocab_size)
        for n, (row, column) in enumerate(zip(rows.tolist(), columns.tolist(), strict=True)):
            prompt = input_ids[row, len(lm.special_affixes[0]) : start]
            masked_prompt = len(prompt) > 0 and bool((prompt == lm.mask_id).all())
            chosen = unconditional if unconditional is not None and masked_prompt else table
            for token, value in chosen[column - start].items():
                logits[n, token] = value
        return logits

    monkeypatch.setattr(lm, "forward", forward)


def prompt_start(lm, prompt: str) -> int:
    return len(lm.special_affixes[0]) + len(ids_of(lm, prompt))


def scripted_text(lm, monkeypatch, prompt: str, continuation: str) -> int:
    """Script `lm` to write exactly the tokens of `continuation`, surest first from the left."""
    tokens = ids_of(lm, continuation)
    start = prompt_start(lm, prompt)
    script(lm, monkeypatch, start, [{t: 20.0 - 0.1 * j} for j, t in enumerate(tokens)])
    return len(tokens)


# -- equal to LLaDA's loop --------------------------------------------------------------------------
@pytest.mark.parametrize("frame", ["open", "closed"])
@pytest.mark.parametrize("steps, block_length", [(16, 8), (8, 8), (16, 16), (4, 4)])
def test_greedy_confidence_equals_llada_reference(lm, steps, block_length, frame):
    """frame "open" is LLaDA's own canvas (prompt, then masks); "closed" is the encoder's [CLS] ... [SEP]."""
    options = dict(max_new_tokens=16, steps=steps, block_length=block_length, stop_at_eos=False, frame=frame)
    results = [generate(lm, batch, **options) for batch in reference_batches(lm, PROMPTS)]
    assert [ids for r in results for ids in r.token_ids] == [
        llada_generate(lm, p, 16, steps, block_length, frame) for p in PROMPTS
    ]
    assert all(r.forward_passes == steps for r in results)
    assert [why for r in results for why in r.finished_by] == ["length"] * 3


def test_the_frames_differ(lm):
    closed = generate(lm, PROMPTS, max_new_tokens=16, stop_at_eos=False, frame="closed").token_ids
    assert closed != generate(lm, PROMPTS, max_new_tokens=16, stop_at_eos=False, frame="open").token_ids


# -- every policy ------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_reveals_every_mask(lm, policy):
    result = generate(
        lm,
        PROMPTS,
        max_new_tokens=12,
        steps=6,
        block_length=4 if policy != "ancestral" else 12,
        policy=policy,
        temperature=0.8,
        stop_at_eos=False,
        history=True,
    )
    assert all(len(ids) == 12 and lm.mask_id not in ids for ids in result.token_ids)
    masks_left = [int((h == lm.mask_id).sum()) for h in result.history]  # each step a snapshot of its own
    assert masks_left == sorted(masks_left, reverse=True) and masks_left[-1] == 0 and masks_left[0] > 0


def test_threshold_reveals_exactly_the_sure_tokens_and_the_best(lm, monkeypatch):
    # confidences (softmax over a 16k vocabulary): logit 12 ~ 0.95, 10 ~ 0.73, 13 ~ 0.98, 8 ~ 0.27
    logits = (12.0, 10.0, 13.0, 8.0)
    start = prompt_start(lm, "Bugün")
    script(lm, monkeypatch, start, [{100 + j: c} for j, c in enumerate(logits)])
    revealed = []
    generate(
        lm,
        ["Bugün"],
        max_new_tokens=4,
        policy="threshold",
        threshold=0.9,
        stop_at_eos=False,
        callback=lambda s: revealed.append((s.revealed[0].nonzero().flatten() - start).tolist()),
    )
    others = len(lm.tokenizer) - 1 - (len(lm.special_ids) - 1)  # every other token at logit 0, specials banned
    assert [math.exp(c) / (math.exp(c) + others) >= 0.9 for c in logits] == [True, False, True, False]
    assert revealed == [[0, 2], [1], [3]]  # step 1: both >= tau; then only the best one each step


def test_select_threshold_unit():
    conf = torch.tensor([[0.95, 0.5, 0.92, float("-inf")], [0.2, 0.3, float("-inf"), 0.1]])
    assert select_threshold(conf, 0.9).tolist() == [[True, False, True, False], [False, True, False, False]]


def test_ancestral_reveals_with_the_schedule_probability(lm):
    """Each mask of a block is revealed at step i with probability (alpha_s - alpha_t) / (1 - alpha_t)."""
    steps, rows, new = 4, 200, 8
    canvas = generation_canvas(lm, ["Bugün"] * rows, new)
    config = SamplingConfig(policy="ancestral", temperature=1.0, steps=steps, seed=3, stop_at_eos=False)
    denoiser = Denoiser(lm, config)
    denoiser.add(canvas, config)
    schedule = get_schedule("linear")
    left = rows * new
    for i in range(steps):
        batch = denoiser.step()
        t, s = torch.tensor(1 - i / steps), torch.tensor(1 - (i + 1) / steps)
        expected = float((schedule.alpha(s) - schedule.alpha(t)) / (1 - schedule.alpha(t)))
        revealed = int(batch.revealed.sum())
        # binomial: within 4 standard deviations (the last step reveals everything left)
        assert abs(revealed - expected * left) <= 4 * math.sqrt(left * expected * (1 - expected)) + 1e-9
        left -= revealed
    assert left == 0 and len(denoiser) == 0


def test_ancestral_implies_mdlms_settings():
    config = user_config("generate", policy="ancestral")
    assert (config.temperature, config.repetition_penalty, config.top_p, config.top_k) == (1.0, 1.0, 1.0, 0)
    with pytest.raises(UsageError, match="ancestral policy is MDLM's sampler"):
        user_config("generate", policy="ancestral", temperature=0.7)


# -- randomness --------------------------------------------------------------------------------
def test_seeded_sampling_is_deterministic(lm):
    options = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, stop_at_eos=False)
    together = generate(lm, PROMPTS, seed=1, **options).token_ids
    assert together == generate(lm, PROMPTS, seed=1, **options).token_ids
    assert together != generate(lm, PROMPTS, seed=2, **options).token_ids


def test_a_row_draws_with_its_own_seed_whatever_its_company(lm, monkeypatch):
    """Row i draws with seed + i, whatever else is in the batch: with the encoder computing each row alone
    (tests/rows_alone.py: the encoder's rounding taken out), a row's tokens in company are its tokens alone."""
    compute_rows_alone(monkeypatch)
    options = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, stop_at_eos=False)
    together = generate(lm, PROMPTS, seed=1, **options).token_ids
    alone = [generate(lm, [p], seed=1 + i, **options).token_ids[0] for i, p in enumerate(PROMPTS)]
    assert together == alone


@torch.no_grad()
def test_a_row_in_company_moves_only_by_rounding(lm):
    """What a row's company does change: padded beside longer rows, the encoder sums in another order (and
    so does the cached forward), so a row's logits in company are its logits alone up to rounding only
    (a bf16 step is coarse: tests/precisions.py states the tolerance)."""
    together = generation_canvas(lm, PROMPTS, 8)
    alone = [generation_canvas(lm, [p], 8) for p in PROMPTS]

    def logits(c):
        return lm(c.ids, c.attention_mask, positions=c.fillable, packed_decoder=True)

    def cached(c):  # a refresh, then the masks recomputed against it
        cache = EncoderCache(lm)
        cache.refresh(c.ids, c.attention_mask)
        positions, valid = spans(c.gen_start, c.gen_start + 8)
        return cache.forward(c.ids, c.attention_mask, positions)[valid]

    for way in (logits, cached):
        torch.testing.assert_close(way(together), torch.cat([way(c) for c in alone]), **LOGITS_TOLERANCE[lm.dtype])


def test_uniforms_are_uniform_and_independent():
    seed = torch.arange(4).repeat_interleave(50_000)
    counter = torch.arange(50_000).repeat(4)
    u = uniforms(seed, counter, TOKEN_DRAW)
    assert u.min() >= 0 and u.max() < 1
    histogram = torch.histc(u.float(), bins=20, min=0, max=1) / u.numel()
    assert torch.allclose(histogram, torch.full((20,), 0.05), atol=0.003)
    streams = uniforms(seed, counter, TOKEN_DRAW + 1)
    assert abs(torch.corrcoef(torch.stack([u, streams]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.01  # neighbouring counters


def test_temperature_and_top_k_draws_follow_their_definitions():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    n = 100_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for temperature, top_k in [(1.0, 0), (0.5, 0), (2.0, 3)]:
        config = SamplingConfig(temperature=temperature, top_k=top_k)
        tokens = sample_tokens(logits.expand(n, 5), config, u)
        expected = (logits[0] / temperature).softmax(-1)
        if top_k:
            expected[expected.argsort(descending=True)[top_k:]] = 0
            expected /= expected.sum()
        frequencies = torch.bincount(tokens, minlength=5) / n
        assert torch.allclose(frequencies, expected, atol=0.006), (temperature, top_k)


def test_draw_follows_the_distribution():
    probs = torch.tensor([0.0, 0.1, 0.6, 0.0, 0.3])
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    tokens = draw(probs.expand(100_000, 5).contiguous(), u)
    frequencies = torch.bincount(tokens, minlength=5) / tokens.numel()
    assert frequencies[0] == 0 and frequencies[3] == 0  # never a zero-probability token
    assert torch.allclose(frequencies, probs, atol=0.01)


@pytest.mark.parametrize("first_k", [4, 64, 5000])  # 4: most rows take the full-sort path
def test_top_p_filter_equals_the_full_sort(first_k):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3000, generator=g) * torch.linspace(0.1, 8, 64)[:, None]  # flat to peaked rows
    for p in (0.3, 0.9, 0.99):
        assert torch.equal(top_p_filter(logits, p, first_k=first_k), nucleus_filter(logits, p))


def test_a_tiny_temperature_is_greedy(lm):
    greedy = generate(lm, PROMPTS, max_new_tokens=8, stop_at_eos=False).token_ids
    assert generate(lm, PROMPTS, max_new_tokens=8, stop_at_eos=False, temperature=1e-45).token_ids == greedy


# -- rows joining and leaving ------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_joining_between_steps_gets_what_it_gets_alone(lm, monkeypatch, temperature):
    compute_rows_alone(monkeypatch)  # the encoder's rounding taken out: what the sampler guarantees
    config = SamplingConfig(temperature=temperature, block_length=4, stop_at_eos=False, seed=5)
    alone = generate(lm, [PROMPTS[2]], max_new_tokens=8, config=config).token_ids[0]
    denoiser = Denoiser(lm, config)
    first = SamplingConfig(**{**config.__dict__, "seed": 9})
    denoiser.add(generation_canvas(lm, PROMPTS[:2], 12), first, keys=["a", "b"])
    results = {}
    for _ in range(3):
        results.update((f.key, f) for f in denoiser.step().finished if f)
    denoiser.add(generation_canvas(lm, [PROMPTS[2]], 8), config, keys=["late"])
    while len(denoiser):
        results.update((f.key, f) for f in denoiser.step().finished if f)
    assert results["late"].token_ids == alone
    early = generate(lm, PROMPTS[:2], max_new_tokens=12, config=first).token_ids
    assert [results["a"].token_ids, results["b"].token_ids] == early


def test_cancelled_rows_leave_without_results(lm):
    denoiser = Denoiser(lm, SamplingConfig(stop_at_eos=False))
    denoiser.add(generation_canvas(lm, PROMPTS, 8), SamplingConfig(stop_at_eos=False), keys=["a", "b", "c"])
    denoiser.step()
    denoiser.cancel(["b"])
    assert denoiser.keys == ["a", "c"]
    finished = []
    while len(denoiser):
        finished += [f.key for f in denoiser.step().finished if f]
    assert sorted(finished) == ["a", "c"]


def test_mixed_settings_are_refused_in_one_batch(lm):
    denoiser = Denoiser(lm, SamplingConfig())
    with pytest.raises(ValueError, match="different sampling settings"):
        denoiser.add(generation_canvas(lm, ["a"], 4), SamplingConfig(temperature=0.5))


# -- stop strings, EOS, penalty, guidance -------------------------------------------------------
@pytest.mark.parametrize(
    "stop, continuation",
    [
        ("Soru", "Ali dedi ki: Soru şu."),  # "Soru" alone is two tokens, " Soru" in the text one
        (".", 'O "Evet." dedi ve gitti'),  # "." lies inside the token `."`
        ("ki: So", "Ali dedi ki: Soru şu."),  # a stop string across three tokens
    ],
)
def test_stop_strings_match_the_text_not_their_tokens(lm, monkeypatch, stop, continuation):
    assert ids_of(lm, stop) != ids_of(lm, continuation)[: len(ids_of(lm, stop))] or stop == "."
    n = scripted_text(lm, monkeypatch, "Bugün", continuation)
    free = generate(lm, ["Bugün"], max_new_tokens=n, stop_at_eos=False)
    assert free.texts[0] == continuation
    result = generate(lm, ["Bugün"], max_new_tokens=n, stop=(stop,), stop_at_eos=False)
    assert result.finished_by == ["stop"]
    assert result.texts[0] == continuation[: continuation.index(stop)]  # the text ends before the stop
    assert lm.tokenizer.decode(result.token_ids[0]) == continuation[: len(lm.tokenizer.decode(result.token_ids[0]))]
    assert stop not in lm.tokenizer.decode(result.token_ids[0])


def test_a_stop_string_ends_only_its_row(lm):
    free = generate(lm, PROMPTS, max_new_tokens=16, stop_at_eos=False)
    text = free.texts[0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = generate(lm, PROMPTS, max_new_tokens=16, stop=(stop,), stop_at_eos=False)
    assert stopped.finished_by[0] == "stop" and stopped.texts[0] == text[: text.index(stop)]
    for row in (1, 2):
        if stop not in free.texts[row]:
            assert stopped.token_ids[row] == free.token_ids[row] and stopped.finished_by[row] == "length"


def _eos_against(lm, monkeypatch, eos_logit: float, rival_logit: float):
    """Two sure tokens, then EOS against a rival token that is nowhere in the canvas."""
    eos, rival = lm.tokenizer.sep_token_id, 777
    table = [{500: 9.0}, {501: 9.0}, {eos: eos_logit, rival: rival_logit}, {502: 9.0}]
    script(lm, monkeypatch, prompt_start(lm, "Bugün"), table)
    return eos


def test_repetition_penalty_does_not_penalise_the_end_token(lm, monkeypatch):
    """The [SEP] of the canvas frame is not a generated token: EOS keeps its logit, so it still wins."""
    _eos_against(lm, monkeypatch, eos_logit=1.0, rival_logit=0.9)
    result = generate(lm, ["Bugün"], max_new_tokens=4, repetition_penalty=1.2)
    assert result.finished_by == ["eos"] and result.token_ids == [[500, 501]]


def test_repetition_penalty_hits_prompt_and_generated_tokens(lm, monkeypatch):
    prompt_token = ids_of(lm, "Bugün")[0]
    table = [{900: 5.0}, {prompt_token: 2.0, 901: 1.8}, {900: 2.0, 902: 1.8}]
    script(lm, monkeypatch, prompt_start(lm, "Bugün"), table)
    plain = generate(lm, ["Bugün"], max_new_tokens=3, stop_at_eos=False).token_ids[0]
    penalised = generate(lm, ["Bugün"], max_new_tokens=3, stop_at_eos=False, repetition_penalty=1.2).token_ids[0]
    assert plain == [900, prompt_token, 900] and penalised == [900, 901, 902]


def test_eos_options(lm, monkeypatch):
    eos = _eos_against(lm, monkeypatch, eos_logit=5.0, rival_logit=0.9)
    stopped = generate(lm, ["Bugün"], max_new_tokens=4)
    ignored = generate(lm, ["Bugün"], max_new_tokens=4, stop_at_eos=False)
    banned = generate(lm, ["Bugün"], max_new_tokens=4, ban_eos=True)
    assert stopped.finished_by == ["eos"] and stopped.token_ids == [[500, 501]]
    assert ignored.finished_by == ["length"] and ignored.token_ids == [[500, 501, eos, 502]]  # EOS kept, not stopped
    assert banned.finished_by == ["length"] and banned.token_ids == [[500, 501, 777, 502]]


def test_guidance_is_uncond_plus_w_plus_one_times_the_difference(lm, monkeypatch):
    """cond prefers B (1.2 vs 1.0); uncond (prompt masked) prefers B more (2 vs 0): with w = 1,
    A = 0 + 2 (1.0 - 0) = 2 beats B = 2 + 2 (1.2 - 2) = 0.4."""
    a, b = 600, 601
    script(lm, monkeypatch, prompt_start(lm, "Bugün hava"), [{a: 1.0, b: 1.2}], unconditional=[{a: 0.0, b: 2.0}])
    assert generate(lm, ["Bugün hava"], max_new_tokens=1, stop_at_eos=False).token_ids == [[b]]
    guided = generate(lm, ["Bugün hava"], max_new_tokens=1, stop_at_eos=False, cfg_scale=1.0)
    assert guided.token_ids == [[a]] and guided.forward_passes == 2


# -- infill, limits, settings ------------------------------------------------------------------
def test_infill_keeps_given_tokens_and_fills_spans(lm):
    texts = ["Ankara <mask*3> başkentidir.", "Bir <mask> iki <mask> üç <mask*2> dört"]
    result = infill(lm, texts, policy="margin")
    for text, ids in zip(texts, result.token_ids, strict=True):
        given = lm.tokenizer(
            text.replace("<mask*3>", "[MASK][MASK][MASK]")
            .replace("<mask*2>", "[MASK][MASK]")
            .replace("<mask>", "[MASK]")
        )["input_ids"]
        assert len(ids) == len(given) and lm.mask_id not in ids
        assert all(g == o for g, o in zip(given, ids, strict=True) if g != lm.mask_id)
    assert result.steps == 4 and result.new_tokens == 7 and result.row_passes == [3, 4]


def test_streaming_callback_sees_every_step(lm):
    seen = []
    result = generate(
        lm,
        PROMPTS[:2],
        max_new_tokens=8,
        steps=4,
        stop_at_eos=False,
        callback=lambda s: seen.append((s.step, int((s.ids == lm.mask_id).sum()), int(s.revealed.sum()))),
    )
    assert [s[0] for s in seen] == [1, 2, 3, 4] == list(range(1, result.steps + 1))
    assert [s[1] for s in seen] == [12, 8, 4, 0] and all(s[2] == 4 for s in seen)


def test_context_limit_and_truncation(lm):
    long_prompt = "kelime " * 600
    with pytest.raises(UsageError, match=r"exceed the model's context of 512"):
        generate(lm, [long_prompt], max_new_tokens=16)
    result = generate(lm, [long_prompt], max_new_tokens=16, truncate_prompt=True, steps=2, stop_at_eos=False)
    assert len(result.token_ids[0]) == 16
    with pytest.raises(UsageError, match="max_new_tokens 600"):
        generate(lm, ["a"], max_new_tokens=600)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(steps=0), "steps"),
        (dict(block_length=5), "block_length 5 must divide"),
        (dict(steps=3, block_length=8), "multiple of the number of blocks"),
        (dict(temperature=-1), "temperature"),
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(temperature=float("inf")), "temperature must be a finite number"),
        (dict(repetition_penalty=float("nan")), "repetition-penalty must be a finite number"),
        (dict(cfg_scale=float("nan")), "cfg-scale must be a finite number"),
        (dict(threshold=float("inf")), "threshold must be a finite number"),
        (dict(top_p=0.0), "top-p"),
        (dict(top_p=1.5), "top-p"),
        (dict(seed=2**63), "seed must be in"),
        (dict(seed=-1), "seed must be in"),
        (dict(policy="magic"), "unknown policy"),
        (dict(frame="square"), "unknown frame"),
    ],
)
def test_bad_settings_are_refused(lm, options, message):
    with pytest.raises(UsageError, match=message):
        generate(lm, ["Bugün"], max_new_tokens=16, **options)


def test_infill_needs_a_mask(lm):
    with pytest.raises(UsageError, match="no <mask>"):
        infill(lm, ["maskesiz"])


def test_reveal_counts_add_up_to_the_masks():
    n = torch.tensor([16, 7, 0, 33])
    for name in ("linear", "cosine"):
        counts = torch.stack(
            [reveal_count(n, torch.full_like(n, i), torch.full_like(n, 5), get_schedule(name)) for i in range(5)], dim=1
        )
        assert counts.sum(dim=1).tolist() == n.tolist() and (counts >= 0).all()
        if name == "linear":
            assert counts[1].tolist() == [2, 2, 1, 1, 1]  # LLaDA's split


def test_select_top_equals_per_row_topk():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 20, generator=g)
    scores[scores < 0.3] = float("-inf")
    counts = torch.tensor([0, 1, 3, 5, 2, 4])
    chosen = select_top(scores, counts)
    for row in range(6):
        expected = set(torch.topk(scores[row], int(counts[row])).indices.tolist())
        assert set(chosen[row].nonzero().flatten().tolist()) == expected


def imported_modules(path) -> set[str]:
    """Every `diffutron` module a source file imports, at the top or inside a function."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("diffutron")}


@pytest.mark.parametrize(
    "package, forbidden",
    [
        # The sampler reads mask syntax from its own home, not from the fill-mask feature beside it.
        ("sampling", ("diffutron.fill_mask", "diffutron.data", "diffutron.train", "diffutron.serve", "diffutron.cli")),
        # The server renders chat with the chat module, never through the training data pipeline.
        ("serve", ("diffutron.data", "diffutron.train", "diffutron.cli")),
    ],
)
def test_imports_point_one_way(package, forbidden):
    from pathlib import Path

    import diffutron

    for path in sorted((Path(diffutron.__file__).parent / package).glob("*.py")):
        wrong = {name for name in imported_modules(path) if name.startswith(forbidden)}
        assert not wrong, f"{package}/{path.name} imports {sorted(wrong)}"
