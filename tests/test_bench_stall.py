"""`fastddpm bench` on a small shared VM: a stalled thread pool is seen and said, unstable rows
get no 'vs eager' ratio, and progress reaches stderr when it is not a terminal."""
import io
import json
import random

import pytest
import torch

from fastddpm import cli
from fastddpm.cli import bench, timing
from fastddpm.cli.bench import Progress
from fastddpm.cli.bench.figures import derive, tick_grid
from fastddpm.cli.bench.table import table

CIFAR = [128, 3, 32, 32]  # a size torch's threads share
TINY = [2, 1, 4, 4]       # one thread runs it whatever the pool does


def _row(case, provider, median_s, spread=0.02, size="cifar", shape=CIFAR, nbytes=8):
    return {"size": size, "shape": list(shape), "case": case, "provider": provider, "median_s": median_s,
            "iqr_s": spread * median_s, "spread": spread, "rounds": 10, "bytes": nbytes}


def _report(results, single_thread_copy=None, threads=2):
    figures = derive(results, single_thread_copy, threads)
    return {"machine": {"cpu": "test cpu", "cpu_isa": "avx2", "threads": threads, "torch": torch.__version__},
            "config": {"min_time_s": 0.05}, "results": results, "unavailable": {},
            "warnings": figures["warnings"], "stall": figures["stall"]}


def _vs_eager_cells(text):
    """{(size, case, provider): the 'vs eager' cell} of a bench table."""
    out = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.strip("|").split("|")]
        if len(parts) == 8 and parts[0] not in ("size", "---"):
            out[(parts[0].split()[0], parts[1], parts[2])] = parts[5]
    return out


# ---- the timer-tick grid -------------------------------------------------------------------

def _stalled_cifar():
    """The seen failure: a 2-thread pool turns calls of tens of microseconds into one or two
    8 ms scheduler ticks, each with a small spread; one row escaped the stall."""
    return [_row("copy", "copy_", 7.99e-3), _row("op", "eager", 8.01e-3), _row("op", "fast", 7.997e-3),
            _row("op2", "eager", 15.98e-3), _row("op2", "fast", 1.2e-3)]


def test_medians_on_multiples_of_an_8_ms_tick_are_a_stall_and_say_threads_1():
    results = _stalled_cifar()
    report = _report(results)
    stall = report["stall"]
    assert stall["tick_grid"] == {"tick_s": 8e-3, "rows": 4, "of": 4}
    assert stall["thread_pool"] is None and stall["recommend"] == "--threads 1"
    assert [r["stalled"] for r in results] == [True, True, True, True, False]
    assert all(r["unstable"] for r in results[:4]) and not results[4]["unstable"]
    warning = report["warnings"][0]
    assert "4 of the 4 medians" in warning and "multiples of 8.00 ms" in warning
    assert "7.99 ms, 8.00 ms, 8.01 ms, 15.98 ms" in warning and "Rerun with --threads 1" in warning
    text = table(report)
    assert warning in text
    cells = _vs_eager_cells(text)
    assert cells[("cifar", "op", "fast")] == "unstable" and cells[("cifar", "op2", "fast")] == "unstable"
    assert results[4]["vs_eager"] is None and results[4]["vs_eager_reason"] == "the eager row is unstable"
    assert results[2]["vs_eager_reason"] == "unstable: stalled"


def test_a_tick_grid_with_one_thread_recommends_a_quieter_machine_instead():
    report = _report(_stalled_cifar(), threads=1)
    assert report["stall"]["recommend"] is None
    assert "--threads 1" not in report["warnings"][0] and "quieter machine" in report["warnings"][0]


@pytest.mark.parametrize("tick", [10e-3, 4e-3])
def test_other_timer_ticks_are_seen(tick):
    results = [_row("copy", "copy_", tick), _row("a", "eager", 2 * tick * 1.004), _row("b", "eager", tick * 0.997)]
    assert tick_grid(results)["tick_s"] == tick


