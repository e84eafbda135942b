"""The known answers of docs/noise.md, parsed from its marked table, against the code.

Each row is checked against fastddpm.philox (the oracle), the independent NumPy version where it
has the function (tests/np_philox.py), and the kernels: the CPU kernels of every instruction-set
build this CPU can run, and every kernel backend present or expected (backends_under_test). So
the document cannot drift from the code, nor the code from the document.
"""
import pathlib
import re

import numpy as np
import pytest
import torch

from backends_under_test import device_for, kernel_backends
from fastddpm import _extension, ops, philox
import np_philox

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "noise.md"
BEGIN, END = "<!-- known-answers:begin -->", "<!-- known-answers:end -->"
KINDS = ("philox", "uniform", "normal", "t")
# The document's bound on normals across backends ("agree to about 1e-6").
NORMAL_ATOL = 1e-6


def _parse():
    text = DOC.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{DOC} must hold one marked table"
    block = text.split(BEGIN)[1].split(END)[0]
    lines = [ln.strip() for ln in block.strip().splitlines()]
    assert lines[0] == "| kind | inputs | expected |" and set(lines[1]) <= set("|-"), lines[:2]
    rows = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == 3, f"a known-answer row needs 3 cells: {ln!r}"
        kind, inputs, expected = cells
        assert kind in KINDS, f"unknown kind {kind!r} in {ln!r}"
        args = {}
        for tok in inputs.split():
            name, _, value = tok.partition("=")
            args[name] = [int(v, 0) for v in value.split(",")]
        rows.append((kind, args, expected.split()))
    return rows


ROWS = _parse()


def _rows(kind):
    return [pytest.param(args, exp, id=f"{kind}{i}") for i, (k, args, exp) in enumerate(ROWS) if k == kind]


def _signed(seed):
    return seed - 2**64 if seed >= 2**63 else seed


def _consecutive(values):
    assert values == list(range(values[0], values[0] + len(values))), f"not consecutive: {values}"
    return values[0], len(values)


def _on_every_cpu_build(check):
    """check(C, isa) once per CPU build of the kernels this CPU runs; the best one is restored."""
    C = _extension.load()
    assert C is not None, f"fastddpm._C is not built or failed to load: {_extension.error()}"
    best = C.cpu_isa()
    try:
        for isa in C.cpu_isas():
            C.set_cpu_isa(isa)
            check(C, isa)
    finally:
        C.set_cpu_isa(best)


def test_the_table_has_every_kind():
    kinds = [k for k, _, _ in ROWS]
    for kind in KINDS:
        assert kind in kinds, f"docs/noise.md has no {kind!r} known answer"
    assert kinds.count("philox") >= 2


@pytest.mark.parametrize("args,expected", _rows("philox"))
def test_philox_words(args, expected):
    key, ctr = args["key"], args["counter"]
    want = tuple(int(w, 16) for w in expected)
    got = philox.philox4x32_10(*(torch.tensor(c) for c in ctr), *(torch.tensor(k) for k in key))
    assert tuple(int(w) for w in got) == want
    assert tuple(int(w) for w in np_philox.philox(np.array(ctr, dtype=np.uint64), key)) == want


@pytest.mark.parametrize("args,expected", _rows("uniform"))
def test_uniforms(args, expected):
    (seed,), (g,), (q,) = args["seed"], args["g"], args["q"]
    want = torch.tensor([int(b, 16) for b in expected], dtype=torch.int64).to(torch.int32)
    # The oracle: Philox words of counter (q lo, q hi, g lo, g hi) under key (seed lo, seed hi).
    k, qt, gt = torch.tensor(_signed(seed)), torch.tensor(q), torch.tensor(g)
    m = philox.MASK32
    words = philox.philox4x32_10(qt & m, qt >> 32, gt & m, gt >> 32, k & m, (k >> 32) & m)
    assert torch.equal(torch.stack([philox.uniform(w) for w in words]).view(torch.int32), want)
    # The CPU kernels, every build: quads 0..q of sample g.
    def cpu_check(C, isa):
        got = torch.frombuffer(bytearray(C.philox_uniforms(seed, g, q + 1)), dtype=torch.float32)
        assert torch.equal(got[4 * q:].view(torch.int32), want), isa

    _on_every_cpu_build(cpu_check)
    # The Triton kernels (on a GPU, or in Triton's interpreter on CPU tensors).
    if "triton" in kernel_backends():
        device = device_for("triton")
        from fastddpm.backends.triton import ops as triton_ops
        got = triton_ops.contract_uniforms(torch.tensor([_signed(seed)], device=device),
                                           torch.tensor([q], device=device), g)
        assert torch.equal(got.reshape(-1).cpu().view(torch.int32), want)


@pytest.mark.parametrize("args,expected", _rows("normal"))
def test_normals(args, expected):
    (seed,), (g,) = args["seed"], args["g"]
    j0, n = _consecutive(args["j"])
    # 9 significant digits name one float32 exactly: the oracle must give those bits.
    want = torch.tensor([float(v) for v in expected], dtype=torch.float32)
    assert len(want) == n
    d = j0 + n
    ref = philox.normal(torch.tensor([_signed(seed)]), g, (1, d))[0, j0:]
    assert torch.equal(ref, want), ref.tolist()

    def kernel_noise(backend, device):
        # q_sample with sqrt_ab = 0 and sqrt_1m_ab = 1 returns the in-kernel noise itself.
        zero, one = torch.zeros(1, device=device), torch.ones(1, device=device)
        x_t = ops.q_sample(torch.zeros(1, d, device=device), 0, zero, one, seed=seed, sample_offset=g,
                           backend=backend)
        return x_t[0, j0:].cpu()

    _on_every_cpu_build(lambda C, isa: torch.testing.assert_close(
        kernel_noise("cpu", "cpu"), want, rtol=0, atol=NORMAL_ATOL, msg=isa))
    for backend in kernel_backends():
        torch.testing.assert_close(kernel_noise(backend, device_for(backend)), want, rtol=0,
                                   atol=NORMAL_ATOL, msg=backend)


@pytest.mark.parametrize("args,expected", _rows("t"))
def test_timesteps(args, expected):
    (seed,), (n_steps,) = args["seed"], args["n_steps"]
    g0, n = _consecutive(args["g"])
    want = [int(v) for v in expected]
    assert len(want) == n
    assert philox.timesteps(torch.tensor([_signed(seed)]), n, n_steps, g0).tolist() == want
    assert np_philox.timesteps(seed, g0, n, n_steps) == want
    for backend in kernel_backends():
        got = ops.sample_t(seed, n, n_steps, sample_offset=g0, device=device_for(backend), backend=backend)
        assert got.cpu().tolist() == want, backend
