#!/usr/bin/env bash
# All set-up on a fresh machine: a virtual environment in .venv with the CPU build of torch,
# the test and demo dependencies, and fastddpm itself built in place (its C++ extension
# compiles here). Safe to run again: it only installs what is missing, and rebuilds the
# extension only when it is missing, older than a file it is built from, or does not import.
#   bash .ci/setup.sh                 set up
#   bash .ci/setup.sh --check-build   only say (exit 0) whether the extension is up to date
set -euo pipefail
cd "$(dirname "$0")/.."

# fastddpm._C is up to date when fastddpm/_C*.so is newer than every file under csrc/ and
# setup.py, and the python on PATH imports it from this tree (the editable install is in place).
extension_current() {
  local so here=$PWD
  so=$(ls fastddpm/_C*.so 2>/dev/null | head -n 1 || true)
  [ -n "$so" ] || return 1
  [ -z "$(find csrc setup.py -type f -newer "$so" | head -n 1)" ] || return 1
  (cd / && python -c 'import os, sys, fastddpm, fastddpm._C
sys.exit(os.path.realpath(os.path.dirname(fastddpm.__file__)) != os.path.realpath(sys.argv[1]))' "$here/fastddpm") \
    >/dev/null 2>&1
}
if [ "${1:-}" = "--check-build" ]; then
  extension_current
  exit
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip setuptools wheel
# torch==2.13.0 is the CPU build (a local wheel on this kind of machine); the extension must
# be compiled against the torch it will run with, hence --no-build-isolation below.
pip install -q torch==2.13.0 numpy
pip install -q "triton>=3.2" pytest pytest-benchmark hypothesis scipy tqdm matplotlib scikit-learn
pip install -q diffusers || echo "setup: diffusers not installed; its benchmarks and tests will be skipped" >&2
if extension_current; then
  echo "setup: fastddpm._C is newer than csrc/ and setup.py and imports: not rebuilding it" >&2
else
  pip install -q --no-build-isolation -e .
fi
python -c "import fastddpm, sys; print('fastddpm backends:', fastddpm.available_backends(), file=sys.stderr)"
