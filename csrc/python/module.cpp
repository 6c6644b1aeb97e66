// The Python extension module hiertcn_fast._C. Importing it loads this shared library, whose static
// initialisers register the operator library with torch; the module itself exposes only what must bypass
// the dispatcher for latency: the prepared TCN stack step (tcn_step_plan.cpp).
#include <torch/extension.h>

namespace hiertcn {
void bind_tcn_step_plan(pybind11::module_& m);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "hiertcn_fast compiled operators";
  hiertcn::bind_tcn_step_plan(m);
}
