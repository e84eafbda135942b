"""Autograd formulas and fake kernels shared by every kernel backend's custom ops.

The C++ ops (``torch.ops.fastddpm.*``) and the Triton ops register these same functions, so
each derivative is written once. Backwards use only PyTorch ops and registered custom ops
(the MSE backward kernel), as torch.compile requires. Op schemas (every backend):

    q_sample(Tensor x0, Tensor t, Tensor sqrt_ab, Tensor sqrt_1m_ab, Tensor? noise,
             Tensor? seed, int sample_offset) -> Tensor
    p_sample_step(Tensor x_t, Tensor eps_theta, Tensor t, Tensor c1, Tensor c2, Tensor sigma,
                  Tensor? noise, Tensor? seed, int sample_offset) -> Tensor
    mse_per_sample(Tensor pred, Tensor? target, Tensor? seed, int sample_offset) -> Tensor
    mse_per_sample_backward(Tensor grad, Tensor pred, Tensor? target, Tensor? seed,
                            int sample_offset) -> Tensor          # d loss / d pred
    sample_t(Tensor seed, int batch, int n_steps, int sample_offset) -> Tensor
    normal(Tensor seed, SymInt[] size, int sample_offset, ScalarType dtype) -> Tensor

``seed`` is a 1-element int64 tensor on the data's device (None when the noise is given);
outputs are contiguous; the MSE is float64 for float64 inputs and float32 otherwise.
"""
import torch

from .schedule import gather


def mse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def call_op(op, differentiable, args):
    """op(*args), skipping the op's Python autograd kernel when no gradient can flow.

    register_autograd's kernel is Python and costs about 6-25 us per call even when nothing
    requires grad; that is most of an op's time at small sizes. Below autograd the kernel runs
    directly, with the same result. Under torch.compile the op is always called as is.
    """
    if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in differentiable)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# ---- fake (meta) kernels -------------------------------------------------------------------

def q_sample_fake(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset):
    return torch.empty_like(x0, memory_format=torch.contiguous_format)


def p_sample_step_fake(x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


def mse_per_sample_fake(pred, target, seed, sample_offset):
    return pred.new_empty((pred.shape[0],), dtype=mse_dtype(pred.dtype))


def mse_per_sample_backward_fake(grad, pred, target, seed, sample_offset):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def sample_t_fake(seed, batch, n_steps, sample_offset):
    return seed.new_empty((batch,), dtype=torch.int64)


def normal_fake(seed, size, sample_offset, dtype):
    return seed.new_empty(size, dtype=dtype)


# ---- autograd ----------------------------------------------------------------------------

def _q_setup(ctx, inputs, output):
    x0, t, sqrt_ab, sqrt_1m_ab, noise, _seed, _offset = inputs
    ctx.save_for_backward(t, sqrt_ab, sqrt_1m_ab)


def _q_backward(ctx, grad):
    t, sqrt_ab, sqrt_1m_ab = ctx.saved_tensors
    gx = gather(sqrt_ab, t, grad, grad.dtype) * grad if ctx.needs_input_grad[0] else None
    gn = gather(sqrt_1m_ab, t, grad, grad.dtype) * grad if ctx.needs_input_grad[4] else None
    return gx, None, None, None, gn, None, None


def _p_setup(ctx, inputs, output):
    x_t, eps_theta, t, c1, c2, sigma, noise, _seed, _offset = inputs
    ctx.save_for_backward(t, c1, c2, sigma)


def _p_backward(ctx, grad):
    t, c1, c2, sigma = ctx.saved_tensors
    gx = gather(c1, t, grad, grad.dtype) * grad if ctx.needs_input_grad[0] else None
    ge = -gather(c2, t, grad, grad.dtype) * grad if ctx.needs_input_grad[1] else None
    gn = gather(sigma, t, grad, grad.dtype) * grad if ctx.needs_input_grad[6] else None
    return gx, ge, None, None, None, None, gn, None, None


def _make_mse_autograd(backward_op):
    def setup(ctx, inputs, output):
        pred, target, seed, sample_offset = inputs
        # With target None only the 8-byte seed is saved besides pred: the backward
        # regenerates the noise instead of storing it.
        ctx.save_for_backward(pred, target, seed)
        ctx.sample_offset = sample_offset

    def backward(ctx, grad):
        pred, target, seed = ctx.saved_tensors
        # The incoming grad may be an expanded stride-0 view (after .mean()/.sum()).
        g_pred = call_op(backward_op, (grad, pred, target),
                         (grad.contiguous(), pred, target, seed, ctx.sample_offset))
        gp = g_pred if ctx.needs_input_grad[0] else None
        gt = -g_pred if target is not None and ctx.needs_input_grad[1] else None
        return gp, gt, None, None

    return setup, backward


def _mse_double_backward(ctx, grad):
    raise RuntimeError("fastddpm: double backward through mse_per_sample is not supported; "
                       "use backend='reference' for higher-order gradients of the loss")


def register(ops, *, fake=True):
    """Register autograd (and, for C++ ops, fake kernels) on a namespace of the six ops.

    ``ops`` maps op name -> the op (an OpOverloadPacket, a CustomOpDef or a qualified name).
    Triton ops are their own fake kernels, so they pass ``fake=False``.
    """
    lib = torch.library
    if fake:
        for name, fn in (("q_sample", q_sample_fake), ("p_sample_step", p_sample_step_fake),
                         ("mse_per_sample", mse_per_sample_fake),
                         ("mse_per_sample_backward", mse_per_sample_backward_fake),
                         ("sample_t", sample_t_fake), ("normal", normal_fake)):
            lib.register_fake(ops[name], fn)
    lib.register_autograd(ops["q_sample"], _q_backward, setup_context=_q_setup)
    lib.register_autograd(ops["p_sample_step"], _p_backward, setup_context=_p_setup)
    setup, backward = _make_mse_autograd(ops["mse_per_sample_backward"])
    lib.register_autograd(ops["mse_per_sample"], backward, setup_context=setup)
    # The backward op is differentiable only in name: say so instead of PyTorch's warning that
    # a missing formula "may lead to silently incorrect behavior".
    lib.register_autograd(ops["mse_per_sample_backward"], _mse_double_backward)
