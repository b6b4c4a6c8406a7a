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
`DIFFUTRON_PACKED_HEAD=0` turns it off. The packed copy is used only where it computes the same
function: a plain `nn.Linear` with a plain `nn.Parameter` weight on the CPU in fp32 / bf16, no
autograd, no autocast.

The copy is a cache of the weight and must never be stale. A content fingerprint checked at every
call would catch any change, but it reads all 786 MB of the weight every time: measured beside the
calls (benchmarks/packed_head.py, docs/benchmarks.md) that costs a fifth to four fifths of the
packed call, which makes a lone row slower than F.linear. So the copy is keyed on what torch tracks
and dropped on the events that change the weight behind torch's back. It is rebuilt when, at a call,
- the weight is another object, or its data pointer, version counter, dtype or shape changed: every
  in-place change through the weight, a view of it or `detach()` (which share its version counter:
  optimizer steps, `load_state_dict`, `nn.init`, `copy_`) and every replacement (`.to()`,
  `param.data = x`, a new model);
and it is dropped (the memory freed at once) when
- the weight's `.data` is read or set: a write through `.data` does not move the version counter
  (peft's merge of a LoRA on the embeddings, which ModernBERT ties to the decoder, is
  `weight.data += delta`), so while a copy exists the weight wears the class `WatchedWeight` (the same
  object and tensor; a plain `nn.Parameter` again once the copy is dropped), whose `.data` drops it;
- a gradient is accumulated into the weight (backward): an optimizer step will follow;
- the weight is freed (its model replaced): nothing else holds it, the copy goes with it;
- `DiffusionLM.train()` or `.to()` / `.cuda()` / `.half()` (`_apply`) runs: training will change
  the weights, and moved weights leave the copy behind (model.py);
- the layer runs otherwise (autograd, autocast, on a GPU), or the ops fail.
Nothing else can change the weight's values as torch sees them. What torch itself cannot see is not
seen here either (nor by autograd's checks): writes through memory shared outside torch (a numpy
array or DLPack capsule of the weight, raw pointers), or through a `.data` alias kept across a build
of the copy. After such a write call `lm.drop_packed_decoder()`.

Weights created under `torch.inference_mode()` have no version counter, so in-place changes to them
could not be seen: they run F.linear, with one warning. If the ops are missing or fail, F.linear runs
from then on, with one warning naming the cause. Threads may share a model: a copy is built by one
thread at a time and published whole; a call uses the copy it found, never a half-built one.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

ENV = "DIFFUTRON_PACKED_HEAD"
PACKED_DTYPES = (torch.float32, torch.bfloat16)
ROWS_HINT = 16  # oneDNN picks its layout for this many rows (a block's masks); any row count can use it
_TENSOR_DATA = torch.Tensor.data  # the attribute `.data` of every tensor (a descriptor)


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


class WatchedWeight(nn.Parameter):
    """The class of a weight while a packed copy of it exists: reading or setting its `.data` drops the
    copies first (a write through `.data` does not move the version counter). A deep copy of it is a
    plain Parameter (so is a pickle, as of any Parameter subclass), and so is its repr."""

    @property
    def data(self) -> torch.Tensor:
        _weight_changed(self)
        return _TENSOR_DATA.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        _weight_changed(self)
        _TENSOR_DATA.__set__(self, value)

    def __deepcopy__(self, memo) -> nn.Parameter:
        copied = nn.Parameter(_TENSOR_DATA.__get__(self).clone(memory_format=torch.preserve_format), self.requires_grad)
        memo[id(self)] = copied
        return copied

    def __repr__(self) -> str:
        return "Parameter containing:\n" + repr(_TENSOR_DATA.__get__(self).requires_grad_(self.requires_grad))


# weight -> the PackedLinears holding a copy of it (weakly: a dropped model or weight leaves no trace)
_WATCHERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_WATCHERS_LOCK = threading.RLock()


def _weight_changed(weight: torch.Tensor) -> None:
    with _WATCHERS_LOCK:
        watchers = list(_WATCHERS.get(weight, ()))
    for watcher in watchers:
        watcher.drop()


class _Copy:
    """A packed copy, published whole: the weight it was made of (weakly), the key it was made at."""

    def __init__(self, weight: torch.Tensor, key: tuple, packed: torch.Tensor):
        self.weight, self.key, self.packed = weakref.ref(weight), key, packed

    def fits(self, weight: torch.Tensor, key: tuple) -> bool:
        return self.weight() is weight and self.key == key


def _key(weight: torch.Tensor) -> tuple:
    # the version counter moves with every in-place change; the data pointer with `.to()` and `param.data = ...`
    return (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))


