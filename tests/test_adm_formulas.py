"""fastddpm.objectives' variational-bound functions and schedule.vlb_tables against float64
formulas written here (Nichol & Dhariwal 2021; Ho et al. 2020), independent of the library."""
import math

import numpy as np
import torch

from fastddpm import objectives, schedule


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_normal_kl():
    m1, lv1, m2, lv2 = _rand(50, seed=1), _rand(50, seed=2), _rand(50, seed=3), _rand(50, seed=4)
    want = [0.5 * (-1 + b - a + math.exp(a - b) + (c - d) ** 2 * math.exp(-b))
            for c, a, d, b in zip(m1.tolist(), lv1.tolist(), m2.tolist(), lv2.tolist())]
    torch.testing.assert_close(objectives.normal_kl(m1, lv1, m2, lv2), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-13, atol=1e-13)


def _cdf(x):
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def test_discretized_gaussian_log_likelihood():
    x = torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.0, 0.5, -0.2, 0.9, -0.999, 0.999], dtype=torch.float64)
    mean = _rand(10, seed=5, scale=0.5)
    log_scale = _rand(10, seed=6, scale=0.5) - 2
    want = []
    for xi, m, ls in zip(x.tolist(), mean.tolist(), log_scale.tolist()):
        inv = math.exp(-ls)
        plus, minus = _cdf(inv * (xi - m + 1 / 255)), _cdf(inv * (xi - m - 1 / 255))
        if xi < -0.999:
            want.append(math.log(max(plus, 1e-12)))
        elif xi > 0.999:
            want.append(math.log(max(1 - minus, 1e-12)))
        else:
            want.append(math.log(max(plus - minus, 1e-12)))
    got = objectives.discretized_gaussian_log_likelihood(x, mean, log_scale)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_learned_range_interpolation():
    v = torch.tensor([-1.0, 0.0, 1.0, 0.3, 1.7], dtype=torch.float64)  # v not clamped
    lo, hi = -7.0, -3.0
    want = torch.tensor([((a + 1) / 2) * hi + (1 - (a + 1) / 2) * lo for a in v.tolist()], dtype=torch.float64)
    got = objectives.learned_logvar(v, torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64),
                                    "learned_range")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    assert objectives.learned_logvar(v, lo, hi, "learned") is v


def test_posterior_tables():
    n = 30
    betas = np.linspace(1e-3, 0.2, n)
    ab = np.cumprod(1 - betas)
    abp = np.append(1.0, ab[:-1])
    pv = betas * (1 - abp) / (1 - ab)
    want = {
        "post_c1": betas * np.sqrt(abp) / (1 - ab),
        "post_c2": (1 - abp) * np.sqrt(1 - betas) / (1 - ab),
        "post_logvar": np.log(np.append(pv[1], pv[1:])),
        "log_beta": np.log(betas),
        "sqrt_recip_ab": np.sqrt(1 / ab),
        "sqrt_recipm1_ab": np.sqrt(1 / ab - 1),
        "sqrt_ab": np.sqrt(ab),
        "sqrt_1m_ab": np.sqrt(1 - ab),
    }
    small = schedule.vlb_tables(torch.from_numpy(betas), "small")
    large = schedule.vlb_tables(torch.from_numpy(betas), "large")
    for k, w in want.items():
        np.testing.assert_allclose(small[k].numpy(), w, rtol=1e-12, err_msg=k)
    np.testing.assert_allclose(small["fixed_logvar"].numpy(), want["post_logvar"], rtol=1e-12)
    np.testing.assert_allclose(large["fixed_logvar"].numpy(), np.log(np.append(pv[1], betas[1:])), rtol=1e-12)
