// The schema block of torch.ops.fastddpm (declared once, for every backend) and the _C module.
//
// Implementations register per dispatch key elsewhere: the kernels in csrc/cpu and csrc/cuda,
// the autograd formulas (one for both devices) in csrc/autograd.cpp; the fake kernels are
// registered from Python (fastddpm/_autograd.py), as in pytorch/extension-cpp. sample_t's batch
// is a SymInt so that torch.compile(dynamic=True) keeps one graph for every batch size.
#include <Python.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "cpu/isa.h"
#include "fast_calls.h"
#include "cpu/kernels.h"

TORCH_LIBRARY(fastddpm, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("q_sample(Tensor x0, Tensor t, Tensor sqrt_ab, Tensor sqrt_1m_ab, Tensor? noise, "
        "Tensor? seed, int sample_offset) -> Tensor", tags);
  m.def("p_sample_step(Tensor x_t, Tensor eps_theta, Tensor t, Tensor c1, Tensor c2, Tensor sigma, "
        "Tensor? noise, Tensor? seed, int sample_offset) -> Tensor", tags);
  m.def("mse_per_sample(Tensor pred, Tensor? target, Tensor? seed, int sample_offset) -> Tensor", tags);
  m.def("mse_per_sample_backward(Tensor grad, Tensor pred, Tensor? target, Tensor? seed, "
        "int sample_offset) -> Tensor", tags);
  m.def("sample_t(Tensor seed, SymInt batch, int n_steps, int sample_offset) -> Tensor", tags);
  m.def("normal(Tensor seed, SymInt[] size, int sample_offset, ScalarType dtype) -> Tensor", tags);
  // The general sampler step (kernel_math.h: solver_x0_value and solver_term), the one step of
  // every sampler, the clipped, thresholded or guided one included: t indexes coef
  // [n_steps, R + 1, 8]. Per element, o = out (guided by out_cond; None: no guidance),
  // x0 = clamp(coef[t, 0, 0] x + coef[t, 0, 1] o) (clip, inf for none, or the per-sample bound),
  // then output r (1..R) is coef[t, r, :] . (x, o, x0, history[0..3], z). Returns [R, *x.shape].
  // var (like x: a learned variance's channels) scales z per element by
  // exp(0.5 (f coef[t, 0, 3] + (1 - f) coef[t, 0, 4])), f = (var + 1) / 2 (kernel_math.h:
  // learned_noise_scale): improved DDPM's learned range (or, with 1 and -1, a learned log variance).
  m.def("solver_step(Tensor x, Tensor out, Tensor? out_cond, Tensor[] history, Tensor t, Tensor coef, "
        "Tensor? bound, float clip, float guidance, Tensor? noise, Tensor? seed, int sample_offset, Tensor? var=None) "
        "-> Tensor",
        tags);
  // The variational bound of improved DDPM (Nichol & Dhariwal 2021), fused: per-sample (mse, vb)
  // [B, 2] in the accumulation dtype from x0, the model output (C mean channels, then C variance
  // channels unless variance_type is 2 = fixed), t, tables [n_steps, 9] (fastddpm.schedule
  // .VLB_COLUMNS) and the noise (given, or the stream's, regenerated in the backward).
  // mean_type 0 = eps, 1 = x0; variance_type 0 = learned, 1 = learned_range, 2 = fixed.
  // The backward gives d/dout; with detach_mean the vb term reaches only the variance channels.
  m.def("vlb_loss(Tensor x0, Tensor out, Tensor t, Tensor tables, Tensor? noise, Tensor? seed, int sample_offset, "
        "int mean_type, int variance_type, bool detach_mean) -> Tensor", tags);
  m.def("vlb_loss_backward(Tensor grad, Tensor x0, Tensor out, Tensor t, Tensor tables, Tensor? noise, "
        "Tensor? seed, int sample_offset, int mean_type, int variance_type, bool detach_mean) -> Tensor", tags);
  // The per-sample MSE against the target cx0[t] x0 + ceps[t] noise (x0, v or eps prediction).
  m.def("target_mse(Tensor pred, Tensor x0, Tensor t, Tensor cx0, Tensor ceps, Tensor? noise, Tensor? seed, "
        "int sample_offset) -> Tensor", tags);
  m.def("target_mse_backward(Tensor grad, Tensor pred, Tensor x0, Tensor t, Tensor cx0, Tensor ceps, "
        "Tensor? noise, Tensor? seed, int sample_offset) -> Tensor", tags);
  // A training step's two calls (csrc/train_ops.cpp, one implementation for every device).
  // train_inputs -> (x_t, t, noise, seed): t = sample_t(seed), x_t = q_sample(x0, t) with the
  // stream's noise, that noise itself with keep_noise (else an empty tensor), and the seed, drawn
  // from generator (the device's default if None) unless given (then an empty tensor).
  m.def("train_inputs(Tensor x0, Tensor sqrt_ab, Tensor sqrt_1m_ab, Tensor? seed, Generator? generator, "
        "int sample_offset, bool keep_noise) -> (Tensor, Tensor, Tensor, Tensor)", tags);
  // mse_loss -> 0-d: sum_b weight[b] mse_b / B (weight None: the mean), mse_b mse_per_sample's, or
  // target_mse's where x0, t, cx0 and ceps are given; one autograd node, differentiable in pred.
  m.def("mse_loss(Tensor pred, Tensor? target, Tensor? seed, int sample_offset, Tensor? weight, Tensor? x0=None, "
        "Tensor? t=None, Tensor? cx0=None, Tensor? ceps=None) -> Tensor", tags);
  m.def("mse_loss_backward(Tensor grad, Tensor pred, Tensor? target, Tensor? seed, int sample_offset, "
        "Tensor? weight, Tensor? x0=None, Tensor? t=None, Tensor? cx0=None, Tensor? ceps=None) -> Tensor", tags);
}

