"""The optimizer's tables, the hyperparameter rows they read, and what CUDA graphs captured.

One :class:`~fused_adamw._table.Table` per (device, dtype, state dtype) of the params; a
hyperparameter table per (device, opmath dtype), uploaded when a value changed; the buffers a
captured graph reads, kept for the optimizer's life. The optimizer (``optimizer.py``) hands in
its param groups and state each step and launches what :meth:`TableSet.prepare` planned."""

from __future__ import annotations

import numbers
import operator

import torch
from torch import Tensor

from . import _dispatch, _table
from ._lowp import check_low_precision, lowp_of
from ._table import (HP_AMSGRAD, HP_BETA1, HP_BETA2, HP_DECAY_MODE, HP_EPS, HP_LR, HP_MASTER_MODE,
                     HP_MAXIMIZE, HP_MAX_LR, HP_WEIGHT_DECAY, HPARAM_COLS, MASTER_MODES,
                     Repartition, Table, before_write, local, opmath_dtype,
                     retire, storage_dtype, used_on)
from ._watch import address_readers

_params_of = operator.itemgetter("params")


class TableSet:
    """The tables of one optimizer (see the module docstring)."""

    def __init__(self, backend_request: str, graph_buffers: list) -> None:
        self.backend_request = backend_request
        # What CUDA graphs captured and eager steps replaced since (see the NOTE on CUDA
        # graphs in _table.Table._upload): kept for the optimizer's life.
        self.graph_buffers = graph_buffers
        self.tables: dict | None = None  # (device, dtype, state dtype) -> Table
        self.layout: tuple | None = None  # what the tables were built from
        self.hparams: dict = {}  # (device, opmath dtype) -> (host rows, device tensor)
        self.graph_hparams: set = set()  # the keys of hparams whose rows a graph captured
        self.hparam_users: dict = {}  # key of hparams -> its users (_table's NOTE on streams)
        self.has_cuda = False  # some table is on a CUDA device (capture is possible)

    # ------------------------------------------------------------------ layout

    @staticmethod
    def layout_key(groups: list[dict]) -> tuple:
        return (groups, list(groups), list(map(_params_of, groups)),
                [bool(g.get("differentiable")) for g in groups],
                [(g.get("master_weights"), g.get("state_dtype")) for g in groups])

    def changed(self, key: tuple) -> bool:
        old = self.layout
        if old is None:
            return True
        same_items = address_readers()[2]
        # Every group's params: the same objects in the same order as the tables were built
        # from (old[2] holds copies: a list edited in place is seen); one compiled comparison
        # per group where _C has it.
        return (key[0] is not old[0] or not same_items(key[1], old[1])
                or len(key[2]) != len(old[2]) or not all(map(same_items, key[2], old[2]))
                or key[3] != old[3] or key[4] != old[4])

    def build(self, key: tuple) -> None:
        self.drop_device_buffers()
        by_key: dict = {}
        groups = key[0]
        for gi, group in enumerate(groups):
            check_low_precision(group, gi)  # edited groups are caught before any change
            if group.get("differentiable"):
                continue  # stepped by torch's differentiable code (_differentiable.step)
            for j, p in enumerate(group["params"]):
                dtype = storage_dtype(p)
                state_dtype, modes = lowp_of(group, dtype)
                # One table per (device, dtype, state dtype): the moments' dtype is uniform
                # per launch (a template parameter of the compiled loops).
                k = (local(p).device, dtype, state_dtype)
                entry = by_key.setdefault(k, ([], [], [], set()))
                entry[0].append(p)
                entry[1].append(gi)
                entry[2].append(f"param {j} of param group {gi}")
                entry[3].update(modes)
        tables = {}
        for k, (params, group_of, names, modes) in by_key.items():
            t = Table(k[0], k[1], params, group_of, names, state_dtype=k[2])
            t.backend = _dispatch.choose(self.backend_request, k[0], k[1], k[2], modes)
            tables[k] = t
        self.tables = tables
        self.layout = key[:2] + ([list(p) for p in key[2]],) + key[3:]
        self.hparams = {}
        self.graph_hparams = set()
        self.hparam_users = {}
        self.has_cuda = any(k[0].type == "cuda" for k in tables)

    def drop_device_buffers(self) -> None:
        """Before the tables and hparams rows are replaced: what a CUDA graph captured is kept
        (the NOTE on CUDA graphs in Table._upload), the rest is retired on the streams
        that read it (the NOTE on streams in _table)."""
        for t in (self.tables or {}).values():
            self.graph_buffers.extend(t.graph_buffers)
            if t.captured:
                self.graph_buffers.append(t.packed)
            else:
                retire(t.packed, t.users)
        for key, (_, buf) in self.hparams.items():
            if key in self.graph_hparams:
                self.graph_buffers.append(buf)
            else:
                retire(buf, self.hparam_users.get(key, []))

    # ------------------------------------------------------------------ per step

    def prepare(self, key: tuple, state, dirty: bool, capturing: bool) -> tuple[list, list]:
        """Every table's plan for this step (raises before anything changes); the tables are
        rebuilt first when the param groups changed, or a param changed dtype or device."""
        groups = key[0]
        if self.tables is None or self.changed(key):
            if capturing:
                refuse_capture("the param groups changed since the last step")
            self.build(key)
        amsgrad_sig = tuple(bool(g["amsgrad"]) for g in groups)
        try:
            tables = list(self.tables.values())
            plans = [t.prepare(state, groups, dirty, amsgrad_sig) for t in tables]
        except Repartition:  # a param changed dtype or device: new tables
            if capturing:
                refuse_capture("a param changed dtype or device")
            self.build(key)
            tables = list(self.tables.values())
            plans = [t.prepare(state, groups, True, amsgrad_sig) for t in tables]
        return tables, plans

    def launch(self, tables: list, grad_scale, found_inf, capturing: bool, norm_pass=None,
               backend_of=None) -> None:
        """Every table with rows: staged tensors copied in, its backend's launch, copied out.
        Clipping: ``norm_pass(tables)`` first, over every table's grads (staged ones copied in),
        and ``backend_of(t)`` launches."""
        if norm_pass is not None:
            try:
                for t in tables:
                    if t.n_rows:
                        t.grad_scale = on_device(grad_scale, t.device)
                        t.stage_before()
                norm_pass(tables)
            finally:
                for t in tables:
                    t.grad_scale = None
        for t in tables:
            if t.n_rows:
                t.grad_scale = on_device(grad_scale, t.device)
                t.found_inf = on_device(found_inf, t.device)
                try:
                    if norm_pass is None:
                        t.stage_before()
                    (t.backend if backend_of is None else backend_of(t)).step(t)
                    t.stage_after()
                finally:
                    t.grad_scale = t.found_inf = None
                self._launched(t, capturing)
            t.release()

    def _launched(self, t: Table, capturing: bool) -> None:
        """After ``t``'s launch: what a graph reads is kept for its life; eager launches
        record their stream on the buffers they read (the NOTE on streams in _table)."""
        key = (t.device, opmath_dtype(t.dtype))
        if capturing:
            t.captured = True
            self.graph_hparams.add(key)
            return
        stream = _table.current_stream(t.device)  # module lookup: tests fake streams
        if stream is not None:
            used_on(t.users, stream)
            used_on(self.hparam_users.setdefault(key, []), stream)

    def refresh_hparams(self, groups: list[dict], capturing: bool = False) -> None:
        """This step's hyperparameter rows on every device: one small upload when a value
        changed, a device-side copy for each Tensor hyperparameter."""
        rows, tensors = [], []
        for gi, g in enumerate(groups):
            row, tens = hparam_row(g, gi)
            rows.append(row)
            tensors.extend((gi, col, v) for col, v in tens)
        for t in self.tables.values():
            key = (t.device, opmath_dtype(t.dtype))
            cached = self.hparams.get(key)
            if capturing and (cached is None or cached[0] != rows):
                # An upload from a temporary host buffer would be replayed from freed memory;
                # and a float baked into a graph is a constant of every replay.
                refuse_capture(
                    "a float hyperparameter (lr, betas, eps, weight_decay, maximize, amsgrad) "
                    "changed since the last eager step; a graph bakes floats in: make the ones "
                    "that change Tensors on the params' device (a scheduler then fills them in "
                    "place)")
            if cached is None or cached[0] != rows or tensors:
                # Writes into rows a launch read go after it (the NOTE on streams in _table;
                # a capture starts synchronized, and its writes are the graph's own); rows a
                # graph captured are replaced, not rewritten (the NOTE on CUDA graphs there).
                captured = key in self.graph_hparams
                users = self.hparam_users.setdefault(key, [])
                if cached is not None and not capturing and (
                        cached[0] == rows or not captured):
                    before_write(t.device, users)
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
                            self.graph_buffers.append(cached[1])
                            self.graph_hparams.discard(key)
                        elif cached is not None:
                            retire(cached[1], users)
                        users.clear()
                        table = host.to(t.device, non_blocking=True)
                        before_write(t.device, users)
                    else:
                        table = cached[1]
                        table.copy_(host, non_blocking=True)
                else:
                    table = cached[1]
                for gi, col, value in tensors:
                    table[gi, col].copy_(value.reshape(()), non_blocking=True)
                self.hparams[key] = cached = (rows, table)
            t.hparams, t.host_hparams = cached[1], rows

    # ------------------------------------------------------------------ capture

    def check_capturable(self, groups: list[dict], plans, grad_scale=None,
                         found_inf=None) -> None:
        """Under CUDA-graph capture: refuses, before anything changes, what a replay could not
        repeat (host work that depends on this step, allocations, uncaptured groups)."""
        for gi, g in enumerate(groups):
            if not g.get("capturable"):
                raise RuntimeError(
                    f"FusedAdamW.step() is being captured into a CUDA graph, but param group {gi} "
                    "has capturable=False. Construct the optimizer with capturable=True (or set "
                    f"param_groups[{gi}]['capturable'] = True) before capturing")
            if g.get("differentiable"):
                refuse_capture(f"param group {gi} has differentiable=True (torch's "
                                "single-tensor path, which syncs)")
        for t, plan in zip(self.tables.values(), plans):
            if plan.kind == "grads":
                refuse_capture(
                    "the grads are not the tensors of the previous step (a captured step reads "
                    "the grads' addresses when it is captured; keep them static, e.g. "
                    "zero_grad(set_to_none=False))")
            if plan.kind == "idle" and not t.n_rows:
                continue  # no grads in this table, before as now: nothing to launch
            if plan.kind != "same" or t.stage_in:
                refuse_capture(
                    "the optimizer state or its tables are not built yet for these params and "
                    "grads (or a param needs staged copies)")
            check = getattr(t.backend, "capture_problem", None)
            if check is not None:  # a kernel still to be compiled (Triton)
                t.grad_scale, t.found_inf = grad_scale, found_inf
                problem = check(t)
                t.grad_scale = t.found_inf = None
                if problem:
                    refuse_capture(problem)
        for gi, g in enumerate(groups):
            beta1, beta2 = g["betas"]
            for name, v in (("lr", g["lr"]), ("betas[0]", beta1), ("betas[1]", beta2),
                            ("eps", g["eps"]), ("weight_decay", g["weight_decay"])):
                if isinstance(v, Tensor) and not v.is_cuda:
                    raise RuntimeError(
                        f"FusedAdamW.step() is being captured into a CUDA graph, but {name} of "
                        f"param group {gi} is a Tensor on {v.device}: a captured step reads it "
                        "on the device; put it on the params' GPU")


