"""Crash safety: edge cases run in a child process, so a segfault fails a test instead of
killing pytest.

Each case is an edge input (empty batches, zero-size samples, meta arguments, t out of range,
wrong dtypes) to a public op, to DenoiseDiffusion or to a backend's raw torch.ops op, with its
correct outcome: a result equal to the reference backend's (of a stated shape and dtype), or an
exception of the stated type whose message names the argument at fault. One child per
backend (the three side by side) runs every case and prints one line per outcome; if a child dies (a signal, a non-zero
exit, a hang), the case it was running fails with the exit status and the rest run in a new
child.
"""
import concurrent.futures
import functools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import fastddpm
from fastddpm import ops, schedule

BACKENDS = ["cpu", "reference", "triton"]
RAW = ("cpu", "triton")  # backends with raw torch.ops ops of their own
N = 10
TABS = {k: v.float() for k, v in schedule.coefficient_tables(schedule.linear(N)).items()}
CHILD_TIMEOUT_S = 300


# ---- expectations --------------------------------------------------------------------------

class Same:
    """The reference backend's result (same call), of this shape and dtype."""

    def __init__(self, shape, dtype=torch.float32):
        self.shape, self.dtype = tuple(shape), dtype

    def check(self, case, backend, outcome):
        if isinstance(outcome, BaseException):
            return f"raised {type(outcome).__name__}: {outcome}"
        ref = case.fn("reference")
        for got, want in zip(_tensors(outcome), _tensors(ref)):
            if got.shape != self.shape or got.dtype != self.dtype or got.device.type != "cpu":
                return f"got a {got.dtype} {tuple(got.shape)} tensor on {got.device}, expected {self.dtype} {self.shape} on cpu"
            try:
                torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5, equal_nan=True)
            except AssertionError as e:
                return f"differs from the reference: {e}"
        return None


class Raises:
    """An exception of one of ``types`` whose message matches every pattern."""

    def __init__(self, types, *patterns):
        self.types = types if isinstance(types, tuple) else (types,)
        self.patterns = patterns

    def check(self, case, backend, outcome):
        want = "/".join(t.__name__ for t in self.types)
        if not isinstance(outcome, BaseException):
            got = "; ".join(f"{x.dtype} {tuple(x.shape)} on {x.device}" for x in _tensors(outcome))
            return f"returned ({got}) instead of raising {want} matching {self.patterns}"
        msg = str(outcome)
        if not isinstance(outcome, self.types):
            return f"raised {type(outcome).__name__} ({msg!r}), expected {want}"
        missing = [p for p in self.patterns if not re.search(p, msg)]
        if missing:
            return f"{type(outcome).__name__} message {msg!r} does not match {missing}"
        return None


class NanWhereOutOfRange:
    """The raw Triton op's guard on t (README: under torch.compile "the Triton kernel writes
    NaN"): samples whose t is out of range are NaN, the others equal the reference."""

    def __init__(self, bad_rows):
        self.bad_rows = bad_rows

    def check(self, case, backend, outcome):
        if isinstance(outcome, BaseException):
            return f"raised {type(outcome).__name__}: {outcome}"
        out, ref = outcome
        for b in range(out.shape[0]):
            if b in self.bad_rows and not bool(out[b].isnan().all()):
                return f"sample {b} has t out of range but is not NaN: {out[b].tolist()}"
            if b not in self.bad_rows and not torch.allclose(out[b], ref[b], rtol=1.3e-6, atol=1e-5):
                return f"sample {b}: {out[b].tolist()} != reference {ref[b].tolist()}"
        return None


def _tensors(x):
    return list(x) if isinstance(x, (tuple, list)) else [x]


# ---- the cases -----------------------------------------------------------------------------

class Case:
    def __init__(self, name, fn, expect, backends=BACKENDS):
        self.name, self.fn, self.expect, self.backends = name, fn, expect, backends


def zeros(*shape, **kw):
    return torch.zeros(shape, **kw)


def ones(*shape, **kw):
    return torch.ones(shape, **kw)


def meta(x):
    return x.to("meta")


def q(x0, t=1, noise=None, tabs=("sqrt_ab", "sqrt_1m_ab"), **kw):
    return lambda b: ops.q_sample(x0, t, *(TABS[k] if isinstance(k, str) else k for k in tabs), noise,
                                  backend=b, **{"seed": 1, **kw})


