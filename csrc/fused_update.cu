// Launcher of the multi-tensor fused update (kernel in fused_update_kernel.cuh) and its host emulation.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "api.h"
#include "fused_update_kernel.cuh"
#include "launch_check.h"

namespace dk {
namespace {

// How one tensor is walked: elementwise (sign, scaled) or as lines of `length` elements (row: contiguous;
// col: stride `lines`, `batch` matrices).
struct Plan {
  int mode;
  int64_t batch, length, lines;
};

std::string shape_str(const std::vector<int64_t>& s) {  // as Python prints a tuple
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}

// The walk of a tensor of `shape` for `kind`. Lines along dim -1: the rows of the tensor seen as
// (numel / size(-1), size(-1)), a 0-D or 1-D tensor being one line; along dim -2: the columns of each matrix of
// the last two dims.
Plan plan_for(int kind, int dim, const std::vector<int64_t>& shape) {
  int64_t numel = 1;
  for (int64_t d : shape) {
    if (d < 0) throw std::invalid_argument("fused_update: negative size in shape " + shape_str(shape));
    numel *= d;
  }
  if (kind == kKindSign || kind == kKindScaled) return Plan{fu::kElem, 1, numel, 1};
  if (kind != kKindLine) throw std::invalid_argument("fused_update: unknown kind code " + std::to_string(kind));
  const int dims = int(shape.size());
  const auto row = [&](int64_t length) { return Plan{fu::kRow, 1, length, length ? numel / length : 0}; };
  if (dim == -1) return row(dims ? shape[dims - 1] : 1);
  if (dim != -2) throw std::invalid_argument("fused_update: the line dim must be -1 or -2, got " + std::to_string(dim));
  if (dims < 2)
    throw std::invalid_argument("fused_update: lines along dim -2 need a tensor of at least 2 dims, got shape " +
                                shape_str(shape));
  const int64_t R = shape[dims - 2], C = shape[dims - 1];
  if (C == 1) return row(R);  // one column per matrix: contiguous lines
  const int64_t per = R * C;
  return Plan{fu::kCol, per ? numel / per : 0, R, C};
}

template <typename P, typename G> int64_t items_of(const fu::Tensor& t) {
  constexpr int V = fu::vec_width<P, G>();
  if (t.mode == fu::kElem) return (t.cols + fu::elem_chunk<P, G>() - 1) / fu::elem_chunk<P, G>();
  if (t.mode == fu::kRow) return (t.rows + t.rows_per_item - 1) / t.rows_per_item;
  const int64_t sw = t.vec ? fu::col_tx<V>() * V : fu::col_tx<1>();
  return t.batch * ((t.cols + sw - 1) / sw);
}

bool aligned16(std::uintptr_t p) { return p % 16 == 0; }

template <typename P, typename G>
void launch(const FusedUpdateConfig& cfg, const std::vector<std::uintptr_t>& p, const std::vector<std::uintptr_t>& g,
            const std::vector<std::uintptr_t>& buf, const std::vector<std::vector<int64_t>>& shapes,
            const std::vector<int>& dims, const std::vector<double>& alphas, std::uintptr_t hyper,
            cudaStream_t stream) {
  constexpr int V = fu::vec_width<P, G>();
  std::vector<fu::Tensor> ts;
  for (size_t i = 0; i < p.size(); ++i) {
    const Plan pl = plan_for(cfg.kind, dims[i], shapes[i]);
    fu::Tensor t{};
    t.p = reinterpret_cast<void*>(p[i]);
    t.g = reinterpret_cast<void*>(g[i]);
    t.buf = cfg.has_buf ? reinterpret_cast<void*>(buf[i]) : nullptr;
    t.mode = pl.mode;
    t.sign = cfg.kind == kKindSign;
    // elem: 1 x 1 x numel; row: 1 x lines x length; col: batch x length (rows) x lines (cols)
    t.batch = pl.mode == fu::kCol ? pl.batch : 1;
    t.rows = pl.mode == fu::kElem ? 1 : (pl.mode == fu::kRow ? pl.lines : pl.length);
    t.cols = pl.mode == fu::kElem ? pl.length : (pl.mode == fu::kRow ? pl.length : pl.lines);
    t.alpha = alphas[i];
    t.rows_per_item = fu::kWarps * std::clamp<int64_t>(8192 / (fu::kWarps * std::max<int64_t>(t.cols, 1)), 1, 64);
    t.vec = aligned16(p[i]) && aligned16(g[i]) && (!cfg.has_buf || aligned16(buf[i])) &&
            (pl.mode == fu::kElem || t.cols % V == 0);
    if (t.batch * t.rows * t.cols > 0) ts.push_back(t);
  }
  // Column strips are the longest items: schedule them first.
  std::stable_sort(ts.begin(), ts.end(), [](const fu::Tensor& a, const fu::Tensor& b) {
    return (a.mode == fu::kCol) > (b.mode == fu::kCol);
  });
  fu::Args args{};
  args.hyper = reinterpret_cast<const float*>(hyper);
  args.lr = cfg.lr;
  args.momentum = cfg.momentum;
  args.scale = cfg.scale;
  args.eps = cfg.eps;
  args.has_buf = cfg.has_buf;
  args.light = cfg.light;
  args.unconstrained = cfg.unconstrained;
  for (size_t s = 0; s < ts.size(); s += fu::kMaxTensors) {
    args.count = int(std::min<size_t>(fu::kMaxTensors, ts.size() - s));
    int64_t items = 0;
    for (int i = 0; i < args.count; ++i) {
      args.t[i] = ts[s + i];
      args.t[i].first_item = items;
      items += items_of<P, G>(args.t[i]);
    }
    if (items > 0x7fffffff) throw std::invalid_argument("fused_update: too many work items for one launch");
    fu::fused_update_kernel<P, G><<<unsigned(items), fu::kThreads, 0, stream>>>(args);
    check_launch("fused_update_kernel");
  }
}

// The (p, g) dtype pairs the kernel is built for: equal dtypes, and fp32 with a 16-bit other side
// (fp32 params stepped along a bf16/fp16 Newton-Schulz result; bf16 params with fp32 grads).
using Launcher = void (*)(const FusedUpdateConfig&, const std::vector<std::uintptr_t>&,
                          const std::vector<std::uintptr_t>&, const std::vector<std::uintptr_t>&,
                          const std::vector<std::vector<int64_t>>&, const std::vector<int>&,
                          const std::vector<double>&, std::uintptr_t, cudaStream_t);

bool valid_dtype(int dtype) { return dtype == kFloat32 || dtype == kBFloat16 || dtype == kFloat16; }

Launcher launcher_for(int p_dtype, int g_dtype) {
  if (!valid_dtype(p_dtype) || !valid_dtype(g_dtype)) return nullptr;
  switch (p_dtype * 3 + g_dtype) {
    case kFloat32 * 3 + kFloat32: return &launch<float, float>;
    case kBFloat16 * 3 + kBFloat16: return &launch<__nv_bfloat16, __nv_bfloat16>;
    case kFloat16 * 3 + kFloat16: return &launch<__half, __half>;
    case kFloat32 * 3 + kBFloat16: return &launch<float, __nv_bfloat16>;
    case kFloat32 * 3 + kFloat16: return &launch<float, __half>;
    case kBFloat16 * 3 + kFloat32: return &launch<__nv_bfloat16, float>;
    default: return nullptr;
  }
}

float round_code(int dtype, float x) {
  switch (dtype) {
    case kFloat32: return round_to<float>(x);
    case kBFloat16: return round_to<__nv_bfloat16>(x);
    case kFloat16: return round_to<__half>(x);
    default: throw std::invalid_argument("round: unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace

bool fused_update_supported(int p_dtype, int g_dtype) {
  return launcher_for(p_dtype, g_dtype) != nullptr;
}

void fused_update_cuda(int p_dtype, int g_dtype, const FusedUpdateConfig& cfg, const std::vector<std::uintptr_t>& p,
                       const std::vector<std::uintptr_t>& g, const std::vector<std::uintptr_t>& buf,
                       const std::vector<std::vector<int64_t>>& shapes, const std::vector<int>& dims,
                       const std::vector<double>& alphas, std::uintptr_t hyper, std::uintptr_t stream) {
  const size_t n = p.size();
  if (g.size() != n || shapes.size() != n || dims.size() != n || alphas.size() != n || (cfg.has_buf && buf.size() != n))
    throw std::invalid_argument("fused_update: p, g, buf, shapes, dims and alphas must have equal lengths");
  if (!fused_update_supported(p_dtype, g_dtype))
    throw std::invalid_argument("fused_update: unsupported dtype codes (p " + std::to_string(p_dtype) + ", g " +
                                std::to_string(g_dtype) + ")");
  launcher_for(p_dtype, g_dtype)(cfg, p, g, buf, shapes, dims, alphas, hyper, as_stream(stream));
}

void round_host(int dtype, const float* x, float* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = round_code(dtype, x[i]);
}

void fused_update_host(const FusedUpdateConfig& cfg, int p_dtype, int g_dtype, int dim, double alpha,
                       const std::vector<int64_t>& shape, float* p, float* g, float* buf, const float* hyper) {
  if (!fused_update_supported(p_dtype, g_dtype))
    throw std::invalid_argument("fused_update: unsupported dtype codes (p " + std::to_string(p_dtype) + ", g " +
                                std::to_string(g_dtype) + ")");
  const Plan pl = plan_for(cfg.kind, dim, shape);
  const StepScalars s = step_scalars(hyper, cfg.lr, cfg.momentum, cfg.scale, cfg.unconstrained, cfg.light);
  const bool sign = cfg.kind == kKindSign;
  const auto dir = [&](int64_t i) {
    return cfg.has_buf ? round_code(g_dtype, momentum_dir(buf[i], g[i], s.keep, s.momentum)) : g[i];
  };
  // Element k of line l: row mode contiguous lines; col mode lines are columns of (batch, length, lines).
  const auto index = [&](int64_t l, int64_t k) {
    if (pl.mode == fu::kRow) return l * pl.length + k;
    return (l / pl.lines) * pl.length * pl.lines + k * pl.lines + l % pl.lines;
  };
  const int64_t nlines = pl.mode == fu::kElem ? pl.length : pl.batch * pl.lines;
  const int64_t len = pl.mode == fu::kElem ? 1 : pl.length;
  for (int64_t l = 0; l < nlines; ++l) {
    float step = elem_step(s.lr_scale, alpha);
    if (pl.mode != fu::kElem) {
      double ss = 0.0;
      for (int64_t k = 0; k < len; ++k) ss += double(dir(index(l, k))) * double(dir(index(l, k)));
      step = norm_step(ss, alpha, s.lr_scale, cfg.eps);
    }
    for (int64_t k = 0; k < len; ++k) {
      const int64_t i = pl.mode == fu::kElem ? l : index(l, k);
      const float d = dir(i);
      p[i] = round_code(p_dtype, apply_update(p[i], s.decay, step, elem_dir(d, sign)));
      if (cfg.has_buf) buf[i] = d;
      if (s.scale_grad) g[i] = round_code(g_dtype, g[i] * s.keep);
    }
  }
}

}  // namespace dk
