"""One MDLM training step with LoRA r=256 on the mmBERT-base shape: diffutron's step vs the dense
reference step of dllm's MDMLTrainer (full logits at every position, F.cross_entropy over all of them,
masked and weighted afterwards), same weights, same masks, same t.

    python benchmarks/train_step.py [--json] [--batch 2] [--length 512] [--repeats 3]

Forward + backward + AdamW step, CPU fp32 by default (`--autocast-bf16` tries bf16 autocast on the
CPU). Each path runs in its own process so its peak memory (VmHWM, reset after the model is built and
a warm-up step) is its own. The last line of --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_seconds, peak_rss_mb, reset_peak_rss, rss_mb, run_worker  # noqa: E402


def worker(
    path: str, batch: int, length: int, repeats: int, preset: str, bf16: bool, ce_chunk: int, checkpointing: bool
) -> dict:
    import torch
    import torch.nn.functional as F

    from diffutron.lora import LoraSettings, apply_lora
    from diffutron.model import DiffusionLM
    from diffutron.objective import corrupt, mdlm_loss, normalize
    from diffutron.schedules import LINEAR

    lm = DiffusionLM.from_pretrained(f"preset:{preset}", device="cpu", dtype=torch.float32, seed=0)
    lm.model = apply_lora(lm.model, LoraSettings(r=256, alpha=256))
    if checkpointing:  # both paths alike: the encoder layers recompute their activations in backward
        lm.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.model.enable_input_require_grads()
    lm.train()
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(5, len(lm.tokenizer), (batch, length), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = lm.tokenizer.cls_token_id, lm.tokenizer.sep_token_id
    attention = torch.ones_like(ids)
    t = torch.tensor([0.3, 0.7, 0.5, 0.9][:batch] + [0.5] * max(0, batch - 4))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def fast_loss():
        return mdlm_loss(lm, ids, attention, t=t, generator=torch.Generator().manual_seed(1), ce_chunk=ce_chunk).loss

    def dense_loss():  # dllm: logits everywhere, CE everywhere, then mask and weight
        maskable = lm.maskable(ids)
        noisy, masked = corrupt(ids, maskable, LINEAR.mask_prob(t), lm.mask_id, torch.Generator().manual_seed(1))
        logits = lm.full_logits(noisy, attention)
        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), ids.view(-1), reduction="none").view(ids.shape)
        weighted = ce * masked * LINEAR.elbo_weight(t)[:, None]
        rows = masked.nonzero(as_tuple=True)[0]
        return normalize(weighted[masked], rows, maskable, "token")

    loss_fn = fast_loss if path == "fast" else dense_loss
    losses = []

    def step():
        with autocast:
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    with torch.no_grad():
        with autocast:
            first_loss = loss_fn().item()  # before any update: the losses of both paths must agree
    step()  # warm-up
    reset_peak_rss()
    base = rss_mb()
    seconds = median_seconds(step, repeats)
    return {
        "path": path,
        "seconds": seconds,
        "loss": first_loss,
        "peak_rss_mb": peak_rss_mb(),
        "model_rss_mb": base,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="mmbert-base")
    parser.add_argument("--autocast-bf16", action="store_true")
    parser.add_argument("--ce-chunk", type=int, default=256, help="masked positions per cross-entropy chunk")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in both paths")
    parser.add_argument("--worker", choices=["fast", "dense"])
    args = parser.parse_args()
    shape = [f"--batch={args.batch}", f"--length={args.length}", f"--repeats={args.repeats}", f"--preset={args.preset}"]
    shape += ["--autocast-bf16"] if args.autocast_bf16 else []
    shape += [f"--ce-chunk={args.ce_chunk}"] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
    if args.worker:
        options = (
            args.batch,
            args.length,
            args.repeats,
            args.preset,
            args.autocast_bf16,
            args.ce_chunk,
            args.gradient_checkpointing,
        )
        print(json.dumps(worker(args.worker, *options)))
        return
    fast, dense = run_worker(__file__, "fast", *shape), run_worker(__file__, "dense", *shape)
    summary = {
        "speedup": dense["seconds"] / fast["seconds"],
        "peak_mem_ratio": dense["peak_rss_mb"] / fast["peak_rss_mb"],
        "working_mem_ratio": (dense["peak_rss_mb"] - dense["model_rss_mb"])
        / (fast["peak_rss_mb"] - fast["model_rss_mb"]),
        "loss_fast": fast["loss"],
        "loss_dense": dense["loss"],
        "loss_rel_diff": abs(fast["loss"] - dense["loss"]) / abs(dense["loss"]),
        "seconds_fast": fast["seconds"],
        "seconds_dense": dense["seconds"],
        "peak_rss_mb_fast": fast["peak_rss_mb"],
        "peak_rss_mb_dense": dense["peak_rss_mb"],
        "shape": f"{args.batch}x{args.length}",
        "preset": args.preset,
        "threads": fast["threads"],
        "ce_chunk": args.ce_chunk,
        "gradient_checkpointing": args.gradient_checkpointing,
        "dtype": "bf16 autocast" if args.autocast_bf16 else "float32",
    }
    print(
        f"MDLM step, LoRA r=256, preset:{args.preset}, {args.batch} x {args.length}, CPU {summary['dtype']}, "
        f"{summary['threads']} threads, median of {args.repeats}"
    )
    for name, r in (("masked-positions head, chunked CE", fast), ("dense logits + CE everywhere", dense)):
        print(f"  {name:<34}: {r['seconds']:6.2f} s  peak RSS {r['peak_rss_mb']:6.0f} MB  loss {r['loss']:.6f}")
    print(
        f"  speedup {summary['speedup']:.2f}x, peak memory {summary['peak_mem_ratio']:.2f}x lower, "
        f"loss relative difference {summary['loss_rel_diff']:.1e}"
    )
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
