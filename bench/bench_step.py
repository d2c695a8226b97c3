"""Times one optimizer step: every available fused_adamw backend against torch.optim.AdamW.

    python bench/bench_step.py                      # every case, every implementation
    python bench/bench_step.py --quick --no-append  # tiny sizes: a smoke test
    python bench/bench_step.py --cases flat,small --dtypes float32 --backends cpu,torch-fused

Implementations: FusedAdamW with each backend that can run on the device ("cuda", "triton",
"cpu", "torch"; the ones that cannot run are listed as skipped with the dispatcher's reason),
each measured with two kinds of grads ("views": grads are views into the optimizer's flat grad
buffer after ``zero_grad(set_to_none=False)``, the copy-free path; "foreign": grads are separate
tensors, so step() includes the one gather copy into the flat buffer), and torch.optim.AdamW
for-loop (foreach=False), foreach (foreach=True) and fused (fused=True) on the same params.

For each (case, implementation): median step time with p20 and p80 after warm-up, bytes moved
from an explicit formula (see :func:`bytes_per_param` and bench/README.md), GB/s, the ratio to
the device's copy bandwidth measured in the same run, the speedup over each torch variant, the
host time of step() (GPU), the extra memory allocated during step() (GPU) and the bytes of
optimizer state. Output: a table on stdout (pipe-separated: it pastes into Markdown), one JSON
line per row appended to ``<out>/results.jsonl``, and a PNG plot when matplotlib is installed.
Progress goes to stderr, one line per measurement.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

import fused_adamw
from fused_adamw import FusedAdamW, _dispatch

REPO = Path(__file__).resolve().parents[1]

LR, WEIGHT_DECAY = 1e-3, 1e-2  # the same hyperparameters for every implementation

FUSED_BACKENDS = ("cuda", "triton", "cpu", "torch")  # FusedAdamW(backend=...)
TORCH_VARIANTS = {  # torch.optim.AdamW keyword arguments
    "torch-forloop": dict(foreach=False, fused=False),
    "torch-foreach": dict(foreach=True, fused=False),
    "torch-fused": dict(fused=True),
}
ALL_IMPLS = FUSED_BACKENDS + tuple(TORCH_VARIANTS)
GRAD_KINDS = ("views", "foreign")
CASE_KINDS = ("flat", "llm", "small", "flat-amsgrad")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16"}

# Result keys every JSON line has (the smoke test checks them).
RECORD_KEYS = (
    "case", "kind", "dtype", "amsgrad", "n_tensors", "numel", "impl", "family", "backend",
    "grads", "status", "reason", "median_ms", "p20_ms", "p80_ms", "bytes_per_param",
    "bytes_moved", "gbps", "copy_gbps", "frac_of_copy", "speedup", "host_us",
    "extra_mem_bytes", "state_bytes", "sets", "reps", "warmup", "device", "device_name",
    "threads", "torch", "triton", "cuda", "fused_adamw", "git_commit", "git_dirty", "date",
    "quick", "loadavg",
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


def small_shapes(n_tensors: int, lo: int = 1024, hi: int = 8192, seed: int = 0) -> list[tuple]:
    rng = random.Random(seed)
    return [(rng.randint(lo, hi),) for _ in range(n_tensors)]


# Sizes per device class. GPU: flat 1B fp32; llm d_model=2048, 20 layers, vocab 50257 ->
# 20 * (12 * 2048^2 + 2 * 2048) + 2 * 50257 * 2048 + 2048 = 1,212,569,600 params in 163 tensors.
# CPU: flat 50M; llm d_model=512, 12 layers, vocab 16384 -> 54,538,752 params in 99 tensors.
# small: 5000 tensors of 1024..8192 elements (about 23M params) everywhere.
SIZES = {
    "gpu": dict(flat=1_000_000_000, llm=(2048, 20, 50257), small=5000),
    "cpu": dict(flat=50_000_000, llm=(512, 12, 16384), small=5000),
    "quick": dict(flat=1 << 18, llm=(64, 2, 512), small=100),
}


@dataclass
class Case:
    name: str  # e.g. "llm-bf16"
    kind: str  # one of CASE_KINDS
    dtype: torch.dtype
    amsgrad: bool
    shapes: list[tuple]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def build_cases(kinds: list[str], dtypes: list[torch.dtype], sizes: dict) -> list[Case]:
    """flat and llm in every requested dtype; small and flat-amsgrad in float32 only."""
    cases = []
    for kind in CASE_KINDS:
        if kind not in kinds:
            continue
        if kind == "flat":
            shapes, kind_dtypes = [(sizes["flat"],)], dtypes
        elif kind == "llm":
            shapes, kind_dtypes = llm_shapes(*sizes["llm"]), dtypes
        elif kind == "small":
            shapes, kind_dtypes = small_shapes(sizes["small"]), [torch.float32]
        else:
            shapes, kind_dtypes = [(sizes["flat"],)], [torch.float32]
        for dtype in kind_dtypes:
            if dtype in dtypes:
                cases.append(Case(f"{kind}-{SHORT[dtype]}", kind, dtype,
                                  kind == "flat-amsgrad", shapes))
    return cases


def bytes_per_param(dtype: torch.dtype, amsgrad: bool, foreign: bool) -> int:
    """Bytes one step must move per param (REFERENCE.md section 2): read p, g, m, v and write
    p, m, v (7 * itemsize: 28 B fp32, 14 B bf16); amsgrad also reads and writes max_exp_avg_sq
    (+2 * itemsize: 36 B fp32); foreign grads add the gather copy, read + write (+2 * itemsize).
    torch's variants are charged the same useful bytes (they move more: ~84 B/param foreach)."""
    item = torch.empty((), dtype=dtype).element_size()
    n = 7 + (2 if amsgrad else 0) + (2 if foreign else 0)
    return n * item


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