def p(x_t, eps=None, t=1, noise=None, tabs=("c1", "c2", "sigma"), **kw):
    eps = torch.zeros_like(x_t) if eps is None else eps
    return lambda b: ops.p_sample_step(x_t, eps, t, *(TABS[k] if isinstance(k, str) else k for k in tabs), noise,
                                       backend=b, **{"seed": 1, **kw})


def mse(pred, target=None, **kw):
    return lambda b: ops.mse_per_sample(pred, target, backend=b, **{"seed": 1, **kw})


def model(backend, eps_model=lambda x, t: x):
    return fastddpm.DenoiseDiffusion(eps_model, N, backend=backend)


def raw_ns(backend):
    return torch.ops.fastddpm if backend == "cpu" else torch.ops.fastddpm_triton


def raw_q(x0=None, t=None, a=None, b=None, noise=None, seed="default"):
    """The backend's raw q_sample op (no fastddpm.ops checks in front of it)."""
    def call(backend):
        return raw_ns(backend).q_sample(
            ones(2, 3) if x0 is None else x0, torch.tensor([1, 2]) if t is None else t,
            TABS["sqrt_ab"] if a is None else a, TABS["sqrt_1m_ab"] if b is None else b, noise,
            torch.tensor([1]) if isinstance(seed, str) else seed, 0)
    return call


def grads_of_empty_loss(backend):
    x0 = zeros(0, 3, requires_grad=True)
    return torch.autograd.grad(model(backend).loss(x0, reduction="none").sum(), x0)[0]


def grads_of_empty_mse(backend, with_target):
    pred = zeros(0, 5, requires_grad=True)
    target = zeros(0, 5) if with_target else None
    return torch.autograd.grad(ops.mse_per_sample(pred, target, seed=1, backend=backend).sum(), pred)[0]


def raw_q_out_of_range(backend):
    t = torch.tensor([1, N])
    return raw_q(t=t)(backend), ops.q_sample(ones(2, 3), torch.tensor([1, 1]), TABS["sqrt_ab"], TABS["sqrt_1m_ab"],
                                             seed=1, backend="reference")


