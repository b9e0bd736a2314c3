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

// How one tensor is reduced: lines of `length` elements (row: contiguous; col: stride `lines`).
struct Plan {
  int mode;
  int64_t batch, length, lines;
  double alpha;   // step = coef / (||line|| alpha + 1e-8)
  double factor;  // coef = lr * scale * factor
};

std::string shape_str(const std::vector<int64_t>& s) {  // as Python prints a tuple
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}

// The reference LMOs (disco_kernels/reference.py) as line reductions.
Plan plan_for(int lmo, bool normalized, bool transpose, const std::vector<int64_t>& shape) {
  int64_t numel = 1;
  for (int64_t d : shape) {
    if (d < 0) throw std::invalid_argument("fused_update: negative size in shape " + shape_str(shape));
    numel *= d;
  }
  const int dims = int(shape.size());
  const char* names[] = {"Sign", "RowNorm", "ColNorm", "BiasRMS"};
  if (lmo < kSign || lmo > kBiasRMS) throw std::invalid_argument("fused_update: unknown lmo code " + std::to_string(lmo));
  const int need = lmo == kBiasRMS ? 0 : lmo == kSign ? int(normalized) : (lmo == kColNorm || transpose) ? 2 : 1;
  if (dims < need)
    throw std::invalid_argument(std::string("fused_update: ") + names[lmo] + (transpose ? "(transpose=True)" : "") +
                                " needs a tensor of at least " + std::to_string(need) + " dims, got shape " +
                                shape_str(shape));
  const int64_t C = dims ? shape[dims - 1] : 1, R = dims >= 2 ? shape[dims - 2] : 1;
  const auto row = [&](int64_t length, double alpha) {
    return Plan{fu::kRow, 1, length, length ? numel / length : 0, alpha, 1.0};
  };
  const auto col = [&](int64_t length, int64_t lines, double alpha) {
    if (lines == 1) return row(length, alpha);  // a single column per batch: contiguous lines
    const int64_t per = length * lines;
    return Plan{fu::kCol, per ? numel / per : 0, length, lines, alpha, 1.0};
  };
  switch (lmo) {
    case kSign:  // sign(g) / d_in
      return Plan{fu::kElem, 1, numel, 1, 1.0, normalized ? 1.0 / double(C) : 1.0};
    case kRowNorm:  // g / (||row|| (sqrt(d_in)) + 1e-8); transpose: rows of g.mT = columns of g
      return transpose ? col(R, C, normalized ? std::sqrt(double(R)) : 1.0)
                       : row(C, normalized ? std::sqrt(double(C)) : 1.0);
    case kColNorm:  // g / (||col|| / sqrt(d_out) (d_in) + 1e-8); transpose: columns of g.mT = rows of g
      return transpose ? row(C, (normalized ? double(R) : 1.0) / std::sqrt(double(C)))
                       : col(R, C, (normalized ? double(C) : 1.0) / std::sqrt(double(R)));
    default:  // BiasRMS: g / (rms over dim 0 + 1e-8)
      if (dims == 0) return row(1, 1.0);
      return col(shape[0], numel / std::max<int64_t>(shape[0], 1), 1.0 / std::sqrt(double(shape[0])));
  }
}

template <typename T> int64_t items_of(const fu::Tensor& t) {
  if (t.mode == fu::kElem) return (t.cols + fu::elem_chunk<T>() - 1) / fu::elem_chunk<T>();
  if (t.mode == fu::kRow) return (t.rows + t.rows_per_item - 1) / t.rows_per_item;
  const int64_t sw = t.vec ? fu::col_tx<fu::vec_width<T>()>() * fu::vec_width<T>() : fu::col_tx<1>();
  return t.batch * ((t.cols + sw - 1) / sw);
}

bool aligned16(std::uintptr_t p) { return p % 16 == 0; }

