"""FusedAdamW: torch.optim.AdamW's signature, state and state_dict over flat buffers."""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import _dispatch, _flat

_grad_of = operator.attrgetter("grad")
_data_ptr = Tensor.data_ptr


class _ParamState(dict):
    """``optimizer.state[p]``: a dict that tells its optimizer when an entry is replaced.

    In-place changes to the state tensors need no telling (they are views into the flat
    buffers); assigning a new tensor does: the next step() copies it into the buffers.
    """

    __slots__ = ("_owner",)

    def __init__(self, owner: _Owner | None = None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._owner = owner

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if self._owner is not None:
            self._owner.dirty = True

    def __delitem__(self, key):
        super().__delitem__(key)
        if self._owner is not None:
            self._owner.dirty = True

    def __reduce__(self):  # pickles as a plain dict: checkpoints never need fused_adamw
        return (dict, (dict(self),))


class _Owner:
    """What the state dicts flag; a separate object so that pickling state needs no optimizer."""

    __slots__ = ("dirty",)

    def __init__(self):
        self.dirty = True


class _State(defaultdict):
    """``optimizer.state``: reading a param with no state creates an empty entry quietly;
    assigning an entry flags the layout for a resync at the next step."""

    def __init__(self, owner: _Owner, *args):
        super().__init__(None, *args)
        self._owner = owner

    def __missing__(self, key):
        value = _ParamState(self._owner)
        dict.__setitem__(self, key, value)
        return value

    def __setitem__(self, key, value):
        if not isinstance(value, _ParamState):
            value = _ParamState(self._owner, value)
        super().__setitem__(key, value)
        self._owner.dirty = True

    def __delitem__(self, key):
        super().__delitem__(key)
        self._owner.dirty = True

    def __reduce__(self):
        return (_plain_state, (dict(self),))


def _plain_state(d):
    return defaultdict(dict, {k: dict(v) for k, v in d.items()})


class FusedAdamW(torch.optim.Optimizer):
    r"""AdamW whose step is one fused pass per flat buffer: a drop-in ``torch.optim.AdamW``.

    Same signature, defaults, param groups, ``state[p]`` keys and ``state_dict`` schema as
    ``torch.optim.AdamW``; the per-element arithmetic is torch's fused CUDA AdamW's
    (``kernels/adamw_math.cuh``).

    On the first ``step()`` every param's data moves into one contiguous buffer per
    (device, dtype) and ``param.data`` becomes a view into it; ``state[p]`` holds views into
    the matching state buffers. A step is then one kernel launch per buffer.

    Args:
        params: params or param groups, as for any torch optimizer.
        lr: learning rate; a float or a 0-d Tensor (read on the device each step).
            Default: 1e-3.
        betas: coefficients of the running averages of the gradient and its square.
            Default: (0.9, 0.999).
        eps: added to the denominator. Default: 1e-8.
        weight_decay: decoupled weight decay; the step multiplies params by
            ``1 - lr * weight_decay``. Default: 1e-2.
        amsgrad: use the maximum of past squared-gradient averages. Default: False.
        maximize: maximize the objective instead of minimizing it. Default: False.
        foreach: accepted for compatibility and ignored: every step is fused. Default: None.
        capturable: accepted for compatibility. Step counts always live on the param's
            device and the cuda and triton backends never synchronize with the host in
            ``step()``; CUDA-graph capture of ``step()`` is not supported yet.
            Default: False.
        differentiable: must be False: a fused step cannot be differentiated through.
        fused: accepted for compatibility and ignored: every step is fused. Default: None.
        backend: ``"auto"`` (default) picks, per device and dtype, the first of cuda,
            triton, cpu and torch that can run, quietly; a named backend that cannot run
            raises :class:`~fused_adamw.BackendUnavailableError` saying why.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
    ) -> None:
        if differentiable:
            raise NotImplementedError(
                "FusedAdamW does not support differentiable=True: its step is a fused kernel "
                "that autograd cannot differentiate through; use torch.optim.AdamW"
            )
        _check_hyperparameters(lr, betas, eps, weight_decay)
        self._owner = _Owner()
        self._backend_request = _dispatch.check_name(backend)
        self._buckets: list[_flat.FlatBucket] | None = None
        self._hparams: dict = {}
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
        )
        super().__init__(params, defaults)  # add_param_group checks each group's backend
        self.state = _State(self._owner)

    # ------------------------------------------------------------------ torch plumbing

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_backend_request"] = self._backend_request
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_backend_request", "auto")
        self._owner = _Owner()
        self._buckets = None
        self._hparams = {}
        self.state = _State(self._owner, {k: _ParamState(self._owner, v)
                                          for k, v in self.state.items()})
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", True)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch raises its own error for sets
            params = list(params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        index = len(self.param_groups)
        seen = set()
        for j, p in enumerate(tensors):
            if not isinstance(p, Tensor):
                continue  # torch's own check names the type
            if not (p.is_floating_point() or p.is_complex()):
                raise TypeError(
                    f"FusedAdamW optimizes floating-point and complex tensors; param {j} of "
                    f"param group {index} has dtype {p.dtype}"
                )
            if not (type(p) is Tensor or issubclass(type(p), torch.nn.Parameter)):
                raise NotImplementedError(
                    f"param {j} of param group {index} is a {type(p).__name__}; FusedAdamW "
                    "flattens plain tensors only (DTensor / FSDP2 support is planned)"
                )
            if id(p) in seen:
                raise ValueError(
                    f"param {j} of param group {index} (shape {tuple(p.shape)}) appears in "
                    "the group more than once; give each param once"
                )
            seen.add(id(p))
        _check_hyperparameters(
            param_group.get("lr", self.defaults["lr"]),
            param_group.get("betas", self.defaults["betas"]),
            param_group.get("eps", self.defaults["eps"]),
            param_group.get("weight_decay", self.defaults["weight_decay"]),
        )
        super().add_param_group({**param_group, "params": params})
        owner = getattr(self, "_owner", None)
        if owner is not None:
            owner.dirty = True
            new = [(p.device, _flat.storage_dtype(p)) for p in self.param_groups[-1]["params"]]
            for key in set(new):
                _dispatch.choose(self._backend_request, *key)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # goes through __setstate__: layout rebuilt
        self._owner.dirty = True

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        return sd

    @property
    def backend(self) -> str:
        """The backend that runs (several joined by '+' when buckets differ)."""
        if self._buckets is not None and not self._owner.dirty:
            names = {b.backend.name for b in self._buckets}
        else:
            keys = {(p.device, _flat.storage_dtype(p)) for p in self._all_params()}
            names = {_dispatch.choose(self._backend_request, *k).name for k in keys}
        return "+".join(sorted(names)) if names else "none"

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ layout

    def _layout_is_stale(self, rows: list[list[float]] | None = None) -> bool:
        """Whether the buffers must be rebuilt before the next step; ``rows`` (this step's
        hyperparameter rows) also catch a group that switched amsgrad on."""
        if self._buckets is None or self._owner.dirty:
            return True
        # A param whose storage was replaced (model.to(...), p.data = ...) moved out of its
        # buffer: one C-level pass over the params, no device access.
        if any(list(map(_data_ptr, b.params)) != b.data_ptrs for b in self._buckets):
            return True
        return rows is not None and any(
            b.max_exp_avg_sq is None and any(rows[g][_flat.HP_AMSGRAD] for g in b.group_set)
            for b in self._buckets
        )

    @torch.no_grad()
    def _rebuild(self) -> None:
        """Moves every param and its state into fresh flat buffers, one per (device, dtype)."""
        # NOTE on complex params: they get buckets of their own although they are stored as
        # real pairs, because torch.save refuses views of one storage with different dtypes
        # (complex exp_avg views beside float ones would make state_dict() unsaveable).
        by_key: dict = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                by_key.setdefault((p.device, p.dtype), []).append((p, gi))
        buckets = []
        for (device, dtype), members in by_key.items():
            key = (device, _flat.storage_dtype(torch.empty((), dtype=dtype)))
            params = [p for p, _ in members]
            groups = [gi for _, gi in members]
            states = [dict(self.state[p]) if p in self.state else {} for p in params]
            amsgrad = any(self.param_groups[gi]["amsgrad"] for gi in set(groups))
            bucket = _flat.build_bucket(params, groups, states, amsgrad)
            bucket.backend = _dispatch.choose(self._backend_request, *key)
            bucket.stated = [bool(st) for st in states]
            for i, p in enumerate(params):
                if bucket.stated[i]:
                    dict.__setitem__(self.state, p, _ParamState(self._owner,
                                                                bucket.state_views(i)))
            buckets.append(bucket)
        self._buckets = buckets
        self._hparams = {}
        self._owner.dirty = False

    def _refresh_hparams(self, rows: list[list[float]]) -> None:
        """Uploads this step's hyperparameter rows: one small copy per device, skipped when
        nothing changed, and a device-side copy for each Tensor hyperparameter."""
        tensors = [
            (gi, col, value)
            for gi, g in enumerate(self.param_groups)
            for col, value in ((_flat.HP_LR, g["lr"]), (_flat.HP_BETA1, g["betas"][0]),
                               (_flat.HP_BETA2, g["betas"][1]))
            if isinstance(value, Tensor)
        ]
        for b in self._buckets:
            key = (b.device, _flat.opmath_dtype(b.dtype))
            cached = self._hparams.get(key)
            if cached is None or cached[0] != rows or tensors:
                host = torch.tensor(rows, dtype=key[1])
                if b.device.type == "cuda":
                    host = host.pin_memory()
                if cached is None:
                    table = host.to(b.device, non_blocking=True)
                else:
                    table = cached[1]
                    table.copy_(host, non_blocking=True)
                for gi, col, value in tensors:
                    table[gi, col].copy_(value, non_blocking=True)
                self._hparams[key] = cached = (rows, table)
            b.hparams = cached[1]
            b.host_hparams = rows

    # ------------------------------------------------------------------ step

    @staticmethod
    def _grads(b: _flat.FlatBucket) -> tuple[list, bool]:
        """The params' grads, and whether every one is still its view into b.grad."""
        grads = list(map(_grad_of, b.params))
        return grads, bool(b.grad_views) and all(map(operator.is_, grads, b.grad_views))

    def _gather_grads(self, b: _flat.FlatBucket) -> bool:
        """Prepares b.grad, b.active and b.steps for this step; False when no param has a grad."""
        grads, views = self._grads(b)
        if views:
            active = None  # fast path: backward accumulated straight into our buffer
        else:
            b.ensure_grad()
            active, dst, src = [], [], []
            for g, view in zip(grads, b.grad_views):
                if g is None:
                    active.append(False)
                    continue
                if g.is_sparse:
                    raise RuntimeError("FusedAdamW does not support sparse gradients")
                active.append(True)
                if g is not view:
                    dst.append(view)
                    src.append(g)
            if src:  # grads that live elsewhere: one multi-tensor copy into our buffer
                torch._foreach_copy_(dst, src)
            if all(active):
                active = None
            elif not any(active):
                return False
        if active != b.host_active:
            if active is None:
                b.active.fill_(1)
            else:
                host = torch.tensor(active, dtype=torch.uint8)
                if b.device.type == "cuda":
                    host = host.pin_memory()  # pageable memory would make the copy sync
                b.active.copy_(host, non_blocking=True)
            b.host_active = active
            b.torch_runs = None
        if active is None:
            b.steps.add_(1)
        else:
            b.steps.add_(b.active)
            # Only relative values matter on the host: which params share a step count.
            b.host_steps = [s + a for s, a in zip(b.host_steps, active)]
            b.torch_runs = None
        return True

    def _create_state(self, b: _flat.FlatBucket) -> None:
        """torch creates a param's state at its first step with a grad: so do we."""
        for i, p in enumerate(b.params):
            if not b.stated[i] and (b.host_active is None or b.host_active[i]):
                dict.__setitem__(self.state, p, _ParamState(self._owner, b.state_views(i)))
                b.stated[i] = True
        b.all_stated = all(b.stated)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rows = [_flat.hparam_row(g) for g in self.param_groups]
        if self._layout_is_stale(rows):
            self._rebuild()
        self._refresh_hparams(rows)
        for b in self._buckets:
            if not self._gather_grads(b):
                continue
            b.backend.step(b)
            if not b.all_stated:
                self._create_state(b)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Resets the grads, as torch.optim.Optimizer.zero_grad.

        With ``set_to_none=False`` (the fast path) every grad that is not None becomes a view
        into the optimizer's flat grad buffer, zeroed in one operation; backward then
        accumulates into the buffer in place and step() reads it with no copy.
        """
        if set_to_none or self._layout_is_stale():
            super().zero_grad(set_to_none)
            return
        with torch.no_grad():
            for b in self._buckets:
                b.ensure_grad().zero_()
                grads, views = self._grads(b)
                if views:
                    continue
                for p, g, view in zip(b.params, grads, b.grad_views):
                    if g is not None and g is not view:
                        p.grad = view


def _check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """torch.optim.Adam's checks and messages."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
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
