// revdeq_kernels._C: importing it loads the CPU kernels, which register themselves for the
// revdeq_native ops (TORCH_LIBRARY_IMPL in cpu/relax_cpu.cpp). The module has no functions;
// CPU_ISA names the kernel build in use ("AVX2" or "DEFAULT"), for tests and benchmarks.
#include <Python.h>

#include "cpu/relax_cpu.h"

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "revdeq_kernels._C",
      "C++ CPU kernels of the revdeq_native ops (registered on import).",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr &&
      PyModule_AddStringConstant(module, "CPU_ISA", revdeq::cpu::kernels().isa) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
