// The CPU kernels built for the avx512 instruction set: setup.py compiles this file with
// CPU_CAPABILITY and the -m flags of that set (see setup.py, CPU_ISA_FLAGS).
#include "kernels_impl.h"
