"""The run planned before it runs: its tokens, steps and epochs for a number of processes; the model's FLOPs
per token; a few real steps measured on this device; the projected wall time and device-hours.

FLOPs per token of a training step (forward + backward), counted from the model itself:

    encoder   2 x (N + N_lora)   forward, through every linear of the encoder (N) and its LoRA adapters
            + 2 x (N + N_lora)   backward, the gradient of the activations (through frozen weights too)
            + 2 x N_trained      backward, the gradient of the trained weights (N in full training, N_lora
                                 with LoRA: the frozen weights' gradient is never formed)
    attention 12 x d x sum over layers of the keys a token attends to (its local window, or the sequence)
    head      m x (4 + 2 [trained]) x (d^2 + V d), the head's transform and vocabulary decoder at the masked
              positions only (the sparse head): m is the recipe's expected masked share (0.5 for MDLM's
              linear schedule; the MLM ratio)

The embedding lookup costs no FLOPs. Full training of an encoder whose decoder is its own share of the
parameters is then well below the usual 6 N per token, which counts the decoder at every position.
MFU = achieved FLOP/s / the device's peak: the dense bf16 peak of known GPUs (PEAK_FLOPS), and on a CPU a
large matrix product measured on the spot. The projection multiplies the measured seconds per step by the
steps of the planned run: for N processes it assumes each keeps its measured speed (data parallel; the
gradient all-reduce, small beside a step of this size on one node, is not measured here).
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import torch
from torch import nn

from diffutron.config import TrainRecipe, override

# Dense peak FLOP/s per device, by name as torch reports it and compute dtype (vendor datasheets, SXM parts).
PEAK_FLOPS = {
    ("H100", torch.bfloat16): 989e12,
    ("H200", torch.bfloat16): 989e12,
    ("A100", torch.bfloat16): 312e12,
    ("H100", torch.float32): 67e12,
    ("H200", torch.float32): 67e12,
    ("A100", torch.float32): 19.5e12,
}


def masked_share(recipe: TrainRecipe) -> float:
    """The expected share of maskable tokens a training step masks (so many go through the head)."""
    o = recipe.objective
    if o.kind == "mlm":
        return o.mlm_ratio
    from diffutron.schedules import get_schedule

    t = torch.linspace(o.eps, 1.0, 10_001, dtype=torch.float64)  # t ~ U(eps, 1)
    return float(get_schedule(o.schedule).mask_prob(t).mean())


def flops_per_token(lm, masked: float, length: int) -> dict:
    """The FLOPs of one training token in sequences of `length` (module docstring), and their parts."""
    encoder = lm.hf_model.base_model
    config = lm.hf_model.config
    dense = lora = trained = 0
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Linear):
            count = module.weight.numel()
            if "lora_" in name:
                lora += count
            else:
                dense += count
            trained += count if module.weight.requires_grad else 0
    hidden, vocab = config.hidden_size, config.vocab_size
    head = hidden * hidden + vocab * hidden
    head_trained = any(p.requires_grad for p in lm.get_output_embeddings().parameters())
    attention = 12 * hidden * sum(_keys_attended(config, length))
    encoder_flops = 4 * (dense + lora) + 2 * trained
    head_flops = masked * (6 if head_trained else 4) * head
    return {
        "flops_per_token": encoder_flops + attention + head_flops,
        "encoder_linear_params": dense,
        "lora_params": lora,
        "head_params": head,
        "masked_share": masked,
    }


def _keys_attended(config, length: int) -> list[int]:
    """Per layer, the keys a token attends to: its local window (ModernBERT's sliding layers) or the sequence."""
    window = getattr(config, "local_attention", None)
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [min(window + 1, length) if kind == "sliding_attention" and window else length for kind in kinds]


def run_shape(recipe: TrainRecipe, processes: int, max_length: int, sequences: int | None) -> dict:
    """Sequences, tokens, steps and epochs of the run for `processes` processes (train.max_tokens, if set,
    fixes the tokens, and the steps follow from the world size; else train.max_steps)."""
    t = recipe.train
    sequences_per_step = t.batch_size * t.grad_accum * processes
    tokens_per_step = sequences_per_step * max_length
    steps = math.ceil(t.max_tokens / tokens_per_step) if t.max_tokens else t.max_steps
    return {
        "processes": processes,
        "max_length": max_length,
        "sequences_per_step": sequences_per_step,
        "tokens_per_step": tokens_per_step,
        "steps": steps,
        "sequences_total": steps * sequences_per_step,
        "tokens_total": steps * tokens_per_step,
        "sequences": sequences,
        "epochs": steps * sequences_per_step / sequences if sequences else None,
    }


def with_steps(recipe: TrainRecipe, processes: int) -> TrainRecipe:
    """The recipe with train.max_steps its length for `processes` processes (see run_shape)."""
    if not recipe.train.max_tokens:
        return recipe
    steps = run_shape(recipe, processes, data_shape(recipe)[0], None)["steps"]
    return override(recipe, {"train.max_steps": steps})


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from) of the device at a compute dtype."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (model, kind), peak in PEAK_FLOPS.items():
            if model in name and kind == dtype:
                return peak, f"{model} datasheet, dense {str(dtype).removeprefix('torch.')}"
        return None, f"{name}: not in PEAK_FLOPS"
    return _measured_matmul(dtype), "a 2048 x 2048 matrix product measured here"


