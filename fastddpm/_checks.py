"""Argument checks of the ops and of DenoiseDiffusion: each names the argument at fault.

Every check runs before any backend computes anything. The public ops of :mod:`fastddpm.ops`
and the methods of :class:`fastddpm.DenoiseDiffusion` each check an argument once, then call
the unchecked ``ops.run_*`` layer.
"""
import math
import numbers
import operator

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_NAMES = "float16, bfloat16, float32 or float64"
SEED_RANGE = 2**64
_LIST_STEPS = 32  # up to this many CPU steps, t.tolist() is cheaper than torch.aminmax (measured)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend computes (and the MSE accumulates and returns) in for data of
    ``dtype``: float64 for float64, float32 for the rest (C++: acc_type in op_checks.h)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_int(name, value, what="an int"):
    """A Python int from an int or a NumPy integer scalar (or 0-d integer array); bools refused."""
    if type(value) is int:
        return value
    if isinstance(value, (bool, torch.Tensor)) or type(value).__name__ == "bool_":
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    try:
        return operator.index(value)  # numpy.int64, numpy.array(3), ...
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}") from None


def check_float(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATS:
        raise TypeError(f"{name} must be {_FLOAT_NAMES}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (rank >= 1), got a 0-d tensor")


def check_like(name, x, ref_name, ref, *, optional=False, cast=True):
    """``x`` must be a floating tensor of ``ref``'s shape and device; cast to ref's dtype when
    ``cast``. With ``optional`` None passes through."""
    if x is None and optional:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(x).__name__}")
    if x.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating tensor ({_FLOAT_NAMES}), got {x.dtype}")
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.device != ref.device:
        raise RuntimeError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    return x if not cast or x.dtype == ref.dtype else x.to(ref.dtype)


def _text(what):
    return what() if callable(what) else what


def check_channels(name, out, ref_name, ref, factor, what):
    """A model output ``out`` (named ``name``): a floating tensor of ``ref``'s shape with
    ``factor`` times its channels on dim 1 (2 for a learned variance's mean and variance
    channels), on ref's device. ``what`` says what the channels are, for the message (a str, or
    a function returning it, so that a message is only formatted for an error). Returns
    ``out``; the one check of every model output whose channels are counted."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(out).__name__}")
    if out.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating tensor ({_FLOAT_NAMES}), got {out.dtype}")
    if ref.dim() < 2:
        raise ValueError(f"{ref_name} must have a channel dimension (rank >= 2) for {_text(what)}, got shape "
                         f"{tuple(ref.shape)}")
    want = (ref.shape[0], factor * ref.shape[1]) + tuple(ref.shape[2:])
    if tuple(out.shape) != want:
        raise ValueError(f"{name} has shape {tuple(out.shape)}, expected {want}: {want[1]} channels on dim 1 "
                         f"({_text(what)})")
    if out.device != ref.device:
        raise RuntimeError(f"{name} is on {out.device} but {ref_name} is on {ref.device}")
    return out


def check_shape(shape) -> tuple:
    """A tensor shape (tuple, list or torch.Size of ints >= 0, batch first) -> a tuple of ints."""
    if isinstance(shape, torch.Tensor) or not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape must be a tuple or list of ints, got {type(shape).__name__}")
    if len(shape) == 0:
        raise ValueError("shape must have a batch dimension (rank >= 1), got ()")
    for s in shape:
        if isinstance(s, (bool, float, torch.Tensor)) or not hasattr(type(s), "__index__"):
            raise TypeError(f"shape must hold ints, got {type(s).__name__} in {tuple(shape)}")
    dims = tuple(operator.index(s) for s in shape)
    if any(s < 0 for s in dims):
        raise ValueError(f"shape must not be negative, got {dims}")
    return dims


def check_elements(name, x):
    """A sample of ``x`` must hold at least one element (its mean would be 0/0)."""
    if x.numel() == 0 and x.shape[0] != 0:
        raise ValueError(f"{name} must have at least one element per sample, got shape {tuple(x.shape)}")


def common_dtype(pred, target):
    """pred and target in the wider of their dtypes, as PyTorch's arithmetic would promote."""
    if target is None or target.dtype == pred.dtype:
        return pred, target
    common = torch.promote_types(pred.dtype, target.dtype)
    return pred.to(common), target.to(common)


