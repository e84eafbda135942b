"""Results keep the input's memory format, as torch's elementwise ops do: q_sample, p_sample, the
sampler steps and sample() return channels_last for channels_last input (channels_last_3d for
5-D), on every backend, with the values of the same call on the contiguous input (the kernels
compute on the contiguous layout; the noise contract indexes elements in that order)."""
import pytest
import torch

import fastddpm
from backends_under_test import device_for, kernel_backends
from fastddpm import _layout

N = 20
BACKENDS = ["reference"] + kernel_backends()
# (shape, memory format): 4-D channels_last, 5-D channels_last_3d; odd sizes, C > 1.
FORMATS = [((2, 3, 5, 7), torch.channels_last), ((2, 3, 4, 5, 3), torch.channels_last_3d)]


def _model(x, t):
    """An eps-model that keeps x's layout, as a convolution in channels_last does."""
    return 0.3 * x + 0.01


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _calls(d):
    """name -> f(x, device): the ops under test, each drawing its noise from a fixed seed."""
    ddpm = d.sampler("ddpm", 5)
    ddim = d.sampler("ddim", 5)  # eta 0: the deterministic fused step
    noisy_ddim = d.sampler("ddim", 5, eta=0.5, clip=1.0)
    threshold = d.sampler("ddim", 5, eta=0.5, threshold=0.9, threshold_max=1.5)

    def pair(x):
        return _model(x, None), 0.5 * x

    return {
        "q_sample": lambda x: d.q_sample(x, 3, generator=_gen(1)),
        "q_sample_noise": lambda x: d.q_sample(x, 3, 0.5 * x),
        "p_sample": lambda x: d.p_sample(x, 7, generator=_gen(2)),
        "step_ddpm": lambda x: ddpm.step(x, _model(x, None), 1, generator=_gen(3)),
        "step_ddim": lambda x: ddim.step(x, _model(x, None), 1),
        "step_clipped": lambda x: noisy_ddim.step(x, _model(x, None), 1, generator=_gen(4)),
        "step_threshold": lambda x: threshold.step(x, _model(x, None), 1, generator=_gen(5)),
        "step_guided": lambda x: ddpm.step(x, pair(x), 1, guidance=2.5, generator=_gen(6)),
        "predict_x0": lambda x: noisy_ddim.predict_x0(x, _model(x, None), 2),
        "predict_x0_guided": lambda x: ddim.predict_x0(x, pair(x), 2, guidance=2.5),
        "sample_ddim": lambda x: d.sample(x, kind="ddim", steps=4, eta=0.5, generator=_gen(7)),
        "sample_guided": lambda x: d.sample(x, kind="ddim", steps=4, clip=1.0, model=lambda y, t: pair(y),
                                            guidance=2.0, generator=_gen(8)),
    }


CALLS = list(_calls(fastddpm.DenoiseDiffusion(_model, N, backend="reference")))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, fmt", FORMATS)
@pytest.mark.parametrize("call", CALLS)
def test_channels_last_in_channels_last_out(backend, shape, fmt, call):
    device = device_for(backend)
    d = fastddpm.DenoiseDiffusion(_model, N, device, backend=backend)
    fn = _calls(d)[call]
    x = torch.randn(shape, generator=_gen(0)).to(device)
    x_cl = x.contiguous(memory_format=fmt)
    assert not x_cl.is_contiguous()
    with torch.no_grad():
        expect = fn(x)
        got = fn(x_cl)
    assert expect.is_contiguous(), f"{call} on contiguous input returned another layout"
    assert got.is_contiguous(memory_format=fmt), f"{call} lost the input's {fmt}: strides {got.stride()}"
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_sample_from_a_shape_is_contiguous():
    d = fastddpm.DenoiseDiffusion(_model, N, backend="reference")
    assert d.sample((2, 3, 4, 4), kind="ddim", steps=3).is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_flows_through_a_channels_last_q_sample(backend):
    """The conversion is differentiable: grad of x0 is the same as for the contiguous input."""
    device = device_for(backend)
    d = fastddpm.DenoiseDiffusion(_model, N, device, backend=backend)
    x = torch.randn(2, 3, 4, 5, generator=_gen(0)).to(device)
    grads = []
    for x0 in (x.clone(), x.contiguous(memory_format=torch.channels_last)):
        x0.requires_grad_(True)
        (d.q_sample(x0, 5, generator=_gen(1)) * torch.arange(x0.numel(), device=device).view(x0.shape)).sum().backward()
        grads.append(x0.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("shape, fmt, expect", [
    ((2, 3, 4, 5), torch.contiguous_format, torch.contiguous_format),
    ((2, 3, 4, 5), torch.channels_last, torch.channels_last),
    ((2, 3, 4, 5, 6), torch.channels_last_3d, torch.channels_last_3d),
    ((2, 1, 4, 5), torch.channels_last, torch.contiguous_format),  # both at once: contiguous, as torch says
    ((2, 3, 4), torch.contiguous_format, torch.contiguous_format),
])
def test_like_gives_the_input_format(shape, fmt, expect):
    x = torch.randn(shape).contiguous(memory_format=fmt)
    y = _layout.like(torch.randn(shape), x)
    assert y.is_contiguous(memory_format=expect)
    assert torch.empty_like(x).is_contiguous(memory_format=expect)  # torch's own choice agrees


def test_like_of_a_contiguous_input_returns_the_result_itself():
    y = torch.randn(2, 3, 4, 5)
    assert _layout.like(y, torch.randn(2, 3, 4, 5)) is y
