"""Times optimizer.step() under FSDP2 on the CPU: FusedAdamW against torch.optim.AdamW on the
same DTensor params (issue #21, item 4).

    python bench/bench_fsdp2.py                          # 50 Linear layers: 100 DTensor params
    python bench/bench_fsdp2.py --quick --out /tmp/f2    # 4 tiny layers, a few reps: the smoke test
    python bench/bench_fsdp2.py --size large             # 50 layers of 512 x 512: the math counts
    python bench/bench_fsdp2.py --profile                # + cProfile of FusedAdamW's step, rank 0
    python bench/bench_fsdp2.py --out bench/results/fsdp2-cpu-DATE   # results meant to be committed

Why: under FSDP2 every param, grad and optimizer state is a DTensor, and torch's AdamW pays
DTensor's Python dispatch on every op of its step (pytorch/pytorch #134191: AdamW 33% of the
step under FSDP2 against 2.5% under FSDP1). FusedAdamW steps the local shards directly. The
goal the issue sets: our host time <= 1/3 of torch's.

Setup: 2 processes (``torch.multiprocessing.start_processes``, forked where the OS can),
``init_process_group("gloo")`` over loopback on a free port, ``init_device_mesh("cpu", (2,))``,
one torch thread per rank. The model is a stack of ``--layers`` ``nn.Linear(width, width)``
(weight and bias: 2 params per layer; ``--size small``, the default, is 50 layers of width 64
= 100 params, 104,000 fp32 elements per rank: small enough that the step's time is host work,
not arithmetic; ``--size large`` is 50 layers of width 512, 6.6 M elements per rank),
``fully_shard`` on each layer and on the root, as in tests/_dist_worker.py. Two param groups
(``weight_decay_groups(model, 1e-2)``: matrices decay, biases do not), lr 1e-3.

Implementations (``--impls``; each on its own copy of the model, built from the same seed and
run through the same forward/backward, so params and grads are identical at the start):

* ``fused_adamw``: ``FusedAdamW(groups, lr=1e-3)``, backend "auto" (the row names what it
  picked: "cpu" is the C++ loop when the extension is built, else "torch");
* ``torch-forloop``, ``torch-foreach``, ``torch-fused``: torch.optim.AdamW with
  ``foreach=False``, ``foreach=True``, ``fused=True``. One that raises on DTensors is reported
  as an error row with torch's message.

With ``--local`` (the default; ``--no-local`` drops them) each also runs on plain tensors
holding copies of the same local shards and grads (no DTensor): the FSDP1-like floor, which
shows how much of each step is DTensor's overhead rather than the optimizer's own.

Timing: ``time.perf_counter_ns()`` around ``opt.step()`` and nothing else (grads stay from the
one backward; gc is off while timing). The implementations are timed round-robin, one step
each per repetition, in an order rotated every repetition, so load on the shared machine hits
them alike; a ``dist.barrier()`` before each step starts both ranks together. Both ranks time
every step. The reported time is per rank, then the slower rank: each rank's median (p20, p80)
over ``--reps`` repetitions after ``--warmup``, and the max over the ranks of each. NOTE on
why not the max over ranks per repetition (what a training step's next collective waits
for): on the shared 2-core machine (load average 12-15) that number mostly counts scheduler
preemptions, which hit a longer step more often: torch-fused measured 3.3 ms median on each
rank but 5.8-6.9 ms as the median of the per-repetition max, ours 0.93 against 0.98-1.0. It is
still reported, as ``median_max_ms`` in the JSON and the table's last column; on an idle
machine the two agree. On the CPU everything is host time; the ``local`` rows bound the
optimizer's own work (arithmetic included) from above.

Ratios: each row's median over torch-foreach's and torch-fused's median on the same kind of
params (DTensor or local); the JSON also has the ratios of the p20s (``ratio_p20``). The goal
is ``fused_adamw`` / torch <= 0.33 on DTensor params against the faster torch variant; the
line under the table judges it at the median and at p20 (the stricter of the two decides: on
a loaded machine preemptions hit torch's longer steps more often, favouring us at the median).

``--profile [IMPL]`` (default fused_adamw): after timing, rank 0 runs ``--profile-steps`` steps
of IMPL on DTensor params under cProfile (rank 1 steps alongside) and prints the functions with
the most cumulative time per step (file:function, ms per step, calls per step); written to
``profile-IMPL.txt``. cProfile inflates Python-heavy code several-fold: compare its shares, not
its totals, with the table.

Output, in ``--out`` (default bench/out/, not tracked by git): ``results.jsonl`` (one JSON line
per row, with the torch and fused_adamw versions, git commit, date, CPU, load average at start
and end), ``fsdp2.md`` (the table and its header). The table also goes to stdout; progress to
stderr. The machine's load average is printed beside the table: above the core count, the
numbers are inflated and only comparable within one run.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import json
import os
import pstats
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import cpu_model, format_table, git_info, loadavg, quantiles  # noqa: E402

import fused_adamw  # noqa: E402
from fused_adamw import FusedAdamW, weight_decay_groups  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "out"

WORLD = 2
LR, WEIGHT_DECAY = 1e-3, 1e-2
BATCH = 8  # rows of each rank's batch
SIZES = {"small": (50, 64), "large": (50, 512)}  # (layers, width)
QUICK = dict(layers=4, width=16, reps=5, warmup=2, profile_steps=3)
TORCH_VARIANTS = {  # torch.optim.AdamW keyword arguments
    "torch-forloop": dict(foreach=False),
    "torch-foreach": dict(foreach=True),
    "torch-fused": dict(fused=True),
}
IMPLS = ("fused_adamw",) + tuple(TORCH_VARIANTS)
RATIO_TO = ("torch-foreach", "torch-fused")
TIMING = "each rank's median, p20, p80 over repetitions, then the max over ranks"
RECORD_KEYS = (
    "bench", "impl", "label", "params", "status", "reason", "backend", "median_ms", "p20_ms",
    "p80_ms", "rank_median_ms", "median_max_ms", "ratio", "ratio_p20", "n_params",
    "elements_per_rank", "layers", "width", "world", "reps", "warmup", "threads", "timing",
    "torch", "fused_adamw", "git_commit", "git_dirty", "date", "cpu", "cores", "loadavg_start",
    "loadavg_end", "quick",
)


# ---------------------------------------------------------------------------- model


class Stack(nn.Module):
    """``layers`` Linear(width, width) layers with a tanh between them: 2 params per layer."""

    def __init__(self, layers: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def fsdp_model(mesh, layers: int, width: int, seed: int = 0) -> nn.Module:
    """The model with fully_shard on every layer and on the root (same init on every rank)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = Stack(layers, width)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def make_grads(model: nn.Module, rank: int, width: int) -> None:
    """One forward/backward on this rank's batch (a function of the rank only)."""
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(BATCH, width, generator=g)
    model(x).square().mean().backward()


