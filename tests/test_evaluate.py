import math

import pytest
import torch

from diffutron.data import read_documents
from diffutron.errors import UsageError
from diffutron.evaluate import (
    _batched_ce,
    _generator,
    _mask_window,
    evaluate,
    evaluate_windows,
    iter_windows,
    make_windows,
)
from diffutron.model import DiffusionLM

TEXTS = [d.text[:1500] for d in read_documents("bundled:heldout")][:12]


def test_windows_fit_the_context_and_keep_every_token(model_folders):
    lm = DiffusionLM.from_pretrained(model_folders["roberta"], device="cpu")  # context 129
    long_text = " ".join(TEXTS)
    windows = make_windows(lm, [long_text])
    assert len(windows) > 3 and all(len(w) <= lm.context_length for w in windows)
    assert all(w[0] == lm.tokenizer.cls_token_id and w[-1] == lm.tokenizer.sep_token_id for w in windows)
    content = [t for w in windows for t in w[1:-1]]
    assert content == lm.tokenizer(long_text, add_special_tokens=False)["input_ids"]
    result = evaluate(lm, [long_text], samples=1, elbo_samples=1)  # windows at full context run
    assert math.isfinite(result.ppl)


class _SpyTokenizer:
    """The real tokenizer, recording the longest text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, texts, **kwargs):
        self.longest = max([self.longest, *map(len, texts)])
        return self.tokenizer(texts, **kwargs)


def test_a_long_document_is_tokenized_in_pieces_with_the_same_tokens(tiny_lm, monkeypatch):
    text = "  ".join(TEXTS) + " tek\tsekme  iki  boşluk\n\nyeni paragraf " + "uzunkelimeolmadan" * 40
    whole = make_windows(tiny_lm, [text, "kısa belge", text])
    spy = _SpyTokenizer(tiny_lm.tokenizer)
    monkeypatch.setattr(tiny_lm, "tokenizer", spy)
    pieces = list(iter_windows(tiny_lm, [text, "kısa belge", text], chunk_chars=300))
    assert 0 < spy.longest <= 300 < len(text)
    assert pieces == whole


def test_windows_are_streamed_not_collected(tiny_lm):
    """The first batch is evaluated after reading a few documents, not the whole input."""
    read = []

    def documents():
        for i in range(10_000):
            read.append(i)
            yield TEXTS[i % len(TEXTS)]

    class Stop(Exception):
        pass

    def first_batch_done(done, total):
        raise Stop

    with pytest.raises(Stop):
        evaluate(tiny_lm, documents(), batch_size=2, elbo_samples=0, progress=first_batch_done)
    assert len(read) < 1000


def test_deterministic_and_independent_of_batch_size(tiny_lm):
    texts = [t[:500] for t in TEXTS[:6]]
    a = evaluate(tiny_lm, texts, samples=2, seed=7, batch_size=8, elbo_samples=2)
    b = evaluate(tiny_lm, texts, samples=2, seed=7, batch_size=4, elbo_samples=2)
    c = evaluate(tiny_lm, texts, samples=2, seed=7, batch_size=8, elbo_samples=2)
    assert a.masked_tokens == b.masked_tokens == c.masked_tokens
    assert a.ppl == c.ppl and a.elbo_ppl == c.elbo_ppl
    assert b.ppl == pytest.approx(a.ppl, rel=1e-6) and b.elbo_ppl == pytest.approx(a.elbo_ppl, rel=1e-6)
    assert (a.top1, a.top5) == (b.top1, b.top5)
    d = evaluate(tiny_lm, texts, samples=2, seed=8, elbo_samples=2)
    assert d.masked_tokens != a.masked_tokens or d.ppl != a.ppl


def test_the_elbo_masks_do_not_depend_on_the_number_of_passes(tiny_lm):
    texts = [t[:500] for t in TEXTS[:3]]
    one = evaluate(tiny_lm, texts, samples=1, seed=3, elbo_samples=2)
    three = evaluate(tiny_lm, texts, samples=3, seed=3, elbo_samples=2)
    assert one.elbo_ppl == pytest.approx(three.elbo_ppl, rel=1e-9)
    assert one.pass_ppl[0] == pytest.approx(three.pass_ppl[0], rel=1e-9)


def test_sparse_and_dense_paths_agree(tiny_lm):
    texts = [t[:500] for t in TEXTS[:6]]
    fast = evaluate(tiny_lm, texts, seed=1, elbo_samples=2)
    dense = evaluate(tiny_lm, texts, seed=1, elbo_samples=2, sparse_head=False)
    assert fast.ppl == pytest.approx(dense.ppl, rel=1e-5)
    assert fast.elbo_ppl == pytest.approx(dense.elbo_ppl, rel=1e-5)


def _masked_ce(lm, window, ratio, seed, sample):
    ids = torch.tensor(window)
    noisy, masked = _mask_window(lm, ids, ratio, _generator(seed, sample, 0), False)
    with torch.no_grad():
        logp = torch.log_softmax(lm.full_logits(noisy[None])[0], -1)
    return -logp[masked.nonzero().flatten(), ids[masked]], logp[masked], ids[masked]


def test_ppl_is_exp_of_the_pooled_mean_ce_over_masked_tokens(tiny_lm):
    """One window checked by hand, against the model's own dense forward: passes are pooled token by
    token, not averaged as PPLs."""
    text = TEXTS[0][:300]
    result = evaluate(tiny_lm, [text], seed=3, mask_ratio=0.3, samples=2, elbo_samples=0)
    (window,) = make_windows(tiny_lm, [text])
    (ce0, logp0, target0), (ce1, _, _) = (_masked_ce(tiny_lm, window, 0.3, 3, k) for k in (0, 1))
    assert result.masked_tokens == len(ce0) + len(ce1)
    assert result.ppl == pytest.approx(math.exp(torch.cat([ce0, ce1]).mean().item()), rel=1e-5)
    assert result.pass_ppl == pytest.approx([math.exp(ce0.mean().item()), math.exp(ce1.mean().item())], rel=1e-5)
    assert result.ppl != pytest.approx(sum(result.pass_ppl) / 2, rel=1e-6)  # the two definitions differ here
    single = evaluate(tiny_lm, [text], seed=3, mask_ratio=0.3, elbo_samples=0)
    assert single.top1 == pytest.approx((logp0.argmax(-1) == target0).float().mean().item())
    assert single.elbo_ppl is None and single.ppl_stderr is None


class _ContextFree:
    """A model whose logits ignore the input: one fixed bias vector at every position."""

    def __init__(self, lm):
        self.lm, self.bias = lm, torch.randn(lm.vocab_size, generator=torch.Generator().manual_seed(0))

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def __call__(self, ids, attention=None, positions=None, targets=None):
        logits = self.bias.expand(int(positions.sum()), -1).contiguous()
        return logits if targets is None else torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def test_the_elbo_of_a_context_free_model_is_exp_of_its_mean_ce(tiny_lm):
    """With logits that ignore the input, the NELBO's expectation is the mean CE over all tokens
    exactly (E[mask(t) w(t)] = 1 for every t): the estimate is within its standard error of it."""
    model = _ContextFree(tiny_lm)
    windows = make_windows(tiny_lm, TEXTS)
    result = evaluate_windows(model, windows, elbo_samples=16, seed=0)
    targets = torch.cat([torch.tensor(w)[tiny_lm.maskable(torch.tensor(w))] for w in windows])
    exact = math.exp(-torch.log_softmax(model.bias, -1)[targets].double().mean().item())
    relative_stderr = result.elbo_ppl_stderr / result.elbo_ppl
    assert 0 < relative_stderr < 0.02  # the default 16 strata: small against the value
    assert abs(math.log(result.elbo_ppl / exact)) < 3 * relative_stderr
    # and at a fixed ratio, PPL of a context-free model is the same figure, up to the mask draw
    assert result.ppl == pytest.approx(exact, rel=0.05)


def test_the_elbo_standard_error_is_honest(tiny_lm):
    """Over independent seeds the estimates scatter about as much as their standard errors say."""
    model = _ContextFree(tiny_lm)
    windows = make_windows(tiny_lm, TEXTS[:4])
    results = [evaluate_windows(model, windows, elbo_samples=8, seed=s, batch_size=4) for s in range(12)]
    logs = torch.tensor([math.log(r.elbo_ppl) for r in results], dtype=torch.float64)
    claimed = sum(r.elbo_ppl_stderr / r.elbo_ppl for r in results) / len(results)
    assert 0.5 < logs.std().item() / claimed < 2.0


def test_mask_ratio_samples_and_stderr(tiny_lm):
    result = evaluate(tiny_lm, TEXTS[:6], samples=3, mask_ratio=0.15, elbo_samples=0)
    assert result.masked_tokens / (3 * result.tokens) == pytest.approx(0.15, abs=0.02)
    assert result.ppl_stderr > 0 and result.samples == 3 and len(result.pass_ppl) == 3
    assert 0 <= result.top1 <= result.top5 <= 1


def test_bert_corruption_changes_the_input_not_the_targets(tiny_lm):
    ids = torch.tensor(make_windows(tiny_lm, [TEXTS[0]])[0])
    plain, masked = _mask_window(tiny_lm, ids, 0.5, _generator(0, 0, 0), False)
    bert, masked_b = _mask_window(tiny_lm, ids, 0.5, _generator(0, 0, 0), True)
    assert torch.equal(masked, masked_b)
    share_mask = (bert[masked] == tiny_lm.mask_id).float().mean()
    assert 0.65 < share_mask < 0.95
    assert torch.equal(bert[~masked], ids[~masked])


def test_batched_ce_ranks(tiny_lm):
    ids = torch.tensor(make_windows(tiny_lm, [TEXTS[1]])[0])
    noisy, masked = _mask_window(tiny_lm, ids, 0.3, _generator(0, 0, 0), False)
    ce, rank = _batched_ce(tiny_lm, [noisy], [masked], [ids], sparse_head=True)
    assert (
        ce.shape == rank.shape == (int(masked.sum()),)
        and _batched_ce(tiny_lm, [noisy], [masked], [ids], True, ranks=False)[1] is None
    )


def test_bad_arguments(tiny_lm):
    for ratio in (0.0, 1.0, -0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="mask ratio"):
            evaluate(tiny_lm, TEXTS, mask_ratio=ratio)
    with pytest.raises(UsageError):
        evaluate(tiny_lm, TEXTS, samples=0)
    with pytest.raises(UsageError, match="elbo_samples"):
        evaluate(tiny_lm, TEXTS, elbo_samples=-1)
