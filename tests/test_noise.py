"""The noise contract (fastddpm/philox.py) as the reference backend implements it."""
import numpy as np
import pytest
import scipy.stats
import torch

from fastddpm import philox
import np_philox
from helpers import NOISE_TOL


def _words(*ws):
    return [torch.tensor(w, dtype=torch.int64) for w in ws]


@pytest.mark.parametrize("ctr,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
])
def test_philox_known_answers(ctr, key, expected):
    out = philox.philox4x32_10(*_words(*ctr), *_words(*key))
    assert tuple(int(w) for w in out) == expected
    assert tuple(int(w) for w in np_philox.philox(np.array(ctr, dtype=np.uint64), key)) == expected


def test_philox_matches_independent_numpy_on_random_words():
    rng = np.random.default_rng(0)
    ctr = rng.integers(0, 2**32, size=(4096, 4), dtype=np.uint64)
    for key in [(0, 0), (0xFFFFFFFF, 1), tuple(int(k) for k in rng.integers(0, 2**32, 2))]:
        expect = np_philox.philox(ctr, key)
        c = torch.from_numpy(ctr.astype(np.int64))
        got = philox.philox4x32_10(c[:, 0], c[:, 1], c[:, 2], c[:, 3], *_words(*key))
        np.testing.assert_array_equal(torch.stack(got, -1).numpy(), expect.astype(np.int64))


def test_uniform_is_bit_exact_and_in_unit_interval():
    words = np.concatenate([np.array([0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1], dtype=np.uint64),
                            np.random.default_rng(1).integers(0, 2**32, 10000, dtype=np.uint64)])
    got = philox.uniform(torch.from_numpy(words.astype(np.int64)))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), np_philox.uniform(words))
    assert float(got.min()) >= 0.0 and float(got.max()) < 1.0


@pytest.mark.parametrize("seed", [0, 12345, 2**63 - 1, 0xDEADBEEF_CAFEF00D])
@pytest.mark.parametrize("shape,offset", [((3, 7), 0), ((2, 1, 5, 3), 11), ((5,), 2**33 + 3)])
def test_normals_match_independent_float64(seed, shape, offset):
    signed = seed - 2**64 if seed >= 2**63 else seed
    got = philox.normal(torch.tensor([signed]), offset, shape)
    d = int(np.prod(shape[1:]))
    expect = np_philox.normals(seed, offset, shape[0], d).reshape(shape)
    assert got.dtype == torch.float32 and got.shape == shape
    torch.testing.assert_close(got.double(), torch.from_numpy(expect), **NOISE_TOL)


def test_normals_statistics():
    z = philox.normal(torch.tensor([7]), 0, (64, 4096)).double()
    flat = z.flatten()
    assert abs(float(flat.mean())) < 5 / flat.numel() ** 0.5
    assert abs(float(flat.std()) - 1) < 0.01
    assert scipy.stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    # Independence across samples, across lanes of one Philox call, and across seeds (calls).
    corr_samples = torch.corrcoef(z[:, :256])  # 64 x 64
    off_diag = corr_samples[~torch.eye(64, dtype=torch.bool)]
    assert float(off_diag.abs().max()) < 0.3
    lanes = flat.reshape(-1, 4)
    lane_corr = torch.corrcoef(lanes.T)[~torch.eye(4, dtype=torch.bool)]
    assert float(lane_corr.abs().max()) < 0.02
    other = philox.normal(torch.tensor([8]), 0, (64, 4096)).double().flatten()
    assert abs(float(torch.corrcoef(torch.stack([flat, other]))[0, 1])) < 0.02


def test_sample_noise_depends_only_on_its_global_index():
    seed = torch.tensor([99])
    full = philox.normal(seed, 0, (8, 3, 5, 5))
    # A smaller batch starting at global index 3, and a batch of one: same rows.
    torch.testing.assert_close(philox.normal(seed, 3, (4, 3, 5, 5)), full[3:7], rtol=0, atol=0)
    torch.testing.assert_close(philox.normal(seed, 5, (1, 3, 5, 5)), full[5:6], rtol=0, atol=0)
    # The layout of a sample's elements does not matter, only their flat index.
    torch.testing.assert_close(philox.normal(seed, 0, (8, 75)), full.reshape(8, 75), rtol=0, atol=0)


@pytest.mark.parametrize("n_steps", [1, 7, 1000, 2**31 - 1])
def test_timesteps_match_independent(n_steps):
    for seed, offset in [(0, 0), (31337, 5), (2**40 + 17, 2**32 + 1)]:
        got = philox.timesteps(torch.tensor([seed]), 300, n_steps, offset)
        assert got.dtype == torch.int64
        assert got.tolist() == np_philox.timesteps(seed, offset, 300, n_steps)


def test_timesteps_are_uniform():
    t = philox.timesteps(torch.tensor([3]), 20000, 10, 0)
    counts = torch.bincount(t, minlength=10).numpy()
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
