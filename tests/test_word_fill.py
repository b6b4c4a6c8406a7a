"""Blanks of unknown length: `<word>` (fill-mask) and `<mask*?>` / `<mask*A-B>` (infill), checked against
slow references: every candidate of a tiny-vocabulary model enumerated and scored one term per row."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from diffutron.errors import UsageError
from diffutron.fill_mask import Candidate, fill_mask
from diffutron.mask_syntax import blanks, count_masks, encode_with_masks, expand
from diffutron.sampling import infill
from diffutron.word_fill import WordCandidates, fill_words, span_scores, word_length_limit, word_pieces

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = re.compile(r"^[^\W_]+(?:'[^\W_]+)*$")


@pytest.fixture(scope="module")
def small_lm():
    """A ModernBERT with random weights on a 27-token byte-level BPE (letters, an apostrophe, words after a
    space): small enough to enumerate every word of up to three tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoModelForMaskedLM, ModernBertConfig, PreTrainedTokenizerFast

    from diffutron.model import DiffusionLM

    merges = [("Ġ", "e"), ("Ġe", "v"), ("l", "e"), ("le", "r"), ("i", "n"), ("Ġ", "k"), ("Ġk", "a")]
    merges += [("r", "a"), ("Ġka", "r"), ("Ġ", "a"), ("n", "e")]
    vocab = SPECIALS + list("aeiklnrv'.") + ["Ġ"] + ["".join(m) for m in merges]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, lstrip=s == "[MASK]") for s in SPECIALS])
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=64,
    )  # fmt: skip
    config = ModernBertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, pad_token_id=0, cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return DiffusionLM(AutoModelForMaskedLM.from_config(config).eval(), tokenizer, name="small").eval()


# -- the slow reference ----------------------------------------------------------------------------
def reference_pieces(tokenizer, token: int) -> str:
    """How a token reads after a letter: its text, a leading space included."""
    return tokenizer.decode([tokenizer.convert_tokens_to_ids("a"), token], clean_up_tokenization_spaces=False)[1:]


def reference_words(lm, length: int, space: bool) -> list[list[int]]:
    """Every token sequence of `length` that reads as one word (with a space before it when `space`)."""
    found = []
    for tokens in itertools.product(range(len(lm.tokenizer)), repeat=length):
        if any(t in lm.special_ids for t in tokens):
            continue
        pieces = [reference_pieces(lm.tokenizer, t) for t in tokens]
        text = "".join(pieces)
        if pieces[0].startswith(" ") == space and LETTERS.match(text.removeprefix(" ") if space else text):
            found.append(list(tokens))
    return found


def reference_rows(lm, ids: list[int], span: tuple[int, int], context: int | None, own_word: bool) -> list[tuple]:
    """The PLL-word-l2r terms of the span and of `context` words on each side, as (row, position, target):
    one row per term, the term's token and the rest of its word masked. A word is a run of tokens that each
    read as letters (or an apostrophe) glued to the one before; with `own_word` the span is a word of its
    own (a <word>); the frame ([CLS], [SEP]) is not scored."""
    pieces = [reference_pieces(lm.tokenizer, t).removeprefix(" ") if t not in lm.special_ids else "" for t in ids]
    glued = [not reference_pieces(lm.tokenizer, t).startswith(" ") for t in ids]
    wordlike = [bool(re.match(r"^(?:['’]?[^\W_]+(?:['’][^\W_]+)*['’]?|['’])$", p)) for p in pieces]
    edges = span if own_word else ()
    starts = [i == 0 or i in edges or not (wordlike[i] and wordlike[i - 1] and glued[i]) for i in range(len(ids))]
    words = []
    for i in range(len(ids)):
        if starts[i]:
            words.append([])
        words[-1].append(i)
    inside = [w for w in words if span[0] <= w[0] < span[1]]
    before = [w for w in words if w[0] < span[0]]
    after = [w for w in words if w[0] >= span[1]]
    if context is not None:
        before, after = before[len(before) - context :] if context else [], after[:context]
    rows = []
    for word in before + inside + after:
        for k, t in enumerate(word):
            if t == 0 or t == len(ids) - 1:  # the frame
                continue
            row = list(ids)
            for masked in word[k:]:
                row[masked] = lm.mask_id
            rows.append((row, t, ids[t]))
    return rows


