"""CPU inference in fp32 vs bf16 (and int8 weights, tried): decoding speed against the bandwidth floor, and quality.

    python benchmarks/cpu_precision.py [--json] [--models tiny-diffutron,preset:mmbert-base] [--batches 1,8]
        [--prompt-tokens 60] [--new-tokens 32] [--block-length 32] [--rounds 2] [--int8 dynamic,torchao,torchao-dynamic]
        [--threads N] [--skip-quality]

Speed, per model and batch size: the exact sampler (`cache none`) and the dual cache in each precision, a
60-token held-out prompt per row, 32 new tokens in blocks of 32, one token per step, greedy `confidence`, no
stop at EOS. Every (precision, mode) denoises the same prompts in lockstep, one `Denoiser.step()` each in turn
(the order rotating every step), each step timed alone: the rounds alternate step by step, so a drifting load
weighs on all. `step_ms`: the mean wall-clock time of a step; tokens/s from the summed step times; the
speed-ups are fp32 time over bf16 time (> 1: bf16 faster), the smaller over the batch sizes.
`floor_ms`: the bandwidth floor of a step, the bytes of weights it reads (every weight but the embedding
table, of which a step reads a few rows; the tied decoder counted once, as the decoder) over the read bandwidth
measured here (the best of a few sums over a 512 MB buffer, before and after the runs). On the tiny model the
weights fit in the caches, so its floor is not a limit.

Quality, per model: PPL@15% on the held-out split (the same masks in both precisions; `--ppl-docs N`: the
first N documents, 0 all), its relative difference bf16 / fp32 - 1; greedy token agreement, bf16 vs fp32:
the share of tokens equal (same position) over `--agreement-prompts` held-out prompts of 16 tokens (one width:
no padding), 32 new tokens, exact decoding; rows in company: the logits of those prompts' masks computed in
one batch vs each prompt alone (one width: only the arithmetic can differ), the largest difference and the
share of positions whose top token differs (`company_max_logit_diff`, `company_top1_flips`). Random weights
(`preset:`) make quality figures of the shape, not of a language model: their documents and prompts are capped
by `--preset-quality-docs`.

`--int8 VARIANTS`: int8 weights in the same runs, through a library, on every nn.Linear (encoder, head, decoder):
`dynamic`, torch's own dynamic quantization (`torch.ao.quantization.quantize_dynamic`, qint8: activations
quantized per call too); `torchao`, torchao's weight-only int8 (`Int8WeightOnlyConfig`); `torchao-dynamic`, its
int8 weights with activations quantized per call (`Int8DynamicActivationInt8WeightConfig`). torchao is not a
dependency: its variants need it importable. Each int8 variant is judged by issue 23's rule for adopting it as
`--dtype int8`: at least `INT8_MIN_SPEEDUP` faster than bf16 (the smaller speed-up over modes and batch sizes)
with PPL@15% within `INT8_MAX_PPL_DIFF` of fp32; its speed-up over fp32 is reported too (on a CPU where bf16 is
slower than fp32, beating bf16 says little: `auto` runs fp32 there).

With --json, stdout is one JSON object: speedup_bf16_exact, speedup_bf16_dual, ppl_rel_diff, agreement
(per model), floor_ms and step_ms ({model: {precision: {mode: {batch: ms}}}}, floor_ms: {model: {precision:
ms}}), the read bandwidth, the CPU, and the tables.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = {"exact": "none", "dual": "dual"}
INT8_VARIANTS = ("dynamic", "torchao", "torchao-dynamic")
INT8_MIN_SPEEDUP = 1.3
INT8_MAX_PPL_DIFF = 0.01


def say(args, *parts) -> None:
    print(*parts, file=sys.stderr if args.json else sys.stdout, flush=True)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second that torch reads here: the best of `repeats` sums over a buffer far larger than the caches."""
    import torch

    buffer = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best