def local_groups(groups: list[dict]) -> list[dict]:
    """The same groups over plain tensors holding copies of each DTensor's shard and grad."""
    out = []
    for group in groups:
        params = []
        for p in group["params"]:
            q = nn.Parameter(p.to_local().detach().clone())
            q.grad = p.grad.to_local().detach().clone()
            params.append(q)
        out.append({**group, "params": params})
    return out


def make_optimizer(impl: str, groups: list[dict]) -> torch.optim.Optimizer:
    if impl == "fused_adamw":
        return FusedAdamW(groups, lr=LR)
    return torch.optim.AdamW(groups, lr=LR, **TORCH_VARIANTS[impl])


class Runner:
    """One (implementation, kind of params) pair: its own model copy and optimizer."""

    def __init__(self, impl: str, kind: str, mesh, rank: int, cfg: dict):
        self.impl, self.kind = impl, kind
        self.opt = None
        self.error = None
        self.backend = None
        self.times: list[int] = []  # ns, this rank, after warm-up
        model = fsdp_model(mesh, cfg["layers"], cfg["width"])
        make_grads(model, rank, cfg["width"])
        groups = weight_decay_groups(model, WEIGHT_DECAY)
        self.model = model  # keeps the DTensor params alive
        self.n_params = sum(len(g["params"]) for g in groups)
        self.elements = sum(p.to_local().numel() for g in groups for p in g["params"])
        try:
            self.opt = make_optimizer(impl, groups if kind == "dtensor" else local_groups(groups))
            self.backend = getattr(self.opt, "backend", None)
        except Exception as e:  # noqa: BLE001 - reported as the row's reason
            self.error = f"constructor: {type(e).__name__}: {e}"

    def step(self) -> int | None:
        """Steps once; the step's ns, or None once the optimizer has failed."""
        if self.error is not None:
            return None
        try:
            t0 = time.perf_counter_ns()
            self.opt.step()
            t1 = time.perf_counter_ns()
        except Exception as e:  # noqa: BLE001 - reported as the row's reason
            self.error = f"step: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            return None
        return t1 - t0


