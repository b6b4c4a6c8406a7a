"""Multiple-choice loglikelihood requests on the mmBERT-base shape: diffutron's harness estimator vs a
faithful port of dllm's MDLM harness model (dllm/core/eval/mdlm.py, as LLaDA's eval_llada.py), same mc_num.

    python benchmarks/harness_throughput.py [--json] [--questions 8] [--multi-token-questions 2] \
        [--mc-num 32] [--repeats 2]

The requests are the first questions of the shipped tr_cloze task (context, four one-word choices),
and the first whose four choices all take more than one token (Monte Carlo for each of them),
split into tokens by diffutron's encode_pair for both paths: with dllm's own `_encode_pair` every
choice would score [SEP] instead of its first token (tests/test_harness.py), so the port gets the same
rows, `[CLS] context continuation [SEP]`, with only the continuation maskable -- the one change, to
compare like with like. The port is otherwise as dllm runs it: one request at a time, mc_num rows per
request in batches of `batch_size` (dllm's default 32), the number masked stratified as LLaDA's
`_forward_process` does with a randperm per row, the model's full [batch, length, 256k] logits, the
loss divided by p_mask. diffutron: every request and sample batched together, identical rows computed
once, exact single forward for one-token choices, the head only at masked positions; its masks are
seeded as the harness seeds them (from each question's content: likelihood.question_key).

Both estimate the same quantity; they must agree within their Monte Carlo error (|z| per request).
Random weights (seeded), fp32, CPU (or --device cuda). The last line of --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# -- the port of dllm's MDLMEvalHarness loglikelihood (with the rows given, see the module docstring) ----
def _forward_process(batch, prompt_index, target_len, mask_id, tail):
    b, length = batch.shape
    k = torch.randint(1, target_len + 1, (), device=batch.device)
    x = torch.round(torch.linspace(float(k), k + (b - 1) * (target_len / b), steps=b, device=batch.device)).long()
    x = ((x - 1) % target_len) + 1
    indices = torch.arange(target_len, device=batch.device).repeat(b, 1)
    is_mask = indices < x.unsqueeze(1)
    for i in range(b):
        is_mask[i] = is_mask[i][torch.randperm(target_len)]
    prompt = torch.zeros(b, int(prompt_index.sum()), dtype=torch.bool, device=batch.device)
    is_mask = torch.cat((prompt, is_mask, torch.zeros(b, tail, dtype=torch.bool, device=batch.device)), dim=1)
    noisy_batch = torch.where(is_mask, mask_id, batch)
    p_mask = (x / target_len).unsqueeze(1).repeat(1, length)
    return noisy_batch, p_mask


@torch.no_grad()
def reference_loglikelihood(model, mask_id, prefix, target, suffix, mc_num, batch_size):
    """(estimate, standard error over its rows): dllm's _get_loglikelihood, one request."""
    device = next(model.parameters()).device
    seq = torch.tensor(prefix + target + suffix)[None, :].repeat((batch_size, 1)).to(device)
    prompt_index = torch.arange(seq.shape[1], device=device) < len(prefix)
    loss_acc, rows = [], []
    for _ in range(mc_num // batch_size):
        perturbed_seq, p_mask = _forward_process(seq, prompt_index, len(target), mask_id, len(suffix))
        mask_indices = perturbed_seq == mask_id
        logits = model(input_ids=perturbed_seq).logits
        loss = F.cross_entropy(logits[mask_indices], seq[mask_indices], reduction="none") / p_mask[mask_indices]
        rows.append(torch.zeros(batch_size, device=device).index_add_(0, mask_indices.nonzero()[:, 0], loss))  # for z
        loss = loss.sum() / batch_size
        loss_acc.append(loss.item())
    per_row = -torch.cat(rows)
    return -sum(loss_acc) / len(loss_acc), float(per_row.std() / math.sqrt(len(per_row)))


def requests(lm, task: str, questions: int, multi_token: bool = False) -> tuple[list, list[str]]:
    """Every choice of the first `questions` questions of a pack task (in file order); with multi_token,
    of the first whose choices all take more than one token (Monte Carlo for every choice). Returns the
    (context ids, continuation ids) pairs and their mask keys, the harness's (likelihood.question_key)."""
    from diffutron.likelihood import encode_pair, question_key

    if questions == 0:
        return [], []
    lines = (ROOT / f"configs/eval/tasks/diffutron_tr/{task}.jsonl").read_text(encoding="utf-8").splitlines()
    chosen = []
    for line in lines:
        item = json.loads(line)
        context, delimiter = (item["context"], " ") if "context" in item else ("", "")
        texts = [(context, delimiter + choice) for choice in item["choices"]]
        pairs = [encode_pair(lm.tokenizer, *text) for text in texts]
        if not multi_token or all(len(x) > 1 for _, x in pairs):
            chosen.append((pairs, question_key(texts)))
        if len(chosen) == questions:
            break
    return [pair for pairs, _ in chosen for pair in pairs], [key for pairs, key in chosen for _ in pairs]


def compare(lm, pairs, keys, mc_num: int, batch_size: int, seed: int, repeats: int) -> dict:
    """Both paths on the same requests: seconds (summed over `repeats` rounds, the order alternating --
    reference first, then fast first -- so that a drift in the machine's load weighs on both), and how
    far apart their estimates are."""
    from diffutron.likelihood import continuation_logprobs

    prefix, suffix = lm.special_affixes
    reference_batch = min(batch_size, mc_num)  # dllm asserts mc_num % batch_size == 0

    def run_reference():
        return [
            reference_loglikelihood(lm.hf_model, lm.mask_id, prefix + c, x, suffix, mc_num, reference_batch)
            for c, x in pairs
        ]

    def run_fast():
        return continuation_logprobs(lm, pairs, mc_num=mc_num, seed=seed, keys=keys, batch_size=batch_size)

    torch.manual_seed(seed)
    seconds = {"reference": 0.0, "fast": 0.0}
    outputs = {}
    for round_number in range(repeats):
        for name in ("reference", "fast") if round_number % 2 == 0 else ("fast", "reference"):
            start = time.perf_counter()
            outputs[name] = run_reference() if name == "reference" else run_fast()
            seconds[name] += time.perf_counter() - start
    reference, fast = outputs["reference"], outputs["fast"]
    seconds_reference, seconds_fast = seconds["reference"], seconds["fast"]
    exact = [abs(f.logprob - r) for f, (r, _) in zip(fast, reference, strict=True) if f.stderr == 0]
    z = [(f.logprob - r) / math.hypot(f.stderr, se) for f, (r, se) in zip(fast, reference, strict=True) if f.stderr]
    return {
        "requests": len(pairs),
        "one_token_choices": sum(len(x) == 1 for _, x in pairs),
        "mean_continuation_tokens": sum(len(x) for _, x in pairs) / len(pairs),
        "mean_row_tokens": sum(len(prefix) + len(c) + len(x) + len(suffix) for c, x in pairs) / len(pairs),
        "seconds_reference": seconds_reference,
        "seconds_fast": seconds_fast,
        "speedup": seconds_reference / seconds_fast,
        # one-token choices: both exact, the same number up to float rounding
        "max_abs_diff_exact": max(exact, default=0.0),
        # the others: (fast - reference) / their combined Monte Carlo standard error
        "max_abs_z": max((abs(v) for v in z), default=0.0),
        "within_3_stderr": sum(abs(v) <= 3 for v in z) / len(z) if z else 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--preset", default="mmbert-base")
    parser.add_argument("--questions", type=int, default=8, help="tr_cloze questions (4 choices each), file order")
    parser.add_argument(
        "--multi-token-questions", type=int, default=2, help="tr_cloze questions whose choices are all multi-token"
    )
    parser.add_argument("--mc-num", type=int, default=16)
    parser.add_argument(
        "--long-questions", type=int, default=0, help="tr_order questions: two whole texts of 40-100 tokens each"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward (dllm's default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds, order alternating (ABBA for 2)")
    args = parser.parse_args()

    from diffutron.likelihood import continuation_logprobs
    from diffutron.model import DiffusionLM

    if args.mc_num % min(args.batch_size, args.mc_num):
        raise SystemExit("--mc-num must be a multiple of --batch-size (dllm's harness asserts it)")
    lm = DiffusionLM.from_pretrained(f"preset:{args.preset}", device=args.device, dtype=torch.float32, seed=0)
    prefix, suffix = lm.special_affixes
    sets = {
        "cloze": requests(lm, "tr_cloze", args.questions),
        "multi_token": requests(lm, "tr_cloze", args.multi_token_questions, multi_token=True),
        "long": requests(lm, "tr_order", args.long_questions),  # whole two-sentence texts, no context
    }
    warm = next(pairs for pairs, _ in sets.values() if pairs)[:1]
    continuation_logprobs(lm, warm, mc_num=2, batch_size=args.batch_size)  # warm-up, both paths
    reference_loglikelihood(lm.hf_model, lm.mask_id, prefix + warm[0][0], warm[0][1], suffix, 2, 2)
    parts = {
        name: compare(lm, pairs, keys, args.mc_num, args.batch_size, args.seed, args.repeats)
        for name, (pairs, keys) in sets.items()
        if pairs
    }
    seconds_reference = sum(p["seconds_reference"] for p in parts.values())
    seconds_fast = sum(p["seconds_fast"] for p in parts.values())
    result = {
        "preset": args.preset,
        "mc_num": args.mc_num,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "seconds_reference": seconds_reference,
        "seconds_fast": seconds_fast,
        "speedup": seconds_reference / seconds_fast,
        **{f"{name}_{key}": value for name, part in parts.items() for key, value in part.items()},
        "device": torch.cuda.get_device_name() if lm.device.type == "cuda" else "cpu",
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>26}: {value:.4g}" if isinstance(value, float) else f"{key:>26}: {value}")


if __name__ == "__main__":
    main()
