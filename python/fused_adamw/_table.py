"""The device table the kernels read: pointers to params and grads where they live.

fused_adamw owns its state and nothing else. For every (device, dtype) the optimizer keeps a
:class:`Table`: the params of that key in every param group, and, uploaded to the device, one
row per param that steps now (``kernels/adamw_params.h`` is the contract; the names below
mirror it)::

    rows         int64 [n_rows, ROW_COLS]   param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq and
                                            step addresses, numel, param group
    tile_starts  int64 [n_rows + 1]         the first tile of each row
    hparams      float32 [n_groups, HPARAM_COLS]

Both integer tables travel in one int64 tensor (``packed``: rows then tile_starts), so a change
is one upload. The table changes only when something in it changed (a param's storage, its
grad's address, its state tensors, the set of params with a grad); it is rebuilt from the live
tensors then, never in the steady state. What changed is found by ``_watch.detect``; a rebuild
is validated by ``_validate`` and allocates state through ``_state``; the optimizer's tables
and their hyperparameter rows are kept by ``_tableset.TableSet``.

Memory rules, each applied per param when its row is built (:func:`plan_param`):

* a param of any strides that is dense (contiguous, transposed, channels_last, a slice of a
  flat buffer) is updated over its storage range, in place, at any element offset; its state
  is allocated with the same strides at the same 16-byte phase, so that param and state share
  the vector grid (16-byte vectors over the body, scalar head and tail);
* a grad with the param's strides is read in place; at another 16-byte phase than the param
  (a fresh grad beside a param that ``vector_to_parameters`` placed at an odd offset) the
  kernel runs that param scalar; a grad with other strides is first copied into a scratch
  tensor with the param's strides (``staged``, rare);
* a param that is not dense (a column slice, a view with gaps) is updated through a dense
  scratch copy, written back after the step (``staged``, slower, correct);
* a state tensor the user assigned is used where it lives when it has the param's layout;
  otherwise it is staged like a non-dense param;
* two params whose memory overlaps are refused before anything changes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch

from ._watch import Plan, Watch, address_readers

TILE_ELEMS = 16384  # kernels/adamw_params.h kTileElems
ALIGN_BYTES = 16

# Columns of a row (kernels/adamw_params.h kRow*).
ROW_PARAM = 0
ROW_GRAD = 1
ROW_EXP_AVG = 2
ROW_EXP_AVG_SQ = 3
ROW_MAX_EXP_AVG_SQ = 4
ROW_STEP = 5
ROW_NUMEL = 6
ROW_GROUP = 7
ROW_EXTRA = 8  # the master mode's buffer (master_param, param_remainder, kahan_compensation)
ROW_SEED = 9  # the stochastic rounding seed (state "sr_seed")
ROW_COLS = 10

# Columns of the hyperparameter table (kernels/adamw_params.h kHp*).
HP_LR = 0
HP_BETA1 = 1
HP_BETA2 = 2
HP_EPS = 3
HP_WEIGHT_DECAY = 4
HP_MAXIMIZE = 5
HP_AMSGRAD = 6
HP_DECAY_MODE = 7  # 0.0: decoupled decay (AdamW), 1.0: L2 added to the grad (Adam)
HP_MAX_LR = 8  # decouple_lr: the group's max_lr; 0.0: torch's decay lr * weight_decay
HP_MASTER_MODE = 9  # master_weights of 16-bit params (MASTER_MODES); float32 tables ignore it
HPARAM_COLS = 16  # 64-byte rows; columns 10-15 spare

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# master_weights (kernels/adamw_math.cuh kMaster*) and the state key of each mode's buffer.
MASTER_MODES = {None: 0, "fp32": 1, "remainder": 2, "kahan": 3, "stochastic": 4}
EXTRA_KEYS = {"fp32": "master_param", "remainder": "param_remainder",
              "kahan": "kahan_compensation"}
SEED_KEY = "sr_seed"  # a Python int in state[p] (torch's load casts tensors, not ints)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def extra_dtype(mode: str | None, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype of a mode's buffer for params of ``dtype`` (None: the mode has none)."""
    if dtype not in LOW_PRECISION or mode not in EXTRA_KEYS:
        return None
    return {"fp32": torch.float32, "remainder": torch.int16, "kahan": dtype}[mode]


