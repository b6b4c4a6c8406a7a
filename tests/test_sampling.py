import pytest
import torch
from reference_sampler import llada_generate, nucleus_filter

from diffutron.errors import UsageError
from diffutron.model import DiffusionLM
from diffutron.sampling import SamplingConfig, generate, infill
from diffutron.sampling.policies import POLICIES, reveal_counts, select_top
from diffutron.schedules import get_schedule

PROMPTS = ["Bugün hava", "Türkiye Büyük Millet Meclisi 1920 yılında", "Ey Türk gençliği! Birinci vazifen"]


@pytest.fixture(scope="module")
def lm():
    # A wider init than the preset's: a random model with varied predictions makes a sharper test.
    return DiffusionLM.from_preset("tiny", seed=0, initializer_range=0.2).eval()


@pytest.mark.parametrize("steps, block_length", [(16, 8), (8, 8), (16, 16), (4, 4)])
def test_greedy_confidence_equals_llada_reference(lm, steps, block_length):
    result = generate(lm, PROMPTS, max_new_tokens=16, steps=steps, block_length=block_length, stop_at_eos=False)
    assert result.token_ids == [llada_generate(lm, p, 16, steps, block_length) for p in PROMPTS]
    assert result.forward_passes == steps and result.finished_by == ["length"] * 3


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
    assert all(len(ids) == 12 for ids in result.token_ids)
    assert all(lm.mask_id not in ids for ids in result.token_ids)
    limit = 12 if policy == "threshold" else 6
    assert result.steps <= limit and len(result.history) == result.steps
    masks_left = [int((h == lm.mask_id).sum()) for h in result.history]  # each step a snapshot of its own
    assert masks_left == sorted(masks_left, reverse=True) and masks_left[-1] == 0 and masks_left[0] > 0


def test_seeded_sampling_is_deterministic(lm):
    options = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, stop_at_eos=False)
    a = generate(lm, PROMPTS, seed=1, **options).token_ids
    assert a == generate(lm, PROMPTS, seed=1, **options).token_ids
    assert a != generate(lm, PROMPTS, seed=2, **options).token_ids


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
    assert result.steps == 4 and result.new_tokens == 7


def _stop_string(lm, ids):
    """A two-token stretch of `ids` (not at the start) that re-encodes to the same ids."""
    for k in range(2, len(ids) - 2):
        text = lm.tokenizer.decode(ids[k : k + 2])
        if lm.tokenizer(text, add_special_tokens=False)["input_ids"] == ids[k : k + 2]:
            return k, text
    pytest.skip("no re-encodable stretch")


def test_stop_sequences_end_a_row_and_it_leaves_the_batch(lm):
    free = generate(lm, PROMPTS, max_new_tokens=16, stop_at_eos=False)
    k, stop = _stop_string(lm, free.token_ids[0])
    stopped = generate(lm, PROMPTS, max_new_tokens=16, stop=(stop,), stop_at_eos=False)
    assert stopped.finished_by[0] == "stop"
    assert stopped.token_ids[0] == free.token_ids[0][: stopped.token_ids[0].__len__()]
    assert len(stopped.token_ids[0]) <= k and stop not in stopped.texts[0]
    for row in (1, 2):  # the other rows are unaffected by row 0 leaving
        if stopped.finished_by[row] == "length":
            assert stopped.token_ids[row] == free.token_ids[row]


def test_eos_ends_the_text(lm, monkeypatch):
    eos = lm.tokenizer.sep_token_id
    head = lm.head

    def eos_late(hidden):  # EOS becomes likely everywhere, so some row settles on it
        logits = head(hidden)
        logits[:, eos] += 8.0
        return logits

    monkeypatch.setattr(lm, "head", eos_late)
    result = generate(lm, PROMPTS, max_new_tokens=16)
    assert "eos" in result.finished_by
    for ids, why in zip(result.token_ids, result.finished_by, strict=True):
        assert eos not in ids and (why != "eos" or len(ids) < 16)


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


def test_guidance_and_repetition_penalty(lm):
    plain = generate(lm, PROMPTS[:1], max_new_tokens=8, stop_at_eos=False)
    guided = generate(lm, PROMPTS[:1], max_new_tokens=8, cfg_scale=2.0, stop_at_eos=False)
    assert guided.forward_passes == 2 * plain.forward_passes
    assert SamplingConfig().repetition_penalty == 1.0  # off unless asked for
    penalised = generate(lm, PROMPTS[:1], max_new_tokens=8, repetition_penalty=5.0, stop_at_eos=False)
    assert len(set(penalised.token_ids[0])) >= len(set(plain.token_ids[0]))


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
        (dict(top_p=0.0), "top-p"),
        (dict(top_p=1.5), "top-p"),
        (dict(policy="magic"), "unknown policy"),
    ],
)
def test_bad_settings_are_refused(lm, options, message):
    with pytest.raises(UsageError, match=message):
        generate(lm, ["Bugün"], max_new_tokens=16, **options)


def test_infill_needs_a_mask(lm):
    with pytest.raises(UsageError, match="no <mask>"):
        infill(lm, ["maskesiz"])


def test_reveal_counts_sum_to_the_masks():
    n = torch.tensor([16, 7, 0, 33])
    linear = reveal_counts(n, 5, get_schedule("linear"))
    assert linear.sum(dim=1).tolist() == n.tolist() and linear[1].tolist() == [2, 2, 1, 1, 1]
    cosine = reveal_counts(n, 5, get_schedule("cosine"))
    assert cosine.sum(dim=1).tolist() == n.tolist() and (cosine >= 0).all()


def test_select_top_equals_per_row_topk():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 20, generator=g)
    scores[scores < 0.3] = float("-inf")
    counts = torch.tensor([0, 1, 3, 5, 2, 4])
    chosen = select_top(scores, counts)
    for row in range(6):
        expected = set(torch.topk(scores[row], int(counts[row])).indices.tolist())
        assert set(chosen[row].nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize("first_k", [4, 64, 5000])  # 4: most rows take the full-sort path
def test_top_p_filter_equals_the_full_sort(first_k):
    from diffutron.sampling.sampler import top_p_filter

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3000, generator=g) * torch.linspace(0.1, 8, 64)[:, None]  # flat to peaked rows
    for p in (0.3, 0.9, 0.99):
        assert torch.equal(top_p_filter(logits, p, first_k=first_k), nucleus_filter(logits, p))


def test_draw_follows_the_distribution():
    from diffutron.sampling.sampler import draw

    probs = torch.tensor([0.0, 0.1, 0.6, 0.0, 0.3])
    tokens = draw(probs.expand(100_000, 5).contiguous(), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(tokens, minlength=5) / tokens.numel()
    assert frequencies[0] == 0 and frequencies[3] == 0  # never a zero-probability token
    assert torch.allclose(frequencies, probs, atol=0.01)