def reference_logprobs(lm, rows: list[tuple]) -> list[float]:
    """log p(target) at each (row, position, target), full logits over every position (rows of one length
    at a time, so no padding)."""
    values = []
    for chunk in range(0, len(rows), 512):
        part = rows[chunk : chunk + 512]
        with torch.no_grad():
            logits = lm.full_logits(torch.tensor([r[0] for r in part])).double()
        values += [float(logits[i, t].log_softmax(-1)[target]) for i, (_, t, target) in enumerate(part)]
    return values


def reference_score(lm, ids: list[int], span: tuple[int, int], context: int | None, own_word: bool) -> float:
    return sum(reference_logprobs(lm, reference_rows(lm, ids, span, context, own_word)))


def reference_top(lm, text: str, lengths, context, top_k: int) -> list[tuple[str, float]]:
    at = text.index("<word>")
    left = lm.tokenizer(text[:at].rstrip())["input_ids"][:-1]
    right = lm.tokenizer(text[at + len("<word>") :], add_special_tokens=False)["input_ids"]
    right += [lm.tokenizer.sep_token_id]
    best: dict[str, float] = {}
    for n in lengths:
        candidates = reference_words(lm, n, space=text[at - 1] == " ")
        terms = [reference_rows(lm, left + tokens + right, (len(left), len(left) + n), context, True)
                 for tokens in candidates]  # fmt: skip
        values = iter(reference_logprobs(lm, [row for rows in terms for row in rows]))
        for tokens, rows in zip(candidates, terms, strict=True):
            score = sum(next(values) for _ in rows)
            word = lm.tokenizer.decode(tokens).strip()
            best[word] = max(score, best.get(word, float("-inf")))
    return sorted(best.items(), key=lambda kv: -kv[1])[:top_k]


# -- <word> ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context", [1, 0, None])
def test_an_exhaustive_search_finds_the_reference_best_words(small_lm, context):
    text = "kara <word> evler."
    top = fill_words(small_lm, text, top_k=6, max_tokens=3, beam=len(small_lm.tokenizer) ** 2, context=context)[0]
    expected = reference_top(small_lm, text, (1, 2, 3), context, 6)
    assert [c.text for c in top] == [w for w, _ in expected]
    assert [c.score for c in top] == pytest.approx([s for _, s in expected], abs=1e-4)
    for c in top:
        assert c.length == len(c.tokens) and small_lm.tokenizer.decode(c.tokens).strip() == c.text
        assert c.sequence == f"kara {c.text} evler."


def test_a_narrow_beam_keeps_whole_words_and_their_true_scores(small_lm):
    text = "<word> kara evler."  # at the start: the first token carries no space
    top = fill_words(small_lm, text, top_k=3, max_tokens=3, beam=2)[0]
    assert len(top) == 3
    for c in top:
        assert not small_lm.tokenizer.decode(c.tokens).startswith(" ") and LETTERS.match(c.text)
        ids = small_lm.tokenizer(expand(small_lm, text, [c.length]))["input_ids"]
        ids[1 : 1 + c.length] = c.tokens
        assert c.score == pytest.approx(reference_score(small_lm, ids, (1, 1 + c.length), 1, True), abs=1e-4)


def test_word_tokens_read_as_pieces_of_words(tokenizer):
    pieces = word_pieces(tokenizer)
    ids = tokenizer(" Cumhuriyeti'nin başkenti.", add_special_tokens=False)["input_ids"]
    assert [bool(pieces.usable[i]) for i in ids] == [True, True, True, True, False]  # "Cumhuriyeti", "'", "nin", ...
    assert pieces.continues(ids) == [False, True, True, False, False]
    assert word_length_limit(tokenizer) == 4  # 99% of the bundled corpus's words


