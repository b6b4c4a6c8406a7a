"""The packed decoder computes what F.linear computes, is rebuilt or freed whenever the weight changes
or moves (peft's merge included), is safe under threads, and steps aside wherever it would not be the
same function -- never silently."""

import copy
import gc
import pickle
import threading
import time
import warnings

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
    assert packed.packed is not None  # the packed path ran, not the fallback
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 16, 37])
def test_equals_f_linear_in_bf16(rows):
    layer, packed = _layer(dtype=torch.bfloat16), PackedLinear()
    x = torch.randn(rows, 96).bfloat16()
    with torch.no_grad():
        got = packed(layer, x)
        plain = F.linear(x, layer.weight, layer.bias)  # what the model's nn.Linear computes in bf16
    # packed where oneDNN has bf16 on this CPU (avx512_bf16 / AMX), else F.linear itself
    assert (packed.packed is not None) == packed_linear._bf16_supported() and got.dtype == torch.bfloat16
    # both are one bf16 rounding of an fp32-accumulated sum: equal, or one bf16 step (2**-8 relative) apart
    # where the two sums round to neighbouring bf16 values
    torch.testing.assert_close(got, plain, atol=1e-6, rtol=2**-7)
    assert (got == plain).float().mean() > 0.95
    reference = F.linear(x.double(), layer.weight.double(), layer.bias.double())
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
    assert packed.packed is None and layer.weight.grad is not None


def test_autocast_gets_the_plain_linear():
    layer, packed = _layer(), PackedLinear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed(layer, torch.randn(4, 96))
    assert packed.packed is None and out.dtype == torch.bfloat16


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(packed_linear.ENV, "0")
    layer, packed = _layer(), PackedLinear()
    with torch.no_grad():
        packed(layer, torch.randn(4, 96))
    assert packed.packed is None


def test_falls_back_to_f_linear_for_good_when_the_ops_fail_and_says_why_once(monkeypatch):
    def missing(weight):
        raise RuntimeError("mkldnn ops not built")

    monkeypatch.setattr(packed_linear, "pack", missing)
    layer, packed = _layer(), PackedLinear()
    x = torch.randn(4, 96)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="F.linear from now on.*mkldnn ops not built") as caught:
        for _ in range(3):
            torch.testing.assert_close(packed(layer, x), F.linear(x, layer.weight, layer.bias))
    assert len(caught) == 1 and packed.failure == "RuntimeError: mkldnn ops not built"
    assert type(layer.weight) is nn.Parameter  # nothing left watched


def test_weights_made_in_inference_mode_run_f_linear_with_one_warning():
    """Inference tensors have no version counter (reading it raises): the copy could not see in-place
    changes, so F.linear runs -- said once, and the packed path stays on for other weights."""
    with torch.inference_mode():
        layer = _layer()
    packed = PackedLinear()
    x = torch.randn(4, 96)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="inference_mode") as caught:
        for _ in range(2):
            with torch.inference_mode():
                torch.testing.assert_close(packed(layer, x), F.linear(x, layer.weight, layer.bias))
    assert len(caught) == 1 and packed.packed is None and packed.failure is None
    plain = _layer()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        packed(plain, x)
    assert packed.packed is not None


def test_the_head_packs_only_when_asked_and_gives_the_same_logits(tiny_lm):
    lm = DiffusionLM(tiny_lm.model, tiny_lm.tokenizer)  # its own decoder cache
    hidden = torch.randn(5, lm.hf_model.config.hidden_size)
    with torch.no_grad():
        plain = lm.head(hidden)
        assert lm._decoder.packed is None  # eval, fill-mask, the ELBO: no second copy of the weight
        packed = lm.head(hidden, packed_decoder=True)
    assert lm._decoder.packed is not None
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)


def test_the_sampler_runs_the_packed_decoder(tiny_lm):
    lm = DiffusionLM(tiny_lm.model, tiny_lm.tokenizer)
    generate(lm, "Bugün hava", max_new_tokens=4)
    assert lm._decoder.packed is not None


