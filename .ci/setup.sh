#!/usr/bin/env bash
# All set-up on a fresh machine: a virtual environment in .venv with the CPU build of torch,
# the test and demo dependencies, and fastddpm itself built in place (its C++ extension
# compiles here). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip setuptools wheel
# torch==2.13.0 is the CPU build (a local wheel on this kind of machine); the extension must
# be compiled against the torch it will run with, hence --no-build-isolation below.
pip install -q torch==2.13.0 numpy
pip install -q "triton>=3.2" pytest pytest-benchmark hypothesis scipy tqdm matplotlib scikit-learn
pip install -q diffusers || echo "setup: diffusers not installed; its benchmarks and tests will be skipped" >&2
pip install -q --no-build-isolation -e .
python -c "import fastddpm, sys; print('fastddpm backends:', fastddpm.available_backends(), file=sys.stderr)"