def synchronizer(device: torch.device):
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


def n_sets_for(working_set: int, cache: int) -> int:
    """How many independent param/optimizer sets to rotate so that the sets together are at
    least twice the last-level cache (1 when one set already is; at most 3)."""
    if cache <= 0:
        return 1
    return max(1, min(3, math.ceil(2 * cache / max(working_set, 1))))


# ---------------------------------------------------------------------------- timing


def quantiles(ts: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of a list of seconds."""
    if len(ts) == 1:
        return ts[0], ts[0], ts[0]
    q = statistics.quantiles(ts, n=10, method="inclusive")
    return statistics.median(ts), q[1], q[7]


def time_calls(fns: list, warmup: int, reps: int, device: torch.device) -> list[float]:
    """Seconds per call of fns[i % len(fns)], after `warmup` calls of each.

    CUDA: a pair of events around each call, no synchronization between calls (the GPU time
    of the call, including any gaps where the GPU waits for the host to launch). CPU and MPS:
    time.perf_counter around the call (and a synchronize on MPS).
    """
    sync = synchronizer(device)
    n = len(fns)
    for i in range(warmup * n):
        fns[i % n]()
    sync()
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            f = fns[i % n]
            starts[i].record()
            f()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
    ts = []
    for i in range(reps):
        f = fns[i % n]
        t0 = time.perf_counter()
        f()
        sync()
        ts.append(time.perf_counter() - t0)
    return ts


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


def host_times(fns: list, reps: int, gpu_step_s: float) -> list[float] | None:
    """CUDA only: wall time of the step() call itself, seconds, with the GPU kept busy.

    Before each timed call the stream gets a GPU busy-wait (torch.cuda._sleep) longer than the
    call, so every launch in step() returns at once instead of waiting for a free GPU; the
    perf_counter pair around step() then measures the host's work (Python, dispatch, launches)
    alone. The queue is drained after each call, outside the timed region.
    """
    if not hasattr(torch.cuda, "_sleep"):
        return None
    sleep_s = max(0.02, 3 * gpu_step_s)
    cycles = int(_gpu_cycles_per_second() * sleep_s)
    ts = []
    for i in range(reps):
        f = fns[i % len(fns)]
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return ts


def extra_memory(fn, device: torch.device) -> int | None:
    """CUDA: bytes allocated during one call beyond what was allocated before it (peak delta).
    Elsewhere None: torch's CPU allocations are invisible to tracemalloc and an RSS delta would
    be noise (freed temporaries go back to malloc at once), so we report n/a."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated(device) - base)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 10) -> float:
    """GB/s of a device-to-device copy of nbytes (bytes read + written), median of reps."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ts = time_calls([lambda: dst.copy_(src)], warmup=2, reps=reps, device=device)
    med = statistics.median(ts)
    del src, dst
    return 2 * nbytes / med / 1e9


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the storages behind opt.state's tensors, each storage counted once (FusedAdamW's
    state is views into flat buffers: their padding counts too)."""
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


def make_set(case: Case, p0: torch.Tensor, g0: torch.Tensor):
    """Fresh params (copies of p0's slices) and grads (one fresh flat copy of g0, sliced)."""
    params, grads, off = [], [], 0
    gflat = g0.clone()
    for shape in case.shapes:
        n = math.prod(shape)
        params.append(torch.nn.Parameter(p0[off:off + n].view(shape).clone()))
        grads.append(gflat[off:off + n].view(shape))
        off += n
    return params, grads


def build_impl(impl: str, grads_kind: str | None, case: Case, p0, g0, n_sets: int):
    """n_sets independent (optimizer, params) sets, each stepped once; returns (steps, opts)."""
    steps, opts = [], []
    for _ in range(n_sets):
        params, grads = make_set(case, p0, g0)
        for p, g in zip(params, grads):
            p.grad = g
        if impl in TORCH_VARIANTS:
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY,
                                    amsgrad=case.amsgrad, **TORCH_VARIANTS[impl])
            opt.step()
        else:
            opt = FusedAdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, amsgrad=case.amsgrad,
                             backend=impl)
            opt.step()  # moves params and state into the flat buffers
            if grads_kind == "views":
                opt.zero_grad(set_to_none=False)  # grads become views into the flat buffer
                storages = {p.grad.untyped_storage().data_ptr() for p in params}
                if len(storages) != 1 or storages == {grads[0].untyped_storage().data_ptr()}:
                    raise RuntimeError("zero_grad(set_to_none=False) did not make the grads "
                                       "views into one flat grad buffer")
                torch._foreach_copy_([p.grad for p in params], grads)
            if opt.backend != impl:
                raise RuntimeError(f"asked for backend {impl!r}, got {opt.backend!r}")
        del grads
        steps.append(opt.step)
        opts.append(opt)
    return steps, opts