def test_in_bf16_the_sampler_packs_where_onednn_has_bf16_else_runs_f_linear(tiny_lm):
    """A bf16 model: the head's logits with and without the packed decoder agree as bf16 products do (see
    test_equals_f_linear_in_bf16), and the sampler runs it packed where oneDNN has bf16 on this CPU (AVX-512,
    AMX), else F.linear from the start: no failure recorded, no warning."""
    lm = DiffusionLM(copy.deepcopy(tiny_lm.model).bfloat16(), tiny_lm.tokenizer)
    hidden = torch.randn(5, lm.hf_model.config.hidden_size).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            plain = lm.head(hidden)
            packed = lm.head(hidden, packed_decoder=True)
        ids = generate(lm, "Bugün hava", max_new_tokens=4).token_ids[0]
    torch.testing.assert_close(packed, plain, atol=1e-6, rtol=2**-7)
    assert (lm._decoder.packed is not None) == packed_linear._bf16_supported() and lm._decoder.failure is None
    assert len(ids) <= 4 and lm.mask_id not in ids


def test_a_model_that_packed_can_be_copied_and_pickled(tiny_lm):
    lm = DiffusionLM(tiny_lm.model, tiny_lm.tokenizer)
    first = generate(lm, "Bugün hava", max_new_tokens=4).token_ids
    twin = copy.deepcopy(lm)  # an EMA, a frozen reference: the packed copy is an opaque tensor
    assert twin._decoder.packed is None
    assert generate(twin, "Bugün hava", max_new_tokens=4).token_ids == first
    assert pickle.loads(pickle.dumps(lm._decoder)).packed is None


