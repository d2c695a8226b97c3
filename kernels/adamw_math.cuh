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

}  // namespace fused_adamw
