"""The one timing harness of ``fastddpm bench``, the demo's throughput bursts and benchmarks/.

Several callables are timed *interleaved*: every round calls each of them once, in turn, so a
burst of load from other work on a shared machine slows all of them alike instead of
whichever happened to be timed at the time, and their ratios stay honest. Each function gets
the same number of samples; the figures are medians, with the interquartile range over the
median (:func:`spread`) saying how much to trust them.
"""
import statistics
import time
from dataclasses import dataclass


def time_interleaved(fns, *, warmup: int = 3, min_time: float = 0.5, min_rounds: int = 10,
                     max_rounds: int = 10000, number: int = 1, sync=None) -> list:
    """Seconds per call of each of ``fns``: one list of samples per function, all equally long.

    ``warmup`` untimed calls each first (compiles, caches, first-touch page faults). Then rounds
    run until every function has had ``min_time`` seconds and ``min_rounds`` rounds, at most
    ``max_rounds``; each round starts one function later than the last, so none always runs
    right after the same neighbour. A sample is the mean of ``number`` back-to-back calls (for
    calls too short to time one by one). ``sync``, when given, is called before the clock starts
    and inside the timed region after the calls (``torch.cuda.synchronize`` for GPU work).
    """
    fns = list(fns)
    sync = sync or _nothing
    warm_up(fns, warmup)
    sync()
    times = [[] for _ in fns]
    budget = min_time * len(fns)
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget):
        for k in range(len(fns)):
            i = (rounds + k) % len(fns)
            fn = fns[i]
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            sync()
            times[i].append((time.perf_counter() - t0) / number)
        rounds += 1
    return times


def warm_up(fns, calls: int = 3):
    """``calls`` untimed calls of each of ``fns``: compiles, caches, first-touch page faults."""
    for fn in fns:
        for _ in range(calls):
            fn()


def time_callable(fn, **kwargs) -> list:
    """Seconds per call of one function (see :func:`time_interleaved` for the options)."""
    return time_interleaved([fn], **kwargs)[0]


def calls_per_sample(fns, target_s: float = 0.01, sync=None) -> int:
    """How many back-to-back calls make a sample of about ``target_s`` for the fastest of ``fns``
    (after one call each to warm up): ``number`` for :func:`time_interleaved`."""
    sync = sync or _nothing
    fastest = float("inf")
    for fn in fns:
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        fastest = min(fastest, time.perf_counter() - t0)
    return max(1, int(target_s / max(fastest, 1e-7)))


def median(times) -> float:
    return statistics.median(times)


def iqr(times) -> float:
    """Interquartile range (0 for fewer than two samples)."""
    if len(times) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q3 - q1


def spread(times) -> float:
    """IQR / median: the relative scatter of the samples (0.05: the middle half lies within 5%)."""
    m = median(times)
    return iqr(times) / m if m > 0 else 0.0


@dataclass(frozen=True)
class Summary:
    median_s: float
    iqr_s: float
    spread: float
    rounds: int


def summarize(times) -> Summary:
    return Summary(median(times), iqr(times), spread(times), len(times))


def _nothing():
    pass
