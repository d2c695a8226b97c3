"""Times one optimizer step: every available fused_adamw backend against torch.optim.AdamW.

    python bench/bench_step.py                       # every case; results in bench/out/
    python bench/bench_step.py --quick --out /tmp/b  # tiny sizes: a smoke test
    python bench/bench_step.py --out bench/results   # results meant to be committed
    python bench/bench_step.py --cases flat,small --dtypes float32 --backends cpu,torch-fused
    python bench/bench_step.py --suite --out /tmp/s  # the GPU suite's cut (bench/gpu_suite.sh)

Implementations: FusedAdamW with each backend that can run on the device ("cuda", "triton",
"cpu", "torch"; the ones that cannot run are listed as skipped with the dispatcher's reason),
and torch.optim.AdamW for-loop (foreach=False), foreach (foreach=True) and fused (fused=True)
on the same params. Each is measured with two grad modes, prepared outside the timed region:

* "fresh": ``opt.zero_grad()`` (set_to_none=True, the default) and new grad tensors assigned
  before every step, as after a backward pass;
* "persistent": ``opt.zero_grad(set_to_none=False)`` and the same grad tensors, refilled in
  place, every step.

Only fused_adamw's public API is used (``FusedAdamW(params, backend=...)``, ``step()``,
``zero_grad()``, ``.backend``, ``fused_adamw._dispatch.unavailable_reason``), so the benchmark
does not depend on how the optimizer stores params and state.

The implementations of a case are timed round-robin, one step of each per repetition (as many
at a time as fit in memory), so load on the machine affects them alike. For each (case,
implementation, grads): median step time with p20 and p80, bytes moved from an explicit
formula (:func:`bytes_per_param`), GB/s, the ratio to the device's copy bandwidth measured in
the same run, the speedup over each torch variant, the host time of step() (GPU), the extra
memory allocated during step() (GPU) and the bytes of optimizer state. A separate "host" case
times step() on 5,000 and on 100,000 one-element CPU params: the optimizer's cost per param
on the host, and whether it grows linearly.
On a GPU the kernel time is measured beside the host time: CUDA events around the step()
queued behind a GPU busy-wait, so the kernels run back to back, with no launch gap.

``--suite`` is the cut bench/gpu_suite.sh runs in its minute: cuda, triton and torch fused,
fresh grads, flat fp32 and bf16 buffers of 1e9, 1e8 and 1e6 params, 5,000 x 10k, and one case
per low-precision kind (``lowp``: bf16 params with an fp32 master, with the remainder, with
stochastic rounding, and fp32 params with bf16 moments), 10 timed steps after 3 warm-up.

The copy bandwidth is measured at the start, beside every case and at the end; when it varies
by more than 20%, or the load average exceeds the core count, the run is flagged as loaded: a
warning beside the table and in every JSON record (``load_warning``).

Output, in ``--out`` (default bench/out/, not tracked by git): ``results.jsonl`` (one JSON
line per row; replaced unless --append), ``<device-slug>.txt`` (the report) and a PNG plot
when matplotlib is installed. The report also goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fused_adamw
from fused_adamw import FusedAdamW, _dispatch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "out"

LR, WEIGHT_DECAY = 1e-3, 1e-2  # the same hyperparameters for every implementation

FUSED_BACKENDS = ("cuda", "triton", "cpu", "torch")  # FusedAdamW(backend=...)
TORCH_VARIANTS = {  # torch.optim.AdamW keyword arguments
    "torch-forloop": dict(foreach=False, fused=False),
    "torch-foreach": dict(foreach=True, fused=False),
    "torch-fused": dict(fused=True),
}
ALL_IMPLS = FUSED_BACKENDS + tuple(TORCH_VARIANTS)
GRAD_MODES = ("fresh", "persistent")
CASE_KINDS = ("flat", "llm", "small", "flat-amsgrad", "host", "lowp")
DEFAULT_CASES = ("flat", "llm", "small", "flat-amsgrad", "host")
# The low-precision kinds (the "lowp" cases): param dtype and FusedAdamW's options. torch's
# AdamW has neither option: its variants are skipped there (the flat rows are their baseline).
LOWP_KINDS = {
    "bf16-master-fp32": (torch.bfloat16, dict(master_weights="fp32")),
    "bf16-remainder": (torch.bfloat16, dict(master_weights="remainder")),
    "bf16-stochastic": (torch.bfloat16, dict(master_weights="stochastic")),
    "fp32-bf16-moments": (torch.float32, dict(state_dtype=torch.bfloat16)),
}
SUITE_IMPLS = ("cuda", "triton", "torch-fused")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16"}
HOST_IMPLS = ("cpu", "torch-fused")  # the host case: FusedAdamW(backend="cpu") vs torch fused
COPY_SPREAD_LIMIT = 1.2  # max / min copy bandwidth above this flags the run as loaded

# Result keys every JSON line has (the smoke test checks them).
RECORD_KEYS = (
    "case", "kind", "dtype", "amsgrad", "n_tensors", "numel", "impl", "family", "backend",
    "backend_used", "grads", "status", "reason", "median_ms", "p20_ms", "p80_ms",
    "bytes_per_param", "bytes_moved", "gbps", "copy_gbps", "frac_of_copy", "speedup",
    "host_us", "extra_mem_bytes", "state_bytes", "ns_per_param", "p20_ns_per_param",
    "p80_ns_per_param", "host_ratio", "sets", "interleaved_with", "reps", "warmup", "device",
    "device_name", "cores", "threads", "torch", "triton", "cuda", "fused_adamw", "git_commit",
    "git_dirty", "date", "quick", "loadavg", "copy_gbps_run", "load_warning", "kernel_ms",
    "options", "thread_ms", "thread_ratio",
)


# ---------------------------------------------------------------------------- cases


def llm_shapes(d_model: int, n_layers: int, vocab: int, mlp_mult: int = 4) -> list[tuple]:
    """A GPT/LLaMA-like parameter list: token embedding; per layer a norm, q, k, v, o, a norm,
    MLP up and down (no biases); a final norm; an untied head."""
    shapes: list[tuple] = [(vocab, d_model)]
    for _ in range(n_layers):
        shapes += [(d_model,), (d_model, d_model), (d_model, d_model), (d_model, d_model),
                   (d_model, d_model), (d_model,), (mlp_mult * d_model, d_model),
                   (d_model, mlp_mult * d_model)]
    shapes += [(d_model,), (vocab, d_model)]
    return shapes


# Sizes per device class. GPU: flat 1B fp32; llm d_model=2048, 20 layers, vocab 50257 ->
# 20 * (12 * 2048^2 + 2 * 2048) + 2 * 50257 * 2048 + 2048 = 1,212,569,600 params in 163 tensors.
# CPU: flat 50M; llm d_model=512, 12 layers, vocab 16384 -> 54,538,752 params in 99 tensors.
# small: 5,000 tensors of 10,000 elements (50M params) everywhere. host: 5,000 and 100,000
# one-element params on the CPU (500 quick). lowp: one flat tensor per low-precision kind. suite_flat: the --suite's
# flat sizes, most telling first.
SIZES = {
    "gpu": dict(flat=1_000_000_000, llm=(2048, 20, 50257), small=(5000, 10_000), host=(5000, 100_000),
                lowp=100_000_000, suite_flat=(1_000_000_000, 100_000_000, 1_000_000)),
    "cpu": dict(flat=50_000_000, llm=(512, 12, 16384), small=(5000, 10_000), host=(5000, 100_000),
                lowp=10_000_000, suite_flat=(50_000_000, 10_000_000, 1_000_000)),
    "quick": dict(flat=1 << 16, llm=(64, 2, 512), small=(100, 1000), host=(500,), lowp=1 << 16,
                  suite_flat=(1 << 16, 1000)),
}


@dataclass
class Case:
    name: str  # e.g. "llm-bf16"
    kind: str  # one of CASE_KINDS
    dtype: torch.dtype
    amsgrad: bool
    shapes: list[tuple]
    options: dict = field(default_factory=dict)  # FusedAdamW's low-precision options

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def build_cases(kinds: list[str], dtypes: list[torch.dtype], sizes: dict) -> list[Case]:
    """flat and llm in every requested dtype; small and flat-amsgrad in float32 only; lowp:
    one case per low-precision kind, in its own dtype. (The host case is separate:
    :func:`run_host`.)"""
    cases = []
    for kind in CASE_KINDS:
        if kind not in kinds or kind in ("host", "lowp"):
            continue
        if kind == "flat":
            shapes, kind_dtypes = [(sizes["flat"],)], dtypes
        elif kind == "llm":
            shapes, kind_dtypes = llm_shapes(*sizes["llm"]), dtypes
        elif kind == "small":
            n, size = sizes["small"]
            shapes, kind_dtypes = [(size,)] * n, [torch.float32]
        else:
            shapes, kind_dtypes = [(sizes["flat"],)], [torch.float32]
        for dtype in kind_dtypes:
            if dtype in dtypes:
                cases.append(Case(f"{kind}-{SHORT[dtype]}", kind, dtype,
                                  kind == "flat-amsgrad", shapes))
    if "lowp" in kinds:
        cases += lowp_cases(sizes["lowp"])
    return cases


def lowp_cases(numel: int) -> list[Case]:
    return [Case(f"lowp-{name}", "lowp", dtype, False, [(numel,)], dict(options))
            for name, (dtype, options) in LOWP_KINDS.items()]


def count_name(n: int) -> str:
    """1000000000 -> "1e9"; other counts as they are."""
    e = round(math.log10(n)) if n > 0 else 0
    return f"1e{e}" if n == 10 ** e else str(n)


def suite_cases(sizes: dict) -> list[Case]:
    """--suite: flat fp32 and bf16 at each of sizes["suite_flat"] (the largest first, as the
    headline numbers come first in a run that may be cut), then 5,000 x 10k, then lowp."""
    n, size = sizes["small"]
    cases = []
    for i, numel in enumerate(sizes["suite_flat"]):
        for dtype in (torch.float32, torch.bfloat16):
            cases.append(Case(f"flat-{SHORT[dtype]}-{count_name(numel)}", "flat", dtype, False,
                              [(numel,)]))
        if i == 0:
            cases.append(Case("small-fp32", "small", torch.float32, False, [(size,)] * n))
    return cases + lowp_cases(sizes["lowp"])


def bytes_per_param(dtype: torch.dtype, amsgrad: bool, options: dict | None = None) -> int:
    """Bytes one step must move per param: read p, g, m, v and write p, m, v (7 * itemsize:
    28 B fp32, 14 B bf16); amsgrad also reads and writes max_exp_avg_sq (+2 * itemsize: 36 B
    fp32). Every implementation is charged these useful bytes, whatever it really moves
    (torch's foreach path moves about three times as much). Low-precision options: moments
    of ``state_dtype`` (m, v read and written: 4 * its itemsize), and the master mode's buffer
    read and written: "fp32" 8 B, "remainder" 4 B (int16), "kahan" 2 * itemsize, "stochastic"
    nothing (bf16 with an fp32 master: 6 + 8 + 8 = 22 B; fp32 with bf16 moments: 12 + 8 = 20 B)."""
    item = torch.empty((), dtype=dtype).element_size()
    options = options or {}
    state = options.get("state_dtype") or dtype
    state_item = torch.empty((), dtype=state).element_size()
    extra = {None: 0, "fp32": 8, "remainder": 4, "kahan": 2 * item,
             "stochastic": 0}[options.get("master_weights")]
    return 3 * item + (4 + (2 if amsgrad else 0)) * state_item + extra


# ---------------------------------------------------------------------------- device


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"{cpu_model()}, {os.cpu_count()} cores"


def slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "device"


def last_level_cache_bytes(device: torch.device) -> int:
    """GPU L2, or the CPU's largest cache from sysfs (0 when unknown)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    if device.type != "cpu":
        return 0
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.fullmatch(r"(\d+)([KMG]?)", f.read_text().strip())
        if m:
            best = max(best, int(m[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m[2]])
    return best


def free_memory_bytes(device: torch.device) -> int:
    """Memory this run may fill on the device: 80% of free CUDA memory, 70% of the host's
    available memory for CPU tensors (and MPS, which shares it); 8 GiB when unknown."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(0.7 * int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(0.7 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return 8 << 30


def n_sets_for(working_set: int, cache: int) -> int:
    """How many independent param/optimizer sets to rotate so that the memory touched between
    two steps of one set is at least twice the last-level cache (1 when it already is; at
    most 3)."""
    if cache <= 0:
        return 1
    return max(1, min(3, math.ceil(2 * cache / max(working_set, 1))))


def memory_per_impl(case: Case) -> int:
    """A generous estimate of one implementation's memory for one set of a case: params,
    grads, exp_avg, exp_avg_sq (and max_exp_avg_sq), the fresh grads of the next step while
    the old ones are alive, and room for an optimizer's own buffers or temporaries."""
    item = torch.empty((), dtype=case.dtype).element_size()
    return ((7 + (1 if case.amsgrad else 0)) * item + (8 if case.options else 0)) * case.numel


def plan_groups(n_impls: int, per_impl: int, budget: int) -> list[range]:
    """Splits implementations 0..n_impls-1 into consecutive groups that fit in ``budget``
    bytes together (at least one per group); each group is timed round-robin."""
    per_group = max(1, budget // max(per_impl, 1))
    return [range(i, min(i + per_group, n_impls)) for i in range(0, n_impls, per_group)]


# ---------------------------------------------------------------------------- timing


def quantiles(ts: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of a list of seconds."""
    if len(ts) == 1:
        return ts[0], ts[0], ts[0]
    q = statistics.quantiles(ts, n=10, method="inclusive")
    return statistics.median(ts), q[1], q[7]


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 10) -> float:
    """GB/s of a device-to-device copy of nbytes (bytes read + written), median of reps."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = synchronizer(device)
    for _ in range(2):
        dst.copy_(src)
    sync()
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            start.record()
            dst.copy_(src)
            end.record()
        torch.cuda.synchronize()
        ts = [s.elapsed_time(e) * 1e-3 for s, e in events]
    else:
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            sync()
            ts.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / statistics.median(ts) / 1e9


_SLEEP_CYCLES_PER_S: float | None = None


def _gpu_cycles_per_second() -> float:
    global _SLEEP_CYCLES_PER_S
    if _SLEEP_CYCLES_PER_S is None:
        cycles = 10_000_000
        torch.cuda._sleep(cycles)  # warm
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        torch.cuda.synchronize()
        _SLEEP_CYCLES_PER_S = cycles / max(a.elapsed_time(b) * 1e-3, 1e-6)
    return _SLEEP_CYCLES_PER_S


def loadavg() -> float | None:
    """The 1-minute load average (other processes on a small CPU make its numbers noisy)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def load_warnings(copy_gbps: list[float], loads: list[float | None], cores: int) -> list[str]:
    """Why this run's numbers may be unreliable: the copy bandwidth varied by more than 20%
    between its measurements, or the 1-minute load average exceeded the core count."""
    out = []
    if len(copy_gbps) >= 2 and min(copy_gbps) > 0:
        lo, hi = min(copy_gbps), max(copy_gbps)
        if hi > COPY_SPREAD_LIMIT * lo:
            out.append(f"the copy bandwidth varied by {100 * (hi / lo - 1):.0f}% between its "
                       f"{len(copy_gbps)} measurements ({lo:.1f} to {hi:.1f} GB/s)")
    seen = [x for x in loads if x is not None]
    if seen and max(seen) > cores:
        out.append(f"the 1-minute load average reached {max(seen):.2f} on {cores} cores")
    return out


# ---------------------------------------------------------------------------- implementations


def skip_reason(impl: str, dtype: torch.dtype, device: torch.device) -> str | None:
    if impl in TORCH_VARIANTS:
        return None  # torch raises if it cannot: caught and reported as skipped
    if impl == "triton" and device.type != "cuda":
        return "Triton off a GPU runs only in its interpreter: far too slow to benchmark"
    return _dispatch.unavailable_reason(impl, device, dtype)


def impl_label(impl: str) -> str:
    return impl if impl in TORCH_VARIANTS else f"fused_adamw[{impl}]"


@dataclass
class Runner:
    """One implementation with one grad mode: its sets of (params, optimizer), the shared
    read-only grad sources, and its timings. ``prepare()`` and ``step()`` alternate; the
    caller times ``step()`` only."""

    impl: str
    grads: str  # "fresh" or "persistent"
    sources: list[torch.Tensor]  # per param: the grad values (views into one flat tensor)
    sets: list[tuple[list[torch.nn.Parameter], torch.optim.Optimizer]] = field(
        default_factory=list)
    times: list[float] = field(default_factory=list)
    thread_times: list[float] = field(default_factory=list)  # CPU: this thread's CPU time
    status: str = "ok"
    reason: str | None = None
    backend_used: str | None = None
    _k: int = 0  # the set stepped next

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.sets[self._k][1]

    def build(self, shapes: list[tuple], p0: torch.Tensor, amsgrad: bool, n_sets: int,
              options: dict | None = None) -> None:
        """n_sets independent sets of params (copies of p0's slices) and an optimizer each,
        stepped once (the state exists before timing starts); ``options``: FusedAdamW's
        low-precision options (master_weights, state_dtype)."""
        for _ in range(n_sets):
            params, off = [], 0
            for shape in shapes:
                n = math.prod(shape)
                params.append(torch.nn.Parameter(p0[off:off + n].view(shape).clone()))
                off += n
            if self.impl in TORCH_VARIANTS:
                opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY,
                                        amsgrad=amsgrad, **TORCH_VARIANTS[self.impl])
            else:
                opt = FusedAdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, amsgrad=amsgrad,
                                 backend=self.impl, **(options or {}))
            for p, g in zip(params, self.sources):
                p.grad = g.clone()
            opt.step()
            self.sets.append((params, opt))
        if self.impl not in TORCH_VARIANTS:
            self.backend_used = self.sets[0][1].backend
            if self.backend_used != self.impl:
                raise RuntimeError(f"asked for backend {self.impl!r}, got {self.backend_used!r}")

    def prepare(self) -> None:
        """Untimed: the grads of the next step, then that set is the one step() runs."""
        self._k = (self._k + 1) % len(self.sets)
        params, opt = self.sets[self._k]
        if self.grads == "fresh":
            opt.zero_grad()  # set_to_none=True: the old grads are freed
            for p, g in zip(params, self.sources):
                p.grad = g.clone()  # a new tensor, as a backward pass would make
            return
        opt.zero_grad(set_to_none=False)
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            raise RuntimeError("zero_grad(set_to_none=False) left a grad None")
        if hasattr(torch, "_foreach_copy_"):  # refilled in place, as backward accumulates
            torch._foreach_copy_(grads, self.sources)
        else:
            for g, src in zip(grads, self.sources):
                g.copy_(src)

    def step(self) -> None:
        self.opt.step()

    def fail(self, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if self.impl in TORCH_VARIANTS and isinstance(e, RuntimeError):
            self.status, self.reason = "skipped", f"torch cannot run it here ({msg})"
        else:
            self.status, self.reason = "error", msg
            traceback.print_exc(file=sys.stderr)

    def release(self) -> None:
        self.sets = []


def time_round_robin(runners: list[Runner], warmup: int, reps: int,
                     device: torch.device) -> None:
    """Steps every runner once per repetition, starting each repetition with the next runner;
    appends the seconds of each timed step (after ``warmup`` repetitions) to runner.times.

    Each step is prepared (grads) outside the timed region and starts on an idle device: CPU,
    ``time.perf_counter()`` around step(); MPS, the same with a synchronize after; CUDA, a
    synchronize, then a pair of events around step(), so the time runs from the moment the
    GPU could start to the end of the step's last kernel, including any wait for the host to
    launch the step's kernels.
    """
    sync = synchronizer(device)
    live = [r for r in runners if r.status == "ok"]
    pending: list[tuple[Runner, object, object]] = []
    for rep in range(warmup + reps):
        if not live:
            break
        shift = rep % len(live)
        for runner in live[shift:] + live[:shift]:
            if runner.status != "ok":
                continue
            try:
                runner.prepare()
                sync()
                if device.type == "cuda":
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    runner.step()
                    end.record()
                    if rep >= warmup:
                        pending.append((runner, start, end))
                else:
                    c0, t0 = time.thread_time(), time.perf_counter()
                    runner.step()
                    sync()
                    if rep >= warmup:
                        runner.times.append(time.perf_counter() - t0)
                        runner.thread_times.append(time.thread_time() - c0)
            except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
                runner.fail(e)
        live = [r for r in live if r.status == "ok"]
    sync()
    for runner, start, end in pending:
        runner.times.append(start.elapsed_time(end) * 1e-3)


def host_times(runner: Runner, reps: int,
               gpu_step_s: float) -> tuple[list[float], list[float]] | None:
    """CUDA only: (wall time of the step() call itself, the step's kernel time), seconds, with
    the GPU kept busy.

    Before each timed call the stream gets a GPU busy-wait (torch.cuda._sleep) longer than the
    call, so every launch in step() returns at once instead of waiting for a free GPU; the
    perf_counter pair around step() then measures the host's work (Python, dispatch, launches)
    alone. A pair of CUDA events around the same call, queued behind the busy-wait, times the
    step's kernels run back to back: the device's time without the host's launch gaps. Grads
    are prepared and the queue drained outside the timed region.
    """
    if not hasattr(torch.cuda, "_sleep"):
        return None
    sleep_s = max(0.02, 3 * gpu_step_s)
    cycles = int(_gpu_cycles_per_second() * sleep_s)
    ts, events = [], []
    for _ in range(reps):
        runner.prepare()
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        runner.step()
        end.record()
        ts.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        events.append((start, end))
    return ts, [a.elapsed_time(b) * 1e-3 for a, b in events]


def extra_memory(runner: Runner, device: torch.device) -> int | None:
    """CUDA: bytes allocated during one step() beyond what was allocated before it (peak
    delta). Elsewhere None: torch's CPU allocations are invisible to tracemalloc and an RSS
    delta would be noise (freed temporaries go back to malloc at once), so we report n/a."""
    if device.type != "cuda":
        return None
    runner.prepare()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    runner.step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated(device) - base)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the storages behind opt.state's tensors, each storage counted once (state
    that is a view into a larger buffer counts that buffer once)."""
    seen: dict[int, int] = {}
    for st in opt.state.values():
        for t in st.values():
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


# ---------------------------------------------------------------------------- building


def initial_data(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The params' initial values and the grads, flat, seeded, made on the device (a CPU
    generator would take seconds per GB)."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        gen_device = device
    except RuntimeError:
        gen, gen_device = torch.Generator().manual_seed(0), torch.device("cpu")
    p0 = torch.randn(case.numel, generator=gen, device=gen_device).to(device, case.dtype)
    g0 = torch.randn(case.numel, generator=gen, device=gen_device).mul_(1e-2).to(device,
                                                                                case.dtype)
    return p0, g0


def grad_sources(case: Case, g0: torch.Tensor) -> list[torch.Tensor]:
    """Per param, a read-only view of its grad values in g0."""
    out, off = [], 0
    for shape in case.shapes:
        n = math.prod(shape)
        out.append(g0[off:off + n].view(shape))
        off += n
    return out


# ---------------------------------------------------------------------------- metadata


def git_info() -> tuple[str, bool | None]:
    """(HEAD commit or "unknown", whether tracked files differ or untracked ones exist).
    Read-only git commands only."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown", None
        dirty = git("diff-index", "--quiet", "HEAD", "--").returncode != 0
        others = git("ls-files", "--others", "--exclude-standard", "python", "csrc", "kernels")
        return head.stdout.strip(), dirty or bool(others.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any failure means "no usable triton"
        triton_version = None
    commit, dirty = git_info()
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "fused_adamw": fused_adamw.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def blank_record(**fields) -> dict:
    rec = dict.fromkeys(RECORD_KEYS)
    rec.update(speedup={}, status="ok")
    rec.update(fields)
    return rec


# ---------------------------------------------------------------------------- output


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


COLUMNS = ("case", "implementation", "grads", "median ms", "p20 ms", "p80 ms", "GB/s",
           "% copy", "x for-loop", "x foreach", "x fused", "kernel ms", "host us", "extra MB",
           "state MB")
HOST_COLUMNS = ("case", "implementation", "grads", "median ns/param", "p20", "p80",
                "time / torch-fused", "median ms", "thread ms", "thread / torch-fused")


def table_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append([r["case"], r["impl"], r["grads"], f"{r['status']}: {r['reason']}"])
            continue
        sp = r["speedup"]
        rows.append([
            r["case"], r["impl"], r["grads"], f"{r['median_ms']:.3f}", f"{r['p20_ms']:.3f}",
            f"{r['p80_ms']:.3f}", f"{r['gbps']:.1f}", f"{100 * r['frac_of_copy']:.0f}%",
            *(_fmt(sp.get(v), ".2f") for v in TORCH_VARIANTS),
            _fmt(r["kernel_ms"], ".3f"), _fmt(r["host_us"], ".1f"),
            _fmt(None if r["extra_mem_bytes"] is None else r["extra_mem_bytes"] / 2**20, ".1f"),
            f"{r['state_bytes'] / 2**20:.1f}",
        ])
    return rows


def host_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append([r["case"], r["impl"], r["grads"], f"{r['status']}: {r['reason']}"])
            continue
        rows.append([r["case"], r["impl"], r["grads"], f"{r['ns_per_param']:.0f}",
                     f"{r['p20_ns_per_param']:.0f}", f"{r['p80_ns_per_param']:.0f}",
                     _fmt(r["host_ratio"], ".2f"), f"{r['median_ms']:.3f}",
                     _fmt(r["thread_ms"], ".3f"), _fmt(r.get("thread_ratio"), ".2f")])
    return rows


def format_table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    """A pipe table (it pastes into Markdown); a skipped/error row is one wide cell."""
    widths = [len(c) for c in columns]
    for row in rows:
        if len(row) == len(columns):
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))
        else:
            for i, cell in enumerate(row[:3]):
                widths[i] = max(widths[i], len(cell))

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in rows:
        if len(row) == len(columns):
            out.append(line(row))
        else:
            out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row[:3], widths))
                       + f" | {row[3]} |")
    return "\n".join(out)


def plot(records: list[dict], copy_gbps: float, title: str, path: Path) -> str:
    """Grouped bars of GB/s per case and implementation, the copy bandwidth as a line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped (pip install matplotlib)"
    ok = [r for r in records if r["status"] == "ok" and r["gbps"] is not None]
    if not ok:
        return "nothing measured: plot skipped"
    cases = list(dict.fromkeys(r["case"] for r in ok))
    labels = list(dict.fromkeys(f"{r['impl']} ({r['grads']})" for r in ok))
    gbps = {(r["case"], f"{r['impl']} ({r['grads']})"): r["gbps"] for r in ok}
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cases) + 4), 6.5))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(cases))]
        ys = [gbps.get((c, label), 0.0) for c in cases]
        ax.bar(xs, ys, width, label=label)
    ax.axhline(copy_gbps, color="0.5", linestyle=":", linewidth=1,
               label=f"copy bandwidth at the start {copy_gbps:.1f} GB/s")
    case_copy = {r["case"]: r["copy_gbps"] for r in ok}
    for i, c in enumerate(cases):
        ax.hlines(case_copy[c], i - 0.45, i + 0.45, color="k", linestyle="--", linewidth=1,
                  label="copy bandwidth beside each case" if i == 0 else None)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases)
    ax.set_ylabel("GB/s (bytes formula / median step time)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


# ---------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=None,
                    help=f"comma list from {', '.join(ALL_IMPLS)} (default: all; --suite: "
                         f"{', '.join(SUITE_IMPLS)})")
    ap.add_argument("--grads", default=None,
                    help="grad modes: fresh, persistent (default: both; --suite: fresh)")
    ap.add_argument("--cases", default=None,
                    help=f"comma list from {', '.join(CASE_KINDS)} (default: "
                         f"{', '.join(DEFAULT_CASES)})")
    ap.add_argument("--dtypes", default=None,
                    help="comma list from float32, bfloat16 (default: both; small and "
                         "flat-amsgrad are float32 only)")
    ap.add_argument("--suite", action="store_true",
                    help="the GPU suite's cut: its own cases (flat fp32 and bf16 at three "
                         "sizes, small, lowp); --backends and --grads default to "
                         f"{','.join(SUITE_IMPLS)} and fresh, reps/warmup to 10/3")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed steps per implementation (default: 20 GPU, 10 CPU, 3 quick; "
                         "--suite 10)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps per implementation first (default: 5 GPU, 2 CPU, "
                         "1 quick; --suite 3)")
    ap.add_argument("--host-reps", type=int, default=None,
                    help="timed steps per implementation in the host case (default: 50, "
                         "5 quick; at 100,000 params a tenth of it, at least 5)")
    ap.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, "
                    "cuda, cuda:N or mps")
    ap.add_argument("--out", default=str(DEFAULT_OUT),
                    help="results directory (default: bench/out, not tracked by git; pass "
                         "bench/results to write the committed results)")
    ap.add_argument("--append", action="store_true",
                    help="append to <out>/results.jsonl instead of replacing it")
    ap.add_argument("--plot", default=None,
                    help="PNG path (default: <out>/<device-slug>.png; 'none' to skip)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads first (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few reps: a smoke test")
    args = ap.parse_args(argv)

    def split(text, allowed, what):
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad:
            ap.error(f"unknown {what}: {', '.join(bad)}; expected from {', '.join(allowed)}")
        return items
    if args.suite and (args.cases is not None or args.dtypes is not None):
        ap.error("--suite chooses its own cases: drop --cases and --dtypes")
    args.backends = split(args.backends or ",".join(SUITE_IMPLS if args.suite else ALL_IMPLS),
                          ALL_IMPLS, "backends")
    args.grads = split(args.grads or ("fresh" if args.suite else ",".join(GRAD_MODES)),
                       GRAD_MODES, "grads")
    args.cases = split(args.cases or ",".join(DEFAULT_CASES), CASE_KINDS, "cases")
    args.dtypes = [DTYPES[d] for d in split(args.dtypes or ",".join(DTYPES), tuple(DTYPES),
                                            "dtypes")]
    if args.suite and not args.quick:
        args.reps = args.reps or 10
        args.warmup = 3 if args.warmup is None else args.warmup
    return args


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> list[dict]:
    """Runs the benchmark; returns the records (also written as JSON lines)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # --threads must not outlive main() (tests import it)


class JsonLines:
    """<out>/results.jsonl: written case by case (a run cut short keeps what it measured),
    then rewritten at the end with the run-level fields (the load warning) filled in."""

    def __init__(self, path: Path, append: bool):
        self.path = path
        self.before = path.read_text() if append and path.exists() else ""
        path.write_text(self.before)

    def add(self, records: list[dict]) -> None:
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(r, sort_keys=True) + "\n")

    def finish(self, records: list[dict]) -> None:
        self.path.write_text(self.before)
        self.add(records)


def run_case(case: Case, impls: list[tuple[str, str]], device: torch.device, env: dict,
             args, reps: int, warmup: int, cache: int, case_copy: float) -> list[dict]:
    """Every (implementation, grads) of one case, round-robin in memory-sized groups."""
    on_gpu = device.type == "cuda"
    sync = synchronizer(device)
    p0, g0 = initial_data(case, device)
    sources = grad_sources(case, g0)
    bpp = bytes_per_param(case.dtype, case.amsgrad, case.options)
    bytes_moved = bpp * case.numel
    records: dict[tuple[str, str], dict] = {}
    runners: list[Runner] = []
    for impl, grads in impls:
        rec = blank_record(
            case=case.name, kind=case.kind, dtype=str(case.dtype).replace("torch.", ""),
            amsgrad=case.amsgrad, n_tensors=len(case.shapes), numel=case.numel,
            impl=impl_label(impl),
            family="torch.optim.AdamW" if impl in TORCH_VARIANTS else "fused_adamw",
            backend=impl, grads=grads, bytes_per_param=bpp, bytes_moved=bytes_moved,
            copy_gbps=case_copy, reps=reps, warmup=warmup, cache_bytes=cache, **env,
            quick=args.quick, options={k: str(v).replace("torch.", "")
                                       for k, v in case.options.items()})
        records[(impl, grads)] = rec
        reason = skip_reason(impl, case.dtype, device)
        if case.options and impl in TORCH_VARIANTS:
            reason = ("torch.optim.AdamW has no master weights or state dtype (the flat rows "
                      "of the param dtype are its baseline)")
        if reason is not None:
            rec.update(status="skipped", reason=reason)
            progress(f"{case.name} {rec['impl']} {grads}: skipped ({reason})")
            continue
        runners.append(Runner(impl, grads, sources))

    budget = free_memory_bytes(device)
    groups = plan_groups(len(runners), memory_per_impl(case), budget)
    for gi, group in enumerate(groups):
        members = [runners[i] for i in group]
        sets = n_sets_for(bytes_moved * len(members), cache)
        names = [f"{impl_label(r.impl)} {r.grads}" for r in members]
        t0 = time.perf_counter()
        for r in members:
            try:
                r.build(case.shapes, p0, case.amsgrad, sets, case.options)
            except Exception as e:  # noqa: BLE001
                r.fail(e)
                r.release()
                progress(f"{case.name} {impl_label(r.impl)} {r.grads}: {r.status} ({r.reason})")
        load = loadavg()
        time_round_robin(members, warmup, reps, device)
        for r in members:
            rec = records[(r.impl, r.grads)]
            rec.update(sets=sets, interleaved_with=len(members), loadavg=load,
                       backend_used=r.backend_used)
            if r.status != "ok":
                rec.update(status=r.status, reason=r.reason)
                continue
            try:
                med, p20, p80 = quantiles(r.times)
                host, kernel = (host_times(r, reps, med) if on_gpu else None) or (None, None)
                extra = extra_memory(r, device)
                sync()
                rec.update(
                    median_ms=med * 1e3, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3,
                    gbps=bytes_moved / med / 1e9,
                    frac_of_copy=bytes_moved / med / 1e9 / case_copy,
                    host_us=None if host is None else statistics.median(host) * 1e6,
                    kernel_ms=None if kernel is None else statistics.median(kernel) * 1e3,
                    extra_mem_bytes=extra, state_bytes=state_bytes(r.sets[0][1]))
                progress(f"{case.name} {rec['impl']} {r.grads}: {med * 1e3:.3f} ms (p20 "
                         f"{p20 * 1e3:.3f}, p80 {p80 * 1e3:.3f}), {rec['gbps']:.1f} GB/s")
            except Exception as e:  # noqa: BLE001
                r.fail(e)
                rec.update(status=r.status, reason=r.reason)
        progress(f"{case.name}: group {gi + 1}/{len(groups)} ({len(members)} interleaved: "
                 f"{', '.join(names)}), {sets} set(s), load average {load}, "
                 f"{time.perf_counter() - t0:.1f} s")
        for r in members:
            r.release()
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    del p0, g0, sources
    gc.collect()

    out = list(records.values())
    for grads in GRAD_MODES:
        base = {r["backend"]: r["median_ms"] for r in out if r["grads"] == grads
                and r["family"] == "torch.optim.AdamW" and r["status"] == "ok"}
        for r in out:
            if r["grads"] == grads and r["status"] == "ok":
                r["speedup"] = {v: base[v] / r["median_ms"] for v in TORCH_VARIANTS if v in base}
    return out


def run_host(args, env: dict, n_params: int, reps: int, warmup: int) -> list[dict]:
    """Host time of step() on ``n_params`` one-element float32 CPU params, per grad mode, for
    FusedAdamW(backend="cpu") and torch.optim.AdamW(fused=True), round-robin: with one element
    per param the arithmetic is nothing and the time is the optimizer's cost per param."""
    device = torch.device("cpu")
    shapes = [(1,)] * n_params
    case = Case(f"host-{n_params}x1", "host", torch.float32, False, shapes)
    p0, g0 = initial_data(case, device)
    sources = grad_sources(case, g0)
    host_env = dict(env, device="cpu", device_name=device_name(device))
    records, runners = {}, []
    for impl in (i for i in HOST_IMPLS if i in args.backends):
        for grads in args.grads:
            rec = blank_record(
                case=case.name, kind="host", dtype="float32", amsgrad=False,
                n_tensors=n_params, numel=n_params, impl=impl_label(impl),
                family="torch.optim.AdamW" if impl in TORCH_VARIANTS else "fused_adamw",
                backend=impl, grads=grads, reps=reps, warmup=warmup, sets=1, **host_env,
                quick=args.quick)
            records[(impl, grads)] = rec
            reason = skip_reason(impl, torch.float32, device)
            if reason is not None:
                rec.update(status="skipped", reason=reason)
                continue
            runner = Runner(impl, grads, sources)
            try:
                runner.build(shapes, p0, False, 1)
            except Exception as e:  # noqa: BLE001
                runner.fail(e)
            runners.append(runner)
    load = loadavg()
    time_round_robin(runners, warmup, reps, device)
    for r in runners:
        rec = records[(r.impl, r.grads)]
        rec.update(loadavg=load, interleaved_with=len(runners), backend_used=r.backend_used)
        if r.status != "ok":
            rec.update(status=r.status, reason=r.reason)
            continue
        med, p20, p80 = quantiles(r.times)
        rec.update(median_ms=med * 1e3, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3,
                   ns_per_param=med / n_params * 1e9, p20_ns_per_param=p20 / n_params * 1e9,
                   p80_ns_per_param=p80 / n_params * 1e9,
                   state_bytes=state_bytes(r.sets[0][1]),
                   thread_ms=statistics.median(r.thread_times) * 1e3)
        progress(f"{case.name} {rec['impl']} {r.grads}: {rec['ns_per_param']:.0f} ns/param "
                 f"({med * 1e3:.3f} ms per step, {rec['thread_ms']:.3f} ms thread time)")
        r.release()
    out = list(records.values())
    for grads in args.grads:
        base = records.get(("torch-fused", grads), {}).get("median_ms")
        base_thread = records.get(("torch-fused", grads), {}).get("thread_ms")
        for r in out:
            if r["grads"] == grads and r["status"] == "ok" and base:
                r["host_ratio"] = r["median_ms"] / base
                if base_thread:
                    r["thread_ratio"] = r["thread_ms"] / base_thread
                r["speedup"] = {"torch-fused": base / r["median_ms"]}
    return out


