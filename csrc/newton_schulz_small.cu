// Launcher of the fused small-matrix Newton-Schulz (kernel in newton_schulz_small_kernel.cuh) and its host emulation.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "api.h"
#include "launch_check.h"
#include "newton_schulz_small_kernel.cuh"

namespace dk {
static_assert(kNewtonSchulzMaxSteps == ns::kMaxSteps, "api.h and the kernel disagree on the step limit");
namespace {

int64_t pad16(int64_t x) { return (x + 15) / 16 * 16; }

template <typename T, typename Tin>
void launch(const void* G, void* out, int64_t batch, int s, int l, bool tall, const ns::Coeffs& co, cudaStream_t stream) {
  const int64_t smem = newton_schulz_small_smem(s, l);
  auto kernel = ns::newton_schulz_small_kernel<T, Tin>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
             "cudaFuncSetAttribute(newton_schulz_small_kernel)");
  const int threads = pad16(s) > 64 ? 256 : 128;  // 2 warp rows of 64 need 8 warps (see block_gemm)
  kernel<<<unsigned(batch), threads, smem, stream>>>(static_cast<const Tin*>(G), static_cast<T*>(out), s, l, tall, co);
  check_launch("newton_schulz_small_kernel");
}

template <typename T>
void dispatch_in(int in_dtype, const void* G, void* out, int64_t batch, int s, int l, bool tall, const ns::Coeffs& co,
                 cudaStream_t st) {
  switch (in_dtype) {
    case kFloat32: return launch<T, float>(G, out, batch, s, l, tall, co, st);
    case kBFloat16: return launch<T, __nv_bfloat16>(G, out, batch, s, l, tall, co, st);
    case kFloat16: return launch<T, __half>(G, out, batch, s, l, tall, co, st);
    default: throw std::invalid_argument("newton_schulz_small: unsupported input dtype code " + std::to_string(in_dtype));
  }
}

}  // namespace

int64_t newton_schulz_small_smem(int64_t m, int64_t n) {
  const int64_t s = pad16(std::min(m, n)), l = pad16(std::max(m, n));
  return 2 * (s * (l + ns::kPad) + 2 * s * (s + ns::kPad));  // X, A, B in a 16-bit type
}

bool newton_schulz_small_fits(int64_t m, int64_t n, int device) {
  if (std::min(m, n) > kNewtonSchulzMaxSmall || std::min(m, n) < 1) return false;
  int optin = 0;
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return newton_schulz_small_smem(m, n) + 1024 <= optin;  // + the kernel's static shared memory
}

void newton_schulz_small_cuda(int in_dtype, int out_dtype, std::uintptr_t G, std::uintptr_t out, int64_t batch,
                              int64_t m, int64_t n, const std::vector<float>& coefficients, float norm_mult,
                              float norm_eps, std::uintptr_t stream) {
  if (std::min(m, n) > kNewtonSchulzMaxSmall)
    throw std::invalid_argument("newton_schulz_small: min(m, n) must be <= " + std::to_string(kNewtonSchulzMaxSmall) +
                                ", got (" + std::to_string(m) + ", " + std::to_string(n) + ")");
  if (coefficients.size() % 3 || coefficients.size() > 3 * size_t(ns::kMaxSteps))
    throw std::invalid_argument("newton_schulz_small: coefficients must be at most " +
                                std::to_string(ns::kMaxSteps) + " (a, b, c) triples");
  if (batch < 0 || m < 0 || n < 0)
    throw std::invalid_argument("newton_schulz_small: sizes must be non-negative, got (" + std::to_string(batch) +
                                ", " + std::to_string(m) + ", " + std::to_string(n) + ")");
  if (batch == 0 || m == 0 || n == 0) return;
  if (newton_schulz_small_smem(m, n) > (1 << 20))
    throw std::invalid_argument("newton_schulz_small: max(m, n) = " + std::to_string(std::max(m, n)) +
                                " does not fit in shared memory");
  if (batch > 0x7fffffff) throw std::invalid_argument("newton_schulz_small: batch too large");
  ns::Coeffs co{};
  std::copy(coefficients.begin(), coefficients.end(), co.abc);
  co.steps = int(coefficients.size() / 3);
  co.mult = norm_mult;
  co.eps = norm_eps;
  const bool tall = m > n;
  const int s = int(std::min(m, n)), l = int(std::max(m, n));
  const void* g = reinterpret_cast<const void*>(G);
  void* o = reinterpret_cast<void*>(out);
  switch (out_dtype) {
    case kBFloat16: return dispatch_in<__nv_bfloat16>(in_dtype, g, o, batch, s, l, tall, co, as_stream(stream));
    case kFloat16: return dispatch_in<__half>(in_dtype, g, o, batch, s, l, tall, co, as_stream(stream));
    default: throw std::invalid_argument("newton_schulz_small: the output dtype must be bfloat16 or float16");
  }
}

void newton_schulz_host(const float* G, float* out, int64_t m, int64_t n, const std::vector<float>& coefficients,
                        float norm_mult, float norm_eps) {
  const bool tall = m > n;
  const int s = int(std::min(m, n)), l = int(std::max(m, n)), count = s * l;
  std::vector<float> X(count), A(size_t(s) * s), B(size_t(s) * s), Y(count);
  double ss = 0.0;
  for (int e = 0; e < count; ++e) ss += double(G[e]) * double(G[e]);
  const float denom = ns_denom(ss, norm_mult, norm_eps);
  for (int e = 0; e < count; ++e) {
    int i, j;
    ns::x_of(e, s, l, tall, i, j);
    X[i * l + j] = G[e] / denom;
  }
  for (size_t t = 0; t + 2 < coefficients.size(); t += 3) {
    const float a = coefficients[t], b = coefficients[t + 1], c = coefficients[t + 2];
    for (int i = 0; i < s; ++i)
      for (int k = 0; k < s; ++k) {
        float acc = 0.f;
        for (int j = 0; j < l; ++j) acc += X[i * l + j] * X[k * l + j];
        A[i * s + k] = acc;
      }
    for (int i = 0; i < s; ++i)
      for (int k = 0; k < s; ++k) {
        float acc = 0.f;
        for (int j = 0; j < s; ++j) acc += A[i * s + j] * A[j * s + k];
        B[i * s + k] = ns_poly(b, A[i * s + k], c, acc);
      }
    for (int i = 0; i < s; ++i)
      for (int j = 0; j < l; ++j) {
        float acc = 0.f;
        for (int k = 0; k < s; ++k) acc += B[i * s + k] * X[k * l + j];
        Y[i * l + j] = ns_poly(a, X[i * l + j], 1.f, acc);
      }
    X.swap(Y);
  }
  for (int e = 0; e < count; ++e) {
    int i, j;
    ns::x_of(e, s, l, tall, i, j);
    out[e] = X[i * l + j];
  }
}

}  // namespace dk