def check_tables(names, tables, ref_name, ref):
    """1-D float32/float64 per-t tables of one length on ``ref``'s device -> that length."""
    n = None
    for name, tab in zip(names, tables):
        if not isinstance(tab, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tab).__name__}")
        if tab.dim() != 1:
            raise ValueError(f"{name} must be a 1-D per-t table, got shape {tuple(tab.shape)}")
        if tab.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 or float64, got {tab.dtype}")
        if tab.device != ref.device:
            raise RuntimeError(f"{name} is on {tab.device} but {ref_name} is on {ref.device}")
        if n is not None and tab.numel() != n:
            raise ValueError(f"tables must have one length; {name} has {tab.numel()}, expected {n}")
        n = tab.numel()
    if n == 0:
        raise ValueError("the per-t tables are empty (n_steps must be >= 1)")
    return n


def check_t(t, batch: int, device: torch.device, n_steps: int) -> torch.Tensor:
    """An int (Python or NumPy), a 0-d or [B] integer tensor ``t`` -> validated int [B] tensor."""
    if not isinstance(t, torch.Tensor):
        t = as_int("t", t, "an int or an integer tensor")
        if not 0 <= t < n_steps:
            raise ValueError(f"t must lie in [0, {n_steps}), got {t}")
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"t must be an int32 or int64 tensor, got {t.dtype}")
    if t.device != device:
        raise RuntimeError(f"t is on {t.device} but the data is on {device}")
    if t.dim() == 0:
        t = t.expand(batch)
    elif t.shape != (batch,):
        raise ValueError(f"t must have shape [{batch}] (one step per sample), got {tuple(t.shape)}")
    if t.numel() and not _is_tracing(t):
        # Under torch.compile or CUDA-graph capture the kernels check instead. A few steps on
        # the CPU are read as a list, which costs a tenth of the reduction (one small one).
        if t.device.type == "cpu" and t.numel() <= _LIST_STEPS:
            values = t.tolist()
            lo, hi = min(values), max(values)
        else:
            lo, hi = (int(v) for v in torch.aminmax(t))
        if lo < 0 or hi >= n_steps:
            raise ValueError(f"t must lie in [0, {n_steps}), got values in [{lo}, {hi}]")
    return t


def _is_tracing(t) -> bool:
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_offset(sample_offset) -> int:
    sample_offset = as_int("sample_offset", sample_offset)
    if sample_offset < 0 or sample_offset >= 2**62:
        raise ValueError(f"sample_offset must lie in [0, 2**62), got {sample_offset}")
    return sample_offset


_DIST = torch.distributed.is_available()  # fixed for the process; is_initialized is not


def default_offset(batch: int) -> int:
    """The default sample_offset: rank * local batch under torch.distributed, so ranks draw
    disjoint noise; else 0."""
    if _DIST and torch.distributed.is_initialized():
        return torch.distributed.get_rank() * batch
    return 0


def default_offset_of(x) -> int:
    """default_offset of x's batch, reading x.shape only under torch.distributed."""
    if _DIST and torch.distributed.is_initialized():
        return torch.distributed.get_rank() * x.shape[0]
    return 0


