"""Samplers (DDPM, DDIM, respacing, eps/x0/v, clipping, thresholding, guidance) against float64
math written here, against diffusers' DDPMScheduler and DDIMScheduler, and the noise contract."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import fastddpm
import np_philox
from backends_under_test import device_for, kernel_backends
from fastddpm import samplers



def _diffusers_module():
    return pytest.importorskip("diffusers", reason="diffusers is optional: pip install diffusers")

BACKENDS = kernel_backends() + ["reference"]  # an expected backend that is absent fails
T = 60
TOL = {  # (rtol, atol) of a step against float64 math, for the result's dtype
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}
DTYPES = list(TOL)
PREDICTIONS = ["eps", "x0", "v"]
# (kind, options): DDPM with both variances, DDIM deterministic and stochastic.
KINDS = [("ddpm", {"variance": "beta"}), ("ddpm", {"variance": "beta_tilde"}),
         ("ddim", {"eta": 0.0}), ("ddim", {"eta": 0.7})]
KIND_IDS = ["ddpm-beta", "ddpm-beta_tilde", "ddim-eta0", "ddim-eta0.7"]
# (steps, spacing, final_alpha_one): full chain and respaced, every spacing, both final alphas.
CHAINS = [(None, "leading", True), (7, "leading", True), (7, "trailing", False), (9, "linspace", True),
          (9, "linspace", False)]


class Eps(nn.Module):
    """A per-sample model: output depends on the sample's own x and t only."""

    def forward(self, x, t):
        tt = t.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
        return torch.tanh(0.7 * x) + 0.01 * tt


def alpha_bar64(n=T):
    beta = torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    return torch.cumprod(1 - beta, 0)


def expected_timesteps(n_train, steps, spacing):
    """The spacings as diffusers documents them, written out with exact integer arithmetic."""
    if spacing == "leading":
        return [k * (n_train // steps) for k in reversed(range(steps))]
    if spacing == "linspace":
        return [round(v) for v in np.linspace(0, n_train - 1, steps)][::-1]
    return [round(n_train - k * n_train / steps) - 1 for k in range(steps)]


def oracle_step(kind, opts, prediction, ab_all, ts, i, x, out, z, *, clip=None, threshold=None,
                threshold_max=1.0, guidance=None, final_alpha_one=True):
    """One reverse step in float64, as the papers write it (x0 first, then the update)."""
    x = x.double()
    if guidance is not None:
        u, c = (o.double() for o in out)
        out = u + guidance * (c - u)
    else:
        out = out.double()
    last = i == len(ts) - 1
    ab = float(ab_all[ts[i]])
    ab_prev = (1.0 if final_alpha_one else float(ab_all[0])) if last else float(ab_all[ts[i + 1]])
    if prediction == "eps":
        x0, eps = (x - math.sqrt(1 - ab) * out) / math.sqrt(ab), out
    elif prediction == "x0":
        x0, eps = out, (x - math.sqrt(ab) * out) / math.sqrt(1 - ab)
    else:
        x0, eps = math.sqrt(ab) * x - math.sqrt(1 - ab) * out, math.sqrt(ab) * out + math.sqrt(1 - ab) * x
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    if threshold is not None:
        flat = x0.reshape(x0.shape[0], -1).numpy()
        s = np.clip(np.quantile(np.abs(flat), threshold, axis=1), 1.0, threshold_max)
        s = torch.from_numpy(s).view((-1,) + (1,) * (x0.dim() - 1))
        x0 = torch.minimum(torch.maximum(x0, -s), s) / s
    z = z.double()
    if kind == "ddpm":
        alpha_i = ab / ab_prev
        beta_i = 1 - alpha_i
        mean = math.sqrt(ab_prev) * beta_i / (1 - ab) * x0 + math.sqrt(alpha_i) * (1 - ab_prev) / (1 - ab) * x
        var = beta_i if opts["variance"] == "beta" else max((1 - ab_prev) / (1 - ab) * beta_i, 1e-20)
        return mean + (0.0 if last else math.sqrt(var)) * z
    var = 0.0 if last else opts["eta"] ** 2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    return math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - var) * eps + math.sqrt(var) * z


def close(got, expect, dtype):
    rtol, atol = TOL[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expect, rtol=rtol, atol=atol)


def make(backend="reference", n=T, schedule="linear"):
    return fastddpm.DenoiseDiffusion(Eps(), n, backend=backend, schedule=schedule)


def check_every_step(sampler, kind, opts, prediction, shape, dtype, *, final_alpha_one=True, device="cpu",
                     guidance=None, **clip):
    ab = alpha_bar64()
    ts = sampler.timesteps.tolist()
    gen = torch.Generator().manual_seed(len(ts))
    for i in range(len(ts)):
        x = (2 * torch.randn(shape, generator=gen)).to(dtype)
        out = torch.randn(shape, generator=gen).to(dtype)
        if guidance is not None:
            out = (out, torch.randn(shape, generator=gen).to(dtype))
        z = torch.randn(shape, generator=gen).to(dtype)
        dev = [o.to(device) for o in out] if guidance is not None else out.to(device)
        got = sampler.step(x.to(device), dev, i, noise=z.to(device), guidance=guidance)
        expect = oracle_step(kind, opts, prediction, ab, ts, i, x, out, z, guidance=guidance,
                             final_alpha_one=final_alpha_one, **clip)
        close(got.cpu(), expect, dtype)


# ---------------------------------------------------------------------------------------------
# Timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n_train,steps", [(1000, 1), (1000, 2), (1000, 3), (1000, 50), (1000, 61), (1000, 999),
                                           (1000, 1000), (37, 5), (37, 36), (1, 1)])
