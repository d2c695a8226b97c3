"""Times clip + step (issue #19): FusedAdamW(max_grad_norm=...) against torch's
``clip_grad_norm_(foreach=True)`` + ``AdamW(fused=True)``, in the same run.

    python bench/bench_clip.py                         # CPU: 50M fp32 params, 5,000 tensors
    python bench/bench_clip.py --device cuda           # the same on a GPU (bench/gpu_suite.sh)
    python bench/bench_clip.py --quick                 # tiny sizes: a smoke test
    python bench/bench_clip.py --threads 1             # one thread for both (a shared machine)
    python bench/bench_clip.py --threads 1,2           # one table per thread count, one run

Cases: "flat" (one fp32 tensor of --numel elements) and "many" (--tensors fp32 tensors of
--numel / --tensors elements each). Both implementations get the same params and grads; the
grads are persistent (refilled once, the same tensors every step: no allocation measured) and
are reset from a pristine copy outside the timed region, so torch's in-place clip never
shrinks them step after step. Steps are timed round-robin (one of each per repetition), after
--warmup untimed ones; the report gives medians with p20/p80.

NOTE on a shared machine: wall time counts the time other jobs hold the cores. With one
thread, every operation of both sides runs on the calling thread, so its CPU time
(time.thread_time) is also recorded ("cpu ms", and the speedup by it): the work itself,
still slowed by others' memory traffic but not by waiting for a core. With more threads the
column is left empty (OpenMP workers' time is not the caller's, and they spin when idle).

Bytes by formula, per fp32 param: ours 32 = 4 (grad read by the norm pass) + 4 (grad read by
the step) + 24 (param, exp_avg, exp_avg_sq read and written); torch 40 = 4 (norm) + 8 (clip
reads and writes the grad) + 4 (the step's grad read) + 24. The issue's goal: ours >= 1.2x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from fused_adamw import FusedAdamW

OURS_BYTES, TORCH_BYTES = 32, 40
MAX_NORM = 1.0  # the grads below have norm >> 1: the clip acts on every step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _case(kind, numel, tensors, device):
    g = torch.Generator().manual_seed(0)
    sizes = [numel] if kind == "flat" else [numel // tensors] * tensors
    params = [torch.randn(n, generator=g).to(device) for n in sizes]
    grads = [torch.randn(n, generator=g).to(device) for n in sizes]
    return params, grads


def _impls(params, grads, device):
    """(name, step function, reset function) of each implementation."""
    out = []
    for name in ("fused_adamw", "torch"):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        if name == "fused_adamw":
            opt = FusedAdamW(ps, lr=1e-3, max_grad_norm=MAX_NORM)

            def step(opt=opt):
                opt.step()
        else:
            opt = torch.optim.AdamW(ps, lr=1e-3, fused=True)

            def step(opt=opt, ps=ps):
                torch.nn.utils.clip_grad_norm_(ps, MAX_NORM, foreach=True)
                opt.step()

        gs = [p.grad for p in ps]

        def reset(gs=gs):
            torch._foreach_copy_(gs, grads)

        out.append((name, step, reset))
    return out


def run_case(kind, numel, tensors, device, warmup, reps):
    params, grads = _case(kind, numel, tensors, device)
    impls = _impls(params, grads, device)
    times = {name: [] for name, _, _ in impls}
    cpu_times = {name: [] for name, _, _ in impls}
    for i in range(warmup + reps):
        for name, step, reset in impls:
            reset()
            _sync(device)
            c0 = time.thread_time()
            t0 = time.perf_counter()
            step()
            _sync(device)
            t1 = time.perf_counter()
            c1 = time.thread_time()
            if i >= warmup:
                times[name].append(t1 - t0)
                cpu_times[name].append(c1 - c0)
    one_thread = device.type == "cpu" and torch.get_num_threads() == 1
    rows = []
    n = sum(p.numel() for p in params)
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5)
        med = statistics.median(ts)
        nbytes = n * (OURS_BYTES if name == "fused_adamw" else TORCH_BYTES)
        rows.append({"case": kind, "device": str(device), "numel": n,
                     "tensors": 1 if kind == "flat" else tensors, "impl": name,
                     "median_ms": med * 1e3, "p20_ms": q[0] * 1e3, "p80_ms": q[-1] * 1e3,
                     "bytes_per_param": nbytes // n, "gbps": nbytes / med / 1e9,
                     "threads": torch.get_num_threads(),
                     "cpu_median_ms": (statistics.median(cpu_times[name]) * 1e3
                                       if one_thread else None)})
    ours = next(r for r in rows if r["impl"] == "fused_adamw")
    ref = next(r for r in rows if r["impl"] == "torch")
    for r in rows:
        mine = r["impl"] == "fused_adamw"
        r["speedup_vs_torch"] = ref["median_ms"] / ours["median_ms"] if mine else 1.0
        r["cpu_speedup_vs_torch"] = (None if not one_thread else
                                     ref["cpu_median_ms"] / ours["cpu_median_ms"] if mine
                                     else 1.0)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--numel", type=int, default=50_000_000)
    ap.add_argument("--tensors", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--cases", default="flat,many")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    ap.add_argument("--json", help="append one JSON line per row to this file")
    ap.add_argument("--threads", default="0",
                    help="torch.set_num_threads for both (default: torch's); a comma list "
                         "(1,2) runs every case once per count, in this order")
    args = ap.parse_args(argv)
    if args.quick:
        args.numel, args.tensors, args.warmup, args.reps = 200_000, 50, 1, 5
    device = torch.device(args.device)
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        if threads:
            torch.set_num_threads(threads)
        for kind in args.cases.split(","):
            rows += run_case(kind, args.numel, args.tensors, device, args.warmup, args.reps)
    print(f"{'case':6} {'impl':12} {'params':>11} {'tensors':>7} {'threads':>7} "
          f"{'median ms':>10} {'p20-p80 ms':>17} {'B/param':>7} {'GB/s':>6} {'speedup':>7} "
          f"{'cpu ms':>8} {'cpu speedup':>11}")
    for r in rows:
        cpu = (f"{r['cpu_median_ms']:>8.2f} {r['cpu_speedup_vs_torch']:>10.2f}x"
               if r["cpu_median_ms"] is not None else f"{'-':>8} {'-':>11}")
        print(f"{r['case']:6} {r['impl']:12} {r['numel']:>11,} {r['tensors']:>7} "
              f"{r['threads']:>7} {r['median_ms']:>10.2f} "
              f"{r['p20_ms']:>8.2f}-{r['p80_ms']:<8.2f} "
              f"{r['bytes_per_param']:>7} {r['gbps']:>6.1f} {r['speedup_vs_torch']:>6.2f}x {cpu}")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
