"""Times the C++ CPU loop (backend "cpu") against torch's fused CPU AdamW and the torch backend.

    python bench/cpu_loop_probe.py [--threads N]

Cases: one 50M-element fp32 buffer, and 5000 tensors of 1k-8k elements (fp32 and bf16).
Median of the timed steps after warm-up; GB/s from 28 B/param for fp32 (read p, g, m, v; write
p, m, v) and 14 B/param for bf16. Nothing but the step inside the timed region.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_bucket  # noqa: E402

from fused_adamw.backends.cpu import BACKEND as CPU  # noqa: E402
from fused_adamw.backends.torch import BACKEND as TORCH  # noqa: E402


def timeit(fn, warmup=2, reps=7):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return statistics.median(ts), ts[len(ts) // 5], ts[(4 * len(ts)) // 5]


def case(name, sizes, dtype, reps):
    numel = sum(sizes)
    bytes_per = 28 if dtype == torch.float32 else 14
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, fused=True)
    results = {"torch fused=True": timeit(opt.step, reps=reps)}
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, foreach=True)
    results["torch foreach=True"] = timeit(opt.step, reps=reps)
    bparams = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in sizes]
    bucket = make_bucket(bparams, [dict(lr=1e-3, weight_decay=1e-2)])
    bucket.grad.normal_()
    bucket.steps.add_(1)
    bucket.host_steps = [s + 1 for s in bucket.host_steps]
    results["fused_adamw cpu (C++ loop)"] = timeit(lambda: CPU.step(bucket), reps=reps)
    results["fused_adamw torch backend"] = timeit(lambda: TORCH.step(bucket), reps=reps)
    print(f"\n{name}: {len(sizes)} tensors, {numel / 1e6:.1f}M {dtype}, "
          f"{torch.get_num_threads()} threads")
    for k, (med, p20, p80) in results.items():
        print(f"  {k:28s} {med * 1e3:9.2f} ms  (p20 {p20 * 1e3:.2f}, p80 {p80 * 1e3:.2f})  "
              f"{numel * bytes_per / med / 1e9:6.1f} GB/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from fused_adamw import _ext
    print(torch.__version__, _ext.build_info())
    case("one 50M buffer", [50_000_000], torch.float32, args.reps)
    g = torch.Generator().manual_seed(0)
    small = torch.randint(1024, 8193, (5000,), generator=g).tolist()
    case("5000 small tensors", small, torch.float32, args.reps)
    case("5000 small tensors", small, torch.bfloat16, args.reps)


if __name__ == "__main__":
    main()