def test_timesteps_match_diffusers(spacing, n_train, steps):
    got = fastddpm.samplers.tables.timesteps(n_train, steps, spacing)
    assert got.dtype == torch.int64 and got.numel() == steps
    assert bool((got[1:] < got[:-1]).all()) and 0 <= int(got[-1]) and int(got[0]) < n_train
    assert got.tolist() == expected_timesteps(n_train, steps, spacing)
    diffusers = _diffusers_module()
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        sched = cls(num_train_timesteps=n_train, timestep_spacing=spacing)
        sched.set_timesteps(steps)
        ref = sched.timesteps.tolist()
        if len(ref) == steps + 1:
            # diffusers' "trailing" takes np.arange(T, 0, -T/n), which for some n (61 of 1000)
            # yields an (n+1)-th value that becomes timestep -1; fastddpm keeps exactly n.
            assert spacing == "trailing" and ref[-1] == -1
            ref = ref[:-1]
        assert got.tolist() == ref


def test_every_trailing_step_count_matches_diffusers_numerics():
    # The "trailing" formula must round exactly as diffusers' float arange does, for every n.
    for n_train in (1000, 999, 1023):
        for steps in range(1, n_train + 1):
            ref = np.round(np.arange(n_train, 0, -n_train / steps)).astype(np.int64)[:steps] - 1
            assert fastddpm.samplers.tables.timesteps(n_train, steps, "trailing").tolist() == ref.tolist()


@pytest.mark.parametrize("offset", [1, 3])
def test_leading_steps_offset_matches_diffusers(offset):
    got = fastddpm.samplers.tables.timesteps(1000, 50, "leading", steps_offset=offset)
    sched = _diffusers_module().DDIMScheduler(timestep_spacing="leading", steps_offset=offset)
    sched.set_timesteps(50)
    assert got.tolist() == sched.timesteps.tolist()


def test_sampler_timesteps_and_len():
    d = make()
    s = d.sampler("ddim", steps=7, spacing="trailing")
    assert len(s) == 7 and s.timesteps.tolist() == expected_timesteps(T, 7, "trailing")
    full = d.sampler()
    assert len(full) == T and full.timesteps.tolist() == list(reversed(range(T)))


# ---------------------------------------------------------------------------------------------
# Steps against float64 math


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("kind,opts", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("steps,spacing,final", CHAINS)
def test_fused_steps_match_float64(backend, prediction, kind, opts, steps, spacing, final):
    if steps is None and backend == "triton":
        steps, spacing = 13, "trailing"  # the interpreter is slow; the full chain runs on the others
    device = device_for(backend)
    s = make(backend).sampler(kind, steps, prediction=prediction, spacing=spacing, final_alpha_one=final, **opts)
    assert s.fused
    check_every_step(s, kind, opts, prediction, (3, 2, 5), torch.float32, final_alpha_one=final, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("kind,opts", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("mode", ["clip", "threshold", "guidance", "guidance+clip", "guidance+threshold"])
@pytest.mark.parametrize("steps,spacing,final", [(7, "leading", True), (9, "linspace", False)])
def test_clipped_and_guided_steps_match_float64(backend, prediction, kind, opts, mode, steps, spacing, final):
    clip = {"clip": 1.5} if "clip" in mode else {}
    if "threshold" in mode:
        clip = {"threshold": 0.9, "threshold_max": 2.5}
    guidance = 3.0 if "guidance" in mode else None
    s = make(backend).sampler(kind, steps, prediction=prediction, spacing=spacing, final_alpha_one=final, **opts,
                              **clip)
    assert s.fused == (not clip)
    check_every_step(s, kind, opts, prediction, (4, 3, 7), torch.float32, final_alpha_one=final,
                     device=device_for(backend), guidance=guidance, **clip)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 5, 7), (1, 2, 3, 4, 5)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_step_every_dtype_and_shape(backend, dtype, shape):
    device = device_for(backend)
    s = make(backend).sampler("ddim", 7, eta=0.5, prediction="v")
    check_every_step(s, "ddim", {"eta": 0.5}, "v", shape, dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 5, 7), (2, 3, 19, 23)])