def skip_reason(impl: str, case: Case, device: torch.device) -> str | None:
    if impl in TORCH_VARIANTS:
        return None  # torch raises if it cannot: caught and reported as skipped
    if impl == "triton" and device.type != "cuda":
        return "Triton off a GPU runs only in its interpreter: far too slow to benchmark"
    return _dispatch.unavailable_reason(impl, device, case.dtype)


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
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "fused_adamw": fused_adamw.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------- output


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


COLUMNS = ("case", "implementation", "grads", "median ms", "p20 ms", "p80 ms", "GB/s",
           "% copy", "x for-loop", "x foreach", "x fused", "host us", "extra MB", "state MB")


def table_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append([r["case"], r["impl"], r["grads"], f"{r['status']}: {r['reason']}"]
                        + [""] * (len(COLUMNS) - 4))
            continue
        sp = r["speedup"]
        rows.append([
            r["case"], r["impl"], r["grads"], f"{r['median_ms']:.3f}", f"{r['p20_ms']:.3f}",
            f"{r['p80_ms']:.3f}", f"{r['gbps']:.1f}", f"{100 * r['frac_of_copy']:.0f}%",
            *(_fmt(sp.get(v), ".2f") for v in TORCH_VARIANTS),
            _fmt(r["host_us"], ".1f"),
            _fmt(None if r["extra_mem_bytes"] is None else r["extra_mem_bytes"] / 2**20, ".1f"),
            f"{r['state_bytes'] / 2**20:.1f}",
        ])
    return rows


def format_table(records: list[dict]) -> str:
    rows = table_rows(records)
    widths = [len(c) for c in COLUMNS]
    for row in rows:
        for i, cell in enumerate(row[:len(COLUMNS)]):
            if not (row[4] == "" and i == 3):  # a skip reason does not widen its column
                widths[i] = max(widths[i], len(cell))
    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in rows:
        if row[4] == "":  # skipped / error: one wide cell
            out.append(f"| {row[0].ljust(widths[0])} | {row[1].ljust(widths[1])} | "
                       f"{row[2].ljust(widths[2])} | {row[3]} |")
        else:
            out.append(line(row))
    return "\n".join(out)


