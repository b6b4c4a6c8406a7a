import math

import pytest
import torch

from diffutron.data import read_documents
from diffutron.errors import UsageError
from diffutron.evaluate import _generator, _mask_window, evaluate, make_windows
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


def test_deterministic_and_independent_of_batch_size(tiny_lm):
    a = evaluate(tiny_lm, TEXTS, samples=2, seed=7, batch_size=8)
    b = evaluate(tiny_lm, TEXTS, samples=2, seed=7, batch_size=3)
    c = evaluate(tiny_lm, TEXTS, samples=2, seed=7, batch_size=8)
    assert a.masked_tokens == b.masked_tokens == c.masked_tokens
    assert a.ppl == c.ppl and a.elbo_ppl == c.elbo_ppl
    assert b.ppl == pytest.approx(a.ppl, rel=1e-6) and b.elbo_ppl == pytest.approx(a.elbo_ppl, rel=1e-6)
    assert (a.top1, a.top5) == (b.top1, b.top5)
    d = evaluate(tiny_lm, TEXTS, samples=2, seed=8)
    assert d.masked_tokens != a.masked_tokens or d.ppl != a.ppl


def test_sparse_and_dense_paths_agree(tiny_lm):
    fast = evaluate(tiny_lm, TEXTS, seed=1, elbo_samples=2)
    dense = evaluate(tiny_lm, TEXTS, seed=1, elbo_samples=2, sparse_head=False)
    assert fast.ppl == pytest.approx(dense.ppl, rel=1e-5)
    assert fast.elbo_ppl == pytest.approx(dense.elbo_ppl, rel=1e-5)


def test_ppl_is_exp_of_mean_ce_over_masked_tokens(tiny_lm):
    """One window checked by hand, against the model's own dense forward."""
    text = TEXTS[0][:300]
    result = evaluate(tiny_lm, [text], seed=3, mask_ratio=0.3, elbo_samples=0)
    (window,) = make_windows(tiny_lm, [text])
    ids = torch.tensor(window)
    noisy, masked = _mask_window(tiny_lm, ids, 0.3, _generator(3, 0, 0), False)
    with torch.no_grad():
        logp = torch.log_softmax(tiny_lm.full_logits(noisy[None])[0], -1)
    ce = -logp[masked.nonzero().flatten(), ids[masked]]
    assert result.masked_tokens == int(masked.sum())
    assert result.ppl == pytest.approx(math.exp(ce.mean().item()), rel=1e-5)
    assert result.top1 == pytest.approx((logp[masked].argmax(-1) == ids[masked]).float().mean().item())
    assert result.elbo_ppl is None


def test_mask_ratio_samples_and_stderr(tiny_lm):
    result = evaluate(tiny_lm, TEXTS, samples=3, mask_ratio=0.15, elbo_samples=0)
    assert result.masked_tokens / (3 * result.tokens) == pytest.approx(0.15, abs=0.02)
    assert result.ppl_stderr > 0 and result.samples == 3
    assert 0 <= result.top1 <= result.top5 <= 1


def test_bert_corruption_changes_the_input_not_the_targets(tiny_lm):
    ids = torch.tensor(make_windows(tiny_lm, [TEXTS[0]])[0])
    plain, masked = _mask_window(tiny_lm, ids, 0.5, _generator(0, 0, 0), False)
    bert, masked_b = _mask_window(tiny_lm, ids, 0.5, _generator(0, 0, 0), True)
    assert torch.equal(masked, masked_b)
    share_mask = (bert[masked] == tiny_lm.mask_id).float().mean()
    assert 0.65 < share_mask < 0.95
    assert torch.equal(bert[~masked], ids[~masked])


def test_bad_arguments(tiny_lm):
    for ratio in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(UsageError, match="mask ratio"):
            evaluate(tiny_lm, TEXTS, mask_ratio=ratio)
    with pytest.raises(UsageError):
        evaluate(tiny_lm, TEXTS, samples=0)
