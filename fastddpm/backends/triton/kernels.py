"""Triton kernels of the triton backend: the op formulas and the noise contract of docs/noise.md.

Layout shared by every elementwise kernel: program ``pid`` handles block ``pid % nblk`` of
sample ``pid // nblk``; a block is a [BLOCK_Q, 4] tile of elements, row ``q`` holding the four
elements ``4q .. 4q+3`` of the sample (row-major flat index ``j`` inside the sample). One
Philox call per row gives the row's four normals, so noise costs one Philox per four elements.
Element offsets are int64, so tensors over 2**31 elements are addressed correctly.

Scalars: only pointers and ints are passed (per-t tables are gathered inside the kernel), so no
float argument can arrive as float64 under Inductor or as a Python float under the interpreter.
The solver step's two float scalars (clip, guidance) travel as the int64 bit patterns of their
float64 values and are bitcast back in the kernel (:func:`_float_arg`): exact for float64 data,
no per-value recompilation (a constexpr would be) and no extra launch to fill a device tensor.
Half and bfloat16 compute in float32, float64 in float64 (IS_F64); noise is float32 always.
"""
import triton
import triton.language as tl

# float32 bits 0x2FFFFFFF: Triton's uint_to_uniform_float scale (fastddpm.philox.UNIFORM_SCALE).
UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)
BOX_MULLER_MIN_U = tl.constexpr(1e-7)
TWO_PI = tl.constexpr(6.283185307179586)
# Counter words 0 and 1 of the timestep stream, both 0xFFFFFFFF, packed as one int64.
T_COUNTER_Q = tl.constexpr(-1)


@triton.jit
def _to_compute(v, IS_F64: tl.constexpr):
    if IS_F64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def _to_out(v, out_ptr):
    """``v`` (float32/float64) rounded to nearest even in out_ptr's element type.

    bfloat16 is rounded with integer arithmetic: Triton's interpreter truncates float32 ->
    bfloat16 (and its explicit "rtne" mode rounds ties up), so CI would test other bits than
    the GPU's cvt.rn.bf16.f32 gives. This form gives the GPU's bits in both.
    """
    if tl.constexpr(out_ptr.dtype.element_ty == tl.bfloat16):
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(v != v, bits | 0x400000, rounded)  # a NaN stays a (quiet) NaN
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(out_ptr.dtype.element_ty)


@triton.jit
def _uniform(word):
    """uint32 word -> float32 in [0, 1), bit for bit as fastddpm.philox.uniform."""
    x = word.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)  # ~x == -x-1 without signed overflow
    return x.to(tl.float32) * UNIFORM_SCALE


@triton.jit
def _philox_words(seed, c01, g):
    """Philox4x32-10, key = seed's 64 bits, counter (c01 lo, c01 hi, g lo, g hi); c01 int64 block."""
    c0 = (c01 & 0xFFFFFFFF).to(tl.uint32)
    c1 = (c01 >> 32).to(tl.uint32)
    g_blk = tl.zeros_like(c01) + g
    c2 = (g_blk & 0xFFFFFFFF).to(tl.uint32)
    c3 = (g_blk >> 32).to(tl.uint32)
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def _normal_tile(seed, q, g):
    """[BLOCK_Q, 4] float32 normals of quads ``q`` (int64 [BLOCK_Q]) of global sample ``g``.

    Box-Muller on the pairs (u0, u1) and (u2, u3): lanes are
    (r01 cos th01, r01 sin th01, r23 cos th23, r23 sin th23).
    """
    w0, w1, w2, w3 = _philox_words(seed, q, g)
    r01 = tl.sqrt(-2.0 * tl.log(tl.maximum(_uniform(w0), BOX_MULLER_MIN_U)))
    r23 = tl.sqrt(-2.0 * tl.log(tl.maximum(_uniform(w2), BOX_MULLER_MIN_U)))
    th01 = TWO_PI * _uniform(w1)
    th23 = TWO_PI * _uniform(w3)
    lane = tl.arange(0, 4)[None, :]
    return tl.where(lane == 0, (r01 * tl.cos(th01))[:, None],
                    tl.where(lane == 1, (r01 * tl.sin(th01))[:, None],
                             tl.where(lane == 2, (r23 * tl.cos(th23))[:, None],
                                      (r23 * tl.sin(th23))[:, None])))


@triton.jit
def _tile(blk, D, BLOCK_Q: tl.constexpr):
    """Quads (int64 [BLOCK_Q]), element indices in the sample (int64 [BLOCK_Q, 4]) and mask."""
    # blk may be a Python int (a loop index under the interpreter): widen it by addition.
    q = (tl.zeros((BLOCK_Q,), tl.int64) + blk) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    j = q[:, None] * 4 + tl.arange(0, 4)[None, :].to(tl.int64)
    return q, j, j < D


@triton.jit
def _sample_block(D, nblk, sample_offset, BLOCK_Q: tl.constexpr):
    """The block of one sample this program covers, for the kernels with one program per block:
    (b, its global index g, quads q, flat offsets of its [BLOCK_Q, 4] tile, mask)."""
    pid = tl.program_id(0)
    b = pid // nblk
    q, j, mask = _tile(pid % nblk, D, BLOCK_Q)
    return b, b.to(tl.int64) + sample_offset, q, b.to(tl.int64) * D + j, mask


