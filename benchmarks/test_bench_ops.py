"""Times every case of fastddpm.cli.bench.cases for every provider and size, grouped by op and size.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json      # medians, GB/s, the goals' ratios

FASTDDPM_BENCH_DEVICE picks the device (default: cuda if available, else cpu);
FASTDDPM_BENCH_SIZES a comma-separated subset of the sizes; FASTDDPM_BENCH_THREADS the number
of CPU threads (default: torch's).
"""
import os

import pytest
import torch

from fastddpm.cli import timing
from fastddpm.cli.bench import cases as B

DEVICE = torch.device(os.environ.get("FASTDDPM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
if os.environ.get("FASTDDPM_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTDDPM_BENCH_THREADS"]))
SIZE_NAMES = [s for s in os.environ.get("FASTDDPM_BENCH_SIZES", ",".join(B.SIZES)).split(",") if s]
PARAMS = [(case, size, prov) for size in SIZE_NAMES for case in B.CASES
          for prov, p in B.PROVIDERS.items() if case in p.cases]

_inputs = {}


def _inputs_for(size):
    if size not in _inputs:
        _inputs.clear()  # one size's tensors alive at a time
        _inputs[size] = B.Inputs(B.SIZES[size], DEVICE)
    return _inputs[size]


@pytest.mark.parametrize("case, size, provider", PARAMS, ids=["-".join(p) for p in PARAMS])
def test_bench(benchmark, case, size, provider):
    ok, reason = B.PROVIDERS[provider].available(DEVICE)
    if not ok:
        pytest.skip(f"{provider}: {reason}")
    inputs = _inputs_for(size)
    fn = B.make_callable(provider, case, inputs)
    timing.warm_up([fn], 3)  # pytest-benchmark times; this compiles, allocates caches, faults pages in
    benchmark.group = f"{B.CASES[case].group} {size} {tuple(B.SIZES[size])}"
    benchmark.extra_info.update(case=case, size=size, provider=provider, device=str(DEVICE),
                                threads=torch.get_num_threads(),
                                bytes=B.bytes_moved(case, inputs.shape, inputs.dtype))
    benchmark(fn)
