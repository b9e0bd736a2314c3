// Host-side API of the CUDA launchers and host emulations, included by bindings.cpp.
// Free of CUDA headers: device pointers and streams travel as integers.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dk {

enum Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum Lmo : int { kSign = 0, kRowNorm = 1, kColNorm = 2, kBiasRMS = 3 };

// "" when the linked CUDA runtime works with this machine's driver (and sees a GPU), else its error;
// the runtime version this extension was built with (e.g. 13000).
std::string runtime_status();
int runtime_version();

// Round fp32 values to `dtype` and back with the kernels' conversions (for tests).
void round_host(int dtype, const float* x, float* out, int64_t count);

// ---- fused_update: momentum + LMO (Sign, RowNorm, ColNorm, BiasRMS) + decay + update, many tensors.
struct FusedUpdateConfig {
  int lmo;
  bool normalized, transpose, unconstrained, light, has_buf;
  double lr, momentum, scale;
};
// p/g/buf: device pointers of contiguous tensors of `dtype` (buf 0 when !has_buf); one launch per 128 tensors.
void fused_update_cuda(int dtype, const FusedUpdateConfig& cfg, const std::vector<std::uintptr_t>& p,
                       const std::vector<std::uintptr_t>& g, const std::vector<std::uintptr_t>& buf,
                       const std::vector<std::vector<int64_t>>& shapes, std::uintptr_t stream);
// The same update of one fp32 tensor on the host (sequential sums), for tests.
void fused_update_host(const FusedUpdateConfig& cfg, const std::vector<int64_t>& shape, float* p, float* g, float* buf);

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
