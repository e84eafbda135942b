"""``fastddpm bench``: every case x size x provider of :mod:`fastddpm.cli.bench.cases`, one table.

Sizes, cases, providers and bytes moved live in :mod:`.cases` (shared with the pytest-benchmark
suite in ``benchmarks/``); this package runs them in one process with the shared harness
(:mod:`fastddpm.cli.timing`: the providers of an op take turns call by call, so load from other
work on a shared machine skews no single row of a comparison), derives the figures and their
validity (:mod:`.figures`) and prints them (:mod:`.table`).
"""
import json
import os
import sys

import torch

from .. import machine as M
from .. import timing
from .._common import parse_device
from . import cases as B
from .figures import YARDSTICK, add_figures
from .table import table

QUICK = dict(sizes=("cifar",), min_time=0.05, warmup=2)
FULL = dict(sizes=tuple(s for s in B.SIZES), min_time=0.5, warmup=3)


class BenchError(Exception):
    """A bad option, or nothing to run; the message says what to do. The CLI exits with 2."""


def _pick(kind, asked, known):
    if asked is None:
        return list(known)
    unknown = [a for a in asked if a not in known]
    if unknown:
        raise BenchError(f"unknown {kind} {', '.join(map(repr, unknown))}; expected some of {', '.join(known)}")
    return list(asked)


def machine(device: torch.device) -> dict:
    return {**M.versions("triton", "diffusers"), **M.describe(device)}


def run(device, sizes=None, cases=None, providers=None, min_time=0.5, warmup=3, log=print) -> dict:
    """Time the selection; returns {"machine", "config", "results", "unavailable", "warnings"}."""
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
    _check_something_runs(runnable, cases, unavailable)
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
            samples = timing.time_interleaved([fn for _, fn in rows], warmup=warmup, min_time=min_time)
            for (prov, _), times in zip(rows, samples):
                s = timing.summarize(times)
                results.append({"size": size, "shape": list(inputs.shape), "case": case, "provider": prov,
                                "median_s": s.median_s, "iqr_s": s.iqr_s, "spread": s.spread, "rounds": s.rounds,
                                "bytes": B.bytes_moved(case, inputs.shape, inputs.dtype)})
        del inputs
    log(" " * 60, end="\r")
    warnings = add_figures(results)
    return {"machine": machine(device),
            "config": {"sizes": {s: list(B.SIZES[s]) for s in sizes}, "cases": cases, "providers": providers,
                       "min_time_s": min_time, "warmup": warmup, "dtype": "float32"},
            "results": results, "unavailable": unavailable, "warnings": warnings}


def _check_something_runs(runnable, cases, unavailable):
    """An empty table is no answer: say why nothing would run instead of timing only the copy."""
    if any(case in B.PROVIDERS[p].cases for p in runnable for case in cases):
        return
    why = [f"{name}: {reason}" for name, reason in unavailable.items()]
    why += [f"{name} offers none of the ops {', '.join(cases)}" for name in runnable]
    raise BenchError("nothing to run, no provider can time the chosen ops here (" + "; ".join(why) + ")")


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
