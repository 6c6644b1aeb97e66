// The Python extension module hiertcn_fast._C. Importing it loads this shared library, whose static
// initialisers register the operator library with torch; the module itself exposes nothing.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "hiertcn_fast compiled operators", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}
