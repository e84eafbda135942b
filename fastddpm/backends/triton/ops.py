"""The ``fastddpm_triton::*`` ops: ``torch.library.triton_op``s launching triton_kernels.

Each op is its own fake kernel (torch.compile traces through ``wrap_triton``); autograd comes
from :mod:`fastddpm._autograd` (csrc/autograd.cpp holds the same formulas for the C++ ops).
Inputs are made contiguous here, so the kernels see row-major samples (the noise index ``j`` is
the logical row-major index) and stride-0 views such as an expanded ``t`` or gradient are
materialised. Importing this module imports Triton and registers the ops.
"""
import math
import struct
from typing import List, Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ... import _autograd
from ..._checks import (SOLVER_HISTORY, check_coef, check_float, check_like, check_tables,
                        compute_dtype)
from . import kernels as K

NAMESPACE = "fastddpm_triton"
MAX_BLOCK_Q = 256  # quads per program: 1024 elements, 8 per thread with 4 warps
MIN_BLOCK_Q = 4
NUM_WARPS = 4
# The MSE sums each sample in chunks of this many blocks (16384 elements) and then the chunk
# sums; a fixed chunk keeps the summation order, hence the bits, independent of the GPU.
MSE_BLOCKS_PER_CHUNK = 16
MSE_FINISH_BLOCK = 128
SAMPLE_T_BLOCK = 256


def _dims(x: Tensor):
    """(batch B, elements per sample D) of a batch-first tensor."""
    return x.shape[0], math.prod(x.shape[1:])


def _cdiv(a, b):
    return (a + b - 1) // b


def _blocks(d):
    """(blocks per sample, quads per block) for D elements per sample.

    Plain arithmetic and comparisons only, so it also runs on SymInts under torch.compile.
    """
    quads = _cdiv(d, 4)
    block_q = MIN_BLOCK_Q
    while block_q < quads and block_q < MAX_BLOCK_Q:
        block_q *= 2
    return _cdiv(quads, block_q), block_q


