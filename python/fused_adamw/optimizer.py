"""FusedAdamW and FusedAdam: torch.optim.AdamW's and torch.optim.Adam's signatures, state and
state_dict; one fused step per (device, dtype) over params and grads where they live."""

from __future__ import annotations

import numbers
import operator
import warnings
from collections import defaultdict
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from . import _clip, _compile, _dispatch, _table, _watch

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


def _no_dynamo(fn):
    """Runs ``fn`` eagerly under torch.compile (a graph break at the call), as torch does for
    Optimizer.zero_grad and state_dict: the eager step keeps Python state (its tables) that
    Dynamo must not trace. With torch >= 2.4 the compiled step() calls the operator
    ``fused_adamw::step`` instead (``_compile.py``), which runs it untraced."""
    disable = getattr(torch, "_disable_dynamo", None)
    return disable(fn) if disable is not None else fn


def _is_plain(t) -> bool:
    return type(t) is Tensor or issubclass(type(t), torch.nn.Parameter) or _table.is_dtensor(t)


_ARGS_DOC = r"""
    Args:
        params: params or param groups, as for any torch optimizer. FSDP2 (DTensor) params
            are stepped on their local shards.
        lr: learning rate; a float or a one-element Tensor (read on the device each step).
            Default: 1e-3.
        betas: coefficients of the running averages of the gradient and its square; floats
            or one-element Tensors. Default: (0.9, 0.999).
        eps: added to the denominator; a float or a one-element Tensor. Default: 1e-8.
        weight_decay: {weight_decay}
        amsgrad: use the maximum of past squared-gradient averages. Default: False.
        foreach: accepted for compatibility and ignored: every step is fused. Default: None.
        maximize: maximize the objective instead of minimizing it. Default: False.
        capturable: ``step()`` may be captured into a CUDA graph: after warm-up (one eager
            step or :meth:`init_state`) it makes no host sync, no allocation and no host
            decision that depends on this step's data; capture of a group with
            capturable=False is refused. Step counts always live on the param's device and
            a Tensor lr is read on the device, so this changes no arithmetic; accepted on
            every device (on the CPU it only guarantees no sync). Default: False.
        differentiable: autograd sees the update (meta-learning). No fused kernel offers
            that: such groups are stepped by torch's own single-tensor Adam, at its speed.
            Default: False.
        fused: accepted for compatibility and ignored: every step is fused.
            Default: None.{decoupled}
        backend: ``"auto"`` (default) picks, per device and dtype, the first of cuda,
            triton, cpu and torch that can run, quietly; a named backend that cannot run
            raises :class:`~fused_adamw.BackendUnavailableError` saying why.
        decouple_lr: the paper's decoupled decay (Loshchilov & Hutter, 2019): the step
            multiplies params by ``1 - weight_decay * lr / max_lr`` instead of
            ``1 - lr * weight_decay``, where ``max_lr`` is the group's ``"max_lr"``: a float
            snapshot of its lr when the group was created (set it yourself, e.g. to the peak
            of your schedule; ``OneCycleLR`` writes its peak there when built). ``lr / max_lr``
            is the schedule multiplier, so ``weight_decay`` keeps its meaning when the lr is
            tuned. For a constant lr, ``weight_decay_paper = lr * weight_decay_torch``.
            Needs decoupled weight decay. Default: False.
        master_weights: how bfloat16 and float16 params are updated (float32 and float64
            params in the same group are unaffected): None (torch's: the fp32 result is
            rounded to nearest, updates below half an ulp are lost); ``"fp32"`` (an fp32
            master copy in ``state[p]["master_param"]``, 4 B/param; the param is the master
            rounded to nearest; a value written into the param wins at the next step);
            ``"remainder"`` (bfloat16 only: the 16 low bits the param drops, int16 in
            ``state[p]["param_remainder"]``, 2 B/param: param and remainder are exactly the
            fp32 master); ``"kahan"`` (a compensation buffer of the param's dtype in
            ``state[p]["kahan_compensation"]``, 2 B/param); ``"stochastic"`` (stochastic
            rounding, 0 B/param; seed ``state[p]["sr_seed"]``, counter the step). Per param
            group. Default: None.
        state_dtype: dtype of exp_avg, exp_avg_sq and max_exp_avg_sq: None (the param's, as
            torch), ``torch.float32`` or ``torch.bfloat16``. Per param group. Default: None.
        max_grad_norm: clip the grads of every step by their total norm, exactly as
            ``torch.nn.utils.clip_grad_norm_(params_with_grads, max_grad_norm,
            grad_norm_type)`` just before the step would (after GradScaler's unscale), inside
            the fused step: one read of the grads for the norm, none to scale them, no host
            sync. ``p.grad`` is left unclipped (unscaled under ``scaler.step``). After the
            step, ``optimizer.grad_norm`` is the total norm before clipping (a float32 0-d
            tensor on the params' device, what ``clip_grad_norm_`` returns). FSDP2 (DTensor)
            params count as full tensors (one small collective per step). Optimizer-wide; not
            with differentiable=True groups. Default: None (no clipping, no cost).
        grad_norm_type: the norm ``max_grad_norm`` clips by: 2.0 or ``float("inf")``.
            Default: 2.0.
        track_norms: after each step, ``optimizer.norms`` maps every param that stepped to a
            float32 tensor [3] on its device: the L2 norms of its grad as used (after
            unscale, before clipping), of the param after the step and of (param after -
            param before), as stored; FSDP2 params as full tensors. The tensors are
            overwritten by the next step (clone to keep). Also sets ``grad_norm``.
            Default: False.
        grad_norm_process_group: a process group over which the grad norm's partial sums are
            all-reduced, for an optimizer that holds one partition of the params (ZeRO:
            ``ZeroRedundancyOptimizer(..., optimizer_class=FusedAdamW, max_grad_norm=1.0,
            grad_norm_process_group=dist.group.WORLD)``). Default: None.

    A group with decouple_lr carries ``"decouple_lr": True`` and ``"max_lr"`` besides torch's
    keys; other groups have exactly torch's keys (what ``torch.distributed.checkpoint`` needs
    to load torch's checkpoints into this optimizer and back), and a group without the key
    (a torch checkpoint's, loaded) uses torch's decay.
    """


