"""The GPU report in one command: run the GPU tests (tests/test_gpu.py), then time op x size x
provider beside a device-to-device copy, as markdown.

    python -m benchmarks.gpu_report                    # a CUDA machine: prints the report
    python -m benchmarks.gpu_report --output gpu.md    # and writes it to a file
    python -m benchmarks.gpu_report --device cpu       # dry run of every code path on CPU:
                                                       # Triton's interpreter, tiny sizes

Exit status 1 when a test fails. The correctness checks are pytest tests, runnable alone with
``pytest tests/test_gpu.py`` (skipped without CUDA; ``FASTDDPM_TEST_GPU_DEVICE=cpu`` runs them in
Triton's interpreter): every op of each GPU backend against the reference in every dtype, the
noise, gradients, the deterministic MSE, more than 2**31 elements, opcheck,
torch.compile(fullgraph=True), kernel launches per op, CUDA-graph replays, layouts, NaN-poisoned
outputs and no host-device sync in training and sampling. This script runs that file in a
subprocess first (``--skip-checks`` to leave it out, ``--pytest-args`` to pass it options) and
puts each test's outcome in the report.

Timings: each case of fastddpm/cli/cases.py (its sizes plus 2**26 and 2**28 elements, its
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
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

import fastddpm
from fastddpm import ops
from fastddpm.cli import timing
from fastddpm.cli.bench import cases

ROOT = Path(__file__).resolve().parents[1]
TEST_FILE = "tests/test_gpu.py"
# fastddpm.cli.bench.cases's sizes plus 2**26 and 2**28 elements.
GPU_SIZES = {**cases.SIZES, "2^26": (4096, 4, 64, 64), "2^28": (16384, 4, 64, 64)}
CPU_SIZES = {"tiny": (1, 1, 4, 4), "odd": (3, 1100)}  # the dry run: the interpreter is slow
CIFAR = cases.SIZES["cifar"]
GPU_BACKENDS = ("triton", "cuda")
DEFAULT_PROVIDERS = ("copy_", "triton-op", "fastddpm-triton", "cuda-op", "fastddpm-cuda", "eager", "compile")
BANDWIDTH_CASES = ("q_sample_noise", "q_sample_draw", "p_sample_draw", "mse_fwd_bwd")
BANDWIDTH_GOAL = 0.85
GOAL_BYTES = 256 * 2**20
LAUNCH_TEST = "test_one_kernel_launch_per_op"


def _size_name(shape):
    n = math.prod(shape)
    name = "x".join(map(str, shape))
    return f"{name} (2^{n.bit_length() - 1})" if n >= 2**20 and n & (n - 1) == 0 else name


# ---- checks: tests/test_gpu.py ---------------------------------------------------------------

def run_tests(device, pytest_args=()):
    """Run tests/test_gpu.py on ``device`` in a subprocess: ([(test, result, detail, seconds)], ok).

    The result is PASS, FAIL or skip, as pytest's JUnit XML has it. ``--device cpu`` runs the
    tests in Triton's interpreter (FASTDDPM_TEST_GPU_DEVICE=cpu).
    """
    env = dict(os.environ, FASTDDPM_TEST_GPU_DEVICE=device, TRITON_INTERPRET="1" if device == "cpu" else "0")
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", TEST_FILE,
               *pytest_args]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        rows = []
        if os.path.exists(junit):
            for case in ET.parse(junit).iter("testcase"):
                status, detail = "PASS", ""
                for tag, name in (("failure", "FAIL"), ("error", "FAIL"), ("skipped", "skip")):
                    found = case.find(tag)
                    if found is not None:
                        status, detail = name, found.get("message", "")
                        break
                rows.append((case.get("name"), status, " ".join(detail.split())[:300], float(case.get("time", 0))))
    # pytest's exit status 0: every test passed or skipped (5, none collected, is a failure here).
    if proc.returncode != 0 and not any(r[1] == "FAIL" for r in rows):
        output = " ".join((proc.stdout + proc.stderr).split())[-600:]
        rows.append(("pytest " + " ".join(shlex.quote(c) for c in cmd[3:]), "FAIL",
                     f"exit status {proc.returncode}: {output}", 0.0))
    return rows, proc.returncode == 0


def launch_verdicts(rows):
    """{backend: (passed, detail)} from the outcomes of the kernel launch test."""
    out = {}
    for name, status, detail, _ in rows:
        if name.startswith(LAUNCH_TEST + "[") and status != "skip":
            out[name[len(LAUNCH_TEST) + 1:-1]] = (status == "PASS", detail)
    return out


# ---- timing ---------------------------------------------------------------------------

def bench(fn, device, rep_ms):
    """Median milliseconds per call: CUDA events (do_bench, L2 flushed) or wall time on CPU."""
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median")
    return 1e3 * timing.median(timing.time_callable(fn, warmup=1, min_time=rep_ms / 1e3,
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
    """[(name, make)]: fastddpm.cli.bench.cases's providers that apply on a GPU, plus bare ops."""
    out = []
    for name in wanted:
        if name.endswith("-op"):
            if name[:-3] in backends:
                out.append((name, _bare_op_make(name[:-3])))
        elif name in cases.PROVIDERS:
            prov = cases.PROVIDERS[name]
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
        inp = cases.Inputs(shape, device)
        for name, make in providers:
            for case in cases.CASES:
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
    return cases.bytes_moved(case, shape) / (ms * 1e-3) / 1e9


