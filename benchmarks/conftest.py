"""pytest-benchmark suite: run with `pytest benchmarks/ --benchmark-only` (see RESULTS.md)."""
import os
import sys

# The benchmarks time real kernels: never Triton's interpreter.
os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
