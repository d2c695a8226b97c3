"""Times the optimizer step as GPU training runs it: under torch.amp.GradScaler (sync-free on
both sides), and captured in a CUDA graph (host time per replay).

    python bench/bench_training_step.py --out bench/out           # every case on this device
    python bench/bench_training_step.py --quick --out /tmp/b      # tiny sizes: a smoke test

Cases, on the same params (an LLM-like list of shapes, fp32 params as AMP keeps them):

* ``scaler``: ``scaler.step(opt); scaler.update()`` with the grads scaled, for FusedAdamW and
  torch.optim.AdamW(fused=True): both take GradScaler's sync-free path (the kernel unscales
  and skips on the device). Median wall time per iteration after warm-up (the device is
  synchronized around each timed iteration), bytes by formula (:func:`bytes_per_param`: 28
  per fp32 param plus the grad written back, 4) and the GB/s they imply.
* ``graph`` (CUDA only; skipped elsewhere with the reason): ``step()`` captured once with
  ``capturable=True`` and a Tensor lr, then replayed: the device time per replay and the host
  time of ``graph.replay()`` itself, beside an eager ``step()``.

Output: a table on stdout and ``training_step.jsonl`` in ``--out``. Ratios in one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fused_adamw import FusedAdamW


def shapes(quick: bool) -> list[tuple[int, ...]]:
    d, layers, vocab = (64, 2, 500) if quick else (1024, 8, 32000)
    out = [(vocab, d)]
    for _ in range(layers):
        out += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,),
                (d,), (d,)]
    return out


def bytes_per_param(scaled: bool) -> int:
    """fp32: read param, grad, exp_avg, exp_avg_sq (16), write param, exp_avg, exp_avg_sq
    (12); GradScaler's unscaled grad written back: 4 more."""
    return 28 + (4 if scaled else 0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(fn, device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def make(device, shp, impl, **kw):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shp]
    for p in params:
        p.grad = torch.randn_like(p) * 1024.0
    if impl == "fused_adamw":
        opt = FusedAdamW(params, lr=kw.pop("lr", 1e-4), **kw)
    else:
        opt = torch.optim.AdamW(params, lr=kw.pop("lr", 1e-4), fused=True, **kw)
    return params, opt


def bench_scaler(device, shp, warmup, reps) -> list[dict]:
    rows = []
    n = sum(torch.Size(s).numel() for s in shp)
    for impl in ("fused_adamw", "torch-fused"):
        params, opt = make(device, shp, impl)
        scaler = torch.amp.GradScaler(device.type, init_scale=1024.0, growth_interval=10 ** 9)
        scaler.scale(torch.ones((), device=device))  # creates its scale, as scale(loss) does
        grads = [p.grad.clone() for p in params]

        def it():
            for p, g in zip(params, grads):
                p.grad.copy_(g)  # scaled grads again (the step unscales them in place)
            scaler.step(opt)
            scaler.update()

        refill = median_s(lambda: [p.grad.copy_(g) for p, g in zip(params, grads)], device,
                          warmup, reps)
        t = max(median_s(it, device, warmup, reps) - refill, 1e-9)
        rows.append(dict(case="scaler", impl=impl, params=n, median_s=t,
                         gbps=n * bytes_per_param(True) / t / 1e9))
    base = rows[1]["median_s"]
    for r in rows:
        r["speedup_vs_torch_fused"] = base / r["median_s"]
    return rows


def bench_graph(device, shp, warmup, reps) -> list[dict]:
    if device.type != "cuda":
        return [dict(case="graph", skipped="CUDA graphs need a CUDA device")]
    rows = []
    n = sum(torch.Size(s).numel() for s in shp)
    for impl in ("fused_adamw", "torch-fused"):
        params, opt = make(device, shp, impl, lr=torch.tensor(1e-4, device=device),
                           capturable=True)
        if impl == "fused_adamw":
            opt.init_state()
        else:
            opt.step()  # torch has no way to build its state without a step
        eager = median_s(opt.step, device, warmup, reps)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        replay = median_s(graph.replay, device, warmup, reps)
        host = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            graph.replay()
            host.append(time.perf_counter() - t0)
        sync(device)
        rows.append(dict(case="graph", impl=impl, params=n, eager_s=eager, replay_s=replay,
                         replay_host_s=statistics.median(host),
                         gbps=n * bytes_per_param(False) / replay / 1e9))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    warmup, reps = (1, 3) if args.quick else (5, 30)
    shp = shapes(args.quick)
    rows = bench_scaler(device, shp, warmup, reps) + bench_graph(device, shp, warmup, reps)
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               torch=torch.__version__, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "training_step.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({**env, **r}) + "\n")
    print(f"# {env['device']}, torch {env['torch']}, {env['date']}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['case']:7s} skipped: {r['skipped']}")
        elif r["case"] == "scaler":
            print(f"scaler  {r['impl']:12s} {r['median_s'] * 1e3:9.3f} ms  {r['gbps']:7.1f} GB/s"
                  f"  {r['speedup_vs_torch_fused']:.2f}x torch fused")
        else:
            print(f"graph   {r['impl']:12s} eager {r['eager_s'] * 1e3:8.3f} ms  replay "
                  f"{r['replay_s'] * 1e3:8.3f} ms  replay host {r['replay_host_s'] * 1e6:7.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