@triton.jit
def _gather(table_ptr, tb, n_steps, IS_F64: tl.constexpr):
    """table[tb] in the compute dtype; NaN for a t outside [0, n_steps), so an unchecked bad t
    (under torch.compile, where ops.py skips its host-side check) poisons instead of reading
    out of bounds."""
    ok = (tb >= 0) & (tb < n_steps)
    return _to_compute(tl.load(table_ptr + tb, mask=ok, other=float("nan")), IS_F64)


@triton.jit
def _noise_or_load(noise_ptr, offs, mask, seed_ptr, q, g, HAS_NOISE: tl.constexpr,
                   IS_F64: tl.constexpr):
    """The given noise tensor's tile, or the contract's float32 normals for it."""
    if HAS_NOISE:
        n = tl.load(noise_ptr + offs, mask=mask)
    else:
        n = _normal_tile(tl.load(seed_ptr), q, g)
    return _to_compute(n, IS_F64)


@triton.jit
def q_sample_kernel(x_ptr, t_ptr, sqrt_ab_ptr, sqrt_1m_ab_ptr, noise_ptr, seed_ptr, out_ptr,
                    D, nblk, n_steps, sample_offset,
                    HAS_NOISE: tl.constexpr, IS_F64: tl.constexpr, BLOCK_Q: tl.constexpr):
    b, g, q, offs, mask = _sample_block(D, nblk, sample_offset, BLOCK_Q)
    tb = tl.load(t_ptr + b)
    a = _gather(sqrt_ab_ptr, tb, n_steps, IS_F64)
    s = _gather(sqrt_1m_ab_ptr, tb, n_steps, IS_F64)
    x = _to_compute(tl.load(x_ptr + offs, mask=mask), IS_F64)
    eps = _noise_or_load(noise_ptr, offs, mask, seed_ptr, q, g, HAS_NOISE, IS_F64)
    tl.store(out_ptr + offs, _to_out(a * x + s * eps, out_ptr), mask=mask)


@triton.jit
def p_sample_step_kernel(x_ptr, eps_ptr, t_ptr, c1_ptr, c2_ptr, sigma_ptr, noise_ptr, seed_ptr,
                         out_ptr, D, nblk, n_steps, sample_offset,
                         HAS_NOISE: tl.constexpr, IS_F64: tl.constexpr, BLOCK_Q: tl.constexpr):
    b, g, q, offs, mask = _sample_block(D, nblk, sample_offset, BLOCK_Q)
    tb = tl.load(t_ptr + b)
    c1 = _gather(c1_ptr, tb, n_steps, IS_F64)
    c2 = _gather(c2_ptr, tb, n_steps, IS_F64)
    sigma = _gather(sigma_ptr, tb, n_steps, IS_F64)
    x = _to_compute(tl.load(x_ptr + offs, mask=mask), IS_F64)
    eps = _to_compute(tl.load(eps_ptr + offs, mask=mask), IS_F64)
    z = _noise_or_load(noise_ptr, offs, mask, seed_ptr, q, g, HAS_NOISE, IS_F64)
    out = c1 * x - c2 * eps + sigma * z
    tl.store(out_ptr + offs, _to_out(out, out_ptr), mask=mask)


@triton.jit
def _float_arg(bits, IS_F64: tl.constexpr):
    """A float scalar passed as the int64 bit pattern of its float64 value (see the module doc),
    in the compute dtype. Triton types a small int argument i32 (and one equal to 1 constexpr):
    widening by addition keeps the value, hence the bits."""
    return _to_compute((tl.zeros((1,), tl.int64) + bits).to(tl.float64, bitcast=True), IS_F64)


@triton.jit
def _noise_if(noise_ptr, offs, mask, seed_ptr, q, g, draw, HAS_NOISE: tl.constexpr, IS_F64: tl.constexpr):
    """_noise_or_load for noise that only enters with coefficients which may all be 0: the stream
    is drawn only where ``draw`` (a scalar bool) holds, else z = 0 (its terms are 0 either way);
    a given noise tensor is always read, so its NaN still shows."""
    if HAS_NOISE:
        z = _noise_or_load(noise_ptr, offs, mask, seed_ptr, q, g, True, IS_F64)
    else:
        z = _to_compute(tl.zeros_like(offs), IS_F64)
        if draw:
            z = _noise_or_load(noise_ptr, offs, mask, seed_ptr, q, g, False, IS_F64)
    return z


@triton.jit
def _noise_unless_zero(noise_ptr, offs, mask, seed_ptr, q, g, coef, HAS_NOISE: tl.constexpr,
                       IS_F64: tl.constexpr):
    """_noise_if for one term coef * z: the stream is not drawn when the sample's coef is 0."""
    return _noise_if(noise_ptr, offs, mask, seed_ptr, q, g, coef != 0, HAS_NOISE, IS_F64)


