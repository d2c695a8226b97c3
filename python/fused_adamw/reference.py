"""The AdamW update in torch operations: the torch backend and the tests' twin.

Mirrors ``kernels/adamw_math.cuh`` line for line (same names, same order) over *lists* of
tensors, one per param (``torch._foreach_*`` ops: one call per line, whatever the number of
params). Every value is in the opmath dtype (float32, or float64 for float64 params), scalars
included (0-d tensors, read on the device), so the same code runs on CPU, CUDA and MPS.

NOTE on rounding: torch has no elementwise fma. Where the header writes
``fmaf(b, x, fmaf(-b, g, g))`` (= ``b*x + (1-b)*g``) this file writes ``x*b + g*(1-b)``:
``1 - b`` is exact in fp32 for b in [0.5, 1], so ``g*(1-b)`` rounds once, like the inner fma,
and the sum rounds once more than the header. (Writing ``g - b*g`` instead cancels: for
b2 = 0.999 it kept ~14 significant bits of the new term and made this backend 10x less
accurate than torch.) Params stay within a few ulp of the kernels'; tests/test_math.py
measures it.

NOTE on amsgrad and NaN: the header keeps the old maximum when the new second moment is NaN
(``max < v ? v : max``); ``torch._foreach_maximum_`` (torch's for-loop uses torch.maximum)
propagates it. They differ only once a NaN grad has already ruined the param.
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
    decay: torch.Tensor  # L2: weight_decay; else the decoupled factor lr*wd or (lr/max_lr)*wd
    bias_correction1: torch.Tensor  # 1 - beta1^step, one entry per param
    bias_correction2_sqrt: torch.Tensor  # sqrt(1 - beta2^step), one entry per param


def adamw_scalars(lr, beta1, beta2, eps, weight_decay, steps, max_lr=None,
                  l2=False) -> AdamWScalars:
    """Mirror of ``adamw_scalars`` in adamw_math.cuh for the params of one group: the
    hyperparameters are 0-d tensors, ``steps`` a 1-d tensor of the params' step counts.
    ``max_lr``: None for torch's decay ``lr * wd``, else decouple_lr's max_lr (a 0-d tensor);
    ``l2``: the group's decay mode (Adam's L2: decay is weight_decay). The header's tests of
    them are known on the host here."""
    if l2:
        decay = weight_decay
    elif max_lr is None:
        decay = lr * weight_decay
    else:
        decay = (lr / max_lr) * weight_decay
    bias_correction1 = 1 - torch.pow(beta1, steps)
    bias_correction2_sqrt = torch.sqrt(1 - torch.pow(beta2, steps))
    return AdamWScalars(lr, beta1, beta2, eps, weight_decay, decay, bias_correction1,
                        bias_correction2_sqrt)


def adamw_update_(
    param: list[torch.Tensor],
    grad: list[torch.Tensor],
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
    max_exp_avg_sq: list[torch.Tensor] | None,
    s: AdamWScalars,
    *,
    maximize: bool,
    amsgrad: bool,
    decay: bool,
    l2: bool = False,
) -> None:
    """Mirror of ``adamw_update`` in adamw_math.cuh, in place on lists of opmath tensors.

    ``decay`` is ``weight_decay != 0`` (known on the host; the header tests it per element);
    ``l2`` is the group's decay mode (Adam's L2), the header's ``s.l2`` being ``l2 and decay``.
    ``grad`` is not modified.
    """
    if maximize:
        grad = torch._foreach_neg(grad)
    if l2 and decay:
        # Adam's L2 (decay is weight_decay): torch's fused CUDA Adam writes grad += param *
        # weight_decay (an fma there; here the product rounds once more, see the NOTE on
        # rounding)
        grad = torch._foreach_add(grad, torch._foreach_mul(param, s.decay))
    elif decay:
        torch._foreach_sub_(param, torch._foreach_mul(param, s.decay))  # p - decay*p
    torch._foreach_mul_(exp_avg, s.beta1)  # b1*m + (1-b1)*g
    torch._foreach_add_(exp_avg, torch._foreach_mul(grad, 1 - s.beta1))
    grad_sq = torch._foreach_mul(grad, grad)
    torch._foreach_mul_(exp_avg_sq, s.beta2)
    torch._foreach_add_(exp_avg_sq, torch._foreach_mul(grad_sq, 1 - s.beta2))
    second_moment = exp_avg_sq
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sq, exp_avg_sq)  # NOTE on amsgrad and NaN
        second_moment = max_exp_avg_sq
    denom = torch._foreach_sqrt(second_moment)
    torch._foreach_div_(denom, list(s.bias_correction2_sqrt.unbind()))
    # NOTE on the list: with a 0-d tensor, _foreach_add_ resolves to its Scalar overload, which
    # reads the tensor on the host (.item(): a sync every step); the List overload does not.
    torch._foreach_add_(denom, [s.eps] * len(denom))
    numer = torch._foreach_mul(exp_avg, list((s.lr / s.bias_correction1).unbind()))
    torch._foreach_div_(numer, denom)
    torch._foreach_sub_(param, numer)


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


# ------------------------------------------------------------------------------------------
# Low-precision params: mirrors of the helpers at the end of adamw_math.cuh, in whole-tensor
# integer and float ops (uint32 arithmetic as int64 masked to 32 bits: every product of the
# hash is below 2^63). Bit-exact with the header: tests/test_lowp.py holds them to each other.
# ------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def sr_mix(x: torch.Tensor) -> torch.Tensor:
    """Mirror of ``sr_mix`` on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def sr_key(seed: int, step: torch.Tensor) -> torch.Tensor:
    """Mirror of ``sr_key``: ``step`` a float tensor (the param's count after the increment)."""
    s = seed & ((1 << 64) - 1)
    st = step.to(torch.int64) & _M32
    return sr_mix((s & _M32) ^ sr_mix(((s >> 32) & _M32) ^ sr_mix(st)))