I64 = torch.int64
CASES = [
    # -- empty batches ([0, ...] data), with and without noise / target
    Case("q_sample_empty_batch", q(zeros(0, 3), zeros(0, dtype=I64)), Same((0, 3))),
    Case("q_sample_empty_batch_int_t", q(zeros(0, 3), 0), Same((0, 3))),
    Case("q_sample_empty_batch_noise", q(zeros(0, 3), zeros(0, dtype=I64), zeros(0, 3)), Same((0, 3))),
    Case("p_sample_step_empty_batch", p(zeros(0, 3), t=zeros(0, dtype=I64)), Same((0, 3))),
    Case("p_sample_step_empty_batch_noise", p(zeros(0, 3), t=zeros(0, dtype=I64), noise=zeros(0, 3)), Same((0, 3))),
    Case("mse_empty_batch", mse(zeros(0, 5)), Same((0,))),
    Case("mse_empty_batch_target", mse(zeros(0, 5), zeros(0, 5)), Same((0,))),
    Case("mse_empty_batch_backward", lambda b: grads_of_empty_mse(b, False), Same((0, 5))),
    Case("mse_empty_batch_target_backward", lambda b: grads_of_empty_mse(b, True), Same((0, 5))),
    Case("sample_t_empty_batch", lambda b: ops.sample_t(1, 0, N, backend=b), Same((0,), I64)),
    Case("class_q_sample_empty_batch_noise", lambda b: model(b).q_sample(zeros(0, 3), 0, zeros(0, 3)), Same((0, 3))),
    Case("class_q_sample_empty_batch", lambda b: model(b).q_sample(zeros(0, 3), 0), Same((0, 3))),
    Case("class_p_sample_empty_batch", lambda b: model(b).p_sample(zeros(0, 3), 0), Same((0, 3))),
    Case("class_p_sample_empty_batch_noise", lambda b: model(b).p_sample(zeros(0, 3), 0, zeros(0, 3)), Same((0, 3))),
    Case("class_loss_empty_batch", lambda b: model(b).loss(zeros(0, 3)), Same(())),  # NaN, as torch.mean
    Case("class_loss_empty_batch_noise", lambda b: model(b).loss(zeros(0, 3), zeros(0, 3), reduction="none"),
         Same((0,))),
    Case("class_loss_empty_batch_backward", grads_of_empty_loss, Same((0, 3))),
    # -- zero-size samples ([3, 0] data): elementwise ops return empty, the mean of nothing is refused
    Case("q_sample_empty_samples", q(zeros(3, 0)), Same((3, 0))),
    Case("q_sample_empty_samples_noise", q(zeros(3, 0), noise=zeros(3, 0)), Same((3, 0))),
    Case("p_sample_step_empty_samples", p(zeros(2, 0)), Same((2, 0))),
    Case("p_sample_step_empty_samples_noise", p(zeros(2, 0), noise=zeros(2, 0)), Same((2, 0))),
    Case("mse_empty_samples", mse(zeros(3, 0)), Raises(ValueError, r"\bpred\b")),
    Case("mse_empty_samples_target", mse(zeros(3, 0), zeros(3, 0)), Raises(ValueError, r"\bpred\b")),
    Case("class_loss_empty_samples", lambda b: model(b).loss(zeros(3, 0)), Raises(ValueError, r"\bx0\b")),
    Case("class_loss_empty_samples_noise", lambda b: model(b).loss(zeros(3, 0), zeros(3, 0)),
         Raises(ValueError, r"\bx0\b")),
    # -- meta arguments with CPU data
    Case("q_sample_meta_tables", q(ones(2, 3), tabs=(meta(TABS["sqrt_ab"]), meta(TABS["sqrt_1m_ab"]))),
         Raises(RuntimeError, r"\bsqrt_ab\b", r"\bmeta\b")),
    Case("p_sample_step_meta_sigma", p(ones(2, 3), tabs=("c1", "c2", meta(TABS["sigma"]))),
         Raises(RuntimeError, r"\bsigma\b", r"\bmeta\b")),
    Case("q_sample_meta_noise", q(ones(2, 3), noise=meta(ones(2, 3))), Raises(RuntimeError, r"\bnoise\b")),
    Case("p_sample_step_meta_eps_theta", p(ones(2, 3), eps=meta(ones(2, 3))), Raises(RuntimeError, r"\beps_theta\b")),
    Case("mse_meta_target", mse(ones(2, 3), meta(ones(2, 3))), Raises(RuntimeError, r"\btarget\b")),
    Case("q_sample_meta_t", q(ones(2, 3), meta(torch.tensor([1, 2]))), Raises(RuntimeError, r"\bt\b")),
    Case("q_sample_meta_seed", q(ones(2, 3), seed=meta(torch.tensor([1]))), Raises(RuntimeError, r"\bseed\b")),
    Case("mse_meta_seed", mse(ones(2, 3), seed=meta(torch.tensor([1]))), Raises(RuntimeError, r"\bseed\b")),
    Case("sample_t_meta_seed", lambda b: ops.sample_t(meta(torch.tensor([1])), 4, N, device="cpu", backend=b),
         Raises(RuntimeError, r"\bseed\b")),
    Case("class_on_meta_q_sample", lambda b: model(b).to("meta").q_sample(ones(2, 3), 1),
         Raises(RuntimeError, r"\bx0\b", r"\bmeta\b")),
    Case("class_on_meta_q_sample_noise", lambda b: model(b).to("meta").q_sample(ones(2, 3), 1, ones(2, 3)),
         Raises(RuntimeError, r"\bx0\b", r"\bmeta\b")),
    Case("class_on_meta_p_sample", lambda b: model(b).to("meta").p_sample(ones(2, 3), 1),
         Raises(RuntimeError, r"\bx_t\b", r"\bmeta\b")),
    Case("raw_op_meta_tables", raw_q(a=meta(TABS["sqrt_ab"]), b=meta(TABS["sqrt_1m_ab"])),
         Raises(RuntimeError, r"\bsqrt_ab\b"), RAW),
    Case("raw_op_meta_t", raw_q(t=meta(torch.tensor([1, 2]))), Raises(RuntimeError, r"\bt\b"), RAW),
    Case("raw_op_meta_seed", raw_q(seed=meta(torch.tensor([1]))), Raises(RuntimeError, r"\bseed\b"), RAW),
    Case("raw_op_meta_noise", raw_q(noise=meta(ones(2, 3)), seed=None), Raises(RuntimeError, r"\bnoise\b"), RAW),
    # -- t out of range
    Case("q_sample_t_tensor_too_big", q(ones(2, 3), torch.tensor([0, N])), Raises(ValueError, r"\bt\b")),
    Case("q_sample_t_tensor_negative", q(ones(2, 3), torch.tensor([-2**63, 0])), Raises(ValueError, r"\bt\b")),
    Case("q_sample_t_int32_max", q(ones(2, 3), torch.tensor([2**31 - 1, 0], dtype=torch.int32)),
         Raises(ValueError, r"\bt\b")),
    Case("q_sample_t_int_too_big", q(ones(2, 3), N), Raises(ValueError, r"\bt\b")),
    Case("p_sample_step_t_int_negative", p(ones(2, 3), t=-1), Raises(ValueError, r"\bt\b")),
    Case("class_p_sample_t_too_big", lambda b: model(b).p_sample(ones(2, 3), N), Raises(ValueError, r"\bt\b")),
    Case("class_loss_t_too_big", lambda b: model(b).loss(ones(2, 3), t=torch.tensor([0, N])),
         Raises(ValueError, r"\bt\b")),
    Case("raw_op_t_too_big", raw_q(t=torch.tensor([1, N])), Raises(RuntimeError, r"\bt\b"), ("cpu",)),
    Case("raw_op_t_too_big_nan", raw_q_out_of_range, NanWhereOutOfRange({1}), ("triton",)),
    Case("sample_t_n_steps_zero", lambda b: ops.sample_t(1, 4, 0, backend=b), Raises(ValueError, r"\bn_steps\b")),
    Case("sample_t_batch_negative", lambda b: ops.sample_t(1, -1, N, backend=b), Raises(ValueError, r"\bbatch\b")),
    Case("q_sample_offset_2_62", q(ones(2, 3), sample_offset=2**62), Raises(ValueError, r"\bsample_offset\b")),
    # -- wrong dtypes
    Case("q_sample_int_x0", q(ones(2, 3, dtype=I64)), Raises(TypeError, r"\bx0\b")),
    Case("q_sample_bool_x0", q(ones(2, 3, dtype=torch.bool)), Raises(TypeError, r"\bx0\b")),
    Case("q_sample_complex_x0", q(ones(2, 3, dtype=torch.complex64)), Raises(TypeError, r"\bx0\b")),
    Case("q_sample_0d_x0", q(torch.tensor(1.0)), Raises(ValueError, r"\bx0\b")),
    Case("q_sample_float_t", q(ones(2, 3), torch.tensor([1.0, 2.0])), Raises(TypeError, r"\bt\b")),
    Case("q_sample_int16_t", q(ones(2, 3), torch.tensor([1, 2], dtype=torch.int16)), Raises(TypeError, r"\bt\b")),
    Case("q_sample_bool_t", q(ones(2, 3), torch.tensor([True, False])), Raises(TypeError, r"\bt\b")),
    Case("q_sample_half_table", q(ones(2, 3), tabs=(TABS["sqrt_ab"].half(), "sqrt_1m_ab")),
         Raises(TypeError, r"\bsqrt_ab\b")),
    Case("q_sample_int_table", q(ones(2, 3), tabs=("sqrt_ab", TABS["sqrt_1m_ab"].long())),
         Raises(TypeError, r"\bsqrt_1m_ab\b")),
    Case("q_sample_int_noise", q(ones(2, 3), noise=ones(2, 3, dtype=torch.int32)), Raises(TypeError, r"\bnoise\b")),
    Case("p_sample_step_int_eps_theta", p(ones(2, 3), eps=ones(2, 3, dtype=I64)), Raises(TypeError, r"\beps_theta\b")),
    Case("mse_int_pred", mse(ones(2, 3, dtype=I64)), Raises(TypeError, r"\bpred\b")),
    Case("mse_complex_target", mse(ones(2, 3), ones(2, 3, dtype=torch.complex64)), Raises(TypeError, r"\btarget\b")),
    # ops.py raises ValueError for a seed tensor that is not one int64 (shape or dtype).
    Case("q_sample_float_seed", q(ones(2, 3), seed=torch.tensor([1.0])), Raises((ValueError, TypeError), r"\bseed\b")),
    Case("q_sample_float_offset", q(ones(2, 3), sample_offset=1.0), Raises(TypeError, r"\bsample_offset\b")),
    Case("class_q_sample_int_x0", lambda b: model(b).q_sample(ones(2, 3, dtype=I64), 1), Raises(TypeError, r"\bx0\b")),
    Case("class_loss_int_x0", lambda b: model(b).loss(ones(2, 3, dtype=I64)), Raises(TypeError, r"\bx0\b")),
    Case("class_p_sample_int_x_t", lambda b: model(b).p_sample(ones(2, 3, dtype=I64), 1), Raises(TypeError, r"\bx_t\b")),
    # The class names the model's output: the caller never passed an "eps_theta".
    Case("class_p_sample_model_returns_int", lambda b: model(b, lambda x, t: x.long()).p_sample(ones(2, 3), 1),
         Raises(TypeError, r"\beps_model's output\b")),
    Case("class_loss_model_returns_int", lambda b: model(b, lambda x, t: x.long()).loss(ones(2, 3)),
         Raises(TypeError, r"\beps_model's output\b")),
    Case("raw_op_int_x0", raw_q(x0=ones(2, 3, dtype=I64)), Raises((RuntimeError, TypeError), r"\bx0\b"), RAW),
    Case("raw_op_float_t", raw_q(t=torch.tensor([1.0, 2.0])), Raises((RuntimeError, TypeError), r"\bt\b"), RAW),
    Case("raw_op_float_seed", raw_q(seed=torch.tensor([1.0])), Raises((RuntimeError, TypeError), r"\bseed\b"), RAW),
]
BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"


