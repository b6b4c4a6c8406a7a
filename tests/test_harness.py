"""The ELBO likelihood estimator against a slow reference, the end-token pitfall, the lm-eval model and
`diffutron lm-eval` on the shipped Turkish task pack (offline, shipped tiny models)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from diffutron.harness import HarnessModel, cut_at_stops, load  # noqa: E402
from diffutron.likelihood import (  # noqa: E402
    continuation_logprobs,
    draw_masks,
    elbo,
    encode_pair,
    greedy_decodes,
    mask_generator,
    request_key,
)

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "configs" / "eval" / "tasks" / "diffutron_tr"


@pytest.fixture(scope="module")
def lm():
    return load("tiny-diffutron", device="cpu")


def ids(lm, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def reference_logprob(lm, context: list[int], continuation: list[int], masks: torch.Tensor) -> float:
    """The obvious version on given masks: one row at a time, the model's full logits, a Python loop."""
    prefix, suffix = lm.special_affixes
    start = len(prefix) + len(context)
    total = 0.0
    for m in masks:
        row = torch.tensor([prefix + context + continuation + suffix])
        row[0, start : start + len(continuation)][m] = lm.mask_id
        logp = F.log_softmax(lm.full_logits(row).float()[0], dim=-1)
        for i in m.nonzero().flatten().tolist():
            total += len(continuation) / int(m.sum()) * float(logp[start + i, continuation[i]])
    return total / masks.shape[0]


def test_masks_are_stratified_and_seeded():
    masks = draw_masks(10, 20, mask_generator(0, "a request", 10))
    counts = masks.sum(dim=1)
    assert masks.shape == (20, 10) and counts.min() >= 1 and counts.max() <= 10
    assert sorted(counts.tolist()) == counts.tolist()  # stratum n holds the n-th slice of 1..L
    assert torch.bincount(counts, minlength=11)[1:].tolist() == [2] * 10  # 20 samples: each count twice
    assert torch.equal(masks, draw_masks(10, 20, mask_generator(0, "a request", 10)))
    assert not torch.equal(masks, draw_masks(10, 20, mask_generator(1, "a request", 10)))
    assert not torch.equal(masks, draw_masks(10, 20, mask_generator(0, "another request", 10)))
    assert draw_masks(1, 64, mask_generator(0, "a request", 1)).shape == (1, 1)  # one token: exact, one sample
    logp = torch.randn(20, 10)
    expected = torch.stack([logp[n][masks[n]].sum() * 10 / masks[n].sum() for n in range(20)]).mean()
    assert torch.isclose(elbo(logp, masks), expected)


def test_estimate_matches_slow_reference_on_the_same_masks(lm):
    pairs = [
        (ids(lm, "Türkiye Cumhuriyeti'nin başkenti"), ids(lm, " Ankara şehridir.")),
        (ids(lm, "Bugün hava çok"), ids(lm, " güzel")),
        (ids(lm, "Bugün hava çok"), ids(lm, " güzel")),  # a duplicate request
        ([], ids(lm, "Muhterem efendiler, bu dakikada müteşekkirim.")),  # no context
        (ids(lm, "Bugün hava çok"), ids(lm, " kötü ve soğuk")),
        ([lm.mask_id] + ids(lm, " hava çok"), ids(lm, " güzel")),  # a literal mask in the context is not scored
    ]
    scores = continuation_logprobs(lm, pairs, mc_num=6, seed=3, batch_size=5, head_chunk=7)
    for (context, continuation), score in zip(pairs, scores, strict=True):
        masks = draw_masks(
            len(continuation), 6, mask_generator(3, request_key(context, continuation), len(continuation))
        )
        assert score.logprob == pytest.approx(reference_logprob(lm, context, continuation, masks), abs=1e-4)
    # deterministic for a seed, whatever the batch size; another seed draws other masks
    again = continuation_logprobs(lm, pairs, mc_num=6, seed=3, batch_size=64, max_rows=7)
    assert [s.logprob for s in again] == pytest.approx([s.logprob for s in scores], abs=1e-5)
    other = continuation_logprobs(lm, pairs[:1], mc_num=6, seed=4)
    assert other[0].logprob != pytest.approx(scores[0].logprob, abs=1e-5)


