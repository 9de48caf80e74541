// The Python module init of lattice._C, kept out of csrc/ops.cpp so that the C++-only op library
// (liblattice_ops.so, built from the same ops.cpp) has no Python symbols.
#include <Python.h>

// An importable, empty Python module: `import lattice._C` loads this library, which runs the
// TORCH_LIBRARY registrations of csrc/ops.cpp and the kernels' TORCH_LIBRARY_IMPL blocks.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