def test_fill_mask_mixes_masks_and_words_in_the_text_order(tiny_lm):
    text = "Bugün <mask> çok <word>, <mask*2> gidelim."
    found = fill_mask(tiny_lm, text, top_k=3, max_tokens=2, beam=3)
    assert [isinstance(f, WordCandidates) for f in found] == [False, True, False, False]
    alone = fill_mask(tiny_lm, "Bugün <mask> çok <mask>, <mask*2> gidelim.", top_k=3)
    for i in (0, 2, 3):  # the masks see <word> as one mask
        got, expected = found[i], alone[i]
        assert [c.token_id for c in got] == [c.token_id for c in expected]
        assert all(isinstance(c, Candidate) for c in got)
    words = found[1]
    assert len(words) == 3 and all(1 <= w.length <= 2 for w in words)
    assert [w.score for w in words] == sorted((w.score for w in words), reverse=True)
    assert words[0].sequence == f"Bugün <mask> çok {words[0].text}, <mask*2> gidelim."
    assert words == fill_words(tiny_lm, text, top_k=3, max_tokens=2, beam=3)[0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("Ankara<word> şehri", "whole word"),
        ("Ankara <word>dir.", "whole word"),
        ("Ankara <mask*?> şehri", "infill's"),
        ("Ankara <word> şehri", "max-tokens must be in 1..16"),
    ],
)
def test_word_blank_errors(tiny_lm, text, message):
    with pytest.raises(UsageError, match=message):
        fill_mask(tiny_lm, text, max_tokens=17 if "must be" in message else 2)


# -- the syntax ------------------------------------------------------------------------------------
def test_the_placeholders_and_their_lengths(tiny_lm):
    text = "a <mask> b <mask*3> c <mask*?> d <mask*2-5> e <word> [MASK]"
    found = blanks(text, word_limit=4)
    assert [(b.shortest, b.longest, b.word) for b in found] == [(1, 1, False), (3, 3, False), (1, 8, False),
                                                                 (2, 5, False), (1, 4, True)]  # fmt: skip
    assert [text[b.start : b.end] for b in found] == ["<mask>", "<mask*3>", "<mask*?>", "<mask*2-5>", "<word>"]
    assert count_masks(tiny_lm, text, word_limit=4) == 1 + 3 + 8 + 5 + 4 + 1
    assert count_masks(tiny_lm, text, [2, 4, 1]) == 1 + 3 + 2 + 4 + 1 + 1
    assert expand(tiny_lm, text, [2, 4, 1]).count("[MASK]") == 1 + 3 + 2 + 4 + 1 + 1
    with pytest.raises(UsageError, match=r"<mask\*\?> has no fixed length: `infill` fills it"):
        encode_with_masks(tiny_lm, "a <mask*?> b")
    with pytest.raises(UsageError, match="`fill-mask` proposes whole words"):
        encode_with_masks(tiny_lm, "a <word> b")
    for bad, message in (("<mask*3-1>", "goes up"), ("<mask*0-2>", "asks for no token"), ("<mask*0>", "no token")):
        with pytest.raises(UsageError, match=message):
            blanks(f"a {bad} b")


# -- <mask*?> --------------------------------------------------------------------------------------
def test_unknown_length_infill_keeps_the_best_scoring_length(tiny_lm):
    text = "Ankara <mask*?> başkentidir."
    result = infill(tiny_lm, [text, "Bir <mask> iki <mask*1-3>."])
    lengths = result.lengths[0]
    assert [entry["length"] for entry in lengths] == list(range(1, 9))
    # each length is filled as <mask*n> alone would be, and scored as the reference scores it
    for entry in lengths:
        alone = infill(tiny_lm, text.replace("<mask*?>", f"<mask*{entry['length']}>"))
        assert entry["text"] == alone.texts[0]
        ids = alone.token_ids[0]
        start = tiny_lm.tokenizer(expand(tiny_lm, text, [1]))["input_ids"].index(tiny_lm.mask_id)
        span = (start, start + entry["length"])
        assert entry["score"] == pytest.approx(reference_score(tiny_lm, ids, span, 1, False), abs=1e-3)
        assert entry["score"] == pytest.approx(span_scores(tiny_lm, [ids], [span])[0], abs=1e-4)  # batch rounding
    best = max(lengths, key=lambda entry: entry["score"])
    assert result.texts[0] == best["text"]
    assert [entry["length"] for entry in result.lengths[1]] == [1, 2, 3]
    assert len(result.texts) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("a <mask*?> b <mask*?>", "one span of unknown length"),
        ("a <word> b", "fill-mask's"),
        ("a <mask*1-600> b", "more than the model's context"),
    ],
)
def test_unknown_length_infill_errors(tiny_lm, text, message):
    with pytest.raises(UsageError, match=message):
        infill(tiny_lm, text)


