"""The issue's goals as ratios of medians, with the providers timed interleaved.

    python benchmarks/goals.py [--threads N] [--rounds R]

pytest-benchmark times one benchmark after another, so on a shared machine a burst of load can
land on one provider only. Here every round times each provider of a case once, in turn, so
the ratios compare like with like. Cases, sizes, providers and goals: fastddpm.cli.benchmarking.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from fastddpm.cli import benchmarking as B  # noqa: E402


def _time(fn, number):
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def measure(case, size, providers, rounds, device="cpu"):
    inputs = B.Inputs(B.SIZES[size], device)
    fns = {p: B.make_callable(p, case, inputs) for p in providers}
    for fn in fns.values():
        for _ in range(3):
            fn()
    number = max(1, int(0.01 / max(1e-7, min(_time(fn, 1) for fn in fns.values()))))
    times = {p: [] for p in fns}
    for _ in range(rounds):
        for p, fn in fns.items():
            times[p].append(_time(fn, number))
    return {p: statistics.median(v) for p, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--fused", default="fastddpm-cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, {args.rounds} interleaved rounds, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print(f"| case | size | {args.fused} | baseline | baseline time | ratio | goal | met |")
    print("|---|---|---|---|---|---|---|---|")
    for case, base, limit, sizes in B.GOALS:
        for size in sizes:
            med = measure(case, size, [args.fused, base], args.rounds)
            ratio = med[args.fused] / med[base]
            print(f"| {case} | {size} | {med[args.fused] * 1e3:.3f} ms | {base} | {med[base] * 1e3:.3f} ms | "
                  f"{ratio:.3f} | <= {limit} | {'yes' if ratio <= limit else '**no**'} |", flush=True)


if __name__ == "__main__":
    main()