def _same_as_f_linear(packed: PackedLinear, layer: nn.Linear, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(packed(layer, x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_writes_through_data_are_seen():
    """`.data` gives an alias with its own version counter: writes through it leave the weight's
    `_version`, data pointer and id as they were."""
    layer, packed = _layer(), PackedLinear()
    x = torch.randn(4, 96)
    _same_as_f_linear(packed, layer, x)
    assert type(layer.weight) is packed_linear.WatchedWeight  # watched while a copy exists
    layer.weight.data += 1.0  # peft's merge
    assert packed.packed is None and type(layer.weight) is nn.Parameter  # dropped at once, plain again
    _same_as_f_linear(packed, layer, x)
    layer.weight.data.copy_(torch.randn_like(layer.weight))  # an EMA's copy
    _same_as_f_linear(packed, layer, x)
    layer.weight.data.mul_(0.5)
    _same_as_f_linear(packed, layer, x)


def test_a_weight_freed_takes_its_copy_with_it():
    layer, packed = _layer(), PackedLinear()
    _same_as_f_linear(packed, layer, torch.randn(2, 96))
    assert packed.packed is not None
    del layer  # a model replaced: the copy must not keep its memory
    gc.collect()
    assert packed.packed is None


def test_a_watched_weight_looks_and_copies_like_a_plain_parameter():
    layer, packed = _layer(), PackedLinear()
    plain_repr = repr(layer.weight)
    _same_as_f_linear(packed, layer, torch.randn(2, 96))
    assert isinstance(layer.weight, nn.Parameter) and repr(layer.weight) == plain_repr
    twin = copy.deepcopy(layer)
    assert type(twin.weight) is nn.Parameter and torch.equal(twin.weight, layer.weight)
    assert type(pickle.loads(pickle.dumps(layer)).weight) is nn.Parameter


def _tiny_lm():
    return DiffusionLM.from_pretrained("preset:tiny", device="cpu", seed=0)


def test_a_peft_merge_of_a_lora_on_the_tied_embeddings_is_seen():
    """ModernBERT ties its decoder to the token embeddings; peft merges a LoRA on the embeddings with
    `base_layer.weight.data += delta` (the version counter does not move): sample, merge_and_unload(),
    sample again must use the merged decoder."""
    from peft import LoraConfig, get_peft_model

    lm = _tiny_lm()
    decoder, embeddings = lm.hf_model.decoder, lm.hf_model.model.embeddings.tok_embeddings
    assert decoder.weight is embeddings.weight  # tied
    hidden = torch.randn(6, lm.hf_model.config.hidden_size)
    with torch.no_grad():
        before = lm.head(hidden, packed_decoder=True)
    generate(lm, "Bugün hava", max_new_tokens=4)
    # init_lora_weights=False: a LoRA with a nonzero delta, as after training
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["tok_embeddings"], init_lora_weights=False)
    lm.model = get_peft_model(lm.model, config)
    lm.model.merge_adapter()  # merged in place, LoRA layers kept
    with torch.no_grad():
        torch.testing.assert_close(lm.head(hidden, packed_decoder=True), lm.head(hidden), atol=2e-4, rtol=1e-4)
    lm.model.unmerge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(lm.head(hidden, packed_decoder=True), before, atol=2e-4, rtol=1e-4)
    lm.model = lm.model.merge_and_unload()
    with torch.no_grad():
        after, plain = lm.head(hidden, packed_decoder=True), lm.head(hidden)
    assert (after - before).abs().max() > 0.1  # the merge changed the decoder
    torch.testing.assert_close(after, plain, atol=2e-4, rtol=1e-4)  # merged logits are larger: float rounding
    fresh = DiffusionLM(lm.model, lm.tokenizer)  # a model that never held a copy
    assert (
        generate(lm, "Bugün hava", max_new_tokens=4).token_ids
        == generate(fresh, "Bugün hava", max_new_tokens=4).token_ids
    )


def test_the_copy_is_freed_when_training_starts_or_the_weights_move():
    """Training never calls the sampler's head, so the copy must go on the events themselves."""
    lm = _tiny_lm()
    decoder = lm.hf_model.decoder

    def sampled() -> None:
        generate(lm, "Bugün hava", max_new_tokens=2)
        assert lm._decoder.packed is not None and type(decoder.weight) is packed_linear.WatchedWeight

    sampled()
    lm.train()
    assert lm._decoder.packed is None and type(decoder.weight) is nn.Parameter
    lm.eval()
    sampled()
    lm.eval()  # evaluation mode changes no weight: the copy stays
    assert lm._decoder.packed is not None
    optimizer = torch.optim.SGD(lm.parameters(), lr=0.1)
    loss = lm.head(torch.randn(3, lm.hf_model.config.hidden_size)).logsumexp(dim=-1).sum()
    loss.backward()  # a gradient reached the weight: a step will change it
    assert lm._decoder.packed is None and type(decoder.weight) is nn.Parameter
    optimizer.step()
    sampled()
    lm.to(torch.float64)  # .to(), .cuda(), .half()
    assert lm._decoder.packed is None and type(decoder.weight) is nn.Parameter
    lm.to(torch.float32)
    sampled()
    lm.drop_packed_decoder()
    assert lm._decoder.packed is None and type(decoder.weight) is nn.Parameter


def test_two_threads_sampling_one_model_get_what_one_thread_gets():
    lm = _tiny_lm()
    prompts = ["Bugün hava", "Türkiye'nin başkenti"]
    alone = [generate(lm, p, max_new_tokens=4).token_ids for p in prompts]
    lm.drop_packed_decoder()  # both threads start without a copy
    results: dict[int, list] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [
            threading.Thread(
                target=lambda k=k: results.update({k: [generate(lm, p, max_new_tokens=4).token_ids for p in prompts]})
            )
            for k in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == {0: alone, 1: alone} and not caught and lm._decoder.failure is None


def test_concurrent_callers_pack_once_and_never_see_a_half_built_copy(monkeypatch):
    """A slow packing (as for 786 MB) with callers on two threads while the weight changes: each
    version of the weight is packed once, every call returns the current weight's logits, nothing
    switches off."""
    builds = []
    real_pack = packed_linear.pack

    def slow_pack(weight):
        builds.append(weight._version)
        time.sleep(0.05)
        return real_pack(weight)

    monkeypatch.setattr(packed_linear, "pack", slow_pack)
    layer, packed = _layer(), PackedLinear()
    x = torch.randn(4, 96)
    errors = []

    def caller() -> None:
        for _ in range(5):
            with torch.no_grad():
                got = packed(layer, x)
                expected = F.linear(x, layer.weight, layer.bias)
            if not torch.allclose(got, expected, atol=1e-5, rtol=1e-5):
                errors.append("stale or torn logits")

    for _ in range(3):
        threads = [threading.Thread(target=caller) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with torch.no_grad():
            layer.weight.mul_(1.5)  # between rounds: a new version
    assert not errors and packed.failure is None
    assert len(builds) == 3 and len(set(builds)) == 3  # one build per version, not one per thread
