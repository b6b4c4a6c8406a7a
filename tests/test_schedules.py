import math

import pytest
import torch

from diffutron.schedules import COSINE, LINEAR, get_schedule, sample_times

T = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)


def test_linear_schedule_is_analytic():
    assert torch.allclose(LINEAR.alpha(T), 1 - T)
    assert torch.allclose(LINEAR.mask_prob(T), T)
    assert torch.allclose(LINEAR.elbo_weight(T), 1 / T)


def test_cosine_schedule_matches_its_formula_and_derivative():
    assert torch.allclose(COSINE.alpha(T), torch.cos(math.pi * T / 2))
    t = T.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(COSINE.alpha(t).sum(), t)
    assert torch.allclose(COSINE.alpha_prime(T), grad)
    expected = (math.pi / 2) * torch.sin(math.pi * T / 2) / (1 - torch.cos(math.pi * T / 2))
    assert torch.allclose(COSINE.elbo_weight(T), expected)


@pytest.mark.parametrize("schedule", [LINEAR, COSINE])
def test_schedules_go_from_clean_to_all_masked(schedule):
    ends = schedule.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(ends, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12)
    assert (schedule.alpha(T).diff() < 0).all()


def test_sample_times_range_and_antithetic_spacing():
    g = torch.Generator().manual_seed(0)
    t = sample_times(1000, eps=1e-3, generator=g)
    assert t.min() >= 1e-3 and t.max() < 1
    a = sample_times(8, eps=0.0, antithetic=True, generator=g).sort().values
    assert torch.allclose(a.diff(), torch.full((7,), 1 / 8), atol=1e-6)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="linear"):
        get_schedule("quadratic")
