"""Old name of :mod:`fastddpm.cli.bench.cases` (plus the timing helpers of
:mod:`fastddpm.cli.timing`), kept only while benchmarks/gpu_report.py imports it from here; new
code imports those two modules."""
from .bench.cases import CASES, GOALS, N_STEPS, PROVIDERS, SIZES, Inputs, bytes_moved, make_callable  # noqa: F401
from .timing import median, time_callable  # noqa: F401
