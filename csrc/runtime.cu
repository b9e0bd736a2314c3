// The CUDA runtime linked into _C (statically) against the driver of this machine: a runtime newer
// than the driver supports fails every call, so the ops ask before picking the CUDA backend.
#include <cuda_runtime.h>

#include <string>

#include "api.h"

namespace dk {

std::string runtime_status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess) return "";
  cudaGetLastError();  // clear it, so that no later launch check reports it
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

int runtime_version() { return CUDART_VERSION; }

}  // namespace dk
