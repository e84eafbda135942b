"""The figures ``fastddpm bench`` derives from its timings, and how far to trust them.

Per row: GB/s (the least bytes the case must move / median time), the fraction of the GB/s of
the ``copy_`` yardstick at that size, the time relative to eager PyTorch, and the spread of its
samples (IQR / median). A copy is the least work that moves a size's bytes, so no row can
honestly beat it: when one does, the yardstick itself was slowed (a busy or stalled CPU) and
every "% of copy" at that size is invalid. A row whose spread exceeds :data:`UNSTABLE_SPREAD` is
unstable: its median may be off.

A *stall* is worse: on a small shared VM (2 vCPUs), torch's thread pool can wait a whole
scheduler tick for a descheduled worker, so calls that take microseconds time at 7.99 ms, the
same in every sample (a small spread that hides it). :func:`detect_stall` sees it two ways:
many medians on the grid of a timer tick (:func:`tick_grid`), or the copy yardstick with
torch's threads far slower than the same copy on one thread (:func:`thread_stall`). Rows a
stall touches are marked unstable, and no unstable row gets a "vs eager" ratio.
"""
BASELINE = "eager"
YARDSTICK = "copy"
UNSTABLE_SPREAD = 0.25  # the middle half of the samples spans more than a quarter of the median

# Row["copy_check"]: how far its fraction of the copy's bandwidth can be trusted.
OK, UNCERTAIN, INVALID = "ok", "uncertain", "invalid"

# Timer ticks a stalled thread pool waits out (CONFIG_HZ 125, 100, 250): checked in this order.
TICKS_S = (8e-3, 10e-3, 4e-3)
TICK_TOLERANCE = 0.01  # a median "on the grid" lies within 1% of a tick of a multiple of it
TICK_MAX_MULTIPLE = 8  # ... of at most 8 ticks (a long real timing lands near some multiple by chance)
TICK_MIN_ROWS = 3      # a stall: at least 3 such rows,
TICK_MIN_FRACTION = 1 / 3  # ... and at least a third of the rows whose medians lie in the grid's range
THREAD_STALL_RATIO = 4.0  # the copy with torch's threads this many times slower than on one thread
# torch splits elementwise work over threads in chunks of at least at::internal::GRAIN_SIZE
# (32768) elements: below two chunks a call runs on one thread, and a stalled pool cannot slow it.
PARALLEL_NUMEL = 2 * 32768


def tick_grid(results):
    """The timer-tick grid the rows' medians sit on, or None: {"tick_s", "rows" (the on-grid
    rows), "of" (the rows in the grid's range)}. Random medians land within 1% of a tick of a
    multiple with chance 2%, so needing 3 rows and a third of the range keeps real timings out."""
    for tick in TICKS_S:
        in_range = [r for r in results if (1 - TICK_TOLERANCE) * tick <= r["median_s"]
                    <= (TICK_MAX_MULTIPLE + TICK_TOLERANCE) * tick]
        on = [r for r in in_range if abs(r["median_s"] / tick - round(r["median_s"] / tick)) <= TICK_TOLERANCE]
        if len(on) >= TICK_MIN_ROWS and len(on) >= TICK_MIN_FRACTION * len(in_range):
            return {"tick_s": tick, "rows": on, "of": len(in_range)}
    return None


def thread_stall(results, single_thread_copy):
    """The copy yardstick's stall, or None. ``single_thread_copy``: {"size", "threads",
    "median_s"}, the copy at that size timed again with torch.set_num_threads(1); the run's copy
    row at that size (with ``threads`` threads) more than :data:`THREAD_STALL_RATIO` times
    slower is a stalled pool, not a machine whose copy needs that long."""
    if not single_thread_copy or single_thread_copy.get("threads", 1) <= 1:
        return None
    row = next((r for r in results if r["case"] == YARDSTICK and r["size"] == single_thread_copy["size"]), None)
    if row is None or single_thread_copy["median_s"] <= 0:
        return None
    ratio = row["median_s"] / single_thread_copy["median_s"]
    if ratio <= THREAD_STALL_RATIO:
        return None
    return {"size": row["size"], "threads": single_thread_copy["threads"], "median_s": row["median_s"],
            "one_thread_median_s": single_thread_copy["median_s"], "ratio": ratio}


def _ms(s):
    return f"{1e3 * s:.2f} ms" if s >= 1e-3 else f"{1e6 * s:.1f} us"


def numel(shape) -> int:
    """Elements in a tensor of ``shape``."""
    n = 1
    for d in shape:
        n *= d
    return n


