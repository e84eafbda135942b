"""``fastddpm bench``'s output: a Markdown table (readable in a terminal, pastes into a README),
the machine it ran on, and the warnings of :mod:`.figures`."""
from .figures import UNSTABLE_SPREAD, percent_of_copy, spread_cell, vs_eager_cell


def _fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e3:.2f} ms"


def table(report) -> str:
    lines = ["| size | op | provider | median | spread | vs eager | GB/s | % of copy |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"| {r['size']} {shape} | {r['case']} | {r['provider']} | {_fmt_time(r['median_s'])} "
                     f"| {spread_cell(r)} | {vs_eager_cell(r)} | {r['gb_per_s']:.1f} | {percent_of_copy(r)} |")
    m = report["machine"]
    where = m.get("gpu") or m["cpu"]
    isa = f", CPU kernels {m['cpu_isa']}" if m.get("cpu_isa") else ""
    lines.append("")
    lines.append(f"{where}{isa}, {m['threads']} threads; torch {m['torch']}; float32; medians of calls, the "
                 f"providers of an op taking turns, >= {report['config']['min_time_s']} s per row. spread: IQR / "
                 f"median ('!' above {UNSTABLE_SPREAD:.0%} or stalled). vs eager: time / the eager PyTorch time "
                 "(labml's code; diffusers' math for the DDIM steps; lower is faster; 'unstable' where this row or "
                 "the eager one is). GB/s: least bytes the op must move / time.")
    for name, reason in report["unavailable"].items():
        lines.append(f"not run: {name} ({reason})")
    lines.extend(report.get("warnings", []))
    return "\n".join(lines)