# ---------------------------------------------------------------------------- one rank


def time_runners(runners: list[Runner], warmup: int, reps: int) -> None:
    """Round-robin: one step of each runner per repetition, the order rotated each time (the
    same on every rank), a barrier before each step."""
    gc.collect()
    gc.disable()
    try:
        for rep in range(warmup + reps):
            k = rep % len(runners)
            for r in runners[k:] + runners[:k]:
                dist.barrier()
                ns = r.step()
                if ns is not None and rep >= warmup:
                    r.times.append(ns)
    finally:
        gc.enable()


def short_path(file: str) -> str:
    """A path relative to the repository or to site-packages (torch/optim/optimizer.py)."""
    if file.startswith(str(REPO)):
        return os.path.relpath(file, REPO)
    return file.split("site-packages" + os.sep, 1)[-1]


def profile_steps(runner: Runner, steps: int, rank: int, top: int = 40) -> str | None:
    """cProfile of ``steps`` steps on rank 0 (rank 1 steps alongside, unprofiled)."""
    prof = cProfile.Profile() if rank == 0 else None
    for _ in range(steps):
        dist.barrier()
        if prof is not None:
            prof.enable()
        runner.opt.step()
        if prof is not None:
            prof.disable()
    if prof is None:
        return None
    stats = pstats.Stats(prof)
    total_s = stats.total_tt
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _callers) in stats.stats.items():
        name = f"{short_path(file)}:{line}({func})"
        rows.append((ct, tt, nc, name))
    rows.sort(reverse=True)
    out = [f"cProfile of {runner.impl} step() on DTensor params, rank 0, {steps} steps: "
           f"{1e3 * total_s / steps:.2f} ms per step under the profiler",
           "", f"{'cum ms/step':>11} {'own ms/step':>11} {'calls/step':>10}  function"]
    for ct, tt, nc, name in rows[:top]:
        out.append(f"{1e3 * ct / steps:11.3f} {1e3 * tt / steps:11.3f} {nc / steps:10.1f}  {name}")
    return "\n".join(out)


def worker(rank: int, init_method: str, cfg: dict, result_path: str) -> None:
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=cfg["timeout_s"]))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        runners = [Runner(impl, kind, mesh, rank, cfg)
                   for kind in cfg["kinds"] for impl in cfg["impls"]]
        time_runners(runners, cfg["warmup"], cfg["reps"])
        profiles = {}
        for impl in cfg["profile"]:
            runner = next(r for r in runners if r.impl == impl and r.kind == "dtensor")
            if runner.error is None:
                profiles[impl] = profile_steps(runner, cfg["profile_steps"], rank)
        mine = [{"times": r.times, "error": r.error} for r in runners]
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, mine)
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return
    rows = []
    for i, r in enumerate(runners):
        per_rank = [g[i] for g in gathered]
        errors = [f"rank {k}: {p['error']}" for k, p in enumerate(per_rank) if p["error"]]
        rows.append({"impl": r.impl, "params": r.kind, "backend": r.backend,
                     "n_params": r.n_params, "elements": r.elements,
                     "times": [p["times"] for p in per_rank], "errors": errors})
    Path(result_path).write_text(json.dumps({"rows": rows, "profiles": profiles}))


# ---------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# NOTE on fork: a spawned rank imports torch and fused_adamw again, ~2.5 s of CPU each (measured
# here; ~10 s of wall time on the shared 2-core machine under load 13); a forked one inherits
# them from this process, which has run no torch op (so no thread pool to break) before it
# forks. Where fork does not exist the ranks are spawned.
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def spawn(cfg: dict) -> dict:
    """Runs the ranks and returns rank 0's result. The free port is picked, released and then
    bound by rank 0, so another process can take it in between: that failure is retried once."""
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg["threads"]))
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, whatever the hostname says
    with tempfile.TemporaryDirectory(prefix="bench_fsdp2_") as tmp:
        path = Path(tmp) / "rank0.json"
        for attempt in range(2):
            try:
                mp.start_processes(worker, nprocs=WORLD, join=True, start_method=START_METHOD,
                                   args=(f"tcp://127.0.0.1:{free_port()}", cfg, str(path)))
                break
            except Exception as e:  # noqa: BLE001 - mp.spawn re-raises the rank's error as text
                if attempt == 0 and "address already in use" in str(e).lower():
                    continue
                raise
        return json.loads(path.read_text())


