"""The GPU report in one command: check every GPU backend against the reference on the GPU, then
time op x size x provider beside a device-to-device copy, as markdown.

    python -m benchmarks.gpu_report                    # a CUDA machine: prints the report
    python -m benchmarks.gpu_report --output gpu.md    # and writes it to a file
    python -m benchmarks.gpu_report --device cpu       # dry run of every code path on CPU:
                                                       # Triton's interpreter, tiny sizes

Exit status 1 when any check fails. Checks: each op of each GPU backend (triton; cuda when
built) against the reference backend on random odd shapes in every dtype, noise (uniforms bit
for bit, normals within 1e-5), sample_t, gradients, bitwise-deterministic MSE, a tensor of
more than 2**31 elements, torch.library.opcheck, torch.compile(fullgraph=True) of the ops and
kernel launches per op. opcheck's fake-tensor test and torch.compile of a triton_op cannot run
under Triton's interpreter, so those run here, on the GPU, and not in tests/.

Timings: each case of fastddpm/cli/benchmarking.py (its sizes plus 2**26 and 2**28 elements, its
inputs, bytes moved and providers: copy_, fastddpm-<backend> through the public API, eager
labml-style code and torch.compile of it) and the bare ops of each kernel backend (<backend>-op),
as medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call). GB/s is
the case's least bytes moved over the median, so it compares like with like; "% of copy"
divides it by the bandwidth of ``copy_`` on the same tensor in the same run. Past --budget-s the
timings left are skipped (and listed), so the report finishes in under 5 minutes.
"""
import argparse
import math
import os
import platform
import sys
import time

import torch
from torch.testing import assert_close

import fastddpm
from fastddpm import ops, philox, schedule
from fastddpm.cli import benchmarking

N_STEPS = 1000
# fastddpm.cli.benchmarking's sizes (the CPU kernels issue's) plus 2**26 and 2**28 elements.
GPU_SIZES = {**benchmarking.SIZES, "2^26": (4096, 4, 64, 64), "2^28": (16384, 4, 64, 64)}
CPU_SIZES = {"tiny": (1, 1, 4, 4), "odd": (3, 1100)}  # the dry run: the interpreter is slow
CIFAR = benchmarking.SIZES["cifar"]
GPU_BACKENDS = ("triton", "cuda")
OP_NAMESPACE = {"triton": "fastddpm_triton", "cuda": "fastddpm"}
DEFAULT_PROVIDERS = ("copy_", "triton-op", "fastddpm-triton", "cuda-op", "fastddpm-cuda", "eager", "compile")
BANDWIDTH_CASES = ("q_sample_noise", "q_sample_draw", "p_sample_draw", "mse_fwd_bwd")
BANDWIDTH_GOAL = 0.85
GOAL_BYTES = 256 * 2**20
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
       torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
NOISE_ATOL = 1e-5


def _size_name(shape):
    n = math.prod(shape)
    name = "x".join(map(str, shape))
    return f"{name} (2^{n.bit_length() - 1})" if n >= 2**20 and n & (n - 1) == 0 else name


def _tol(dtype, generated):
    if dtype == torch.float64 and generated:  # float32 normals, libm vs GPU math
        return dict(rtol=1e-6, atol=2e-6)
    return TOL[dtype]


# ---- checks ---------------------------------------------------------------------------

class Checks:
    """Rows of (backend, check, status, detail, seconds); an exception is a FAIL."""

    def __init__(self):
        self.rows = []

    def run(self, backend, name, fn):
        start = time.perf_counter()
        try:
            detail, status = fn() or "", "PASS"
        except Exception as e:  # noqa: BLE001 - every failure becomes a row of the report
            status, detail = "FAIL", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        self.rows.append((backend, name, status, detail, time.perf_counter() - start))

    def not_run(self, backend, name, why):
        self.rows.append((backend, name, "n/a", why, 0.0))

    @property
    def failed(self):
        return [r for r in self.rows if r[2] == "FAIL"]


