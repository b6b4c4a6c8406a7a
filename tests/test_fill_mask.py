import pytest

from diffutron.errors import UsageError
from diffutron.fill_mask import fill_mask
from diffutron.mask_syntax import encode_with_masks


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


@pytest.mark.parametrize(
    "text, message",
    [
        ("Ankara <mask*0> başkentidir.", r"<mask\*0> asks for no token"),
        ("Ankara <mask*0> başkentidir <mask>.", r"<mask\*0> asks for no token"),
        ("Ankara <mask*99999999999> başkentidir.", "asks for 99,999,999,999 masks, more than the model's context"),
        ("<mask*300> ve <mask*300>", "asks for 600 masks, more than the model's context of 512"),
    ],
)
def test_mask_counts_that_cannot_be_filled_are_usage_errors(tiny_lm, text, message):
    with pytest.raises(UsageError, match=message):
        fill_mask(tiny_lm, text)


def test_mask_count_errors_in_the_commands(capsys):
    from diffutron.cli import main

    for verb, text in (("fill-mask", "Ankara <mask*0> başkentidir."), ("infill", "Ankara <mask*9999> başkentidir.")):
        assert main([verb, text]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "mask" in err[0]
