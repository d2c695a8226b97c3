"""torch.compile support: the step as one torch operator, ``fused_adamw::step``.

Under ``torch.compile`` (torch >= 2.4, where ``torch.library.custom_op`` exists),
``FusedAdam.step`` does only this in traced code: runs the closure (grad enabled, as torch's
optimizers), lists the params that have a grad and their grads, and calls the operator. Dynamo
puts the call in the graph as one node that mutates those params and grads; nothing of the
optimizer's Python (its tables, identity and address checks, hyperparameter rows) is traced.
The operator's implementation looks the optimizer up by a key and runs its eager step, which
reads ``lr`` and every other hyperparameter from the param groups when it runs: a float lr that
a scheduler changes outside the compiled function is not a constant of the graph, so it causes
no recompile.

NOTE on clones: AOTAutograd functionalizes an operator that mutates its inputs
(``auto_functionalized``). Where a backend does not re-inplace it (aot_eager does not; inductor
usually does), the implementation is handed *copies* of the params and grads, holding their
current values in the graph, and the graph copies the params back afterwards. The eager step
updates the optimizer's own tensors, so for each argument that is not the memory of its param
(or grad) the implementation: points the param's ``.grad`` at the grad argument for the step,
copies the param argument into the param before the step (a param changed earlier in the same
graph, not yet written back), and copies the updated param into the argument after it (what the
graph writes back, and what later reads in the graph see).

NOTE on state: ``optimizer.state`` tensors are not arguments of the operator. Reading them in
the same compiled region after ``step()`` is not ordered after the update; read them outside it.

On older torch (no ``custom_op``), :func:`tracing` is always False and ``step()`` keeps its
graph break (``optimizer._no_dynamo``).
"""

# No ``from __future__ import annotations``: custom_op reads the operator's schema from the
# annotations of step_op, and torch 2.4 takes them as types, not strings.
import itertools
import weakref
from typing import Optional

import torch
from torch import Tensor

AVAILABLE = hasattr(torch.library, "custom_op") and hasattr(torch, "compiler") and hasattr(
    torch.compiler, "is_compiling")

_registry: "weakref.WeakValueDictionary[int, torch.optim.Optimizer]" = (
    weakref.WeakValueDictionary())
_keys = itertools.count(1)


def register(opt) -> int:
    """The key the operator finds ``opt`` by: kept through load_state_dict (a new key would
    recompile the step), a new one for a copy or an unpickled optimizer (__getstate__ drops
    it: a key is never shared)."""
    key = opt.__dict__.get("_compile_key")
    if key is not None and _registry.get(key) is opt:
        return key
    key = next(_keys)
    _registry[key] = opt
    return key


def tracing() -> bool:
    """Whether step() runs under Dynamo and should call the operator."""
    return AVAILABLE and torch.compiler.is_compiling()


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def _run(params: list[Tensor], grads: list[Tensor], key: int, index: list[int],
         grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    opt = _registry.get(key)
    if opt is None:
        raise RuntimeError("fused_adamw::step: the optimizer of this compiled step no longer "
                           "exists")
    flat = [p for g in opt.param_groups for p in g["params"]]
    # Dynamo's guards on the param groups make this hold; checked, as a wrong pairing would
    # step one param with another's grad.
    if len(flat) <= max(index) or any(flat[i].shape != pa.shape for i, pa in zip(index, params)):
        raise RuntimeError("fused_adamw::step: the optimizer's params are not the ones this "
                           "step was compiled for")
    real = [flat[i] for i in index]
    swapped = []  # (param, its grad before the step)
    copied = []  # (argument, param): params stepped on their own memory, copied back after
    with torch.no_grad():
        for p, pa, ga in zip(real, params, grads):
            g = p.grad
            if g is None or not _same_memory(g, ga):
                swapped.append((p, g))
                p.grad = ga
            if not _same_memory(p, pa):
                p.copy_(pa)
                copied.append((pa, p))
        saved = {}
        for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf)):
            if value is not None and getattr(opt, name, None) is not value:
                saved[name] = opt.__dict__.get(name, _MISSING)
                setattr(opt, name, value)
        try:
            opt._step()
        finally:
            for p, g in swapped:
                p.grad = g
            for name, value in saved.items():
                if value is _MISSING:
                    delattr(opt, name)
                else:
                    setattr(opt, name, value)
        for pa, p in copied:
            pa.copy_(p)


_MISSING = object()


def _define(fn):
    # cudagraph_unsafe: the implementation runs Python every call (table checks, hyperparameter
    # uploads); a CUDA graph (mode="reduce-overhead") must not record it once and replay it.
    tag = getattr(getattr(torch, "Tag", None), "cudagraph_unsafe", None)
    kwargs = {"mutates_args": ("params", "grads")}
    if tag is not None:
        kwargs["tags"] = (tag,)
    try:
        return torch.library.custom_op("fused_adamw::step", fn, **kwargs)
    except TypeError:  # a torch whose custom_op takes no tags (and has no such tag)
        del kwargs["tags"]
        return torch.library.custom_op("fused_adamw::step", fn, **kwargs)


if AVAILABLE:
    def step_op(params: list[Tensor], grads: list[Tensor], key: int, index: list[int],
                grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
        """One optimizer step of the registered optimizer ``key``: ``params[i]`` is its
        ``index[i]``-th param (counting over every param group), ``grads[i]`` its grad."""
        _run(params, grads, key, index, grad_scale, found_inf)

    step_op = _define(step_op)

    @step_op.register_fake
    def _(params, grads, key, index, grad_scale=None, found_inf=None) -> None:
        return None


def _is_plain_type(p) -> bool:
    return type(p) is Tensor or issubclass(type(p), torch.nn.Parameter)


def traced_step(opt, closure):
    """``step()`` under Dynamo: the closure, then the operator (see the module docstring)."""
    # NOTE on __dict__: not ``opt.param_groups``. Dynamo's OptimizerVariable intercepts that
    # attribute: it realizes every group entry, which guards each float lr by value (a recompile
    # at the first lr change), marks params static and sets capturable. Through __dict__ only
    # the entries read here ("differentiable", "params", each p.grad) are guarded.
    groups = opt.__dict__["param_groups"]
    for group in groups:
        # Two kinds of optimizer step eagerly, behind a graph break, as before the operator:
        # NOTE on differentiable groups: autograd must record their update, so it cannot be
        # inside the operator; traced, torch's differentiable Adam creates state entries at the
        # first step, which Dynamo writes back into optimizer.state after the graph, over the
        # entries the operator made while the graph ran.
        # NOTE on DTensor (FSDP2) params: a custom operator given DTensors needs a sharding
        # rule, and the step works on local shards anyway. (Params that are neither Tensors
        # nor Parameters are DTensors: add_param_group refuses other subclasses.)
        if group.get("differentiable") or not all(map(_is_plain_type, group["params"])):
            return opt._step(closure)
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    params, grads, index, n = [], [], [], 0
    for group in groups:
        for p in group["params"]:
            if p.grad is not None:
                if p.grad.is_sparse:  # the eager step raises, saying what to use instead
                    return opt._step()
                params.append(p)
                grads.append(p.grad)
                index.append(n)
            n += 1
    if params:
        grad_scale = getattr(opt, "grad_scale", None)
        found_inf = getattr(opt, "found_inf", None)
        with torch.no_grad():
            step_op(params, grads, opt._compile_key, index,
                    grad_scale if isinstance(grad_scale, Tensor) else None,
                    found_inf if isinstance(found_inf, Tensor) else None)
    return loss