@pytest.mark.parametrize("mode", ["clip", "threshold"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_clipped_step_every_dtype_and_shape(backend, dtype, shape, mode, poisoned):
    clip = {"clip": 1.0} if mode == "clip" else {"threshold": 0.8, "threshold_max": 3.0}
    s = make(backend).sampler("ddpm", 7, variance="beta_tilde", prediction="eps", **clip)
    device = device_for(backend)
    check_every_step(s, "ddpm", {"variance": "beta_tilde"}, "eps", shape, dtype, device=device, **clip)
    check_every_step(s, "ddpm", {"variance": "beta_tilde"}, "eps", shape, dtype, device=device, guidance=-0.5,
                     **clip)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [{}, {"clip": 1.0}, {"threshold": 0.9, "threshold_max": 2.0}])
def test_predict_x0_matches_float64(backend, mode):
    ab = alpha_bar64()
    s = make(backend).sampler("ddim", 7, prediction="v", **mode)
    x, out = 2 * torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    for i, t in enumerate(s.timesteps.tolist()):
        a = float(ab[t])
        x0 = math.sqrt(a) * x.double() - math.sqrt(1 - a) * out.double()
        if "clip" in mode:
            x0 = x0.clamp(-1, 1)
        if "threshold" in mode:
            q = torch.quantile(x0.abs().reshape(3, -1), 0.9, dim=1).clamp(1, 2).view(3, 1, 1)
            x0 = torch.minimum(torch.maximum(x0, -q), q) / q
        close(s.predict_x0(x.to(device_for(backend)), out.to(device_for(backend)), i).cpu(), x0, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{"clip": 1.0}, {"threshold": 0.9, "threshold_max": 2.0}, {}])