# A Tensor hyperparameter's placeholder in a host row (the device copy fills it). One object, so
# that list equality (identity first) finds unchanged rows equal and nothing is re-uploaded.
TENSOR_VALUE = float("nan")


def on_device(value: Tensor | None, device: torch.device) -> Tensor | None:
    """A GradScaler value as the kernels read it: a float32 0-d tensor on ``device`` (a
    device-side copy when it lives elsewhere: no host sync)."""
    if value is None:
        return None
    if value.device != device or value.dtype != torch.float32 or value.dim() != 0:
        value = value.to(device, torch.float32, non_blocking=True).reshape(())
    return value


def refuse_capture(why: str):
    raise RuntimeError(
        f"FusedAdamW.step() cannot be captured into a CUDA graph now: {why}. Before "
        "capturing, run one eager step or call optimizer.init_state() with the grads the graph "
        "will use")


def decay_form(group: dict, index: int) -> tuple[float, float]:
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


def hparam_row(group: dict, index: int = 0) -> tuple[list[float], list[tuple[int, Tensor]]]:
    """One row of the hyperparameter table from a param group, and its Tensor values (written
    as NaN in the row; the optimizer copies them on the device)."""
    row = [0.0] * HPARAM_COLS
    tensors = []
    beta1, beta2 = group["betas"]
    for col, value in ((HP_LR, group["lr"]), (HP_BETA1, beta1),
                       (HP_BETA2, beta2), (HP_EPS, group["eps"]),
                       (HP_WEIGHT_DECAY, group["weight_decay"])):
        if isinstance(value, Tensor):
            row[col] = TENSOR_VALUE  # one object: rows compare equal step to step
            tensors.append((col, value))
        else:
            row[col] = float(value)
    row[HP_MAXIMIZE] = float(bool(group["maximize"]))
    row[HP_AMSGRAD] = float(bool(group["amsgrad"]))
    row[HP_DECAY_MODE], row[HP_MAX_LR] = decay_form(group, index)
    row[HP_MASTER_MODE] = float(MASTER_MODES[group.get("master_weights")])
    return row, tensors