template <typename T>
void launch(const FusedUpdateConfig& cfg, const std::vector<std::uintptr_t>& p, const std::vector<std::uintptr_t>& g,
            const std::vector<std::uintptr_t>& buf, const std::vector<std::vector<int64_t>>& shapes, cudaStream_t stream) {
  constexpr int V = fu::vec_width<T>();
  std::vector<fu::Tensor> ts;
  for (size_t i = 0; i < p.size(); ++i) {
    const Plan pl = plan_for(cfg.lmo, cfg.normalized, cfg.transpose, shapes[i]);
    fu::Tensor t{};
    t.p = reinterpret_cast<void*>(p[i]);
    t.g = reinterpret_cast<void*>(g[i]);
    t.buf = cfg.has_buf ? reinterpret_cast<void*>(buf[i]) : nullptr;
    t.mode = pl.mode;
    // elem: 1 x 1 x numel; row: 1 x lines x length; col: batch x length (rows) x lines (cols)
    t.batch = pl.mode == fu::kCol ? pl.batch : 1;
    t.rows = pl.mode == fu::kElem ? 1 : (pl.mode == fu::kRow ? pl.lines : pl.length);
    t.cols = pl.mode == fu::kElem ? pl.length : (pl.mode == fu::kRow ? pl.length : pl.lines);
    t.alpha = float(pl.alpha);
    t.coef = float(cfg.lr * cfg.scale * pl.factor);
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
  args.has_buf = cfg.has_buf;
  args.scale_grad = cfg.light && cfg.momentum != 1.0;
  args.keep = float(1.0 - cfg.momentum);
  args.momentum = float(cfg.momentum);
  args.decay = cfg.unconstrained ? 1.f : float(1.0 - cfg.lr);
  for (size_t s = 0; s < ts.size(); s += fu::kMaxTensors) {
    args.count = int(std::min<size_t>(fu::kMaxTensors, ts.size() - s));
    int64_t items = 0;
    for (int i = 0; i < args.count; ++i) {
      args.t[i] = ts[s + i];
      args.t[i].first_item = items;
      items += items_of<T>(args.t[i]);
    }
    if (items > 0x7fffffff) throw std::invalid_argument("fused_update: too many work items for one launch");
    fu::fused_update_kernel<T><<<unsigned(items), fu::kThreads, 0, stream>>>(args);
    check_launch("fused_update_kernel");
  }
}

}  // namespace

void fused_update_cuda(int dtype, const FusedUpdateConfig& cfg, const std::vector<std::uintptr_t>& p,
                       const std::vector<std::uintptr_t>& g, const std::vector<std::uintptr_t>& buf,
                       const std::vector<std::vector<int64_t>>& shapes, std::uintptr_t stream) {
  if (g.size() != p.size() || shapes.size() != p.size() || (cfg.has_buf && buf.size() != p.size()))
    throw std::invalid_argument("fused_update: p, g, buf and shapes must have equal lengths");
  switch (dtype) {
    case kFloat32: return launch<float>(cfg, p, g, buf, shapes, as_stream(stream));
    case kBFloat16: return launch<__nv_bfloat16>(cfg, p, g, buf, shapes, as_stream(stream));
    case kFloat16: return launch<__half>(cfg, p, g, buf, shapes, as_stream(stream));
    default: throw std::invalid_argument("fused_update: unsupported dtype code " + std::to_string(dtype));
  }
}

void round_host(int dtype, const float* x, float* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    switch (dtype) {
      case kFloat32: out[i] = round_to<float>(x[i]); break;
      case kBFloat16: out[i] = round_to<__nv_bfloat16>(x[i]); break;
      case kFloat16: out[i] = round_to<__half>(x[i]); break;
      default: throw std::invalid_argument("round: unsupported dtype code " + std::to_string(dtype));
    }
  }
}

void fused_update_host(const FusedUpdateConfig& cfg, const std::vector<int64_t>& shape, float* p, float* g, float* buf) {
  const Plan pl = plan_for(cfg.lmo, cfg.normalized, cfg.transpose, shape);
  const float keep = float(1.0 - cfg.momentum), mom = float(cfg.momentum);
  const float decay = cfg.unconstrained ? 1.f : float(1.0 - cfg.lr), coef = float(cfg.lr * cfg.scale * pl.factor);
  const float alpha = float(pl.alpha);
  const auto dir = [&](int64_t i) { return cfg.has_buf ? momentum_dir(buf[i], g[i], keep, mom) : g[i]; };
  // Element i of line l: row mode contiguous lines; col mode lines are columns of (batch, length, lines).
  const auto index = [&](int64_t l, int64_t k) {
    if (pl.mode == fu::kRow) return l * pl.length + k;
    return (l / pl.lines) * pl.length * pl.lines + k * pl.lines + l % pl.lines;
  };
  const int64_t nlines = pl.mode == fu::kElem ? pl.length : pl.batch * pl.lines;
  const int64_t len = pl.mode == fu::kElem ? 1 : pl.length;
  for (int64_t l = 0; l < nlines; ++l) {
    float step = coef;
    if (pl.mode != fu::kElem) {
      double ss = 0.0;
      for (int64_t k = 0; k < len; ++k) ss += double(dir(index(l, k))) * double(dir(index(l, k)));
      step = norm_step(ss, alpha, coef);
    }
    for (int64_t k = 0; k < len; ++k) {
      const int64_t i = pl.mode == fu::kElem ? l : index(l, k);
      const float d = dir(i);
      p[i] = apply_update(p[i], decay, step, pl.mode == fu::kElem ? sign_dir(d) : d);
      if (cfg.has_buf) buf[i] = d;
      if (cfg.light && cfg.momentum != 1.0) g[i] *= keep;
    }
  }
}

}  // namespace dk