def test_clipped_step_draws_the_stream_noise_only_where_the_step_adds_noise(backend, options):
    """With noise=None a clipped or guided step draws the contract's normals of (seed, offset),
    as stream_noise gives them; a step that adds none (the last) needs no seed at all."""
    device = device_for(backend)
    s = make(backend).sampler("ddpm", 5, **options)
    x, u, c = (torch.randn(3, 2, 9).to(device) for _ in range(3))
    seed = torch.tensor([987654321], dtype=torch.int64, device=device)
    for i in range(len(s)):
        drawn = s.step(x, (u, c), i, seed=seed, sample_offset=11, guidance=2.0)
        z = samplers.stream_noise(seed, 11, x.shape, torch.float32, device)
        given = s.step(x, (u, c), i, noise=z, guidance=2.0)
        torch.testing.assert_close(drawn, given, rtol=1e-6, atol=2e-6)
    quiet = s.step(x, (u, c), len(s) - 1, guidance=2.0)  # no seed, no generator: nothing drawn
    torch.testing.assert_close(quiet, given, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_clipped_step_under_grad_says_it_has_no_backward(backend):
    device = device_for(backend)
    s = make(backend).sampler("ddim", 5, clip=1.0)
    x = torch.randn(2, 3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="solver_step .*has no backward.*no_grad.*reference"):
        s.step(x, torch.randn(2, 3, device=device), 1)
    with torch.no_grad():
        assert torch.isfinite(s.step(x, torch.randn(2, 3, device=device), 1)).all()
    ref = make("reference").sampler("ddim", 5, clip=1.0)  # the reference backend differentiates it
    (g,) = torch.autograd.grad(ref.step(x.cpu(), torch.zeros(2, 3), 1).sum(), x)
    assert torch.isfinite(g).all()


def test_full_ddpm_chain_is_labmls_p_sample_but_the_last_step():
    # The default sampler over all n_steps is labml's p_sample, except that it adds no noise at t=0.
    d = make("reference")
    s = d.sampler()
    x, z = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    for i, t in enumerate(s.timesteps.tolist()):
        eps = d.eps_model(x, torch.full((4,), t))
        labml = d.p_sample(x, t, z) if t else d.p_sample(x, t, torch.zeros_like(z))
        torch.testing.assert_close(s.step(x, eps, i, noise=z), labml, rtol=1e-12, atol=1e-12)


def test_nan_in_one_sample_stays_in_that_sample():
    for clip in ({}, {"clip": 1.0}, {"threshold": 0.9, "threshold_max": 2.0}):
        s = make().sampler("ddim", 5, eta=1.0, **clip)
        x, out = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
        x[1, 0, 3] = float("nan")
        got = s.step(x, out, 0, generator=torch.Generator().manual_seed(0))
        assert bool(torch.isnan(got[1]).any())
        assert bool(torch.isfinite(got[0]).all()) and bool(torch.isfinite(got[2]).all())
        clean = s.step(x[[0, 2]], out[[0, 2]], 0, generator=torch.Generator().manual_seed(0))
        # same seed, different batch: samples 0 and 2 keep their noise only with their offsets
        torch.testing.assert_close(clean[0], got[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Against diffusers, step by step, given the same noise


def _diffusers(name, n_train, steps, prediction, *, spacing, clip=None, threshold=None, threshold_max=1.0,
               final_alpha_one=True, **kw):
    cls = getattr(_diffusers_module(), name)
    ab = alpha_bar64(n_train)
    betas = torch.linspace(1e-4, 0.02, n_train, dtype=torch.float64)
    pred = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[prediction]
    extra = dict(set_alpha_to_one=final_alpha_one) if name == "DDIMScheduler" else {}
    sched = cls(num_train_timesteps=n_train, trained_betas=betas.numpy(), prediction_type=pred,
                clip_sample=clip is not None, clip_sample_range=clip or 1.0, thresholding=threshold is not None,
                dynamic_thresholding_ratio=threshold or 0.995, sample_max_value=threshold_max,
                timestep_spacing=spacing, **extra, **kw)
    # diffusers forms alphas_cumprod in float32; give it the float64 one so both run in float64.
    sched.alphas_cumprod = ab
    if name == "DDIMScheduler":
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if final_alpha_one else ab[0]
    sched.set_timesteps(steps)
    return sched


DIFFUSERS_CLIPS = [{}, {"clip": 1.0}, {"clip": 1.7}, {"threshold": 0.9, "threshold_max": 1.5}]
# (T, steps, spacing, steps_offset); in each, diffusers' DDIM step of T // steps reaches the next listed timestep.
DIFFUSERS_CHAINS = [(100, 10, "leading", 0), (100, 10, "leading", 1), (100, 20, "trailing", 0), (60, 60, "leading", 0),
                    (60, 6, "trailing", 0)]
# diffusers' DDPM steps to the next listed timestep, like fastddpm, for any spacing and count.
DDPM_CHAINS = DIFFUSERS_CHAINS + [(100, 7, "linspace", 0), (100, 7, "trailing", 0), (100, 7, "leading", 3)]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@pytest.mark.parametrize("clip", DIFFUSERS_CLIPS, ids=["none", "clip1", "clip1.7", "threshold"])
@pytest.mark.parametrize("n_train,steps,spacing,offset", DDPM_CHAINS)
def test_ddpm_matches_diffusers_step_by_step(prediction, variance, clip, n_train, steps, spacing, offset):
    sched = _diffusers("DDPMScheduler", n_train, steps, prediction, spacing=spacing, steps_offset=offset,
                       variance_type={"beta": "fixed_large", "beta_tilde": "fixed_small"}[variance], **clip)
    s = make(n=n_train).sampler("ddpm", steps, variance=variance, prediction=prediction, spacing=spacing,
                                steps_offset=offset, **clip)
    assert s.timesteps.tolist() == sched.timesteps.tolist()
    gen = torch.Generator().manual_seed(steps)
    for i, t in enumerate(s.timesteps.tolist()):
        x = 2 * torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64)
        out = torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64)
        dgen = torch.Generator().manual_seed(1000 + i)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 + i), dtype=torch.float64)
        ref = sched.step(out, t, x, generator=dgen).prev_sample
        got = s.step(x, out, i, noise=z)
        if i == len(s) - 1 and t > 0:
            # diffusers adds noise at every t > 0, also at a last step that is not t = 0
            # ("trailing"); fastddpm adds none at the last step. Take diffusers' noise term off.
            ab = float(sched.alphas_cumprod[t])
            std = math.sqrt(1 - ab) if variance == "beta" else 1e-10  # beta_tilde there: clamp(0, 1e-20)
            ref = ref - std * z
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", DIFFUSERS_CLIPS, ids=["none", "clip1", "clip1.7", "threshold"])
@pytest.mark.parametrize("final", [True, False])
@pytest.mark.parametrize("n_train,steps,spacing,offset", DIFFUSERS_CHAINS)
def test_ddim_matches_diffusers_step_by_step(prediction, eta, clip, final, n_train, steps, spacing, offset):
    # diffusers' DDIM steps back a fixed T // n; with "leading"/"trailing" and T divisible by n
    # that is the next listed timestep, as here (the "linspace" difference: test below).
    sched = _diffusers("DDIMScheduler", n_train, steps, prediction, spacing=spacing, steps_offset=offset,
                       final_alpha_one=final, **clip)
    s = make(n=n_train).sampler("ddim", steps, eta=eta, prediction=prediction, spacing=spacing,
                                steps_offset=offset, final_alpha_one=final, **clip)
    assert s.timesteps.tolist() == sched.timesteps.tolist()
    gen = torch.Generator().manual_seed(steps)
    for i, t in enumerate(s.timesteps.tolist()):
        x = 2 * torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64)
        out = torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64)
        z = torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64)
        # fastddpm's last step adds no noise; with final_alpha_one=False diffusers' DDIM does
        # (eta > 0): its last step equals fastddpm's at eta = 0.
        step_eta = 0.0 if i == len(s) - 1 else eta
        ref = sched.step(out, t, x, eta=step_eta, variance_noise=z if step_eta else None).prev_sample
        torch.testing.assert_close(s.step(x, out, i, noise=z), ref, rtol=1e-10, atol=1e-10)