def test_estimate_is_unbiased_for_the_elbo(lm):
    """For L = 3 the ELBO is enumerable over the 7 mask patterns: (1/L) sum_l mean over l-subsets of
    (L / l) sum of the masked tokens' log p. The stratified estimator's mean over seeds converges to it."""
    import itertools

    context, continuation = ids(lm, "Bugün hava çok"), ids(lm, " güzel bir gün")
    length = len(continuation)
    assert length == 3
    patterns = [torch.tensor(p) for p in itertools.product([False, True], repeat=length) if any(p)]
    # pattern -> log p of each token with that pattern masked, one row at a time
    table = {tuple(p.tolist()): _token_logprobs(lm, context, continuation, p) for p in patterns}
    exact = 0.0  # (1/L) sum over l of the mean, over the l-subsets, of (L / l) * their log p
    for k in range(1, length + 1):
        subsets = [p for p in patterns if int(p.sum()) == k]
        exact += sum(length / k * float(table[tuple(p.tolist())][p].sum()) for p in subsets) / len(subsets) / length
    estimates = []
    for seed in range(3000):
        masks = draw_masks(length, 4, mask_generator(seed, "", length))
        logp = torch.stack([table[tuple(m.tolist())] for m in masks])
        estimates.append(float(elbo(logp, masks)))
    estimates = torch.tensor(estimates)
    assert float(estimates.mean()) == pytest.approx(exact, abs=4 * float(estimates.std()) / len(estimates) ** 0.5)


@torch.no_grad()
def _token_logprobs(lm, context, continuation, pattern) -> torch.Tensor:
    prefix, suffix = lm.special_affixes
    start = len(prefix) + len(context)
    row = torch.tensor([prefix + context + continuation + suffix])
    row[0, start : start + len(continuation)][pattern] = lm.mask_id
    logp = F.log_softmax(lm.full_logits(row).float()[0, start : start + len(continuation)], dim=-1)
    return logp.gather(1, torch.tensor(continuation)[:, None]).squeeze(1)


def _encoder_rows(lm, monkeypatch) -> list[list[int]]:
    """Every row the encoder sees from now on, without [CLS], [SEP] and padding."""
    rows = []
    encode = lm.encode

    def spy(input_ids, attention_mask=None):
        rows.extend(
            row[1 : sum(keep) - 1] for row, keep in zip(input_ids.tolist(), attention_mask.tolist(), strict=True)
        )
        return encode(input_ids, attention_mask)

    monkeypatch.setattr(lm, "encode", spy)
    return rows


def _patterns(lm, rows: list[list[int]], context: list[int], continuation: list[int]) -> set[tuple[bool, ...]]:
    """The mask patterns of the rows that are (context, continuation) with some of the continuation masked."""
    found = set()
    for row in rows:
        if len(row) == len(context) + len(continuation) and row[: len(context)] == context:
            tail = row[len(context) :]
            if all(t == lm.mask_id or t == c for t, c in zip(tail, continuation, strict=True)):
                found.add(tuple(t == lm.mask_id for t in tail))
    return found


def test_same_length_requests_draw_their_own_masks(lm, monkeypatch):
    """Masks seeded by (seed, L) alone made every same-length request of a run share its Monte Carlo
    errors: lm-eval's standard error, which assumes independent items, came out too small."""
    first, second = ids(lm, "Bugün hava çok"), ids(lm, "Ankara Türkiye'nin")
    continuation = ids(lm, " güzel bir gün oldu ve biz")
    assert len(continuation) > 4
    rows = _encoder_rows(lm, monkeypatch)
    continuation_logprobs(lm, [(first, continuation), (second, continuation)], mc_num=8)
    mine, theirs = _patterns(lm, rows, first, continuation), _patterns(lm, rows, second, continuation)
    assert len(mine) > 4 and len(theirs) > 4
    assert mine != theirs
    rows.clear()  # the same request again (another run, another batch size): the same masks
    continuation_logprobs(lm, [(second, continuation)], mc_num=8, batch_size=3)
    assert _patterns(lm, rows, second, continuation) == theirs