def run(args) -> list[dict]:
    device = pick_device(args.device)
    on_gpu = device.type == "cuda"
    sizes = SIZES["quick" if args.quick else ("gpu" if on_gpu else "cpu")]
    reps = args.reps or (3 if args.quick else 20 if on_gpu else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5 if on_gpu
                                                         else 2)
    host_reps = args.host_reps or (5 if args.quick else 50)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    cores = env["cores"] or 1
    cases = suite_cases(sizes) if args.suite else build_cases(args.cases, args.dtypes, sizes)
    cache = last_level_cache_bytes(device)

    copy_nbytes = (16 << 20) if args.quick else (1 << 30) if on_gpu else (256 << 20)
    copy_reps = 5 if args.quick else 10
    copies = [copy_bandwidth(device, copy_nbytes, copy_reps)]
    loads = [loadavg()]
    progress(f"{env['device_name']} ({device}, {env['threads']} threads): copy bandwidth "
             f"{copies[0]:.1f} GB/s ({copy_nbytes >> 20} MiB, read + write); load average "
             f"{loads[0]} on {cores} cores")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = JsonLines(out / "results.jsonl", args.append)
    impls = [(impl, grads) for impl in args.backends for grads in args.grads]
    records: list[dict] = []

    for case in cases:
        # The copy bandwidth again next to this case's measurements: on a shared machine the
        # bandwidth available drifts, and the ratio should compare like with like.
        case_copy = copy_bandwidth(device, copy_nbytes, copy_reps)
        copies.append(case_copy)
        loads.append(loadavg())
        progress(f"{case.name}: {len(case.shapes)} tensors, {case.numel:,} params, copy "
                 f"bandwidth {case_copy:.1f} GB/s, load average {loads[-1]}")
        case_records = run_case(case, impls, device, env, args, reps, warmup, cache, case_copy)
        loads += [r["loadavg"] for r in case_records if r["loadavg"] is not None]
        records += case_records
        jsonl.add(case_records)

    host_records = []
    if "host" in args.cases and not args.suite:
        for n_params in sizes["host"]:
            # A torch fused step takes ~0.1 s at 100,000 params on a CPU: fewer steps there.
            reps_n = host_reps if n_params <= 5000 else max(5, host_reps // 10)
            size_records = run_host(args, env, n_params, reps_n, warmup)
            loads += [r["loadavg"] for r in size_records if r["loadavg"] is not None]
            jsonl.add(size_records)
            host_records += size_records
    if cases:
        copies.append(copy_bandwidth(device, copy_nbytes, copy_reps))
        loads.append(loadavg())

    warnings = load_warnings(copies, loads, cores)
    warning = ("; ".join(warnings) + ": the machine was busy or noisy during this run, so its "
               "times and '% copy' (which can then exceed 100%) are not reliable; rerun on an "
               "idle machine") if warnings else None
    for r in records + host_records:
        r.update(copy_gbps_run=[round(c, 2) for c in copies], load_warning=warning)
    jsonl.finish(records + host_records)

    # ---------------------------------------------------------------- report
    lines = [
        f"fused_adamw {env['fused_adamw']} step benchmark on {env['device_name']} ({device}, "
        f"{env['threads']} threads); torch {env['torch']}, triton {env['triton']}, CUDA "
        f"{env['cuda']}; git {env['git_commit'][:12]}{' (dirty)' if env['git_dirty'] else ''}"
        f"; {env['date']}",
        f"copy bandwidth (read + write of a {copy_nbytes >> 20} MiB copy, median of "
        f"{copy_reps}): "
        + ", ".join([f"{copies[0]:.1f} GB/s at the start"]
                    + [f"{r['case']} {r['copy_gbps']:.1f}"
                       for r in {r["case"]: r for r in records}.values()]
                    + ([f"{copies[-1]:.1f} at the end"] if cases else []))
        + f"; {reps} timed steps after {warmup} warm-up per implementation, implementations "
        f"interleaved{'; --quick sizes' if args.quick else ''}",
    ]
    if warning:
        lines += ["", f"WARNING: {warning}."]
    if records:
        lines += ["", format_table(COLUMNS, table_rows(records)), "",
                  "GB/s = bytes formula (bench/README.md) / median; % copy = GB/s / the copy "
                  "bandwidth beside the case; x <variant> = that torch variant's median (same "
                  "grads) / this median; kernel ms (the step's kernels back to back, CUDA "
                  "events), host us and extra MB: GPU only"]
        over = [r for r in records if r["status"] == "ok" and r["frac_of_copy"] > 1]
        if over and not warning:
            lines.append(f"{len(over)} row(s) above 100% of copy: the step moved its bytes "
                         "faster than torch's copy_ did; on a CPU a copy with these threads "
                         "is a reference point, not the memory's limit (bench/README.md)")
    if host_records:
        lines += ["", format_table(HOST_COLUMNS, host_rows(host_records)), "",
                  "host: step() on one-element CPU params; ns/param = median step time / "
                  "params; time / torch-fused = this median / torch fused's (same grads); "
                  "thread ms: the median CPU time of the stepping thread (what a busy machine's "
                  "other work does not add; with --threads 1 the whole step's)"]
    text = "\n".join(lines)
    print(text)
    if warning:
        progress(f"WARNING: {warning}.")
    report = out / f"{slug(env['device_name'])}.txt"
    report.write_text(text + "\n")
    progress(f"{len(records) + len(host_records)} JSON lines "
             f"{'appended' if args.append else 'written'} to {jsonl.path}; report in {report}")
    if args.plot != "none" and records:
        path = Path(args.plot) if args.plot else out / f"{slug(env['device_name'])}.png"
        progress(plot(records, copies[0], f"fused_adamw step on {env['device_name']} "
                      f"({env['date'][:10]})", path))
    return records + host_records


if __name__ == "__main__":
    main()
