"""Times the C++ CPU loop (backend "cpu") against torch's fused CPU AdamW and the torch backend.

    python bench/cpu_loop_probe.py [--threads N] [--reps 7]

A quick probe, smaller than bench/bench_step.py: cases are one 50M-element fp32 tensor, and
5000 tensors of 1k-8k elements (fp32 and bf16). Each implementation gets its own copy of the
params and grads (the same values), assigned once and kept (persistent grads); the
implementations are timed round-robin, one step each per repetition, so load on the machine
affects them alike. Median of the timed steps after warm-up, with p20 and p80; GB/s from
28 B/param for fp32 (read p, g, m, v; write p, m, v) and 14 B/param for bf16. Nothing but
step() inside the timed region. Only the public API is used: FusedAdamW(params, backend=...).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from fused_adamw import FusedAdamW, _dispatch, _ext

LR, WEIGHT_DECAY = 1e-3, 1e-2


def quantiles(ts: list[float]) -> tuple[float, float, float]:
    ts = sorted(ts)
    return statistics.median(ts), ts[len(ts) // 5], ts[(4 * len(ts)) // 5]


def make(sizes: list[int], dtype: torch.dtype, factory: Callable) -> Callable[[], None]:
    """Fresh params with seeded values and grads, an optimizer over them stepped once; returns
    its step."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).mul_(1e-2).to(dtype)
    opt = factory(params)
    opt.step()
    return opt.step


def case(name: str, sizes: list[int], dtype: torch.dtype, reps: int, warmup: int = 2) -> None:
    numel = sum(sizes)
    bytes_per = 28 if dtype == torch.float32 else 14
    factories = {
        "torch fused=True": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY,
                                                         fused=True),
        "torch foreach=True": lambda ps: torch.optim.AdamW(ps, lr=LR,
                                                           weight_decay=WEIGHT_DECAY,
                                                           foreach=True),
    }
    for backend, label in (("cpu", "fused_adamw cpu (C++ loop)"),
                           ("torch", "fused_adamw torch backend")):
        reason = _dispatch.unavailable_reason(backend, torch.device("cpu"), dtype)
        if reason is not None:
            print(f"  {label}: skipped ({reason})")
            continue
        factories[label] = functools.partial(FusedAdamW, lr=LR, weight_decay=WEIGHT_DECAY,
                                             backend=backend)
    steps = {label: make(sizes, dtype, f) for label, f in factories.items()}
    times: dict[str, list[float]] = {label: [] for label in steps}
    labels = list(steps)
    for rep in range(warmup + reps):
        shift = rep % len(labels)
        for label in labels[shift:] + labels[:shift]:
            t0 = time.perf_counter()
            steps[label]()
            if rep >= warmup:
                times[label].append(time.perf_counter() - t0)
    print(f"\n{name}: {len(sizes)} tensors, {numel / 1e6:.1f}M {dtype}, "
          f"{torch.get_num_threads()} threads")
    for label, ts in times.items():
        med, p20, p80 = quantiles(ts)
        print(f"  {label:28s} {med * 1e3:9.2f} ms  (p20 {p20 * 1e3:.2f}, p80 {p80 * 1e3:.2f})  "
              f"{numel * bytes_per / med / 1e9:6.1f} GB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    ap.add_argument("--reps", type=int, default=7, help="timed steps per implementation")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(torch.__version__, _ext.build_info())
    case("one 50M tensor", [50_000_000], torch.float32, args.reps)
    g = torch.Generator().manual_seed(0)
    small = torch.randint(1024, 8193, (5000,), generator=g).tolist()
    case("5000 small tensors", small, torch.float32, args.reps)
    case("5000 small tensors", small, torch.bfloat16, args.reps)


if __name__ == "__main__":
    main()