# ---------------------------------------------------------------------------- reporting


def summarize(rows: list[dict], meta: dict) -> list[dict]:
    """One record per row: each rank's quantiles, their max over ranks, the ratios."""
    records = []
    for row in rows:
        rec = dict.fromkeys(RECORD_KEYS)
        rec.update(meta)
        rec.update(impl=row["impl"], params=row["params"], backend=row["backend"],
                   n_params=row["n_params"], elements_per_rank=row["elements"], ratio={},
                   ratio_p20={},
                   label=row["impl"] + (f" ({row['backend']})" if row["backend"] else ""))
        times = row["times"]
        if row["errors"] or not all(times):
            rec.update(status="error", reason="; ".join(row["errors"]) or "no timed steps")
        else:
            per_rank = [quantiles([t / 1e6 for t in ts]) for ts in times]
            med, p20, p80 = (max(q[i] for q in per_rank) for i in range(3))
            per_rep = [max(ts) / 1e6 for ts in zip(*times)]
            rec.update(status="ok", median_ms=med, p20_ms=p20, p80_ms=p80,
                       rank_median_ms=[q[0] for q in per_rank],
                       median_max_ms=statistics.median(per_rep))
        records.append(rec)
    for rec in records:
        if rec["status"] != "ok":
            continue
        for other in records:
            if (other["impl"] in RATIO_TO and other["params"] == rec["params"]
                    and other["status"] == "ok"):
                rec["ratio"][other["impl"]] = rec["median_ms"] / other["median_ms"]
                rec["ratio_p20"][other["impl"]] = rec["p20_ms"] / other["p20_ms"]
    return records


COLUMNS = ("params", "implementation", "median ms", "p20 ms", "p80 ms", "rank 0 / 1 ms",
           "/ torch-foreach", "/ torch-fused", "max-per-rep ms")


def table(records: list[dict]) -> str:
    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append([r["params"], r["label"], "error", r["reason"]])
            continue
        ratios = [f"{r['ratio'][k]:.3f}" if k in r["ratio"] else "n/a" for k in RATIO_TO]
        rows.append([r["params"], r["label"], f"{r['median_ms']:.3f}", f"{r['p20_ms']:.3f}",
                     f"{r['p80_ms']:.3f}",
                     " / ".join(f"{x:.3f}" for x in r["rank_median_ms"]), *ratios,
                     f"{r['median_max_ms']:.3f}"])
    return format_table(COLUMNS, rows)


def header(meta: dict, n_params: int, elements: int) -> str:
    load = f"load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at end"
    if max(x or 0 for x in (meta["loadavg_start"], meta["loadavg_end"])) > meta["cores"]:
        load += f" (above the {meta['cores']} cores: times inflated; compare within the run)"
    return (f"FSDP2 optimizer step on the CPU: {meta['world']} ranks (gloo, loopback), "
            f"{meta['layers']} Linear({meta['width']}, {meta['width']}) layers, "
            f"{n_params} DTensor params, {elements:,} fp32 elements per rank, "
            f"{meta['threads']} thread(s) per rank; {meta['reps']} reps after "
            f"{meta['warmup']} warm-up, {TIMING}.\n"
            f"{meta['cpu']}, {meta['cores']} cores; torch {meta['torch']}, fused_adamw "
            f"{meta['fused_adamw']}, git {meta['git_commit'][:12]}"
            f"{' (dirty)' if meta['git_dirty'] else ''}, {meta['date']}; {load}.")