# ---- the child -----------------------------------------------------------------------------

def child(backend, names):
    """Runs the named cases on ``backend``; prints START before and one JSON line after each."""
    fastddpm.backends.resolve(backend, torch.device("cpu"))  # loads the backend's raw ops
    for name in names:
        case = BY_NAME[name]
        print(f"START {name}", flush=True)
        try:
            outcome = case.fn(backend)
        except Exception as e:  # the outcome under test
            outcome = e
        try:
            problem = case.expect.check(case, backend, outcome)
        except Exception as e:
            problem = f"checking the outcome raised {type(e).__name__}: {e}"
        print("RESULT " + json.dumps({"case": name, "problem": problem}), flush=True)


def outcomes(backend):
    """{case name: None (correct) or what went wrong} for every case of ``backend``."""
    todo = [c.name for c in CASES if backend in c.backends]
    results = {}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    while todo:
        code = (f"import sys; sys.path.insert(0, {tests_dir!r}); import test_crash_safety as m; "
                f"m.child({backend!r}, {todo!r})")
        try:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                  timeout=CHILD_TIMEOUT_S)
            stdout, rc, stderr = proc.stdout, proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            stdout, rc, stderr = (e.stdout or b"").decode(), "timeout", (e.stderr or b"").decode()
        started = None
        for line in stdout.splitlines():
            if line.startswith("START "):
                started = line[6:]
            elif line.startswith("RESULT "):
                r = json.loads(line[7:])
                results[r["case"]] = r["problem"]
                started = None
        if started is not None or any(n not in results for n in todo):
            culprit = started or next(n for n in todo if n not in results)
            what = f"signal {-rc}" if isinstance(rc, int) and rc < 0 else f"exit status {rc}"
            results[culprit] = f"the child died ({what}) running this case; stderr: {stderr[-1500:]}"
        todo = [n for n in todo if n not in results]
    return results


@functools.lru_cache(maxsize=None)
def all_outcomes():
    """outcomes() of every backend, their children running side by side."""
    with concurrent.futures.ThreadPoolExecutor(len(BACKENDS)) as pool:
        return dict(zip(BACKENDS, pool.map(outcomes, BACKENDS)))


@pytest.mark.parametrize("backend,name", [(b, c.name) for b in BACKENDS for c in CASES if b in c.backends])
def test_edge_case(backend, name):
    problem = all_outcomes()[backend][name]
    assert problem is None, f"{name} on backend {backend!r}: {problem}"