class FusedAdam(torch.optim.Optimizer):
    __doc__ = r"""Adam, one fused pass per (device, dtype) a step: a drop-in ``torch.optim.Adam``.

    Same signature, defaults, param groups, ``state[p]`` keys and ``state_dict`` schema as
    ``torch.optim.Adam`` (checkpoints load into and from it); the per-element arithmetic is
    torch's fused CUDA Adam's (``kernels/adamw_math.cuh``). Weight decay is L2 by default, as
    torch's: ``g = -g`` if maximize, then ``g = g + weight_decay * p``, then the adaptive
    step. ``decoupled_weight_decay=True`` makes it AdamW (:class:`FusedAdamW`), per param
    group. Params and grads are read and written where they live (a user's tensor, a DDP or
    ZeRO bucket, an FSDP2 shard): the optimizer owns its state and nothing else.
    """ + _ARGS_DOC.format(
        weight_decay="L2 penalty added to the gradient (``g + weight_decay * p``), or with "
        "decoupled_weight_decay the decoupled decay of FusedAdamW. A float or a one-element "
        "Tensor. Default: 0.",
        decoupled="\n        decoupled_weight_decay: AdamW's decoupled decay instead of L2 "
        "(torch's flag). Default: False.")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float | Tensor = 1e-8,
        weight_decay: float | Tensor = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
        decouple_lr: bool = False,
        master_weights: str | None = None,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        grad_norm_type: float = 2.0,
        track_norms: bool = False,
        grad_norm_process_group: Any = None,
    ) -> None:
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")  # torch's message
        _check_hyperparameters(lr, betas, eps, weight_decay)
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
        self._owner = _Owner()
        self._backend_request = _dispatch.check_name(backend)
        # Not in defaults: torch's add_param_group would give every group the key (see the
        # class docstring on group keys).
        self._decouple_lr = bool(decouple_lr)
        # Likewise (issue #13): a group carries "master_weights" / "state_dtype" only when
        # set; a checkpoint without them (torch's) gets these constructor values at load.
        _check_master_weights(master_weights, "the constructor")
        _check_state_dtype(state_dtype, "the constructor")
        self._master_weights = master_weights
        self._state_dtype = state_dtype
        # Issue #19: optimizer-wide, not group keys (state_dict stays torch's); see _clip.py.
        _clip.check_args(max_grad_norm, grad_norm_type, track_norms, grad_norm_process_group)
        self._max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._grad_norm_type = float(grad_norm_type)
        self._track_norms = track_norms
        self._grad_norm_process_group = grad_norm_process_group
        self.grad_norm: Tensor | None = None  # the last clipped step's total norm
        self.norms: dict = {}  # track_norms: param -> float32 [3]
        self._reset_caches()
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults)  # add_param_group checks each group's backend
        self.state = _State(self._owner)
        self._state_obj = self.state

    # torch.amp.GradScaler.step() sets ``self.grad_scale`` and ``self.found_inf`` (instance
    # attributes, deleted after the step) and skips its own inf check and unscale: the kernels
    # unscale in place and skip a step with infs on the device, with no host sync.
    _step_supports_amp_scaling = True

    def _reset_caches(self) -> None:
        if "_tables" in self.__dict__:
            self._drop_device_buffers()
        # What CUDA graphs captured and eager steps replaced since (see the NOTE on CUDA
        # graphs in _table.Table._upload): kept for the optimizer's life.
        self._graph_buffers: list[Tensor] = self.__dict__.get("_graph_buffers", [])
        self._graph_hparams: set = set()  # the keys of _hparams whose rows a graph captured
        self._hparam_users: dict = {}  # key of _hparams -> its users (_table's NOTE on streams)
        self._tables: dict | None = None  # (device, dtype) -> _table.Table
        self._layout: tuple | None = None  # what the tables were built from
        self._hparams: dict = {}  # (device, opmath dtype) -> (host rows, device tensor)
        self._has_cuda = False  # some table is on a CUDA device (capture is possible)
        self._compile_key = _compile.register(self)  # how torch.compile's operator finds it

    # ------------------------------------------------------------------ torch plumbing

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = {k: v for k, v in state.items()
                 if k not in ("_tables", "_layout", "_hparams", "_owner", "_state_obj",
                              "_has_cuda", "grad_scale", "found_inf", "_compile_key",
                              "_graph_buffers", "_graph_hparams", "_hparam_users",
                              "_clip_state", "_grad_norm_process_group", "grad_norm", "norms")}
        state["_backend_request"] = self._backend_request
        state["_decouple_lr"] = self._decouple_lr
        state["_master_weights"] = self._master_weights
        state["_state_dtype"] = self._state_dtype
        _clip.getstate(self, state)  # max_grad_norm, grad_norm_type, track_norms
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_backend_request", "auto")
        self._owner = _Owner()
        self._reset_caches()
        self.state = _State(self._owner, {k: _ParamState(self._owner, v)
                                          for k, v in self.state.items()})
        self._state_obj = self.state
        self.__dict__.setdefault("_decouple_lr", False)
        self.__dict__.setdefault("_master_weights", None)
        self.__dict__.setdefault("_state_dtype", None)
        self.__dict__.setdefault("_max_grad_norm", None)
        self.__dict__.setdefault("_grad_norm_type", 2.0)
        self.__dict__.setdefault("_track_norms", False)
        self.__dict__.setdefault("_grad_norm_process_group", None)  # not pickled
        self.__dict__.setdefault("grad_norm", None)
        self.__dict__.setdefault("norms", {})
        for group in self.param_groups:
            if self._master_weights is not None:
                group.setdefault("master_weights", self._master_weights)
            if self._state_dtype is not None:
                group.setdefault("state_dtype", self._state_dtype)
            for key, value in _FLAG_DEFAULTS.items():
                group.setdefault(key, value)
            # as torch's Adam.__setstate__ (FusedAdamW forces True, as torch's AdamW)
            group.setdefault("decoupled_weight_decay", False)
            # No decouple_lr key: torch's decay. A group with it and no max_lr: its lr now.
            if group.get("decouple_lr"):
                group.setdefault("max_lr", _lr_snapshot(group["lr"]))

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
            if not _is_plain(p):
                raise NotImplementedError(
                    f"param {j} of param group {index} is a {type(p).__name__}; FusedAdamW "
                    "steps plain tensors, Parameters and DTensors (FSDP2) only"
                )
        _check_hyperparameters(
            param_group.get("lr", self.defaults["lr"]),
            param_group.get("betas", self.defaults["betas"]),
            param_group.get("eps", self.defaults["eps"]),
            param_group.get("weight_decay", self.defaults["weight_decay"]),
        )
        group = {**param_group, "params": params}
        for key, value in (("master_weights", self._master_weights),
                           ("state_dtype", self._state_dtype)):
            if value is not None:
                group.setdefault(key, value)
        # With the defaults the group will get (differentiable=True from the constructor).
        _check_low_precision({**self.defaults, **group}, index)
        _clip.check_groups(self, [(index, {**self.defaults, **group})])
        for p in tensors:
            if isinstance(p, Tensor):
                _dispatch.choose(self._backend_request, _table.local(p).device,
                                 _table.storage_dtype(p),
                                 *_lowp_of(group, _table.storage_dtype(p)))
        if group.get("decouple_lr", self._decouple_lr):
            group["decouple_lr"] = True
            # max_lr: a float snapshot of the lr now (a Tensor lr is filled in place by
            # schedulers: an alias would follow it). decouple_lr divides by it.
            group.setdefault("max_lr", _lr_snapshot(group.get("lr", self.defaults["lr"])))
        _decay_form({**self.defaults, **group}, index)
        _check_differentiable_form({**self.defaults, **group}, index)
        super().add_param_group(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, then each state key back in its own dtype: torch's
        casts every state tensor of a floating-point param to the param's dtype, which would
        turn bfloat16 moments of float32 params into float32, an fp32 master into the
        param's 16 bits and an int16 remainder into bfloat16 by value. The moments come back
        in the group's state_dtype (from the checkpoint's own tensors, so nothing is lost);
        a master or remainder that reached us in another dtype (the checkpoint went through
        torch's AdamW, which cast it) is dropped with a warning and rebuilt from the param at
        the next step."""
        saved = {k: dict(v) for k, v in state_dict.get("state", {}).items()}
        # A group's own master_weights / state_dtype stay through a checkpoint that lacks the
        # key (torch's, or one saved before the group had it): __setstate__ only knows the
        # constructor's values, which a group may have overridden.
        kept = [{k: g[k] for k in ("master_weights", "state_dtype") if k in g}
                for g in self.param_groups]
        groups = state_dict.get("param_groups", [])
        if len(groups) == len(kept) and any(k not in sg for kg, sg in zip(kept, groups)
                                            for k in kg):
            state_dict = {**state_dict, "param_groups": [
                {**{k: v for k, v in kg.items() if k not in sg}, **sg}
                for kg, sg in zip(kept, groups)]}
        super().load_state_dict(state_dict)  # goes through __setstate__: tables rebuilt
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for pid, p in zip(ids, params):
            st = dict.get(self.state, p)
            src = saved.get(pid)
            if not st or not src:
                continue
            group = group_of[id(p)]
            dtype = _table.storage_dtype(p)
            state_dtype, modes = _lowp_of(group, dtype)
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                t = src.get(key)
                if isinstance(t, Tensor) and not p.is_complex() and state_dtype != p.dtype:
                    st[key] = t.to(device=st[key].device, dtype=state_dtype, copy=True)
            for mode, key in _table.EXTRA_KEYS.items():
                t = src.get(key)
                if not isinstance(t, Tensor):
                    continue
                want = _table.extra_dtype(mode, dtype)
                if want is None or t.dtype != want or t.shape != p.shape:
                    st.pop(key, None)
                    if want is not None and mode in modes:
                        warnings.warn(
                            f"FusedAdamW.load_state_dict: {key!r} of a {p.dtype} param is "
                            f"{t.dtype} in the checkpoint, not {want} (it went through "
                            "another optimizer's load, e.g. torch.optim.AdamW, which casts "
                            "state to the param's dtype): it is rebuilt from the param at "
                            "the next step", stacklevel=2)
                else:
                    st[key] = t.to(device=_table.local(p).device, copy=True)

    @torch.no_grad()
    def sync_master(self) -> None:
        """Makes every master buffer agree with its param exactly, after writing into
        params under ``master_weights`` (``model.load_state_dict``, an EMA swap, a re-init):
        the fp32 master becomes the param, a remainder or Kahan compensation zero. Not needed
        for correctness: a written param wins at the next step in every mode ("fp32"
        detects the write; "remainder" and "kahan" keep the param as written and add less than
        one of its ulps from the old buffer); this drops that residue."""
        for p, st in self.state.items():
            if not isinstance(p, Tensor):
                continue
            lp = _table.local(p)
            if "master_param" in st:
                _table.local(st["master_param"]).copy_(lp)
            for key in ("param_remainder", "kahan_compensation"):
                if key in st:
                    _table.local(st[key]).zero_()

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
        return (groups, list(groups), list(map(_params_of, groups)),
                [bool(g.get("differentiable")) for g in groups],
                [(g.get("master_weights"), g.get("state_dtype")) for g in groups])

    def _layout_changed(self, key: tuple) -> bool:
        old = self._layout
        if old is None:
            return True
        same_items = _watch.address_readers()[2]
        # Every group's params: the same objects in the same order as the tables were built
        # from (old[2] holds copies: a list edited in place is seen); one compiled comparison
        # per group where _C has it.
        return (key[0] is not old[0] or not same_items(key[1], old[1])
                or len(key[2]) != len(old[2]) or not all(map(same_items, key[2], old[2]))
                or key[3] != old[3] or key[4] != old[4])

    def _build_tables(self, key: tuple) -> None:
        self._drop_device_buffers()
        by_key: dict = {}
        _clip.check_groups(self, list(enumerate(self.param_groups)))
        for gi, group in enumerate(self.param_groups):
            _check_low_precision(group, gi)  # edited groups are caught before any change
            if group.get("differentiable"):
                continue  # stepped by torch's differentiable code (_differentiable_step)
            for j, p in enumerate(group["params"]):
                dtype = _table.storage_dtype(p)
                state_dtype, modes = _lowp_of(group, dtype)
                # One table per (device, dtype, state dtype): the moments' dtype is uniform
                # per launch (a template parameter of the compiled loops).
                k = (_table.local(p).device, dtype, state_dtype)
                entry = by_key.setdefault(k, ([], [], [], set()))
                entry[0].append(p)
                entry[1].append(gi)
                entry[2].append(f"param {j} of param group {gi}")
                entry[3].update(modes)
        tables = {}
        for k, (params, groups, names, modes) in by_key.items():
            t = _table.Table(k[0], k[1], params, groups, names, state_dtype=k[2])
            t.backend = _dispatch.choose(self._backend_request, k[0], k[1], k[2], modes)
            tables[k] = t
        self._tables = tables
        self._layout = key[:2] + ([list(p) for p in key[2]],) + key[3:]
        self._hparams = {}
        self._graph_hparams = set()
        self._hparam_users = {}
        self._has_cuda = any(k[0].type == "cuda" for k in tables)

    def _drop_device_buffers(self) -> None:
        """Before the tables and hparams rows are replaced: what a CUDA graph captured is kept
        (the NOTE on CUDA graphs in _table.Table._upload), the rest is retired on the streams
        that read it (the NOTE on streams in _table)."""
        for t in (self._tables or {}).values():
            self._graph_buffers.extend(t.graph_buffers)
            if t.captured:
                self._graph_buffers.append(t.packed)
            else:
                _table.retire(t.packed, t.users)
        for key, (_, buf) in self._hparams.items():
            if key in self._graph_hparams:
                self._graph_buffers.append(buf)
            else:
                _table.retire(buf, self._hparam_users.get(key, []))

    def _refresh_hparams(self, capturing: bool = False) -> None:
        """This step's hyperparameter rows on every device: one small upload when a value
        changed, a device-side copy for each Tensor hyperparameter."""
        rows, tensors = [], []
        for gi, g in enumerate(self.param_groups):
            row, tens = _hparam_row(g, gi)
            rows.append(row)
            tensors.extend((gi, col, v) for col, v in tens)
        for t in self._tables.values():
            key = (t.device, _table.opmath_dtype(t.dtype))
            cached = self._hparams.get(key)
            if capturing and (cached is None or cached[0] != rows):
                # An upload from a temporary host buffer would be replayed from freed memory;
                # and a float baked into a graph is a constant of every replay.
                _refuse_capture(
                    "a float hyperparameter (lr, betas, eps, weight_decay, maximize, amsgrad) "
                    "changed since the last eager step; a graph bakes floats in: make the ones "
                    "that change Tensors on the params' device (a scheduler then fills them in "
                    "place)")
            if cached is None or cached[0] != rows or tensors:
                # Writes into rows a launch read go after it (the NOTE on streams in _table;
                # a capture starts synchronized, and its writes are the graph's own); rows a
                # graph captured are replaced, not rewritten (the NOTE on CUDA graphs there).
                captured = key in self._graph_hparams
                users = self._hparam_users.setdefault(key, [])
                if cached is not None and not capturing and (
                        cached[0] == rows or not captured):
                    _table.before_write(t.device, users)
                if (cached is not None and cached[0] != rows and t.device.type == "cpu"
                        and cached[1].shape[0] == len(rows)):
                    # CPU: rewritten in place through numpy (no torch op, no allocation);
                    # the CPU kernels have finished with it.
                    table = cached[1]
                    table.numpy()[:] = rows
                elif cached is None or cached[0] != rows:
                    host = torch.tensor(rows, dtype=key[1])
                    if t.device.type == "cuda":
                        host = host.pin_memory()
                    if cached is None or cached[1].shape != host.shape or captured:
                        if captured:
                            self._graph_buffers.append(cached[1])
                            self._graph_hparams.discard(key)
                        elif cached is not None:
                            _table.retire(cached[1], users)
                        users.clear()
                        table = host.to(t.device, non_blocking=True)
                        _table.before_write(t.device, users)
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

    def step(self, closure=None):
        """Performs one optimization step.

        Every param with a grad, in every group, is updated in one fused launch per (device,
        dtype); params whose grad is None are skipped, as torch skips them. Bad input (a
        sparse grad, state of another dtype, overlapping params) raises before anything is
        changed. Under torch.compile the step is one operator, ``fused_adamw::step``
        (``_compile.py``).

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        if _compile.tracing():
            return _compile.traced_step(self, closure)
        return self._step(closure)

    @_no_dynamo
    @torch.no_grad()
    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # GradScaler's sync-free path (see _step_supports_amp_scaling); None without a scaler.
        grad_scale = _amp_value(self, "grad_scale")
        found_inf = _amp_value(self, "found_inf")
        key = self._layout_key()
        capturing = self._capturing()
        if self._tables is None or self._layout_changed(key):
            if capturing:
                _refuse_capture("the param groups changed since the last step")
            self._build_tables(key)
        # optimizer.state replaced by the user's own dict: it stays theirs (as with torch), and
        # its edits cannot be tracked, so every step re-reads it.
        dirty = self._owner.dirty or self.state is not self._state_obj
        amsgrad_sig = tuple(bool(g["amsgrad"]) for g in self.param_groups)
        try:
            tables = list(self._tables.values())
            plans = [t.prepare(self, dirty, amsgrad_sig) for t in tables]  # raises before changes
        except _table.Repartition:  # a param changed dtype or device: new tables
            if capturing:
                _refuse_capture("a param changed dtype or device")
            self._build_tables(key)
            tables = list(self._tables.values())
            plans = [t.prepare(self, True, amsgrad_sig) for t in tables]
        if capturing:
            self._check_capturable(plans, grad_scale, found_inf)
        if any(key[3]):
            self._check_differentiable_groups()
        if _clip.wanted(self):
            _clip.check_tables(self, tables)
        self._refresh_hparams(capturing)
        for t, plan in zip(tables, plans):
            t.commit(plan, self)
        self._owner.dirty = False
        clip = _clip.wanted(self)
        if clip:  # the norm pass over every table's grads first (staged ones copied in)
            if capturing and _clip.refuse_capture_reason(self, tables):
                _refuse_capture(_clip.refuse_capture_reason(self, tables))
            try:
                for t in tables:
                    if t.n_rows:
                        t.grad_scale = _on_device(grad_scale, t.device)
                        t.stage_before()
                _clip.before_step(self, tables)
            finally:
                for t in tables:
                    t.grad_scale = None
        for t in tables:
            if t.n_rows:
                t.grad_scale = _on_device(grad_scale, t.device)
                t.found_inf = _on_device(found_inf, t.device)
                try:
                    if not clip:
                        t.stage_before()
                    (_clip.backend_of(self, t) if clip else t.backend).step(t)
                    t.stage_after()
                finally:
                    t.grad_scale = t.found_inf = None
                if capturing:  # what this graph reads is kept for its life
                    t.captured = True
                    self._graph_hparams.add((t.device, _table.opmath_dtype(t.dtype)))
                else:
                    stream = _table.current_stream(t.device)
                    if stream is not None:
                        _table.used_on(t.users, stream)
                        _table.used_on(self._hparam_users.setdefault(
                            (t.device, _table.opmath_dtype(t.dtype)), []), stream)
            t.release()
        if clip:
            _clip.after_step(self, tables, found_inf)
        if any(key[3]):
            self._differentiable_step(grad_scale, found_inf)
        return loss

    # ------------------------------------------------------------------ capture

    def _capturing(self) -> bool:
        """Whether this step is being captured into a CUDA graph (on the current stream)."""
        if not self._has_cuda:
            return False
        return torch.cuda.is_current_stream_capturing()

    def _check_capturable(self, plans, grad_scale=None, found_inf=None) -> None:
        """Under CUDA-graph capture: refuses, before anything changes, what a replay could not
        repeat (host work that depends on this step, allocations, uncaptured groups)."""
        for gi, g in enumerate(self.param_groups):
            if not g.get("capturable"):
                raise RuntimeError(
                    f"FusedAdamW.step() is being captured into a CUDA graph, but param group {gi} "
                    "has capturable=False. Construct the optimizer with capturable=True (or set "
                    f"param_groups[{gi}]['capturable'] = True) before capturing")
            if g.get("differentiable"):
                _refuse_capture(f"param group {gi} has differentiable=True (torch's "
                                "single-tensor path, which syncs)")
        for t, plan in zip(self._tables.values(), plans):
            if plan.kind == "grads":
                _refuse_capture(
                    "the grads are not the tensors of the previous step (a captured step reads "
                    "the grads' addresses when it is captured; keep them static, e.g. "
                    "zero_grad(set_to_none=False))")
            if plan.kind == "idle" and not t.n_rows:
                continue  # no grads in this table, before as now: nothing to launch
            if plan.kind != "same" or t.stage_in:
                _refuse_capture(
                    "the optimizer state or its tables are not built yet for these params and "
                    "grads (or a param needs staged copies)")
            check = getattr(t.backend, "capture_problem", None)
            if check is not None:  # a kernel still to be compiled (Triton)
                t.grad_scale, t.found_inf = grad_scale, found_inf
                problem = check(t)
                t.grad_scale = t.found_inf = None
                if problem:
                    _refuse_capture(problem)
        for gi, g in enumerate(self.param_groups):
            beta1, beta2 = g["betas"]
            for name, v in (("lr", g["lr"]), ("betas[0]", beta1), ("betas[1]", beta2),
                            ("eps", g["eps"]), ("weight_decay", g["weight_decay"])):
                if isinstance(v, Tensor) and not v.is_cuda:
                    raise RuntimeError(
                        f"FusedAdamW.step() is being captured into a CUDA graph, but {name} of "
                        f"param group {gi} is a Tensor on {v.device}: a captured step reads it "
                        "on the device; put it on the params' GPU")

    @torch.no_grad()
    def init_state(self) -> None:
        """Allocates every trainable param's state (torch's keys: ``step`` 0 and zero moments, as
        the first step would) and builds the step's tables for the grads present now, without
        stepping: no step count moves and no param changes. Params with
        ``requires_grad=False`` and no grad (frozen) get none, as with torch.

        CUDA-graph capture of ``step()`` needs every buffer before it is captured; this gives
        them without a warm-up step that counts (Megatron-LM #5976 was a fake step that did).
        Call it after a backward that gives the grads the graph will use, then capture.
        Idempotent; state already there is kept."""
        key = self._layout_key()
        if self._tables is None or self._layout_changed(key):
            self._build_tables(key)
        for t in self._tables.values():
            for p, gi in zip(t.params, t.groups):
                if not p.requires_grad and p.grad is None:
                    continue  # frozen: never stepped, so no state (as torch: none is made)
                st = dict.get(self.state, p) or None
                group = self.param_groups[gi]
                t.new_state(self, p, st, bool(group["amsgrad"]), mode=t.mode_of(group))
        self._owner.dirty = True
        amsgrad_sig = tuple(bool(g["amsgrad"]) for g in self.param_groups)
        tables = list(self._tables.values())
        plans = [t.prepare(self, True, amsgrad_sig) for t in tables]
        self._refresh_hparams()
        for t, plan in zip(tables, plans):
            t.commit(plan, self)
            t.release()
        self._owner.dirty = False

    def _check_differentiable_groups(self) -> None:
        """The differentiable groups' input, checked with the others before any launch (so a
        bad grad there changes nothing), each error naming the group or the param."""
        for gi, group in enumerate(self.param_groups):
            if not group.get("differentiable"):
                continue
            _check_differentiable_form(group, gi)
            for j, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                name = f"param {j} of param group {gi}"
                if g.is_sparse:
                    raise RuntimeError(
                        f"FusedAdamW does not support sparse gradients: "
                        f"{_table.describe(name, p)} has a sparse grad; use "
                        "torch.optim.SparseAdam for sparse params")
                if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                    raise RuntimeError(
                        f"{_table.describe(name, p)} on {p.device} has a grad of shape "
                        f"{tuple(g.shape)}, {g.dtype} on {g.device}; they must match")

    def _differentiable_step(self, grad_scale=None, found_inf=None) -> None:
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
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable"))):
            for gi, group in enumerate(self.param_groups):
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
                    st = self.state[p]
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


class FusedAdamW(FusedAdam):
    __doc__ = r"""AdamW, one fused pass per (device, dtype) a step: a drop-in ``torch.optim.AdamW``.

    Same signature, defaults, param groups, ``state[p]`` keys and ``state_dict`` schema as
    ``torch.optim.AdamW``; the per-element arithmetic is torch's fused CUDA AdamW's
    (``kernels/adamw_math.cuh``). As torch's ``AdamW`` is an ``Adam`` with
    ``decoupled_weight_decay=True``, this is :class:`FusedAdam` with it; a checkpoint loaded
    into it (an Adam one included) steps as AdamW. Params and grads are read and written where
    they live (a user's tensor, a DDP or ZeRO bucket, an FSDP2 shard): the optimizer owns its
    state and nothing else.
    """ + _ARGS_DOC.format(
        weight_decay="decoupled weight decay; the step multiplies params by "
        "``1 - lr * weight_decay`` (``1 - weight_decay * lr / max_lr`` with decouple_lr). "
        "A float or a one-element Tensor. Default: 1e-2.",
        decoupled="")

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
        decouple_lr: bool = False,
        master_weights: str | None = None,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        grad_norm_type: float = 2.0,
        track_norms: bool = False,
        grad_norm_process_group: Any = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True, backend=backend, decouple_lr=decouple_lr,
            master_weights=master_weights, state_dtype=state_dtype,
            max_grad_norm=max_grad_norm, grad_norm_type=grad_norm_type,
            track_norms=track_norms, grad_norm_process_group=grad_norm_process_group,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True  # as torch's AdamW.__setstate__


# A Tensor hyperparameter's placeholder in a host row (the device copy fills it). One object, so
# that list equality (identity first) finds unchanged rows equal and nothing is re-uploaded.
_TENSOR_VALUE = float("nan")


def _amp_value(opt, name: str) -> Tensor | None:
    """``opt.grad_scale`` / ``opt.found_inf`` as GradScaler sets them (None when unset),
    checked: a one-element floating-point Tensor."""
    value = opt.__dict__.get(name)
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        # GradScaler's sum over no devices (an optimizer without grads this iteration) is the
        # int 0: a host number, so no sync to read it.
        return None if value == 0 and name == "found_inf" else torch.tensor(float(value))
    if not isinstance(value, Tensor) or value.numel() != 1 or not value.is_floating_point():
        raise TypeError(
            f"optimizer.{name} must be None or a one-element float Tensor (what "
            f"torch.amp.GradScaler sets), got "
            f"{type(value).__name__ if not isinstance(value, Tensor) else value.shape}")
    return value


def _on_device(value: Tensor | None, device: torch.device) -> Tensor | None:
    """A GradScaler value as the kernels read it: a float32 0-d tensor on ``device`` (a
    device-side copy when it lives elsewhere: no host sync)."""
    if value is None:
        return None
    if value.device != device or value.dtype != torch.float32 or value.dim() != 0:
        value = value.to(device, torch.float32, non_blocking=True).reshape(())
    return value


def _refuse_capture(why: str):
    raise RuntimeError(
        f"FusedAdamW.step() cannot be captured into a CUDA graph now: {why}. Before "
        "capturing, run one eager step or call optimizer.init_state() with the grads the graph "
        "will use")


def _lr_snapshot(lr) -> float:
    """A group's max_lr default: its lr now, as a float (never the Tensor itself)."""
    return float(lr.detach().reshape(())) if isinstance(lr, Tensor) else float(lr)


def _decay_form(group: dict, index: int) -> tuple[float, float]:
    """The (decay mode, max_lr) columns of a group's hparams row: mode 0.0 decoupled, 1.0 L2;
    max_lr 0.0 for torch's ``lr * wd``. Raises ValueError for a decouple_lr that cannot
    work (checked when a group is added and at every step, so edits of a group are caught)."""
    decoupled = bool(group["decoupled_weight_decay"])
    if not group.get("decouple_lr", False):
        return (0.0 if decoupled else 1.0), 0.0
    where = f"param group {index}"
    if not decoupled:
        raise ValueError(
            f"{where}: decouple_lr=True needs decoupled weight decay, but the group has "
            "decoupled_weight_decay=False (Adam's L2 adds weight_decay * p to the gradient: "
            "there is no lr in it to decouple). Use FusedAdamW or "
            "FusedAdam(..., decoupled_weight_decay=True), or decouple_lr=False")
    max_lr = group.get("max_lr")
    if max_lr is None:
        raise ValueError(
            f"{where}: decouple_lr=True decays by weight_decay * lr / max_lr, but the group has "
            "no max_lr; set group['max_lr'] = float(peak_lr)")
    if isinstance(max_lr, bool) or not isinstance(max_lr, numbers.Real):
        raise TypeError(
            f"{where}: max_lr must be a float (the peak lr the decay is relative to), got "
            f"{type(max_lr).__name__}; set group['max_lr'] = float(peak_lr)")
    wd = group["weight_decay"]
    if not max_lr > 0 and (isinstance(wd, Tensor) or wd != 0):
        raise ValueError(
            f"{where}: decouple_lr=True decays by weight_decay * lr / max_lr, but max_lr is "
            f"{max_lr!r} (by default the group's lr when the group was created: a group "
            "created with lr=0 has max_lr 0). Set group['max_lr'] to the peak lr of your "
            "schedule (> 0), or weight_decay=0")
    return 0.0, float(max_lr) if max_lr > 0 else 0.0


def _check_differentiable_form(group: dict, index: int) -> None:
    """decouple_lr has no differentiable form: refused when a group is added (the
    constructor's groups included) and, for edited groups, before any launch."""
    if group.get("differentiable") and group.get("decouple_lr"):
        raise NotImplementedError(
            f"param group {index}: decouple_lr is not available with differentiable=True "
            "(torch's differentiable Adam, which steps such groups, has no such form); use "
            "decouple_lr=False for this group")


def _hparam_row(group: dict, index: int = 0) -> tuple[list[float], list[tuple[int, Tensor]]]:
    """One row of the hyperparameter table from a param group, and its Tensor values (written
    as NaN in the row; the optimizer copies them on the device)."""
    row = [0.0] * _table.HPARAM_COLS
    tensors = []
    beta1, beta2 = group["betas"]
    for col, value in ((_table.HP_LR, group["lr"]), (_table.HP_BETA1, beta1),
                       (_table.HP_BETA2, beta2), (_table.HP_EPS, group["eps"]),
                       (_table.HP_WEIGHT_DECAY, group["weight_decay"])):
        if isinstance(value, Tensor):
            row[col] = _TENSOR_VALUE  # one object: rows compare equal step to step
            tensors.append((col, value))
        else:
            row[col] = float(value)
    row[_table.HP_MAXIMIZE] = float(bool(group["maximize"]))
    row[_table.HP_AMSGRAD] = float(bool(group["amsgrad"]))
    row[_table.HP_DECAY_MODE], row[_table.HP_MAX_LR] = _decay_form(group, index)
    row[_table.HP_MASTER_MODE] = float(_table.MASTER_MODES[group.get("master_weights")])
    return row, tensors


# ------------------------------------------------------------------------------------------
# low-precision training (issue #13): master_weights and state_dtype, per param group
# ------------------------------------------------------------------------------------------

_STATE_DTYPES = (None, torch.float32, torch.bfloat16)


def _check_master_weights(value, where: str) -> None:
    if not isinstance(value, (str, type(None))) or value not in _table.MASTER_MODES:
        raise ValueError(f"{where}: master_weights must be None, 'fp32', 'remainder', 'kahan' "
                         f"or 'stochastic', got {value!r}")


def _check_state_dtype(value, where: str) -> None:
    if not any(value is d for d in _STATE_DTYPES):
        raise ValueError(f"{where}: state_dtype must be None (the param's dtype), "
                         f"torch.float32 or torch.bfloat16, got {value!r}")


def _lowp_of(group: dict, dtype: torch.dtype) -> tuple[torch.dtype, frozenset]:
    """(the moments' dtype, the master modes) of a param of storage ``dtype`` in ``group``."""
    sd = group.get("state_dtype")
    mode = group.get("master_weights")
    return (dtype if sd is None else sd,
            frozenset((mode,)) if mode is not None and dtype in _table.LOW_PRECISION
            else frozenset())


def _check_low_precision(group: dict, index: int) -> None:
    """A group's master_weights and state_dtype against its params: ValueError naming the
    group and the param (when a group is added and at every table build)."""
    where = f"param group {index}"
    mode, sd = group.get("master_weights"), group.get("state_dtype")
    _check_master_weights(mode, where)
    _check_state_dtype(sd, where)
    if mode is None and sd is None:
        return
    if group.get("differentiable"):
        raise ValueError(f"{where}: master_weights and state_dtype are not available with "
                         "differentiable=True (torch's differentiable Adam steps those groups)")
    for j, p in enumerate(group["params"]):
        if isinstance(p, tuple):
            p = p[1]
        if not isinstance(p, Tensor):
            continue
        dtype = _table.storage_dtype(p)
        name = f"param {j} of {where}"
        if p.is_complex() and ((mode is not None and dtype in _table.LOW_PRECISION)
                               or sd not in (None, dtype)):
            raise ValueError(f"{where}: master_weights and state_dtype do not take complex "
                             f"16-bit params or other state dtypes; {name} is {p.dtype}")
        if mode == "remainder" and dtype == torch.float16:
            raise ValueError(
                f"{where}: master_weights='remainder' keeps the 16 low bits a bfloat16 param "
                f"drops from its fp32 master; {name} is float16, whose bits are not the high "
                "half of a float32. Use 'fp32', 'kahan' or 'stochastic' for float16 params")
        if sd is torch.bfloat16 and dtype == torch.float16:
            raise ValueError(
                f"{where}: state_dtype=torch.bfloat16 with float16 params ({name}) is not "
                "supported (moments in the param's dtype, float32 or bfloat16 for float32 "
                "params); use state_dtype=torch.float32 or None")
        if sd is not None and dtype == torch.float64 and sd != dtype:
            raise ValueError(f"{where}: state_dtype={sd} with float64 params ({name}) is not "
                             "supported; use None")


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