def test_ddim_linspace_goes_to_the_next_listed_timestep_unlike_diffusers():
    # "linspace" with T=100, n=5 lists 99, 74, 50, 25, 0: gaps of 24-25, while diffusers' DDIM
    # always steps back T // n = 20 (to 79, 54, 30, 5). Every step but the last therefore
    # differs from diffusers; the last (to alpha_bar = 1) agrees.
    sched = _diffusers("DDIMScheduler", 100, 5, "eps", spacing="linspace")
    s = make(n=100).sampler("ddim", 5, spacing="linspace")
    assert s.timesteps.tolist() == sched.timesteps.tolist() == [99, 74, 50, 25, 0]
    x, out = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    for i, t in enumerate(s.timesteps.tolist()):
        ref = sched.step(out, t, x).prev_sample
        got = s.step(x, out, i)
        if i == len(s) - 1:
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        else:
            assert (got - ref).abs().max() > 1e-3
            # ...and what diffusers would give stepping to the next listed timestep is ours:
            expect = oracle_step("ddim", {"eta": 0.0}, "eps", alpha_bar64(100), s.timesteps.tolist(), i, x, out,
                                 torch.zeros_like(x))
            torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


def test_diffusers_ddpm_noise_is_what_the_test_feeds():
    # The DDPM comparison reproduces diffusers' randn_tensor with a generator seeded alike.
    _diffusers_module()
    from diffusers.utils.torch_utils import randn_tensor

    a = randn_tensor((2, 3), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(a, torch.randn(2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64),
                               rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Noise contract of sample()


def _seed_of(gen_seed, device="cpu"):
    return int(torch.randint(2**63 - 1, (1,), generator=torch.Generator(device).manual_seed(gen_seed)))


def test_in_kernel_step_noise_is_the_contract_stream():
    for backend in BACKENDS:
        device = device_for(backend)
        for clip in ({}, {"clip": 1e30}):  # the clipped path draws the same noise as the fused one
            s = make(backend).sampler("ddpm", 5, **clip)
            x, out = torch.randn(3, 2, 7), torch.randn(3, 2, 7)
            got = s.step(x.to(device), out.to(device), 1, seed=12345, sample_offset=4)
            z = torch.from_numpy(np_philox.normals(12345, 4, 3, 14)).reshape(3, 2, 7)
            expect = oracle_step("ddpm", {"variance": "beta"}, "eps", alpha_bar64(), s.timesteps.tolist(), 1, x, out, z)
            torch.testing.assert_close(got.cpu().double(), expect, rtol=1e-5, atol=1e-5)


def test_sample_draws_x_T_and_step_noise_from_the_stream():
    # One step over one timestep: x_0 = k1 x_T + k2 eps, with x_T the stream's normals of the seed.
    d = make()
    s = d.sampler("ddpm", 1)
    got = samplers.sample(d, (2, 3, 5), sampler=s, generator=torch.Generator().manual_seed(3), sample_offset=7)
    x_T = torch.from_numpy(np_philox.normals(_seed_of(3), 7, 2, 15)).reshape(2, 3, 5)
    eps = d.eps_model(x_T, torch.full((2,), int(s.timesteps[0]))).double()
    expect = oracle_step("ddpm", {"variance": "beta"}, "eps", alpha_bar64(), s.timesteps.tolist(), 0, x_T, eps,
                         torch.zeros_like(x_T))
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5)


def test_step_seeds_differ_per_step_and_from_the_run_seed():
    s = make().sampler()
    seed = torch.tensor([_seed_of(0)])
    keys = s.tables_for(torch.zeros(1))["keys"]
    seeds = [int(samplers.step_seed(seed, keys, i)) for i in range(len(s))]
    assert len(set(seeds)) == len(s) and int(seed) not in seeds and min(seeds) >= 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{"kind": "ddpm", "variance": "beta_tilde"},
                                     {"kind": "ddim", "eta": 1.0, "clip": 1.0},
                                     {"kind": "ddim", "eta": 0.5, "threshold": 0.9, "threshold_max": 2.0}])