def test_real_timings_do_not_look_like_a_tick_grid():
    # The medians in ms of a full run of benchmarks/bench_cpu.md (2 threads, every size): one
    # row sits at 8.00 ms, the others are off the grid.
    medians_ms = [0.02, 0.085, 0.46, 1.49, 1.59, 1.72, 2.11, 2.42, 2.6, 2.7, 2.74, 3.1, 3.3, 3.36, 3.56, 3.83, 4.55,
                  7.88, 8.0, 8.62, 9.58, 10.62, 10.82, 10.88, 15.8, 16.85, 17.6, 20.83, 22.63, 24.28, 60.39, 60.73,
                  61.57]
    results = [_row("copy" if i == 0 else f"op{i}", "p", m * 1e-3) for i, m in enumerate(medians_ms)]
    report = _report(results)
    assert report["stall"] is None and not any(r["stalled"] for r in results)
    # Two rows on the grid are not yet a pattern, nor are three among many rows off it.
    assert tick_grid([_row("a", "p", 8e-3), _row("b", "p", 16e-3), _row("c", "p", 5e-3)]) is None
    on = [_row(f"on{i}", "p", 8e-3 * (i + 1)) for i in range(3)]
    off = [_row(f"off{i}", "p", (9 + 3.3 * i) * 1e-3) for i in range(7)]  # on no 4, 8 or 10 ms grid
    assert tick_grid(on + off) is None and tick_grid(on + off[:6])["rows"] == on


def test_random_medians_do_not_make_a_tick_grid():
    rng = random.Random(0)
    for trial in range(600):
        n = (5, 12, 30)[trial % 3]
        results = [_row(f"op{i}", "p", 10 ** rng.uniform(-3.3, -0.7)) for i in range(n)]
        assert tick_grid(results) is None, sorted(r["median_s"] for r in results)


# ---- the copy yardstick against its one-thread time -------------------------------------------

def _two_sizes():
    return [_row("copy", "copy_", 7.99e-3, spread=0.0), _row("op", "eager", 2.3e-3, spread=0.1),
            _row("op", "fast", 1.1e-3, spread=0.1),
            _row("copy", "copy_", 1.1e-6, size="tiny", shape=TINY), _row("op", "eager", 22e-6, size="tiny", shape=TINY),
            _row("op", "fast", 11e-6, size="tiny", shape=TINY)]


def test_a_copy_far_above_its_one_thread_time_is_a_stalled_pool():
    results = _two_sizes()
    report = _report(results, {"size": "cifar", "threads": 2, "median_s": 35e-6})
    pool = report["stall"]["thread_pool"]
    assert pool["size"] == "cifar" and pool["threads"] == 2 and pool["ratio"] == pytest.approx(7.99e-3 / 35e-6)
    assert report["stall"]["tick_grid"] is None and report["stall"]["recommend"] == "--threads 1"
    # Every row of the size the pool works on is marked; the tiny size runs on one thread.
    assert [r["stalled"] for r in results] == [True, True, True, False, False, False]
    assert [r["vs_eager"] is None for r in results[1:3]] == [True, True]
    assert results[5]["vs_eager"] == pytest.approx(0.5)
    warning = report["warnings"][0]
    assert "copy_ yardstick at cifar took 7.99 ms with 2 threads but 35.0 us on 1 (228x)" in warning
    assert "3 of 6 rows" in warning and "Rerun with --threads 1" in warning
    cells = _vs_eager_cells(table(report))
    assert cells[("cifar", "op", "fast")] == "unstable" and cells[("tiny", "op", "fast")] == "0.50x"
    json.dumps(report)  # the stall goes into --json as it is


@pytest.mark.parametrize("one_thread", [
    {"size": "cifar", "threads": 2, "median_s": 7.99e-3 / 3.9},  # slower, but not by a stall's margin
    {"size": "cifar", "threads": 1, "median_s": 35e-6},          # the run already had one thread
    None,                                                         # not measured (GPU, small sizes)
])
def test_no_stall_without_the_margin_or_a_second_thread(one_thread):
    results = _two_sizes()
    report = _report(results, one_thread)
    assert report["stall"] is None and not any(r["stalled"] for r in results)
    assert results[2]["vs_eager"] == pytest.approx(1.1 / 2.3)
    assert not any("the CPU stalled" in w for w in report["warnings"])


# ---- no ratio to eager for an unstable row ---------------------------------------------------

