// pybind11 module disco_kernels._C: thin bindings over the CUDA launchers.
// Every entry takes raw device pointers, sizes and a cudaStream_t (as an int)
// and is only called through the custom ops in disco_kernels/ops/.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "disco-kernels CUDA kernels (raw pointers + stream; no libtorch link)";
  m.attr("cuda_archs") = DISCO_CUDA_ARCHS;
  m.attr("kernels") = py::list();
}
