#!/usr/bin/env bash
# CI stage: prove the CUDA kernels (csrc/cuda) compile, link and register, on a machine with a
# CUDA toolkit and no GPU. Runs in a separate virtual environment, .venv-cuda, holding the CUDA
# build of torch; .venv (the CPU build the tests use) is not touched.
#
# The package is built from a scratch copy of the working tree, not in place: an in-place build
# would share build/ and fastddpm/_C*.so with .venv's editable build (setuptools reuses object
# files by timestamp, so objects compiled against the other torch could be linked in, and the
# CPU venv's _C would be overwritten by one for torch+cu130). The copy always builds from scratch.
#
# Warnings in our .cu files are errors (FASTDDPM_WERROR=1, see setup.py). Budget: under 10 min.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=$REPO/.venv-cuda
TORCH_SPEC=torch==2.14.1  # the CUDA 13 build; on this kind of machine a local wheel (~40 s)
START=$SECONDS

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "$TORCH_SPEC" numpy
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

# CUDA_HOME: the toolkit that the nvcc on PATH runs (it may be a wrapper script elsewhere).
if [ -z "${CUDA_HOME:-}" ]; then
  TOP=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  [ -n "$TOP" ] || { echo "cuda_build: cannot find the CUDA toolkit of $(command -v nvcc)" >&2; exit 1; }
  CUDA_HOME=$(readlink -f "$TOP")
fi
export CUDA_HOME
# The nvidia-* wheels that come with torch ship headers (cusparse.h, cublas_v2.h, ...) that a
# minimal toolkit may lack.
for inc in "$SITE"/nvidia/*/include; do
  [ -d "$inc" ] && CPATH="$inc${CPATH:+:$CPATH}"
done
export CPATH
export FASTDDPM_CUDA=1 FASTDDPM_WERROR=1
unset TORCH_CUDA_ARCH_LIST  # exercise setup.py's default for a machine with no GPU visible
echo "cuda_build: CUDA_HOME=$CUDA_HOME, $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')" >&2

SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
git ls-files -z -c -o --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$SCRATCH"
mkdir -p build
LOG=$REPO/build/cuda_build.log  # kept for inspection (build/ is git-ignored)
if ! (cd "$SCRATCH" && timeout 540 "$VENV/bin/pip" install -v --no-build-isolation --no-deps . >"$LOG" 2>&1); then
  grep -E -B2 -A8 "error|warning" "$LOG" | tail -n 80 >&2 || tail -n 80 "$LOG" >&2
  echo "cuda_build: building fastddpm with its CUDA kernels failed (log above)" >&2
  exit 1
fi
# The no-GPU default architectures reached nvcc.
for arch in 80 90; do
  grep -q "arch=compute_$arch,code=sm_$arch" "$LOG" || { echo "cuda_build: sm_$arch was not built" >&2; exit 1; }
done

# Import the installed package (outside the repo, so ./fastddpm does not shadow it) and check
# that every op has its CUDA kernel registered.
(cd "$SCRATCH/.." && "$VENV/bin/python" - <<'EOF'
import sys
import torch
import fastddpm
from fastddpm import _extension
from fastddpm.backends import cuda as cuda_backend

assert "site-packages" in fastddpm.__file__, fastddpm.__file__
assert _extension.load() is not None, _extension.error()
missing = [op for op in _extension.OP_NAMES
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastddpm::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for fastddpm::{missing}"
assert cuda_backend.has_cuda_kernels()
ok, reason = fastddpm.backends.status("cuda")
if not torch.cuda.is_available():
    assert not ok and reason == "no CUDA GPU is visible", (ok, reason)
print(f"cuda_build: fastddpm._C has CUDA kernels for {', '.join(_extension.OP_NAMES)}; "
      f"cuda backend: {'available' if ok else reason}", file=sys.stderr)
EOF
)
echo "cuda_build: passed in $((SECONDS - START)) s" >&2
