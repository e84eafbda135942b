// Direct Python calls of the hot ops: fastddpm._C.<op>(args...) calls torch.ops.fastddpm.<op>
// through the dispatcher (autograd, the device kernels, dispatch modes such as FakeTensorMode,
// all as before) but without torch.ops' generic schema-driven argument parsing, which costs
// about a microsecond per call: more than the kernels at the sizes where host work is the cost.
//
// Only plain calls take this path: positional arguments of exactly the schema's types, tensors
// that are torch.Tensor or nn.Parameter (no subclass, which may override __torch_function__),
// and no __torch_function__ mode active. Anything else returns NotImplemented and the caller
// (fastddpm/backends/compiled.py) makes the torch.ops call, with torch's handling and errors.
// torch.compile never sees these functions: the caller uses torch.ops while compiling.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/Generator.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <tuple>
#include <vector>

#include "fast_calls.h"
#include "fastddpm/op_handles.h"  // the ops' handles

namespace fastddpm {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Reads a call's positional arguments; any mismatch clears `ok` (the call then returns
// NotImplemented) and yields a harmless default.
struct Reader {
  PyObject* const* args;
  Py_ssize_t nargs;
  bool ok;

  Reader(PyObject* const* a, Py_ssize_t n, Py_ssize_t expected)
      : args(a), nargs(n), ok(n == expected && !at::impl::torch_function_mode_enabled()) {}

  PyObject* at(Py_ssize_t i) { return i < nargs ? args[i] : Py_None; }

  Tensor tensor(Py_ssize_t i) {
    PyObject* o = at(i);
    if (!ok || !THPVariable_CheckExact(o)) {
      ok = false;
      return Tensor();
    }
    return THPVariable_Unpack(o);
  }
  OptTensor opt_tensor(Py_ssize_t i) {
    if (at(i) == Py_None) return std::nullopt;
    Tensor x = tensor(i);
    return ok ? OptTensor(std::move(x)) : std::nullopt;
  }
  std::vector<Tensor> tensors(Py_ssize_t i) {
    std::vector<Tensor> out;
    PyObject* o = at(i);
    if (!ok || !(PyList_CheckExact(o) || PyTuple_CheckExact(o))) {
      ok = false;
      return out;
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    PyObject** items = PySequence_Fast_ITEMS(o);
    for (Py_ssize_t k = 0; k < n && ok; ++k) {
      if (!THPVariable_CheckExact(items[k])) {
        ok = false;
      } else {
        out.push_back(THPVariable_Unpack(items[k]));
      }
    }
    return out;
  }
  int64_t integer(Py_ssize_t i) {
    PyObject* o = at(i);
    if (!ok || !PyLong_CheckExact(o)) {
      ok = false;
      return 0;
    }
    const long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) {  // out of int64's range: torch.ops says so
      PyErr_Clear();
      ok = false;
    }
    return v;
  }
  double real(Py_ssize_t i) {
    PyObject* o = at(i);
    if (!ok || !(PyFloat_CheckExact(o) || PyLong_CheckExact(o))) {
      ok = false;
      return 0.0;
    }
    const double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      ok = false;
    }
    return v;
  }
  bool flag(Py_ssize_t i) {
    PyObject* o = at(i);
    if (!ok || !PyBool_Check(o)) {
      ok = false;
      return false;
    }
    return o == Py_True;
  }
  std::optional<at::Generator> generator(Py_ssize_t i) {
    PyObject* o = at(i);
    if (o == Py_None) return std::nullopt;
    if (!ok || THPGeneratorClass == nullptr || !PyObject_TypeCheck(o, reinterpret_cast<PyTypeObject*>(THPGeneratorClass))) {
      ok = false;
      return std::nullopt;
    }
    return reinterpret_cast<THPGenerator*>(o)->cdata;
  }
};

// Runs f with the GIL released, as torch's own bindings run ops; the GIL is taken back however
// f ends, so an exception is translated with it held.
template <typename F>
auto without_gil(F&& f) {
  struct Restore {
    PyThreadState* state;
    ~Restore() { PyEval_RestoreThread(state); }
  } restore{PyEval_SaveThread()};
  return f();
}

PyObject* not_implemented() { Py_RETURN_NOTIMPLEMENTED; }

PyObject* q_sample(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const auto& op = handles::q_sample_op();
  Reader r(args, nargs, 7);
  Tensor x0 = r.tensor(0), t = r.tensor(1), a = r.tensor(2), b = r.tensor(3);
  OptTensor noise = r.opt_tensor(4), seed = r.opt_tensor(5);
  const int64_t offset = r.integer(6);
  if (!r.ok) return not_implemented();
  return THPVariable_Wrap(without_gil([&] { return op.call(x0, t, a, b, noise, seed, offset); }));
  END_HANDLE_TH_ERRORS
}

PyObject* p_sample_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const auto& op = handles::p_sample_step_op();
  Reader r(args, nargs, 9);
  Tensor x = r.tensor(0), eps = r.tensor(1), t = r.tensor(2), c1 = r.tensor(3), c2 = r.tensor(4), sg = r.tensor(5);
  OptTensor noise = r.opt_tensor(6), seed = r.opt_tensor(7);
  const int64_t offset = r.integer(8);
  if (!r.ok) return not_implemented();
  return THPVariable_Wrap(without_gil([&] { return op.call(x, eps, t, c1, c2, sg, noise, seed, offset); }));
  END_HANDLE_TH_ERRORS
}

