"""An independent NumPy (uint64) implementation of the noise contract (docs/noise.md), for tests only.

Written separately from fastddpm/philox.py so the reference backend is checked against a
second implementation, not against itself.
"""
import numpy as np

M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
W = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))
LO = np.uint64(0xFFFFFFFF)


def philox(ctr, key):
    """ctr: uint64 array [..., 4] of 32-bit words; key: (k0, k1) ints. Returns [..., 4]."""
    c = [np.asarray(ctr[..., i], dtype=np.uint64) for i in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    with np.errstate(over="ignore"):
        for r in range(10):
            p0 = M[0] * c[0]  # < 2**64: exact in uint64
            p1 = M[1] * c[2]
            c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & LO, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & LO]
            k0 = (k0 + W[0]) & LO
            k1 = (k1 + W[1]) & LO
    return np.stack(c, axis=-1)


def uniform(words):
    s = words.astype(np.uint32).view(np.int32).astype(np.int64)
    s = np.where(s < 0, -s - 1, s)
    return s.astype(np.float32) * np.float32(4.6566127342e-10)


def normals(seed, sample_offset, batch, d):
    """float64 normals [batch, d] computed from the float32 uniforms (exact Box-Muller)."""
    key = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    q = np.arange((d + 3) // 4, dtype=np.uint64)
    g = sample_offset + np.arange(batch, dtype=np.uint64)
    ctr = np.zeros((batch, q.size, 4), dtype=np.uint64)
    ctr[..., 0] = q[None, :] & LO
    ctr[..., 1] = q[None, :] >> np.uint64(32)
    ctr[..., 2] = (g[:, None] & LO)
    ctr[..., 3] = g[:, None] >> np.uint64(32)
    u = uniform(philox(ctr, key)).astype(np.float64)
    th01 = np.float64(np.float32(2 * np.pi) * np.float32(u[..., 1]))
    th23 = np.float64(np.float32(2 * np.pi) * np.float32(u[..., 3]))
    r01 = np.sqrt(-2 * np.log(np.maximum(u[..., 0], 1e-7)))
    r23 = np.sqrt(-2 * np.log(np.maximum(u[..., 2], 1e-7)))
    z = np.stack([r01 * np.cos(th01), r01 * np.sin(th01), r23 * np.cos(th23), r23 * np.sin(th23)], -1)
    return z.reshape(batch, -1)[:, :d]


def timesteps(seed, sample_offset, batch, n_steps):
    key = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    g = sample_offset + np.arange(batch, dtype=np.uint64)
    ctr = np.zeros((batch, 4), dtype=np.uint64)
    ctr[:, 0] = ctr[:, 1] = LO
    ctr[:, 2] = g & LO
    ctr[:, 3] = g >> np.uint64(32)
    w0 = philox(ctr, key)[:, 0]
    return [(int(w) * n_steps) >> 32 for w in w0]