class Setup:
    """Per-t tables and random data on one device."""

    def __init__(self, device):
        self.device = device
        tabs = schedule.coefficient_tables(schedule.linear(N_STEPS))
        self.tables = {dt: {k: v.to(device, dt) for k, v in tabs.items()} for dt in (torch.float32, torch.float64)}
        self.gen = torch.Generator(device).manual_seed(0)

    def tabs(self, dtype):
        return self.tables[torch.float64 if dtype == torch.float64 else torch.float32]

    def randn(self, shape, dtype=torch.float32):
        return torch.randn(shape, device=self.device, generator=self.gen).to(dtype)

    def t(self, batch):
        return torch.randint(0, N_STEPS, (batch,), device=self.device, generator=self.gen)

    def seed(self):
        return ops.draw_seed(self.device, self.gen)


# Odd on purpose: D = 105, 1311 (two blocks), 18483 (two MSE chunks), 1. Under the
# interpreter (the dry run) only the small ones: it runs each program in Python.
CHECK_SHAPES = {"cuda": [(3, 5, 7, 3), (2, 3, 19, 23), (2, 3, 101, 61), (1, 1)],
                "cpu": [(3, 5, 7, 3), (1, 1)]}
DETERMINISM_SHAPE = {"cuda": (8, 3, 128, 129), "cpu": (2, 3, 101, 61)}


def _check_op(s, backend, op, dtype):
    tabs = s.tabs(dtype)
    shapes = CHECK_SHAPES[s.device]
    for shape in shapes:
        for generated in (False, True):
            x, y, noise = s.randn(shape, dtype), s.randn(shape, dtype), s.randn(shape, dtype)
            noise = None if generated else noise
            t, seed = s.t(shape[0]), s.seed()
            if op == "q_sample":
                call = lambda b: ops.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], noise, seed=seed,
                                              sample_offset=3, backend=b)
            elif op == "p_sample_step":
                call = lambda b: ops.p_sample_step(x, y, t, tabs["c1"], tabs["c2"], tabs["sigma"], noise,
                                                   seed=seed, sample_offset=3, backend=b)
            else:
                call = lambda b: ops.mse_per_sample(x, noise, seed=seed, sample_offset=3, backend=b)
            tol = _tol(dtype, generated)
            if op == "mse_per_sample" and dtype != torch.float64:
                tol = dict(rtol=1e-5, atol=1e-6)
            assert_close(call(backend), call("reference"), **tol,
                         msg=lambda m: f"{shape} noise {'generated' if generated else 'given'}: {m}")
    return f"{len(shapes)} shapes, noise given and generated"


def _check_noise(s, backend):
    shape = (3, 2, 17, 31)
    x0 = s.randn(shape)
    zeros = torch.zeros(N_STEPS, device=s.device)
    ones = torch.ones(N_STEPS, device=s.device)
    worst = 0.0
    for seed, offset in [(0, 0), (12345, 2**32 + 1), (2**64 - 3, 7)]:
        got = ops.q_sample(x0, s.t(3), zeros, ones, seed=seed, sample_offset=offset, backend=backend)
        seed_t = torch.tensor([seed - 2**64 if seed >= 2**63 else seed], dtype=torch.int64, device=s.device)
        expect = philox.normal(seed_t, offset, shape)
        assert_close(got, expect, rtol=0, atol=NOISE_ATOL)
        worst = max(worst, (got - expect).abs().max().item())
    return f"max |normal - reference| = {worst:.2e}"


def _check_normal_op(s, backend):
    """ops.normal gives q_sample's in-kernel noise bit for bit, and other dtypes round it."""
    shape = (3, 2, 17, 31)
    zeros = torch.zeros(N_STEPS, device=s.device)
    for seed, offset in [(0, 0), (2**64 - 3, 2**32 + 1)]:
        got = ops.normal(shape, seed=seed, sample_offset=offset, device=s.device, backend=backend)
        x_t = ops.q_sample(s.randn(shape), s.t(3), zeros, zeros + 1, seed=seed, sample_offset=offset, backend=backend)
        if not torch.equal(got, x_t):
            raise AssertionError(f"normal differs from q_sample's noise for seed {seed}")
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            rounded = ops.normal(shape, seed=seed, sample_offset=offset, dtype=dtype, device=s.device, backend=backend)
            if not torch.equal(rounded, got.to(dtype)):
                raise AssertionError(f"normal in {dtype} is not the float32 normals rounded")
    return "equal to q_sample's noise; float16/bfloat16/float64 the float32 normals rounded"


