"""Where a decoding step's time goes: the exact sampler vs the dual cache, batch 1, mmBERT-base shape.

    python benchmarks/decode_step_profile.py [--json] [--steps 12] [--preset mmbert-base]

The setting of benchmarks/fast_decoding.py (prompt 64 tokens, 256 new, blocks of 32, one token per
step, greedy confidence): after 3 warm-up steps, `--steps` steps of each mode under torch's profiler.
Reported per mode: seconds per step, and the share of the CPU time spent in the prediction head's
decoder (the one call per step of the 256k x 768 matrix at the block's masks: `mkldnn::_linear_pointwise`
with the packed weight, `aten::addmm` with DIFFUTRON_PACKED_HEAD=0) and in the encoder's matrix
multiplies (`aten::mm`). Random weights: speed only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DECODER_OPS = ("aten::addmm", "mkldnn::_linear_pointwise")  # F.linear with a bias; the packed weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--preset", default="mmbert-base")
    args = parser.parse_args()

    from generate import prompts_of_length
    from torch.profiler import ProfilerActivity, profile

    from diffutron.model import DiffusionLM
    from diffutron.sampling import Denoiser, SamplingConfig, generation_canvas

    lm = DiffusionLM.from_pretrained(f"preset:{args.preset}", device="cpu", seed=0)
    prompts = prompts_of_length(lm, 1, 64)
    report = {}
    for mode in ("none", "dual"):
        config = SamplingConfig(steps=256, cache=mode, block_length=32, stop_at_eos=False)
        denoiser = Denoiser(lm, config)
        denoiser.add(generation_canvas(lm, prompts, 256), config)
        for _ in range(3):  # warm-up, and the dual cache's refresh at the block start
            denoiser.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            for _ in range(args.steps):
                denoiser.step()
            seconds = (time.perf_counter() - started) / args.steps
        events = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        total = sum(events.values())
        decoder = sum(events.get(op, 0) for op in DECODER_OPS)
        report[mode] = {
            "seconds_per_step": seconds,
            "decoder_share": decoder / total,
            "encoder_matmul_share": events.get("aten::mm", 0) / total,
            "decoder_ms_per_step": decoder / 1000 / args.steps,
        }
        r = report[mode]
        print(
            f"{mode:>4}: {r['seconds_per_step']:.3f} s/step, decoder {r['decoder_ms_per_step']:.0f} ms "
            f"({r['decoder_share']:.0%}), encoder matmuls {r['encoder_matmul_share']:.0%}",
            file=sys.stderr if args.json else sys.stdout,
        )
    report["speedup_dual"] = report["none"]["seconds_per_step"] / report["dual"]["seconds_per_step"]
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