def test_the_choices_of_one_question_share_their_masks_and_questions_do_not(lm, monkeypatch):
    """A paired comparison within a question (common random numbers), independent draws across
    questions -- also for questions without a context (tr_order), told apart by their choices."""
    from diffutron.harness import question_keys

    def request(doc, context, continuation, task="t"):
        return Instance("loglikelihood", {}, (context, continuation), 0, (task, doc, 1))

    choice_a, choice_b = " güzel bir gün oldu ve biz", " soğuk bir gece oldu ve siz"
    requests = [
        request(0, "Bugün hava çok", choice_a),
        request(0, "Bugün hava çok", choice_b),
        request(1, "Dün hava çok", choice_a),
        request(2, "", "Bir. İki."),
        request(2, "", "İki. Bir."),
        request(3, "", "Üç. Dört."),
        request(3, "", "Dört. Üç."),
        request(None, "Bugün hava çok", choice_a),
    ]
    keys = question_keys(requests)
    assert keys[0] == keys[1] and keys[3] == keys[4] and keys[5] == keys[6]
    assert len({keys[0], keys[2], keys[3], keys[5], keys[7]}) == 5
    assert question_keys(list(reversed(requests)))[::-1] == keys  # content, not position
    rows = _encoder_rows(lm, monkeypatch)
    HarnessModel(lm=lm, mc_num=8).loglikelihood(requests[:3], disable_tqdm=True)
    context = ids(lm, "Bugün hava çok")
    (_, a), (_, b) = (
        encode_pair(lm.tokenizer, "Bugün hava çok", choice_a),
        encode_pair(lm.tokenizer, "Bugün hava çok", choice_b),
    )
    assert len(a) == len(b)
    assert _patterns(lm, rows, context, a) == _patterns(lm, rows, context, b)
    assert _patterns(lm, rows, ids(lm, "Dün hava çok"), a) != _patterns(lm, rows, context, a)


def test_one_letter_choices_get_distinct_exact_scores_from_one_forward(lm, monkeypatch):
    """The end-token pitfall: `tokenizer(context + choice)[len(tokenizer(context)):]` is [SEP] for every
    one-letter choice of a [CLS] ... [SEP] tokenizer, so A..D score the same. Here each choice is its own
    token, scored exactly at the one mask of [CLS] context [MASK] [SEP] -- one forward for all four."""
    tokenizer = lm.tokenizer
    context = (
        "Paragraf: Ankara Türkiye'nin başkentidir.\nSoru: Başkent neresidir?\nA: İzmir\nB: Ankara\nC: Bursa\nCevap:"
    )
    choices = [" A", " B", " C", " D"]
    research = [tokenizer(context + c)["input_ids"][len(tokenizer(context)["input_ids"]) :] for c in choices]
    assert research == [[tokenizer.sep_token_id]] * 4  # what research harnesses score: the same for all
    pairs = [encode_pair(tokenizer, context, c) for c in choices]
    assert [p[1] for p in pairs] == [ids(lm, c) for c in choices]  # the choice's own token, never [SEP]
    assert all(p[0] == ids(lm, context) for p in pairs)
    forwards = []
    encode = lm.encode
    monkeypatch.setattr(lm, "encode", lambda *a, **k: forwards.append(1) or encode(*a, **k))
    scores = [s.logprob for s in continuation_logprobs(lm, pairs, mc_num=64)]
    assert len(forwards) == 1 and len(set(scores)) == 4
    prefix, suffix = lm.special_affixes
    row = torch.tensor([prefix + pairs[0][0] + [lm.mask_id] + suffix])
    with torch.no_grad():
        exact = F.log_softmax(lm.full_logits(row)[0, len(prefix) + len(pairs[0][0])].float(), dim=-1)
    assert scores == pytest.approx([float(exact[p[1][0]]) for p in pairs], abs=1e-5)


