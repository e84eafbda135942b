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


# ---- scaled_linear, sigmoid and zero terminal SNR --------------------------------------------

def test_scaled_linear_is_a_squared_linspace_of_roots():
    n, b0, b1 = 1000, 0.00085, 0.012
    expect = [(math.sqrt(b0) + (math.sqrt(b1) - math.sqrt(b0)) * i / (n - 1)) ** 2 for i in range(n)]
    torch.testing.assert_close(schedule.scaled_linear(n), torch.tensor(expect, dtype=torch.float64),
                               rtol=1e-13, atol=0)


def test_sigmoid_schedule():
    n, b0, b1 = 50, 1e-4, 0.02
    expect = [1 / (1 + math.exp(-(-6 + 12 * i / (n - 1)))) * (b1 - b0) + b0 for i in range(n)]
    torch.testing.assert_close(schedule.sigmoid(n), torch.tensor(expect, dtype=torch.float64), rtol=1e-13, atol=0)


def _zero_snr_alpha_bar64(betas, finite=True):
    """Lin et al. 2024 Algorithm 1 in Python floats (the last alpha_bar 0); with ``finite`` the
    last alpha_bar then 2**-24, or half the one before where that is smaller."""
    ab, prod = [], 1.0
    for b in betas.tolist():
        prod *= 1 - b
        ab.append(prod)
    root = [math.sqrt(a) for a in ab]
    first, last = root[0], root[-1]
    out = [((r - last) * first / (first - last)) ** 2 for r in root]
    if finite:
        out[-1] = min(2.0**-24, out[-2] / 2)
    return out


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "sigmoid"])
def test_finite_terminal_snr_keeps_the_first_and_nearly_zeroes_the_last(name):
    n = 64 if name != "linear" else 1000  # 1000 linear steps: alpha_bar_{T-1} < 2**-24
    betas = schedule.rescale_finite_terminal_snr(getattr(schedule, name)(n))
    ab = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(ab, torch.tensor(_zero_snr_alpha_bar64(getattr(schedule, name)(n)),
                                                dtype=torch.float64), rtol=1e-11, atol=1e-15)
    assert abs(ab[0].item() - (1 - getattr(schedule, name)(n)[0].item())) < 1e-15
    assert ab[-1].item() == pytest.approx(min(2.0**-24, ab[-2].item() / 2), rel=1e-9)
    assert bool((betas > 0).all() and (betas < 1).all())
    if name == "linear":  # alpha_bar_{T-1} is below 2**-23 there, so the last is halved
        assert betas[-1].item() == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("n", [2, 64, 1000])
def test_zero_terminal_snr_is_lin_et_al_and_diffusers(name, n):
    """The public function of diffusers' name gives diffusers' result: the last beta exactly 1."""
    base = getattr(schedule, name)(n)
    betas = schedule.rescale_zero_terminal_snr(base)
    assert betas.dtype == torch.float64 and betas[-1].item() == 1.0
    ab = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(ab, torch.tensor(_zero_snr_alpha_bar64(base, finite=False), dtype=torch.float64),
                               rtol=1e-11, atol=1e-15)
    diffusers_ddpm = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")
    # The same float64 operations in the same order: equal bit for bit.
    torch.testing.assert_close(betas, diffusers_ddpm.rescale_zero_terminal_snr(base.clone()), rtol=0, atol=0)
    # float32 betas, as diffusers' schedulers keep them: ours computes in float64, diffusers in
    # float32, where beta_t = 1 - ab_t / ab_{t-1} of two alpha_bars near 1 loses up to about
    # 6e-8 / 1e-4 relative (the same bound as test_schedules_match_diffusers).
    theirs32 = diffusers_ddpm.rescale_zero_terminal_snr(base.float())
    torch.testing.assert_close(schedule.rescale_zero_terminal_snr(base.float()), theirs32.double(),
                               rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedules_match_diffusers(name, zero_snr):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar, rescale_zero_terminal_snr

    n = 1000
    ours_name = "cosine" if name == "squaredcos_cap_v2" else name
    kwargs = {} if name == "squaredcos_cap_v2" else dict(beta_start=1e-4, beta_end=0.02)
    if name == "scaled_linear":
        kwargs = dict(beta_start=0.00085, beta_end=0.012)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=n, beta_schedule=name, rescale_betas_zero_snr=zero_snr,
                                     **kwargs).betas.double()
    ours = schedule.resolve(ours_name, n, zero_terminal_snr=zero_snr)
    if name == "squaredcos_cap_v2":
        # diffusers' cosine: alpha_bar at (i + 1)/n over alpha_bar at i/n, s = 0.008, in float64
        # before its float32 cast; rescaled in float32 when zero_snr.
        ref = betas_for_alpha_bar(n).double()
        torch.testing.assert_close(schedule.cosine(n), ref, rtol=1e-6, atol=0)
    # diffusers keeps betas in float32: ours agree to its rounding. Its zero-SNR last beta is
    # exactly 1 (alpha_bar 0); ours is the 2**-24 floor (checked above), so compare the rest.
    # It also rescales in float32, where beta_t = 1 - ab_t / ab_{t-1} of two alpha_bars near 1
    # loses about 6e-8 / 1e-4 relative: 2e-3 there, float64 rounding against its float64 run.
    last = -1 if zero_snr else None
    torch.testing.assert_close(ours[:last], theirs[:last], rtol=2e-3 if zero_snr else 2e-6, atol=1e-7)
    if zero_snr:
        assert theirs[-1].item() == 1.0 and ours[-1].item() < 1.0
        # diffusers' function in float64 on our base schedule: the same to float64 rounding.
        exact = rescale_zero_terminal_snr(schedule.resolve(ours_name, n).clone())
        torch.testing.assert_close(ours[:-1], exact[:-1], rtol=1e-10, atol=1e-15)
        assert exact[-1].item() == 1.0


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_zero_terminal_snr_class_tables_are_finite(prediction):
    d = fastddpm.DenoiseDiffusion(_model(), 50, schedule="scaled_linear", zero_terminal_snr=True,
                                  prediction=prediction)
    assert d.alpha_bar[-1].item() == pytest.approx(2.0**-24, rel=1e-6)
    for dt, tabs in d._tables.items():
        for name, tab in tabs.items():
            assert torch.isfinite(tab).all(), (dt, name)
    x = torch.randn(4, 3)
    for w in (None, "min_snr"):
        assert torch.isfinite(d.loss(x, weighting=w)).all()
    assert torch.isfinite(d.p_sample(x, 49)).all()


def test_new_schedules_are_validated():
    with pytest.raises(ValueError, match="unknown schedule"):
        fastddpm.DenoiseDiffusion(_model(), 10, schedule="scaled-linear")
    with pytest.raises(TypeError, match="zero_terminal_snr must be a bool"):
        fastddpm.DenoiseDiffusion(_model(), 10, zero_terminal_snr="yes")
    with pytest.raises(ValueError, match="rescale_zero_terminal_snr needs at least 2 steps"):
        schedule.rescale_zero_terminal_snr(torch.tensor([0.1]))
    with pytest.raises(ValueError, match="rescale_finite_terminal_snr needs at least 2 steps"):
        schedule.rescale_finite_terminal_snr(torch.tensor([0.1]))
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        schedule.sigmoid(0)
    with pytest.raises(ValueError, match=r"lie in \(0, 1\)"):
        schedule.scaled_linear(10, beta_start=0.0, beta_end=1.5)
