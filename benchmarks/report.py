"""Turns a pytest-benchmark JSON of benchmarks/test_bench_ops.py into the tables of RESULTS.md.

    python benchmarks/report.py bench.json [--fused fastddpm-cpu]

Prints, per size, every case's median per provider and the fused provider's GB/s next to the
copy_ yardstick of the same run, then the goals of fastddpm.cli.bench.cases.GOALS as ratios of
medians, each marked met or not.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastddpm.cli.bench import cases as B  # noqa: E402


def _fmt_time(s):
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.3f} ms"


def load(path):
    with open(path) as f:
        data = json.load(f)
    medians, info = {}, {}
    for bench in data["benchmarks"]:
        extra = bench["extra_info"]
        key = (extra["case"], extra["size"], extra["provider"])
        medians[key] = bench["stats"]["median"]
        info[key] = extra
    return data, medians, info


def report(path, fused):
    data, med, info = load(path)
    providers = [p for p in B.PROVIDERS if any(k[2] == p for k in med)]
    sizes = [s for s in B.SIZES if any(k[1] == s for k in med)]
    out = []
    machine = data.get("machine_info", {})
    threads = {e.get("threads") for e in info.values()}
    out.append(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, torch threads {sorted(threads)}; "
               f"medians of pytest-benchmark rounds, all in one run.\n")
    for size in sizes:
        out.append(f"### {size} {tuple(B.SIZES[size])}\n")
        out.append("| case | " + " | ".join(providers) + f" | {fused} GB/s | copy_ GB/s |")
        out.append("|---" * (len(providers) + 3) + "|")
        copy_key = ("copy", size, "copy_")
        copy_gbs = info[copy_key]["bytes"] / med[copy_key] / 1e9 if copy_key in med else None
        for case in B.CASES:
            cells = [_fmt_time(med[(case, size, p)]) if (case, size, p) in med else "" for p in providers]
            if not any(cells):
                continue
            key = (case, size, fused if case != "copy" else "copy_")
            gbs = f"{info[key]['bytes'] / med[key] / 1e9:.1f}" if key in med else ""
            out.append(f"| {case} | " + " | ".join(cells) + f" | {gbs} | "
                       + (f"{copy_gbs:.1f}" if copy_gbs else "") + " |")
        out.append("")
    out.append(f"### Goals ({fused} median / baseline median)\n")
    out.append("| case | size | baseline | ratio | goal | met |")
    out.append("|---|---|---|---|---|---|")
    for case, base, limit, goal_sizes in B.GOALS:
        for size in goal_sizes:
            a, b = med.get((case, size, fused)), med.get((case, size, base))
            if a is None or b is None:
                continue
            ratio = a / b
            out.append(f"| {case} | {size} | {base} | {ratio:.3f} | <= {limit} | {'yes' if ratio <= limit else '**no**'} |")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--fused", default="fastddpm-cpu")
    args = ap.parse_args()
    print(report(args.json, args.fused))
