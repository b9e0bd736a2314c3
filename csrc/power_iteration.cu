// Launcher of the batched power iteration (kernels in power_iteration_kernel.cuh) and its host emulation.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "api.h"
#include "launch_check.h"
#include "power_iteration_kernel.cuh"

namespace dk {
namespace {

// Row splits per matrix: about 512 blocks in all, at least 8 rows each, at most 64 splits.
int splits_for(int64_t batch, int64_t m) {
  const int64_t want = (512 + batch - 1) / std::max<int64_t>(batch, 1);
  return int(std::clamp<int64_t>(std::min<int64_t>(want, (m + 7) / 8), 1, 64));
}

template <typename T, int V, int K>
void run_pass(const T* W, const float* v, float* part, int64_t batch, int64_t m, int64_t n, int splits,
              cudaStream_t stream) {
  const int64_t nvec = (n + V - 1) / V;
  const int threads = int(std::clamp<int64_t>((nvec + K - 1) / K + 31, 32, pi::kMaxThreads) / 32 * 32);
  const int64_t rows = (m + splits - 1) / splits;
  pi::pass_kernel<T, V, K><<<dim3(unsigned(batch), splits), threads, 0, stream>>>(W, v, part, m, n, rows);
  check_launch("power_iteration pass_kernel");
}

// Smallest per-thread column count K that covers n with at most 512 threads.
template <typename T, int V>
void pass_k(const T* W, const float* v, float* part, int64_t batch, int64_t m, int64_t n, int splits, cudaStream_t s) {
  const int64_t per = (n + V * pi::kMaxThreads - 1) / (V * pi::kMaxThreads);  // K needed
  if constexpr (V == 1) {
    if (per <= 8) return run_pass<T, 1, 8>(W, v, part, batch, m, n, splits, s);
    if (per <= 16) return run_pass<T, 1, 16>(W, v, part, batch, m, n, splits, s);
    return run_pass<T, 1, 32>(W, v, part, batch, m, n, splits, s);
  } else {
    if (per <= 1) return run_pass<T, V, 1>(W, v, part, batch, m, n, splits, s);
    if (per <= 2) return run_pass<T, V, 2>(W, v, part, batch, m, n, splits, s);
    if constexpr (V * 4 <= 32) {
      if (per <= 4) return run_pass<T, V, 4>(W, v, part, batch, m, n, splits, s);
    }
    if constexpr (V * 8 <= 32) {
      if (per <= 8) return run_pass<T, V, 8>(W, v, part, batch, m, n, splits, s);
    }
    throw std::invalid_argument("power_iteration: n too large");
  }
}

template <typename T>
void launch(const T* W, int64_t batch, int64_t m, int64_t n, const float* v_in, float* v_out, float* sigma,
            float* ws, int iters, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int splits = splits_for(batch, m);
  float* part = ws;
  float* tmp = ws + batch * splits * (n + 1);
  const bool vec = reinterpret_cast<std::uintptr_t>(W) % 16 == 0 && n % V == 0;
  const float* cur = v_in;
  for (int it = 0; it < iters; ++it) {
    float* next = (iters - 1 - it) % 2 == 0 ? v_out : tmp;  // the last iteration lands in v_out
    if (vec) pass_k<T, V>(W, cur, part, batch, m, n, splits, stream);
    else pass_k<T, 1>(W, cur, part, batch, m, n, splits, stream);
    pi::finish_kernel<<<unsigned(batch), pi::kFinishThreads, 0, stream>>>(part, cur, next, sigma, n, splits);
    check_launch("power_iteration finish_kernel");
    cur = next;
  }
}

}  // namespace

int64_t power_iteration_workspace(int64_t batch, int64_t m, int64_t n) {
  return batch * splits_for(batch, m) * (n + 1) + batch * n;
}

void power_iteration_cuda(int dtype, std::uintptr_t W, int64_t batch, int64_t m, int64_t n, std::uintptr_t v_in,
                          std::uintptr_t v_out, std::uintptr_t sigma, std::uintptr_t workspace, int iters,
                          std::uintptr_t stream) {
  if (n > kPowerIterationMaxN)
    throw std::invalid_argument("power_iteration: the CUDA kernel takes n <= " + std::to_string(kPowerIterationMaxN) +
                                ", got n = " + std::to_string(n));
  if (batch < 0 || m < 0 || n < 0)
    throw std::invalid_argument("power_iteration: sizes must be non-negative, got (" + std::to_string(batch) + ", " +
                                std::to_string(m) + ", " + std::to_string(n) + ")");
  if (batch == 0 || iters <= 0) return;
  if (batch > 0x7fffffff) throw std::invalid_argument("power_iteration: batch too large for one grid");
  const auto vi = reinterpret_cast<const float*>(v_in);
  const auto vo = reinterpret_cast<float*>(v_out);
  const auto sg = reinterpret_cast<float*>(sigma);
  const auto ws = reinterpret_cast<float*>(workspace);
  const auto st = as_stream(stream);
  switch (dtype) {
    case kFloat32: return launch(reinterpret_cast<const float*>(W), batch, m, n, vi, vo, sg, ws, iters, st);
    case kBFloat16: return launch(reinterpret_cast<const __nv_bfloat16*>(W), batch, m, n, vi, vo, sg, ws, iters, st);
    case kFloat16: return launch(reinterpret_cast<const __half*>(W), batch, m, n, vi, vo, sg, ws, iters, st);
    default: throw std::invalid_argument("power_iteration: unsupported dtype code " + std::to_string(dtype));
  }
}

void power_iteration_host(const float* W, int64_t batch, int64_t m, int64_t n, const float* v_in, float* v_out,
                          float* sigma, int iters) {
  std::vector<float> v(v_in, v_in + batch * n), u(m), w(n);
  for (int64_t b = 0; b < batch; ++b) {
    const float* Wb = W + b * m * n;
    float* vb = v.data() + b * n;
    for (int it = 0; it < iters; ++it) {
      float nu2 = 0.f, nw2 = 0.f;
      std::fill(w.begin(), w.end(), 0.f);
      for (int64_t i = 0; i < m; ++i) {  // u_i and v' from the same row, as the kernel
        float ui = 0.f;
        for (int64_t j = 0; j < n; ++j) ui += Wb[i * n + j] * vb[j];
        nu2 += ui * ui;
        for (int64_t j = 0; j < n; ++j) w[j] += ui * Wb[i * n + j];
      }
      for (int64_t j = 0; j < n; ++j) nw2 += w[j] * w[j];
      sigma[b] = pi_sigma(nu2, nw2);
      for (int64_t j = 0; j < n; ++j) vb[j] = pi_next_v(w[j], vb[j], nw2);
    }
  }
  std::copy(v.begin(), v.end(), v_out);
}

}  // namespace dk
