"""Fake kernels of the C++ ops and autograd formulas of the Triton ops.

The C++ ops (``torch.ops.fastddpm.*``) get their fake kernels here and their autograd in C++
(csrc/autograd.cpp); the Triton ops are their own fake kernels and get their autograd here. The
two autograd paths hold the same formulas. Backwards use only PyTorch ops and registered custom
ops, as torch.compile requires. Op schemas (every backend):

    q_sample(Tensor x0, Tensor t, Tensor sqrt_ab, Tensor sqrt_1m_ab, Tensor? noise,
             Tensor? seed, int sample_offset) -> Tensor
    p_sample_step(Tensor x_t, Tensor eps_theta, Tensor t, Tensor c1, Tensor c2, Tensor sigma,
                  Tensor? noise, Tensor? seed, int sample_offset) -> Tensor
    mse_per_sample(Tensor pred, Tensor? target, Tensor? seed, int sample_offset) -> Tensor
    mse_per_sample_backward(Tensor grad, Tensor pred, Tensor? target, Tensor? seed,
                            int sample_offset) -> Tensor          # d loss / d pred
    sample_t(Tensor seed, SymInt batch, int n_steps, int sample_offset) -> Tensor
    normal(Tensor seed, SymInt[] size, int sample_offset, ScalarType dtype) -> Tensor
    solver_step(Tensor x, Tensor out, Tensor? out_cond, Tensor[] history, Tensor t, Tensor coef,
                Tensor? bound, float clip, float guidance, Tensor? noise, Tensor? seed,
                int sample_offset, Tensor? var=None) -> Tensor    # [R, *x.shape]
    vlb_loss(Tensor x0, Tensor out, Tensor t, Tensor tables, Tensor? noise, Tensor? seed,
             int sample_offset, int mean_type, int variance_type, bool detach_mean) -> Tensor  # [B, 2]
    vlb_loss_backward(Tensor grad, Tensor x0, Tensor out, Tensor t, Tensor tables, Tensor? noise,
                      Tensor? seed, int sample_offset, int mean_type, int variance_type,
                      bool detach_mean) -> Tensor                  # d/dout
    target_mse(Tensor pred, Tensor x0, Tensor t, Tensor cx0, Tensor ceps, Tensor? noise,
               Tensor? seed, int sample_offset) -> Tensor
    target_mse_backward(Tensor grad, Tensor pred, Tensor x0, Tensor t, Tensor cx0,
                        Tensor ceps, Tensor? noise, Tensor? seed, int sample_offset) -> Tensor
    train_inputs(Tensor x0, Tensor sqrt_ab, Tensor sqrt_1m_ab, Tensor? seed, Generator? generator,
                 int sample_offset, bool keep_noise) -> (Tensor x_t, Tensor t, Tensor noise, Tensor seed)
    mse_loss(Tensor pred, Tensor? target, Tensor? seed, int sample_offset, Tensor? weight,
             Tensor? x0=None, Tensor? t=None, Tensor? cx0=None, Tensor? ceps=None) -> Tensor  # 0-d
    mse_loss_backward(Tensor grad, <mse_loss's arguments>) -> Tensor                    # d/dpred

(train_inputs and mse_loss are the compiled ops only; the Python backends compose them,
fastddpm/backends/composite.py.)

``seed`` is a 1-element int64 tensor on the data's device (None when the noise is given);
outputs are contiguous; the MSE is float64 for float64 inputs and float32 otherwise.
"""
import torch

from ._checks import compute_dtype
from .schedule import gather


# ---- fake (meta) kernels -------------------------------------------------------------------
# Under FakeTensorMode a tensor keeps its real device, so the real kernels' device checks hold
# here too. They also stop a direct call with some tensors on "meta" and the rest on a real
# device (which the dispatcher sends to these kernels) from returning an uninitialised tensor.

def _check_devices(op, ref_name, ref, **tensors):
    for name, x in tensors.items():
        if x is not None and x.device != ref.device:
            raise RuntimeError(f"fastddpm::{op}: {name} is on {x.device} but {ref_name} is on {ref.device}")


def q_sample_fake(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset):
    _check_devices("q_sample", "x0", x0, t=t, sqrt_ab=sqrt_ab, sqrt_1m_ab=sqrt_1m_ab, noise=noise, seed=seed)
    return torch.empty_like(x0, memory_format=torch.contiguous_format)


def p_sample_step_fake(x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset):
    _check_devices("p_sample_step", "x_t", x_t, eps_theta=eps_theta, t=t, c1=c1, c2=c2, sigma=sigma,
                   noise=noise, seed=seed)
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


