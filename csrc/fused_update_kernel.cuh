// Multi-tensor fused Scion update: one block per work item (a chunk of one tensor).
//   d = g, or buf' = keep buf + momentum g and d = buf'      (rounded to g's storage dtype, as stored)
//   p' = decay p - step * dir(d)
//   sign:    dir = sign(d), step = lr scale alpha
//   scaled:  dir = d,       step = lr scale alpha
//   line:    dir = d,       step = lr scale / (||d||_line * alpha + eps)    (fp64 sums of squares)
//   light (ScionLight): afterwards g' = keep g (a plain momentum == 1 leaves g; a hyper one always scales it).
// lr, momentum and scale come from the launch's arguments or, when `hyper` is set, from an fp32 array on the
// device (read by every block: no host sync, so the launch can be captured in a CUDA graph).
// p has type P, g and buf type G (e.g. fp32 params stepped along a bf16 Newton-Schulz result); fp32 math;
// 128-bit loads of the wider type when every pointer is 16-byte aligned and lines are whole vectors.
#pragma once
#include "scion_math.cuh"

namespace dk::fu {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTensors = 128;
enum Mode : int { kElem = 0, kRow = 1, kCol = 2 };

// Elements per vector: 16 bytes of the wider of P and G.
template <typename P, typename G> constexpr int vec_width() { return 16 / int(sizeof(P) > sizeof(G) ? sizeof(P) : sizeof(G)); }
// Elements of one elementwise work item.
template <typename P, typename G> constexpr int64_t elem_chunk() { return int64_t(kThreads) * 4 * vec_width<P, G>(); }
// Column-mode layout: TX threads across columns (V wide each) x TY threads down the rows.
template <int V> constexpr int col_tx() { return V == 1 ? 32 : 8; }

struct Tensor {
  void* p;
  void* g;
  void* buf;
  int64_t batch, rows, cols;  // elem: 1 x 1 x numel; row: 1 x lines x length; col: batch x length x lines
  int64_t first_item;         // first work item (blockIdx.x) of this tensor
  int64_t rows_per_item;      // row mode
  double alpha;               // elem: folded into the step; row/col: the line norm's factor
  int mode, sign, vec;        // sign: elem mode's direction is sign(d) (else d)
};

struct Args {
  Tensor t[kMaxTensors];
  const float* hyper;  // device {lr, momentum, scale} (fp32), or null: the plain numbers below
  double lr, momentum, scale, eps;
  int count;
  int has_buf, light, unconstrained;
};

template <typename T, int V> struct alignas(sizeof(T) * V) Vec { T x[V]; };

template <typename T, int V> __device__ __forceinline__ Vec<T, V> ldv(const void* base, int64_t off) {
  return *reinterpret_cast<const Vec<T, V>*>(static_cast<const T*>(base) + off);
}
template <typename T, int V> __device__ __forceinline__ void stv(void* base, int64_t off, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(static_cast<T*>(base) + off) = v;
}

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Directions d at V consecutive elements from off.
template <typename G, int V>
__device__ __forceinline__ void load_dir(const Args& a, const StepScalars& s, const Tensor& t, int64_t off,
                                         float (&g)[V], float (&d)[V]) {
  const Vec<G, V> gv = ldv<G, V>(t.g, off);
#pragma unroll
  for (int i = 0; i < V; ++i) d[i] = g[i] = to_float(gv.x[i]);
  if (a.has_buf) {
    const Vec<G, V> bv = ldv<G, V>(t.buf, off);
#pragma unroll
    for (int i = 0; i < V; ++i) d[i] = round_to<G>(momentum_dir(to_float(bv.x[i]), g[i], s.keep, s.momentum));
  }
}

template <typename G, int V>
__device__ __forceinline__ void sumsq_dir(const Args& a, const StepScalars& s, const Tensor& t, int64_t off,
                                          double (&ss)[V]) {
  float g[V], d[V];
  load_dir<G, V>(a, s, t, off, g, d);
#pragma unroll
  for (int i = 0; i < V; ++i) ss[i] += double(d[i]) * double(d[i]);
}

// Writes p', buf' and (light) g' at V consecutive elements from off.
template <typename P, typename G, int V>
__device__ __forceinline__ void update(const Args& a, const StepScalars& s, const Tensor& t, int64_t off,
                                       const float (&step)[V]) {
  float g[V], d[V];
  load_dir<G, V>(a, s, t, off, g, d);
  const Vec<P, V> pv = ldv<P, V>(t.p, off);
  Vec<P, V> po;
  Vec<G, V> bo, go;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    po.x[i] = from_float<P>(apply_update(to_float(pv.x[i]), s.decay, step[i], elem_dir(d[i], t.sign)));
    bo.x[i] = from_float<G>(d[i]);
    go.x[i] = from_float<G>(g[i] * s.keep);
  }
  stv<P, V>(t.p, off, po);
  if (a.has_buf) stv<G, V>(t.buf, off, bo);
  if (s.scale_grad) stv<G, V>(t.g, off, go);
}