def check_generator(device, generator):
    """``generator``: a torch.Generator of ``device``'s type (checked here, else torch.randint's
    own error lists its overloads and names no argument)."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator on the data's device ({device}) or None, "
                        f"got {type(generator).__name__}; e.g. torch.Generator({str(device)!r}).manual_seed(0)")
    if generator.device.type != torch.device(device).type:
        raise RuntimeError(f"generator is on {generator.device} but the data is on {device}; pass a "
                           f"torch.Generator({str(device)!r}) (a generator draws on its own device only)")


def draw_seed(device, generator=None) -> torch.Tensor:
    """A fresh 63-bit seed as a 1-element int64 tensor on ``device``, drawn without a host sync
    from ``generator`` (a torch.Generator of the device's type; None: the device's default).
    fastddpm::train_inputs draws the same value from the same generator state in C++."""
    if generator is not None:
        check_generator(device, generator)
    return torch.randint(2**63 - 1, (1,), dtype=torch.int64, device=device, generator=generator)


def check_weight(weight, pred):
    """mse_loss's ``weight``: None or a [B] floating constant on pred's device."""
    if weight is None:
        return None
    check_float("weight", weight)
    if weight.shape != (pred.shape[0],):
        raise ValueError(f"weight must have shape [{pred.shape[0]}] (one per sample), got {tuple(weight.shape)}")
    if weight.device != pred.device:
        raise RuntimeError(f"weight is on {weight.device} but pred is on {pred.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight must not require grad (mse_loss differentiates pred only); detach it")
    return weight


def seed_tensor(seed, device: torch.device, generator=None) -> torch.Tensor:
    """``seed`` (None: drawn from ``generator``, an int, or a 1-element int64 tensor) -> a
    1-element int64 tensor on ``device``."""
    if seed is None:
        return draw_seed(device, generator)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"seed tensor must hold one int64, got shape {tuple(seed.shape)} and {seed.dtype}")
        if seed.device != device and seed.device.type == "meta":
            raise RuntimeError(f"seed is on meta, which holds no value, but the data is on {device}; "
                               "pass a seed on the data's device or on cpu")
        return seed.reshape(1).to(device)
    seed = as_int("seed", seed, "an int, a 1-element int64 tensor or None")
    if not 0 <= seed < SEED_RANGE:
        raise ValueError(f"seed must lie in [0, 2**64), got {seed}")
    if seed >= 2**63:  # keep the 64-bit pattern in a signed int64
        seed -= SEED_RANGE
    return torch.tensor([seed], dtype=torch.int64, device=device)


def check_real(name, value) -> float:
    """A finite float from a real number: TypeError for a value that is not a real number (bools
    refused), ValueError for NaN or an infinity. Written with comparisons, not math.isfinite, so
    that torch.compile can trace it with the float symbolic (it makes a float argument symbolic
    on a second call with another value)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite real number, got {type(value).__name__} {value!r}")
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def check_clip(clip) -> float:
    """clip: None (no clamp: inf) or a real > 0."""
    if clip is None:
        return math.inf
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or math.isnan(clip):
        raise TypeError(f"clip must be a real number > 0 or None, got {clip!r}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    return float(clip)


def check_bound(bound, x_t):
    """clipped_step's per-sample thresholding bound: a [B] float32/float64 tensor on x_t's device."""
    if not isinstance(bound, torch.Tensor):
        raise TypeError(f"bound must be a torch.Tensor or None, got {type(bound).__name__}")
    if bound.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"bound must be float32 or float64, got {bound.dtype}")
    if bound.shape != (x_t.shape[0],):
        raise ValueError(f"bound must have shape [{x_t.shape[0]}] (one per sample), got {tuple(bound.shape)}")
    if bound.device != x_t.device:
        raise RuntimeError(f"bound is on {bound.device} but x_t is on {x_t.device}")


SOLVER_COLUMNS = 8  # solver_step's operands: x, out, x0, history[0..3], z (op_args.h: kSolverColumns)
SOLVER_HISTORY = 4
SOLVER_MAX_OUTPUTS = 4


def check_coef(coef, ref_name, ref, prefix="") -> int:
    """solver_step's tables: a float32/float64 [n_steps, R + 1, 8] tensor on ``ref``'s device,
    1 <= R <= 4 -> n_steps. ``prefix`` starts every message (the raw Triton op's namespace)."""
    if not isinstance(coef, torch.Tensor):
        raise TypeError(f"{prefix}coef must be a torch.Tensor, got {type(coef).__name__}")
    if coef.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{prefix}coef must be float32 or float64, got {coef.dtype}")
    if coef.dim() != 3 or coef.shape[2] != SOLVER_COLUMNS or not 2 <= coef.shape[1] <= SOLVER_MAX_OUTPUTS + 1:
        raise ValueError(f"{prefix}coef must have shape [n_steps, R + 1, {SOLVER_COLUMNS}] with 1 <= R <= "
                         f"{SOLVER_MAX_OUTPUTS} (row 0 forms x0, rows 1..R the outputs), got {tuple(coef.shape)}")
    if coef.device != ref.device:
        raise RuntimeError(f"{prefix}coef is on {coef.device} but {ref_name} is on {ref.device}")
    if coef.shape[0] == 0:
        raise ValueError(f"{prefix}coef is empty (n_steps must be >= 1)")
    return coef.shape[0]


def check_history(history, ref_name, ref) -> tuple:
    """solver_step's history operands: a tuple or list of at most 4 tensors like ``ref`` (cast to
    its dtype)."""
    if isinstance(history, torch.Tensor) or not isinstance(history, (tuple, list)):
        raise TypeError(f"history must be a tuple or list of tensors, got {type(history).__name__}")
    if len(history) > SOLVER_HISTORY:
        raise ValueError(f"history holds at most {SOLVER_HISTORY} tensors, got {len(history)}")
    return tuple(check_like(f"history[{i}]", h, ref_name, ref) for i, h in enumerate(history))
