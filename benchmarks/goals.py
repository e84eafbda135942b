"""The performance goals as ratios of medians, with the providers timed interleaved.

    python benchmarks/goals.py [--threads N] [--rounds R]

pytest-benchmark times one benchmark after another, so on a shared machine a burst of load can
land on one provider only. Here every round times each provider of a case once, in turn
(fastddpm.cli.timing, the harness of `fastddpm bench`), so the ratios compare like with like.
Cases, sizes, providers and goals: fastddpm.cli.bench.cases. The last rows,
train_step_compiled (``--only train_step_compiled``), time a whole training step compiled with
torch.compile(fullgraph=True, dynamic=True), fastddpm's loss against labml's: benchmarks/compile_step.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from fastddpm.cli import timing  # noqa: E402
from fastddpm.cli.bench import cases as B  # noqa: E402
from benchmarks import compile_step  # noqa: E402

SAMPLE_S = 0.01  # each sample times enough back-to-back calls to last about this long


def measure(case, size, providers, rounds, device="cpu"):
    """{provider: (median seconds per call, spread)} of ``case`` at ``size``."""
    inputs = B.Inputs(B.SIZES[size], device)
    fns = [B.make_callable(p, case, inputs) for p in providers]
    timing.warm_up(fns, 3)
    number = timing.calls_per_sample(fns, SAMPLE_S)
    samples = timing.time_interleaved(fns, warmup=0, min_time=0.0, min_rounds=rounds, max_rounds=rounds,
                                      number=number)
    return {p: (timing.median(ts), timing.spread(ts)) for p, ts in zip(providers, samples)}


def bare_op_vs_add(rounds):
    """{name: (seconds, spread)} at the tiny size, interleaved: q_sample drawing its noise called as
    the library calls it (fastddpm._C's direct call, csrc/fast_calls.cpp), the same op through
    torch.ops, and torch.add of the same tensors."""
    x = torch.randn(B.SIZES["tiny"])
    t = torch.zeros(x.shape[0], dtype=torch.int64)
    tab = torch.rand(B.N_STEPS)
    seed = torch.tensor([7])
    from fastddpm import _extension
    fast = _extension.load()  # registers torch.ops.fastddpm
    op = torch.ops.fastddpm.q_sample.default
    fns = {"direct": lambda: fast.q_sample(x, t, tab, tab, None, seed, 0),
           "torch.ops": lambda: op(x, t, tab, tab, None, seed, 0), "add": lambda: torch.add(x, x)}
    timing.warm_up(list(fns.values()), 3)
    number = timing.calls_per_sample(list(fns.values()), SAMPLE_S)
    samples = timing.time_interleaved(list(fns.values()), warmup=0, min_time=0.0, min_rounds=rounds,
                                      max_rounds=rounds, number=number)
    return {name: (timing.median(ts), timing.spread(ts)) for name, ts in zip(fns, samples)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--fused", default="fastddpm-cpu")
    ap.add_argument("--only", default=None, help="comma-separated cases: time only these goals")
    ap.add_argument("--cpu-isa", default=None, help="run the CPU kernels' build for this ISA (avx2, avx512, default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastddpm import _extension
    ext = _extension.load()
    if args.cpu_isa:
        ext.set_cpu_isa(args.cpu_isa)
    print(f"torch threads {torch.get_num_threads()}, {args.rounds} interleaved rounds, load average "
          f"{os.getloadavg()[0]:.1f}; CPU kernels: {ext.cpu_isa() if ext else 'none'} build; torch's own ops: "
          f"{torch.backends.cpu.get_cpu_capability()}; spread: IQR / median of the rounds\n")
    if ext is not None:
        bare = bare_op_vs_add(args.rounds)
        (op_s, op_spread), (ops_s, _), (add_s, add_spread) = bare["direct"], bare["torch.ops"], bare["add"]
        ratio = op_s / add_s
        print(f"bare fused op (q_sample drawing its noise, fastddpm._C's direct call) at tiny {B.SIZES['tiny']}: "
              f"{op_s * 1e6:.2f} us, torch.add {add_s * 1e6:.2f} us, ratio {ratio:.2f} (spread {op_spread:.0%} / "
              f"{add_spread:.0%}), goal <= {B.BARE_OP_GOAL}: {'yes' if ratio <= B.BARE_OP_GOAL else '**no**'}; "
              f"through torch.ops {ops_s * 1e6:.2f} us ({ops_s / add_s:.2f}x)\n")
    print(f"| case | size | {args.fused} | baseline | baseline time | ratio | spread | goal | met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, base, limit, sizes in B.GOALS:
        if args.only and case not in args.only.split(","):
            continue
        ok, reason = B.PROVIDERS[base].available(torch.device("cpu"))
        if not ok:  # e.g. the sampler-step goal against diffusers without diffusers installed
            print(f"| {case} | {', '.join(sizes)} | | {base} | not run: {reason} | | | <= {limit} | not measured |")
            continue
        # The solvers exist as drop-ins only: their fused side is fastddpm.diffusers' scheduler.
        fused = "fastddpm-diffusers" if case in B.SOLVER_CASES else args.fused
        for size in sizes:
            med = measure(case, size, [fused, base], args.rounds)
            (fused_s, fused_spread), (base_s, base_spread) = med[fused], med[base]
            ratio = fused_s / base_s
            print(f"| {case} | {size} | {fused_s * 1e3:.3f} ms ({fused}) | {base} | {base_s * 1e3:.3f} ms | {ratio:.3f} | "
                  f"{fused_spread:.0%} / {base_spread:.0%} | <= {limit} | {'yes' if ratio <= limit else '**no**'} |",
                  flush=True)
    if not args.only or compile_step.NAME in args.only.split(","):
        for row in compile_step.goal_rows(args.rounds, args.fused):
            print(row, flush=True)


if __name__ == "__main__":
    main()