def test_sample_is_reproducible_and_batch_split_invariant(backend, options):
    device = device_for(backend)
    d = make(backend).to(device)
    steps = 4 if backend == "triton" else 6

    def run(batch, offset):
        return d.sample((batch, 2, 3, 5), steps=steps, generator=torch.Generator(device).manual_seed(11),
                        sample_offset=offset, **options)

    whole = run(5, 0)
    assert whole.shape == (5, 2, 3, 5) and bool(torch.isfinite(whole).all())
    torch.testing.assert_close(run(5, 0), whole, rtol=0, atol=0)
    split = torch.cat([run(2, 0), run(3, 2)])
    torch.testing.assert_close(split, whole, rtol=0, atol=0)
    other = d.sample((5, 2, 3, 5), steps=steps, generator=torch.Generator(device).manual_seed(12), **options)
    assert not torch.equal(other, whole)


def test_sample_agrees_across_backends_and_with_a_given_x_T():
    outs = []
    for backend in BACKENDS:
        device = device_for(backend)
        d = make(backend).to(device)
        outs.append(d.sample((3, 4, 5), kind="ddim", steps=5, eta=1.0, generator=torch.Generator(device).manual_seed(2)).cpu())
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)
    d = make()
    x_T = torch.randn(3, 4, 5, dtype=torch.float64)
    got = d.sample(x_T, kind="ddim", steps=5)  # eta = 0: deterministic given x_T
    x = x_T
    s = d.sampler("ddim", 5)
    for i, t in enumerate(s.timesteps.tolist()):
        x = oracle_step("ddim", {"eta": 0.0}, "eps", alpha_bar64(), s.timesteps.tolist(), i, x,
                        d.eps_model(x, torch.full((3,), t)), torch.zeros_like(x))
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_every_dtype(dtype):
    d = make("cpu")
    got = d.sample((3, 5, 7), dtype=dtype, kind="ddim", steps=4, generator=torch.Generator().manual_seed(0))
    ref = make("reference").sample((3, 5, 7), dtype=torch.float64, kind="ddim", steps=4,
                                   generator=torch.Generator().manual_seed(0))
    assert got.dtype == dtype
    rtol, atol = {torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}.get(dtype, (1e-5, 1e-5))
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol)


def test_sample_with_guidance():
    d = make()

    def cfg_model(x, t):  # the (uncond, cond) pair of a guided model
        e = d.eps_model(x, t)
        return e, 0.5 * e

    got = samplers.sample(d, (2, 6), steps=4, kind="ddim", model=cfg_model, guidance=2.0,
                          generator=torch.Generator().manual_seed(1))
    expect = samplers.sample(d, (2, 6), steps=4, kind="ddim", model=lambda x, t: 0.0 * d.eps_model(x, t),
                             generator=torch.Generator().manual_seed(1))
    # u + 2 (c - u) with c = u / 2 is 0: the guided run is the zero-eps run
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)


def test_sample_progress_bar(capsys):
    pytest.importorskip("tqdm", reason="the progress bar needs tqdm")
    d = make()
    got = d.sample((2, 6), steps=4, generator=torch.Generator().manual_seed(1), progress=True)
    assert "sampling" in capsys.readouterr().err
    torch.testing.assert_close(got, d.sample((2, 6), steps=4, generator=torch.Generator().manual_seed(1)),
                               rtol=0, atol=0)


def test_sample_runs_without_grad():
    d = make()
    x_T = torch.randn(2, 3, requires_grad=True)
    out = d.sample(x_T, steps=3)
    assert not out.requires_grad


# ---------------------------------------------------------------------------------------------
# Bad arguments