def _check_uniforms(s):
    from fastddpm.backends.triton import ops as triton_ops
    qs = torch.cat([torch.tensor([0, 1, 2**31, 2**32 - 1, 2**32, 2**40 + 9]),
                    torch.randint(0, 2**62, (1000,), generator=torch.Generator().manual_seed(1))])
    for seed, g in [(0, 0), (2**64 - 1, 2**32 + 5), (0x0123456789ABCDEF, 77)]:
        seed_t = torch.tensor([seed - 2**64 if seed >= 2**63 else seed], dtype=torch.int64)
        got = triton_ops.contract_uniforms(seed_t.to(s.device), qs.to(s.device), g).cpu()
        words = philox.philox4x32_10(qs & 0xFFFFFFFF, qs >> 32, torch.full_like(qs, g & 0xFFFFFFFF),
                                     torch.full_like(qs, g >> 32), torch.tensor(seed & 0xFFFFFFFF),
                                     torch.tensor(seed >> 32))
        expect = torch.stack([philox.uniform(w) for w in words], dim=-1)
        if not torch.equal(got, expect):
            raise AssertionError(f"uniforms differ for seed {seed:#x}, g {g}")
    return f"{qs.numel() * 4 * 3} uniforms bit for bit"


def _check_sample_t(s, backend):
    for seed, offset, batch, n in [(0, 0, 5, 1000), (2**63 + 11, 2**33, 3000, 7), (99, 7, 1, 2**31 - 1)]:
        got = ops.sample_t(seed, batch, n, sample_offset=offset, device=s.device, backend=backend)
        expect = ops.sample_t(seed, batch, n, sample_offset=offset, device=s.device, backend="reference")
        if not torch.equal(got, expect):
            raise AssertionError(f"sample_t differs for seed {seed}, n_steps {n}")
    return "equal"


def _check_gradients(s, backend, dtype):
    tabs, shape = s.tabs(dtype), (3, 2, 5, 7)
    t, seed = s.t(3), s.seed()
    x, e, n = s.randn(shape, dtype), s.randn(shape, dtype), s.randn(shape, dtype)
    w = s.randn((3,))
    cases = [
        (lambda b, x, n: ops.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], n, backend=b), [x, n], False),
        (lambda b, x, e, n: ops.p_sample_step(x, e, t, tabs["c1"], tabs["c2"], tabs["sigma"], n, backend=b),
         [x, e, n], False),
        (lambda b, p, tg: ops.mse_per_sample(p, tg, backend=b), [x, e], False),
        (lambda b, p: ops.mse_per_sample(p, seed=seed, backend=b), [x], True),
    ]
    for fn, inputs, generated in cases:
        grads = {}
        for b in (backend, "reference"):
            leaves = [v.detach().clone().requires_grad_(True) for v in inputs]
            out = fn(b, *leaves)
            ((out * w.view((-1,) + (1,) * (out.dim() - 1)).to(out.dtype)).sum() + out.mean()).backward()
            grads[b] = [v.grad for v in leaves]
        for g, g_ref in zip(grads[backend], grads["reference"]):
            assert_close(g, g_ref, **_tol(dtype, generated))
    return "q_sample, p_sample_step, mse (target given and regenerated)"


def _check_deterministic(s, backend):
    pred = s.randn(DETERMINISM_SHAPE[s.device])  # several MSE chunks per sample
    seed = s.seed()
    first = ops.mse_per_sample(pred, seed=seed, backend=backend)
    for _ in range(3):
        if not torch.equal(first, ops.mse_per_sample(pred, seed=seed, backend=backend)):
            raise AssertionError("per-sample MSE changed between identical calls")
    return f"4 calls at {_size_name(pred.shape)}, same bits"


