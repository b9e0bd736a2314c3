// Launch checks: every kernel launch's error becomes a C++ exception naming the
// kernel (pybind11 turns it into a Python RuntimeError).
#pragma once
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

namespace dk {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // reset the runtime's last error so that later launch checks do not report it again
  throw std::runtime_error(std::string("disco_kernels._C: ") + what + " failed: " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
}

// Call right after kernel<<<...>>>: reports bad configurations and earlier asynchronous faults.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), (std::string("launch of ") + kernel).c_str()); }

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace dk
