"""The checks torch.optim.Adam makes when it is built or given a group, with its messages, and
ours on the params of a new group (each names the group and the param)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._table import is_dtensor, local, storage_dtype


def is_plain(t) -> bool:
    return type(t) is Tensor or issubclass(type(t), torch.nn.Parameter) or is_dtensor(t)


def lr_snapshot(lr) -> float:
    """A group's max_lr default: its lr now, as a float (never the Tensor itself)."""
    return float(lr.detach().reshape(())) if isinstance(lr, Tensor) else float(lr)


def check_new_params(tensors: list, index: int) -> None:
    """The params of a group being added (group ``index``): floating-point or complex plain
    tensors, Parameters or DTensors."""
    # A param given twice in a group: torch warns (its own check, below) and updates it
    # twice per step; one fused step cannot, so step() refuses it, naming both positions.
    for j, p in enumerate(tensors):
        if not isinstance(p, Tensor):
            continue  # torch's own check names the type
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(
                f"FusedAdamW optimizes floating-point and complex tensors; param {j} of "
                f"param group {index} has dtype {p.dtype}"
            )
        if not is_plain(p):
            raise NotImplementedError(
                f"param {j} of param group {index} is a {type(p).__name__}; FusedAdamW "
                "steps plain tensors, Parameters and DTensors (FSDP2) only"
            )


def check_constructor(lr, betas, eps, weight_decay, foreach, capturable, fused,
                      differentiable) -> tuple:
    """torch.optim.Adam's constructor checks, with its messages; returns the betas (Tensors
    squeezed to 0-d)."""
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")  # torch's message
    check_hyperparameters(lr, betas, eps, weight_decay)
    # torch.optim.Adam's constructor-only checks, with its messages: foreach=True is
    # ignored here (every step is fused) but refused with Tensor hyperparameters as torch
    # refuses it, and betas are both floats or both Tensors (squeezed to 0-d).
    if foreach and not capturable:
        if isinstance(lr, Tensor):
            raise ValueError(
                "lr as a Tensor is not supported for capturable=False and foreach=True")
        for i, b in enumerate(betas):
            if isinstance(b, Tensor):
                raise ValueError(f"betas[{i}] as a Tensor is not supported for "
                                 "capturable=False and foreach=True")
    if not (all(isinstance(b, float) for b in betas)
            or all(isinstance(b, Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    betas = tuple(b.squeeze() if isinstance(b, Tensor) and b.dim() != 0 else b
                  for b in betas)
    return betas


def check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """torch.optim.Adam's checks and messages."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    for name, value in (("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, Tensor) and value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, b in enumerate(betas):
        if isinstance(b, Tensor) and b.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")


def check_backends(tensors: list, group: dict, backend_request: str) -> None:
    """Each param of a new group has a backend that can run it (BackendUnavailableError,
    saying why, for a named backend that cannot)."""
    from ._dispatch import choose
    from ._lowp import lowp_of

    for p in tensors:
        if isinstance(p, Tensor):
            dtype = storage_dtype(p)
            choose(backend_request, local(p).device, dtype, *lowp_of(group, dtype))