def test_encode_pair_keeps_boundary_tokens_in_the_continuation(lm):
    tokenizer = lm.tokenizer
    for context, continuation in [("Cevap: ", "A"), ("Bugün hava", "lar güzel"), ("", "Merhaba"), ("İstanbul", "")]:
        head, tail = encode_pair(tokenizer, context, continuation)
        assert head + tail == ids(lm, context + continuation)
        assert tokenizer.decode(tail).endswith(continuation) or not continuation
        assert bool(tail) == bool(continuation)


def test_greedy_flag_follows_greedy_decoding(lm):
    from diffutron.sampling import generate

    prompt = "Türkiye Cumhuriyeti'nin başkenti"
    greedy = generate(lm, [prompt], 3, steps=3, stop_at_eos=False).token_ids[0]
    context = ids(lm, prompt)
    altered = greedy[:-1] + [greedy[-1] + 1]
    assert greedy_decodes(lm, [(context, greedy), (context, altered)]) == [True, False]
    scores = continuation_logprobs(lm, [(context, greedy), (context, altered)], mc_num=2, check_greedy=True)
    assert [s.greedy for s in scores] == [True, False]


def test_is_greedy_is_what_greedy_decoding_writes_for_every_length(lm, monkeypatch):
    """For one token it was the argmax over the whole vocabulary, special tokens included; for longer
    continuations what the sampler writes, which is never a special token but the end one. One rule now:
    what greedy decoding writes. A head that puts [CLS] on top everywhere tells the two apart."""
    cls = lm.tokenizer.cls_token_id
    head = lm.head

    def head_preferring_cls(hidden, packed_decoder=False):
        logits = head(hidden, packed_decoder)
        logits[..., cls] = logits.max(dim=-1).values + 5.0
        return logits

    monkeypatch.setattr(lm, "head", head_preferring_cls)
    context = ids(lm, "Türkiye Cumhuriyeti'nin başkenti")
    prefix, suffix = lm.special_affixes
    with torch.no_grad():  # the slow rule: the argmax over the ids the sampler may write
        hidden = lm.encode(torch.tensor([prefix + context + [lm.mask_id] + suffix]))[0, len(prefix) + len(context)]
        logits = lm.head(hidden)[: len(lm.tokenizer)]
    banned = [i for i in lm.special_ids if i != lm.tokenizer.sep_token_id]
    logits[banned] = float("-inf")
    best = int(logits.argmax())
    assert best != cls
    pairs = [(context, [best]), (context, [cls]), (context, [best + 1]), (context, [cls, cls])]
    scored = [s.greedy for s in continuation_logprobs(lm, pairs, mc_num=2, check_greedy=True)]
    assert scored == greedy_decodes(lm, pairs) == [True, False, False, False]