def mse_per_sample_fake(pred, target, seed, sample_offset):
    _check_devices("mse_per_sample", "pred", pred, target=target, seed=seed)
    return pred.new_empty((pred.shape[0],), dtype=compute_dtype(pred.dtype))


def mse_per_sample_backward_fake(grad, pred, target, seed, sample_offset):
    _check_devices("mse_per_sample_backward", "pred", pred, grad=grad, target=target, seed=seed)
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def solver_step_fake(x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed, sample_offset,
                     var=None):
    _check_devices("solver_step", "x", x, out=out, out_cond=out_cond, t=t, coef=coef, bound=bound, noise=noise,
                   seed=seed, var=var, **{f"history[{i}]": h for i, h in enumerate(history)})
    if coef.dim() != 3:
        raise RuntimeError(f"fastddpm::solver_step: coef must be [n_steps, R + 1, 8], got shape {tuple(coef.shape)}")
    return x.new_empty((coef.shape[1] - 1,) + tuple(x.shape))


def target_mse_fake(pred, x0, t, cx0, ceps, noise, seed, sample_offset):
    _check_devices("target_mse", "pred", pred, x0=x0, t=t, cx0=cx0, ceps=ceps, noise=noise, seed=seed)
    return pred.new_empty((pred.shape[0],), dtype=compute_dtype(pred.dtype))


def target_mse_backward_fake(grad, pred, x0, t, cx0, ceps, noise, seed, sample_offset):
    _check_devices("target_mse_backward", "pred", pred, grad=grad, x0=x0, t=t, cx0=cx0, ceps=ceps, noise=noise,
                   seed=seed)
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def vlb_loss_fake(x0, out, t, tables, noise, seed, sample_offset, mean_type, variance_type, detach_mean):
    _check_devices("vlb_loss", "x0", x0, out=out, t=t, tables=tables, noise=noise, seed=seed)
    return x0.new_empty((x0.shape[0], 2), dtype=compute_dtype(x0.dtype))


def vlb_loss_backward_fake(grad, x0, out, t, tables, noise, seed, sample_offset, mean_type, variance_type,
                           detach_mean):
    _check_devices("vlb_loss_backward", "x0", x0, grad=grad, out=out, t=t, tables=tables, noise=noise, seed=seed)
    return torch.empty_like(out, memory_format=torch.contiguous_format)


def train_inputs_fake(x0, sqrt_ab, sqrt_1m_ab, seed, generator, sample_offset, keep_noise):
    _check_devices("train_inputs", "x0", x0, sqrt_ab=sqrt_ab, sqrt_1m_ab=sqrt_1m_ab, seed=seed)
    x_t = torch.empty_like(x0, memory_format=torch.contiguous_format)
    t = x0.new_empty((x0.shape[0],), dtype=torch.int64)
    noise = torch.empty_like(x_t) if keep_noise else x0.new_empty((0,))
    return x_t, t, noise, x0.new_empty((1 if seed is None else 0,), dtype=torch.int64)


def mse_loss_fake(pred, target, seed, sample_offset, weight, x0=None, t=None, cx0=None, ceps=None):
    _check_devices("mse_loss", "pred", pred, target=target, seed=seed, weight=weight, x0=x0, t=t, cx0=cx0, ceps=ceps)
    return pred.new_empty((), dtype=compute_dtype(pred.dtype))


def mse_loss_backward_fake(grad, pred, target, seed, sample_offset, weight, x0=None, t=None, cx0=None, ceps=None):
    _check_devices("mse_loss_backward", "pred", pred, grad=grad, target=target, seed=seed, weight=weight, x0=x0, t=t,
                   cx0=cx0, ceps=ceps)
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def sample_t_fake(seed, batch, n_steps, sample_offset):
    return seed.new_empty((batch,), dtype=torch.int64)


def normal_fake(seed, size, sample_offset, dtype):
    return seed.new_empty(size, dtype=dtype)


def register_fakes(ops):
    """Register the fake kernels on the C++ ops (``ops`` maps op name -> the op)."""
    for name, fn in (("q_sample", q_sample_fake), ("p_sample_step", p_sample_step_fake),
                     ("mse_per_sample", mse_per_sample_fake),
                     ("mse_per_sample_backward", mse_per_sample_backward_fake),
                     ("sample_t", sample_t_fake), ("normal", normal_fake),
                     ("solver_step", solver_step_fake), ("target_mse", target_mse_fake),
                     ("target_mse_backward", target_mse_backward_fake),
                     ("vlb_loss", vlb_loss_fake), ("vlb_loss_backward", vlb_loss_backward_fake),
                     ("train_inputs", train_inputs_fake), ("mse_loss", mse_loss_fake),
                     ("mse_loss_backward", mse_loss_backward_fake)):
        torch.library.register_fake(ops[name], fn)


