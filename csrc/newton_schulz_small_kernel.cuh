// Fully fused Newton-Schulz for small matrices: one block per matrix, every step on chip.
//   X0 = G / (mult ||G||_F + eps)      (tall G is read transposed: X is s x l, s = min(m, n) <= 128)
//   per step (a, b, c):  A = X Xᵀ;  B = b A + c (A A);  X = a X + 1 (B X)
// X, A, B live in shared memory in the compute type T (bf16/fp16, rounded as torch rounds each
// product); products run on tensor cores (mma.sync m16n8k16, fp32 accumulate). Sizes are padded
// to multiples of 16 with zeros, which the iteration keeps zero.
#pragma once
#include "scion_math.cuh"

namespace dk::ns {

constexpr int kMaxSteps = 64;
constexpr int kPad = 8;        // row padding (elements): ldmatrix rows hit distinct banks
constexpr int kWarpM = 64;     // warp tile rows (4 m16 tiles)
constexpr int kWarpN = 32;     // warp tile cols (4 n8 tiles)

struct Coeffs {
  float abc[3 * kMaxSteps];
  int steps;
  float mult, eps;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// d += a (16x16, row) * b (16x8, col), fp32 accumulate.
template <typename T> __device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T> struct Pair { T x, y; };

// C (M x N) = P (M x K, row-major, pitch ldp) . Q (K x N), all in shared memory, M, N, K multiples of 16.
// Q is stored k-major ([K][N], pitch ldq) when kKMajor, else n-major ([N][K], i.e. Qᵀ row-major).
// epi(row, col, c0, c1) gets the fp32 results at (row, col) and (row, col + 1). With kInPlace the
// epilogue may overwrite Q's columns of the same tiles: a barrier separates each round's
// products from its writes, and the tiles of a round cover whole columns (M/kWarpM divides the warps).
template <typename T, bool kKMajor, bool kInPlace, typename Epi>
__device__ __forceinline__ void block_gemm(int M, int N, int K, const T* P, int ldp, const T* Q, int ldq, Epi epi) {
  constexpr int MI = kWarpM / 16, NI = kWarpN / 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int tiles_m = (M + kWarpM - 1) / kWarpM, tiles = tiles_m * ((N + kWarpN - 1) / kWarpN);
  for (int base = 0; base < tiles; base += warps) {
    const int t = base + warp;
    const int m0 = (t % tiles_m) * kWarpM, n0 = (t / tiles_m) * kWarpN;
    float acc[MI][NI][4] = {};
    if (t < tiles) {
      for (int k0 = 0; k0 < K; k0 += 16) {
        uint32_t a[MI][4], b[NI][2];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
          if (m0 + mi * 16 < M) ldmatrix_x4(a[mi], P + (m0 + mi * 16 + lane % 16) * ldp + k0 + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < NI / 2; ++np) {
          if (n0 + np * 16 >= N) continue;
          const int q = lane / 8;
          uint32_t r[4];
          if (kKMajor) ldmatrix_x4_trans(r, Q + (k0 + lane % 8 + (q % 2) * 8) * ldq + n0 + np * 16 + (q / 2) * 8);
          else ldmatrix_x4(r, Q + (n0 + np * 16 + lane % 8 + (q / 2) * 8) * ldq + k0 + (q % 2) * 8);
          b[2 * np][0] = r[0]; b[2 * np][1] = r[1];
          b[2 * np + 1][0] = r[2]; b[2 * np + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni)
            if (m0 + mi * 16 < M && n0 + ni * 8 < N) mma16816<T>(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
      }
    }
    if (kInPlace) __syncthreads();
    if (t < tiles) {
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          if (m0 + mi * 16 >= M || n0 + ni * 8 >= N) continue;
          const int row = m0 + mi * 16 + lane / 4, col = n0 + ni * 8 + (lane % 4) * 2;
          epi(row, col, acc[mi][ni][0], acc[mi][ni][1]);
          epi(row + 8, col, acc[mi][ni][2], acc[mi][ni][3]);
        }
    }
  }
}

template <typename T> __device__ __forceinline__ void store2(T* p, float x, float y) {
  *reinterpret_cast<Pair<T>*>(p) = Pair<T>{from_float<T>(x), from_float<T>(y)};
}

__device__ __forceinline__ double block_sum(double x, double* red) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  __syncthreads();
  double s = 0.0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) s += red[w];
  return s;
}

// Element e of G (m x n, contiguous) is X(i, j) of X (s x l): X = G, or X = Gᵀ when tall (G is l x s).
__host__ __device__ __forceinline__ void x_of(int e, int s, int l, bool tall, int& i, int& j) {
  i = tall ? e % s : e / l;
  j = tall ? e / s : e % l;
}

template <typename T, typename Tin>
__global__ void __launch_bounds__(256, 2) newton_schulz_small_kernel(const Tin* __restrict__ G, T* __restrict__ out,
                                                                     int s, int l, bool tall,
                                                                     const __grid_constant__ Coeffs co) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double red[32];
  const int sp = (s + 15) / 16 * 16, lp = (l + 15) / 16 * 16, ldx = lp + kPad, lda = sp + kPad;
  T* X = reinterpret_cast<T*>(smem_raw);
  T* A = X + sp * ldx;
  T* B = A + sp * lda;
  const int64_t off = int64_t(blockIdx.x) * s * l;
  const int count = s * l;