# -- the CLI and the server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped_lm():
    from diffutron.model import DiffusionLM

    return DiffusionLM.from_pretrained("tiny-diffutron", device="cpu")


def test_cli_word_blanks_and_unknown_lengths_are_the_library(capsys, shipped_lm):
    from cli_run import last_json, run

    from diffutron.sampling import user_config

    text = "Ankara <word> başkentidir."
    code, out, _ = run(capsys, "fill-mask", text, "--top-k", "3", "--max-tokens", "2", "--beam", "4", "--json")
    assert code == 0
    expected = fill_words(shipped_lm, text, top_k=3, max_tokens=2, beam=4)
    assert last_json(out)["words"] == [[c.to_dict() for c in expected[0]]] and last_json(out)["masks"] == []
    code, out, _ = run(capsys, "fill-mask", text, "--top-k", "2")
    assert code == 0 and "<word> 1 of 1" in out and expected[0][0].text in out

    text = "Ankara <mask*1-3> başkentidir."
    code, out, _ = run(capsys, "infill", text, "--json")
    result = infill(shipped_lm, text, user_config("infill"))
    assert code == 0 and last_json(out)["text"] == result.texts[0]
    assert [e["length"] for e in last_json(out)["lengths"]] == [1, 2, 3]
    assert last_json(out)["lengths"] == result.lengths[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fill-mask", "a <mask*?> b"], "infill's"),
        (["fill-mask", "a <word> b", "--max-tokens", "17"], "max-tokens must be in 1..16"),
        (["infill", "a <word> b"], "fill-mask's"),
        (["infill", "a <mask*?> b <mask*2-3>"], "one span of unknown length"),
    ],
)
def test_cli_blank_errors_are_one_line(capsys, argv, message):
    from cli_run import run

    code, _, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_server_word_blanks_and_unknown_lengths_are_the_library(shipped_lm):
    import httpx

    from diffutron.sampling import user_config
    from diffutron.serve import create_app, serving

    with serving(create_app(shipped_lm, max_batch=16, max_queue=8)) as url, httpx.Client(base_url=url, timeout=60) as c:
        text = "Bugün <mask> çok <word>."
        body = c.post("/v1/fill-mask", json={"text": text, "top_k": 3, "max_tokens": 2, "beam": 4}).json()
        expected = fill_mask(shipped_lm, text, 3, sequences=False, max_tokens=2, beam=4)
        assert body["masks"] == [{"index": 0, "candidates": [c.to_dict() for c in expected[0]]}]
        assert body["words"] == [{"index": 0, "candidates": [c.to_dict() for c in expected[1]]}]
        assert "words" not in c.post("/v1/fill-mask", json={"text": "Bugün <mask>."}).json()

        texts = ["Ankara <mask*?> başkentidir.", "Bugün <mask> güzel."]
        body = c.post("/v1/infill", json={"text": texts}).json()
        result = infill(shipped_lm, texts, user_config("infill"))
        assert [choice["text"] for choice in body["choices"]] == result.texts
        assert body["choices"][0]["lengths"] == result.lengths[0] and "lengths" not in body["choices"][1]

        for path, request, message in [
            ("/v1/infill", {"text": texts[0], "stream": True}, "stream is not available"),
            ("/v1/infill", {"text": [texts[0]] * 3}, "--max-batch 16"),
            ("/v1/fill-mask", {"text": "a <word> <word> <word> b", "beam": 8, "max_tokens": 4}, "chains"),
            ("/v1/fill-mask", {"text": "a <mask*?> b"}, "infill's"),
        ]:
            reply = c.post(path, json=request)
            assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text