def test_unstable_rows_and_rows_beside_an_unstable_eager_get_no_ratio():
    results = [_row("copy", "copy_", 1e-6), _row("a", "eager", 1e-3), _row("a", "fast", 5e-4, spread=0.4),
               _row("a", "other", 2e-3), _row("b", "eager", 1e-3, spread=0.3), _row("b", "fast", 5e-4)]
    report = _report(results)
    assert [r["vs_eager"] for r in results] == [None, 1.0, None, 2.0, None, None]
    assert [r["vs_eager_reason"] for r in results] == [
        "no eager row", None, "unstable: spread above 25%", None, "unstable: spread above 25%",
        "the eager row is unstable"]
    cells = _vs_eager_cells(table(report))
    assert [cells[("cifar", r["case"], r["provider"])] for r in results] == [
        "", "1.00x", "unstable", "2.00x", "unstable", "unstable"]
    assert report["stall"] is None


# ---- progress on stderr ----------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_plain_lines_off_a_terminal_and_one_line_on_it():
    log = io.StringIO()
    progress = Progress(log)
    progress("cifar copy")
    progress("cifar q_sample_noise")
    progress.done()
    assert log.getvalue() == "fastddpm bench: cifar copy\nfastddpm bench: cifar q_sample_noise\n"
    term = _Terminal()
    progress = Progress(term)
    progress("cifar copy")
    progress.done()
    assert term.getvalue().startswith("\rcifar copy ") and term.getvalue().endswith("\r")
    assert "\n" not in term.getvalue()


def test_bench_shows_progress_on_a_stderr_that_is_not_a_terminal(capsys):
    assert cli.main(["bench", "--device", "cpu", "--sizes", "tiny", "--cases", "q_sample_noise",
                     "--providers", "eager", "--min-time", "0.005"]) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("fastddpm bench:")]
    assert progress == ["fastddpm bench: tiny copy", "fastddpm bench: tiny q_sample_noise"]
    assert "\r" not in captured.err
    assert "| tiny 2x1x4x4 | q_sample_noise | eager |" in captured.out


# ---- run(): the one-thread copy is timed on one thread, and the threads are put back -----------

@pytest.fixture
def threads():
    """Sets torch's threads for the test; puts the count back after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def two_threads(threads):
    threads(2)


def test_run_times_the_copy_on_one_thread_and_reports_a_stall(monkeypatch, two_threads):
    seen_threads = []

    def stalled(fns, **kw):  # every call one 8 ms tick, as on the stalled VM
        return [[8.0e-3 + 1e-6 * (i % 3) for i in range(12)] for _ in fns]

    def one_thread(fn, **kw):
        seen_threads.append(torch.get_num_threads())
        return [35e-6] * 12

    monkeypatch.setattr(timing, "time_interleaved", stalled)
    monkeypatch.setattr(timing, "time_callable", one_thread)
    log = []
    report = bench.run("cpu", sizes=["tiny", "cifar"], cases=["q_sample_noise"], providers=["eager"],
                       min_time=0.01, warmup=1, log=log.append)
    assert seen_threads == [1] and torch.get_num_threads() == 2
    assert report["single_thread_copy"] == {"size": "cifar", "threads": 2, "median_s": 35e-6, "spread": 0.0,
                                            "rounds": 12}
    assert report["stall"]["thread_pool"]["ratio"] == pytest.approx(8.001e-3 / 35e-6)
    assert report["stall"]["tick_grid"]["tick_s"] == 8e-3
    assert all(r["stalled"] and r["vs_eager"] is None for r in report["results"])
    assert log == ["tiny copy", "tiny q_sample_noise", "cifar copy",
                   "cifar copy on 1 thread (is the 2-thread pool stalling?)", "cifar q_sample_noise"]


@pytest.mark.parametrize("n_threads, size", [(2, "tiny"), (1, "cifar")])
def test_run_on_one_thread_or_small_sizes_skips_the_one_thread_copy(monkeypatch, threads, n_threads, size):
    threads(n_threads)
    calls = []
    monkeypatch.setattr(timing, "time_callable", lambda fn, **kw: calls.append(fn) or [1e-5] * 10)
    report = bench.run("cpu", sizes=[size], cases=["q_sample_noise"], providers=["eager"], min_time=0.005,
                       warmup=1, log=lambda text: None)
    assert report["single_thread_copy"] is None and calls == []


def test_a_real_run_times_the_copy_on_one_thread(two_threads):
    report = bench.run("cpu", sizes=["cifar"], cases=["q_sample_noise"], providers=["eager"], min_time=0.005,
                       warmup=1, log=lambda text: None)
    one = report["single_thread_copy"]
    assert one["size"] == "cifar" and one["threads"] == 2 and one["median_s"] > 0 and one["rounds"] >= 10
    assert torch.get_num_threads() == 2
