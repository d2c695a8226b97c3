"""FusedAdamW: torch.optim.AdamW's signature, state and state_dict; one fused step per
(device, dtype) over params and grads where they live."""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from . import _dispatch, _table

_params_of = operator.itemgetter("params")

# Keys torch.optim.AdamW's param groups have (torch 2.13), with the values a checkpoint from an
# older torch, apex or another AdamW lacks: filled in on load, as torch's __setstate__ does.
_FLAG_DEFAULTS = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                      differentiable=False, fused=None)


class _Owner:
    """What the state dicts flag; a separate object so that pickling state needs no optimizer.

    ``dirty`` is set by every edit of ``optimizer.state`` or of one ``state[p]``; the next
    step() then re-reads every state entry (a Python pass, only after an edit).
    """

    __slots__ = ("dirty",)

    def __init__(self):
        self.dirty = True


def _mark(name):
    def method(self, *args, **kwargs):
        result = getattr(super(type(self), self), name)(*args, **kwargs)
        if self._owner is not None:
            self._owner.dirty = True
        return result

    method.__name__ = name
    return method


class _ParamState(dict):
    """``optimizer.state[p]``: a dict that tells its optimizer when it is edited. In-place
    changes to the state tensors need no telling: the kernels read them where they live."""

    __slots__ = ("_owner",)

    def __init__(self, owner: _Owner | None = None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._owner = owner

    for _name in ("__setitem__", "__delitem__", "clear", "pop", "popitem", "update",
                  "setdefault", "__ior__"):
        locals()[_name] = _mark(_name)

    def __reduce__(self):  # pickles as a plain dict: checkpoints never need fused_adamw
        return (dict, (dict(self),))


class _State(defaultdict):
    """``optimizer.state``: reading a param with no state creates an empty entry quietly;
    every edit flags the optimizer to re-read its state at the next step."""

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

    for _name in ("__delitem__", "clear", "pop", "popitem", "update", "setdefault", "__ior__"):
        locals()[_name] = _mark(_name)

    def __reduce__(self):
        return (_plain_state, (dict(self),))


def _plain_state(d):
    return defaultdict(dict, {k: dict(v) for k, v in d.items()})


def _is_plain(t) -> bool:
    return type(t) is Tensor or issubclass(type(t), torch.nn.Parameter) or _table.is_dtensor(t)


class FusedAdamW(torch.optim.Optimizer):
    r"""AdamW whose step is one fused pass per (device, dtype): a drop-in ``torch.optim.AdamW``.

    Same signature, defaults, param groups, ``state[p]`` keys and ``state_dict`` schema as
    ``torch.optim.AdamW``; the per-element arithmetic is torch's fused CUDA AdamW's
    (``kernels/adamw_math.cuh``). Params and grads are read and written where they live (a
    user's tensor, a DDP or ZeRO bucket, an FSDP2 shard): the optimizer owns its state and
    nothing else.

    Args:
        params: params or param groups, as for any torch optimizer. FSDP2 (DTensor) params
            are stepped on their local shards.
        lr: learning rate; a float or a one-element Tensor (read on the device each step).
            Default: 1e-3.
        betas: coefficients of the running averages of the gradient and its square; floats
            or one-element Tensors. Default: (0.9, 0.999).
        eps: added to the denominator; a float or a one-element Tensor. Default: 1e-8.
        weight_decay: decoupled weight decay; the step multiplies params by
            ``1 - lr * weight_decay``. A float or a one-element Tensor. Default: 1e-2.
        amsgrad: use the maximum of past squared-gradient averages. Default: False.
        maximize: maximize the objective instead of minimizing it. Default: False.
        foreach: accepted for compatibility and ignored: every step is fused. Default: None.
        capturable: accepted for compatibility. Step counts always live on the param's
            device; CUDA-graph capture of ``step()`` is not supported yet. Default: False.
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
        eps: float | Tensor = 1e-8,
        weight_decay: float | Tensor = 1e-2,
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
        self._reset_caches()
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
        )
        super().__init__(params, defaults)  # add_param_group checks each group's backend
        self.state = _State(self._owner)
        self._state_obj = self.state

    def _reset_caches(self) -> None:
        self._tables: dict | None = None  # (device, dtype) -> _table.Table
        self._layout: tuple | None = None  # what the tables were built from
        self._hparams: dict = {}  # (device, opmath dtype) -> (host rows, device tensor)

    # ------------------------------------------------------------------ torch plumbing

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = {k: v for k, v in state.items()
                 if k not in ("_tables", "_layout", "_hparams", "_owner", "_state_obj")}
        state["_backend_request"] = self._backend_request
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_backend_request", "auto")
        self._owner = _Owner()
        self._reset_caches()
        self.state = _State(self._owner, {k: _ParamState(self._owner, v)
                                          for k, v in self.state.items()})
        self._state_obj = self.state
        for group in self.param_groups:
            for key, value in _FLAG_DEFAULTS.items():
                group.setdefault(key, value)
            group["decoupled_weight_decay"] = True  # as torch's AdamW.__setstate__

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``; every check (ours and torch's) runs before the group is
        added, so a refused group leaves the optimizer unchanged."""
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
            if not _is_plain(p):
                raise NotImplementedError(
                    f"param {j} of param group {index} is a {type(p).__name__}; FusedAdamW "
                    "steps plain tensors, Parameters and DTensors (FSDP2) only"
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
        for p in tensors:
            if isinstance(p, Tensor):
                _dispatch.choose(self._backend_request, _table.local(p).device,
                                 _table.storage_dtype(p))
        super().add_param_group({**param_group, "params": params})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # goes through __setstate__: tables rebuilt

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        return sd

    @property
    def backend(self) -> str:
        """The backend that runs (several joined by '+' when tables differ)."""
        keys = {(_table.local(p).device, _table.storage_dtype(p))
                for g in self.param_groups for p in g["params"]}
        names = {_dispatch.choose(self._backend_request, *k).name for k in keys}
        return "+".join(sorted(names)) if names else "none"

    # ------------------------------------------------------------------ tables

    def _layout_key(self) -> tuple:
        groups = self.param_groups
        flat = list(chain.from_iterable(map(_params_of, groups)))
        return (groups, list(groups), list(map(len, map(_params_of, groups))), flat)

    def _layout_changed(self, key: tuple) -> bool:
        old = self._layout
        if old is None:
            return True
        return (key[0] is not old[0] or len(key[1]) != len(old[1])
                or not all(map(operator.is_, key[1], old[1])) or key[2] != old[2]
                or len(key[3]) != len(old[3]) or not all(map(operator.is_, key[3], old[3])))

    def _build_tables(self, key: tuple) -> None:
        by_key: dict = {}
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                k = (_table.local(p).device, _table.storage_dtype(p))
                entry = by_key.setdefault(k, ([], [], []))
                entry[0].append(p)
                entry[1].append(gi)
                entry[2].append(f"param {j} of param group {gi}")
        tables = {}
        for k, (params, groups, names) in by_key.items():
            t = _table.Table(k[0], k[1], params, groups, names)
            t.backend = _dispatch.choose(self._backend_request, *k)
            tables[k] = t
        self._tables = tables
        self._layout = key
        self._hparams = {}

    def _refresh_hparams(self) -> None:
        """This step's hyperparameter rows on every device: one small upload when a value
        changed, a device-side copy for each Tensor hyperparameter."""
        rows, tensors = [], []
        for gi, g in enumerate(self.param_groups):
            row, tens = _hparam_row(g)
            rows.append(row)
            tensors.extend((gi, col, v) for col, v in tens)
        for t in self._tables.values():
            key = (t.device, _table.opmath_dtype(t.dtype))
            cached = self._hparams.get(key)
            if cached is None or cached[0] != rows or tensors:
                if cached is None or cached[0] != rows:
                    host = torch.tensor(rows, dtype=key[1])
                    if t.device.type == "cuda":
                        host = host.pin_memory()
                    if cached is None or cached[1].shape != host.shape:
                        table = host.to(t.device, non_blocking=True)
                    else:
                        table = cached[1]
                        table.copy_(host, non_blocking=True)
                else:
                    table = cached[1]
                for gi, col, value in tensors:
                    table[gi, col].copy_(value.reshape(()), non_blocking=True)
                self._hparams[key] = cached = (rows, table)
            t.hparams, t.host_hparams = cached[1], rows

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step.

        Every param with a grad, in every group, is updated in one fused launch per (device,
        dtype); params whose grad is None are skipped, as torch skips them. Bad input (a
        sparse grad, state of another dtype, overlapping params) raises before anything is
        changed.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        key = self._layout_key()
        if self._tables is None or self._layout_changed(key):
            self._build_tables(key)
        if self.state is not self._state_obj:  # optimizer.state was reassigned
            self.state = _State(self._owner, {k: _ParamState(self._owner, v)
                                              for k, v in self.state.items()})
            self._state_obj = self.state
            self._owner.dirty = True
        dirty = self._owner.dirty
        amsgrad_sig = tuple(bool(g["amsgrad"]) for g in self.param_groups)
        tables = list(self._tables.values())
        plans = [t.prepare(self, dirty, amsgrad_sig) for t in tables]  # raises before changes
        self._refresh_hparams()
        for t, plan in zip(tables, plans):
            t.commit(plan, self)
        self._owner.dirty = False
        for t in tables:
            if t.n_rows:
                t.stage_before()
                t.backend.step(t)
                t.stage_after()
        return loss


def _hparam_row(group: dict) -> tuple[list[float], list[tuple[int, Tensor]]]:
    """One row of the hyperparameter table from a param group, and its Tensor values (written
    as NaN in the row; the optimizer copies them on the device)."""
    row = [0.0] * _table.HPARAM_COLS
    tensors = []
    beta1, beta2 = group["betas"]
    for col, value in ((_table.HP_LR, group["lr"]), (_table.HP_BETA1, beta1),
                       (_table.HP_BETA2, beta2), (_table.HP_EPS, group["eps"]),
                       (_table.HP_WEIGHT_DECAY, group["weight_decay"])):
        if isinstance(value, Tensor):
            row[col] = float("nan")
            tensors.append((col, value))
        else:
            row[col] = float(value)
    row[_table.HP_MAXIMIZE] = float(bool(group["maximize"]))
    row[_table.HP_AMSGRAD] = float(bool(group["amsgrad"]))
    return row, tensors


def _check_hyperparameters(lr, betas, eps, weight_decay) -> None:
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