def _check_huge(s, backend):
    """More than 2**31 elements: the last sample (offset > 2**31) against the reference."""
    shape, dtype = (9, 2**28), torch.float16  # 2.4e9 elements, 4.8 GB per tensor
    x0 = torch.randn(shape, device=s.device, dtype=dtype, generator=s.gen)
    t = s.t(shape[0])
    tabs = s.tabs(dtype)
    seed = s.seed()
    got = ops.q_sample(x0, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], seed=seed, backend=backend)[-1:]
    expect = ops.q_sample(x0[-1:], t[-1:], tabs["sqrt_ab"], tabs["sqrt_1m_ab"], seed=seed,
                          sample_offset=shape[0] - 1, backend="reference")
    assert_close(got, expect, **TOL[dtype])
    del got, expect
    got = ops.mse_per_sample(x0, seed=seed, backend=backend)[-1:]
    expect = ops.mse_per_sample(x0[-1:], seed=seed, sample_offset=shape[0] - 1, backend="reference")
    assert_close(got, expect, rtol=1e-4, atol=0)  # a 2**28-term float32 sum
    return "q_sample and mse of a [9, 2^28] float16 tensor, last sample"


def _sample_args(s, ns_name):
    x, y, n = s.randn((3, 2, 5, 7)), s.randn((3, 2, 5, 7)), s.randn((3, 2, 5, 7))
    t, seed, tabs = s.t(3), s.seed(), s.tabs(torch.float32)
    rg = lambda v: v.clone().requires_grad_(True)  # noqa: E731
    return {
        "q_sample": [(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], None, seed, 3),
                     (rg(x), t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], rg(n), None, 0)],
        "p_sample_step": [(x, y, t, tabs["c1"], tabs["c2"], tabs["sigma"], None, seed, 2),
                          (rg(x), rg(y), t, tabs["c1"], tabs["c2"], tabs["sigma"], rg(n), None, 0)],
        "mse_per_sample": [(rg(x), None, seed, 2), (rg(x), rg(y), None, 0)],
        "mse_per_sample_backward": [(s.randn((3,)), x, None, seed, 2), (s.randn((3,)), x, y, None, 0)],
        "sample_t": [(seed, 5, N_STEPS, 7)],
        "normal": [(seed, [3, 2, 5, 7], 4, torch.float32), (seed, [5, 3], 0, torch.bfloat16)],
    }


def _check_opcheck(s, backend):
    ns = getattr(torch.ops, OP_NAMESPACE[backend])
    for name, arg_list in _sample_args(s, backend).items():
        for args in arg_list:
            torch.library.opcheck(getattr(ns, name).default, args)
    return "schema, autograd registration, fake tensor, aot_dispatch_dynamic"


def _check_compile(s, backend):
    ns = getattr(torch.ops, OP_NAMESPACE[backend])
    tabs = s.tabs(torch.float32)

    def step(x0, t, seed, w):
        x_t = ns.q_sample(x0, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], None, seed, 0)
        pred = x_t * w
        loss = ns.mse_per_sample(pred, None, seed, 0).mean()
        prev = ns.p_sample_step(x_t, pred, t, tabs["c1"], tabs["c2"], tabs["sigma"], None, seed, 0)
        return loss, prev, ns.sample_t(seed, x0.shape[0], N_STEPS, 0)

    x0, t, seed = s.randn((4, 3, 9, 11)), s.t(4), s.seed()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        w = torch.full((1,), 0.9, device=s.device, requires_grad=True)
        loss, prev, ts = fn(x0, t, seed, w)
        loss.backward()
        results.append((loss.detach(), prev, ts, w.grad))
    for got, expect in zip(results[1], results[0]):
        assert_close(got, expect, rtol=1e-6, atol=1e-6)
    return "q_sample, mse fwd+bwd, p_sample_step, sample_t in one fullgraph"


def _check_compile_api(s, backend):
    tabs = s.tabs(torch.float32)

    def f(x0, t, seed):
        x_t = ops.q_sample(x0, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], seed=seed, backend=backend)
        return ops.mse_per_sample(x_t, seed=seed, backend=backend)

    x0, t, seed = s.randn((4, 3, 9, 11)), s.t(4), s.seed()
    assert_close(torch.compile(f, fullgraph=True)(x0, t, seed), f(x0, t, seed), rtol=1e-6, atol=1e-6)
    return "fastddpm.ops with backend=... under fullgraph"


