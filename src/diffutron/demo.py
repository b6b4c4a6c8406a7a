"""`diffutron demo`: the reference experiment in miniature, offline, in a few minutes on a CPU.

The shipped tiny base encoder (masked-LM pre-trained on the bundled corpus) becomes a generator
through a short CPT with LoRA under the MDLM objective; held-out PPL@15% is measured before and after;
the result writes continuations of Turkish prompts and fills a gap. Everything lands in a run folder:
the checkpoint, metrics.jsonl, curves.png and report.md. Run again, it reuses the finished run and
says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from diffutron.assets import shipped_model

PROMPTS = ["Türkiye Cumhuriyeti", "Bugün hava çok güzel ve", "Ankara, Türkiye'nin"]
INFILL = "Türkiye Büyük Millet Meclisi <mask*4> açıldı."
LORA_R = 64


def demo_recipe(out: Path, max_steps: int, eval_documents: int):
    from diffutron.config import TrainRecipe, override

    return override(
        TrainRecipe(),
        {
            "model.name": str(shipped_model("tiny-base")),
            "data.dataset": str(out / "data"),
            # the whole held-out split, as the table: the curve's last point is the table's "after"
            "data.eval": "bundled:heldout",
            "data.eval_documents": eval_documents,
            # a curve of four points (a short smoke run measures only before and after)
            "train.eval_every": max_steps // 3 if max_steps >= 30 else max_steps,
            "objective.kind": "mdlm",
            # the shipped tiny Diffutron's LoRA (configs/tiny-diffutron-cpt.yaml), for fewer steps
            "lora.r": LORA_R,
            "lora.alpha": LORA_R,
            "optim.lr": 2e-3,
            "optim.warmup_steps": 20,
            "train.out": str(out),
            "train.max_steps": max_steps,
            "train.batch_size": 16,
            "train.log_every": 5,
            "train.save_every": max_steps,
            "train.keep_last": 1,
        },
    )


def _evaluations(metrics: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {row["step"]: row for row in rows if "eval_ppl" in row}


def run_demo(
    out: str | Path,
    max_steps: int = 300,
    progress: Callable[[dict], None] | None = None,
    on_step: Callable | None = None,
    status: Callable[[str], None] = lambda message: None,
) -> dict:
    """Train (or reuse a finished run in `out`), then measure and sample. Held-out PPL before and after
    is what the run measured at its first and last step, on the whole held-out split."""
    from diffutron.data.pack import PackConfig
    from diffutron.data.prepare import DataRecipe, prepare
    from diffutron.data.sources import read_documents
    from diffutron.errors import DiffutronError
    from diffutron.model import DiffusionLM
    from diffutron.sampling import generate, infill
    from diffutron.train import train

    out = Path(out)
    heldout = [d.text for d in read_documents("bundled:heldout")]
    status("preparing the bundled corpus")
    prepare(DataRecipe(pack=PackConfig(max_length=128)), out / "data")
    summary = train(demo_recipe(out, max_steps, len(heldout)), progress=progress)
    if summary.get("interrupted"):
        error = DiffutronError(f"interrupted at step {summary['step']}: run the demo again to resume")
        error.exit_code = 130
        raise error
    evaluations = _evaluations(out / "metrics.jsonl")
    before, after = evaluations[0], evaluations[summary["step"]]
    status("generating with the trained model")
    trained = DiffusionLM.from_pretrained(summary["final"], device="cpu")
    # the CLI's generate defaults (docs/benchmarks.md): greedy, confidence, repetition penalty 1.2
    settings = dict(max_new_tokens=24, steps=24, temperature=0.0, policy="confidence", repetition_penalty=1.2)
    samples = generate(trained, PROMPTS, **settings)
    shown = generate(trained, [PROMPTS[0]], **settings, history=True, callback=on_step)
    filled = infill(trained, [INFILL])
    result = {
        "ppl_before": before["eval_ppl"],
        "ppl_after": after["eval_ppl"],
        "elbo_ppl_before": before["eval_elbo_ppl"],
        "elbo_ppl_after": after["eval_elbo_ppl"],
        "top1_before": before["eval_top1"],
        "top1_after": after["eval_top1"],
        "samples": [{"prompt": p, "text": t} for p, t in zip(PROMPTS, samples.texts, strict=True)],
        "infill": {"input": INFILL, "text": filled.texts[0]},
        "denoising": _frames(trained.tokenizer, shown, PROMPTS[0]),
        "run_dir": str(out),
        "steps": summary["step"],
        "train_seconds": summary["train_seconds"],
        "reused": bool(summary.get("already_complete")),
    }
    (out / "report.md").write_text(_report(result), encoding="utf-8")
    (out / "demo.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


def _frames(tokenizer, shown, prompt: str, count: int = 8) -> list[str]:
    """Up to `count` canvases of the denoising, masks as ░, then the finished text (the prompt and what
    generation kept: a canvas may still hold masks past the end of the sequence)."""

    def canvas(ids) -> str:
        text = tokenizer.decode(ids, skip_special_tokens=False).replace(tokenizer.mask_token, "░")
        for special in (tokenizer.cls_token, tokenizer.sep_token, tokenizer.pad_token):
            text = text.replace(special, "") if special else text
        return text.strip()

    history = shown.history[:-1]
    frames = [canvas(h[0]) for h in history[:: max(1, -(-len(history) // count))]]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return frames + [tokenizer.decode(prompt_ids + shown.token_ids[0], skip_special_tokens=True).strip()]


def _report(r: dict) -> str:
    trained = (
        f"reused: `{r['run_dir']}` already held this finished run (trained in {r['train_seconds']:.0f} s); "
        "delete it or pass `--out` to train afresh"
        if r["reused"]
        else f"{r['train_seconds']:.0f} s"
    )
    lines = [
        "# diffutron demo: a tiny Turkish diffusion LM from a masked-LM encoder",
        "",
        f"CPT with LoRA (r={LORA_R}) under the MDLM objective, {r['steps']} steps from the shipped tiny base "
        f"({trained}). The whole held-out split of the bundled corpus, one mask draw, the same for both rows "
        "(the curve in `curves.png` is measured on the same set):",
        "",
        "| model | PPL @ 15% masked | ELBO bound on the generative PPL (not PPL@15%) | fill-mask top-1 |",
        "|---|---|---|---|",
        f"| tiny base (MLM) | {r['ppl_before']:.2f} | {r['elbo_ppl_before']:.2f} | {r['top1_before']:.1%} |",
        f"| after CPT | {r['ppl_after']:.2f} | {r['elbo_ppl_after']:.2f} | {r['top1_after']:.1%} |",
        "",
        "## Continuations (greedy, confidence policy, repetition penalty 1.2, 24 tokens, 24 steps)",
        "",
    ]
    lines += [f"- **{s['prompt']}** → {s['text']}" for s in r["samples"]]
    lines += [
        "",
        "## Infill",
        "",
        f"- {r['infill']['input']} → {r['infill']['text']}",
        "",
        "## Denoising of the first prompt, step by step (the last line: the finished text)",
        "",
        "```",
    ]
    lines += r["denoising"] + ["```", "", "Curves: `curves.png`; per-step numbers: `metrics.jsonl`.", ""]
    return "\n".join(lines)
