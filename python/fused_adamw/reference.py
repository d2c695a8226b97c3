"""The AdamW update in whole-tensor torch operations: the torch backend and the tests' twin.

Mirrors ``kernels/adamw_math.cuh`` line for line (same names, same order). Every value is a
tensor in the opmath dtype (float32, or float64 for float64 params), scalars included, so the
same code runs on CPU, CUDA and MPS (which has no float64) and reads a Tensor lr on the device.

NOTE on rounding: torch has no elementwise fma, so where the header writes ``fmaf(a, b, c)``
this file writes ``a * b + c`` with two roundings. Params stay within a few ulp of the
kernels'; a moment element can differ by many of its own ulp where its two terms nearly
cancel, but never by more than a few ulp of the buffer's scale (tests/test_triton.py and
tests/test_ext.py measure both).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AdamWScalars(NamedTuple):
    lr: torch.Tensor
    beta1: torch.Tensor
    beta2: torch.Tensor
    eps: torch.Tensor
    weight_decay: torch.Tensor
    bias_correction1: torch.Tensor  # 1 - beta1^step
    bias_correction2_sqrt: torch.Tensor  # sqrt(1 - beta2^step)


def adamw_scalars(lr, beta1, beta2, eps, weight_decay, step) -> AdamWScalars:
    """Mirror of ``adamw_scalars`` in adamw_math.cuh; every argument a 0-d tensor."""
    bias_correction1 = 1 - torch.pow(beta1, step)
    bias_correction2_sqrt = torch.sqrt(1 - torch.pow(beta2, step))
    return AdamWScalars(lr, beta1, beta2, eps, weight_decay, bias_correction1,
                        bias_correction2_sqrt)


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    s: AdamWScalars,
    *,
    maximize: bool,
    amsgrad: bool,
    decay: bool,
) -> None:
    """Mirror of ``adamw_update`` in adamw_math.cuh, in place on opmath-dtype tensors.

    ``decay`` is ``weight_decay != 0`` (known on the host; the header tests it per element).
    ``grad`` is not modified.
    """
    if maximize:
        grad = -grad
    if decay:
        param.sub_(param * (s.lr * s.weight_decay))  # p - (lr*wd)*p
    exp_avg.mul_(s.beta1).add_(grad - s.beta1 * grad)  # b1*m + (1-b1)*g
    grad_sq = grad * grad
    exp_avg_sq.mul_(s.beta2).add_(grad_sq - s.beta2 * grad_sq)
    second_moment = exp_avg_sq
    if amsgrad:
        # std::max's order, as torch: a NaN already in max_exp_avg_sq stays there.
        torch.where(max_exp_avg_sq < exp_avg_sq, exp_avg_sq, max_exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    denom = torch.sqrt(second_moment).div_(s.bias_correction2_sqrt).add_(s.eps)
    param.sub_((s.lr / s.bias_correction1 * exp_avg).div_(denom))


def adamw_reference_fp64(params, grads_per_step, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                         weight_decay=1e-2, amsgrad=False, maximize=False):
    """AdamW in float64 on the CPU, the paper's algorithm in torch's form: the oracle of tests.

    ``params``: list of tensors (copied, not modified). ``grads_per_step``: a list over steps
    of lists of grads (None skips that param in that step, as torch does). Returns the final
    params and states in float64.
    """
    ps = [p.detach().to("cpu", torch.complex128 if p.is_complex() else torch.float64).clone()
          for p in params]
    ps = [torch.view_as_real(p) if p.is_complex() else p for p in ps]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    vmax = [torch.zeros_like(p) for p in ps]
    step = [0] * len(ps)
    b1, b2 = betas
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.detach().to("cpu")
            g = torch.view_as_real(g.to(torch.complex128)) if g.is_complex() else g.double()
            if maximize:
                g = -g
            step[i] += 1
            ps[i].mul_(1 - lr * weight_decay)
            m[i].mul_(b1).add_(g, alpha=1 - b1)
            v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            second = v[i]
            if amsgrad:
                torch.maximum(vmax[i], v[i], out=vmax[i])
                second = vmax[i]
            bc1 = 1 - b1 ** step[i]
            bc2 = 1 - b2 ** step[i]
            denom = second.sqrt() / bc2 ** 0.5 + eps
            ps[i].addcdiv_(m[i], denom, value=-lr / bc1)
    return ps, m, v, vmax, step