def _launch_counts(s, backend):
    """Kernels launched per call of each op at the CIFAR size, from the CUDA profiler."""
    from torch.profiler import ProfilerActivity, profile
    mod = fastddpm.backends.resolve(backend, torch.device(s.device))
    ns = getattr(torch.ops, OP_NAMESPACE[backend])
    tabs = s.tabs(torch.float32)
    x, y, t, seed = s.randn(CIFAR), s.randn(CIFAR), s.t(CIFAR[0]), s.seed()
    g = s.randn((CIFAR[0],))
    calls = {
        "q_sample": lambda: mod.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], None, seed, 0),
        "p_sample_step": lambda: mod.p_sample_step(x, y, t, tabs["c1"], tabs["c2"], tabs["sigma"], None, seed, 0),
        "mse_per_sample": lambda: mod.mse_per_sample(x, None, seed, 0),
        "mse_per_sample_backward": lambda: ns.mse_per_sample_backward(g, x, None, seed, 0),
        "sample_t": lambda: mod.sample_t(seed, CIFAR[0], N_STEPS, 0),
    }
    counts = {}
    for name, call in calls.items():
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset"))]
        counts[name] = len(kernels)
    return counts


LAYOUT_SHAPES = [(4, 3, 16, 16), (3, 8), (2, 4, 6, 6)]  # D a multiple of 8: every dtype's 16-byte path


def _three_ops(s, dtype, x, y, t, seed):
    tabs = s.tabs(dtype)
    return {
        "q_sample": lambda b: ops.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], seed=seed, sample_offset=5,
                                           backend=b),
        "p_sample_step": lambda b: ops.p_sample_step(x, y, t, tabs["c1"], tabs["c2"], tabs["sigma"], seed=seed,
                                                     sample_offset=5, backend=b),
        "mse_per_sample": lambda b: ops.mse_per_sample(x, seed=seed, sample_offset=5, backend=b),
        "mse given target": lambda b: ops.mse_per_sample(x, y, backend=b),
    }


def _check_layouts(s, backend):
    """The 16-byte path of the kernels (D % 8 == 0), non-contiguous inputs and an expanded t."""
    n = 0
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for shape in LAYOUT_SHAPES:
            x = s.randn(shape, dtype)
            views = [x, s.randn((shape[0], 2) + shape[1:], dtype)[:, 1]]  # contiguous; a strided slice
            if x.dim() == 4:
                views.append(x.to(memory_format=torch.channels_last))
            y = s.randn(shape, dtype)
            t = torch.tensor(737, dtype=torch.int32, device=s.device).expand(shape[0])  # stride 0, int32
            seed = s.seed()
            for v in views:
                for name, call in _three_ops(s, dtype, v, y, t, seed).items():
                    tol = _tol(dtype, name != "mse given target")  # as _check_op chooses
                    if name.startswith("mse") and dtype != torch.float64:
                        tol = dict(rtol=1e-5, atol=1e-6)
                    assert_close(call(backend), call("reference"), **tol,
                                 msg=lambda m: f"{name} {dtype} {shape} strides {v.stride()}: {m}")
                    n += 1
    return f"{n} comparisons"


def _check_poisoned(s, backend):
    """Outputs pre-filled with NaN (deterministic mode makes at::empty fill them): an element the
    kernel skips stays NaN."""
    shape = (5, 3, 13, 7)  # odd D: the scalar path and ragged chunks
    x, y, t, seed = s.randn(shape), s.randn(shape), s.t(shape[0]), s.seed()
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert torch.empty(3, device=s.device).isnan().all(), "deterministic mode did not poison torch.empty"
        for name, call in _three_ops(s, torch.float32, x, y, t, seed).items():
            got = call(backend)
            assert not got.isnan().any(), f"{name}: unwritten (NaN) elements"
            assert_close(got, call("reference"), **_tol(torch.float32, name != "mse given target"))
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
    return "q_sample, p_sample_step, mse (generated and given target)"


def _check_graph_replay(s, backend):
    """ops draws the seed on the device inside the graph, so each replay has fresh noise."""
    x0, t = s.randn((4, 3, 8, 8)), s.t(4)
    zeros = torch.zeros(N_STEPS, device=s.device)
    ones = torch.ones(N_STEPS, device=s.device)

    def step():  # with sqrt_ab = 0 and sqrt_1m_ab = 1, x_t is the noise itself
        seed = ops.draw_seed(s.device)  # what ops.q_sample does with seed=None
        return ops.q_sample(x0, t, zeros, ones, seed=seed, backend=backend), seed

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs advises
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, seed = step()
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, philox.normal(seed.clone(), 0, out.shape), rtol=0, atol=NOISE_ATOL)
        seen.append(int(seed.item()))
    assert len(set(seen)) == 3, f"replays reused seeds {seen}"
    return "3 replays, 3 seeds, noise matches the reference for each"