def plot(records: list[dict], copy_gbps: float, title: str, path: Path) -> str:
    """Grouped bars of GB/s per case and implementation, the copy bandwidth as a line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped (pip install matplotlib)"
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return "nothing measured: plot skipped"
    cases = list(dict.fromkeys(r["case"] for r in ok))
    labels = list(dict.fromkeys(
        r["impl"] + ("" if r["grads"] == "torch" else f" ({r['grads']})") for r in ok))
    gbps = {(r["case"], r["impl"] + ("" if r["grads"] == "torch" else f" ({r['grads']})")):
            r["gbps"] for r in ok}
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cases) + 4), 6.5))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(cases))]
        ys = [gbps.get((c, label), 0.0) for c in cases]
        ax.bar(xs, ys, width, label=label)
    ax.axhline(copy_gbps, color="0.5", linestyle=":", linewidth=1,
               label=f"copy bandwidth at the start {copy_gbps:.1f} GB/s")
    case_copy = dict((r["case"], r["copy_gbps"]) for r in records)
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
    ap.add_argument("--backends", default=",".join(ALL_IMPLS),
                    help=f"comma list from {', '.join(ALL_IMPLS)} (default: all)")
    ap.add_argument("--grads", default=",".join(GRAD_KINDS),
                    help="FusedAdamW grads: views, foreign (default: both)")
    ap.add_argument("--cases", default=",".join(CASE_KINDS),
                    help=f"comma list from {', '.join(CASE_KINDS)} (default: all)")
    ap.add_argument("--dtypes", default=",".join(DTYPES),
                    help="comma list from float32, bfloat16 (default: both; small and "
                         "flat-amsgrad are float32 only)")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed steps per implementation (default: 20 GPU, 10 CPU, 3 quick)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps per set first (default: 5 GPU, 2 CPU, 1 quick)")
    ap.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, "
                    "cuda, cuda:N or mps")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"),
                    help="results directory (default: bench/results)")
    ap.add_argument("--plot", default=None,
                    help="PNG path (default: <out>/<device-slug>.png; 'none' to skip)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads first (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few reps: a smoke test")
    ap.add_argument("--no-append", action="store_true",
                    help="overwrite <out>/results.jsonl with this run instead of appending")
    args = ap.parse_args(argv)

    def split(text, allowed, what):
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad:
            ap.error(f"unknown {what}: {', '.join(bad)}; expected from {', '.join(allowed)}")
        return items
    args.backends = split(args.backends, ALL_IMPLS, "backends")
    args.grads = split(args.grads, GRAD_KINDS, "grads")
    args.cases = split(args.cases, CASE_KINDS, "cases")
    args.dtypes = [DTYPES[d] for d in split(args.dtypes, tuple(DTYPES), "dtypes")]
    return args


def loadavg() -> float | None:
    """The 1-minute load average (other processes on a small CPU make its numbers noisy)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


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


