// THE per-element AdamW update of fused_adamw. Every other copy mirrors this file:
//   - kernels/adamw_kernel.cu includes it (CUDA),
//   - csrc/cpu_adamw.cpp includes it (the CPU loop CI uses to check this exact arithmetic),
//   - python/fused_adamw/backends/triton_adamw.py mirrors it line for line,
//   - python/fused_adamw/reference.py mirrors it with whole-tensor torch operations.
// tests/test_math.py holds every copy to each other and to torch.optim.AdamW.
//
// The order of operations is torch's fused CUDA Adam/AdamW (aten/src/ATen/native/cuda/
// fused_adam_utils.cuh after pytorch PRs #172505 and #173224): hyperparameters in float,
// per-tensor bias corrections from the float step count, maximize, then the weight decay
// (ADAMW mode: decoupled decay of the param; ORIGINAL mode: L2, added to the gradient),
// fma-form moments, sqrt(v) / sqrt(bc2) + eps, then the addcdiv.
//
// Three forms of weight decay, per param group (hparams columns kHpDecayMode, kHpMaxLr):
//   - AdamW, torch's:  p *= 1 - lr * wd                 (decay = lr * wd, rounded in float)
//   - AdamW, paper's:  p *= 1 - wd * lr / max_lr        (decouple_lr: decay = (lr/max_lr) * wd;
//                      lr / max_lr is the schedule multiplier eta_t of Loshchilov & Hutter)
//   - Adam + L2:       g += wd * p  (after maximize; no decoupled decay)
//
// NOTE on explicit fmaf: nvcc contracts `p - (lr*wd)*p` (and `g + p*wd`) into an fma by default (--fmad=true)
// while gcc on x86-64 without -mfma cannot. Writing the fma out makes the CUDA kernel and the
// CPU loop agree bit for bit instead of "usually".
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FUSED_ADAMW_HD __host__ __device__ __forceinline__
#else
#define FUSED_ADAMW_HD inline
#endif

