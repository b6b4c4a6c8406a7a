import pytest
import torch

from diffutron.objective import corrupt, mdlm_loss, mlm_loss, sft_maskable
from diffutron.schedules import get_schedule


def _batch(lm):
    texts = [
        "Bugün hava çok güzel, parka gidelim.",
        "Ankara Türkiye Cumhuriyeti'nin başkentidir ve büyük bir şehirdir.",
        "Evet.",
    ]
    enc = lm.tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _dense_reference(lm, ids, attention, masked, t, schedule, weighting, normalization):
    """Slow and obvious: full logits, a Python loop over every token."""
    logits = lm.full_logits(ids.masked_fill(masked, lm.mask_id), attention).double()
    maskable = lm.maskable(ids)
    per_row, total, count = [], 0.0, 0
    for b in range(ids.shape[0]):
        w = float(schedule.elbo_weight(t[b].double())) if weighting == "elbo" else 1.0
        row = 0.0
        for i in range(ids.shape[1]):
            if masked[b, i]:
                row += w * -torch.log_softmax(logits[b, i], -1)[ids[b, i]].item()
                count += 1
        per_row.append(row / max(int(maskable[b].sum()), 1))
        total += row
    if normalization == "token":
        return total / int(maskable.sum())
    if normalization == "sequence":
        return sum(per_row) / len(per_row)
    return total / count


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("weighting", ["elbo", "uniform"])
@pytest.mark.parametrize("normalization", ["token", "sequence", "masked"])
def test_mdlm_loss_matches_the_dense_reference(tiny_lm, schedule, weighting, normalization):
    ids, attention = _batch(tiny_lm)
    with torch.no_grad():
        out = mdlm_loss(
            tiny_lm,
            ids,
            attention,
            schedule=schedule,
            weighting=weighting,
            normalization=normalization,
            generator=torch.Generator().manual_seed(3),
        )
    assert out.num_masked > 0
    expected = _dense_reference(
        tiny_lm, ids, attention, out.masked, out.t, get_schedule(schedule), weighting, normalization
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_masks_never_touch_special_or_padding_tokens(tiny_lm):
    ids, attention = _batch(tiny_lm)
    maskable = tiny_lm.maskable(ids)
    assert not maskable[attention == 0].any()
    assert not maskable[:, 0].any()  # [CLS]
    noisy, masked = corrupt(ids, maskable, torch.ones(ids.shape[0]), tiny_lm.mask_id)
    assert torch.equal(masked, maskable)  # probability 1 masks exactly the maskable tokens
    assert (noisy[masked] == tiny_lm.mask_id).all() and torch.equal(noisy[~masked], ids[~masked])


def test_mask_rate_follows_the_schedule():
    ids = torch.full((4, 5000), 7)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    prob = torch.tensor([0.1, 0.3, 0.5, 0.9])
    _, masked = corrupt(ids, maskable, prob, mask_id=4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(masked.float().mean(dim=1), prob, atol=0.02)


def test_sft_never_masks_the_prompt(tiny_lm):
    ids, attention = _batch(tiny_lm)
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    prompt[:, :5] = True
    maskable = sft_maskable(tiny_lm.maskable(ids), prompt)
    for seed in range(5):
        out = mdlm_loss(
            tiny_lm,
            ids,
            attention,
            maskable=maskable,
            t=torch.full((3,), 0.99),
            generator=torch.Generator().manual_seed(seed),
        )
        assert not out.masked[prompt].any()
        assert out.masked[maskable].float().mean() > 0.9


def test_mlm_loss_is_mean_ce_at_fixed_ratio(tiny_lm):
    ids, attention = _batch(tiny_lm)
    with torch.no_grad():
        out = mlm_loss(tiny_lm, ids, attention, ratio=0.5, generator=torch.Generator().manual_seed(1))
    expected = _dense_reference(tiny_lm, ids, attention, out.masked, out.t, get_schedule("linear"), "uniform", "masked")
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_is_differentiable_and_seeded(tiny_lm):
    ids, attention = _batch(tiny_lm)
    a = mdlm_loss(tiny_lm, ids, attention, generator=torch.Generator().manual_seed(5))
    b = mdlm_loss(tiny_lm, ids, attention, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.masked, b.masked) and a.loss.item() == b.loss.item()
    a.loss.backward()
    grads = [p.grad for p in tiny_lm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    tiny_lm.zero_grad(set_to_none=True)
