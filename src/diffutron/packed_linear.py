"""A Linear's weight prepacked by oneDNN for CPU inference: the vocabulary decoder of a sampling step.

A sampling step multiplies a handful of hidden states (a block's masks) by the 256k x 768 decoder:
a skinny product whose time goes to walking the weight. torch's `F.linear` gives it to a GEMM that
reads the weight in its stored layout; oneDNN's inner product with the weight reordered once into
its own blocked layout runs it 3x faster at 16 rows on the test CPU (benchmarks/packed_head.py), and
each row's logits no longer depend on how many rows share the call (F.linear's do, below 16 rows):
a request's tokens are the same alone or in company. These are the ops PyTorch's inductor uses when
it freezes a CPU model (`mkldnn::_reorder_linear_weight`, `mkldnn::_linear_pointwise`).

The price is a second copy of the weight (the embedding lookup needs the plain one, tied to it):
786 MB for mmBERT-base in fp32, repaid by the sampler's hundreds of calls of a few rows each; for
one-shot or large-batch work (fill-mask, PPL@15%, the ELBO) it costs memory for little
(docs/benchmarks.md), so only the sampler asks for it (`DiffusionLM.head(..., packed_decoder=True)`).
`DIFFUTRON_PACKED_HEAD=0` turns it off.
The packed copy is used only where it computes the same function: a plain `nn.Linear` on the CPU in
fp32 / bf16, no autograd, no autocast; it is rebuilt whenever the weight changes (a training step,
`.to()`, loading weights), freed when the layer runs otherwise (training, on a GPU), and if the ops
are missing or fail, `F.linear` runs instead, for good.
"""

from __future__ import annotations

import os

import torch
from torch import nn

ENV = "DIFFUTRON_PACKED_HEAD"
PACKED_DTYPES = (torch.float32, torch.bfloat16)
ROWS_HINT = 16  # oneDNN picks its layout for this many rows (a block's masks); any row count can use it


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] in oneDNN's blocked layout (an opaque mkldnn tensor)."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ weight.T + bias with the packed weight."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _bf16_supported() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


class PackedLinear:
    """Applies a Linear through a packed copy of its weight where that is the same function, else as is."""

    def __init__(self):
        self._key: tuple | None = None
        self._packed: torch.Tensor | None = None
        self.broken = False  # the ops are missing or failed once: F.linear from now on

    # The packed copy is an opaque tensor that cannot be copied or pickled, and a cache besides:
    # a copy of the model (copy.deepcopy, pickle) starts without one and packs its own weight.
    def __deepcopy__(self, memo) -> PackedLinear:
        return PackedLinear()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_key": None, "_packed": None}

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self._usable(layer, x):
            self._key, self._packed = None, None  # the weight left the CPU or is training: free the copy
            return layer(x)
        try:
            return packed_linear(x, self._packed_weight(layer.weight), layer.bias)
        except (RuntimeError, AttributeError, NotImplementedError):
            self.broken, self._key, self._packed = True, None, None
            return layer(x)

    def _usable(self, layer: nn.Module, x: torch.Tensor) -> bool:
        if self.broken or type(layer) is not nn.Linear or not enabled():  # a LoRA-wrapped decoder runs as is
            return False
        weight = layer.weight
        return (
            weight.device.type == "cpu"
            and x.device.type == "cpu"
            and weight.dtype in PACKED_DTYPES
            and x.dtype == weight.dtype
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available()
            and (weight.dtype != torch.bfloat16 or _bf16_supported())
        )

    def _packed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # the version counter moves with every in-place change (optimizer step, load_state_dict, copy_);
        # the data pointer with `.to()` and `param.data = ...`
        key = (id(weight), weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
        if key != self._key:
            self._packed, self._key = None, None  # free the stale copy before building the new one
            self._packed, self._key = pack(weight), key
        return self._packed