# ---- the per-element formulas of the solver step and of target_mse (kernel_math.h's twins) ----

@triton.jit
def _guided(u, c, w):
    """Classifier-free guidance u + w (c - u): kernel_math.h's guided_value."""
    return u + w * (c - u)


@triton.jit
def _clipped_x0(x_t, out, a, b, lim, inv_scale):
    """clamp(a x_t + b out, -lim, lim) * inv_scale: kernel_math.h's clipped_x0_value (and
    solver_x0_value). Written with comparisons like Fn::clamp_sym, so a NaN passes through (as
    in torch.clamp) and lim = inf does not clamp."""
    v = a * x_t + b * out
    return tl.where(v < -lim, -lim, tl.where(v > lim, lim, v)) * inv_scale


@triton.jit
def _solver_term(acc, coef, operand):
    """acc + coef operand: kernel_math.h's solver_term, one operand of an output row at a time."""
    return acc + coef * operand


@triton.jit
def _learned_noise_scale(v, log_max, log_min):
    """exp(0.5 (f log_max + (1 - f) log_min)), f = (v + 1) / 2: the standard deviation of a learned
    range's variance (kernel_math.h's learned_noise_scale)."""
    f = (v + 1.0) / 2.0
    return tl.exp(0.5 * (f * log_max + (1.0 - f) * log_min))


@triton.jit
def _target(x0, eps, cx0, ceps):
    """The training target cx0 x0 + ceps eps: kernel_math.h's target_value."""
    return cx0 * x0 + ceps * eps


@triton.jit
def _coef(coef_ptr, row, ok, IDX: tl.constexpr, IS_F64: tl.constexpr):
    """Entry IDX (= output row * 8 + column) of the sample's coefficient rows starting at element
    ``row`` of coef; NaN when the sample's t is out of range (``ok`` false), as _gather's."""
    return _to_compute(tl.load(coef_ptr + row + IDX, mask=ok, other=float("nan")), IS_F64)


@triton.jit
def _load_history(h_ptr, offs, mask, H: tl.constexpr, N_HISTORY: tl.constexpr, IS_F64: tl.constexpr):
    """History operand H's tile when it is passed (H < N_HISTORY), else an unused 0."""
    if H < N_HISTORY:
        h = _to_compute(tl.load(h_ptr + offs, mask=mask), IS_F64)
    else:
        h = _to_compute(tl.zeros_like(offs), IS_F64)
    return h