namespace fused_adamw {

// What one param needs for its update in this step: its group's hyperparameters (as float,
// like torch's fused kernel) and its own bias corrections (each param has its own step).
struct AdamWScalars {
  float lr;
  float beta1;
  float beta2;
  float eps;
  float weight_decay;
  float decay;                  // L2: weight_decay; else the decoupled factor, p -= decay * p
  float bias_correction1;       // 1 - beta1^step
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  bool maximize;
  bool amsgrad;
  bool l2;                      // Adam's L2: g += weight_decay * p (weight_decay != 0 only)
  float clip_coef;              // issue #19: the loops multiply the unscaled grad by it
                                // (adamw_clip); 1.0f unless the table is clipped
};

// max_lr: 0 for torch's decay (lr * wd), else the group's max_lr (decouple_lr: the decay is
// wd * lr / max_lr). l2: the group's weight decay is Adam's L2 (decoupled_weight_decay=False).
// NOTE on rounding: the default path is lr * weight_decay, rounded once in float, exactly as
// before the other forms existed (bit-exact tests hold). The paper's form divides first:
// lr / max_lr is exactly 1 at the peak of the schedule, so the decay is then exactly wd.
FUSED_ADAMW_HD AdamWScalars adamw_scalars(float lr, float beta1, float beta2, float eps,
                                          float weight_decay, float max_lr, float step,
                                          bool maximize, bool amsgrad, bool l2) {
  AdamWScalars s;
  s.lr = lr;
  s.beta1 = beta1;
  s.beta2 = beta2;
  s.eps = eps;
  s.weight_decay = weight_decay;
  s.decay = l2 ? weight_decay
               : (max_lr != 0.0f ? (lr / max_lr) * weight_decay : lr * weight_decay);
  s.bias_correction1 = 1.0f - powf(beta1, step);
  s.bias_correction2_sqrt = sqrtf(1.0f - powf(beta2, step));
  s.maximize = maximize;
  s.amsgrad = amsgrad;
  s.l2 = l2 && weight_decay != 0.0f;  // torch adds wd * p only when wd != 0 (0 * inf = NaN)
  s.clip_coef = 1.0f;  // tile_work_in_row sets the table's coefficient
  return s;
}

// torch.amp.GradScaler's sync-free path (kernels/adamw_params.h, grad_scale / found_inf).
// A step whose found_inf is non-zero changes nothing. NOTE on != 0: torch's fused kernels
// test == 1, so infs found on two devices (found_inf = 2) step there; here they skip.
FUSED_ADAMW_HD bool adamw_step_skipped(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

// The grad the update reads, and writes back to the grad tensor, under a GradScaler: divided
// by the scale in float, as torch's fused kernels (grad /= *grad_scale_ptr), before maximize.
FUSED_ADAMW_HD float adamw_unscale(float grad, float grad_scale) { return grad / grad_scale; }

// Gradient clipping (issue #19): the grad the update reads is the unscaled grad times the clip
// coefficient clamp(max_norm / (total_norm + 1e-6), 1), computed on the device from the norm
// pass (python/fused_adamw/_clip.py). torch's clip_grad_norm_ multiplies the grad in place by
// the same float; the grad tensor itself is not written (p.grad stays unclipped). Without
// clipping the coefficient is 1.0f, for which this is the identity (NaN and -0 included).
FUSED_ADAMW_HD float adamw_clip(float grad, float coef) { return grad * coef; }

// The norms' summation order (issue #19), the same on every backend that claims bit-exactness
// with the CPU loop (the CUDA kernel, under its emulation): within tile j of a row, position
// u (adamw_params.h) belongs to lane ((u - j * kTileElems) / N) % kNormLanes, N the elements
// of a 16-byte vector of the params' dtype (4 or 8); each lane accumulates its elements in
// increasing u in float (the CUDA kernel's thread t walks lane t), then the tile's partial
// is the pairwise tree over lanes (adamw_norm_tree); rows and the total sum tiles in double,
// in order. The inf norm takes the max instead, NaN-sticky (adamw_norm_max), order-free.
constexpr int kNormLanes = 256;

// max(acc, x) for |g| >= 0 that keeps a NaN once seen (torch's inf norm is NaN then).
FUSED_ADAMW_HD float adamw_norm_max(float acc, float x) {
  return (x > acc || x != x) && acc == acc ? x : acc;
}

// lanes[0] = the pairwise sum (or NaN-sticky max) of lanes[0..kNormLanes), in place.
FUSED_ADAMW_HD float adamw_norm_tree(float* lanes, bool inf) {
  for (int s = kNormLanes / 2; s > 0; s /= 2) {
    for (int l = 0; l < s; ++l) {
      lanes[l] = inf ? adamw_norm_max(lanes[l], lanes[l + s]) : lanes[l] + lanes[l + s];
    }
  }
  return lanes[0];
}

// One element, in float whatever the storage dtype. max_exp_avg_sq is read and written only
// when s.amsgrad.
FUSED_ADAMW_HD void adamw_update(float& param, float grad, float& exp_avg, float& exp_avg_sq,
                                 float& max_exp_avg_sq, const AdamWScalars& s) {
  if (s.maximize) {
    grad = -grad;
  }
  // Adam's L2: torch's fused CUDA Adam writes grad += param * weight_decay, contracted to an
  // fma by nvcc (decay is weight_decay here). NOTE on the select: written as an if/else-if,
  // the third uniform branch of the element (with maximize and the decay test) ran ptxas out
  // of predicate registers in the fp32 kernel on sm_86/sm_89 (8 bytes of stack); the select
  // keeps the fma's result only for L2 rows, so other rows are unchanged for any param.
  grad = s.l2 ? fmaf(param, s.decay, grad) : grad;
  if (!s.l2 && s.weight_decay != 0.0f) {
    param = fmaf(-s.decay, param, param);  // p - decay*p (decay: lr*wd, or wd*lr/max_lr)
  }
  exp_avg = fmaf(s.beta1, exp_avg, fmaf(-s.beta1, grad, grad));  // b1*m + (1-b1)*g
  const float grad_sq = grad * grad;
  exp_avg_sq = fmaf(s.beta2, exp_avg_sq, fmaf(-s.beta2, grad_sq, grad_sq));
  float second_moment = exp_avg_sq;
  if (s.amsgrad) {
    // std::max's order, as torch: a NaN already in max_exp_avg_sq stays there.
    max_exp_avg_sq = (max_exp_avg_sq < exp_avg_sq) ? exp_avg_sq : max_exp_avg_sq;
    second_moment = max_exp_avg_sq;
  }
  const float denom = sqrtf(second_moment) / s.bias_correction2_sqrt + s.eps;
  param = param - ((s.lr / s.bias_correction1) * exp_avg) / denom;
}

// ------------------------------------------------------------------------------------------
// Low-precision params (issue #13): how a bfloat16/float16 param steps
// ------------------------------------------------------------------------------------------
//
// adamw_update above runs unchanged in every mode, in float; a mode only says which float it
// starts from and how the result is stored (hparams column kHpMasterMode, per param group;
// float32 params ignore it). Per element, with P the 16-bit param, E its row's extra buffer:
//
//   kMasterNone        p = P;  update(p);  P = rn(p)                        (torch's)
//   kMasterFp32        p = E (float), or P when rn(E) != P (the user wrote P: the param wins);
//                      update(p);  E = p;  P = rn(p)
//   kMasterRemainder   p = remainder_join(P, E);  update(p);  (P, E) = remainder_split(p)
//                      (bfloat16 only: E int16, P and E are exactly the fp32 master's bits)
//   kMasterKahan       p0 = P;  p = p0;  update(p);  s = kahan_sum(p0, p, E, y);  P = rn(s);
//                      E = rn16(kahan_residual(y, p0, P))      (E of the param's dtype)
//   kMasterStochastic  p = P;  update(p);  P = round_*_stochastic(p, sr_bits(key, i)), with
//                      key = sr_key(seed, step) per param and i the element's index
//
// The stochastic-rounding bits come from a counter-based generator: a pure function of the
// param's seed (its state's "sr_seed"), its step count after this step's increment and the
// element's index in the param's storage order. So every backend draws the same bits, and a
// resumed run (seed and step are in state_dict()) continues bit for bit.
constexpr int kMasterNone = 0;
constexpr int kMasterFp32 = 1;
constexpr int kMasterRemainder = 2;
constexpr int kMasterKahan = 3;
constexpr int kMasterStochastic = 4;

FUSED_ADAMW_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

FUSED_ADAMW_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// A 32-bit integer hash (lowbias32's shape; both multipliers < 2^31, so that the torch mirror
// computes it exactly in int64).
FUSED_ADAMW_HD uint32_t sr_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x5bd1e995u;
  x ^= x >> 16;
  return x;
}

// Per param and step: its seed (63 bits) and its step count (an integer below 2^24 as float).
FUSED_ADAMW_HD uint32_t sr_key(int64_t seed, float step) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return sr_mix(static_cast<uint32_t>(s) ^
                sr_mix(static_cast<uint32_t>(s >> 32) ^ sr_mix(static_cast<uint32_t>(step))));
}