PyObject* mse_per_sample(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const auto& op = handles::mse_op();
  Reader r(args, nargs, 4);
  Tensor pred = r.tensor(0);
  OptTensor target = r.opt_tensor(1), seed = r.opt_tensor(2);
  const int64_t offset = r.integer(3);
  if (!r.ok) return not_implemented();
  return THPVariable_Wrap(without_gil([&] { return op.call(pred, target, seed, offset); }));
  END_HANDLE_TH_ERRORS
}

PyObject* target_mse(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const auto& op = handles::target_mse_op();
  Reader r(args, nargs, 8);
  Tensor pred = r.tensor(0), x0 = r.tensor(1), t = r.tensor(2), cx0 = r.tensor(3), ceps = r.tensor(4);
  OptTensor noise = r.opt_tensor(5), seed = r.opt_tensor(6);
  const int64_t offset = r.integer(7);
  if (!r.ok) return not_implemented();
  return THPVariable_Wrap(without_gil([&] { return op.call(pred, x0, t, cx0, ceps, noise, seed, offset); }));
  END_HANDLE_TH_ERRORS
}

PyObject* solver_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const auto& op = handles::solver_step_op();
  Reader r(args, nargs, 13);
  Tensor x = r.tensor(0), out = r.tensor(1);
  OptTensor out_cond = r.opt_tensor(2);
  std::vector<Tensor> history = r.tensors(3);
  Tensor t = r.tensor(4), coef = r.tensor(5);
  OptTensor bound = r.opt_tensor(6);
  const double clip = r.real(7), guidance = r.real(8);
  OptTensor noise = r.opt_tensor(9), seed = r.opt_tensor(10);
  const int64_t offset = r.integer(11);
  OptTensor var = r.opt_tensor(12);
  if (!r.ok) return not_implemented();
  return THPVariable_Wrap(without_gil([&] {
    return op.call(x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed, offset, var);
  }));
  END_HANDLE_TH_ERRORS
}

PyObject* vlb_loss(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const auto& op = handles::vlb_loss_op();
  Reader r(args, nargs, 10);
  Tensor x0 = r.tensor(0), out = r.tensor(1), t = r.tensor(2), tables = r.tensor(3);
  OptTensor noise = r.opt_tensor(4), seed = r.opt_tensor(5);
  const int64_t offset = r.integer(6), mean_type = r.integer(7), variance_type = r.integer(8);
  const bool detach_mean = r.flag(9);
  if (!r.ok) return not_implemented();
  return THPVariable_Wrap(without_gil([&] {
    return op.call(x0, out, t, tables, noise, seed, offset, mean_type, variance_type, detach_mean);
  }));
  END_HANDLE_TH_ERRORS
}

PyObject* train_inputs(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using Result = std::tuple<Tensor, Tensor, Tensor, Tensor>;
  const auto& op = handles::train_inputs_op();
  Reader r(args, nargs, 7);
  Tensor x0 = r.tensor(0), a = r.tensor(1), b = r.tensor(2);
  OptTensor seed = r.opt_tensor(3);
  std::optional<at::Generator> generator = r.generator(4);
  const int64_t offset = r.integer(5);
  const bool keep_noise = r.flag(6);
  if (!r.ok) return not_implemented();
  Result y = without_gil([&] { return op.call(x0, a, b, seed, generator, offset, keep_noise); });
  PyObject* parts[4] = {THPVariable_Wrap(std::move(std::get<0>(y))), THPVariable_Wrap(std::move(std::get<1>(y))),
                        THPVariable_Wrap(std::move(std::get<2>(y))), THPVariable_Wrap(std::move(std::get<3>(y)))};
  PyObject* tuple = PyTuple_New(4);
  for (Py_ssize_t k = 0; k < 4; ++k) PyTuple_SET_ITEM(tuple, k, parts[k]);  // steals the references
  return tuple;
  END_HANDLE_TH_ERRORS
}

PyObject* mse_loss(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const auto& op = handles::mse_loss_op();
  Reader r(args, nargs, 9);
  Tensor pred = r.tensor(0);
  OptTensor target = r.opt_tensor(1), seed = r.opt_tensor(2);
  const int64_t offset = r.integer(3);
  OptTensor weight = r.opt_tensor(4), x0 = r.opt_tensor(5), t = r.opt_tensor(6), cx0 = r.opt_tensor(7),
            ceps = r.opt_tensor(8);
  if (!r.ok) return not_implemented();
  return THPVariable_Wrap(without_gil([&] { return op.call(pred, target, seed, offset, weight, x0, t, cx0, ceps); }));
  END_HANDLE_TH_ERRORS
}

}  // namespace

// Positional arguments in schema order, every argument given (no defaults).
PyMethodDef fast_call_methods[] = {
    {"q_sample", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(q_sample)), METH_FASTCALL, nullptr},
    {"p_sample_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(p_sample_step)), METH_FASTCALL,
     nullptr},
    {"mse_per_sample", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(mse_per_sample)), METH_FASTCALL,
     nullptr},
    {"target_mse", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(target_mse)), METH_FASTCALL, nullptr},
    {"solver_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(solver_step)), METH_FASTCALL, nullptr},
    {"vlb_loss", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(vlb_loss)), METH_FASTCALL, nullptr},
    {"train_inputs", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(train_inputs)), METH_FASTCALL,
     nullptr},
    {"mse_loss", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(mse_loss)), METH_FASTCALL, nullptr},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace fastddpm
