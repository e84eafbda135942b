"""``fastddpm bench``: every case x size x provider of :mod:`fastddpm.cli.benchmarking`, one table.

Sizes, cases, providers and bytes moved live in :mod:`fastddpm.cli.benchmarking` (shared with the
pytest-benchmark suite in ``benchmarks/``); this module only runs them in one process and
prints median times, the ratio to eager PyTorch and GB/s beside a ``copy_`` measured in the same
run at the same size. The providers of an op take turns call by call (:func:`time_interleaved`),
so load from other work on a shared machine skews no single row of a comparison.
"""
import json
import os
import platform
import sys
import time

import torch

from .. import __version__
from . import benchmarking as B
from ._common import parse_device

QUICK = dict(sizes=("cifar",), min_time=0.05, warmup=2)
FULL = dict(sizes=tuple(s for s in B.SIZES), min_time=0.5, warmup=3)
BASELINE = "eager"
YARDSTICK = "copy"


class BenchError(Exception):
    """A bad option; the message says what to do. The CLI exits with 2."""


def _pick(kind, asked, known):
    if asked is None:
        return list(known)
    unknown = [a for a in asked if a not in known]
    if unknown:
        raise BenchError(f"unknown {kind} {', '.join(map(repr, unknown))}; expected some of {', '.join(known)}")
    return list(asked)


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "fastddpm": __version__, "device": str(device), "threads": torch.get_num_threads(),
            "cpu": _cpu_name()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for mod in ("triton", "diffusers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(device, sizes=None, cases=None, providers=None, min_time=0.5, warmup=3, log=print) -> dict:
    """Time the selection; returns {"machine", "config", "results", "unavailable"}."""
    device = torch.device(device)
    sizes = _pick("size", sizes, B.SIZES)
    cases = _pick("case", cases, [c for c in B.CASES if c != YARDSTICK])
    providers = _pick("provider", providers, [p for p in B.PROVIDERS if YARDSTICK not in B.PROVIDERS[p].cases])
    unavailable = {}
    runnable = []
    for name in providers:
        ok, reason = B.PROVIDERS[name].available(device)
        if ok:
            runnable.append(name)
        else:
            unavailable[name] = reason
    yardstick = [p for p in B.PROVIDERS if YARDSTICK in B.PROVIDERS[p].cases]
    results = []
    for size in sizes:
        inputs = B.Inputs(B.SIZES[size], device)
        for case in [YARDSTICK] + cases:
            rows = []
            for prov in (yardstick if case == YARDSTICK else runnable):
                fn = B.make_callable(prov, case, inputs)
                if fn is not None:  # None: this provider does not offer this case
                    rows.append((prov, fn))
            if not rows:
                continue
            log(f"  {size:>6} {case:<15}", end="\r")
            for (prov, _), times in zip(rows, time_interleaved([fn for _, fn in rows], min_time, warmup)):
                results.append({"size": size, "shape": list(inputs.shape), "case": case, "provider": prov,
                                "median_s": B.median(times), "rounds": len(times),
                                "bytes": B.bytes_moved(case, inputs.shape, inputs.dtype)})
        del inputs
    log(" " * 60, end="\r")
    _add_ratios(results)
    return {"machine": machine(device),
            "config": {"sizes": {s: list(B.SIZES[s]) for s in sizes}, "cases": cases, "providers": providers,
                       "min_time_s": min_time, "warmup": warmup, "dtype": "float32"},
            "results": results, "unavailable": unavailable}


def time_interleaved(fns, min_time, warmup, min_rounds=10, max_rounds=10000):
    """Seconds per call of each of ``fns``, taking turns one call each round.

    On a machine shared with other work, a burst of load then slows every provider alike instead
    of whichever was being timed, so the ratios stay honest.
    Rounds continue until ``min_time`` seconds per function have passed (and ``min_rounds``).
    """
    for fn in fns:
        for _ in range(warmup):  # compiles, caches, first-touch page faults
            fn()
    times = [[] for _ in fns]
    start = time.perf_counter()
    budget = min_time * len(fns)
    while len(times[0]) < max_rounds and (len(times[0]) < min_rounds or time.perf_counter() - start < budget):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return times


def _add_ratios(results):
    """GB/s, fraction of the copy's GB/s at that size, and time relative to eager."""
    copy = {r["size"]: r["bytes"] / r["median_s"] for r in results if r["case"] == YARDSTICK}
    eager = {(r["size"], r["case"]): r["median_s"] for r in results if r["provider"] == BASELINE}
    for r in results:
        r["gb_per_s"] = r["bytes"] / r["median_s"] / 1e9
        r["fraction_of_copy"] = r["bytes"] / r["median_s"] / copy[r["size"]]
        base = eager.get((r["size"], r["case"]))
        r["vs_eager"] = r["median_s"] / base if base else None


def _fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:8.1f} us"
    return f"{s * 1e3:8.2f} ms"


def table(report) -> str:
    """The results as a Markdown table (readable in a terminal, pastes into a README)."""
    lines = ["| size | op | provider | median | vs eager | GB/s | % of copy |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        shape = "x".join(map(str, r["shape"]))
        ratio = f"{r['vs_eager']:.2f}x" if r["vs_eager"] is not None else ""
        lines.append(f"| {r['size']} {shape} | {r['case']} | {r['provider']} | {_fmt_time(r['median_s']).strip()} "
                     f"| {ratio} | {r['gb_per_s']:.1f} | {100 * r['fraction_of_copy']:.0f}% |")
    m = report["machine"]
    where = m.get("gpu") or m["cpu"]
    lines.append("")
    lines.append(f"{where}, {m['threads']} threads; torch {m['torch']}; float32; medians of calls, the providers of "
                 f"an op taking turns, >= {report['config']['min_time_s']} s per row. vs eager: time / eager "
                 "labml-style time "
                 "(lower is faster). GB/s: least bytes the op must move / time.")
    for name, reason in report["unavailable"].items():
        lines.append(f"not run: {name} ({reason})")
    return "\n".join(lines)


def main(device="auto", sizes=None, cases=None, providers=None, quick=False, min_time=None, json_path=None,
         threads=None, log=None) -> dict:
    if log is None:  # a one-line progress display on a terminal; nothing in logs
        def log(*a, **kw):
            if sys.stderr.isatty():
                print(*a, **kw, file=sys.stderr, flush=True)
    device = parse_device(device, "fastddpm bench", BenchError)
    if json_path and not os.path.isdir(os.path.dirname(os.path.abspath(json_path))):
        raise BenchError(f"--json {json_path}: its folder does not exist")
    if threads is not None:
        torch.set_num_threads(threads)
    preset = QUICK if quick else FULL
    report = run(device, sizes=sizes or preset["sizes"], cases=cases, providers=providers,
                 min_time=preset["min_time"] if min_time is None else min_time, warmup=preset["warmup"], log=log)
    print(table(report))
    if json_path:
        try:
            with open(json_path, "w") as f:
                json.dump(report, f, indent=2)
        except OSError as e:
            raise BenchError(f"--json {json_path}: cannot write ({e.strerror})") from None
    return report
