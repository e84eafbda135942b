import os

# Triton's interpreter must be chosen before triton is imported: CI (no GPU) runs the Triton
# kernels on CPU tensors this way. Set TRITON_INTERPRET=0 to test on a real GPU instead.
os.environ.setdefault("TRITON_INTERPRET", "1")