def _measured_matmul(dtype: torch.dtype, size: int = 2048, seconds: float = 1.0) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        torch.mm(a, b)
        done += 1
    return 2 * size**3 * done / elapsed


def measure_steps(recipe: TrainRecipe, lm, max_length: int, steps: int, device: torch.device, dtype) -> dict:
    """`steps` real optimizer steps of the recipe (one process, the recipe's batch and accumulation, random
    tokens of the data's length) after one to warm up: seconds per step, peak memory."""
    from diffutron.train.loop import compute_loss, mask_generator

    lm = lm.to(device).train()
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=recipe.optim.lr)
    t = recipe.train
    specials = torch.tensor(lm.special_ids)
    generator = torch.Generator().manual_seed(recipe.train.seed)

    def batch() -> dict:
        ids = torch.randint(len(lm.tokenizer), (t.batch_size, max_length), generator=generator)
        ids[torch.isin(ids, specials)] = specials.max() + 1  # ordinary tokens only (within the vocabulary)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}

    def step(index: int) -> None:
        for micro in range(t.grad_accum):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = compute_loss(lm, lm, batch(), recipe, mask_generator(t.seed, index, micro, 0)).loss
            (loss / t.grad_accum).backward()
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in lm.parameters() if p.requires_grad], t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step(0)  # warm-up: allocations, kernels chosen
    synchronize()
    times = []
    for index in range(1, steps + 1):
        started = time.perf_counter()
        step(index)
        synchronize()
        times.append(time.perf_counter() - started)
    if device.type == "cuda":
        peak_mb, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda allocated"
    else:
        peak_mb, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process RSS"
    return {
        "seconds_per_step": sorted(times)[len(times) // 2],
        "step_seconds": times,
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": kind,
    }


def plan(
    recipe: TrainRecipe,
    processes: int = 1,
    measure: int = 3,
    device: str | None = None,
    length: int | None = None,
) -> dict:
    """The planned run: counts for `processes` processes, FLOPs per token, and with `measure` > 0 that many
    steps measured on `device` (default: CUDA if present) and the projection they give. `length`: the
    sequence length, if not the data's."""
    from diffutron.train.build import build_model, describe_model, resolve_paths

    recipe.validate()
    recipe = resolve_paths(recipe)
    max_length, sequences = (length, None) if length else data_shape(recipe)
    shape = run_shape(recipe, processes, max_length, sequences)
    skeleton = build_model(recipe, skeleton=True)
    flops = flops_per_token(skeleton, masked_share(recipe), max_length)
    result = {
        **describe_model(recipe, skeleton),
        **shape,
        **flops,
        "flops_per_step": flops["flops_per_token"] * shape["tokens_per_step"],
        "flops_total": flops["flops_per_token"] * shape["tokens_total"],
    }
    if measure <= 0:
        return result
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = recipe.train.precision
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    lm = build_model(recipe)
    measured = measure_steps(recipe, lm, max_length, measure, device, dtype)
    local_tokens = recipe.train.batch_size * recipe.train.grad_accum * max_length
    tokens_per_s = local_tokens / measured["seconds_per_step"]
    achieved = flops["flops_per_token"] * tokens_per_s
    peak, peak_source = device_peak(device, dtype)
    hours = shape["steps"] * measured["seconds_per_step"] / 3600
    return (
        result
        | measured
        | {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "compute_dtype": str(dtype).removeprefix("torch."),
            "measured_steps": measure,
            "tokens_per_s": tokens_per_s,  # per process
            "achieved_flops": achieved,
            "peak_flops": peak,
            "peak_source": peak_source,
            "mfu": achieved / peak if peak else None,
            "projected_hours": hours,
            "device_hours": hours * processes,
        }
    )


def data_shape(recipe: TrainRecipe) -> tuple[int, int | None]:
    """(sequence length, sequences) of the recipe's data: from its prepared folder, else its recipe's length
    (sequences then unknown); SFT: its padded length."""
    from diffutron.config import load_config
    from diffutron.train.build import is_prepared

    if recipe.objective.kind == "sft":
        return recipe.sft.max_length, None
    folder = recipe.data.dataset
    if folder and is_prepared(Path(folder)):
        import json

        from datasets import load_from_disk

        data = load_from_disk(folder)
        length = len(data[0]["input_ids"])
        stats = Path(folder) / "stats.json"
        counted = json.loads(stats.read_text()).get("sequences") if stats.is_file() else None
        return length, counted or len(data)
    from diffutron.data.prepare import DataRecipe

    return load_config(DataRecipe, recipe.data.recipe).pack.max_length, None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"