def _bad_cases():
    d = make()
    s = d.sampler("ddim", 5)
    sc = d.sampler("ddim", 5, clip=1.0)
    x = torch.randn(2, 3)
    return [
        (lambda: d.sampler("ddpx"), ValueError, "unknown kind"),
        (lambda: d.sampler(spacing="even"), ValueError, "unknown spacing"),
        (lambda: d.sampler(variance="learned"), ValueError, "unknown variance"),
        (lambda: d.sampler(prediction="noise"), ValueError, "unknown prediction"),
        (lambda: d.sampler(steps=T + 1), ValueError, "steps must lie in [1, n_steps=60]"),
        (lambda: d.sampler(steps=0), ValueError, "steps must lie in"),
        (lambda: d.sampler(steps=2.5), TypeError, "steps must be an int"),
        (lambda: d.sampler("ddim", eta=-0.1), ValueError, "eta must be >= 0"),
        (lambda: d.sampler("ddim", eta=float("nan")), ValueError, "eta must be a finite real number, got nan"),
        (lambda: d.sampler("ddim", eta=float("inf")), ValueError, "eta must be a finite real number, got inf"),
        (lambda: d.sampler("ddim", eta=5.0), ValueError, "eta=5.0 is too large"),
        (lambda: d.sampler("ddpm", eta=0.5), ValueError, "eta applies to kind='ddim' only"),
        (lambda: d.sampler("ddim", variance="beta"), ValueError, "variance applies to kind='ddpm' only"),
        (lambda: d.sampler(clip=0), ValueError, "clip must be > 0"),
        (lambda: d.sampler(clip=-1.0), ValueError, "clip must be > 0"),
        (lambda: d.sampler(clip="1"), TypeError, "clip must be a finite real"),
        (lambda: d.sampler(threshold=0.0), ValueError, "threshold (the quantile ratio) must lie in (0, 1]"),
        (lambda: d.sampler(threshold=1.5), ValueError, "threshold (the quantile ratio) must lie in (0, 1]"),
        (lambda: d.sampler(threshold=0.9, threshold_max=0.5), ValueError, "threshold_max must be >= 1"),
        (lambda: d.sampler(clip=1.0, threshold=0.9), ValueError, "pass clip or threshold, not both"),
        (lambda: d.sampler(spacing="trailing", steps_offset=1), ValueError, "steps_offset applies to"),
        (lambda: d.sampler(steps=6, steps_offset=10), ValueError, "steps_offset=10 puts the timesteps outside"),
        (lambda: samplers.make_sampler(object()), TypeError, "diffusion must be a fastddpm.DenoiseDiffusion"),
        (lambda: s.step(x, x, 5), ValueError, "i (the step index) must lie in [0, 5), got 5"),
        (lambda: s.step(x, x, -1), ValueError, "i (the step index) must lie in [0, 5), got -1"),
        (lambda: s.step(x, x, torch.tensor(1)), TypeError, "i (the step index) must be an int"),
        (lambda: s.step(x, x, 0, guidance=2.0), TypeError, "guidance needs model_output to be the pair"),
        (lambda: s.step(x, (x, x, x), 0, guidance=2.0), TypeError, "guidance needs model_output to be the pair"),
        (lambda: s.step(x, (x, x), 0), TypeError, "pass guidance=w"),
        (lambda: s.step(x, (x, None), 0, guidance=1.0), TypeError, "model_output[1] must be a tensor"),
        (lambda: s.step(x, (x, x), 0, guidance="a"), TypeError, "guidance must be a finite real number, got str"),
        (lambda: s.step(x, (x, x), 0, guidance=math.nan), ValueError, "guidance must be a finite real number, got nan"),
        (lambda: sc.step(x, (x, x), 0, guidance=-math.inf), ValueError, "guidance must be a finite real number"),
        (lambda: d.sampler("ddpm", 5).step(x, x, 0, generator=0), TypeError,
         "generator must be a torch.Generator on the data's device (cpu) or None, got int"),
        (lambda: s.step(x, torch.randn(2, 4), 0), ValueError, "model_output must have the shape of x_t"),
        (lambda: sc.step(x, torch.randn(2, 4), 0), ValueError, "model_output must have the shape of x_t"),
        (lambda: s.step(x, None, 0), TypeError, "model_output must be a tensor"),
        (lambda: s.step(x.long(), x, 0), TypeError, "x_t must be float16"),
        (lambda: sc.step(x, x, 0, noise=torch.randn(3, 3)), ValueError, "noise must have the shape of x_t"),
        (lambda: s.step(x, x, 0, sample_offset=-1), ValueError, "sample_offset must lie in"),
        (lambda: s.predict_x0(x, x, 9), ValueError, "i (the step index) must lie in"),
        (lambda: samplers.sample(d, (2, 3), sampler=s, steps=3), TypeError, "pass either sampler="),
        (lambda: samplers.sample(d, (2, 3), sampler="ddim"), TypeError, "sampler must be a"),
        (lambda: samplers.sample(d, (2, -3)), ValueError, "shape must be a non-empty tuple"),
        (lambda: samplers.sample(d, "2x3"), ValueError, "shape must be a non-empty tuple"),
        (lambda: samplers.sample(d, (2, 3), dtype=torch.int32), TypeError, "dtype must be float16"),
        (lambda: samplers.sample(d, x, dtype=torch.float64), TypeError, "dtype and device come from x_T"),
        (lambda: samplers.sample(d, (2, 3), kind="ddim", guidance=2.0), TypeError, "guidance needs model_output"),
        (lambda: samplers.sample(d, (2, 3), bogus=1), TypeError, "bogus"),
        (lambda: samplers.sample(d, (2, 3), generator=0), TypeError,
         "generator must be a torch.Generator on the data's device (cpu) or None, got int"),
        (lambda: samplers.sample(d, (2, 3), kind="ddim", guidance=math.nan), ValueError, "guidance must be a finite"),
    ]


