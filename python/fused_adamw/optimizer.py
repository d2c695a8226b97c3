"""FusedAdamW and FusedAdam: torch.optim.AdamW's and torch.optim.Adam's signatures, state and
state_dict; one fused step per (device, dtype) over params and grads where they live."""

from __future__ import annotations

import numbers
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import _checks, _clip, _compile, _differentiable, _dispatch, _lowp, _state, _table, _tableset
from ._tableset import hparam_row as _hparam_row  # noqa: F401 (tests read rows)


# Keys torch.optim.AdamW's param groups have (torch 2.13), with the values a checkpoint from an
# older torch, apex or another AdamW lacks: filled in on load, as torch's __setstate__ does.
_FLAG_DEFAULTS = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                      differentiable=False, fused=None)
# Optimizer attributes an older pickle lacks (or that are not pickled: the process group).
_PICKLED_DEFAULTS = dict(_decouple_lr=False, _master_weights=None, _state_dtype=None,
                         _max_grad_norm=None, _grad_norm_type=2.0, _track_norms=False,
                         _grad_norm_process_group=None, grad_norm=None, norms=dict)


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
            tensor on the params' device, what ``clip_grad_norm_`` returns; a new one each
            step, but with capturable groups one buffer that each step overwrites). FSDP2 (DTensor)
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
        betas = _checks.check_constructor(lr, betas, eps, weight_decay, foreach, capturable,
                                          fused, differentiable)
        self._owner = _Owner()
        self._backend_request = _dispatch.check_name(backend)
        # Not in defaults: torch's add_param_group would give every group the key (see the
        # class docstring on group keys).
        self._decouple_lr = bool(decouple_lr)
        # Likewise (issue #13): a group carries "master_weights" / "state_dtype" only when
        # set; a checkpoint without them (torch's) gets these constructor values at load.
        _lowp.check_master_weights(master_weights, "the constructor")
        _lowp.check_state_dtype(state_dtype, "the constructor")
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
        old = self.__dict__.get("_set")
        if old is not None:
            old.drop_device_buffers()
        # The tables, their hyperparameter rows and what CUDA graphs captured (kept for the
        # optimizer's life: see the NOTE on CUDA graphs in _table.Table._upload).
        self._set = _tableset.TableSet(self._backend_request,
                                       [] if old is None else old.graph_buffers)
        self._compile_key = _compile.register(self)  # how torch.compile's operator finds it

    @property
    def _tables(self) -> dict | None:
        return self._set.tables

    @property
    def _hparams(self) -> dict:
        return self._set.hparams

    # ------------------------------------------------------------------ torch plumbing

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = {k: v for k, v in state.items()
                 if k not in ("_set", "_owner", "_state_obj", "grad_scale", "found_inf",
                              "_compile_key", "_clip_state", "_grad_norm_process_group",
                              "grad_norm", "norms")}
        for key in ("_backend_request", "_decouple_lr", "_master_weights", "_state_dtype"):
            state[key] = getattr(self, key)
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
        for key, value in _PICKLED_DEFAULTS.items():
            self.__dict__.setdefault(key, value() if callable(value) else value)
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
                group.setdefault("max_lr", _checks.lr_snapshot(group["lr"]))

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
        _checks.check_new_params(tensors, index)
        _checks.check_hyperparameters(
            *(param_group.get(k, self.defaults[k]) for k in ("lr", "betas", "eps", "weight_decay")))
        group = {**param_group, "params": params}
        for key, value in (("master_weights", self._master_weights),
                           ("state_dtype", self._state_dtype)):
            if value is not None:
                group.setdefault(key, value)
        # With the defaults the group will get (differentiable=True from the constructor).
        _lowp.check_low_precision({**self.defaults, **group}, index)
        _clip.check_groups(self, [(index, {**self.defaults, **group})])
        _checks.check_backends(tensors, group, self._backend_request)
        if group.get("decouple_lr", self._decouple_lr):
            group["decouple_lr"] = True
            # max_lr: a float snapshot of the lr now (a Tensor lr is filled in place by
            # schedulers: an alias would follow it). decouple_lr divides by it.
            group.setdefault("max_lr", _checks.lr_snapshot(group.get("lr", self.defaults["lr"])))
        _tableset.decay_form({**self.defaults, **group}, index)
        _differentiable.check_form({**self.defaults, **group}, index)
        super().add_param_group(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, then each state key back in its own dtype (torch's casts
        every state tensor to the param's dtype): the moments in the group's state_dtype, from
        the checkpoint's own tensors; a master or remainder that reached us in another dtype is
        dropped with a warning and rebuilt from the param at the next step (``_lowp``)."""
        saved = {k: dict(v) for k, v in state_dict.get("state", {}).items()}
        state_dict = _lowp.keep_group_options(self.param_groups, state_dict)
        super().load_state_dict(state_dict)  # goes through __setstate__: tables rebuilt
        _lowp.restore_state_dtypes(self.param_groups, self.state, state_dict, saved)

    @torch.no_grad()
    def sync_master(self) -> None:
        """Makes every master buffer agree with its param exactly, after writing into
        params under ``master_weights`` (``model.load_state_dict``, an EMA swap, a re-init):
        the fp32 master becomes the param, a remainder or Kahan compensation zero. Not needed
        for correctness: a written param wins at the next step in every mode ("fp32"
        detects the write; "remainder" and "kahan" keep the param as written and add less than
        one of its ulps from the old buffer); this drops that residue."""
        _lowp.sync_master(self.state)

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

    def _build_tables(self, key: tuple) -> None:
        _clip.check_groups(self, list(enumerate(self.param_groups)))
        self._set.build(key)

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
        groups, tset = self.param_groups, self._set
        key = tset.layout_key(groups)
        capturing = self._capturing()
        if tset.tables is None or tset.changed(key):
            if capturing:
                _tableset.refuse_capture("the param groups changed since the last step")
            self._build_tables(key)
        # optimizer.state replaced by the user's own dict: it stays theirs (as with torch), and
        # its edits cannot be tracked, so every step re-reads it.
        dirty = self._owner.dirty or self.state is not self._state_obj
        tables, plans = tset.prepare(key, self.state, dirty, capturing)  # raises before changes
        if capturing:
            tset.check_capturable(groups, plans, grad_scale, found_inf)
        if any(key[3]):
            _differentiable.check_groups(groups)
        clip = _clip.wanted(self)
        if clip:
            _clip.check_tables(self, tables)
        tset.refresh_hparams(groups, capturing)
        for t, plan in zip(tables, plans):
            t.commit(plan, self.state, groups)
        self._owner.dirty = False
        if clip and capturing and _clip.refuse_capture_reason(self, tables):
            _tableset.refuse_capture(_clip.refuse_capture_reason(self, tables))
        tset.launch(tables, grad_scale, found_inf, capturing,
                    (lambda ts: _clip.before_step(self, ts)) if clip else None,
                    (lambda t: _clip.backend_of(self, t)) if clip else None)
        if clip:
            _clip.after_step(self, tables, found_inf)
        if any(key[3]):
            _differentiable.step(groups, self.state, bool(self.defaults.get("differentiable")),
                                 grad_scale, found_inf)
        return loss

    def _capturing(self) -> bool:
        """Whether this step is being captured into a CUDA graph (on the current stream)."""
        if not self._set.has_cuda:
            return False
        return torch.cuda.is_current_stream_capturing()

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
        groups, tset = self.param_groups, self._set
        key = tset.layout_key(groups)
        if tset.tables is None or tset.changed(key):
            self._build_tables(key)
        for t in tset.tables.values():
            for p, gi in zip(t.params, t.groups):
                if not p.requires_grad and p.grad is None:
                    continue  # frozen: never stepped, so no state (as torch: none is made)
                group = groups[gi]
                _state.new_state(self.state, p, dict.get(self.state, p) or None,
                                 bool(group["amsgrad"]), t.dtype, t.state_dtype,
                                 mode=t.mode_of(group))
        self._owner.dirty = True
        tables, plans = tset.prepare(key, self.state, True, False)
        tset.refresh_hparams(groups)
        for t, plan in zip(tables, plans):
            t.commit(plan, self.state, groups)
            t.release()
        self._owner.dirty = False


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