def test_generate_until_gives_a_request_the_same_text_alone_or_in_any_batch(lm):
    """Seeds by position in the chunk made a sampled text depend on the other requests and the batch size."""
    sampling = {"until": ["\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0}
    prompts = ["Türkiye'nin en büyük şehri", "Bugün hava çok", "Muhterem efendiler", "Bugün hava çok"]
    requests = _instances("generate_until", [(p, sampling) for p in prompts])
    together = HarnessModel(lm=lm, batch_size=4).generate_until(requests, disable_tqdm=True)
    one_by_one = HarnessModel(lm=lm, batch_size=1).generate_until(requests, disable_tqdm=True)
    alone = [HarnessModel(lm=lm).generate_until([r], disable_tqdm=True)[0] for r in requests[:3]]
    assert together == one_by_one and together[:3] == alone
    assert together[1] != together[3]  # a repeated request (lm-eval's repeats) is another sample
    assert HarnessModel(lm=lm, seed=1).generate_until(requests[:1], disable_tqdm=True) != together[:1]


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_harness_model_requests(lm):
    model = HarnessModel(lm=lm, mc_num=2, batch_size=16)
    ll = model.loglikelihood(_instances("loglikelihood", [("Bugün hava çok", " güzel"), ("Bugün hava çok", " X")]))
    assert len(ll) == 2 and all(isinstance(v, float) and isinstance(g, bool) for v, g in ll)
    long_document = " ".join(["Muhterem efendiler, bugün burada bulunmakla bahtiyarım."] * 80)
    assert len(ids(lm, long_document)) > lm.context_length  # two windows
    rolling = model.loglikelihood_rolling(_instances("loglikelihood_rolling", [("Merhaba dünya.",), (long_document,)]))
    assert len(rolling) == 2 and all(v < 0 for v in rolling) and rolling[1] < rolling[0]
    texts = model.generate_until(
        _instances("generate_until", [("Türkiye'nin en büyük şehri", {"until": [","], "max_gen_toks": 6})] * 2)
    )
    assert len(texts) == 2 and all("," not in t and len(ids(lm, t)) <= 6 for t in texts)
    with pytest.raises(Exception, match="unknown model argument"):
        HarnessModel(lm=lm, tempreature=1.0)
    with pytest.raises(Exception, match="top-p"):  # checked at once, not after the likelihood tasks ran
        HarnessModel(lm=lm, top_p=2.0)
    assert cut_at_stops("bir. iki\n üç", [".", "\n"]) == "bir"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_lm_eval_cli_default_device_falls_back_to_cpu():
    """lm-eval's CLI passes device cuda:0 unless told otherwise (its own HF model falls back too)."""
    with pytest.warns(UserWarning, match="CUDA is not available"):
        model = HarnessModel(pretrained="tiny-base", device="cuda:0")
    assert model.lm.device.type == "cpu"


def test_registered_in_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("diffutron") is HarnessModel


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from diffutron.cli import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("model", ["tiny-base", "tiny-diffutron"])
def test_lm_eval_runs_the_shipped_pack_offline(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the pack is found from any working directory
    output = tmp_path / "results.json"
    tasks = "tr_cloze,tr_suffix,tr_order"
    args = ["lm-eval", model, "--tasks", tasks, "--limit", "6", "--mc-num", "2", "--output", str(output)]
    code, out, _ = _cli([*args, "--json"], capsys)
    assert code == 0
    results = json.loads(out.strip().splitlines()[-1])["results"]
    for task in tasks.split(","):
        assert 0 <= results[task]["acc,none"] <= 1 and results[task]["acc_stderr,none"] >= 0
        assert results[task]["sample_len"] == 6
    written = json.loads(output.read_text())  # the harness's own results file, without per-document samples
    assert written["results"] == results and "samples" not in written
    code, _, err = _cli(args, capsys)  # never overwrites a file
    assert code == 2 and "exists" in err


def test_lm_eval_usage_errors(capsys):
    code, _, err = _cli(["lm-eval", "--tasks", "no_such_task_anywhere", "--limit", "1"], capsys)
    assert code == 2 and "unknown task" in err
    code, _, err = _cli(["lm-eval", "--tasks", "tr_cloze", "--include-path", "/nonexistent"], capsys)
    assert code == 2 and "not a folder" in err


def test_pack_is_rebuilt_byte_for_byte_from_the_heldout_split(tmp_path):
    from diffutron.data.bundled import bundled_documents

    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_eval_tasks.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    names = ("tr_cloze.jsonl", "tr_suffix.jsonl", "tr_order.jsonl")
    for name in names:
        assert (tmp_path / name).read_bytes() == (PACK / name).read_bytes()
    heldout = {d.id: d.text for d in bundled_documents("heldout")}
    train_ids = {d.id for d in bundled_documents("train")}
    for name in names:
        for line in (PACK / name).read_text().splitlines():
            item = json.loads(line)
            doc = item["id"].rsplit("-", 1)[0]
            assert doc in heldout and doc not in train_ids
            if "context" in item:
                answer = item["choices"][item["label"]]
                assert item["context"] + " " + answer in heldout[doc] and len(set(item["choices"])) == 4
                same_stem = [c[:4] == answer[:4] for c in item["choices"]]
                assert all(same_stem) if name == "tr_suffix.jsonl" else sum(same_stem) == 1
            else:
                original, swapped = item["choices"][item["label"]], item["choices"][1 - item["label"]]
                assert " ".join(original.split()) in " ".join(heldout[doc].split())
                assert original != swapped and sorted(original.split()) == sorted(swapped.split())