@triton.jit
def solver_step_kernel(x_ptr, model_ptr, cond_ptr, h0_ptr, h1_ptr, h2_ptr, h3_ptr, t_ptr, coef_ptr, bound_ptr,
                       noise_ptr, seed_ptr, var_ptr, y_ptr, clip_bits, guidance_bits, plane, D, nblk, n_steps,
                       sample_offset, HAS_COND: tl.constexpr, N_HISTORY: tl.constexpr, HAS_BOUND: tl.constexpr,
                       HAS_NOISE: tl.constexpr, HAS_VAR: tl.constexpr, R: tl.constexpr, IS_F64: tl.constexpr,
                       BLOCK_Q: tl.constexpr):
    """Every sampler's step (op_args.h: SolverStepArgs), all R outputs of one block in one pass:
    model output o (guided when HAS_COND); x0 = clamp(c[0,0] x + c[0,1] o) at clip, or thresholded
    at bound[b] (HAS_BOUND); then y[r-1] = c[r] . (x, o, x0, history[0..N_HISTORY), z) for r = 1..R,
    c = coef[t[b]] ([R + 1, 8]). y is [R, batch, D]: output r - 1 starts ``plane`` = batch * D
    elements after the one before it. z is the given noise, or the stream's, drawn only for a
    sample with a nonzero column-7 coefficient. HAS_VAR: z scaled per element by the learned
    variance's exp(0.5 (f c[0,3] + (1 - f) c[0,4])), f = (var + 1) / 2 (kernel_math.h:
    learned_noise_scale), read only where z is drawn. Absent history operands' pointers and
    columns (and var's without HAS_VAR) are not read."""
    i, g, quads, offs, mask = _sample_block(D, nblk, sample_offset, BLOCK_Q)
    tb = tl.load(t_ptr + i).to(tl.int64)
    ok = (tb >= 0) & (tb < n_steps)
    row = tb * ((R + 1) * 8)
    x = _to_compute(tl.load(x_ptr + offs, mask=mask), IS_F64)
    o = _to_compute(tl.load(model_ptr + offs, mask=mask), IS_F64)
    if HAS_COND:
        c = _to_compute(tl.load(cond_ptr + offs, mask=mask), IS_F64)
        o = _guided(o, c, _float_arg(guidance_bits, IS_F64))
    if HAS_BOUND:
        lim = _to_compute(tl.load(bound_ptr + i), IS_F64)
        x0 = _clipped_x0(x, o, _coef(coef_ptr, row, ok, 0, IS_F64), _coef(coef_ptr, row, ok, 1, IS_F64),
                         lim, 1.0 / lim)
    else:
        x0 = _clipped_x0(x, o, _coef(coef_ptr, row, ok, 0, IS_F64), _coef(coef_ptr, row, ok, 1, IS_F64),
                         _float_arg(clip_bits, IS_F64), 1.0)
    h0 = _load_history(h0_ptr, offs, mask, 0, N_HISTORY, IS_F64)
    h1 = _load_history(h1_ptr, offs, mask, 1, N_HISTORY, IS_F64)
    h2 = _load_history(h2_ptr, offs, mask, 2, N_HISTORY, IS_F64)
    h3 = _load_history(h3_ptr, offs, mask, 3, N_HISTORY, IS_F64)
    # The stream is drawn when any output's z coefficient (column 7) is nonzero.
    draw = _coef(coef_ptr, row, ok, 15, IS_F64) != 0
    for r in tl.static_range(2, R + 1):
        draw = draw | (_coef(coef_ptr, row, ok, r * 8 + 7, IS_F64) != 0)
    z = _noise_if(noise_ptr, offs, mask, seed_ptr, quads, g, draw, HAS_NOISE, IS_F64)
    if HAS_VAR:
        if draw:  # var is not needed (nor read) for a sample whose z coefficients are all 0
            v = _to_compute(tl.load(var_ptr + offs, mask=mask), IS_F64)
            z = z * _learned_noise_scale(v, _coef(coef_ptr, row, ok, 3, IS_F64), _coef(coef_ptr, row, ok, 4, IS_F64))
    out_ptr = y_ptr
    for r in tl.static_range(1, R + 1):
        # One operand at a time from 0, in the order x, o, x0, history, z (kernel_math.h).
        y = _solver_term(0.0, _coef(coef_ptr, row, ok, r * 8, IS_F64), x)
        y = _solver_term(y, _coef(coef_ptr, row, ok, r * 8 + 1, IS_F64), o)
        y = _solver_term(y, _coef(coef_ptr, row, ok, r * 8 + 2, IS_F64), x0)
        if N_HISTORY > 0:
            y = _solver_term(y, _coef(coef_ptr, row, ok, r * 8 + 3, IS_F64), h0)
        if N_HISTORY > 1:
            y = _solver_term(y, _coef(coef_ptr, row, ok, r * 8 + 4, IS_F64), h1)
        if N_HISTORY > 2:
            y = _solver_term(y, _coef(coef_ptr, row, ok, r * 8 + 5, IS_F64), h2)
        if N_HISTORY > 3:
            y = _solver_term(y, _coef(coef_ptr, row, ok, r * 8 + 6, IS_F64), h3)
        y = _solver_term(y, _coef(coef_ptr, row, ok, r * 8 + 7, IS_F64), z)
        tl.store(out_ptr + offs, _to_out(y, out_ptr), mask=mask)
        out_ptr += plane  # a pointer step of plane < 2**31 (i32) or i64: no int32 product overflows


@triton.jit
def _mse_coefs(t_ptr, b, cx0_ptr, ceps_ptr, n_steps, TABLES: tl.constexpr, IS_F64: tl.constexpr):
    """target_mse's (cx0[t[b]], ceps[t[b]]) with TABLES; unused placeholders without."""
    if TABLES:
        tb = tl.load(t_ptr + b)
        cx0 = _gather(cx0_ptr, tb, n_steps, IS_F64)
        ceps = _gather(ceps_ptr, tb, n_steps, IS_F64)
    else:
        cx0 = 0.0
        ceps = 0.0
    return cx0, ceps


@triton.jit
def _mse_target(target_ptr, x0_ptr, offs, mask, seed_ptr, q, g, cx0, ceps, HAS_TARGET: tl.constexpr,
                TABLES: tl.constexpr, IS_F64: tl.constexpr):
    """The MSE's target tile. mse_per_sample: the target tensor (HAS_TARGET) or the stream.
    target_mse (TABLES): cx0 x0 + ceps eps, eps the noise tensor in target_ptr or the stream."""
    if TABLES:
        x0 = _to_compute(tl.load(x0_ptr + offs, mask=mask), IS_F64)
        eps = _noise_unless_zero(target_ptr, offs, mask, seed_ptr, q, g, ceps, HAS_TARGET, IS_F64)
        tgt = _target(x0, eps, cx0, ceps)
    else:
        tgt = _noise_or_load(target_ptr, offs, mask, seed_ptr, q, g, HAS_TARGET, IS_F64)
    return tgt