def run(args) -> list[dict]:
    device = pick_device(args.device)
    on_gpu = device.type == "cuda"
    sizes = SIZES["quick" if args.quick else ("gpu" if on_gpu else "cpu")]
    reps = args.reps or (3 if args.quick else 20 if on_gpu else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5 if on_gpu
                                                         else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    cases = build_cases(args.cases, args.dtypes, sizes)
    cache = last_level_cache_bytes(device)
    sync = synchronizer(device)

    copy_nbytes = (16 << 20) if args.quick else (1 << 30) if on_gpu else (256 << 20)
    copy_gbps = copy_bandwidth(device, copy_nbytes, reps=5 if args.quick else 10)
    progress(f"{env['device_name']} ({device}, {env['threads']} threads): copy bandwidth "
             f"{copy_gbps:.1f} GB/s ({copy_nbytes >> 20} MiB, read + write)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "results.jsonl"
    if args.no_append:
        jsonl.write_text("")

    impls = []  # (impl, grads kind)
    for impl in args.backends:
        if impl in TORCH_VARIANTS:
            impls.append((impl, "torch"))
        else:
            impls += [(impl, g) for g in args.grads]
    total, done = len(cases) * len(impls), 0
    records: list[dict] = []

    for case in cases:
        p0, g0 = initial_data(case, device)
        # The copy bandwidth again next to this case's measurements: on a shared machine the
        # bandwidth available drifts, and the ratio should compare like with like.
        case_copy = copy_bandwidth(device, copy_nbytes, reps=5 if args.quick else 10)
        progress(f"{case.name}: {len(case.shapes)} tensors, {case.numel:,} params, copy "
                 f"bandwidth {case_copy:.1f} GB/s, load average {loadavg()}")
        case_records = []
        for impl, grads_kind in impls:
            done += 1
            foreign = grads_kind == "foreign"
            bpp = bytes_per_param(case.dtype, case.amsgrad, foreign)
            bytes_moved = bpp * case.numel
            sets = n_sets_for(bytes_moved, cache)
            rec = dict(
                case=case.name, kind=case.kind, dtype=str(case.dtype).replace("torch.", ""),
                amsgrad=case.amsgrad, n_tensors=len(case.shapes), numel=case.numel,
                impl=impl if impl in TORCH_VARIANTS else f"fused_adamw[{impl}]",
                family="torch.optim.AdamW" if impl in TORCH_VARIANTS else "fused_adamw",
                backend=impl, grads=grads_kind, status="ok", reason=None, median_ms=None,
                p20_ms=None, p80_ms=None, bytes_per_param=bpp, bytes_moved=bytes_moved,
                gbps=None, copy_gbps=case_copy, frac_of_copy=None, speedup={}, host_us=None,
                extra_mem_bytes=None, state_bytes=None, sets=sets, reps=reps, warmup=warmup,
                cache_bytes=cache, **env, quick=args.quick, loadavg=loadavg(),
            )
            tag = f"[{done}/{total}] {case.name} {rec['impl']} {grads_kind}"
            reason = skip_reason(impl, case, device)
            if reason is not None:
                rec.update(status="skipped", reason=reason)
                progress(f"{tag}: skipped ({reason})")
                case_records.append(rec)
                continue
            steps = opts = None
            try:
                t0 = time.perf_counter()
                steps, opts = build_impl(impl, grads_kind, case, p0, g0, sets)
                ts = time_calls(steps, warmup, reps, device)
                med, p20, p80 = quantiles(ts)
                host = host_times(steps, reps, med) if on_gpu else None
                extra = extra_memory(steps[0], device)
                sync()
                rec.update(
                    median_ms=med * 1e3, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3,
                    gbps=bytes_moved / med / 1e9, frac_of_copy=bytes_moved / med / 1e9 / case_copy,
                    host_us=None if host is None else statistics.median(host) * 1e6,
                    extra_mem_bytes=extra, state_bytes=state_bytes(opts[0]),
                )
                progress(f"{tag}: {med * 1e3:.3f} ms (p20 {p20 * 1e3:.3f}, p80 {p80 * 1e3:.3f})"
                         f", {rec['gbps']:.1f} GB/s, {sets} set(s), "
                         f"{time.perf_counter() - t0:.1f} s")
            except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if impl in TORCH_VARIANTS and isinstance(e, RuntimeError):
                    rec.update(status="skipped", reason=f"torch cannot run it here ({msg})")
                else:
                    rec.update(status="error", reason=msg)
                    traceback.print_exc(file=sys.stderr)
                progress(f"{tag}: {rec['status']} ({msg})")
            finally:
                del steps, opts
                gc.collect()
                if on_gpu:
                    torch.cuda.empty_cache()
            case_records.append(rec)
        base = {r["backend"]: r["median_ms"] for r in case_records
                if r["family"] == "torch.optim.AdamW" and r["status"] == "ok"}
        for r in case_records:
            if r["status"] == "ok":
                r["speedup"] = {v: base[v] / r["median_ms"] for v in TORCH_VARIANTS if v in base}
        records += case_records
        with open(jsonl, "a") as f:  # case by case: a run cut short keeps what it measured
            for r in case_records:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        del p0, g0
        gc.collect()

    # ---------------------------------------------------------------- output
    print(f"fused_adamw {env['fused_adamw']} step benchmark on {env['device_name']} ({device}, "
          f"{env['threads']} threads); torch {env['torch']}, triton {env['triton']}, CUDA "
          f"{env['cuda']}; git {env['git_commit'][:12]}{' (dirty)' if env['git_dirty'] else ''}"
          f"; {env['date']}")
    print(f"copy bandwidth (read + write of a {copy_nbytes >> 20} MiB copy, median): "
          f"{copy_gbps:.1f} GB/s at the start, "
          + ", ".join(f"{c} {g:.1f}" for c, g in
                      dict((r["case"], r["copy_gbps"]) for r in records).items())
          + f"; {reps} timed steps after {warmup} warm-up per set"
          f"{'; --quick sizes' if args.quick else ''}")
    print()
    print(format_table(records))
    print()
    print("GB/s = bytes formula (bench/README.md) / median; x <variant> = that torch "
          "variant's median / this median; host us and extra MB: GPU only")

    progress(f"{len(records)} JSON lines {'written' if args.no_append else 'appended'} to "
             f"{jsonl}")
    if args.plot != "none":
        path = Path(args.plot) if args.plot else out / f"{slug(env['device_name'])}.png"
        progress(plot(records, copy_gbps, f"fused_adamw step on {env['device_name']} "
                      f"({env['date'][:10]})", path))
    return records


if __name__ == "__main__":
    main()