// Per element: 32 random bits for element i (its index in the param's storage order).
FUSED_ADAMW_HD uint32_t sr_bits(uint32_t key, int64_t i) {
  const uint64_t u = static_cast<uint64_t>(i);
  return sr_mix(sr_mix(key ^ static_cast<uint32_t>(u)) ^ static_cast<uint32_t>(u >> 32));
}

// x rounded to one of its two bfloat16 neighbours, up (in magnitude) with probability equal to
// the dropped fraction: the low 16 bits of r added to the dropped 16 bits carry into the kept
// ones exactly that often. Returns a float that is exactly a bfloat16 (NaN and inf as they are).
// NOTE on overflow (both stochastic roundings): rounding up from just below the format's
// largest finite value gives inf; where rounding to nearest would not overflow (|x| below
// the midpoint to the next power of two), the result saturates at the largest finite value
// instead: a finite update never makes a param inf.
FUSED_ADAMW_HD float round_bf16_stochastic(float x, uint32_t r) {
  const uint32_t b = f32_bits(x);
  if ((b & 0x7f800000u) == 0x7f800000u) return x;
  const uint32_t y = (b + (r & 0xffffu)) & 0xffff0000u;
  const bool over = (y & 0x7f800000u) == 0x7f800000u && (b & 0x7fffffffu) < 0x7f7f8000u;
  return bits_f32(over ? ((b & 0x80000000u) | 0x7f7f0000u) : y);  // NOTE on overflow
}