def test_bad_arguments_get_clear_errors():
    for call, exc, message in _bad_cases():
        with pytest.raises(exc) as info:
            call()
        assert message in str(info.value), (message, str(info.value))


def test_diffusion_methods_delegate_to_the_module():
    d = make()
    s = d.sampler("ddim", 6, eta=0.3, prediction="x0")
    assert isinstance(s, samplers.Sampler) and s.kind == "ddim" and s.eta == 0.3 and len(s) == 6
    a = d.sample((2, 5), sampler=s, generator=torch.Generator().manual_seed(4))
    b = samplers.sample(d, (2, 5), kind="ddim", steps=6, eta=0.3, prediction="x0",
                        generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tables_are_made_once_per_device_and_dtype_from_float64():
    s = make().sampler("ddim", 7, eta=0.5, prediction="v")
    assert all(v.dtype == torch.float64 for v in s.tables64.values())
    for dtype, table_dtype in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                               (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        tab = s.tables_for(torch.zeros(2, dtype=dtype))
        assert tab is s.tables_for(torch.zeros(3, dtype=dtype))  # cached, not rebuilt per step
        for name in fastddpm.samplers.tables.TABLES:
            assert tab[name].dtype == table_dtype and tab[name].numel() == 7
            torch.testing.assert_close(tab[name].double(), s.tables64[name].to(table_dtype).double(), rtol=0, atol=0)
        torch.testing.assert_close(tab["minus_k2"], -tab["k2"], rtol=0, atol=0)
    assert s.tables_for(torch.zeros(1, dtype=torch.float16)) is s.tables_for(torch.zeros(1, dtype=torch.bfloat16))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 3072])
@pytest.mark.parametrize("ratio", [1e-3, 0.5, 0.9, 0.995, 1.0])
def test_threshold_quantile_is_numpys_linear_quantile(n, ratio):
    from fastddpm.samplers.clipping import row_quantile as _row_quantile

    v = torch.randn(4, n, dtype=torch.float64).abs()
    v[1] = v[1].round()  # ties
    expect = torch.from_numpy(np.quantile(v.numpy(), ratio, axis=1))
    torch.testing.assert_close(_row_quantile(v, ratio), expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_row_quantile(v.float(), ratio).double(), expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 0), (0, 3), (0,)])
@pytest.mark.parametrize("options", [{"threshold": 0.9, "threshold_max": 2.0}, {"clip": 1.0}])
def test_clipped_steps_of_empty_tensors(backend, shape, options):
    """No element: nothing to clamp and no quantile to take; the step returns an empty x_prev."""
    device = device_for(backend)
    s = make(backend).sampler("ddpm", 5, **options)
    x = torch.randn(shape, device=device)
    for i in range(len(s)):
        assert s.step(x, torch.randn(shape, device=device), i, seed=3).shape == shape
        assert s.predict_x0(x, (x, x), i, guidance=2.0).shape == shape


def test_guided_clipped_step_compiles_with_a_changing_guidance():
    """torch.compile(fullgraph=True) makes the guidance symbolic on the second value it sees;
    the checks trace with it and every value gives the eager step. (On the cpu backend: the
    reference's in-graph Philox takes inductor minutes to compile.)"""
    torch._dynamo.reset()
    s = make("cpu").sampler("ddim", 10, clip=1.0)
    x, u, c = (torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(k)) for k in range(3))

    def step(x, u, c, w):
        return s.step(x, (u, c), 3, guidance=w)

    compiled = torch.compile(step, fullgraph=True)
    for w in (2.0, 3.0, -0.5):
        torch.testing.assert_close(compiled(x, u, c, w), step(x, u, c, w), rtol=0, atol=0)


def test_multistep_steps_run_in_order_and_step_0_restarts():
    """A multistep sampler reads its run's history: a step out of order is an error naming both
    steps; step 0 starts a new run, whose steps equal the first run's."""
    s = make().sampler("dpm++", 6, order=3)
    x, out = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="step 3 was asked for before any step 0"):
        s.step(x, out, 3)
    first = [s.step(x, out, i) for i in range(3)]
    with pytest.raises(RuntimeError, match="step 5 was asked for after step 2"):
        s.step(x, out, 5)
    again = [s.step(x, out, i) for i in range(3)]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
