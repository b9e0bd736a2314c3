// Host-side API of the CUDA launchers and host emulations, included by bindings.cpp.
// Free of CUDA headers: device pointers and streams travel as integers.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dk {

enum Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
// Kinds of LMO of the fused update (see fused_update_kernel.cuh): sign(d) alpha, d alpha, d / (||line|| alpha + eps).
enum Kind : int { kKindSign = 0, kKindScaled = 1, kKindLine = 2 };

// "" when the linked CUDA runtime works with this machine's driver (and sees a GPU), else its error;
// the runtime version this extension was built with (e.g. 13000).
std::string runtime_status();
int runtime_version();

// Round fp32 values to `dtype` and back with the kernels' conversions (for tests).
void round_host(int dtype, const float* x, float* out, int64_t count);

// ---- fused_update: momentum + LMO of a kind (sign, scaled, line) + decay + update, many tensors in one launch.
struct FusedUpdateConfig {
  int kind;
  bool unconstrained, light, has_buf;
  double lr, momentum, scale;  // ignored where a `hyper` array {lr, momentum, scale} (fp32) is given
  double eps;                  // the line kind's guard: d / (||line|| alpha + eps)
};
// Whether the kernel takes params of `p_dtype` with grads (and bufs) of `g_dtype`.
bool fused_update_supported(int p_dtype, int g_dtype);
// p: device pointers of contiguous tensors of p_dtype; g, buf: of g_dtype (buf 0 when !has_buf). Per tensor its
// shape, its line dim (-1 or -2; read for the line kind only) and alpha. hyper: 0, or a device pointer to fp32
// {lr, momentum, scale} read by the kernel (no host sync: capturable in a CUDA graph). One launch per 128 tensors.
void fused_update_cuda(int p_dtype, int g_dtype, const FusedUpdateConfig& cfg, const std::vector<std::uintptr_t>& p,
                       const std::vector<std::uintptr_t>& g, const std::vector<std::uintptr_t>& buf,
                       const std::vector<std::vector<int64_t>>& shapes, const std::vector<int>& dims,
                       const std::vector<double>& alphas, std::uintptr_t hyper, std::uintptr_t stream);
// The same update of one tensor on the host (sequential sums) on fp32 arrays holding values of p_dtype (p) and
// g_dtype (g, buf), each result rounded to its dtype as stored; hyper: null or a host array {lr, momentum, scale}.
void fused_update_host(const FusedUpdateConfig& cfg, int p_dtype, int g_dtype, int dim, double alpha,
                       const std::vector<int64_t>& shape, float* p, float* g, float* buf, const float* hyper);

// ---- power_iteration: batched sigma_max estimate, one read of W per iteration.
constexpr int64_t kPowerIterationMaxN = 16384;
// fp32 words of workspace that power_iteration_cuda needs.
int64_t power_iteration_workspace(int64_t batch, int64_t m, int64_t n);
void power_iteration_cuda(int dtype, std::uintptr_t W, int64_t batch, int64_t m, int64_t n, std::uintptr_t v_in,
                          std::uintptr_t v_out, std::uintptr_t sigma, std::uintptr_t workspace, int iters,
                          std::uintptr_t stream);
void power_iteration_host(const float* W, int64_t batch, int64_t m, int64_t n, const float* v_in, float* v_out,
                          float* sigma, int iters);

// ---- newton_schulz_small: every step of one small matrix in one block, on tensor cores.
constexpr int64_t kNewtonSchulzMaxSmall = 128;  // min(m, n) limit
constexpr int kNewtonSchulzMaxSteps = 64;
// Dynamic shared memory the kernel needs for (m, n), and whether the device can give it.
int64_t newton_schulz_small_smem(int64_t m, int64_t n);
bool newton_schulz_small_fits(int64_t m, int64_t n, int device);
void newton_schulz_small_cuda(int in_dtype, int out_dtype, std::uintptr_t G, std::uintptr_t out, int64_t batch,
                              int64_t m, int64_t n, const std::vector<float>& coefficients, float norm_mult,
                              float norm_eps, std::uintptr_t stream);
// X0 normalisation and per-step polynomial of one fp32 matrix on the host (fp32 accumulation), for tests.
void newton_schulz_host(const float* G, float* out, int64_t m, int64_t n, const std::vector<float>& coefficients,
                        float norm_mult, float norm_eps);

}  // namespace dk