def sr_bits(key: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Mirror of ``sr_bits``: ``index`` int64, each element's index in storage order."""
    return sr_mix(sr_mix(key ^ (index & _M32)) ^ ((index >> 32) & _M32))


def _u32_to_f32(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u >= 1 << 31, u - (1 << 32), u).to(torch.int32).view(torch.float32)


def _f32_to_u32(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32).to(torch.int64) & _M32


def round_bf16_stochastic(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Mirror of ``round_bf16_stochastic`` (float32 in, float32 out, exactly bfloat16)."""
    b = _f32_to_u32(x)
    y = (b + (r & 0xFFFF)) & 0xFFFF0000
    over = ((y & 0x7F800000) == 0x7F800000) & ((b & 0x7FFFFFFF) < 0x7F7F8000)  # NOTE on overflow
    out = _u32_to_f32(torch.where(over, (b & 0x80000000) | 0x7F7F0000, y)).view(x.shape)
    return torch.where((b & 0x7F800000).view(x.shape) == 0x7F800000, x, out)


def round_f16_stochastic(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Mirror of ``round_f16_stochastic``."""
    e = (_f32_to_u32(x) >> 23) & 0xFF
    ee = torch.clamp(e, min=113)
    inv_ulp = _u32_to_f32((264 - ee) << 23).view(x.shape)
    ulp = _u32_to_f32((ee - 10) << 23).view(x.shape)
    q = x * inv_ulp
    fl = torch.floor(q)
    u = (r >> 8).to(torch.float32) * 2.0 ** -24
    y = (fl + (u < q - fl).to(torch.float32)) * ulp
    over = (y.abs() > 65504.0) & (x.abs() < 65520.0)  # NOTE on overflow
    out = torch.where(over, torch.where(x < 0, -65504.0, 65504.0), y)
    return torch.where(e.view(x.shape) == 0xFF, x, out)


def remainder_join(p: torch.Tensor, rem: torch.Tensor) -> torch.Tensor:
    """Mirror of ``remainder_join``: a bfloat16 param and its int16 remainder -> the float32
    master."""
    pu = p.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    r = rem.to(torch.int64)
    hi = (pu - ((r < 0) & ((pu & 0x7FFF) != 0)).to(torch.int64)) & 0xFFFF
    return _u32_to_f32((hi << 16) | (r & 0xFFFF)).view(p.shape)


def remainder_split(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror of ``remainder_split``: the float32 master -> (bfloat16 param, int16 remainder)."""
    b = _f32_to_u32(m)
    low = b & 0xFFFF
    rem = torch.where(low >= 0x8000, low - 0x10000, low)
    hi = ((b >> 16) + (rem < 0).to(torch.int64)) & 0xFFFF
    p = torch.where(hi >= 0x8000, hi - 0x10000, hi).to(torch.int16).view(torch.bfloat16)
    return p.view(m.shape), rem.to(torch.int16).view(m.shape)


def kahan_sum(p0: torch.Tensor, p1: torch.Tensor, c: torch.Tensor):
    """Mirror of ``kahan_sum``: returns (s, y)."""
    y = (p1 - p0) + c
    return p0 + y, y


def kahan_residual(y: torch.Tensor, p0: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """Mirror of ``kahan_residual``."""
    return y - (ps - p0)