def _check(name, x, tables=(), t=None, noise_name="noise", noise=None, seed=None):
    """The raw op's own argument checks (the ops are public as torch.ops.fastddpm_triton.*, like
    the C++ ops): data ``x`` floating with a batch dimension; per-t tables 1-D float32/float64;
    ``t`` an int [B] tensor (its range is the kernels' guard: NaN outside it); noise of x's shape
    and dtype, else a 1-element int64 seed; every tensor on x's device. Messages name the
    argument, as fastddpm.ops' do."""
    check_float(name, x)
    if tables:
        check_tables([n for n, _ in tables], [tab for _, tab in tables], name, x)
    if t is not None:
        if not isinstance(t, Tensor) or t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{NAMESPACE}: t must be an int32 or int64 tensor, got {getattr(t, 'dtype', type(t))}")
        if t.device != x.device:
            raise RuntimeError(f"{NAMESPACE}: t is on {t.device} but {name} is on {x.device}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"{NAMESPACE}: t must have shape [{x.shape[0]}], got {tuple(t.shape)}")
    if noise is not None:
        _check_same(noise_name, noise, name, x)
    elif seed is not None:
        _check_seed(seed, x.device)


def _check_same(name, x, ref_name, ref):
    """``x`` a tensor of ``ref``'s shape, device and dtype (the raw ops cast nothing)."""
    check_like(name, x, ref_name, ref, cast=False)
    if x.dtype != ref.dtype:
        raise TypeError(f"{NAMESPACE}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")


def _check_clip(x, bound, clip, guidance):
    """solver_step's scalars and bound, as the C++ ops check them (op_checks.h: clip_args): clip
    > 0 (inf: none) and not together with a bound, guidance finite, bound a float32/float64 [B]
    tensor on x's device."""
    if not clip > 0:  # NaN fails too
        raise ValueError(f"{NAMESPACE}: clip must be > 0 (inf for no clipping), got {clip}")
    if not math.isfinite(guidance):
        raise ValueError(f"{NAMESPACE}: guidance must be finite, got {guidance}")
    if bound is None:
        return
    if clip != math.inf:
        raise ValueError(f"{NAMESPACE}: pass clip or bound, not both (got clip={clip} and a bound)")
    if not isinstance(bound, Tensor):
        raise TypeError(f"{NAMESPACE}: bound must be a torch.Tensor or None, got {type(bound).__name__}")
    if bound.device != x.device:
        raise RuntimeError(f"{NAMESPACE}: bound is on {bound.device} but x is on {x.device}")
    if bound.shape != (x.shape[0],):
        raise ValueError(f"{NAMESPACE}: bound must have shape [{x.shape[0]}] (one per sample), "
                         f"got {tuple(bound.shape)}")
    if bound.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{NAMESPACE}: bound must be float32 or float64, got {bound.dtype}")


def _float_bits(v: float) -> int:
    """The int64 bit pattern of float64 ``v``: how a float reaches a kernel (kernels.py's doc)."""
    return struct.unpack("<q", struct.pack("<d", v))[0]


def _check_seed(seed, device):
    if not isinstance(seed, Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(f"{NAMESPACE}: seed must be a 1-element int64 tensor, got "
                        f"{getattr(seed, 'dtype', type(seed).__name__)} of shape {tuple(getattr(seed, 'shape', ()))}")
    if seed.device != device:
        raise RuntimeError(f"{NAMESPACE}: seed is on {seed.device} but the data is on {device}")


def _elementwise(x, noise, seed):
    """What an elementwise kernel's launch needs: (x contiguous, its empty output, the noise and
    seed pointers, HAS_NOISE, the grid, D, blocks per sample, quads per block). Call the kernel
    only when the output has elements."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return x, out, None, None, False, None, 0, 0, 0
    noise, seed, has_noise = _noise_args(noise, seed, x)
    batch, d = _dims(x)
    nblk, block_q = _blocks(d)
    return x, out, noise, seed, has_noise, (batch * nblk,), d, nblk, block_q


def _noise_args(noise, seed, like):
    """(noise pointer, seed pointer, HAS_NOISE); an unused pointer gets ``like`` as a stand-in."""
    if noise is None and seed is None:
        raise ValueError("fastddpm_triton: either a noise/target tensor or a seed is required")
    if noise is not None:
        return noise.contiguous(), like, True
    return like, seed.reshape(1).contiguous(), False


@triton_op(f"{NAMESPACE}::q_sample", mutates_args=())
def q_sample(x0: Tensor, t: Tensor, sqrt_ab: Tensor, sqrt_1m_ab: Tensor,
             noise: Optional[Tensor], seed: Optional[Tensor], sample_offset: int) -> Tensor:
    _check("x0", x0, (("sqrt_ab", sqrt_ab), ("sqrt_1m_ab", sqrt_1m_ab)), t, "noise", noise, seed)
    x0, out, noise, seed, has_noise, grid, d, nblk, block_q = _elementwise(x0, noise, seed)
    if out.numel() == 0:
        return out
    wrap_triton(K.q_sample_kernel)[grid](
        x0, t.contiguous(), sqrt_ab.contiguous(), sqrt_1m_ab.contiguous(), noise, seed, out,
        d, nblk, sqrt_ab.numel(), sample_offset,
        HAS_NOISE=has_noise, IS_F64=x0.dtype == torch.float64, BLOCK_Q=block_q,
        num_warps=NUM_WARPS)
    return out


@triton_op(f"{NAMESPACE}::p_sample_step", mutates_args=())
def p_sample_step(x_t: Tensor, eps_theta: Tensor, t: Tensor, c1: Tensor, c2: Tensor,
                  sigma: Tensor, noise: Optional[Tensor], seed: Optional[Tensor],
                  sample_offset: int) -> Tensor:
    _check("x_t", x_t, (("c1", c1), ("c2", c2), ("sigma", sigma)), t, "noise", noise, seed)
    check_like("eps_theta", eps_theta, "x_t", x_t, cast=False)
    x_t, out, noise, seed, has_noise, grid, d, nblk, block_q = _elementwise(x_t, noise, seed)
    if out.numel() == 0:
        return out
    wrap_triton(K.p_sample_step_kernel)[grid](
        x_t, eps_theta.contiguous(), t.contiguous(), c1.contiguous(), c2.contiguous(),
        sigma.contiguous(), noise, seed, out, d, nblk, c1.numel(), sample_offset,
        HAS_NOISE=has_noise, IS_F64=x_t.dtype == torch.float64, BLOCK_Q=block_q,
        num_warps=NUM_WARPS)
    return out


def _mse(pred, target, seed, sample_offset, tables=None):
    """The per-sample MSE of mse_per_sample, or with ``tables`` = (x0, t, cx0, ceps) of
    target_mse (``target`` is then its noise)."""
    pred = pred.contiguous()
    batch, d = _dims(pred)
    acc_dtype = compute_dtype(pred.dtype)
    out = torch.empty((batch,), dtype=acc_dtype, device=pred.device)
    if batch == 0:
        return out
    if d == 0:  # the mean of nothing, as torch.mean gives it
        return out.fill_(float("nan"))
    target, seed, has_target = _noise_args(target, seed, pred)
    x0, t, cx0, ceps, n_steps = _mse_tables(tables, pred)
    nblk, block_q = _blocks(d)
    nchunk = _cdiv(nblk, MSE_BLOCKS_PER_CHUNK)
    final = nchunk == 1
    partial = out if final else torch.empty((batch, nchunk), dtype=acc_dtype, device=pred.device)
    wrap_triton(K.mse_partial_kernel)[(batch * nchunk,)](
        pred, target, seed, x0, t, cx0, ceps, partial, d, nblk, n_steps, MSE_BLOCKS_PER_CHUNK, nchunk,
        sample_offset, HAS_TARGET=has_target, TABLES=tables is not None, FINAL=final,
        IS_F64=pred.dtype == torch.float64, BLOCK_Q=block_q, num_warps=NUM_WARPS)
    if not final:
        wrap_triton(K.mse_finish_kernel)[(batch,)](
            partial, out, nchunk, d, BLOCK=MSE_FINISH_BLOCK, num_warps=NUM_WARPS)
    return out


def _mse_backward(grad, pred, target, seed, sample_offset, tables=None):
    """d/dpred of _mse's result weighted by ``grad`` (one per sample)."""
    pred = pred.contiguous()
    out = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    if out.numel() == 0:
        return out
    target, seed, has_target = _noise_args(target, seed, pred)
    x0, t, cx0, ceps, n_steps = _mse_tables(tables, pred)
    batch, d = _dims(pred)
    nblk, block_q = _blocks(d)
    wrap_triton(K.mse_backward_kernel)[(batch * nblk,)](
        grad.contiguous(), pred, target, seed, x0, t, cx0, ceps, out, d, nblk, n_steps, sample_offset,
        HAS_TARGET=has_target, TABLES=tables is not None, IS_F64=pred.dtype == torch.float64,
        BLOCK_Q=block_q, num_warps=NUM_WARPS)
    return out


def _mse_tables(tables, pred):
    """The kernels' (x0, t, cx0, ceps, n_steps) of target_mse; for mse_per_sample, pred as the
    stand-in of the unused pointers."""
    if tables is None:
        return pred, pred, pred, pred, 0
    x0, t, cx0, ceps = tables
    return x0.contiguous(), t.contiguous(), cx0.contiguous(), ceps.contiguous(), cx0.numel()


@triton_op(f"{NAMESPACE}::mse_per_sample", mutates_args=())
def mse_per_sample(pred: Tensor, target: Optional[Tensor], seed: Optional[Tensor],
                   sample_offset: int) -> Tensor:
    _check("pred", pred, noise_name="target", noise=target, seed=seed)
    return _mse(pred, target, seed, sample_offset)


@triton_op(f"{NAMESPACE}::mse_per_sample_backward", mutates_args=())
def mse_per_sample_backward(grad: Tensor, pred: Tensor, target: Optional[Tensor],
                            seed: Optional[Tensor], sample_offset: int) -> Tensor:
    _check("pred", pred, noise_name="target", noise=target, seed=seed)
    return _mse_backward(grad, pred, target, seed, sample_offset)


def _check_target_mse(pred, x0, t, cx0, ceps, noise, seed):
    _check("pred", pred, (("cx0", cx0), ("ceps", ceps)), t, "noise", noise, seed)
    _check_same("x0", x0, "pred", pred)


@triton_op(f"{NAMESPACE}::target_mse", mutates_args=())
def target_mse(pred: Tensor, x0: Tensor, t: Tensor, cx0: Tensor, ceps: Tensor, noise: Optional[Tensor],
               seed: Optional[Tensor], sample_offset: int) -> Tensor:
    _check_target_mse(pred, x0, t, cx0, ceps, noise, seed)
    return _mse(pred, noise, seed, sample_offset, (x0, t, cx0, ceps))


@triton_op(f"{NAMESPACE}::target_mse_backward", mutates_args=())
def target_mse_backward(grad: Tensor, pred: Tensor, x0: Tensor, t: Tensor, cx0: Tensor, ceps: Tensor,
                        noise: Optional[Tensor], seed: Optional[Tensor], sample_offset: int) -> Tensor:
    _check_target_mse(pred, x0, t, cx0, ceps, noise, seed)
    return _mse_backward(grad, pred, noise, seed, sample_offset, (x0, t, cx0, ceps))


def _check_solver(x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed):
    """solver_step's checks: the data x; out, out_cond, each history tensor and noise like x (shape,
    dtype, device); coef a float32/float64 [n_steps, R + 1, 8] tensor, 1 <= R <= 4, on x's device;
    at most 4 history tensors; t, clip, guidance and bound as the clipped step's."""
    _check("x", x, (), t, "noise", noise, seed)
    _check_coef(coef, x)
    _check_same("out", out, "x", x)
    if out_cond is not None:
        _check_same("out_cond", out_cond, "x", x)
    if len(history) > SOLVER_HISTORY:
        raise ValueError(f"{NAMESPACE}: history holds at most {SOLVER_HISTORY} tensors, got {len(history)}")
    for i, h in enumerate(history):
        _check_same(f"history[{i}]", h, "x", x)
    _check_clip(x, bound, clip, guidance)


def _check_coef(coef, x):
    """coef: [n_steps >= 1, R + 1, 8] float32/float64 on x's device (_checks.check_coef, its
    messages prefixed with this namespace as the other raw ops' are)."""
    check_coef(coef, "x", x, prefix=f"{NAMESPACE}: ")


@triton_op(f"{NAMESPACE}::solver_step", mutates_args=())
def solver_step(x: Tensor, out: Tensor, out_cond: Optional[Tensor], history: List[Tensor], t: Tensor, coef: Tensor,
                bound: Optional[Tensor], clip: float, guidance: float, noise: Optional[Tensor], seed: Optional[Tensor],
                sample_offset: int, var: Optional[Tensor] = None) -> Tensor:
    _check_solver(x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed)
    if var is not None:
        _check_same("var", var, "x", x)
    n_out = int(coef.shape[1]) - 1  # a constexpr of the kernel (specialised under torch.compile)
    x = x.contiguous()
    y = torch.empty((n_out,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    noise, seed, has_noise = _noise_args(noise, seed, x)
    batch, d = _dims(x)
    nblk, block_q = _blocks(d)
    # Absent operands' pointers are stand-ins (x) that the kernel never reads.
    hist = [h.contiguous() for h in history] + [x] * (SOLVER_HISTORY - len(history))
    wrap_triton(K.solver_step_kernel)[(batch * nblk,)](
        x, out.contiguous(), x if out_cond is None else out_cond.contiguous(), *hist, t.contiguous(),
        coef.contiguous(), x if bound is None else bound.contiguous(), noise, seed,
        x if var is None else var.contiguous(), y, _float_bits(clip), _float_bits(guidance), x.numel(), d, nblk,
        coef.shape[0], sample_offset, HAS_COND=out_cond is not None, N_HISTORY=len(history),
        HAS_BOUND=bound is not None, HAS_NOISE=has_noise, HAS_VAR=var is not None, R=n_out, IS_F64=x.dtype == torch.float64, BLOCK_Q=block_q, num_warps=NUM_WARPS)
    return y


VLB_COLUMNS = 9  # fastddpm.schedule.VLB_COLUMNS
VLB_MEAN_TYPES = ("eps", "x0")  # fastddpm.objectives.MEAN_TYPES and VARIANCE_TYPES, by index
VLB_VARIANCE_TYPES = ("learned", "learned_range", "fixed")


def _check_vlb(x0, out, t, tables, noise, seed, mean_type, variance_type):
    """vlb_loss's checks: x0 floating of rank >= 2; out in x0's dtype and device with 2C channels
    (C when variance_type is 2, fixed) and x0's other dimensions; tables a float32/float64
    [n_steps >= 1, 9] tensor on x0's device; the type codes in range; t, noise and seed as
    q_sample's."""
    _check("x0", x0, (), t, "noise", noise, seed)
    if x0.dim() < 2:
        raise ValueError(f"{NAMESPACE}: x0 must have a channel dimension (rank >= 2), got shape {tuple(x0.shape)}")
    if mean_type not in (0, 1):
        raise ValueError(f"{NAMESPACE}: mean_type must be 0 (eps) or 1 (x0), got {mean_type}")
    if variance_type not in (0, 1, 2):
        raise ValueError(f"{NAMESPACE}: variance_type must be 0 (learned), 1 (learned_range) or 2 (fixed), "
                         f"got {variance_type}")
    check_float("out", out)
    channels = x0.shape[1] * (1 if variance_type == 2 else 2)
    want = (x0.shape[0], channels) + tuple(x0.shape[2:])
    if tuple(out.shape) != want:
        raise ValueError(f"{NAMESPACE}: out (the model's output) must have shape {want} ({channels} channels: the "
                         f"{'mean' if variance_type == 2 else 'mean and variance'} channels for x0's "
                         f"{x0.shape[1]}), got {tuple(out.shape)}")
    if out.device != x0.device:
        raise RuntimeError(f"{NAMESPACE}: out is on {out.device} but x0 is on {x0.device}")
    if out.dtype != x0.dtype:
        raise TypeError(f"{NAMESPACE}: out must have the dtype of x0 ({x0.dtype}), got {out.dtype}")
    if not isinstance(tables, Tensor):
        raise TypeError(f"{NAMESPACE}: tables must be a torch.Tensor, got {type(tables).__name__}")
    if tables.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{NAMESPACE}: tables must be float32 or float64, got {tables.dtype}")
    if tables.dim() != 2 or tables.shape[1] != VLB_COLUMNS or tables.shape[0] == 0:
        raise ValueError(f"{NAMESPACE}: tables must have shape [n_steps >= 1, {VLB_COLUMNS}] (schedule.vlb_tables "
                         f"in VLB_COLUMNS order), got {tuple(tables.shape)}")
    if tables.device != x0.device:
        raise RuntimeError(f"{NAMESPACE}: tables is on {tables.device} but x0 is on {x0.device}")


def _vlb_launch(x0, out, noise, seed, variance_type):
    """(x0, out contiguous, noise and seed pointers, HAS_NOISE, B, D, D_OUT, blocks per sample, quads per block)."""
    x0, out = x0.contiguous(), out.contiguous()
    noise, seed, has_noise = _noise_args(noise, seed, x0)
    batch, d = _dims(x0)
    nblk, block_q = _blocks(d)
    return x0, out, noise, seed, has_noise, batch, d, d * (1 if variance_type == 2 else 2), nblk, block_q


@triton_op(f"{NAMESPACE}::vlb_loss", mutates_args=())
def vlb_loss(x0: Tensor, out: Tensor, t: Tensor, tables: Tensor, noise: Optional[Tensor], seed: Optional[Tensor],
             sample_offset: int, mean_type: int, variance_type: int, detach_mean: bool) -> Tensor:
    _check_vlb(x0, out, t, tables, noise, seed, mean_type, variance_type)
    acc_dtype = compute_dtype(x0.dtype)
    res = torch.empty((x0.shape[0], 2), dtype=acc_dtype, device=x0.device)
    if x0.shape[0] == 0:
        return res
    if x0.numel() == 0:  # the mean of nothing, as torch.mean gives it
        return res.fill_(float("nan"))
    x0, out, noise, seed, has_noise, batch, d, d_out, nblk, block_q = _vlb_launch(x0, out, noise, seed,
                                                                                  variance_type)
    nchunk = _cdiv(nblk, MSE_BLOCKS_PER_CHUNK)
    final = nchunk == 1
    partial = res if final else torch.empty((batch, nchunk, 2), dtype=acc_dtype, device=x0.device)
    wrap_triton(K.vlb_partial_kernel)[(batch * nchunk,)](
        x0, out, t.contiguous(), tables.contiguous(), noise, seed, partial, d, d_out, nblk, tables.shape[0],
        MSE_BLOCKS_PER_CHUNK, nchunk, sample_offset, HAS_NOISE=has_noise, MEAN_TYPE=mean_type,
        VAR_TYPE=variance_type, FINAL=final, IS_F64=x0.dtype == torch.float64, BLOCK_Q=block_q,
        num_warps=NUM_WARPS)
    if not final:
        wrap_triton(K.vlb_finish_kernel)[(batch,)](
            partial, res, nchunk, d, BLOCK=MSE_FINISH_BLOCK, num_warps=NUM_WARPS)
    return res


@triton_op(f"{NAMESPACE}::vlb_loss_backward", mutates_args=())
def vlb_loss_backward(grad: Tensor, x0: Tensor, out: Tensor, t: Tensor, tables: Tensor, noise: Optional[Tensor],
                      seed: Optional[Tensor], sample_offset: int, mean_type: int, variance_type: int,
                      detach_mean: bool) -> Tensor:
    _check_vlb(x0, out, t, tables, noise, seed, mean_type, variance_type)
    if not isinstance(grad, Tensor) or grad.shape != (x0.shape[0], 2):
        raise ValueError(f"{NAMESPACE}: grad must have shape [{x0.shape[0]}, 2] (vlb_loss's output), got "
                         f"{tuple(getattr(grad, 'shape', ()))}")
    if grad.device != x0.device:
        raise RuntimeError(f"{NAMESPACE}: grad is on {grad.device} but x0 is on {x0.device}")
    res = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    if res.numel() == 0:
        return res
    x0, out, noise, seed, has_noise, batch, d, d_out, nblk, block_q = _vlb_launch(x0, out, noise, seed,
                                                                                  variance_type)
    # The incoming grad may be an expanded stride-0 view (after .mean()) and of another dtype.
    grad = grad.to(compute_dtype(x0.dtype)).contiguous()
    wrap_triton(K.vlb_backward_kernel)[(batch * nblk,)](
        grad, x0, out, t.contiguous(), tables.contiguous(), noise, seed, res, d, d_out, nblk, tables.shape[0],
        sample_offset, HAS_NOISE=has_noise, MEAN_TYPE=mean_type, VAR_TYPE=variance_type, DETACH=detach_mean,
        IS_F64=x0.dtype == torch.float64, BLOCK_Q=block_q, num_warps=NUM_WARPS)
    return res


@triton_op(f"{NAMESPACE}::sample_t", mutates_args=())
def sample_t(seed: Tensor, batch: int, n_steps: int, sample_offset: int) -> Tensor:
    _check_seed(seed, seed.device if isinstance(seed, Tensor) else None)
    out = torch.empty((batch,), dtype=torch.int64, device=seed.device)
    if batch == 0:
        return out
    wrap_triton(K.sample_t_kernel)[(_cdiv(batch, SAMPLE_T_BLOCK),)](
        seed.reshape(1).contiguous(), out, batch, n_steps, sample_offset,
        BLOCK=SAMPLE_T_BLOCK, num_warps=NUM_WARPS)
    return out


@triton_op(f"{NAMESPACE}::normal", mutates_args=())
def normal(seed: Tensor, size: List[int], sample_offset: int, dtype: torch.dtype) -> Tensor:
    _check_seed(seed, seed.device if isinstance(seed, Tensor) else None)
    out = torch.empty(size, dtype=dtype, device=seed.device)
    if out.numel() == 0:
        return out
    batch, d = _dims(out)
    nblk, block_q = _blocks(d)
    wrap_triton(K.normal_kernel)[(batch * nblk,)](
        seed.reshape(1).contiguous(), out, d, nblk, sample_offset, BLOCK_Q=block_q,
        num_warps=NUM_WARPS)
    return out


def contract_uniforms(seed: Tensor, q: Tensor, g: int) -> Tensor:
    """The four uniforms of Philox at quads ``q`` (int64) of sample ``g``, as float32 [len(q), 4].

    Not an op: tests and the GPU report compare these with fastddpm.philox bit for bit.
    """
    out = torch.empty((q.numel(), 4), dtype=torch.float32, device=q.device)
    block = 128
    K.uniforms_kernel[(_cdiv(q.numel(), block),)](seed.reshape(1).contiguous(), q.contiguous(), g, out,
                                                  q.numel(), BLOCK=block)
    return out


OPS = {"q_sample": q_sample, "p_sample_step": p_sample_step, "mse_per_sample": mse_per_sample,
       "mse_per_sample_backward": mse_per_sample_backward, "sample_t": sample_t, "normal": normal,
       "solver_step": solver_step, "target_mse": target_mse, "target_mse_backward": target_mse_backward,
       "vlb_loss": vlb_loss, "vlb_loss_backward": vlb_loss_backward}
_autograd.register_autograd(OPS)
