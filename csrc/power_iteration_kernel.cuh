// Batched power iteration, one read of W per iteration.
// pass:   block (b, s) takes rows [r0, r1) of W_b; per row i: u_i = W_i . v (block reduce), then
//         v'_partial += u_i W_i from the same registers; writes its partial v' and sum u_i^2.
// finish: v' = sum of partials (fixed order), sigma = ||v'|| / ||u||, v = v' / ||v'|| (v kept if v' = 0).
#pragma once
#include "scion_math.cuh"

namespace dk::pi {

constexpr int kMaxThreads = 512;
constexpr int kFinishThreads = 256;

template <typename T, int V> struct alignas(sizeof(T) * V) Vec { T x[V]; };

// Rows handled together (more loads in flight) for K*V columns per thread.
template <int K, int V> constexpr int rows_at_once() { return K * V <= 8 ? 4 : (K * V <= 16 ? 2 : 1); }

// Thread t owns columns (t + k*blockDim) * V + [0, V), k < K.
template <typename T, int V, int K>
__global__ void __launch_bounds__(kMaxThreads) pass_kernel(const T* __restrict__ W, const float* __restrict__ v,
                                                            float* __restrict__ part, int64_t m, int64_t n,
                                                            int64_t rows_per_split) {
  constexpr int R = rows_at_once<K, V>();
  __shared__ float red[2][kMaxThreads / 32][R];
  const int64_t b = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const T* Wb = W + b * m * n;
  float vr[K][V], acc[K][V];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int64_t j = (threadIdx.x + int64_t(k) * blockDim.x) * V + i;
      vr[k][i] = j < n ? v[b * n + j] : 0.f;
      acc[k][i] = 0.f;
    }
  float nu2 = 0.f;
  const int64_t r0 = split * rows_per_split, r1 = min(m, r0 + rows_per_split);
  int phase = 0;
  for (int64_t r = r0; r < r1; r += R, phase ^= 1) {
    float w[R][K][V], dot[R];
#pragma unroll
    for (int q = 0; q < R; ++q) {
      dot[q] = 0.f;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t j = (threadIdx.x + int64_t(k) * blockDim.x) * V;
        Vec<T, V> x;
        if (r + q < r1 && j < n) x = *reinterpret_cast<const Vec<T, V>*>(Wb + (r + q) * n + j);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          w[q][k][i] = (r + q < r1 && j < n) ? to_float(x.x[i]) : 0.f;
          dot[q] += w[q][k][i] * vr[k][i];
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) dot[q] += __shfl_xor_sync(0xffffffffu, dot[q], o);
      if (lane == 0) red[phase][warp][q] = dot[q];
    }
    __syncthreads();  // double-buffered: one barrier per group of R rows
#pragma unroll
    for (int q = 0; q < R; ++q) {
      float u = 0.f;
      for (int y = 0; y < warps; ++y) u += red[phase][y][q];
      nu2 += u * u;
#pragma unroll
      for (int k = 0; k < K; ++k)
#pragma unroll
        for (int i = 0; i < V; ++i) acc[k][i] += u * w[q][k][i];
    }
  }
  float* out = part + (b * splits + split) * (n + 1);  // [n partial v' | sum u^2]
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int64_t j = (threadIdx.x + int64_t(k) * blockDim.x) * V + i;
      if (j < n) out[j] = acc[k][i];
    }
  if (threadIdx.x == 0) out[n] = nu2;
}

__global__ void __launch_bounds__(kFinishThreads) finish_kernel(const float* __restrict__ part,
                                                                 const float* __restrict__ v, float* __restrict__ v_next,
                                                                 float* __restrict__ sigma, int64_t n, int splits) {
  __shared__ float red[kFinishThreads];
  const int64_t b = blockIdx.x;
  const float* pb = part + b * splits * (n + 1);
  float nw2 = 0.f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    float w = 0.f;
    for (int s = 0; s < splits; ++s) w += pb[s * (n + 1) + j];
    v_next[b * n + j] = w;
    nw2 += w * w;
  }
  red[threadIdx.x] = nw2;
  __syncthreads();
  for (int o = kFinishThreads / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
    __syncthreads();
  }
  nw2 = red[0];
  if (threadIdx.x == 0) {
    float nu2 = 0.f;
    for (int s = 0; s < splits; ++s) nu2 += pb[s * (n + 1) + n];
    sigma[b] = pi_sigma(nu2, nw2);
  }
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) v_next[b * n + j] = pi_next_v(v_next[b * n + j], v[b * n + j], nw2);
}

}  // namespace dk::pi
