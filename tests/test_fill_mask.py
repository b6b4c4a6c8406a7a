import pytest

from diffutron.errors import UsageError
from diffutron.fill_mask import encode_with_masks, fill_mask


def test_top_k_per_mask_sorted_with_probabilities(tiny_lm):
    result = fill_mask(tiny_lm, "Bugün <mask> çok güzel, <mask> gidelim.", top_k=4)
    assert len(result) == 2 and all(len(c) == 4 for c in result)
    for candidates in result:
        probs = [c.prob for c in candidates]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    first = result[0][0]
    assert first.sequence.startswith("Bugün") and first.sequence.count("<mask>") == 1
    assert tiny_lm.tokenizer.decode([first.token_id]) == first.token


def test_placeholder_and_own_mask_token_are_the_same(tiny_lm):
    assert encode_with_masks(tiny_lm, "Ankara <mask> şehirdir.") == encode_with_masks(
        tiny_lm, "Ankara [MASK] şehirdir."
    )


def test_fill_mask_errors(tiny_lm):
    with pytest.raises(UsageError, match="no <mask>"):
        fill_mask(tiny_lm, "maskesiz bir cümle")
    with pytest.raises(UsageError, match="more than the model's context of 512"):
        fill_mask(tiny_lm, "kelime " * 600 + "<mask>")