template <typename F, int V> __device__ __forceinline__ void fill(F (&x)[V], F v) {
#pragma unroll
  for (int i = 0; i < V; ++i) x[i] = v;
}

// sign / scaled: a contiguous chunk [start, end) of the flattened tensor.
template <typename P, typename G, int V>
__device__ void elem_item(const Args& a, const StepScalars& s, const Tensor& t, int64_t item) {
  constexpr int64_t chunk = elem_chunk<P, G>();
  const int64_t n = t.cols, start = item * chunk, end = min(n, start + chunk);
  float step[V], step1[1];
  fill(step, elem_step(s.lr_scale, t.alpha));
  fill(step1, step[0]);
  const int64_t vend = V == 1 ? end : start + (end - start) / V * V;
  for (int64_t off = start + int64_t(threadIdx.x) * V; off < vend; off += int64_t(kThreads) * V)
    update<P, G, V>(a, s, t, off, step);
  for (int64_t off = vend + threadIdx.x; off < end; off += kThreads) update<P, G, 1>(a, s, t, off, step1);
}

// Lines along dim -1: one warp per line of `cols` contiguous elements.
template <typename P, typename G, int V>
__device__ void row_item(const Args& a, const StepScalars& s, const Tensor& t, int64_t item) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r1 = min(t.rows, (item + 1) * t.rows_per_item);
  for (int64_t r = item * t.rows_per_item + warp; r < r1; r += kWarps) {
    const int64_t base = r * t.cols;
    double ss[V];
    fill(ss, 0.0);
    for (int64_t c = int64_t(lane) * V; c < t.cols; c += 32 * V) sumsq_dir<G, V>(a, s, t, base + c, ss);
    double sum = 0.0;
#pragma unroll
    for (int i = 0; i < V; ++i) sum += ss[i];
    float step[V];
    fill(step, norm_step(warp_sum(sum), t.alpha, s.lr_scale, a.eps));
    for (int64_t c = int64_t(lane) * V; c < t.cols; c += 32 * V) update<P, G, V>(a, s, t, base + c, step);
  }
}

// Lines along dim -2: one block per (batch, strip of TX*V columns) over all `rows` rows.
template <typename P, typename G, int V>
__device__ void col_item(const Args& a, const StepScalars& s, const Tensor& t, int64_t item, double* red) {
  constexpr int TX = col_tx<V>(), TY = kThreads / TX, SW = TX * V;
  const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
  const int64_t strips = (t.cols + SW - 1) / SW, b = item / strips;
  const int64_t c = (item % strips) * SW + int64_t(tx) * V;
  const bool active = c < t.cols;  // vectors never straddle the edge: cols % V == 0
  const int64_t base = b * t.rows * t.cols + c;
  double ss[V];
  fill(ss, 0.0);
  if (active)
    for (int64_t r = ty; r < t.rows; r += TY) sumsq_dir<G, V>(a, s, t, base + r * t.cols, ss);
#pragma unroll
  for (int i = 0; i < V; ++i) red[ty * SW + tx * V + i] = ss[i];
  __syncthreads();
  if (threadIdx.x < SW) {
    double sum = 0.0;
    for (int y = 0; y < TY; ++y) sum += red[y * SW + threadIdx.x];
    red[TY * SW + threadIdx.x] = norm_step(sum, t.alpha, s.lr_scale, a.eps);
  }
  __syncthreads();
  float step[V];
#pragma unroll
  for (int i = 0; i < V; ++i) step[i] = float(red[TY * SW + tx * V + i]);
  if (active)
    for (int64_t r = ty; r < t.rows; r += TY) update<P, G, V>(a, s, t, base + r * t.cols, step);
}

template <typename P, typename G>
__global__ void __launch_bounds__(kThreads) fused_update_kernel(const __grid_constant__ Args args) {
  constexpr int V = vec_width<P, G>();
  __shared__ double red[kThreads * 8 + 64];  // TY*SW fp64 column partials + SW steps (TY*SW <= 2048, SW <= 64)
  // The tensor of this block: last one whose first_item <= blockIdx.x.
  int lo = 0, hi = args.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (args.t[mid].first_item <= int64_t(blockIdx.x)) lo = mid; else hi = mid - 1;
  }
  const Tensor& t = args.t[lo];
  const int64_t item = int64_t(blockIdx.x) - t.first_item;
  const StepScalars s = step_scalars(args.hyper, args.lr, args.momentum, args.scale, args.unconstrained, args.light);
  if (t.mode == kElem) {
    if (t.vec) elem_item<P, G, V>(args, s, t, item); else elem_item<P, G, 1>(args, s, t, item);
  } else if (t.mode == kRow) {
    if (t.vec) row_item<P, G, V>(args, s, t, item); else row_item<P, G, 1>(args, s, t, item);
  } else {
    if (t.vec) col_item<P, G, V>(args, s, t, item, red); else col_item<P, G, 1>(args, s, t, item, red);
  }
}

}  // namespace dk::fu
