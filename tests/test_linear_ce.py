import pytest
import torch
import torch.nn.functional as F

from diffutron.linear_ce import linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("train_weight", [False, True])
def test_values_and_gradients_equal_the_dense_reference(chunk, train_weight):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(23, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=train_weight)
    bias = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=train_weight)
    targets = torch.randint(50, (23,), generator=g)
    upstream = torch.rand(23, generator=g, dtype=torch.float64)  # per-token weights, as the MDLM loss has

    fast = linear_cross_entropy(z, weight, bias, targets, chunk)
    dense = F.cross_entropy(z @ weight.T + bias, targets, reduction="none")
    torch.testing.assert_close(fast, dense)
    inputs = [z, weight, bias] if train_weight else [z]
    fast_grads = torch.autograd.grad((fast * upstream).sum(), inputs)
    dense_grads = torch.autograd.grad((dense * upstream).sum(), inputs)
    for a, b in zip(fast_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_no_positions():
    z = torch.zeros(0, 4, requires_grad=True)
    assert linear_cross_entropy(z, torch.zeros(3, 4), torch.zeros(3), torch.zeros(0, dtype=torch.long)).shape == (0,)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


AUTOCAST_CASES = [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.mark.parametrize("device, dtype", AUTOCAST_CASES)
@pytest.mark.parametrize("backward_inside", [False, True])
def test_autocast_matches_fp32_with_trainable_weight(device, dtype, backward_inside):
    """Full fine-tuning under autocast; PyTorch's recommended pattern runs backward() outside the
    autocast region, where the recomputed chunks must still see the forward's dtypes."""
    g = torch.Generator().manual_seed(0)
    hidden, vocab, n = 32, 300, 41
    x = torch.randn(n, hidden, generator=g).to(device)
    layer = torch.nn.Linear(hidden, hidden).to(device)  # makes z low-precision under autocast, as the head does
    weight = torch.nn.Parameter((torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device))
    bias = torch.nn.Parameter((torch.randn(vocab, generator=g) * 0.1).to(device))
    targets = torch.randint(vocab, (n,), generator=g).to(device)
    params = [layer.weight, weight, bias]

    dense = F.cross_entropy(F.linear(layer(x), weight, bias), targets, reduction="none")
    dense_grads = torch.autograd.grad(dense.mean(), params)
    with torch.autocast(device, dtype=dtype):
        fast = linear_cross_entropy(layer(x), weight, bias, targets, chunk=8)
        loss = fast.mean()
        if backward_inside:
            fast_grads = torch.autograd.grad(loss, params)
    if not backward_inside:
        fast_grads = torch.autograd.grad(loss, params)
    assert fast.dtype == torch.float32
    assert _relative_error(fast, dense) < 2e-2
    for name, a, b in zip(("z", "weight", "bias"), fast_grads, dense_grads, strict=True):
        assert a.dtype == b.dtype == torch.float32, name
        assert _relative_error(a, b) < 3e-2, name