class PackedLinear:
    """Applies a Linear through a packed copy of its weight where that is the same function, else as is."""

    def __init__(self):
        self._lock = threading.RLock()  # one thread builds or drops the copy at a time
        self._copy: _Copy | None = None
        self._watched: weakref.ref | None = None  # the weight whose `.data` and gradient drop the copy
        self._grad_hook = None
        self._changes = 0  # counts drops: a copy built while the weight changed is not published
        self.failure: str | None = None  # why the packed path is off for good (the ops are missing or failed)
        self._warned_inference = False

    # The packed copy is an opaque tensor that cannot be copied or pickled, and a cache besides:
    # a copy of the model (copy.deepcopy, pickle) starts without one and packs its own weight.
    def __deepcopy__(self, memo) -> PackedLinear:
        return PackedLinear()

    def __getstate__(self) -> dict:
        return {"failure": self.failure}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.failure = state["failure"]

    def __del__(self) -> None:
        if self._watched is not None:
            self._unwatch()  # a weight outliving its model is a plain Parameter again

    @property
    def packed(self) -> torch.Tensor | None:
        """The packed copy held now, if any."""
        copy = self._copy
        return copy.packed if copy is not None else None

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self._usable(layer, x):
            self.drop()  # the weight left the CPU or is training: free the copy
            return layer(x)
        try:
            return packed_linear(x, self._packed_weight(layer.weight), layer.bias)
        except (RuntimeError, AttributeError, NotImplementedError) as err:
            message = str(err).strip()
            self.failure = f"{type(err).__name__}: {message.splitlines()[0]}" if message else type(err).__name__
            self.drop()
            warnings.warn(
                f"the sampler's decoder runs F.linear from now on: its prepacked weight failed ({self.failure})",
                RuntimeWarning,
                stacklevel=2,
            )
            return layer(x)

    def drop(self) -> None:
        """Free the copy (if any) and stop watching its weight."""
        with self._lock:
            self._changes += 1
            self._copy = None
            self._unwatch()

    def _usable(self, layer: nn.Module, x: torch.Tensor) -> bool:
        if self.failure is not None or type(layer) is not nn.Linear or not enabled():
            return False  # off, or a LoRA-wrapped decoder: it runs as is
        weight = layer.weight
        if type(weight) not in (nn.Parameter, WatchedWeight):
            return False
        if weight.is_inference():
            if not self._warned_inference:
                self._warned_inference = True
                warnings.warn(
                    "the sampler's decoder runs F.linear, not a prepacked copy: its weight was created under "
                    "torch.inference_mode() and has no version counter, so a change to it could not be seen "
                    "(load the model outside inference mode for the faster decoder)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return False
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
        copy = self._copy  # read once: another thread may publish or drop meanwhile
        if copy is not None and copy.fits(weight, _key(weight)):
            return copy.packed
        with self._lock:
            copy = self._copy
            if copy is not None and copy.fits(weight, _key(weight)):
                return copy.packed  # another thread built it while this one waited
            self.drop()  # free the stale copy before building the new one: one copy in memory at a time
            self._watch(weight)  # from here on a write through `.data` is seen, even one during the packing
            changes, key = self._changes, _key(weight)
            packed = pack(weight)
            if self._changes == changes:
                self._copy = _Copy(weight, key, packed)
            return packed

    def _watch(self, weight: torch.Tensor) -> None:
        owner = weakref.ref(self)  # the weight must not keep this object (and its copy) alive

        def changed(_=None) -> None:
            if (watcher := owner()) is not None:
                watcher.drop()

        with _WATCHERS_LOCK:
            _WATCHERS.setdefault(weight, weakref.WeakSet()).add(self)
            weight.__class__ = WatchedWeight
        self._watched = weakref.ref(weight, changed)  # a weight gone (a new model) takes its copy with it
        if weight.requires_grad:
            self._grad_hook = weight.register_post_accumulate_grad_hook(changed)

    def _unwatch(self) -> None:
        watched, self._watched = self._watched, None
        if self._grad_hook is not None:
            self._grad_hook.remove()
            self._grad_hook = None
        weight = watched() if watched is not None else None
        if weight is None:
            return
        with _WATCHERS_LOCK:
            watchers = _WATCHERS.get(weight)
            if watchers is not None:
                watchers.discard(self)
                if not watchers:
                    del _WATCHERS[weight]
                    if type(weight) is WatchedWeight:  # (torch.utils.swap_tensors may have moved it on)
                        weight.__class__ = nn.Parameter
