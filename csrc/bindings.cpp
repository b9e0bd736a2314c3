// pybind11 module disco_kernels._C: thin bindings over the CUDA launchers.
// Every entry takes raw device pointers, sizes and a cudaStream_t (as an int)
// and is only called through the custom ops in disco_kernels/ops/. The host_*
// entries run the kernels' per-element math on host arrays, for CPU tests.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "api.h"

namespace py = pybind11;
using f32array = py::array_t<float, py::array::c_style | py::array::forcecast>;

namespace {

dk::FusedUpdateConfig update_config(int lmo, bool normalized, bool transpose, bool unconstrained, bool light,
                                    bool has_buf, double lr, double momentum, double scale) {
  return dk::FusedUpdateConfig{lmo, normalized, transpose, unconstrained, light, has_buf, lr, momentum, scale};
}

// An array updated in place: must already be float32, C-contiguous, writable and of `size` elements.
float* inout(py::array a, int64_t size, const char* name) {
  if (!a.dtype().is(py::dtype::of<float>()) || !(a.flags() & py::array::c_style) || !a.writeable() || a.size() != size)
    throw std::invalid_argument(std::string(name) + " must be a writable C-contiguous float32 array of " +
                                std::to_string(size) + " elements");
  return static_cast<float*>(a.mutable_data());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "disco-kernels CUDA kernels (raw pointers + stream; no libtorch link)";
  m.attr("cuda_archs") = DISCO_CUDA_ARCHS;
  m.attr("kernels") = py::make_tuple("fused_update", "power_iteration", "newton_schulz");
  m.attr("DTYPES") = py::dict(py::arg("float32") = int(dk::kFloat32), py::arg("bfloat16") = int(dk::kBFloat16),
                              py::arg("float16") = int(dk::kFloat16));
  m.attr("LMOS") = py::dict(py::arg("Sign") = int(dk::kSign), py::arg("RowNorm") = int(dk::kRowNorm),
                            py::arg("ColNorm") = int(dk::kColNorm), py::arg("BiasRMS") = int(dk::kBiasRMS));
  m.attr("cuda_runtime_version") = dk::runtime_version();
  m.def("runtime_status", &dk::runtime_status,
        "'' when the linked CUDA runtime works with the installed driver and sees a GPU, else its error.");
  m.attr("power_iteration_max_n") = dk::kPowerIterationMaxN;
  m.attr("newton_schulz_max_small") = dk::kNewtonSchulzMaxSmall;
  m.attr("newton_schulz_max_steps") = dk::kNewtonSchulzMaxSteps;

  m.def(
      "fused_update",
      [](int dtype, int lmo, bool normalized, bool transpose, bool unconstrained, bool light, bool has_buf, double lr,
         double momentum, double scale, const std::vector<std::uintptr_t>& p, const std::vector<std::uintptr_t>& g,
         const std::vector<std::uintptr_t>& buf, const std::vector<std::vector<int64_t>>& shapes, std::uintptr_t stream) {
        dk::fused_update_cuda(dtype, update_config(lmo, normalized, transpose, unconstrained, light, has_buf, lr,
                                                   momentum, scale), p, g, buf, shapes, stream);
      },
      "Multi-tensor fused Scion update in place (contiguous tensors of one dtype).");
  m.def(
      "host_fused_update",
      [](int lmo, bool normalized, bool transpose, bool unconstrained, bool light, double lr, double momentum,
         double scale, const std::vector<int64_t>& shape, py::array p, py::array g, py::object buf) {
        int64_t numel = 1;
        for (int64_t d : shape) numel *= d;
        float* bp = buf.is_none() ? nullptr : inout(buf.cast<py::array>(), numel, "buf");
        dk::fused_update_host(update_config(lmo, normalized, transpose, unconstrained, light, bp != nullptr, lr,
                                            momentum, scale), shape, inout(p, numel, "p"), inout(g, numel, "g"), bp);
      },
      "The fused update of one fp32 tensor on the host, in place on numpy arrays (for tests).");

  m.def("power_iteration_workspace", &dk::power_iteration_workspace, "fp32 words of workspace for power_iteration.");
  m.def("power_iteration", &dk::power_iteration_cuda,
        "power_iteration(dtype, W, batch, m, n, v_in, v_out, sigma, workspace, iters, stream)");
  m.def(
      "host_power_iteration",
      [](f32array W, f32array v, int iters) {
        if (W.ndim() != 3 || v.ndim() != 2 || v.shape(0) != W.shape(0) || v.shape(1) != W.shape(2))
          throw std::invalid_argument("host_power_iteration: W must be (b, m, n) and v (b, n)");
        const int64_t b = W.shape(0), m = W.shape(1), n = W.shape(2);
        f32array v_out({b, n}), sigma(py::array::ShapeContainer{b});
        dk::power_iteration_host(W.data(), b, m, n, v.data(), v_out.mutable_data(), sigma.mutable_data(), iters);
        return py::make_tuple(sigma, v_out);
      },
      "Power iteration of fp32 (b, m, n) W on the host (for tests): (sigma, v).");

  m.def("newton_schulz_small_smem", &dk::newton_schulz_small_smem, "Shared memory bytes of the small NS kernel.");
  m.def("newton_schulz_small_fits", &dk::newton_schulz_small_fits,
        "Whether the small NS kernel can take (m, n) on the device.");
  m.def("newton_schulz_small", &dk::newton_schulz_small_cuda,
        "newton_schulz_small(in_dtype, out_dtype, G, out, batch, m, n, coefficients, norm_mult, norm_eps, stream)");
  m.def(
      "host_newton_schulz",
      [](f32array G, const std::vector<float>& coefficients, float norm_mult, float norm_eps) {
        if (G.ndim() != 2) throw std::invalid_argument("host_newton_schulz: G must be (m, n)");
        f32array out({G.shape(0), G.shape(1)});
        dk::newton_schulz_host(G.data(), out.mutable_data(), G.shape(0), G.shape(1), coefficients, norm_mult, norm_eps);
        return out;
      },
      "Newton-Schulz of one fp32 matrix on the host with the kernel's normalisation and steps (for tests).");
  m.def(
      "host_round",
      [](int dtype, f32array x) {
        f32array out(x.request().shape);
        dk::round_host(dtype, x.data(), out.mutable_data(), x.size());
        return out;
      },
      "Round fp32 values to the storage dtype and back, with the kernels' conversions (for tests).");
}