def tiles_of(phase: int, numel: int) -> int:
    """Tiles of a param of ``numel`` elements whose first element sits ``phase`` elements into
    its 16-byte vector (kernels/adamw_params.h ``tiles_of``)."""
    return 0 if numel <= 0 else (phase + numel + TILE_ELEMS - 1) // TILE_ELEMS


def pack_table(rows: list[tuple], itemsize: int) -> tuple[torch.Tensor, int]:
    """Packs rows ``(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, numel, group,
    extra, seed)`` (addresses as ints; ``extra`` and ``seed`` may be left out: 0) into one CPU
    int64 tensor: rows, then tile_starts. Returns it and the number of tiles."""
    rows = [tuple(r) + (0,) * (ROW_COLS - len(r)) for r in rows]
    n = len(rows)
    packed = torch.empty(n * ROW_COLS + n + 1, dtype=torch.int64)
    if n:
        packed[: n * ROW_COLS] = torch.tensor(rows, dtype=torch.int64).reshape(-1)
    starts, total = [], 0
    for r in rows:
        starts.append(total)
        total += tiles_of((r[ROW_PARAM] % ALIGN_BYTES) // itemsize, r[ROW_NUMEL])
    starts.append(total)
    packed[n * ROW_COLS:] = torch.tensor(starts, dtype=torch.int64)
    return packed, total


# ------------------------------------------------------------------------------------------
# tensors and layouts
# ------------------------------------------------------------------------------------------

_numel = torch.Tensor.numel
_stride = torch.Tensor.stride
_dtype_of = operator.attrgetter("dtype")
_shape_of = operator.attrgetter("shape")


class Repartition(Exception):
    """A param no longer belongs to its table (its dtype or device changed): the optimizer
    rebuilds its tables and prepares again."""

_COMPLEX_TO_REAL = {
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
    torch.complex32: torch.float16,
}


def storage_dtype(t: torch.Tensor) -> torch.dtype:
    """The real dtype a param is stepped as (complex params as real pairs, as torch does)."""
    return _COMPLEX_TO_REAL.get(t.dtype, t.dtype)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update is computed in: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dtensor_class():
    """torch's DTensor class, or None when torch.distributed has none."""
    global _DTENSOR
    if _DTENSOR is False:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:
            try:
                from torch.distributed._tensor import DTensor  # torch < 2.4
            except ImportError:
                DTensor = None
        _DTENSOR = DTensor
    return _DTENSOR


_DTENSOR = False


def is_dtensor(t) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory holds ``t``'s elements here: a DTensor's local shard, else t."""
    return t._local_tensor if is_dtensor(t) else t


def real(t: torch.Tensor) -> torch.Tensor:
    """``t`` as real elements (a view): complex tensors as (..., 2) pairs."""
    return torch.view_as_real(t) if t.is_complex() else t


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one contiguous range of memory, in any order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted(zip(t.stride(), t.shape)):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b (same shape) lay their elements out in the same memory order, both dense."""
    if a.shape != b.shape:
        return False
    if any(sa != sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1):
        return False
    # A view with torch's lazy negation or conjugation bit (z.conj().imag) is staged: the
    # copy resolves it, the kernels read memory as it is.
    return is_dense(b) and not b.is_neg() and not b.is_conj()


def span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte] of the memory ``t`` reads."""
    if t.numel() == 0:
        return (0, 0)
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return (start, start + extent * t.element_size())


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors whose byte spans overlap share an element. Dense tensors do; strided
    ones (the two column halves of one matrix) may interleave without sharing: marked on a
    scratch byte map of the span (only at a table rebuild, only for such a pair)."""
    a, b = real(a), real(b)
    if is_dense(a) and is_dense(b):
        return True
    size = a.element_size()
    (sa, ea), (sb, eb) = span(a), span(b)
    lo, hi = min(sa, sb), max(ea, eb)
    if b.element_size() != size or (sa - lo) % size or (sb - lo) % size or hi - lo > 1 << 30:
        return True  # not on one element grid (or too large to map): assume the worst
    marks = torch.zeros((hi - lo) // size, dtype=torch.uint8)
    for t, start in ((a, sa), (b, sb)):
        marks.as_strided(t.shape, t.stride(), (start - lo) // size).add_(1)
    return bool((marks > 1).any())


def zeros_at_phase(like: torch.Tensor, phase_bytes: int,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.zeros_like(like)`` (same strides: ``like`` is dense) whose data sits
    ``phase_bytes`` into a 16-byte vector, so that it shares the vector grid of a param there.

    NOTE on the extra bytes: at phase 0 (nearly every param: allocators hand out 16-byte
    aligned memory) this is exactly zeros_like. Otherwise the storage has phase_bytes / itemsize
    leading elements more than torch's state, which torch.save also writes (under 16 bytes).
    ``dtype`` (state_dtype, a master buffer): another element type at the same *element*
    phase (the param's phase in elements, times this dtype's size).
    """
    dtype = like.dtype if dtype is None else dtype
    itemsize = like.element_size()
    if phase_bytes == 0 or phase_bytes % itemsize:
        return torch.zeros_like(like, memory_format=torch.preserve_format, dtype=dtype)
    extra = phase_bytes // itemsize
    base = torch.zeros(extra + like.numel(), dtype=dtype, device=like.device)
    return base.as_strided(like.shape, like.stride(), extra)



def describe(name: str, t: torch.Tensor) -> str:
    return f"{name} (shape {tuple(t.shape)}, {t.dtype})"


# ------------------------------------------------------------------------------------------
# streams: the device buffers the kernels read (the packed table, the hparams rows)
# ------------------------------------------------------------------------------------------
# NOTE on streams: a buffer the kernels read is written (an upload, a Tensor hyperparameter's
# copy) on the stream current at that step, and a launch reads it on the stream current at
# its step. A step on another stream than the last one would overwrite a buffer that a launch
# may still read. So each such buffer has a list of its users: the streams that used it since
# it was last written. A write waits on every other user (before_write: an event recorded now
# on it, after its launches) and leaves the writing stream the only user; a launch adds its
# stream (used_on); a buffer dropped is recorded on its users (retire: torch's record_stream),
# so that the caching allocator hands its memory out again only after they are done. On one
# stream (the steady state) this is a comparison per launch and per write, no CUDA call.


def current_stream(device: torch.device):
    """The stream work for ``device`` is queued on now; None where work is not asynchronous
    (the CPU)."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def used_on(users: list, stream) -> None:
    """A launch on ``stream`` reads the buffer whose users are ``users``."""
    if stream not in users:
        users.append(stream)


def before_write(device: torch.device, users: list) -> None:
    """Orders a write, next on ``device``'s current stream, into the buffer whose users are
    ``users`` after their work; the writing stream is then its only user."""
    stream = current_stream(device)
    if stream is None:
        return
    for s in users:
        if s != stream:
            stream.wait_stream(s)
    users[:] = [stream]


def retire(buf: torch.Tensor | None, users: list) -> None:
    """``buf``, a buffer the kernels read, is dropped: its memory is reused only after the
    work of its users is done."""
    if buf is None:
        return
    for s in users:
        buf.record_stream(s)


# ------------------------------------------------------------------------------------------
# the table of one (device, dtype)
# ------------------------------------------------------------------------------------------


@dataclass
class Row:
    """What the kernel reads for one param that steps now: real (non-complex) tensors of the
    same shape and memory order (the param's), and its step count."""

    index: int  # the param's position in Table.params
    group: int
    param: torch.Tensor
    grad: torch.Tensor | None  # only on tables that stage or view grads (see Table.release)
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor | None
    step: torch.Tensor  # 0-d float32 on the param's device
    extra: torch.Tensor | None = None  # the master mode's buffer (real view)
    seed: int = 0  # stochastic rounding seed


class Table:
    """The params of one (device, storage dtype) from every param group, and what the kernels
    read for them. The optimizer owns one per key; backends read ``packed``, ``rows`` and the
    optimizer's ``hparams``."""

    def __init__(self, device: torch.device, dtype: torch.dtype, params: list, groups: list[int],
                 names: list[str], state_dtype: torch.dtype | None = None) -> None:
        self.device, self.dtype = device, dtype
        # The moments' dtype (state_dtype; the params' by default, as torch).
        self.state_dtype = dtype if state_dtype is None else state_dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.params, self.groups, self.names = params, groups, names
        self.has_dtensor = any(map(is_dtensor, params))
        self.backend: Any = None
        # What the rows were built from (compared with the live tensors every step).
        self.data_ptrs: list[int] | None = None
        self.geometry: tuple | None = None  # the params' numels, dtypes, strides, shapes
        self.locals: list | None = None
        self.grad_ids: list[int] | None = None
        self.mask: list[bool] | None = None
        self.grad_ptrs: list[int] = []
        self.shapes: list = []  # the rows' shapes (what fresh grads must have)
        self.state_tensors: list[torch.Tensor] = []  # every state tensor the rows point to
        self.state_ptrs: list[int] = []
        self.state_geometry: tuple = ([], [], [])  # the state tensors' shapes, strides, dtypes
        self.amsgrad_sig: tuple | None = None
        self.fast_grads = False  # fresh grads may be swapped in without a rebuild
        self.watch = Watch()  # the compiled pass's record (_watch.py)
        self.grads_in_watch = False  # grad_ids and grad_ptrs are stale: the watch has them
        # What the kernels read.
        self.rows: list[Row] = []
        self.kernel_grads: list[torch.Tensor] = []  # row i's grad as the kernel reads it
        self.host_packed: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None
        self.n_rows = self.n_tiles = 0
        self.has_max = False
        self.hparams: torch.Tensor | None = None  # the optimizer's table for this device
        self.host_hparams: list[list[float]] = []
        # Staged tensors (see the module docstring): copied in before and out after the launch.
        self.stage_in: list[tuple[torch.Tensor, torch.Tensor]] = []  # (scratch, source)
        self.stage_out: list[tuple[torch.Tensor, torch.Tensor]] = []  # (destination, scratch)
        self.stage_grads: list[tuple[torch.Tensor, torch.Tensor]] = []  # (grad, scratch)
        # GradScaler's values for this step (float32 0-d tensors on this device, or None):
        # set by the optimizer around the launch, read by every backend.
        self.grad_scale: torch.Tensor | None = None
        self.found_inf: torch.Tensor | None = None
        self.torch_lists: dict | None = None  # the torch backend's per-group lists (cached)
        self.rebuilds = 0  # how many times rows were built (tests and the bench read it)
        # CUDA: the streams that used ``packed`` since its last write (the NOTE on streams);
        # whether a CUDA graph captured a launch that reads it, and the captured buffers
        # replaced since (kept for the graphs' life: see the NOTE on CUDA graphs in _upload).
        self.users: list = []
        self.captured = False
        self.graph_buffers: list[torch.Tensor] = []

    # -------------------------------------------------------------------------- per step

    def prepare(self, state, groups: list[dict], rebuild: bool, amsgrad_sig: tuple) -> Plan:
        """Compares the live tensors with what the rows hold (``_watch.detect``) and validates
        whatever changed (``_validate``): raises, naming the param and what is wrong, before
        anything is modified; the returned plan is carried out by :meth:`commit`.
        ``rebuild``: the optimizer knows the rows are stale (state or param groups edited)."""
        plan = _watch.detect(self, rebuild, amsgrad_sig)
        if plan.kind != "rebuild":
            return plan
        return _validate.plan_rebuild(self, state, groups, plan.grads, plan.mask,
                                      plan.active_grads, plan.data_ptrs, plan.locals)

    def commit(self, plan: Plan, state, groups: list[dict]) -> None:
        """Carries out a plan of :meth:`prepare`: allocates state (torch's keys, at a param's
        first step with a grad), rebuilds or patches the rows and uploads them."""
        if plan.kind == "idle":
            self.watch.disarm()
            self.grads_in_watch = False
            self.grad_ids = list(map(id, plan.grads)) if plan.grads else None
            self.mask = plan.mask or None
            if not self.rows and self.packed is not None:
                return  # idle before as now: nothing to rebuild (and nothing allocated)
            self.grad_ptrs, self.shapes = [], []
            self.state_tensors, self.state_ptrs, self.state_geometry = [], [], ([], [], [])
            self.rows, self.kernel_grads = [], []
            self._rebuild_packed()
            return
        if plan.kind == "same":
            if self.fast_grads:
                self.kernel_grads = plan.active_grads
        elif plan.kind == "grads":  # only on fast tables: every grad contiguous, real, unstaged
            self.kernel_grads = plan.active_grads
            self._patch_grads(plan.grad_ptrs)
            if plan.scanned:
                self.watch.took()
                self.grads_in_watch = True
            else:
                self.grad_ids, self.mask = plan.grad_ids, plan.mask
                self.grad_ptrs = plan.grad_ptrs
        else:
            self._build_rows(plan, state, groups)
        if not plan.scanned:
            _watch.arm_after(self, plan)

    def release(self) -> None:
        """Drops this step's grads after the launch (the table keeps their ids and addresses):
        a grad freed by zero_grad() must not stay alive through the next backward."""
        if self.fast_grads:
            self.kernel_grads = []

    def _build_rows(self, plan: Plan, state, groups: list[dict]) -> None:
        for scratch, _ in self.stage_in:
            retire(scratch, self.users)
        self.stage_in, self.stage_out, self.stage_grads = [], [], []
        rows = []
        fast = True
        for rp in plan.rows:
            lp = rp.local
            dense = is_dense(lp) and not lp.is_neg()  # else staged, as same_layout says
            like = lp if dense else torch.empty_like(lp)
            phase = lp.data_ptr() % ALIGN_BYTES if dense else 0
            st = _state.new_state(state, rp.param, rp.state, rp.amsgrad, self.dtype,
                                  self.state_dtype, like, phase, rp.mode)
            extra, seed = _state.master_state(rp.param, rp.mode, st, lp, like, phase, self.dtype)
            if rp.fix_step:  # a Python number, another dtype or device: torch's fused layout
                step = st["step"]
                step = local(step) if is_dtensor(step) else step
                st["step"] = torch.as_tensor(step, dtype=torch.float32).to(lp.device).reshape(())
            walk = real(like if dense else self._stage(like, lp, out=True))
            grad = self._direct_or_staged(walk, real(rp.grad), out=False)
            fast = fast and dense and grad is not None and lp.is_contiguous()
            if grad is None:
                grad = self._stage(walk, real(rp.grad), out=False)
            tensors = []
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key == "max_exp_avg_sq" and not rp.amsgrad:
                    tensors.append(None)
                    continue
                t = real(local(st[key]))
                direct = self._direct_or_staged(walk, t, out=True)
                fast = fast and direct is not None
                tensors.append(direct if direct is not None else self._stage(walk, t, out=True))
            if extra is not None:
                t = real(local(extra))
                direct = self._direct_or_staged(walk, t, out=True)
                fast = fast and direct is not None
                extra = direct if direct is not None else self._stage(walk, t, out=True)
            rows.append(Row(rp.index, rp.group, walk, grad, tensors[0], tensors[1], tensors[2],
                            st["step"], extra, seed))
            if type(dict.get(state, rp.param)) is dict and hasattr(state, "_owner"):
                state[rp.param] = st  # a plain dict put in by update(): track its edits
        self.rows = rows
        self.kernel_grads = [r.grad for r in rows]
        # A table with staged or complex rows is rebuilt whenever fresh grads arrive.
        self.fast_grads = fast and not any(p.is_complex() for p in plan.locals)
        if self.fast_grads:
            for r in rows:
                r.grad = None  # kept only by kernel_grads, and only until release()
        state_tensors = []
        for rp in plan.rows:
            st = dict.get(state, rp.param)
            keys = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if rp.amsgrad else ())
            if rp.mode in EXTRA_KEYS:
                keys += (EXTRA_KEYS[rp.mode],)
            state_tensors.extend(local(st[k]) for k in keys)
        self.state_tensors = state_tensors
        self.state_ptrs = address_readers()[0](state_tensors)
        self.state_geometry = (list(map(_shape_of, state_tensors)),
                               list(map(_stride, state_tensors)),
                               list(map(_dtype_of, state_tensors)))
        self.shapes = [r.param.shape for r in rows]
        self.data_ptrs, self.locals = plan.data_ptrs, plan.locals
        self.geometry = (list(map(_numel, plan.locals)), list(map(_dtype_of, plan.locals)),
                         list(map(_stride, plan.locals)), list(map(_shape_of, plan.locals)))
        self.grad_ids, self.mask = list(map(id, plan.grads)), plan.mask
        self.grad_ptrs = address_readers()[0](plan.active_grads)
        self.amsgrad_sig = tuple(bool(g["amsgrad"]) for g in groups)
        self.torch_lists = None
        self.rebuilds += 1
        self._rebuild_packed()

    def mode_of(self, group: dict) -> str | None:
        """The master mode a row of ``group`` runs under here: the group's master_weights for
        16-bit params, None for float32 tables (the option means nothing there)."""
        return group.get("master_weights") if self.dtype in LOW_PRECISION else None

    @staticmethod
    def _direct_or_staged(walk: torch.Tensor, t: torch.Tensor, out: bool):
        """``t`` itself when the kernel can walk it beside ``walk``, else None (stage it)."""
        return t if same_layout(walk, t) else None

    def _stage(self, like: torch.Tensor, source: torch.Tensor, out: bool) -> torch.Tensor:
        # In the source's dtype: a state tensor may be wider than the param (fp32 moments or
        # master weights of a bf16 param).
        scratch = (torch.empty_like(like, dtype=source.dtype) if like.shape == source.shape
                   else None)
        if scratch is None:
            raise RuntimeError(f"cannot stage a tensor of shape {tuple(source.shape)} beside "
                               f"{tuple(like.shape)}")
        self.stage_in.append((scratch, source))
        if out:
            self.stage_out.append((source, scratch))
        else:  # a grad: written back only when a GradScaler unscales it (stage_after)
            self.stage_grads.append((source, scratch))
        return scratch

    def _row_tuples(self) -> list[tuple]:
        return [(r.param.data_ptr(), g.data_ptr(), r.exp_avg.data_ptr(),
                 r.exp_avg_sq.data_ptr(),
                 r.max_exp_avg_sq.data_ptr() if r.max_exp_avg_sq is not None else 0,
                 r.step.data_ptr(), r.param.numel(), r.group,
                 r.extra.data_ptr() if r.extra is not None else 0, r.seed)
                for r, g in zip(self.rows, self.kernel_grads)]

    def _rebuild_packed(self) -> None:
        host, n_tiles = pack_table(self._row_tuples(), self.itemsize)
        self.n_rows, self.n_tiles = len(self.rows), n_tiles
        self.has_max = any(r.max_exp_avg_sq is not None for r in self.rows)
        self._upload(host)

    def _patch_grads(self, grad_ptrs: list[int]) -> None:
        host = self.host_packed
        if self.device.type != "cpu":
            host = host.clone()  # the previous upload may still read the old host buffer
        # Written through numpy: no torch op (capturable steps dispatch no allocation).
        host.numpy()[ROW_GRAD: self.n_rows * ROW_COLS: ROW_COLS] = grad_ptrs
        self._upload(host)

    def _upload(self, host: torch.Tensor) -> None:
        """The packed table where the kernel reads it: host memory on CPU, else one copy from
        pinned memory (asynchronous: no host sync)."""
        if self.device.type == "cpu":
            self.host_packed = self.packed = host
            return
        if self.device.type == "cuda" and not host.is_pinned():
            host = host.pin_memory()
        # NOTE on the host buffer: it is never written once its copy is queued (_patch_grads
        # writes a clone); dropped, torch's caching host allocator reuses it only after the
        # copy ran (a non_blocking copy from pinned memory records an event on its stream).
        self.host_packed = host
        if self.captured:
            # NOTE on CUDA graphs: a captured step reads this buffer at every replay, for the
            # graph's life, which the optimizer cannot see end. An eager step that changes the
            # table after a capture (new grads, a rebuild) therefore writes a new buffer and
            # keeps the captured one, unchanged and allocated: the graph replays what it
            # captured (as with its other inputs, keeping them valid is the graph owner's
            # part), and eager steps step what they see. Refusing the change instead would
            # forbid eager steps beside a graph; the cost is one table (n_rows * 88 bytes)
            # kept per capture followed by a change.
            self.graph_buffers.append(self.packed)
            self.packed, self.captured, self.users = None, False, []
        if self.packed is None or self.packed.numel() != host.numel():
            retire(self.packed, self.users)
            self.packed = torch.empty(host.numel(), dtype=torch.int64, device=self.device)
            self.users = []
        before_write(self.device, self.users)
        self.packed.copy_(host, non_blocking=True)

    def stage_before(self) -> None:
        if self.stage_in:
            # The scratch tensors are read by the launches as the table is: same users.
            before_write(self.device, self.users)
            torch._foreach_copy_([s for s, _ in self.stage_in], [src for _, src in self.stage_in])

    def stage_after(self) -> None:
        # NOTE on GradScaler: a skipped step writes nothing, so copying the untouched scratch
        # back is a no-op; an unscaled grad goes back to p.grad as the kernels write it.
        out = self.stage_out + (self.stage_grads if self.grad_scale is not None else [])
        if out:
            torch._foreach_copy_([d for d, _ in out], [s for _, s in out])

    # -------------------------------------------------------------------------- kernels' view

    def rows_ptr(self) -> int:
        return self.packed.data_ptr()

    def tile_starts_ptr(self) -> int:
        return self.packed.data_ptr() + 8 * ROW_COLS * self.n_rows


# The table's helpers import from this module: loaded once everything above is defined.
from . import _state, _validate, _watch  # noqa: E402