  double ss = 0.0;  // fp64: no overflow for a huge but finite G
  for (int e = threadIdx.x; e < count; e += blockDim.x) {
    const double x = to_float(G[off + e]);
    ss += x * x;
  }
  const float denom = ns_denom(block_sum(ss, red), co.mult, co.eps);
  for (int e = threadIdx.x; e < sp * lp; e += blockDim.x) {  // zero padding
    const int i = e / lp, j = e % lp;
    if (i >= s || j >= l) X[i * ldx + j] = from_float<T>(0.f);
  }
  for (int e = threadIdx.x; e < count; e += blockDim.x) {
    int i, j;
    x_of(e, s, l, tall, i, j);
    X[i * ldx + j] = from_float<T>(to_float(G[off + e]) / denom);
  }
  __syncthreads();

  for (int step = 0; step < co.steps; ++step) {
    const float a = co.abc[3 * step], b = co.abc[3 * step + 1], c = co.abc[3 * step + 2];
    // A = X Xᵀ: Q = Xᵀ is X itself read n-major.
    block_gemm<T, false, false>(sp, sp, lp, X, ldx, X, ldx, [&](int r, int k, float x, float y) {
      store2(A + r * lda + k, x, y);
    });
    __syncthreads();
    // B = b A + c (A A)
    block_gemm<T, true, false>(sp, sp, sp, A, lda, A, lda, [&](int r, int k, float x, float y) {
      const Pair<T> old = *reinterpret_cast<const Pair<T>*>(A + r * lda + k);
      store2(B + r * lda + k, ns_poly(b, to_float(old.x), c, x), ns_poly(b, to_float(old.y), c, y));
    });
    __syncthreads();
    // X = a X + B X, in place
    block_gemm<T, true, true>(sp, lp, sp, B, lda, X, ldx, [&](int r, int k, float x, float y) {
      const Pair<T> old = *reinterpret_cast<const Pair<T>*>(X + r * ldx + k);
      store2(X + r * ldx + k, ns_poly(a, to_float(old.x), 1.f, x), ns_poly(a, to_float(old.y), 1.f, y));
    });
    __syncthreads();
  }

  for (int e = threadIdx.x; e < count; e += blockDim.x) {
    int i, j;
    x_of(e, s, l, tall, i, j);
    out[off + e] = X[i * ldx + j];
  }
}

}  // namespace dk::ns
