"""The precision a model runs inference in: `--dtype auto|fp32|bf16`, and the rule behind `auto`.

`auto`: bf16 on CUDA; on a CPU, bf16 only where the processor has bf16 matrix instructions (AVX512-BF16
or AMX, as torch's cpuinfo reports them) *and* a quick timing at load finds bf16 faster; else fp32.
Without those instructions a bf16 product is emulated (the bf16 values widened to fp32 in software),
and it ran slower than fp32 on an AVX2 CPU (docs/benchmarks.md); where they exist, a step at batch 1
reads half the bytes of weights, and it ran 2x faster on an Intel Xeon with AMX (issue 23).

The timing: a product of the model's widest encoder linear on `PROBE_ROWS` hidden states (a block's
masks, as a sampling step runs it) in fp32 and in bf16, random values of the model's shape,
`PROBE_ROUNDS` alternating rounds (the order swapping each round, so a drifting load weighs on both),
each round timing `PROBE_CALLS` calls; bf16 is chosen when the fp32 median is at least `MIN_SPEEDUP`
times the bf16 one. It stops early past `PROBE_BUDGET_S` of timing and decides on the rounds it has.
Its result is kept per process (per shape and thread count): one check, however many models load.
Training does not use this: its precision is its own setting (config.py).
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
from torch import nn

from diffutron.errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHOICES = ("auto", *DTYPES)
# names the Python API and the harness's model args accept besides the CLI's (no `auto` needed there)
ALIASES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

PROBE_ROWS = 32
PROBE_ROUNDS = 5
PROBE_CALLS = 3
PROBE_BUDGET_S = 0.5
MIN_SPEEDUP = 1.1  # a margin over timing noise: bf16 must be clearly faster, not tied


def parse(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """A torch dtype, "auto", or None (the default) from what a user wrote; a one-line error otherwise."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name in DTYPES or name in ALIASES:
        return DTYPES.get(name) or ALIASES[name]
    raise UsageError(f"unknown dtype {dtype!r}: choose {', '.join(CHOICES)}")


def name_of(dtype: torch.dtype) -> str:
    """The short name of a dtype, as `--dtype` spells it: fp32, bf16 (fp16; others as torch names them)."""
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return short.get(dtype, str(dtype).removeprefix("torch."))


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix instructions: AVX512-BF16 or AMX (torch's cpuinfo; x86 only)."""
    cpu = torch.cpu
    checks = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
    return any(bool(check()) for check in checks if check is not None)


def auto_dtype(device: torch.device, has_bf16_matmul, bf16_faster) -> torch.dtype:
    """The rule of `auto`. `has_bf16_matmul()` and `bf16_faster()` are asked only when needed, in that
    order: a CPU without the instructions costs no timing."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and has_bf16_matmul() and bf16_faster():
        return torch.bfloat16
    return torch.float32


def resolve(dtype: str | torch.dtype | None, device: torch.device, model: nn.Module | None = None) -> torch.dtype:
    """The dtype to load in: a dtype as given; None: the library's default (bf16 on CUDA, else fp32);
    "auto": the rule above, timing `model`'s widest encoder linear when the rule gets that far."""
    dtype = parse(dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = widest_linear(model) if model is not None else (768, 2304)  # the mmBERT-base MLP's
    return auto_dtype(device, cpu_has_bf16_matmul, lambda: bf16_speedup(*shape) >= MIN_SPEEDUP)


def widest_linear(model: nn.Module) -> tuple[int, int]:
    """(in, out) of the largest nn.Linear under `model` other than a vocabulary decoder (the probe must
    stay small: a 256k-row decoder would make the check cost what it decides about)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    shapes = [
        tuple(m.weight.shape[::-1])
        for m in model.modules()
        if isinstance(m, nn.Linear) and m.weight.device.type != "meta" and m.out_features != vocab
    ]
    return max(shapes, key=lambda s: s[0] * s[1], default=(768, 2304))


def bf16_speedup(in_features: int, out_features: int) -> float:
    """fp32 time over bf16 time of a `PROBE_ROWS`-row product with an [out, in] weight on this CPU (the
    median of alternating rounds); > 1: bf16 is faster. Kept per process, shape and thread count."""
    return _bf16_speedup(in_features, out_features, torch.get_num_threads())


@functools.cache
def _bf16_speedup(in_features: int, out_features: int, threads: int) -> float:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(PROBE_ROWS, in_features, generator=generator)
    operands = {torch.float32: (x, weight), torch.bfloat16: (x.bfloat16(), weight.bfloat16())}
    times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    with torch.no_grad():
        for a, w in operands.values():  # warm-up: the kernels' first-call costs
            torch.nn.functional.linear(a, w)
        started = time.perf_counter()
        for round_ in range(PROBE_ROUNDS):
            order = list(operands) if round_ % 2 == 0 else list(operands)[::-1]
            for dtype in order:
                a, w = operands[dtype]
                begin = time.perf_counter()
                for _ in range(PROBE_CALLS):
                    torch.nn.functional.linear(a, w)
                times[dtype].append(time.perf_counter() - begin)
            if time.perf_counter() - started > PROBE_BUDGET_S:
                break
    return statistics.median(times[torch.float32]) / statistics.median(times[torch.bfloat16])