@triton.jit
def mse_partial_kernel(pred_ptr, target_ptr, seed_ptr, x0_ptr, t_ptr, cx0_ptr, ceps_ptr, out_ptr, D, nblk,
                       n_steps, blocks_per_chunk, nchunk, sample_offset, HAS_TARGET: tl.constexpr,
                       TABLES: tl.constexpr, FINAL: tl.constexpr, IS_F64: tl.constexpr,
                       BLOCK_Q: tl.constexpr):
    """Sum of squared differences over chunk ``pid % nchunk`` of sample ``pid // nchunk``, of
    mse_per_sample or (TABLES) of target_mse (_mse_target; x0_ptr .. ceps_ptr, n_steps unused
    without TABLES).

    Chunks are a fixed number of blocks and each is summed in a fixed order, so the result
    does not depend on scheduling (no atomics). FINAL (one chunk per sample): store the mean.
    """
    pid = tl.program_id(0)
    b = pid // nchunk
    first = (pid % nchunk) * blocks_per_chunk
    last = tl.minimum(first + blocks_per_chunk, nblk)
    g = b.to(tl.int64) + sample_offset
    cx0, ceps = _mse_coefs(t_ptr, b, cx0_ptr, ceps_ptr, n_steps, TABLES, IS_F64)
    acc = _to_compute(tl.zeros((BLOCK_Q, 4), dtype=tl.float32), IS_F64)
    for blk in range(first, last):
        q, j, mask = _tile(blk, D, BLOCK_Q)
        offs = b.to(tl.int64) * D + j
        p = _to_compute(tl.load(pred_ptr + offs, mask=mask), IS_F64)
        tgt = _mse_target(target_ptr, x0_ptr, offs, mask, seed_ptr, q, g, cx0, ceps, HAS_TARGET, TABLES, IS_F64)
        d = p - tgt
        acc += tl.where(mask, d * d, 0.0)
    total = tl.sum(tl.sum(acc, axis=1), axis=0)
    if FINAL:
        tl.store(out_ptr + b, total / D)
    else:
        tl.store(out_ptr + pid, total)


@triton.jit
def mse_finish_kernel(partial_ptr, out_ptr, nchunk, D, BLOCK: tl.constexpr):
    """Mean per sample from its row of chunk sums, summed in a fixed order."""
    b = tl.program_id(0)
    row = b.to(tl.int64) * nchunk
    acc = tl.zeros((BLOCK,), dtype=partial_ptr.dtype.element_ty)
    for start in range(0, nchunk, BLOCK):
        i = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + row + i, mask=i < nchunk, other=0.0)
    tl.store(out_ptr + b, tl.sum(acc, axis=0) / D)


@triton.jit
def mse_backward_kernel(grad_ptr, pred_ptr, target_ptr, seed_ptr, x0_ptr, t_ptr, cx0_ptr, ceps_ptr, out_ptr,
                        D, nblk, n_steps, sample_offset, HAS_TARGET: tl.constexpr, TABLES: tl.constexpr,
                        IS_F64: tl.constexpr, BLOCK_Q: tl.constexpr):
    """d mean((pred - target)^2) / d pred = grad[b] * 2 (pred - target) / D, the target that of
    mse_partial_kernel (TABLES: target_mse's)."""
    b, g, q, offs, mask = _sample_block(D, nblk, sample_offset, BLOCK_Q)
    cx0, ceps = _mse_coefs(t_ptr, b, cx0_ptr, ceps_ptr, n_steps, TABLES, IS_F64)
    coef = _to_compute(tl.load(grad_ptr + b), IS_F64) * 2.0 / D
    p = _to_compute(tl.load(pred_ptr + offs, mask=mask), IS_F64)
    tgt = _mse_target(target_ptr, x0_ptr, offs, mask, seed_ptr, q, g, cx0, ceps, HAS_TARGET, TABLES, IS_F64)
    tl.store(out_ptr + offs, _to_out(coef * (p - tgt), out_ptr), mask=mask)


@triton.jit
def normal_kernel(seed_ptr, out_ptr, D, nblk, sample_offset, BLOCK_Q: tl.constexpr):
    """The contract's float32 normals themselves, rounded to out's dtype."""
    _, g, q, offs, mask = _sample_block(D, nblk, sample_offset, BLOCK_Q)
    tl.store(out_ptr + offs, _to_out(_normal_tile(tl.load(seed_ptr), q, g), out_ptr), mask=mask)


@triton.jit
def sample_t_kernel(seed_ptr, out_ptr, batch, n_steps, sample_offset, BLOCK: tl.constexpr):
    """t = (w0 * n_steps) >> 32, w0 = Philox word 0 at counter (~0, ~0, g lo, g hi)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ones = tl.full((BLOCK,), T_COUNTER_Q, dtype=tl.int64)
    w0, _, _, _ = _philox_words(tl.load(seed_ptr), ones, i + sample_offset)
    t = (w0.to(tl.uint64) * n_steps) >> 32  # < 2**63: w0 < 2**32, n_steps < 2**31
    tl.store(out_ptr + i, t.to(tl.int64), mask=i < batch)


@triton.jit
def uniforms_kernel(seed_ptr, q_ptr, g, out_ptr, n, BLOCK: tl.constexpr):
    """out[i, k] = uniform of Philox word k at quad q[i] of sample g (checks of the contract)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    w0, w1, w2, w3 = _philox_words(tl.load(seed_ptr), tl.load(q_ptr + i, mask=mask, other=0),
                                   tl.zeros((BLOCK,), tl.int64) + g)
    tl.store(out_ptr + i * 4, _uniform(w0), mask=mask)
    tl.store(out_ptr + i * 4 + 1, _uniform(w1), mask=mask)
    tl.store(out_ptr + i * 4 + 2, _uniform(w2), mask=mask)
    tl.store(out_ptr + i * 4 + 3, _uniform(w3), mask=mask)