def render(device, checks, launches, results, timing_notes, sizes, providers, header_notes):
    """The markdown report; ``checks``: the rows of :func:`run_tests`."""
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
    out += [f"## Correctness: {TEST_FILE} against the reference backend", "",
            "| test | result | detail | s |", "|---|---|---|---|"]
    if not checks:
        out.append("| (not run: --skip-checks) | | | |")
    for name, status, detail, secs in checks:
        out.append(f"| {name} | {status} | {detail.replace('|', '/')} | {secs:.1f} |")
    out.append("")
    out += ["## Median time per call, float32", "", *header_notes, "",
            "| case | size | provider | median (us) | GB/s | % of copy | x eager |",
            "|---|---|---|---:|---:|---:|---:|"]
    for size, shape in sizes.items():
        copy_ms = results.get(("copy", size), {}).get("copy_")
        copy_gbps = _gbps("copy", shape, copy_ms) if copy_ms else None
        for case in cases.CASES:
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
    """The GPU goals, judged from this run's figures; ``launches``: :func:`launch_verdicts`."""
    lines = ["## Goals (on an H200)", ""]
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
            passed, detail = launches[b]
            lines.append(f"- {b}: one kernel launch per op ({LAUNCH_TEST}): {'met' if passed else 'NOT met'}"
                         + (f" ({detail})" if detail else ""))
        for provider in (kernel, f"fastddpm-{b}"):
            cifar = [(case, results.get((case, "cifar"), {})) for case in cases.CASES if case != "copy"]
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
    p.add_argument("--skip-checks", action="store_true", help=f"timings only: do not run {TEST_FILE}")
    p.add_argument("--pytest-args", default="", help=f"options for pytest {TEST_FILE}, e.g. \"-k 'not opcheck'\"")
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

    checks, passed = [], True
    if not args.skip_checks:
        checks, passed = run_tests(device, shlex.split(args.pytest_args))
    checked = time.perf_counter()
    results, timing_notes = run_timings(device, sizes, providers, args.rep_ms, started + args.budget_s)
    notes = [f"Checks took {checked - started:.0f} s, timings {time.perf_counter() - checked:.0f} s. "
             "Cases, inputs, bytes moved and the providers copy_, fastddpm-*, eager (labml's code) and "
             "compile (torch.compile(dynamic=False) of it) are fastddpm/cli/cases.py's, as in the CPU "
             "figures. fastddpm-* go through DenoiseDiffusion/fastddpm.ops (validation included: the t "
             "range check syncs with the host); *-op call the backend's ops directly (what the kernels "
             "cost). GB/s = the case's least bytes moved / median time; % of copy: against copy_ of the "
             "same tensor in this run; x eager: eager's time / this provider's."]
    report = render(device, checks, launch_verdicts(checks), results, timing_notes, sizes, providers, notes)
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report + "\n")
    if not passed:
        print(f"\n{TEST_FILE} FAILED: {sum(r[1] == 'FAIL' for r in checks)} test(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
