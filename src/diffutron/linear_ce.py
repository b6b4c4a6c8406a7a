"""Cross-entropy through the vocabulary projection, chunked, without keeping [N, V] logits.

`linear_cross_entropy(z, weight, bias, targets)` = per-row CE of `z @ weight.T + bias` against
`targets`. Each row's CE depends only on its own z_i, so the forward pass computes, chunk by chunk,
both the CE and d CE_i / d z_i = (softmax_i - onehot_i) @ W, and keeps only the latter ([N, H], small);
the backward pass scales it by the incoming gradient. The decoder matmul thus runs twice (logits,
then the gradient) instead of three times with activation checkpointing, and the [N, V] logits never
outlive their chunk. When the weight or bias trains (full fine-tuning) their gradients need the
incoming gradient, so the backward pass recomputes each chunk's softmax for them.

Under autocast the matmuls run in the autocast dtype (bf16 / fp16) and the softmax in fp32. The
backward pass runs under the forward's autocast state (torch.amp.custom_bwd), wherever `backward()`
is called: PyTorch's recommended pattern calls it outside the autocast region, and the recomputed
chunks must see the same dtypes as in the forward pass.
"""

from __future__ import annotations

import functools

import torch


def _chunk_probs_minus_onehot(z: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor):
    logits = torch.nn.functional.linear(z, weight, bias)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits  # softmax in >= fp32
    lse = logits.logsumexp(dim=-1)
    ce = lse - logits.gather(1, targets[:, None]).squeeze(1)
    probs = logits.sub_(lse[:, None]).exp_()
    probs[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return ce, probs


@functools.cache
def _function_for(device_type: str) -> type[torch.autograd.Function]:
    """The autograd function for tensors on `device_type` (custom_fwd/custom_bwd take a device type)."""

    class _LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        @torch.amp.custom_fwd(device_type=device_type)
        def forward(ctx, z, weight, bias, targets, chunk: int):
            ces, unit_grads = [], []
            for zc, tc in zip(z.split(chunk), targets.split(chunk), strict=True):
                ce, dlogits = _chunk_probs_minus_onehot(zc, weight, bias, tc)
                ces.append(ce)
                if ctx.needs_input_grad[0]:
                    unit_grads.append(dlogits.to(weight.dtype) @ weight)
            ctx.chunk = chunk
            unit = torch.cat(unit_grads) if unit_grads else None
            ctx.save_for_backward(z, weight, bias, targets, unit)
            return torch.cat(ces) if ces else z.new_zeros(0, dtype=torch.promote_types(z.dtype, torch.float32))

        @staticmethod
        @torch.amp.custom_bwd(device_type=device_type)
        def backward(ctx, grad_ce):
            z, weight, bias, targets, unit = ctx.saved_tensors
            grad_z = (grad_ce[:, None] * unit).to(z.dtype) if ctx.needs_input_grad[0] else None
            grad_w = grad_b = None
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                accumulate = torch.promote_types(weight.dtype, torch.float32)
                grad_w = torch.zeros_like(weight, dtype=accumulate) if ctx.needs_input_grad[1] else None
                grad_b = torch.zeros_like(bias, dtype=accumulate) if ctx.needs_input_grad[2] else None
                pieces = zip(z.split(ctx.chunk), targets.split(ctx.chunk), grad_ce.split(ctx.chunk), strict=True)
                for zc, tc, gc in pieces:
                    _, dlogits = _chunk_probs_minus_onehot(zc, weight, bias, tc)
                    dlogits.mul_(gc[:, None])
                    if grad_w is not None:
                        grad_w += dlogits.T @ zc.to(accumulate)
                    if grad_b is not None:
                        grad_b += dlogits.sum(dim=0)
                grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
                grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
            return grad_z, grad_w, grad_b, None, None

    return _LinearCrossEntropy


def linear_cross_entropy(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """Per-row cross-entropy [N] of the logits z @ weight.T + bias, never materialising [N, V]."""
    return _function_for(z.device.type).apply(z, weight, bias, targets, chunk)
