"""The issue's goals as ratios of medians, with the providers timed interleaved.

    python benchmarks/goals.py [--threads N] [--rounds R]

pytest-benchmark times one benchmark after another, so on a shared machine a burst of load can
land on one provider only. Here every round times each provider of a case once, in turn
(fastddpm.cli.timing, the harness of `fastddpm bench`), so the ratios compare like with like.
Cases, sizes, providers and goals: fastddpm.cli.bench.cases.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from fastddpm.cli import timing  # noqa: E402
from fastddpm.cli.bench import cases as B  # noqa: E402

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--fused", default="fastddpm-cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, {args.rounds} interleaved rounds, load average "
          f"{os.getloadavg()[0]:.1f}; spread: IQR / median of the rounds\n")
    print(f"| case | size | {args.fused} | baseline | baseline time | ratio | spread | goal | met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, base, limit, sizes in B.GOALS:
        ok, reason = B.PROVIDERS[base].available(torch.device("cpu"))
        if not ok:  # e.g. the sampler-step goal against diffusers without diffusers installed
            print(f"| {case} | {', '.join(sizes)} | | {base} | not run: {reason} | | | <= {limit} | not measured |")
            continue
        for size in sizes:
            med = measure(case, size, [args.fused, base], args.rounds)
            (fused_s, fused_spread), (base_s, base_spread) = med[args.fused], med[base]
            ratio = fused_s / base_s
            print(f"| {case} | {size} | {fused_s * 1e3:.3f} ms | {base} | {base_s * 1e3:.3f} ms | {ratio:.3f} | "
                  f"{fused_spread:.0%} / {base_spread:.0%} | <= {limit} | {'yes' if ratio <= limit else '**no**'} |",
                  flush=True)


if __name__ == "__main__":
    main()
