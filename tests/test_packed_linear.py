"""The packed decoder computes what F.linear computes, is rebuilt when the weight changes, and steps
aside wherever it would not be the same function."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffutron import packed_linear
from diffutron.model import DiffusionLM
from diffutron.packed_linear import PackedLinear
from diffutron.sampling import generate


def _layer(out=3000, inp=96, bias=True, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(inp, out, bias=bias).to(dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1,), (16,), (37,), (2, 5)])
def test_equals_f_linear_in_fp32(shape, bias):
    layer, packed = _layer(bias=bias), PackedLinear()
    x = torch.randn(*shape, 96)
    with torch.no_grad():
        got = packed(layer, x)
    assert packed._packed is not None  # the packed path ran, not the fallback
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_equals_f_linear_in_bf16():
    layer, packed = _layer(dtype=torch.bfloat16), PackedLinear()
    x = torch.randn(16, 96).bfloat16()
    with torch.no_grad():
        got = packed(layer, x)
    reference = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    # bf16 outputs: one rounding of the fp32-accumulated result, as F.linear's
    torch.testing.assert_close(got.double(), reference, atol=2e-2, rtol=1e-2)


def test_a_rows_logits_do_not_depend_on_the_other_rows():
    layer, packed = _layer(out=8192, inp=256), PackedLinear()
    x = torch.randn(64, 256)
    with torch.no_grad():
        together = packed(layer, x)
        for rows in (1, 2, 7, 16, 33):
            assert torch.equal(packed(layer, x[:rows]), together[:rows])


def test_rebuilt_when_the_weight_changes_in_place_or_is_replaced():
    layer, packed = _layer(), PackedLinear()
    x = torch.randn(4, 96)
    with torch.no_grad():
        packed(layer, x)
        layer.weight.mul_(2)  # an optimizer step, load_state_dict
        torch.testing.assert_close(packed(layer, x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        layer.weight.data = torch.randn_like(layer.weight)  # .to(), swapped weights
        torch.testing.assert_close(packed(layer, x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_autograd_gets_the_plain_linear_and_the_copy_is_freed():
    layer, packed = _layer(), PackedLinear()
    x = torch.randn(4, 96)
    with torch.no_grad():
        packed(layer, x)
    out = packed(layer, x)  # training between two samplings: the weight will change anyway
    out.sum().backward()
    assert packed._packed is None and layer.weight.grad is not None


def test_autocast_gets_the_plain_linear():
    layer, packed = _layer(), PackedLinear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed(layer, torch.randn(4, 96))
    assert packed._packed is None and out.dtype == torch.bfloat16


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(packed_linear.ENV, "0")
    layer, packed = _layer(), PackedLinear()
    with torch.no_grad():
        packed(layer, torch.randn(4, 96))
    assert packed._packed is None


def test_falls_back_to_f_linear_for_good_when_the_ops_fail(monkeypatch):
    def missing(weight):
        raise RuntimeError("mkldnn ops not built")

    monkeypatch.setattr(packed_linear, "pack", missing)
    layer, packed = _layer(), PackedLinear()
    x = torch.randn(4, 96)
    with torch.no_grad():
        torch.testing.assert_close(packed(layer, x), F.linear(x, layer.weight, layer.bias))
    assert packed.broken


def test_the_head_packs_only_when_asked_and_gives_the_same_logits(tiny_lm):
    lm = DiffusionLM(tiny_lm.model, tiny_lm.tokenizer)  # its own decoder cache
    hidden = torch.randn(5, lm.hf_model.config.hidden_size)
    with torch.no_grad():
        plain = lm.head(hidden)
        assert lm._decoder._packed is None  # eval, fill-mask, the ELBO: no second copy of the weight
        packed = lm.head(hidden, packed_decoder=True)
    assert lm._decoder._packed is not None
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)


def test_the_sampler_runs_the_packed_decoder(tiny_lm):
    lm = DiffusionLM(tiny_lm.model, tiny_lm.tokenizer)
    generate(lm, "Bugün hava", max_new_tokens=4)
    assert lm._decoder._packed is not None


def test_a_model_that_packed_can_be_copied_and_pickled(tiny_lm):
    lm = DiffusionLM(tiny_lm.model, tiny_lm.tokenizer)
    first = generate(lm, "Bugün hava", max_new_tokens=4).token_ids
    twin = copy.deepcopy(lm)  # an EMA, a frozen reference: the packed copy is an opaque tensor
    assert twin._decoder._packed is None
    assert generate(twin, "Bugün hava", max_new_tokens=4).token_ids == first
    assert pickle.loads(pickle.dumps(lm._decoder))._packed is None
