// Per-element math of the Scion kernels, shared by device code and the host
// emulations that tests call through the bindings (so it is checked on CPU).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cmath>
#include <cstdint>

#define DK_HD __host__ __device__ __forceinline__

namespace dk {

// Storage <-> fp32 (round to nearest even, as torch's .to()).
DK_HD float to_float(float x) { return x; }
DK_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
DK_HD float to_float(__half x) { return __half2float(x); }
template <typename T> DK_HD T from_float(float x);
template <> DK_HD float from_float<float>(float x) { return x; }
template <> DK_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> DK_HD __half from_float<__half>(float x) { return __float2half_rn(x); }
template <typename T> DK_HD float round_to(float x) { return to_float(from_float<T>(x)); }

// Momentum, with keep = 1 - momentum:  buf' = keep * buf + momentum * g.
DK_HD float momentum_dir(float buf, float g, float keep, float momentum) { return buf * keep + g * momentum; }

// sign(d), NaN kept (the contract's sign; torch.sign, on the CPU, maps NaN to 0).
DK_HD float sign_dir(float d) { return d > 0.f ? 1.f : (d < 0.f ? -1.f : d); }

// The fused update's kinds of LMO (api.h: Kind; disco_kernels/lmo.py declares each norm's kind, line dim and
// per-tensor factor alpha, so no norm is restated here):
//   sign:   u = sign(d) * alpha          scaled: u = d * alpha
//   line:   u = d / (||line(d)||_2 * alpha + eps), lines along dim -1 (rows) or -2 (columns)

// Direction of an element-wise kind (its alpha is folded into the step): sign(d) or d itself.
DK_HD float elem_dir(float d, bool sign) { return sign ? sign_dir(d) : d; }

// The per-launch scalars of a step, from lr, momentum and scale: keep = 1 - momentum; decay = 1 - lr (1 when
// unconstrained); lr_scale = lr * scale; scale_grad: ScionLight's g' = keep g.
struct StepScalars {
  float keep, momentum, decay;
  double lr_scale;
  bool scale_grad;
};
// From `hyper` = {lr, momentum, scale} (fp32; read on the device by the kernel) when it is not null: then
// ScionLight always scales g (also by 1 - 1 = 0, as the torch path does with a tensor momentum); else from the
// plain numbers, where momentum == 1 leaves g as it is (the reference's ScionLight).
DK_HD StepScalars step_scalars(const float* hyper, double lr, double momentum, double scale, bool unconstrained,
                               bool light) {
  if (hyper != nullptr) {
    lr = double(hyper[0]);
    momentum = double(hyper[1]);
    scale = double(hyper[2]);
  }
  return StepScalars{float(1.0 - momentum), float(momentum), unconstrained ? 1.f : float(1.0 - lr), lr * scale,
                     light && (hyper != nullptr || momentum != 1.0)};
}

// Step factor of an element-wise kind: lr * scale * alpha.
DK_HD float elem_step(double lr_scale, double alpha) { return float(lr_scale * alpha); }

// Step factor of a line: lr * scale / (||line|| * alpha + eps). Sums of squares are fp64 throughout: a huge but
// finite d (|d| > 2^64) would overflow an fp32 sum and give a zero step.
DK_HD float norm_step(double sumsq, double alpha, double lr_scale, double eps) {
  return float(lr_scale / (sqrt(sumsq) * alpha + eps));
}

// Weight update:  p' = decay * p - step * dir,  decay = 1 - lr (1 when unconstrained).
DK_HD float apply_update(float p, float decay, float step, float d) { return p * decay - step * d; }

// Power iteration finish: sigma = ||v'|| / ||u||, 0 when v' = 0 (then v is kept); NaN stays NaN.
DK_HD float pi_sigma(float nu2, float nw2) { return nw2 != 0.f ? sqrtf(nw2) / sqrtf(nu2) : 0.f; }
DK_HD float pi_next_v(float w, float v, float nw2) { return nw2 != 0.f ? w / sqrtf(nw2) : v; }

// Newton-Schulz: X0 = G / (mult ||G||_F + eps);  B = b A + c (A A);  X' = a X + 1 (B X).
DK_HD float ns_denom(double sumsq, float mult, float eps) { return float(double(mult) * sqrt(sumsq) + double(eps)); }
DK_HD float ns_poly(float beta, float x, float alpha, float acc) { return beta * x + alpha * acc; }

}  // namespace dk
