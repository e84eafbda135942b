"""The noise contract (docs/noise.md) in plain PyTorch integer arithmetic (the oracle).

Every value here is an int64 tensor holding an unsigned 32-bit word. Products of two words
are formed from 16-bit halves so no intermediate exceeds 2**49: nothing relies on signed
overflow, and the same code runs on any device.

Stream: the normal for element ``j`` of the sample with global index ``g`` comes from
Philox4x32-10 with key ``(seed lo, seed hi)`` and counter ``(q lo, q hi, g lo, g hi)``,
``q = j // 4``, lane ``j % 4``. The timestep that ``loss`` draws for sample ``g`` is word 0 at
counter ``(0xFFFFFFFF, 0xFFFFFFFF, g lo, g hi)`` mapped to ``(w0 * n_steps) >> 32``.
"""
import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
# float32 bits 0x2FFFFFFF: Triton's uint_to_uniform_float scale, just below 2**-31.
UNIFORM_SCALE = 4.6566127342e-10
BOX_MULLER_MIN_U = 1e-7
TWO_PI = 6.283185307179586
T_COUNTER_WORD = MASK32  # counter words 0 and 1 of the timestep stream


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of the 64-bit product of the constant ``a`` and words ``b``."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    lo_part = a_lo * b  # < 2**48
    hi_part = a_hi * b  # < 2**48, weight 2**16
    mid = lo_part + ((hi_part & 0xFFFF) << 16)  # < 2**49
    lo = mid & MASK32
    hi = (hi_part >> 16) + (mid >> 32)
    return hi & MASK32, lo


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Random123 constants) on broadcastable int64 word tensors."""
    for i in range(10):
        if i:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: word as int32, negatives x -> -x-1, times 2**-31 (fp32)."""
    folded = torch.where(word >= 2**31, MASK32 - word, word)  # == -x-1 of the int32 view
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def _key(seed: torch.Tensor):
    seed = seed.reshape(()).to(torch.int64)
    return seed & MASK32, (seed >> 32) & MASK32


def normal(seed: torch.Tensor, sample_offset: int, shape, device=None) -> torch.Tensor:
    """float32 normals of ``shape`` (batch first) for ``(seed, sample_offset)``."""
    device = seed.device if device is None else device
    shape = tuple(shape)
    batch = shape[0]
    d = 1
    for s in shape[1:]:
        d *= s
    quads = (d + 3) // 4
    k0, k1 = _key(seed.to(device))
    q = torch.arange(quads, dtype=torch.int64, device=device).view(1, quads)
    g = (sample_offset + torch.arange(batch, dtype=torch.int64, device=device)).view(batch, 1)
    w = philox4x32_10(q & MASK32, q >> 32, g & MASK32, g >> 32, k0, k1)
    u0, u1, u2, u3 = (uniform(x) for x in w)
    two_pi = torch.tensor(TWO_PI, dtype=torch.float32)
    r01 = torch.sqrt(-2.0 * torch.log(torch.clamp(u0, min=BOX_MULLER_MIN_U)))
    r23 = torch.sqrt(-2.0 * torch.log(torch.clamp(u2, min=BOX_MULLER_MIN_U)))
    th01 = two_pi * u1
    th23 = two_pi * u3
    lanes = torch.stack([r01 * torch.cos(th01), r01 * torch.sin(th01),
                         r23 * torch.cos(th23), r23 * torch.sin(th23)], dim=-1)
    return lanes.reshape(batch, quads * 4)[:, :d].reshape(shape)


def timesteps(seed: torch.Tensor, batch: int, n_steps: int, sample_offset: int) -> torch.Tensor:
    """int64 timesteps in [0, n_steps) that ``loss`` draws for samples offset..offset+batch-1."""
    device = seed.device
    k0, k1 = _key(seed)
    g = sample_offset + torch.arange(batch, dtype=torch.int64, device=device)
    ones = torch.full_like(g, T_COUNTER_WORD)
    w0 = philox4x32_10(ones, ones, g & MASK32, g >> 32, k0, k1)[0]
    # (w0 * n) >> 32 without a 64-bit overflow: split w0 into 16-bit halves.
    hi, lo = w0 >> 16, w0 & 0xFFFF
    return (hi * n_steps + ((lo * n_steps) >> 16)) >> 16
