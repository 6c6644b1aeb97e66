// The Python extension module hiertcn_fast._C. Importing it loads this shared library, whose static
// initialisers register the operator library with torch; the module itself exposes only what must bypass
// the dispatcher for latency: the prepared TCN stack step (tcn_step_plan.cpp); and the cpu conv's BLAS setting.
#include <torch/extension.h>

#include "hiertcn/causal_conv_host.h"

namespace hiertcn {
void bind_tcn_step_plan(pybind11::module_& m);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "hiertcn_fast compiled operators";
  hiertcn::bind_tcn_step_plan(m);
  // The cpu backend's route for big dense convolutions (hiertcn_fast.ops.conv.cpu_conv_blas wraps these).
  m.def("set_conv_blas_mode", &hiertcn::set_conv_blas_mode, pybind11::arg("mode"));
  m.def("conv_blas_mode", &hiertcn::conv_blas_mode);
  m.def("conv_blas_auto_choice", &hiertcn::conv_blas_auto_choice);
}