def detect_stall(results, single_thread_copy=None, threads=None):
    """Marks the rows a stall touched (``stalled``, ``unstable``) and returns (the report's
    "stall" entry or None, its warning or None). A thread-pool stall marks every row of a size
    the pool works on (at least :data:`PARALLEL_NUMEL` elements: any of its calls may have
    waited); a tick grid marks the rows on it."""
    grid = tick_grid(results)
    pool = thread_stall(results, single_thread_copy)
    if grid is None and pool is None:
        return None, None
    touched = {id(r): r for r in (grid["rows"] if grid is not None else [])}
    if pool is not None:
        touched.update((id(r), r) for r in results if numel(r["shape"]) >= PARALLEL_NUMEL)
    touched = [r for r in results if id(r) in touched]
    for r in touched:
        r["stalled"] = True
        r["unstable"] = True
    seen = []
    if pool is not None:
        seen.append(f"the copy_ yardstick at {pool['size']} took {_ms(pool['median_s'])} with {pool['threads']} "
                    f"threads but {_ms(pool['one_thread_median_s'])} on 1 ({pool['ratio']:.0f}x)")
    if grid is not None:
        medians = sorted(r["median_s"] for r in grid["rows"])
        shown = ", ".join(_ms(m) for m in medians[:4]) + (", ..." if len(medians) > 4 else "")
        seen.append(f"{len(grid['rows'])} of the {grid['of']} medians of 1 to {TICK_MAX_MULTIPLE} ticks lie on "
                    f"multiples of {_ms(grid['tick_s'])}, a timer tick ({shown})")
    n_threads = pool["threads"] if pool is not None else threads
    if n_threads is not None and n_threads > 1:
        recommend = "--threads 1"
        advice = (f"Rerun with --threads 1 (torch's {n_threads}-thread pool waits for descheduled workers on "
                  "a small shared VM).")
    else:
        recommend = None
        advice = "Rerun on a quieter machine."
    stall = {"seen": seen, "rows": len(touched), "recommend": recommend,
             "tick_grid": None if grid is None else {"tick_s": grid["tick_s"], "rows": len(grid["rows"]),
                                                     "of": grid["of"]},
             "thread_pool": pool}
    warning = (f"warning: the CPU stalled: {'; '.join(seen)}. {len(touched)} of {len(results)} rows are marked "
               f"unstable ('!') and get no 'vs eager' ratio. {advice}")
    return stall, warning


def derive(results, single_thread_copy=None, threads=None) -> dict:
    """Adds gb_per_s, fraction_of_copy, vs_eager (and vs_eager_reason where it is None),
    unstable, stalled and copy_check to every row of ``results`` (dicts with size, case,
    provider, median_s, spread, bytes); returns {"warnings": lines to print, "stall": the
    stall seen (:func:`detect_stall`) or None}. ``threads``: torch's threads in the run."""
    copy = {r["size"]: r for r in results if r["case"] == YARDSTICK}
    for r in results:
        r["gb_per_s"] = r["bytes"] / r["median_s"] / 1e9
        y = copy.get(r["size"])
        r["fraction_of_copy"] = r["gb_per_s"] / (y["bytes"] / y["median_s"] / 1e9) if y else None
        r["unstable"] = r["spread"] > UNSTABLE_SPREAD
        r["stalled"] = False
        r["copy_check"] = OK if y else INVALID
    stall, stall_warning = detect_stall(results, single_thread_copy, threads)
    eager = {(r["size"], r["case"]): r for r in results if r["provider"] == BASELINE}
    for r in results:
        base = eager.get((r["size"], r["case"]))
        r["vs_eager"], r["vs_eager_reason"] = None, None
        if base is None:
            r["vs_eager_reason"] = "no eager row"
        elif r["unstable"]:
            r["vs_eager_reason"] = "unstable: " + ("stalled" if r["stalled"] else "spread above "
                                                   f"{UNSTABLE_SPREAD:.0%}")
        elif base["unstable"]:
            r["vs_eager_reason"] = "the eager row is unstable"
        else:
            r["vs_eager"] = r["median_s"] / base["median_s"]
    warnings = [stall_warning] if stall_warning else []
    for size, y in copy.items():
        rows = [r for r in results if r["size"] == size and r["case"] != YARDSTICK]
        beaten = [r for r in rows if r["fraction_of_copy"] > 1]
        if beaten:
            fastest = max(beaten, key=lambda r: r["fraction_of_copy"])
            for r in rows:
                r["copy_check"] = INVALID
            warnings.append(
                f"warning: at {size}, {fastest['provider']} {fastest['case']} moved its bytes "
                f"{fastest['fraction_of_copy']:.1f}x as fast as the copy_ yardstick ({1e3 * y['median_s']:.3f} ms, "
                f"spread {y['spread']:.0%}), which cannot be: the copy was slowed by other work or a stalled "
                f"CPU, so '% of copy' at {size} is marked invalid. Rerun on a quieter machine.")
        elif y["unstable"]:
            for r in rows:
                r["copy_check"] = UNCERTAIN
            why = "stalled" if y["stalled"] else f"spread {y['spread']:.0%} > {UNSTABLE_SPREAD:.0%}"
            warnings.append(
                f"warning: the copy_ yardstick at {size} is unstable ({why}): its '% of copy' figures are "
                "marked '?'.")
    unstable = [r for r in results if r["spread"] > UNSTABLE_SPREAD]
    if unstable:
        warnings.append(
            f"warning: {len(unstable)} of {len(results)} rows unstable, spread above {UNSTABLE_SPREAD:.0%} (marked "
            "'!'): their medians may be off. Rerun on a quieter machine or with a longer --min-time.")
    return {"warnings": warnings, "stall": stall}


def add_figures(results, single_thread_copy=None, threads=None) -> list:
    """:func:`derive`'s warnings (the rows get their figures all the same)."""
    return derive(results, single_thread_copy, threads)["warnings"]


def percent_of_copy(r) -> str:
    """The table's '% of copy' cell: never a figure above 100% unless marked invalid."""
    if r["copy_check"] == INVALID or r["fraction_of_copy"] is None:
        return "invalid"
    return f"{100 * r['fraction_of_copy']:.0f}%" + ("?" if r["copy_check"] == UNCERTAIN else "")


def spread_cell(r) -> str:
    return f"{100 * r['spread']:.0f}%" + (" !" if r["unstable"] else "")


def vs_eager_cell(r) -> str:
    """The table's 'vs eager' cell: the ratio, 'unstable' where it was withheld (this row or its
    eager row unstable), empty where there is no eager row."""
    if r["vs_eager"] is not None:
        return f"{r['vs_eager']:.2f}x"
    return "unstable" if (r.get("vs_eager_reason") or "").startswith(("unstable", "the eager")) else ""