def run_checks(device, backends):
    checks = Checks()
    s = Setup(device)
    on_gpu = device == "cuda"
    for b in backends:
        for op in ("q_sample", "p_sample_step", "mse_per_sample"):
            for dtype in DTYPES:
                checks.run(b, f"{op} {str(dtype)[6:]} vs reference",
                           lambda: _check_op(s, b, op, dtype))
        checks.run(b, "noise: normals within 1e-5", lambda: _check_noise(s, b))
        checks.run(b, "normal op is the in-kernel noise", lambda: _check_normal_op(s, b))
        if b == "triton":
            checks.run(b, "noise: uniforms bit for bit", lambda: _check_uniforms(s))
        checks.run(b, "sample_t equals reference", lambda: _check_sample_t(s, b))
        for dtype in (torch.float32, torch.bfloat16):
            checks.run(b, f"gradients {str(dtype)[6:]} vs reference", lambda: _check_gradients(s, b, dtype))
        checks.run(b, "mse bitwise deterministic", lambda: _check_deterministic(s, b))
        checks.run(b, "16-byte path, channels_last, sliced, expanded int32 t", lambda: _check_layouts(s, b))
        checks.run(b, "outputs fully written (NaN-poisoned)", lambda: _check_poisoned(s, b))
        gpu_only = {
            "more than 2^31 elements": _check_huge,
            "torch.library.opcheck": _check_opcheck,
            "torch.compile(fullgraph=True) of the ops": _check_compile,
            "torch.compile(fullgraph=True) of fastddpm.ops": _check_compile_api,
            "CUDA graph replays draw fresh noise": _check_graph_replay,
        }
        for name, fn in gpu_only.items():
            if on_gpu:
                checks.run(b, name, lambda: fn(s, b))
                torch.cuda.empty_cache()
            else:
                checks.not_run(b, name, "GPU only (the interpreter cannot trace fake tensors; sizes too large)")
    return checks


# ---- timing ---------------------------------------------------------------------------

def bench(fn, device, rep_ms):
    """Median milliseconds per call: CUDA events (do_bench, L2 flushed) or wall time on CPU."""
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median")
    return 1e3 * benchmarking.median(benchmarking.time_callable(fn, warmup=1, min_time=rep_ms / 1e3,
                                                                 min_rounds=3))


def _bare_op_make(backend):
    """The cases on the bare ops of a kernel backend: no fastddpm.ops validation (whose t range
    check syncs with the host), seed drawn beforehand. What the kernels themselves cost."""
    def make(case, inp):
        mod = fastddpm.backends.resolve(backend, inp.device)
        tab, seed = inp.tables, ops.draw_seed(inp.device)
        if case == "q_sample_noise":
            return lambda: mod.q_sample(inp.x0, inp.t, tab["sqrt_ab"], tab["sqrt_1m_ab"], inp.noise, None, 0)
        if case == "q_sample_draw":
            return lambda: mod.q_sample(inp.x0, inp.t, tab["sqrt_ab"], tab["sqrt_1m_ab"], None, seed, 0)
        if case == "p_sample_draw":
            return lambda: mod.p_sample_step(inp.x0, inp.eps_theta, inp.t, tab["c1"], tab["c2"], tab["sigma"],
                                             None, seed, 0)
        if case == "mse_fwd_bwd":
            def fwd_bwd():
                inp.pred.grad = None
                mod.mse_per_sample(inp.pred, inp.noise, None, 0).mean().backward()
            return fwd_bwd
        return None  # train_step needs the class: the fastddpm-* providers time it
    return make


def providers_for(device, backends, wanted):
    """[(name, make)]: fastddpm.cli.benchmarking's providers that apply on a GPU, plus bare ops."""
    out = []
    for name in wanted:
        if name.endswith("-op"):
            if name[:-3] in backends:
                out.append((name, _bare_op_make(name[:-3])))
        elif name in benchmarking.PROVIDERS:
            prov = benchmarking.PROVIDERS[name]
            if prov.available(torch.device(device))[0]:
                out.append((name, prov.make))
    return out


