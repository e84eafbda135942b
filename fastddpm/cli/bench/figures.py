"""The figures ``fastddpm bench`` derives from its timings, and how far to trust them.

Per row: GB/s (the least bytes the case must move / median time), the fraction of the GB/s of
the ``copy_`` yardstick at that size, the time relative to eager PyTorch, and the spread of its
samples (IQR / median). A copy is the least work that moves a size's bytes, so no row can
honestly beat it: when one does, the yardstick itself was slowed (a busy or stalled CPU) and
every "% of copy" at that size is invalid. A row whose spread exceeds :data:`UNSTABLE_SPREAD` is
unstable: its median may be off.
"""
BASELINE = "eager"
YARDSTICK = "copy"
UNSTABLE_SPREAD = 0.25  # the middle half of the samples spans more than a quarter of the median

# Row["copy_check"]: how far its fraction of the copy's bandwidth can be trusted.
OK, UNCERTAIN, INVALID = "ok", "uncertain", "invalid"


def add_figures(results) -> list:
    """Adds gb_per_s, fraction_of_copy, vs_eager, unstable and copy_check to every row of
    ``results`` (dicts with size, case, provider, median_s, spread, bytes); returns the warnings
    to print, one line each."""
    copy = {r["size"]: r for r in results if r["case"] == YARDSTICK}
    eager = {(r["size"], r["case"]): r["median_s"] for r in results if r["provider"] == BASELINE}
    for r in results:
        r["gb_per_s"] = r["bytes"] / r["median_s"] / 1e9
        y = copy.get(r["size"])
        r["fraction_of_copy"] = r["gb_per_s"] / (y["bytes"] / y["median_s"] / 1e9) if y else None
        base = eager.get((r["size"], r["case"]))
        r["vs_eager"] = r["median_s"] / base if base else None
        r["unstable"] = r["spread"] > UNSTABLE_SPREAD
        r["copy_check"] = OK if y else INVALID
    warnings = []
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
            warnings.append(
                f"warning: the copy_ yardstick at {size} is unstable (spread {y['spread']:.0%} > "
                f"{UNSTABLE_SPREAD:.0%}): its '% of copy' figures are marked '?'.")
    unstable = [r for r in results if r["unstable"]]
    if unstable:
        warnings.append(
            f"warning: {len(unstable)} of {len(results)} rows unstable, spread above {UNSTABLE_SPREAD:.0%} (marked "
            "'!'): their medians may be off. Rerun on a quieter machine or with a longer --min-time.")
    return warnings


def percent_of_copy(r) -> str:
    """The table's '% of copy' cell: never a figure above 100% unless marked invalid."""
    if r["copy_check"] == INVALID or r["fraction_of_copy"] is None:
        return "invalid"
    return f"{100 * r['fraction_of_copy']:.0f}%" + ("?" if r["copy_check"] == UNCERTAIN else "")


def spread_cell(r) -> str:
    return f"{100 * r['spread']:.0f}%" + (" !" if r["unstable"] else "")
