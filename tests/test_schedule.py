"""Schedules and labml's attributes against float64 math written here."""
import math

import pytest
import torch

import fastddpm
from fastddpm import schedule


def _model():
    return lambda x, t: x


def test_linear_is_labmls_linspace():
    b = schedule.linear(1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    expect = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    torch.testing.assert_close(b, torch.tensor(expect, dtype=torch.float64), rtol=1e-14, atol=0)


def test_cosine_matches_nichol_dhariwal():
    n, s = 50, 0.008
    f = [math.cos((i / n + s) / (1 + s) * math.pi / 2) ** 2 for i in range(n + 1)]
    expect = [min(1 - f[i + 1] / f[i], 0.999) for i in range(n)]
    torch.testing.assert_close(schedule.cosine(n), torch.tensor(expect, dtype=torch.float64), rtol=1e-12, atol=0)
    assert schedule.cosine(n)[-1] == 0.999  # the last beta is clipped


@pytest.mark.parametrize("sched", ["linear", "cosine", "betas"])
def test_class_attributes_follow_labml(sched):
    n = 37
    betas = torch.linspace(0.001, 0.3, n, dtype=torch.float64)
    d = fastddpm.DenoiseDiffusion(_model(), n, schedule=betas if sched == "betas" else sched)
    beta = {"linear": schedule.linear(n), "cosine": schedule.cosine(n), "betas": betas}[sched]
    alpha = [1 - b for b in beta.tolist()]
    alpha_bar = [math.prod(alpha[: i + 1]) for i in range(n)]
    for name, expect in [("beta", beta.tolist()), ("alpha", alpha), ("alpha_bar", alpha_bar),
                         ("sigma2", beta.tolist())]:
        got = getattr(d, name)
        assert got.dtype == torch.float32 and got.shape == (n,), name
        torch.testing.assert_close(got, torch.tensor(expect, dtype=torch.float32), rtol=1e-6, atol=0)
    assert d.n_steps == n


@pytest.mark.parametrize("bad,match", [
    (torch.ones(2, 3) * 0.1, "1-D"),
    (torch.tensor([]), "at least one"),
    (torch.tensor([0.1, float("nan")]), "finite"),
    (torch.tensor([0.1, float("inf")]), "finite"),
    (torch.tensor([0.0, 0.1]), r"\(0, 1\)"),
    (torch.tensor([0.1, 1.0]), r"\(0, 1\)"),
    (torch.tensor([-0.1, 0.1]), r"\(0, 1\)"),
])
def test_from_betas_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        schedule.from_betas(bad)
    with pytest.raises(ValueError, match=match):
        fastddpm.DenoiseDiffusion(_model(), max(bad.numel(), 1), schedule=bad)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'"):
        fastddpm.DenoiseDiffusion(_model(), 10, schedule="quadratic")
    with pytest.raises(ValueError, match="n_steps is 10"):
        fastddpm.DenoiseDiffusion(_model(), 10, schedule=torch.full((5,), 0.1))
    for n in (0, -3):
        with pytest.raises(ValueError, match="n_steps must be >= 1"):
            fastddpm.DenoiseDiffusion(_model(), n)
    with pytest.raises(TypeError, match="n_steps must be an int"):
        fastddpm.DenoiseDiffusion(_model(), 10.0)
    with pytest.raises(TypeError, match="real tensor"):
        schedule.from_betas(torch.tensor([True]))


def test_coefficient_tables_are_float64_and_consistent():
    tabs = schedule.coefficient_tables(schedule.linear(100))
    ab = tabs["alpha_bar"]
    for k, v in tabs.items():
        assert v.dtype == torch.float64, k
    torch.testing.assert_close(tabs["sqrt_ab"] ** 2 + tabs["sqrt_1m_ab"] ** 2, torch.ones_like(ab))
    torch.testing.assert_close(tabs["c2"], tabs["beta"] * tabs["c1"] / tabs["sqrt_1m_ab"])