// The same for float16 (10 mantissa bits, normal from 2^-14): x / ulp is split into its floor
// and fraction (both exact: scaling by a power of two), and the floor is raised by one ulp
// when 24 random bits (r's high ones) fall below the fraction. Exactly a float16, or a value
// beyond 65504 that the float16 store makes inf (as rounding to nearest does).
FUSED_ADAMW_HD float round_f16_stochastic(float x, uint32_t r) {
  const uint32_t e = (f32_bits(x) >> 23) & 0xffu;  // biased exponent
  if (e == 0xffu) return x;
  const uint32_t ee = e > 113u ? e : 113u;         // 113: 2^-14, float16's smallest normal
  const float inv_ulp = bits_f32((264u - ee) << 23);  // 2^(137 - ee)
  const float ulp = bits_f32((ee - 10u) << 23);       // 2^(ee - 137)
  const float q = x * inv_ulp;
  const float fl = floorf(q);
  const float u = static_cast<float>(r >> 8) * 0x1p-24f;
  const float y = (fl + (u < q - fl ? 1.0f : 0.0f)) * ulp;
  const bool over = fabsf(y) > 65504.0f && fabsf(x) < 65520.0f;  // NOTE on overflow
  return over ? (x < 0.0f ? -65504.0f : 65504.0f) : y;
}

// "remainder" (bfloat16 params, TransformerEngine's store_param_remainders): the fp32 master's
// high 16 bits rounded to nearest (halfway: away from zero) are the param, its low 16 bits,
// as int16, the remainder. remainder_join(remainder_split(m)) == m for every non-NaN m: the
// master trajectory is the "fp32" mode's, bit for bit. A param of +-0 with a negative
// remainder (a user's zero written over a rounded-up param: never produced by the split)
// joins as +-0 plus the remainder's bits, not as NaN.
FUSED_ADAMW_HD float remainder_join(uint16_t p, int16_t rem) {
  const uint32_t hi = static_cast<uint32_t>(p) - ((rem < 0 && (p & 0x7fffu) != 0) ? 1u : 0u);
  return bits_f32(((hi & 0xffffu) << 16) | static_cast<uint16_t>(rem));
}

FUSED_ADAMW_HD void remainder_split(float m, uint16_t& p, int16_t& rem) {
  const uint32_t b = f32_bits(m);
  rem = static_cast<int16_t>(static_cast<uint16_t>(b & 0xffffu));
  p = static_cast<uint16_t>((b >> 16) + (rem < 0 ? 1u : 0u));
}

// "kahan": the step's update p1 - p0 (both float: p0 the stored param, p1 adamw_update's
// result) plus the compensation c, added to p0. The caller rounds the sum to the param's
// dtype (ps) and stores kahan_residual(y, p0, ps), rounded to the same dtype, as the new c.
FUSED_ADAMW_HD float kahan_sum(float p0, float p1, float c, float& y) {
  y = (p1 - p0) + c;
  return p0 + y;
}

FUSED_ADAMW_HD float kahan_residual(float y, float p0, float ps) { return y - (ps - p0); }

}  // namespace fused_adamw
