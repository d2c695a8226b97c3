"""Param groups with ``differentiable=True``: stepped by torch's own single-tensor Adam.

Autograd must see their update, which no fused kernel offers; the optimizer checks them with
the other groups before any launch and steps them after the fused launches."""

from __future__ import annotations

import torch

from ._table import describe


def check_form(group: dict, index: int) -> None:
    """decouple_lr has no differentiable form: refused when a group is added (the
    constructor's groups included) and, for edited groups, before any launch."""
    if group.get("differentiable") and group.get("decouple_lr"):
        raise NotImplementedError(
            f"param group {index}: decouple_lr is not available with differentiable=True "
            "(torch's differentiable Adam, which steps such groups, has no such form); use "
            "decouple_lr=False for this group")


def check_groups(groups: list[dict]) -> None:
    """The differentiable groups' input, checked with the others before any launch (so a
    bad grad there changes nothing), each error naming the group or the param."""
    for gi, group in enumerate(groups):
        if not group.get("differentiable"):
            continue
        check_form(group, gi)
        for j, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            name = f"param {j} of param group {gi}"
            if g.is_sparse:
                raise RuntimeError(
                    f"FusedAdamW does not support sparse gradients: "
                    f"{describe(name, p)} has a sparse grad; use "
                    "torch.optim.SparseAdam for sparse params")
            if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                raise RuntimeError(
                    f"{describe(name, p)} on {p.device} has a grad of shape "
                    f"{tuple(g.shape)}, {g.dtype} on {g.device}; they must match")

def step(groups: list[dict], state, grad_mode: bool, grad_scale=None,
         found_inf=None) -> None:
    """Groups with ``differentiable=True``: autograd must see the update, which no fused
    kernel offers, so they are stepped by torch's own single-tensor Adam
    (``torch.optim.adam.adam(differentiable=True)``) with torch's state, on the tensors
    where they live. As torch's ``differentiable`` mode, this is for meta-learning and
    tests, not for speed."""
    from torch.optim.adam import adam as torch_adam

    # torch's single-tensor Adam takes no GradScaler values: unscale here, and skip on an
    # inf (a host read: differentiable=True is torch's slow path anyway).
    if found_inf is not None and bool(found_inf.reshape(()).item() != 0):
        return
    # As torch's _use_grad_for_differentiable: grad mode follows the optimizer-wide
    # default, so a differentiable group in an optimizer built with differentiable=False
    # steps under no_grad (its leaf params can be updated in place), as with torch.
    with torch.set_grad_enabled(grad_mode):
        for gi, group in enumerate(groups):
            if not group.get("differentiable"):
                continue
            lists = ([], [], [], [], [], [])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdamW does not support sparse gradients; "
                                       "use torch.optim.SparseAdam")
                if grad_scale is not None:
                    with torch.no_grad():
                        p.grad.div_(grad_scale.to(p.grad.device))
                st = state[p]
                if len(st) == 0:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)
                if group["amsgrad"] and "max_exp_avg_sq" not in st:
                    st["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)
                for out, value in zip(lists, (p, p.grad, st["exp_avg"], st["exp_avg_sq"],
                                              st.get("max_exp_avg_sq"), st["step"])):
                    if value is not None:
                        out.append(value)
            if not lists[0]:
                continue
            beta1, beta2 = group["betas"]
            torch_adam(*lists, foreach=False, capturable=False, differentiable=True,
                       fused=None, grad_scale=None, found_inf=None,
                       has_complex=any(map(torch.is_complex, lists[0])),
                       decoupled_weight_decay=group["decoupled_weight_decay"],
                       amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                       weight_decay=group["weight_decay"], eps=group["eps"],
                       maximize=group["maximize"])