def run_timings(device, sizes, providers, rep_ms, deadline):
    """{(case, size name) -> {provider -> ms}} and a list of errors and skips.

    A provider that fails records its error; past ``deadline`` (perf_counter seconds) the
    remaining measurements are skipped, so the report always finishes in its time budget.
    """
    results, notes = {}, []
    for size, shape in sizes.items():
        inp = benchmarking.Inputs(shape, device)
        for name, make in providers:
            for case in benchmarking.CASES:
                if time.perf_counter() > deadline:
                    notes.append(f"{name} {case} at {size}: skipped, time budget spent")
                    continue
                try:
                    fn = make(case, inp)
                    if fn is not None:
                        results.setdefault((case, size), {})[name] = bench(fn, device, rep_ms)
                except Exception as e:  # noqa: BLE001 - every failure becomes a line of the report
                    notes.append(f"{name} {case} at {size}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        del inp
        if device == "cuda":
            torch.cuda.empty_cache()
    return results, notes


# ---- report ---------------------------------------------------------------------------

def _gbps(case, shape, ms):
    return benchmarking.bytes_moved(case, shape) / (ms * 1e-3) / 1e9


def render(device, checks, launches, results, timing_notes, sizes, providers, header_notes):
    out = []
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        dev_name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        dev_name = f"CPU ({platform.machine()}) in Triton's interpreter: DRY RUN, timings meaningless"
    import triton
    out += ["# fastddpm GPU report", "",
            f"- device: {dev_name}",
            f"- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}",
            f"- backends available: {', '.join(fastddpm.available_backends())}", ""]
    out += ["## Correctness against the reference backend", "",
            "| backend | check | result | detail | s |", "|---|---|---|---|---|"]
    for b, name, status, detail, secs in checks.rows:
        out.append(f"| {b} | {name} | {status} | {detail.replace('|', '/')} | {secs:.1f} |")
    out.append("")
    if launches:
        names = list(next(iter(launches.values())))
        out += [f"## Kernel launches per bare op call (CUDA profiler, {_size_name(CIFAR)} float32)", "",
                "| backend | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
        for b, counts in launches.items():
            out.append(f"| {b} | " + " | ".join(str(c) for c in counts.values()) + " |")
        out.append("")
    out += ["## Median time per call, float32", "", *header_notes, "",
            "| case | size | provider | median (us) | GB/s | % of copy | x eager |",
            "|---|---|---|---:|---:|---:|---:|"]
    for size, shape in sizes.items():
        copy_ms = results.get(("copy", size), {}).get("copy_")
        copy_gbps = _gbps("copy", shape, copy_ms) if copy_ms else None
        for case in benchmarking.CASES:
            timings = results.get((case, size), {})
            for provider, _ in providers:
                if provider not in timings:
                    continue
                ms = timings[provider]
                gbps = _gbps(case, shape, ms)
                pct = f"{100 * gbps / copy_gbps:.0f}" if copy_gbps else ""
                speed = f"{timings['eager'] / ms:.2f}" if "eager" in timings else ""
                out.append(f"| {case} | {size} {_size_name(shape)} | {provider} | {ms * 1e3:.1f} | {gbps:.0f} "
                           f"| {pct} | {speed} |")
    out.append("")
    if timing_notes:
        out += ["Timing errors and skips:", ""] + [f"- {e}" for e in timing_notes] + [""]
    out += _goals(results, sizes, launches)
    return "\n".join(out)


def _goals(results, sizes, launches):
    """The issue's GPU goals, judged from this run's figures."""
    lines = ["## Goals (issue 4, on an H200)", ""]
    for b in GPU_BACKENDS:
        kernel = f"{b}-op"
        big = []
        for size, shape in sizes.items():
            copy = results.get(("copy", size), {}).get("copy_")
            if math.prod(shape) * 4 < GOAL_BYTES or copy is None:
                continue
            for case in BANDWIDTH_CASES:
                ms = results.get((case, size), {}).get(kernel)
                if ms:
                    big.append((case, size, _gbps(case, shape, ms) / _gbps("copy", shape, copy)))
        if big:
            worst = min(big, key=lambda r: r[2])
            verdict = "met" if worst[2] >= BANDWIDTH_GOAL else "NOT met"
            lines.append(f"- {b}: >= {BANDWIDTH_GOAL:.0%} of copy bandwidth at >= 256 MB (bare ops): {verdict} "
                         f"(lowest {worst[2]:.0%}: {worst[0]} at {worst[1]})")
        if b in launches:
            verdict = "met" if all(c == 1 for c in launches[b].values()) else "NOT met"
            lines.append(f"- {b}: one kernel launch per op: {verdict} ({launches[b]})")
        for provider in (kernel, f"fastddpm-{b}"):
            cifar = [(case, results.get((case, "cifar"), {})) for case in benchmarking.CASES if case != "copy"]
            cifar = [(case, r[provider], r["eager"]) for case, r in cifar if provider in r and "eager" in r]
            if cifar:
                slower = [case for case, mine, eager in cifar if mine > eager]
                lines.append(f"- {provider}: per-call time at cifar no worse than eager: "
                             f"{'met' if not slower else 'NOT met for ' + ', '.join(slower)}")
    if len(lines) == 2:
        lines.append("- not assessed: no GPU backend was timed at the goal sizes")
    lines.append("")
    return lines


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: dry run in Triton's interpreter with tiny sizes (sets TRITON_INTERPRET=1)")
    p.add_argument("--providers", default=None,
                   help="comma list among " + ",".join(DEFAULT_PROVIDERS) + " (default: all that apply)")
    p.add_argument("--sizes", default=None, help="comma list of shapes like 128x3x32x32")
    p.add_argument("--rep-ms", type=int, default=40, help="do_bench's rep (ms) per measurement")
    p.add_argument("--budget-s", type=float, default=270,
                   help="skip the timings still left after this many seconds in all")
    p.add_argument("--skip-checks", action="store_true", help="timings only")
    p.add_argument("--output", default=None, help="also write the markdown report here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        # Before Triton is imported (fastddpm imports it lazily, when a backend is asked for).
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--device cpu needs TRITON_INTERPRET=1 before Triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu for a dry run in Triton's interpreter")
    started = time.perf_counter()
    device = args.device
    backends = [b for b in GPU_BACKENDS if fastddpm.backends.status(b)[0]
                and device in (fastddpm.backends.get(b).device_types or (device,))]
    sizes = dict(GPU_SIZES if device == "cuda" else CPU_SIZES)
    if args.sizes:
        sizes = {s: tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")}
    wanted = args.providers.split(",") if args.providers else \
        [p for p in DEFAULT_PROVIDERS if device == "cuda" or p != "compile"]
    providers = providers_for(device, backends, wanted)

    checks, launches = Checks(), {}
    if not args.skip_checks:
        checks = run_checks(device, backends)
        for b in backends if device == "cuda" else ():
            try:
                launches[b] = _launch_counts(Setup(device), b)
            except Exception as e:  # noqa: BLE001
                checks.rows.append((b, "launch count", "FAIL", f"{type(e).__name__}: {e}", 0.0))
    checked = time.perf_counter()
    results, timing_notes = run_timings(device, sizes, providers, args.rep_ms, started + args.budget_s)
    notes = [f"Checks took {checked - started:.0f} s, timings {time.perf_counter() - checked:.0f} s. "
             "Cases, inputs, bytes moved and the providers copy_, fastddpm-*, eager (labml's code) and "
             "compile (torch.compile(dynamic=False) of it) are fastddpm/cli/benchmarking.py's, as in the CPU "
             "figures. fastddpm-* go through DenoiseDiffusion/fastddpm.ops (validation included: the t "
             "range check syncs with the host); *-op call the backend's ops directly (what the kernels "
             "cost). GB/s = the case's least bytes moved / median time; % of copy: against copy_ of the "
             "same tensor in this run; x eager: eager's time / this provider's."]
    report = render(device, checks, launches, results, timing_notes, sizes, providers, notes)
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report + "\n")
    if checks.failed:
        print(f"\n{len(checks.failed)} check(s) FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