def weight_bytes(lm, linear_bytes: int | None = None) -> int:
    """The bytes of weights a step reads: every parameter once (tied ones once) but the embedding table, unless
    it is the decoder's. `linear_bytes`: the bytes per element of the nn.Linear weights (int8: 1) if not their own."""
    from torch import nn

    linear_weights = {id(m.weight) for m in lm.hf_model.modules() if isinstance(m, nn.Linear)}
    embedding, decoder = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    total = 0
    for p in {id(p): p for p in lm.hf_model.parameters()}.values():
        if p is embedding and p is not decoder:
            continue
        size = linear_bytes if linear_bytes is not None and id(p) in linear_weights else p.element_size()
        total += p.numel() * size
    return total


def variants(args, lm) -> dict:
    """{precision: (model, bytes of weights a step reads)}: fp32, bf16 and the int8 variants asked for."""
    import torch
    from torch import nn

    found = {"fp32": (lm, weight_bytes(lm)), "bf16": (copy.deepcopy(lm).to(torch.bfloat16), weight_bytes(lm) // 2)}
    int8_bytes = weight_bytes(lm, linear_bytes=1)
    for variant in args.int8:
        quantized = copy.deepcopy(lm)
        if variant == "dynamic":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation: docs/benchmarks.md records it
                quantized = torch.ao.quantization.quantize_dynamic(quantized, {nn.Linear}, dtype=torch.qint8)
        else:
            try:
                from torchao.quantization import (
                    Int8DynamicActivationInt8WeightConfig,
                    Int8WeightOnlyConfig,
                    quantize_,
                )
            except ImportError:
                say(args, f"torchao is not importable: int8-{variant} skipped")
                continue
            config = Int8WeightOnlyConfig() if variant == "torchao" else Int8DynamicActivationInt8WeightConfig()
            quantize_(quantized.hf_model, config)
        found[f"int8-{variant}"] = (quantized, int8_bytes)
    return found


def int8_variants(text: str) -> list[str]:
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in INT8_VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown int8 variant(s) {unknown}: choose from {', '.join(INT8_VARIANTS)}")
    return chosen


def speed(args, models: dict, prompts: list[str]) -> dict:
    """{precision: {mode: {batch: {step_ms, tokens_per_s}}}} from lockstep runs."""
    from diffutron.sampling import Denoiser, SamplingConfig, generation_canvas

    configs = {
        mode: SamplingConfig(steps=args.new_tokens, cache=cache, block_length=args.block_length, stop_at_eos=False)
        for mode, cache in MODES.items()
    }
    runs = list(itertools.product(models, MODES))
    for name, mode in runs:  # warm-up: kernels, the allocator, the packed decoder
        lm = models[name]
        warm = Denoiser(lm, configs[mode])
        warm.add(generation_canvas(lm, prompts[:1], args.block_length), configs[mode])
        for _ in range(2):
            warm.step()
    table = {name: {mode: {} for mode in MODES} for name in models}
    for batch in args.batches:
        seconds = dict.fromkeys(runs, 0.0)
        steps, tokens = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0)
        for _ in range(args.rounds):
            running = {}
            for name, mode in runs:
                running[name, mode] = Denoiser(models[name], configs[mode])
                canvas = generation_canvas(models[name], prompts[:batch], args.new_tokens)
                running[name, mode].add(canvas, configs[mode])
            turn = 0
            while running:
                keys = list(running)
                for key in keys[turn % len(keys) :] + keys[: turn % len(keys)]:
                    started = time.perf_counter()
                    finished = running[key].step().finished
                    seconds[key] += time.perf_counter() - started
                    steps[key] += 1
                    tokens[key] += sum(len(f.token_ids) for f in finished if f)
                    if not len(running[key]):
                        del running[key]
                turn += 1
        for name, mode in runs:
            table[name][mode][str(batch)] = {
                "step_ms": 1000 * seconds[name, mode] / steps[name, mode],
                "tokens_per_s": tokens[name, mode] / seconds[name, mode],
            }
        say(
            args,
            f"  batch {batch}: "
            + "  ".join(f"{n} {m} {table[n][m][str(batch)]['step_ms']:.1f} ms/step" for n, m in runs),
        )
    return table


def company(lm, prompts: list[str], new_tokens: int = 32) -> dict:
    """A row's logits in company vs alone: prompts of one width, the masks of their generation canvas."""
    import torch

    from diffutron.sampling import generation_canvas

    def logits(canvas):
        return lm(canvas.ids, canvas.attention_mask, positions=canvas.fillable, packed_decoder=True).float()

    with torch.no_grad():
        together = logits(generation_canvas(lm, prompts, new_tokens))
        alone = torch.cat([logits(generation_canvas(lm, [p], new_tokens)) for p in prompts])
    flips = (together.argmax(-1) != alone.argmax(-1)).float().mean().item()
    return {"company_max_logit_diff": (together - alone).abs().max().item(), "company_top1_flips": flips}


def quality(args, models: dict, name: str) -> dict:
    """PPL@15% on the held-out split and greedy agreement with fp32, per precision."""
    from generate import prompts_of_length

    from diffutron.data import read_documents
    from diffutron.evaluate import evaluate
    from diffutron.sampling import generate

    preset = name.startswith("preset:")
    docs = args.preset_quality_docs if preset else args.ppl_docs
    texts = [d.text for d in read_documents("bundled:heldout")]
    texts = texts[:docs] if docs else texts
    n_prompts = min(args.agreement_prompts, args.preset_quality_docs) if preset else args.agreement_prompts
    prompts = prompts_of_length(models["fp32"], n_prompts, 16)
    out, reference = {}, None
    for precision, lm in models.items():
        result = evaluate(lm, texts, mask_ratio=0.15, samples=1, seed=0, batch_size=8, elbo_samples=0)
        tokens = generate(lm, prompts, max_new_tokens=32, block_length=32, stop_at_eos=False).token_ids
        reference = reference or tokens
        same = sum(a == b for row, ref in zip(tokens, reference, strict=True) for a, b in zip(row, ref, strict=True))
        out[precision] = {
            "ppl": result.ppl,
            "masked_tokens": result.masked_tokens,
            "agreement": same / sum(len(r) for r in reference),
            **company(lm, prompts),
        }
        out[precision]["ppl_rel_diff"] = result.ppl / out["fp32"]["ppl"] - 1
        say(
            args,
            f"  {precision}: PPL@15% {result.ppl:.4f} ({out[precision]['ppl_rel_diff']:+.4%} vs fp32, "
            f"{result.masked_tokens} masked tokens), greedy agreement with fp32 {out[precision]['agreement']:.4f}, "
            f"in company vs alone: logits within {out[precision]['company_max_logit_diff']:.2g}, "
            f"top-1 flips {out[precision]['company_top1_flips']:.3f}",
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--models", default="tiny-diffutron,preset:mmbert-base")
    parser.add_argument("--batches", default="1,8", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--prompt-tokens", type=int, default=60)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="generations per (precision, mode), step-interleaved")
    parser.add_argument("--ppl-docs", type=int, default=0, help="held-out documents for PPL (0: all)")
    parser.add_argument("--agreement-prompts", type=int, default=32)
    parser.add_argument("--preset-quality-docs", type=int, default=8, help="documents and prompts for a preset")
    parser.add_argument("--int8", type=int8_variants, default=[], help=f"int8 variants too: {','.join(INT8_VARIANTS)}")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--threads", type=int, help="torch's threads [default: as the CLI, the CPUs idle at start]")
    args = parser.parse_args()

    import os

    from diffutron.threads import configure

    configure(args.threads)  # before torch is imported: what `diffutron generate` would use here

    import torch
    from generate import prompts_of_length

    from diffutron.model import DiffusionLM
    from diffutron.precision import cpu_has_bf16_matmul

    torch.manual_seed(0)
    bandwidth = read_bandwidth()
    report = {
        "cpu": cpu_model(),
        "bf16_matrix_instructions": cpu_has_bf16_matmul(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "models": {},
    }
    say(args, f"{report['cpu']}, {report['threads']} threads, bf16 matrix instructions: {cpu_has_bf16_matmul()}")
    for name in args.models.split(","):
        say(args, name)
        lm = DiffusionLM.from_pretrained(name, device="cpu", dtype=torch.float32, seed=0)
        found = variants(args, lm)
        models = {precision: model for precision, (model, _) in found.items()}
        entry = {"weight_mb": {p: b / 1e6 for p, (_, b) in found.items()}}
        if not args.skip_speed:
            entry["speed"] = speed(args, models, prompts_of_length(lm, max(args.batches), args.prompt_tokens))
        if not args.skip_quality:
            entry["quality"] = quality(args, models, name)
        report["models"][name] = entry
    bandwidth = max(bandwidth, read_bandwidth())
    report["read_gb_per_s"] = bandwidth / 1e9
    report["load_average_after"] = os.getloadavg()
    for entry in report["models"].values():
        entry["floor_ms"] = {p: 1000 * mb * 1e6 / bandwidth for p, mb in entry["weight_mb"].items()}
    summarise(args, report)
    if args.json:
        print(json.dumps(report))


def summarise(args, report: dict) -> None:
    """The keys the docs quote, per model: speed-ups (the smaller over the batch sizes), the PPL difference
    and the agreement of bf16, the floor and the measured steps."""
    models = report["models"]
    say(args, f"read bandwidth {report['read_gb_per_s']:.1f} GB/s")
    report["floor_ms"] = {name: entry["floor_ms"] for name, entry in models.items()}
    if not args.skip_speed:
        report["step_ms"] = {}
        for name, entry in models.items():
            report["step_ms"][name] = {
                precision: {mode: {b: row["step_ms"] for b, row in rows.items()} for mode, rows in modes.items()}
                for precision, modes in entry["speed"].items()
            }
            for precision, modes in report["step_ms"][name].items():
                for mode, by_batch in modes.items():
                    shown = ", ".join(f"batch {b} {ms:.1f} ms" for b, ms in by_batch.items())
                    say(
                        args, f"{name} {precision} {mode}: {shown} (floor {report['floor_ms'][name][precision]:.1f} ms)"
                    )
        for mode in MODES:
            report[f"speedup_bf16_{mode}"] = {
                name: min(ms["fp32"][mode][b] / ms["bf16"][mode][b] for b in ms["fp32"][mode])
                for name, ms in report["step_ms"].items()
            }
    if not args.skip_quality:
        report["ppl_rel_diff"] = {name: e["quality"]["bf16"]["ppl_rel_diff"] for name, e in models.items()}
        report["agreement"] = {name: e["quality"]["bf16"]["agreement"] for name, e in models.items()}
    for key in ("speedup_bf16_exact", "speedup_bf16_dual", "ppl_rel_diff", "agreement"):
        if key in report:
            say(args, key, {name: round(value, 4) for name, value in report[key].items()})
    if args.int8 and not args.skip_speed:
        report["int8"] = int8_verdicts(args, report)


def int8_verdicts(args, report: dict) -> dict:
    """Per int8 variant and model: its speed-ups over bf16 and fp32 (the smaller over modes and batch sizes),
    its PPL difference from fp32 and greedy agreement, and whether it meets the rule for `--dtype int8`."""
    verdicts = {}
    for name, ms in report["step_ms"].items():
        quality = report["models"][name].get("quality", {})
        for variant in (p for p in ms if p.startswith("int8-")):

            def speedup(over, variant=variant, ms=ms):
                return min(ms[over][m][b] / ms[variant][m][b] for m in MODES for b in ms[variant][m])

            entry = {"speedup_over_bf16": speedup("bf16"), "speedup_over_fp32": speedup("fp32")}
            if variant in quality:
                entry["ppl_rel_diff"] = quality[variant]["ppl_rel_diff"]
                entry["agreement"] = quality[variant]["agreement"]
                entry["meets_rule"] = (
                    entry["speedup_over_bf16"] >= INT8_MIN_SPEEDUP and abs(entry["ppl_rel_diff"]) <= INT8_MAX_PPL_DIFF
                )
            verdicts.setdefault(variant, {})[name] = entry
            shown = (f"{k} {v}" if isinstance(v, bool) else f"{k} {v:.4g}" for k, v in entry.items())
            say(args, f"{name} {variant}: " + ", ".join(shown))
    return verdicts


if __name__ == "__main__":
    main()