def goal_line(ours: dict) -> str:
    """Our DTensor row against the faster torch variant (the larger ratio), at the median and
    at p20: on a loaded machine preemptions hit torch's longer steps more often, which favours
    us at the median; p20 is less touched by them."""
    best = max(ours["ratio"], key=ours["ratio"].get)
    x, x20 = ours["ratio"][best], ours["ratio_p20"][best]
    return (f"fused_adamw on DTensor params: {x:.3f} x {best}'s step time at the median, "
            f"{x20:.3f} at p20 ({best} is the faster torch variant here); the issue's goal for "
            f"host time, <= 0.333, is {'met' if max(x, x20) <= 1 / 3 else 'not met'} (it is "
            f"meant for the default size, where the step is host work).")


# ---------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small",
                   help="model preset (layers, width): " + ", ".join(
                       f"{k} = {v[0]} x {v[1]}" for k, v in SIZES.items()))
    p.add_argument("--layers", type=int, help="override the preset's number of Linear layers")
    p.add_argument("--width", type=int, help="override the preset's layer width")
    p.add_argument("--impls", default=",".join(IMPLS),
                   help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--local", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each on plain tensors copied from the local shards")
    p.add_argument("--reps", type=int, default=200, help="timed repetitions (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed repetitions first (20)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (1)")
    p.add_argument("--profile", nargs="?", const="fused_adamw", default=None, metavar="IMPL",
                   help="cProfile IMPL's step on rank 0 after timing (default fused_adamw)")
    p.add_argument("--profile-steps", type=int, default=50, help="steps profiled (50)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny model and a few reps: a smoke test, not a measurement")
    p.add_argument("--timeout-s", type=int, default=300, help="collective timeout per rank")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = p.parse_args(argv)
    layers, width = SIZES[args.size]
    if args.quick:
        layers, width = QUICK["layers"], QUICK["width"]
        args.reps, args.warmup = QUICK["reps"], QUICK["warmup"]
        args.profile_steps = QUICK["profile_steps"]
    args.layers = args.layers if args.layers is not None else layers
    args.width = args.width if args.width is not None else width
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [s for s in impls if s not in IMPLS]
    if bad or not impls:
        p.error(f"--impls: unknown {bad}; choose from {','.join(IMPLS)}")
    if args.profile is not None and args.profile not in impls:
        p.error(f"--profile: {args.profile!r} is not among --impls {impls}")
    for name in ("layers", "width", "reps", "threads", "profile_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup: must be >= 0, got {args.warmup}")
    args.impls = impls
    return args


def unavailable_reason() -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6) is unavailable: {e}"
    return None


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    reason = unavailable_reason()
    if reason:
        sys.exit(f"bench_fsdp2: cannot run: {reason}")
    commit, dirty = git_info()
    meta = {
        "bench": "fsdp2", "world": WORLD, "layers": args.layers, "width": args.width,
        "reps": args.reps, "warmup": args.warmup, "threads": args.threads, "timing": TIMING,
        "torch": torch.__version__, "fused_adamw": fused_adamw.__version__,
        "git_commit": commit, "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_start": loadavg(),
        "quick": args.quick,
    }
    cfg = {"layers": args.layers, "width": args.width, "impls": args.impls,
           "kinds": ["dtensor"] + (["local"] if args.local else []), "reps": args.reps,
           "warmup": args.warmup, "threads": args.threads, "timeout_s": args.timeout_s,
           "profile": [args.profile] if args.profile else [],
           "profile_steps": args.profile_steps}
    print(f"bench_fsdp2: {WORLD} ranks, {args.layers} x Linear({args.width}), "
          f"{args.reps} reps; load average {meta['loadavg_start']}", file=sys.stderr)
    t0 = time.monotonic()
    result = spawn(cfg)
    meta["loadavg_end"] = loadavg()
    print(f"bench_fsdp2: ranks done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    records = summarize(result["rows"], meta)
    first = result["rows"][0]
    report = header(meta, first["n_params"], first["elements"]) + "\n\n" + table(records)
    ours = [r for r in records if r["impl"] == "fused_adamw" and r["params"] == "dtensor"
            and r["status"] == "ok"]
    if ours and ours[0]["ratio"]:
        report += "\n\n" + goal_line(ours[0])
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fsdp2.md").write_text(report + "\n")
    with open(args.out / "results.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    for impl, text in result["profiles"].items():
        (args.out / f"profile-{impl}.txt").write_text(text + "\n")
        print("\n" + text)
    return records


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001 - a rank's traceback is in the message
        traceback.print_exc()
        sys.exit(1)
