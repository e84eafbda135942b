// fastddpm._C's direct calls of the hot ops (csrc/fast_calls.cpp), added to the module by
// csrc/ops.cpp.
#pragma once

#include <Python.h>

namespace fastddpm {
extern PyMethodDef fast_call_methods[];
}  // namespace fastddpm