# ---- the variational bound (vlb_loss; objectives.vlb_terms is the reference) -------------------

LN2 = tl.constexpr(0.6931471805599453)
CDF_A = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
CDF_B = tl.constexpr(0.044715)
BIN = tl.constexpr(0.00392156862745098)  # 1 / 255
LOG_FLOOR = tl.constexpr(1e-12)
N_VLB_COLUMNS = tl.constexpr(9)


@triton.jit
def _vlb_col(tables_ptr, row, ok, K: tl.constexpr, IS_F64: tl.constexpr):
    """Column K (schedule.VLB_COLUMNS) of the sample's table row; NaN for a t out of range."""
    return _to_compute(tl.load(tables_ptr + row + K, mask=ok, other=float("nan")), IS_F64)


@triton.jit
def _vlb_row(t_ptr, b, tables_ptr, n_steps, IS_F64: tl.constexpr):
    """(t == 0, sqrt_ab, sqrt_1m_ab, post_c1, post_c2, post_logvar, log_beta, sqrt_recip_ab,
    sqrt_recipm1_ab, fixed_logvar) of sample b."""
    tb = tl.load(t_ptr + b).to(tl.int64)
    ok = (tb >= 0) & (tb < n_steps)
    row = tb * N_VLB_COLUMNS
    return (tb == 0, _vlb_col(tables_ptr, row, ok, 0, IS_F64), _vlb_col(tables_ptr, row, ok, 1, IS_F64),
            _vlb_col(tables_ptr, row, ok, 2, IS_F64), _vlb_col(tables_ptr, row, ok, 3, IS_F64),
            _vlb_col(tables_ptr, row, ok, 4, IS_F64), _vlb_col(tables_ptr, row, ok, 5, IS_F64),
            _vlb_col(tables_ptr, row, ok, 6, IS_F64), _vlb_col(tables_ptr, row, ok, 7, IS_F64),
            _vlb_col(tables_ptr, row, ok, 8, IS_F64))