// ---- the _C module: importing it loads the .so and runs the static registrations above ----

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(fastddpm::cpu::active_isa());
}

PyObject* cpu_isas(PyObject*, PyObject*) {
  const auto names = fastddpm::cpu::runnable_isas();
  PyObject* list = PyList_New(0);
  for (const char* n : names) {
    PyObject* s = PyUnicode_FromString(n);
    PyList_Append(list, s);
    Py_DECREF(s);
  }
  return list;
}

PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  if (!fastddpm::cpu::set_isa(name)) {
    PyErr_Format(PyExc_ValueError, "cpu ISA '%s' is not compiled in or not supported by this CPU", name);
    return nullptr;
  }
  Py_RETURN_NONE;
}

// philox_uniforms(seed, g, n_quads) -> bytes: the float32 uniforms of quads [0, n_quads) of
// sample g under the 64-bit seed, from the active CPU build (tests compare them bit for bit).
PyObject* philox_uniforms(PyObject*, PyObject* args) {
  unsigned long long seed = 0, g = 0;
  long long n_quads = 0;
  if (!PyArg_ParseTuple(args, "KKL", &seed, &g, &n_quads)) return nullptr;
  if (n_quads < 0) {
    PyErr_SetString(PyExc_ValueError, "n_quads must be >= 0");
    return nullptr;
  }
  std::vector<float> u(static_cast<size_t>(4 * n_quads));
  fastddpm::cpu::kernels().philox_uniforms(u.data(), n_quads, g, static_cast<uint32_t>(seed),
                                           static_cast<uint32_t>(seed >> 32));
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(u.data()),
                                   static_cast<Py_ssize_t>(u.size() * sizeof(float)));
}

// box_muller_math(x) -> (log x, sin x, cos x): bytes of float32, the functions the active CPU
// build's Box-Muller uses, on the float32s in the bytes x (tests check their accuracy).
PyObject* box_muller_math(PyObject*, PyObject* arg) {
  char* data = nullptr;
  Py_ssize_t size = 0;
  if (PyBytes_AsStringAndSize(arg, &data, &size) != 0) return nullptr;
  if (size % static_cast<Py_ssize_t>(sizeof(float)) != 0) {
    PyErr_SetString(PyExc_ValueError, "x must hold whole float32s");
    return nullptr;
  }
  const int64_t n = size / static_cast<Py_ssize_t>(sizeof(float));
  std::vector<float> x(static_cast<size_t>(n)), out(static_cast<size_t>(3 * n));
  std::memcpy(x.data(), data, static_cast<size_t>(size));
  fastddpm::cpu::kernels().box_muller_math(x.data(), n, out.data(), out.data() + n, out.data() + 2 * n);
  const char* o = reinterpret_cast<const char*>(out.data());
  PyObject* parts[3];
  for (int k = 0; k < 3; ++k) {
    parts[k] = PyBytes_FromStringAndSize(o + k * size, size);
    if (parts[k] == nullptr) {
      for (int i = 0; i < k; ++i) Py_DECREF(parts[i]);
      return nullptr;
    }
  }
  PyObject* result = PyTuple_Pack(3, parts[0], parts[1], parts[2]);
  for (PyObject* part : parts) Py_DECREF(part);
  return result;
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set the CPU kernels run with."},
    {"cpu_isas", cpu_isas, METH_NOARGS, "The instruction sets compiled in that this CPU can run."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Run the CPU kernels with the named instruction set (tests)."},
    {"philox_uniforms", philox_uniforms, METH_VARARGS, "The contract's uniforms (tests)."},
    {"box_muller_math", box_muller_math, METH_O, "Box-Muller's log, sin and cos of the active build (tests)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastddpm's compiled ops", -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddFunctions(module, fastddpm::fast_call_methods) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
