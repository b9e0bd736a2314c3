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

dk::FusedUpdateConfig update_config(int kind, bool unconstrained, bool light, bool has_buf, double lr,
                                    double momentum, double scale, double eps) {
  return dk::FusedUpdateConfig{kind, unconstrained, light, has_buf, lr, momentum, scale, eps};
}

// An array updated in place: must already be float32 (any equivalent dtype object, e.g. one from ctypes),
// C-contiguous, writable and of `size` elements.
float* inout(py::array a, int64_t size, const char* name) {
  if (!py::isinstance<py::array_t<float>>(a) || !(a.flags() & py::array::c_style) || !a.writeable() || a.size() != size)
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
  m.attr("KINDS") = py::dict(py::arg("sign") = int(dk::kKindSign), py::arg("scaled") = int(dk::kKindScaled),
                             py::arg("line") = int(dk::kKindLine));
  {
    const char* names[] = {"float32", "bfloat16", "float16"};
    py::list pairs;
    for (int p = 0; p < 3; ++p)
      for (int g = 0; g < 3; ++g)
        if (dk::fused_update_supported(p, g)) pairs.append(py::make_tuple(names[p], names[g]));
    m.attr("FUSED_UPDATE_PAIRS") = py::tuple(pairs);  // (param dtype, grad/buf dtype) pairs of fused_update
  }
  m.attr("cuda_runtime_version") = dk::runtime_version();
  m.def("runtime_status", &dk::runtime_status,
        "'' when the linked CUDA runtime works with the installed driver and sees a GPU, else its error.");
  m.attr("power_iteration_max_n") = dk::kPowerIterationMaxN;
  m.attr("newton_schulz_max_small") = dk::kNewtonSchulzMaxSmall;
  m.attr("newton_schulz_max_steps") = dk::kNewtonSchulzMaxSteps;

  m.def(
      "fused_update",
      [](int p_dtype, int g_dtype, int kind, bool unconstrained, bool light, bool has_buf, double lr, double momentum,
         double scale, std::uintptr_t hyper, double eps, const std::vector<std::uintptr_t>& p,
         const std::vector<std::uintptr_t>& g, const std::vector<std::uintptr_t>& buf,
         const std::vector<std::vector<int64_t>>& shapes, const std::vector<int>& dims,
         const std::vector<double>& alphas, std::uintptr_t stream) {
        dk::fused_update_cuda(p_dtype, g_dtype,
                              update_config(kind, unconstrained, light, has_buf, lr, momentum, scale, eps), p, g, buf,
                              shapes, dims, alphas, hyper, stream);
      },
      py::arg("p_dtype"), py::arg("g_dtype"), py::arg("kind"), py::arg("unconstrained"), py::arg("light"),
      py::arg("has_buf"), py::arg("lr"), py::arg("momentum"), py::arg("scale"), py::arg("hyper"), py::arg("eps"),
      py::arg("p"), py::arg("g"), py::arg("buf"), py::arg("shapes"), py::arg("dims"), py::arg("alphas"),
      py::arg("stream"),
      "Multi-tensor fused Scion update in place (contiguous tensors; p of p_dtype, g and buf of g_dtype; hyper 0 "
      "or a device pointer to fp32 {lr, momentum, scale}, which then replace the plain numbers).");
  m.def(
      "host_fused_update",
      [](int kind, int dim, double alpha, const std::vector<int64_t>& shape, py::array p, py::array g, py::object buf,
         double lr, double momentum, double scale, bool unconstrained, bool light, double eps, py::object hyper,
         int p_dtype, int g_dtype) {
        int64_t numel = 1;
        for (int64_t d : shape) numel *= d;
        float* bp = buf.is_none() ? nullptr : inout(buf.cast<py::array>(), numel, "buf");
        f32array h;
        if (!hyper.is_none()) {
          h = hyper.cast<f32array>();
          if (h.size() != 3) throw std::invalid_argument("hyper must hold 3 values: lr, momentum, scale");
        }
        dk::fused_update_host(update_config(kind, unconstrained, light, bp != nullptr, lr, momentum, scale, eps),
                              p_dtype, g_dtype, dim, alpha, shape, inout(p, numel, "p"), inout(g, numel, "g"), bp,
                              hyper.is_none() ? nullptr : h.data());
      },
      py::arg("kind"), py::arg("dim"), py::arg("alpha"), py::arg("shape"), py::arg("p"), py::arg("g"),
      py::arg("buf") = py::none(), py::kw_only(), py::arg("lr"), py::arg("momentum"), py::arg("scale"),
      py::arg("unconstrained") = false, py::arg("light") = false, py::arg("eps"), py::arg("hyper") = py::none(),
      py::arg("p_dtype") = int(dk::kFloat32), py::arg("g_dtype") = int(dk::kFloat32),
      "The fused update of one tensor on the host, in place on float32 numpy arrays holding values of p_dtype (p) "
      "and g_dtype (g, buf), with the kernel's plan, scalars and per-element math (for tests). hyper: None or "
      "float32 [lr, momentum, scale], read as the kernel reads its device array (lr, momentum, scale then unused).");

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