@triton.jit
def _tanh(u):
    """tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2 |u|): no overflow, accurate at large |u|.
    Below |u| = 0.1, where 1 - e cancels (a relative error of 3e-4 at |u| = 1e-4 in float32, which
    the decoder's CDF differences magnify), its Taylor series to u^9 (error below 1e-13)."""
    neg = u < 0
    a = tl.where(neg, -u, u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    r = tl.where(a < 0.1, small, big)
    return tl.where(neg, -r, r)


@triton.jit
def _cdf_tanh(a):
    """tanh(A (a + B a^3)) of the approximate normal CDF 0.5 (1 + tanh(...))."""
    return _tanh(CDF_A * (a + CDF_B * a * a * a))


@triton.jit
def _cdf_grad(a, th):
    """d/da of 0.5 (1 + tanh(A (a + B a^3))), th the tanh."""
    return 0.5 * CDF_A * (1.0 + 3.0 * CDF_B * a * a) * (1.0 - th * th)


@triton.jit
def _vlb_elem(x0, m, vraw, eps, sqrt_ab, sqrt_1m_ab, post_c1, post_c2, post_logvar, log_beta, s_rab, s_rm1ab,
              fixed_logvar, MEAN_TYPE: tl.constexpr, VAR_TYPE: tl.constexpr):
    """Per element: (target, mean_q, mean_p, lv_p, dlv_p/dvraw, dmean_p/dm) of objectives.vlb_terms."""
    x_t = sqrt_ab * x0 + sqrt_1m_ab * eps
    if MEAN_TYPE == 0:
        target = eps
        x0_pred = s_rab * x_t - s_rm1ab * m
        dmp_dm = -post_c1 * s_rm1ab
    else:
        target = x0
        x0_pred = m
        dmp_dm = post_c1
    mean_q = post_c1 * x0 + post_c2 * x_t
    mean_p = post_c1 * x0_pred + post_c2 * x_t
    if VAR_TYPE == 0:
        lv_p = vraw
        dlv_dv = 1.0
    elif VAR_TYPE == 1:
        f = (vraw + 1.0) / 2.0
        lv_p = f * log_beta + (1.0 - f) * post_logvar
        dlv_dv = 0.5 * (log_beta - post_logvar)
    else:
        lv_p = fixed_logvar + tl.zeros_like(m)  # a tile
        dlv_dv = 0.0
    return target, mean_q, mean_p, lv_p, dlv_dv, dmp_dm


@triton.jit
def _vlb_nll_parts(x0, mean_p, lv_p):
    """The decoder's (v, a+, a-, s, which): v the clamped probability's argument, which 0 (lowest
    bin: Phi(a+)), 1 (highest: 1 - Phi(a-)) or 2 (Phi(a+) - Phi(a-))."""
    s = tl.exp(-0.5 * lv_p)
    c = x0 - mean_p
    a_p = s * (c + BIN)
    a_m = s * (c - BIN)
    th_p = _cdf_tanh(a_p)
    th_m = _cdf_tanh(a_m)
    cdf_p = 0.5 * (1.0 + th_p)
    cdf_m = 0.5 * (1.0 + th_m)
    lo = x0 < -0.999
    hi = x0 > 0.999
    v = tl.where(lo, cdf_p, tl.where(hi, 1.0 - cdf_m, cdf_p - cdf_m))
    return v, a_p, a_m, th_p, th_m, s, lo, hi


@triton.jit
def _vlb_term(is_zero, x0, mean_q, mean_p, post_logvar, lv_p):
    """The vb term of one element in nats: the decoder's -log L at t == 0, the KL elsewhere."""
    if is_zero:
        v, a_p, a_m, th_p, th_m, s, lo, hi = _vlb_nll_parts(x0, mean_p, lv_p)
        term = -tl.log(tl.maximum(v, LOG_FLOOR))
    else:
        d = mean_q - mean_p
        term = 0.5 * (-1.0 + lv_p - post_logvar + tl.exp(post_logvar - lv_p) + d * d * tl.exp(-lv_p))
    return term


@triton.jit
def _vlb_term_grads(is_zero, x0, mean_q, mean_p, post_logvar, lv_p):
    """(dterm/dmean_p, dterm/dlv_p) of _vlb_term."""
    if is_zero:
        v, a_p, a_m, th_p, th_m, s, lo, hi = _vlb_nll_parts(x0, mean_p, lv_p)
        g_p = _cdf_grad(a_p, th_p)
        g_m = _cdf_grad(a_m, th_m)
        # dv/dmean_p (da/dmean_p = -s) and dv/dlog_scale (da/dlog_scale = -a) by branch.
        dv_dm = tl.where(lo, -s * g_p, tl.where(hi, s * g_m, -s * (g_p - g_m)))
        dv_dls = tl.where(lo, -a_p * g_p, tl.where(hi, a_m * g_m, a_m * g_m - a_p * g_p))
        # The clamp passes the gradient where v >= the floor (as torch.clamp), then log's 1 / v.
        inv = tl.where(v >= LOG_FLOOR, 1.0 / tl.maximum(v, LOG_FLOOR), 0.0)
        d_mean = -dv_dm * inv
        d_lv = -0.5 * dv_dls * inv
    else:
        d = mean_q - mean_p
        e = tl.exp(-lv_p)
        d_mean = -d * e
        d_lv = 0.5 * (1.0 - tl.exp(post_logvar - lv_p) - d * d * e)
    return d_mean, d_lv


@triton.jit
def _vlb_load(x0_ptr, out_ptr, noise_ptr, seed_ptr, b, q, j, mask, g, D, D_OUT, HAS_NOISE: tl.constexpr,
              VAR_TYPE: tl.constexpr, IS_F64: tl.constexpr):
    """x0, the mean channel m, the variance channel vraw (0 when fixed) and eps of elements j of
    sample b, and out's offsets of m; out's sample is [C', ...] with the C mean channels first, so
    m is at j and vraw at D + j in it."""
    offs = b.to(tl.int64) * D + j
    o_offs = b.to(tl.int64) * D_OUT + j
    x0 = _to_compute(tl.load(x0_ptr + offs, mask=mask), IS_F64)
    m = _to_compute(tl.load(out_ptr + o_offs, mask=mask), IS_F64)
    if VAR_TYPE != 2:
        vraw = _to_compute(tl.load(out_ptr + o_offs + D, mask=mask), IS_F64)
    else:
        vraw = m
    eps = _noise_or_load(noise_ptr, offs, mask, seed_ptr, q, g, HAS_NOISE, IS_F64)
    return x0, m, vraw, eps, o_offs


@triton.jit
def vlb_partial_kernel(x0_ptr, out_ptr, t_ptr, tables_ptr, noise_ptr, seed_ptr, res_ptr, D, D_OUT, nblk, n_steps,
                       blocks_per_chunk, nchunk, sample_offset, HAS_NOISE: tl.constexpr, MEAN_TYPE: tl.constexpr,
                       VAR_TYPE: tl.constexpr, FINAL: tl.constexpr, IS_F64: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Sums of (target - m)^2 and of the vb term over chunk ``pid % nchunk`` of sample
    ``pid // nchunk`` (D elements of x0 per sample, D_OUT of out), in a fixed order as
    mse_partial_kernel's: res [B * nchunk, 2]; FINAL (one chunk per sample): res [B, 2] =
    (mse, vb in bits)."""
    pid = tl.program_id(0)
    b = pid // nchunk
    first = (pid % nchunk) * blocks_per_chunk
    last = tl.minimum(first + blocks_per_chunk, nblk)
    g = b.to(tl.int64) + sample_offset
    (is_zero, sqrt_ab, sqrt_1m_ab, post_c1, post_c2, post_logvar, log_beta, s_rab, s_rm1ab,
     fixed_logvar) = _vlb_row(t_ptr, b, tables_ptr, n_steps, IS_F64)
    acc_m = _to_compute(tl.zeros((BLOCK_Q, 4), dtype=tl.float32), IS_F64)
    acc_v = _to_compute(tl.zeros((BLOCK_Q, 4), dtype=tl.float32), IS_F64)
    for blk in range(first, last):
        q, j, mask = _tile(blk, D, BLOCK_Q)
        x0, m, vraw, eps, o_offs = _vlb_load(x0_ptr, out_ptr, noise_ptr, seed_ptr, b, q, j, mask, g, D, D_OUT,
                                             HAS_NOISE, VAR_TYPE, IS_F64)
        target, mean_q, mean_p, lv_p, dlv_dv, dmp_dm = _vlb_elem(
            x0, m, vraw, eps, sqrt_ab, sqrt_1m_ab, post_c1, post_c2, post_logvar, log_beta, s_rab, s_rm1ab,
            fixed_logvar, MEAN_TYPE, VAR_TYPE)
        diff = target - m
        acc_m += tl.where(mask, diff * diff, 0.0)
        acc_v += tl.where(mask, _vlb_term(is_zero, x0, mean_q, mean_p, post_logvar, lv_p), 0.0)
    total_m = tl.sum(tl.sum(acc_m, axis=1), axis=0)
    total_v = tl.sum(tl.sum(acc_v, axis=1), axis=0)
    if FINAL:
        tl.store(res_ptr + b * 2, total_m / D)
        tl.store(res_ptr + b * 2 + 1, total_v / D / LN2)
    else:
        tl.store(res_ptr + pid * 2, total_m)
        tl.store(res_ptr + pid * 2 + 1, total_v)


@triton.jit
def vlb_finish_kernel(partial_ptr, res_ptr, nchunk, D, BLOCK: tl.constexpr):
    """(mse, vb in bits) of sample b from its nchunk chunk sums [nchunk, 2], in a fixed order."""
    b = tl.program_id(0)
    row = b.to(tl.int64) * nchunk * 2
    acc_m = tl.zeros((BLOCK,), dtype=partial_ptr.dtype.element_ty)
    acc_v = tl.zeros((BLOCK,), dtype=partial_ptr.dtype.element_ty)
    for start in range(0, nchunk, BLOCK):
        i = start + tl.arange(0, BLOCK)
        acc_m += tl.load(partial_ptr + row + i * 2, mask=i < nchunk, other=0.0)
        acc_v += tl.load(partial_ptr + row + i * 2 + 1, mask=i < nchunk, other=0.0)
    tl.store(res_ptr + b * 2, tl.sum(acc_m, axis=0) / D)
    tl.store(res_ptr + b * 2 + 1, tl.sum(acc_v, axis=0) / D / LN2)


@triton.jit
def vlb_backward_kernel(grad_ptr, x0_ptr, out_ptr, t_ptr, tables_ptr, noise_ptr, seed_ptr, res_ptr, D, D_OUT, nblk,
                        n_steps, sample_offset, HAS_NOISE: tl.constexpr, MEAN_TYPE: tl.constexpr,
                        VAR_TYPE: tl.constexpr, DETACH: tl.constexpr, IS_F64: tl.constexpr, BLOCK_Q: tl.constexpr):
    """d/dout of grad[b, 0] mse_b + grad[b, 1] vb_b (res: out's shape, contiguous): the mean
    channels get the MSE's 2 (m - target) / D (plus, without DETACH, the vb term's through
    mean_p), the variance channels the vb term's through lv_p."""
    pid = tl.program_id(0)
    b = pid // nblk
    q, j, mask = _tile(pid % nblk, D, BLOCK_Q)
    g = b.to(tl.int64) + sample_offset
    (is_zero, sqrt_ab, sqrt_1m_ab, post_c1, post_c2, post_logvar, log_beta, s_rab, s_rm1ab,
     fixed_logvar) = _vlb_row(t_ptr, b, tables_ptr, n_steps, IS_F64)
    g_mse = _to_compute(tl.load(grad_ptr + b * 2), IS_F64)
    w = _to_compute(tl.load(grad_ptr + b * 2 + 1), IS_F64) / D / LN2
    x0, m, vraw, eps, o_offs = _vlb_load(x0_ptr, out_ptr, noise_ptr, seed_ptr, b, q, j, mask, g, D, D_OUT,
                                         HAS_NOISE, VAR_TYPE, IS_F64)
    target, mean_q, mean_p, lv_p, dlv_dv, dmp_dm = _vlb_elem(
        x0, m, vraw, eps, sqrt_ab, sqrt_1m_ab, post_c1, post_c2, post_logvar, log_beta, s_rab, s_rm1ab,
        fixed_logvar, MEAN_TYPE, VAR_TYPE)
    dm = g_mse * 2.0 / D * (m - target)
    # (Unused when DETACH and fixed: the compiler drops it.)
    d_mean, d_lv = _vlb_term_grads(is_zero, x0, mean_q, mean_p, post_logvar, lv_p)
    if not DETACH:
        dm += w * d_mean * dmp_dm
    if VAR_TYPE != 2:
        tl.store(res_ptr + o_offs + D, _to_out(w * d_lv * dlv_dv, res_ptr), mask=mask)
    tl.store(res_ptr + o_offs, _to_out(dm, res_ptr), mask=mask)
