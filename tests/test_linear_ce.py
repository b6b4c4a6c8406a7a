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
