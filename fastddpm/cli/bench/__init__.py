"""``fastddpm bench``: every case x size x provider of :mod:`fastddpm.cli.bench.cases`, one table.

Sizes, cases, providers and bytes moved live in :mod:`.cases` (shared with the pytest-benchmark
suite in ``benchmarks/``); this package runs them in one process with the shared harness
(:mod:`fastddpm.cli.timing`: the providers of an op take turns call by call, so load from other
work on a shared machine skews no single row of a comparison), derives the figures and their
validity (:mod:`.figures`) and prints them (:mod:`.table`). On a CPU with more than one torch
thread it also times the copy yardstick once on one thread, which tells a stalled thread pool
(:func:`.figures.detect_stall`) from a slow machine. Progress goes to stderr: one line rewritten
in place on a terminal, one plain line per size and op elsewhere (a log, a pipe, CI).
"""
import json
import os
import sys

import torch

from .. import machine as M
from .. import timing
from .._common import parse_device
from . import cases as B
from .figures import PARALLEL_NUMEL, YARDSTICK, derive, numel
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


class Progress:
    """``fastddpm bench``'s progress on ``stream`` (sys.stderr when it is called): on a terminal
    one line rewritten in place, elsewhere one plain line per call, so a log shows how far a run
    got."""

    WIDTH = 60

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())

    def __call__(self, text):
        if self.tty:
            self.stream.write(f"\r{text:<{self.WIDTH}}")
        else:
            self.stream.write(f"fastddpm bench: {text}\n")
        self.stream.flush()

    def done(self):
        if self.tty:  # clear the line before the table
            self.stream.write("\r" + " " * self.WIDTH + "\r")
            self.stream.flush()


def _one_thread_size(device, sizes):
    """The smallest of ``sizes`` whose copy_ two threads share, or None (GPU, or all too small)."""
    if device.type != "cpu":
        return None
    big = [s for s in sizes if numel(B.SIZES[s]) >= PARALLEL_NUMEL]
    return min(big, key=lambda s: numel(B.SIZES[s])) if big else None


def run(device, sizes=None, cases=None, providers=None, min_time=0.5, warmup=3, log=None) -> dict:
    """Time the selection; returns {"machine", "config", "results", "unavailable", "warnings",
    "single_thread_copy", "stall"}. ``log(text)``: progress, one call per size and op."""
    log = log or Progress()
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
    threads = torch.get_num_threads()
    check_size = _one_thread_size(device, sizes) if threads > 1 else None
    single_thread_copy = None
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
            log(f"{size} {case}")
            samples = timing.time_interleaved([fn for _, fn in rows], warmup=warmup, min_time=min_time)
            for (prov, _), times in zip(rows, samples):
                s = timing.summarize(times)
                results.append({"size": size, "shape": list(inputs.shape), "case": case, "provider": prov,
                                "median_s": s.median_s, "iqr_s": s.iqr_s, "spread": s.spread, "rounds": s.rounds,
                                "bytes": B.bytes_moved(case, inputs.shape, inputs.dtype)})
            if case == YARDSTICK and size == check_size:
                log(f"{size} {case} on 1 thread (is the {threads}-thread pool stalling?)")
                single_thread_copy = _time_one_thread(rows[0][1], threads, size, warmup, min_time)
        del inputs
    if isinstance(log, Progress):
        log.done()
    figures = derive(results, single_thread_copy, threads)
    return {"machine": machine(device),
            "config": {"sizes": {s: list(B.SIZES[s]) for s in sizes}, "cases": cases, "providers": providers,
                       "min_time_s": min_time, "warmup": warmup, "dtype": "float32"},
            "results": results, "unavailable": unavailable, "warnings": figures["warnings"],
            "single_thread_copy": single_thread_copy, "stall": figures["stall"]}


def _time_one_thread(copy, threads, size, warmup, min_time) -> dict:
    """The copy yardstick timed again with torch.set_num_threads(1); the thread count restored."""
    torch.set_num_threads(1)
    try:
        s = timing.summarize(timing.time_callable(copy, warmup=warmup, min_time=min_time))
    finally:
        torch.set_num_threads(threads)
    return {"size": size, "threads": threads, "median_s": s.median_s, "spread": s.spread, "rounds": s.rounds}


def _check_something_runs(runnable, cases, unavailable):
    """An empty table is no answer: say why nothing would run instead of timing only the copy."""
    if any(case in B.PROVIDERS[p].cases for p in runnable for case in cases):
        return
    why = [f"{name}: {reason}" for name, reason in unavailable.items()]
    why += [f"{name} offers none of the ops {', '.join(cases)}" for name in runnable]
    raise BenchError("nothing to run, no provider can time the chosen ops here (" + "; ".join(why) + ")")


def main(device="auto", sizes=None, cases=None, providers=None, quick=False, min_time=None, json_path=None,
         threads=None, log=None) -> dict:
    log = log or Progress()  # stderr: rewritten in place on a terminal, plain lines elsewhere
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
