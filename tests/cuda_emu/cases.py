"""Param tables over raw buffers, for the kernel tests (tests/test_kernel_emulation.py on the
CPU emulation, tests/test_cuda_kernel.py on a GPU).

A :class:`Case` is a list of params, each with its own separately allocated param, grad,
exp_avg, exp_avg_sq (and max_exp_avg_sq) buffers placed at a chosen element offset ("phase")
inside their allocation, the rest of the allocation a guard region filled with a bit pattern:

    layout "guarded": [guard | phase | numel elements | guard]
    layout "exact":   [guard | phase | numel elements]      (the allocation ends with the
                                                             buffer: ASan's redzone follows)

``Case.clone()`` copies every allocation (same phases: the allocators align to 64 bytes), so
one case runs through the kernel and its clone through the CPU loop, and the two are compared
bit for bit, guards included. Params that are "not in the table" (no grad this step) keep
every buffer poisoned with NaN; a row of a group without amsgrad may still carry a poisoned
max_exp_avg_sq pointer, which the kernel must ignore.

Low-precision tables (issue #13): ``state_dtype`` gives the moments another dtype (at the
param's element phase modulo their own vector), and a group's ``master`` key (None, "fp32",
"remainder", "kahan", "stochastic") its master mode (hparams column HP_MASTER_MODE): its rows
get the mode's "extra" buffer (float32 master, int16 remainder, Kahan compensation of the
param's dtype; at the param's element phase modulo its own vector, or ``extra_phase``) and a
stochastic-rounding seed. A row whose mode has no buffer (none,
stochastic, any float32 row) may still carry a poisoned extra pointer (``max_in_row``), which
the kernel must ignore, as the max buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ITEMSIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.int16: 2}
BITS = {4: torch.int32, 2: torch.int16}
PATTERN = {4: 0x7FA5A5A5, 2: 0x7DA5}  # guard fill (as int32 / int16 bits)
GUARD_BYTES = 64
BUFFERS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "extra")
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # of the case's state_dtype
STATES = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # what a step writes
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
TILE = 16384


def phases(dtype) -> int:
    """Element offsets inside a 16-byte vector: 4 (fp32) or 8 (16-bit)."""
    return 16 // ITEMSIZE[dtype]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.element_size()])


@dataclass
class Buf:
    """``numel`` elements at element offset ``phase`` (mod 16 bytes) inside one allocation
    with guard regions."""
    store: torch.Tensor
    front: int
    numel: int
    layout: str

    @classmethod
    def new(cls, numel, dtype, phase, layout, device="cpu"):
        isz = ITEMSIZE[dtype]
        front = GUARD_BYTES // isz + phase
        total = front + numel + (GUARD_BYTES // isz if layout == "guarded" else 0)
        store = torch.empty(total, dtype=dtype, device=device)
        assert store.data_ptr() % 16 == 0
        bits(store).fill_(PATTERN[isz])
        return cls(store, front, numel, layout)

    @property
    def view(self) -> torch.Tensor:
        return self.store[self.front:self.front + self.numel]

    @property
    def addr(self) -> int:
        return self.store.data_ptr() + self.front * self.store.element_size()

    def guards_intact(self) -> bool:
        pat = PATTERN[self.store.element_size()]
        b = bits(self.store)
        return bool((b[:self.front] == pat).all()) and bool(
            (b[self.front + self.numel:] == pat).all())

    def clone(self, device=None) -> "Buf":
        store = (self.store.to(device, copy=True) if device is not None
                 else self.store.clone())
        assert store.data_ptr() % 16 == 0
        return Buf(store, self.front, self.numel, self.layout)


@dataclass
class Spec:
    numel: int
    group: int = 0
    phase: int = 0            # the param's (and exp_avg's, exp_avg_sq's) element phase
    grad_phase: int | None = None  # None: the param's
    max_phase: int | None = None   # None: the param's
    extra_phase: int | None = None  # the master mode's buffer; None: the param's
    in_table: bool = True     # False: no grad this step (not in the table), all poisoned
    max_in_row: bool = True   # a non-amsgrad group's row still points at a (poisoned) max buffer
    step0: float = 0.0


@dataclass
class Param:
    spec: Spec
    bufs: dict
    step: torch.Tensor

    def clone(self, device=None) -> "Param":
        return Param(self.spec, {k: b.clone(device) for k, b in self.bufs.items()},
                     self.step.to(device, copy=True) if device is not None
                     else self.step.clone())


GROUPS = [  # hparams of up to 3 groups: decay and not, maximize and not, other betas
    dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False),
    dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.0, maximize=True),
    dict(lr=1e-2, beta1=0.95, beta2=0.9995, eps=1e-8, weight_decay=0.1, maximize=False),
]


def hparams(groups) -> torch.Tensor:
    """The float32 [n_groups, HPARAM_COLS] table of python/fused_adamw/_table.py (its HP_*
    columns; a group's optional keys decay_mode and max_lr fill the columns of the same name
    when the table has them)."""
    from fused_adamw import _table as T
    hp = torch.zeros(len(groups), T.HPARAM_COLS, dtype=torch.float32)
    for i, g in enumerate(groups):
        for col, key in ((T.HP_LR, "lr"), (T.HP_BETA1, "beta1"), (T.HP_BETA2, "beta2"),
                         (T.HP_EPS, "eps"), (T.HP_WEIGHT_DECAY, "weight_decay"),
                         (T.HP_MAXIMIZE, "maximize"), (T.HP_AMSGRAD, "amsgrad")):
            hp[i, col] = float(g[key])
        if g.get("master") is not None:
            hp[i, T.HP_MASTER_MODE] = float(T.MASTER_MODES[g["master"]])
        for name, key in (("HP_DECAY_MODE", "decay_mode"), ("HP_MAX_LR", "max_lr")):
            if key in g:
                if not hasattr(T, name):
                    raise KeyError(f"the table has no {name} column (for {key})")
                hp[i, getattr(T, name)] = float(g[key])
    return hp


@dataclass
class Case:
    dtype: torch.dtype
    params: list
    groups: list  # dicts with GROUPS' keys plus amsgrad
    device: str = "cpu"
    state_dtype: torch.dtype | None = None  # None: dtype
    seeds: list = field(default_factory=list)  # per param: its stochastic rounding seed
    _table: tuple | None = field(default=None, repr=False)

    @property
    def sdtype(self) -> torch.dtype:
        return self.dtype if self.state_dtype is None else self.state_dtype

    @property
    def lowp(self) -> bool:
        """Moments of another dtype, or a group with a master mode: the extra column matters."""
        return self.sdtype != self.dtype or any(g.get("master") for g in self.groups)

    def extra_dtype(self, group: int) -> torch.dtype | None:
        """The dtype of the extra buffer of a row of ``group`` (None: its mode has none)."""
        from fused_adamw._table import extra_dtype
        return extra_dtype(self.groups[group].get("master"), self.dtype)

    @classmethod
    def new(cls, dtype, specs, groups, layout="guarded", seed=0, device="cpu",
            state_dtype=None):
        gen = torch.Generator().manual_seed(seed)
        case = cls(dtype, [], [dict(g) for g in groups], device, state_dtype)
        for s in specs:
            ams = groups[s.group]["amsgrad"]
            edt = case.extra_dtype(s.group)
            bufs = {}
            for name in BUFFERS:
                if name == "max_exp_avg_sq" and not ams and not s.max_in_row:
                    continue
                if name == "extra" and (not case.lowp or (edt is None and not s.max_in_row)):
                    continue
                bdt = case.sdtype if name in MOMENTS else dtype
                if name == "extra":
                    bdt = dtype if edt is None else edt  # no buffer: a poisoned one
                phase = {"grad": s.grad_phase, "max_exp_avg_sq": s.max_phase,
                         "extra": s.extra_phase}.get(name)
                phase = (s.phase if phase is None else phase) % phases(bdt)
                b = Buf.new(s.numel, bdt, phase, layout, device)
                poisoned = (not s.in_table or (name == "max_exp_avg_sq" and not ams)
                            or (name == "extra" and edt is None))
                if poisoned:
                    b.view.fill_(0x5A5A if bdt == torch.int16 else float("nan"))
                elif name == "param":
                    b.view.copy_(torch.randn(s.numel, generator=gen).to(dtype))
                elif name == "extra":
                    b.view.copy_(cls._extra_init(groups[s.group]["master"], dtype,
                                                 bufs["param"].view, gen))
                elif name != "grad":
                    b.view.zero_()
                bufs[name] = b
            step = torch.tensor(float(s.step0), dtype=torch.float32, device=device)
            case.params.append(Param(s, bufs, step))
            case.seeds.append(int(torch.randint(0, 2**62, (), generator=gen)) * 2 + 1)
        case.new_grads(gen)
        return case

    @staticmethod
    def _extra_init(mode, dtype, param, gen) -> torch.Tensor:
        """A mode's buffer as a run leaves it, with the cases a run can meet: a master that
        rounds to the param (taken) and one that does not (the user wrote the param: the
        param wins), remainders of both signs (a negative one joins below the param),
        compensations of both signs."""
        n = param.numel()
        if mode == "fp32":
            m = param.float() * (1 + 1e-4 * torch.randn(n, generator=gen))
            m[::7] += 1.0  # rn(master) != param: the param wins
            return m
        if mode == "remainder":
            return torch.randint(-2**15, 2**15, (n,), generator=gen, dtype=torch.int16)
        return (param.float() * 1e-3 * torch.randn(n, generator=gen)).to(dtype)  # kahan

    def clone(self, device=None) -> "Case":
        c = Case(self.dtype, [p.clone(device) for p in self.params],
                 [dict(g) for g in self.groups], device or self.device, self.state_dtype)
        c.seeds = list(self.seeds)
        return c

    def new_grads(self, gen: torch.Generator) -> None:
        """Fresh grads for the params in the table, none with |g| < 1e-3 (so that every
        exp_avg element is nonzero after a step from zero state: the coverage check)."""
        for p in self.params:
            if p.spec.in_table:
                g = torch.randn(p.spec.numel, generator=gen)
                g[g.abs() < 1e-3] = 0.5
                p.bufs["grad"].view.copy_(g.to(self.dtype))

    def copy_grads_from(self, other: "Case") -> None:
        for p, q in zip(self.params, other.params):
            if p.spec.in_table:
                p.bufs["grad"].view.copy_(q.bufs["grad"].view)

    # -- the table ------------------------------------------------------------------------

    def rows(self):
        out = []
        for i, p in enumerate(self.params):
            if not p.spec.in_table:
                continue
            b = p.bufs
            mx = b["max_exp_avg_sq"].addr if "max_exp_avg_sq" in b else 0
            row = (b["param"].addr, b["grad"].addr, b["exp_avg"].addr, b["exp_avg_sq"].addr,
                   mx, p.step.data_ptr(), p.spec.numel, p.spec.group)
            if self.lowp:  # ROW_EXTRA, ROW_SEED
                row += (b["extra"].addr if "extra" in b else 0, self.seeds[i])
            out.append(row)
        return out

    def table(self):
        """(packed rows + tile_starts, hparams, n_rows, n_tiles) on the case's device; built
        once (the addresses never change)."""
        if self._table is None:
            from fused_adamw._table import pack_table
            rows = self.rows()
            packed, n_tiles = pack_table(rows, ITEMSIZE[self.dtype])
            hp = hparams(self.groups)
            self._table = (packed.to(self.device), hp.to(self.device), len(rows), n_tiles)
        return self._table

    @property
    def has_max(self) -> bool:
        return any(self.groups[p.spec.group]["amsgrad"] for p in self.params if p.spec.in_table)

    def args(self):
        from fused_adamw._table import ROW_COLS
        packed, hp, n_rows, n_tiles = self.table()
        ptr = packed.data_ptr()
        return (ptr, ptr + 8 * ROW_COLS * n_rows, hp.data_ptr(), n_rows, n_tiles, len(self.groups),
                DTYPE_CODES[self.dtype])

    @property
    def master_modes(self) -> bool:
        return self.dtype != torch.float32 and any(g.get("master") for g in self.groups)

    def step_cuda(self, C, device=0, stream=0, **amp):
        """``amp``: grad_scale / found_inf addresses (GradScaler's scalars), as _C takes them."""
        if self.lowp:
            amp = dict(amp, state_dtype=DTYPE_CODES[self.sdtype], master_modes=self.master_modes)
        C.step_cuda(*self.args(), self.has_max, device, stream, **amp)

    def step_cpu(self, C, threads=1, **amp):
        if self.lowp:
            amp = dict(amp, state_dtype=DTYPE_CODES[self.sdtype])
        C.step_cpu(*self.args(), threads, **amp)

    @property
    def n_tiles(self) -> int:
        return self.table()[3]

    # -- checks ---------------------------------------------------------------------------

    def snapshot(self) -> list[dict]:
        return [{k: b.store.clone() for k, b in p.bufs.items()} for p in self.params]

    def untouchable(self):
        """(param index, buffer name) of every buffer a step must not write: all buffers of a
        param not in the table, and the max buffer of a group without amsgrad."""
        for i, p in enumerate(self.params):
            for name in p.bufs:
                if not p.spec.in_table or (name == "max_exp_avg_sq"
                                           and not self.groups[p.spec.group]["amsgrad"]) or (
                        name == "extra" and self.extra_dtype(p.spec.group) is None):
                    yield i, name


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    """Where and how two same-shape tensors differ bitwise (for assertion messages)."""
    ne = (bits(a) != bits(b)).nonzero().flatten()
    if ne.numel() == 0:
        return "identical"
    i = int(ne[0])
    return (f"{ne.numel()} of {a.numel()} elements differ, first at {i}: "
            f"{a[i].item()!r} vs {b[i].item()!r}")


def compare(ours: Case, ref: Case, what="kernel vs CPU loop") -> None:
    """Every buffer (guards included) and step count of two cases bit for bit."""
    problems = []
    for i, (p, q) in enumerate(zip(ours.params, ref.params)):
        for name in p.bufs:
            a, b = p.bufs[name], q.bufs[name]
            if not torch.equal(bits(a.store.cpu()), bits(b.store.cpu())):
                inner = first_difference(a.view.cpu(), b.view.cpu())
                problems.append(f"param {i} ({p.spec}) {name}: buffer: {inner}; "
                                f"guards intact: {a.guards_intact()}")
        if not torch.equal(p.step.cpu(), q.step.cpu()):
            problems.append(f"param {i} step {p.step.item()} vs {q.step.item()}")
    assert not problems, f"{what}:\n  " + "\n  ".join(problems[:12])


def check_guards(case: Case) -> None:
    bad = [f"param {i} ({p.spec}) {name}" for i, p in enumerate(case.params)
           for name, b in p.bufs.items() if not b.guards_intact()]
    assert not bad, "written outside the buffer (guard pattern changed):\n  " + "\n  ".join(bad)


def check_untouched(case: Case, before: list[dict]) -> None:
    bad = [f"param {i} ({case.params[i].spec}) {name}" for i, name in case.untouchable()
           if not torch.equal(bits(case.params[i].bufs[name].store), bits(before[i][name]))]
    assert not bad, "a buffer the step must not write was written:\n  " + "\n  ".join(bad)


def check_covered(case: Case) -> None:
    """After a first step from zero state: every exp_avg element of every row is nonzero."""
    bad = []
    for i, p in enumerate(case.params):
        if p.spec.in_table and p.spec.numel:
            zero = (p.bufs["exp_avg"].view == 0).nonzero().flatten()
            if zero.numel():
                bad.append(f"param {i} ({p.spec}): {zero.numel()} elements not updated, "
                           f"first {int(zero[0])}")
    assert not bad, "elements the step did not reach:\n  " + "\n  ".join(bad)