# ---- autograd of the Triton ops (csrc/autograd.cpp has the same formulas for the C++ ops) ------
# Every floating input gets its gradient, the per-t tables included (solver_step has none and
# says so when one is asked for). Generated noise is never saved: the backward that needs it (the
# gradient of the table that multiplies it) draws it again.

def _data_grad(grad, table, t, sign=1):
    """d/dx of table[t] * x: grad * table[t], computed in the accumulation dtype."""
    acc = compute_dtype(grad.dtype)
    return (sign * grad.to(acc) * gather(table, t, grad, acc)).to(grad.dtype)


def _table_grad(grad, x, table, t, sign=1):
    """d/dtable of table[t] * x: index_add over t of each sample's sum(grad * x)."""
    acc = compute_dtype(grad.dtype)
    prod = grad.to(acc) * x.to(acc)
    per_sample = prod.flatten(1).sum(1) if prod.dim() > 1 else prod
    return torch.zeros_like(table).index_add(0, t, (sign * per_sample).to(table.dtype))


def _make_autograd(normal_op, backward_op, target_backward_op, vlb_backward_op):
    """{op name: (setup_context, backward)} of q_sample, p_sample_step, mse_per_sample, target_mse,
    vlb_loss (d/dout only; it refuses gradients of x0, tables and noise) and solver_step (which
    refuses)."""

    def noise_of(noise, seed, offset, like):
        # The noise the op used: given, or the stream of (seed, offset) drawn again by the normal
        # op, in the accumulation dtype (the kernels draw float32 normals whatever the data's).
        if noise is not None:
            return noise
        return normal_op(seed, list(like.shape), offset, compute_dtype(like.dtype))

    def q_setup(ctx, inputs, output):
        x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, offset = inputs
        need = ctx.needs_input_grad
        ctx.offset = offset
        # Only what the requested gradients need: nothing of the data's size but for a table's.
        ctx.save_for_backward(t, sqrt_ab, sqrt_1m_ab, x0 if need[2] else None,
                              noise if need[3] else None, seed if need[3] else None)

    def q_backward(ctx, grad):
        t, sqrt_ab, sqrt_1m_ab, x0, noise, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = _data_grad(grad, sqrt_ab, t) if need[0] else None
        ga = _table_grad(grad, x0, sqrt_ab, t) if need[2] else None
        gb = (_table_grad(grad, noise_of(noise, seed, ctx.offset, grad), sqrt_1m_ab, t)
              if need[3] else None)
        gn = _data_grad(grad, sqrt_1m_ab, t) if need[4] else None
        return gx, None, ga, gb, gn, None, None

    def p_setup(ctx, inputs, output):
        x_t, eps_theta, t, c1, c2, sigma, noise, seed, offset = inputs
        need = ctx.needs_input_grad
        ctx.offset = offset
        ctx.save_for_backward(t, c1, c2, sigma, x_t if need[3] else None, eps_theta if need[4] else None,
                              noise if need[5] else None, seed if need[5] else None)

    def p_backward(ctx, grad):
        t, c1, c2, sigma, x_t, eps_theta, noise, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = _data_grad(grad, c1, t) if need[0] else None
        ge = _data_grad(grad, c2, t, -1) if need[1] else None
        g1 = _table_grad(grad, x_t, c1, t) if need[3] else None
        g2 = _table_grad(grad, eps_theta, c2, t, -1) if need[4] else None
        gs = (_table_grad(grad, noise_of(noise, seed, ctx.offset, grad), sigma, t)
              if need[5] else None)
        gn = _data_grad(grad, sigma, t) if need[6] else None
        return gx, ge, None, g1, g2, gs, gn, None, None

    def mse_setup(ctx, inputs, output):
        pred, target, seed, sample_offset = inputs
        # With target None only the 8-byte seed is saved besides pred: the backward
        # regenerates the noise instead of storing it.
        ctx.save_for_backward(pred, target, seed)
        ctx.sample_offset = sample_offset

    def mse_backward(ctx, grad):
        pred, target, seed = ctx.saved_tensors
        # The incoming grad may be an expanded stride-0 view (after .mean()/.sum()).
        g_pred = backward_op(grad.contiguous(), pred, target, seed, ctx.sample_offset)
        gp = g_pred if ctx.needs_input_grad[0] else None
        gt = -g_pred if target is not None and ctx.needs_input_grad[1] else None
        return gp, gt, None, None

    def target_setup(ctx, inputs, output):
        pred, x0, t, cx0, ceps, noise, seed, offset = inputs
        # Every gradient needs d/dpred, which reads all of them (the generated noise as its seed).
        ctx.save_for_backward(pred, x0, t, cx0, ceps, noise, seed)
        ctx.offset = offset

    def target_backward(ctx, grad):
        pred, x0, t, cx0, ceps, noise, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        # d/dpred; the target's inputs get -d/dpred through target = cx0[t] x0 + ceps[t] noise.
        gp = target_backward_op(grad.contiguous(), pred, x0, t, cx0, ceps, noise, seed, ctx.offset)
        gx0 = _data_grad(gp, cx0, t, -1) if need[1] else None
        gc = _table_grad(gp, x0, cx0, t, -1) if need[3] else None
        ge = _table_grad(gp, noise_of(noise, seed, ctx.offset, gp), ceps, t, -1) if need[4] else None
        gn = _data_grad(gp, ceps, t, -1) if need[5] else None
        return gp if need[0] else None, gx0, None, gc, ge, gn, None, None

    def solver_setup(ctx, inputs, output):
        # Called only when grad mode is on and an input requires grad: a gradient is asked for.
        raise RuntimeError("fastddpm: solver_step on the triton backend has no backward (clipping and thresholding "
                           "are sampling steps); run it under torch.no_grad(), or use backend='reference' for "
                           "gradients")

    def solver_backward(ctx, grad):  # unreachable: solver_setup raises first
        raise AssertionError("solver_step has no backward")

    def vlb_setup(ctx, inputs, output):
        x0, out, t, tables, noise, seed, offset, mean_type, variance_type, detach_mean = inputs
        need = ctx.needs_input_grad
        refused = [name for name, i in (("x0", 0), ("tables", 3), ("noise", 4)) if need[i]]
        if refused:
            raise RuntimeError(f"fastddpm: vlb_loss differentiates out only, but {', '.join(refused)} "
                               f"require{'s' if len(refused) == 1 else ''} grad; detach "
                               f"{'it' if len(refused) == 1 else 'them'}, or use backend='reference' for "
                               "those gradients")
        # Nothing new of the data's size: the generated noise is drawn again from the seed.
        ctx.save_for_backward(x0, out, t, tables, noise, seed)
        ctx.args = (offset, mean_type, variance_type, detach_mean)

    def vlb_backward(ctx, grad):
        x0, out, t, tables, noise, seed = ctx.saved_tensors
        # The incoming grad may be an expanded stride-0 view (after .mean()/.sum()).
        g_out = vlb_backward_op(grad.contiguous(), x0, out, t, tables, noise, seed, *ctx.args)
        return None, g_out if ctx.needs_input_grad[1] else None, None, None, None, None, None, None, None, None

    return {"q_sample": (q_setup, q_backward), "p_sample_step": (p_setup, p_backward),
            "mse_per_sample": (mse_setup, mse_backward), "target_mse": (target_setup, target_backward),
            "solver_step": (solver_setup, solver_backward), "vlb_loss": (vlb_setup, vlb_backward)}


def _double_backward(op):
    def backward(ctx, grad):
        raise RuntimeError(f"fastddpm: double backward through {op} is not supported; "
                           "use backend='reference' for higher-order gradients of the loss")
    return backward


def register_autograd(ops):
    """Register the autograd formulas on the Triton ops (``ops`` maps op name -> the op).

    register_autograd gives no forward-mode formula: torch.func.jvp through these ops raises
    PyTorch's error that forward AD is not implemented for them.
    """
    formulas = _make_autograd(ops["normal"], ops["mse_per_sample_backward"], ops["target_mse_backward"],
                              ops["vlb_loss_backward"])
    for name, (setup, backward) in formulas.items():
        torch.library.register_autograd(ops[name], backward, setup_context=setup)
    # The backward ops are differentiable only in name: say so instead of PyTorch's warning that
    # a missing formula "may lead to silently incorrect behavior".
    for op in ("mse_per_sample", "target_mse", "vlb_loss"):
        torch.library.register_autograd(ops[f"{op}_backward"], _double_backward(op))
