"""Low-precision training, measured side by side (issue #13): every master-weights mode and
state dtype of FusedAdamW training the same small language model from the same start.

    python bench/bench_lowprec.py                          # the full table (~1,000 steps x 3 seeds)
    python bench/bench_lowprec.py --quick --out /tmp/lp    # a few steps, 1 seed: the smoke test
    python bench/bench_lowprec.py --steps 300 --seeds 0,1 --configs fp32,bf16,bf16-remainder

The model: a causal transformer LM written with torch.nn modules (token and position
embeddings, 2 pre-norm ``TransformerEncoderLayer`` blocks of width 64 with 4 heads, MLP 4x,
GELU, no dropout, a final LayerNorm and an untied head; 112,384 params), context
64. The data: a synthetic corpus the benchmark makes itself, sequences of an order-2 Markov
chain over 64 tokens whose transition table is fixed by ``CHAIN_SEED`` (each pair of previous
tokens allows 2 next tokens with random Dirichlet(1) weights), so the task is learnable and its
entropy floor is known (~0.50 nats): the mean conditional entropy of the chain along the
sampled positions (printed; the first predicted position has one token of context and sits
above it, so even a perfect model ends a little above the floor). For each seed, the initial
weights (fp32, ``torch.manual_seed(seed)``) and the batches (a generator seeded with the
seed) are the same for every configuration; bf16 configurations cast that fp32 init with
``model.to(torch.bfloat16)``. The loss is computed in fp32 (``logits.float()``).
Optimizer: ``FusedAdamW(weight_decay_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95))``,
linear warmup over 5% of the steps then cosine to 0 (``fused_adamw.demo.warmup_cosine``
through ``LambdaLR``), batch 16 sequences.

Configurations (``--configs``, names below; default the 9 of ``DEFAULT_CONFIGS``, all 12
with ``--quick`` or ``--configs all``):

* ``fp32``: fp32 params, fp32 moments: the baseline every ratio is taken against;
* ``bf16``, ``bf16-fp32``, ``bf16-remainder``, ``bf16-kahan``, ``bf16-stochastic``: bf16 params
  and bf16 moments (``state_dtype=None``) with master_weights None, "fp32", "remainder",
  "kahan", "stochastic";
* ``bf16-m32``, ``bf16-m32-fp32``, ``bf16-m32-remainder``, ``bf16-m32-kahan``,
  ``bf16-m32-stochastic``: the same with fp32 moments (``state_dtype=torch.float32``);
* ``fp32-m16``: fp32 params with bf16 moments (``state_dtype=torch.bfloat16``).

Per configuration: the final loss (mean of the last 5% of steps) and the curve-averaged loss
(mean over all steps), each divided by the baseline's of the same seed, then the mean and the
max of those ratios over seeds; the baseline's own seed spread ((max - min) / mean of its final
loss over seeds); optimizer state bytes per param, measured from ``opt.state`` (the nbytes of
every per-element tensor / the number of params; the 0-d ``step`` counters, 4 B per tensor,
are left out and the Python int ``sr_seed`` is not a tensor); bytes moved per param per step by
formula (:func:`bytes_moved_per_param`); median step time of ``opt.step()`` alone and of the
whole train step (zero_grad, forward, backward, step, scheduler).

The verdict column judges each mode against the issue's goals:

* bit identity: "fp32" and "remainder" keep the same master trajectory bit for bit (README,
  "Low-precision training"). After training, with the same seed and the same state dtype, the
  fp32 run's ``state["master_param"]`` is compared with the master the remainder run
  reconstructs from its bf16 param and int16 ``param_remainder``
  (``fused_adamw.reference.remainder_join``: the param's bits << 16 plus the signed remainder).
  The two runs share every input: the forward pass sees the master rounded to nearest in one
  and rounded with ties away from zero in the other, which differ only when the master's low
  16 bits are exactly 0x8000; if that ever happens the trajectories part, and the row says so
  with the number of elements that differ (and the first step where params differed);
* every master mode ("fp32", "remainder", "kahan", "stochastic") should end within 0.5% of the
  baseline's final loss, or within the baseline's seed spread when that is larger (the verdict
  names which tolerance applied), judged on the worst seed's ratio;
* ``None`` (plain bf16 rounding) shows what rounding costs: its row's ratio is the price.

Output: a markdown table on stdout, ``lowprec.jsonl`` (one JSON line per configuration) and
``lowprec.md`` (the table and the run's details) in ``--out`` (default bench/out/, ignored by
git), and ``lowprec.png`` (loss curves, seed-mean, smoothed) when matplotlib is importable;
otherwise the output says the plot was skipped. Progress goes to stderr.

Timing and the grid: on the shared 2-core VM this was written on (Intel Xeon, torch 2.13 CPU,
1 torch thread: with 2 threads a step was 2-6x slower under the machine's other load, an
OpenMP barrier waiting on the busy core), a train step at batch 16 took ~30-36 ms in fp32 and
~59-62 ms in bf16 (bf16 matmuls are slower than fp32 ones on this CPU at these sizes), with a
load average of 3-4. A calibration run of the default 9 configurations, 100 steps, 1 seed took
53 s, so the default grid, 1,000 steps x 3 seeds x 9 configurations at batch 16, takes about
53 x 30 = 1,590 s (~27 minutes; less on an idle machine). That is why the default is the 9
configurations the issue asks for (``DEFAULT_CONFIGS``) and batch 16; the other three
fp32-moment modes run with ``--configs all`` or by name (~+9 minutes). ``--quick``: 30
steps, 1 seed, all 12 configurations, batch 4, ~10 s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import cpu_model  # noqa: E402  (bench/ scripts run from any directory)
from torch import nn

import fused_adamw
from fused_adamw import FusedAdamW, weight_decay_groups
from fused_adamw.demo import warmup_cosine
from fused_adamw.reference import remainder_join

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "out"

# The model and the data.
VOCAB, WIDTH, LAYERS, HEADS, SEQ = 64, 64, 2, 4, 64
CHAIN_SEED, CHAIN_BRANCH, BURN_IN = 1234, 2, 8
# The optimizer.
LR, BETAS, WEIGHT_DECAY, WARMUP_FRAC = 1e-2, (0.9, 0.95), 0.1, 0.05
FINAL_FRAC = 0.05  # final loss: mean of the last 5% of steps
LOSS_TOL = 0.005  # master modes: within 0.5% of the baseline (or its seed spread if larger)

MASTER_MODES = ("fp32", "remainder", "kahan", "stochastic")
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", None: "param"}


@dataclass(frozen=True)
class Config:
    name: str
    param_dtype: torch.dtype
    state_dtype: torch.dtype | None  # FusedAdamW(state_dtype=...): None is the param's dtype
    master_weights: str | None

    @property
    def moments_dtype(self) -> torch.dtype:
        return self.param_dtype if self.state_dtype is None else self.state_dtype


def _configs() -> dict[str, Config]:
    out = {"fp32": Config("fp32", torch.float32, None, None)}
    for mw in (None, *MASTER_MODES):
        name = "bf16" if mw is None else f"bf16-{mw}"
        out[name] = Config(name, torch.bfloat16, None, mw)
    for mw in (None, *MASTER_MODES):
        name = "bf16-m32" if mw is None else f"bf16-m32-{mw}"
        out[name] = Config(name, torch.bfloat16, torch.float32, mw)
    out["fp32-m16"] = Config("fp32-m16", torch.float32, torch.bfloat16, None)
    return out


CONFIGS = _configs()
DEFAULT_CONFIGS = ("fp32", "bf16", "bf16-fp32", "bf16-remainder", "bf16-kahan",
                   "bf16-stochastic", "bf16-m32", "bf16-m32-remainder", "fp32-m16")

# Keys every JSON line has (the smoke test checks them).
RECORD_KEYS = (
    "config", "param_dtype", "moments_dtype", "state_dtype", "master_weights", "seeds",
    "steps", "batch", "final_loss", "avg_loss", "final_loss_mean", "avg_loss_mean",
    "final_ratio_mean", "final_ratio_max", "avg_ratio_mean", "avg_ratio_max",
    "baseline_spread", "tolerance", "tolerance_source", "state_bytes_per_param",
    "state_scalar_bytes", "bytes_moved_per_param", "opt_step_ms", "train_step_ms",
    "bit_identical", "bit_identity", "verdict", "curve", "n_params", "entropy_floor",
    "initial_loss", "device_name", "cores", "threads", "torch", "fused_adamw", "backend",
    "git_commit", "date", "quick", "elapsed_s", "plot",
)


# ---------------------------------------------------------------------------- model


class TinyLM(nn.Module):
    """A causal LM: token + position embeddings, pre-norm transformer blocks, final norm,
    untied head."""

    def __init__(self, vocab: int = VOCAB, width: int = WIDTH, layers: int = LAYERS,
                 heads: int = HEADS, seq: int = SEQ):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.register_buffer("mask", torch.ones(seq, seq, dtype=torch.bool).triu(1),
                             persistent=False)  # True: not attended (the future)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos.weight[:t]
        mask = self.mask[:t, :t]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


# ---------------------------------------------------------------------------- data


def markov_chain(vocab: int = VOCAB, branch: int = CHAIN_BRANCH,
                 seed: int = CHAIN_SEED) -> torch.Tensor:
    """The order-2 transition table, (vocab * vocab, vocab): row a * vocab + b is
    P(next | previous two = a, b), with ``branch`` allowed next tokens of Dirichlet(1) weights."""
    g = torch.Generator().manual_seed(seed)
    n = vocab * vocab
    nxt = torch.rand(n, vocab, generator=g).argsort(dim=1)[:, :branch]
    w = -torch.rand(n, branch, generator=g).clamp_min(1e-12).log()  # Exp(1) -> Dirichlet(1)
    table = torch.zeros(n, vocab, dtype=torch.float64)
    table.scatter_(1, nxt, (w / w.sum(1, keepdim=True)).double())
    return table


def make_batches(table: torch.Tensor, steps: int, batch: int, seed: int,
                 seq: int = SEQ) -> tuple[torch.Tensor, float]:
    """(steps, batch, seq + 1) tokens of the chain, each sequence started from a random pair
    and BURN_IN tokens dropped; and the entropy floor in nats: the chain's conditional entropy
    averaged over the predicted positions that have both previous tokens in the window."""
    vocab = table.shape[1]
    g = torch.Generator().manual_seed(10_000 + seed)
    n = steps * batch
    length = seq + 1 + BURN_IN
    toks = torch.empty(n, length, dtype=torch.long)
    toks[:, :2] = torch.randint(0, vocab, (n, 2), generator=g)
    ent = -(table * table.clamp_min(1e-300).log()).sum(1)  # per context
    ctx_ent = torch.zeros(n, dtype=torch.float64)
    counted = 0
    for t in range(2, length):
        ctx = toks[:, t - 2] * vocab + toks[:, t - 1]
        toks[:, t] = torch.multinomial(table[ctx].float(), 1, generator=g).squeeze(1)
        if t >= BURN_IN + 2:  # target position (t - BURN_IN) >= 2: both previous in window
            ctx_ent += ent[ctx]
            counted += 1
    floor = float(ctx_ent.sum() / (n * counted))
    return toks[:, BURN_IN:].reshape(steps, batch, seq + 1), floor


# ---------------------------------------------------------------------------- formulas


def bytes_moved_per_param(config: Config) -> int:
    """Bytes one optimizer step moves per param, by formula (reads + writes):

    * the param: read and written (2 x its itemsize);
    * the grad (the param's dtype): read (1 x);
    * exp_avg and exp_avg_sq: each read and written (4 x the moments' itemsize);
    * the mode's buffer: "fp32" master read and written (2 x 4 B), "remainder" int16 read and
      written (2 x 2 B), "kahan" compensation of the param's dtype read and written (2 x its
      itemsize), "stochastic" none (the bits come from a hash of seed, step and index),
      None none.

    fp32 params and moments: 4 + 4 + 4 + 16 = 28 B (bench_step.py's ``bytes_per_param``);
    bf16 everything: 14 B; bf16 params, fp32 moments and "remainder": 2 * 2 + 2 + 16 + 4 = 26 B.
    """
    p = torch.empty((), dtype=config.param_dtype).element_size()
    m = torch.empty((), dtype=config.moments_dtype).element_size()
    extra = {None: 0, "fp32": 2 * 4, "remainder": 2 * 2, "kahan": 2 * p, "stochastic": 0}
    return 2 * p + p + 4 * m + extra[config.master_weights]


def state_bytes(opt: torch.optim.Optimizer) -> tuple[float, int]:
    """(bytes of per-element state tensors / number of params, bytes of 0-d state tensors).
    Python ints in the state (the stochastic mode's ``sr_seed``) are not tensors: excluded."""
    per_elem, scalar, n = 0, 0, 0
    for group in opt.param_groups:
        for p in group["params"]:
            n += p.numel()
            for v in opt.state.get(p, {}).values():
                if isinstance(v, torch.Tensor):
                    if v.dim() == 0:
                        scalar += v.nbytes
                    else:
                        per_elem += v.nbytes
    return per_elem / max(n, 1), scalar


# ---------------------------------------------------------------------------- training


@dataclass
class RunResult:
    losses: list[float]
    opt_ms: list[float]
    step_ms: list[float]
    state_bytes_per_param: float
    state_scalar_bytes: int
    masters: list[torch.Tensor] | None  # the fp32 master per param ("fp32"/"remainder")
    params_at: list[list[torch.Tensor]] | None  # bf16 param snapshots (divergence check)
    backend: str
    lockstep: dict | None = None  # "fp32" runs: the comparison with the remainder twin


def train(config: Config, init_state: dict, batches: torch.Tensor, seed: int,
          snapshot_every: int, lockstep: bool = True) -> RunResult:
    model = TinyLM()
    model.load_state_dict(init_state)
    model.to(config.param_dtype)
    steps = batches.shape[0]
    torch.manual_seed(seed)  # the stochastic mode's seeds come from the default generator
    opt = FusedAdamW(weight_decay_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS,
                     master_weights=config.master_weights, state_dtype=config.state_dtype)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(max(1, round(WARMUP_FRAC * steps)), steps))
    params = [p for g in opt.param_groups for p in g["params"]]
    # The lockstep twin of an "fp32" run: the same params under "remainder", stepped with the
    # same grads (the fp32 run's), so the optimizer's claim is checked on identical inputs.
    twin = twin_sched = None
    if lockstep and config.master_weights == "fp32":
        twin_groups = [{**{k: v for k, v in g.items() if k != "params"},
                        "params": [p.detach().clone().requires_grad_() for p in g["params"]],
                        "master_weights": "remainder"} for g in opt.param_groups]
        twin = FusedAdamW(twin_groups, lr=LR, betas=BETAS, master_weights="remainder",
                          state_dtype=config.state_dtype)
        for g in twin.param_groups:
            g["lr"] = g["initial_lr"]
        twin_sched = torch.optim.lr_scheduler.LambdaLR(
            twin, warmup_cosine(max(1, round(WARMUP_FRAC * steps)), steps))
    losses, opt_ms, step_ms = [], [], []
    snaps = [] if config.master_weights in ("fp32", "remainder") else None
    for i in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        x, y = batches[i, :, :-1], batches[i, :, 1:]
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        sched.step()
        t3 = time.perf_counter()
        if twin is not None:  # outside the timed region
            for p, q in zip(params, (q for g in twin.param_groups for q in g["params"])):
                q.grad = p.grad
            twin.step()
            twin_sched.step()
        losses.append(loss.item())
        opt_ms.append((t2 - t1) * 1e3)
        step_ms.append((t3 - t0) * 1e3)
        if snaps is not None and (i + 1) % snapshot_every == 0:
            snaps.append([p.detach().clone() for p in params])
        if not math.isfinite(losses[-1]):
            break
    sbpp, scalar = state_bytes(opt)
    masters = None
    if config.master_weights == "fp32":
        masters = [opt.state[p]["master_param"].clone() for p in params]
    elif config.master_weights == "remainder":
        masters = [remainder_join(p.detach(), opt.state[p]["param_remainder"]) for p in params]
    lock = None
    if twin is not None:
        twins = [q for g in twin.param_groups for q in g["params"]]
        lock = [remainder_join(q.detach(), twin.state[q]["param_remainder"]) for q in twins]
        lock = {"differing": sum(int((m.view(torch.int32) != t.view(torch.int32)).sum())
                                 for m, t in zip(masters, lock)),
                "params_differing": sum(int((p.detach().view(torch.int16)
                                             != q.detach().view(torch.int16)).sum())
                                        for p, q in zip(params, twins)),
                "elements": sum(m.numel() for m in masters)}
    return RunResult(losses, opt_ms, step_ms, sbpp, scalar, masters, snaps,
                     getattr(opt, "backend", "?"), lock)


def compare_masters(a: RunResult, b: RunResult, snapshot_every: int) -> dict:
    """Bit comparison of two runs' final fp32 masters, and the first snapshot where their
    params differed."""
    differ, total = 0, 0
    for ma, mb in zip(a.masters, b.masters):
        ua, ub = ma.view(torch.int32), mb.view(torch.int32)
        differ += int((ua != ub).sum())
        total += ua.numel()
    first = None
    for k, (sa, sb) in enumerate(zip(a.params_at, b.params_at)):
        if any(not torch.equal(x.view(torch.int16), y.view(torch.int16))
               for x, y in zip(sa, sb)):
            first = (k + 1) * snapshot_every
            break
    return {"identical": differ == 0, "elements_differing": differ, "elements": total,
            "params_first_differ_by_step": first}


# ---------------------------------------------------------------------------- report


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def downsample(xs: list[float], n: int = 100) -> list[float]:
    if len(xs) <= n:
        return [round(x, 5) for x in xs]
    w = len(xs) / n
    return [round(statistics.fmean(xs[int(k * w):max(int(k * w) + 1, int((k + 1) * w))]), 5)
            for k in range(n)]


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"


def verdict_for(config: Config, ratios: list[float], tol: float, tol_src: str,
                bit: dict | None) -> str:
    worst = max((r - 1 for r in ratios), key=abs) if ratios else float("nan")
    if config.name == "fp32":
        return "baseline"
    within = abs(worst) <= tol
    judged = (f"{'within' if within else 'OUTSIDE'} {tol_src} ({tol:.2%}): "
              f"worst seed {worst:+.2%}" if math.isfinite(worst) else "no ratio")
    if config.master_weights is None:
        if config.param_dtype == torch.bfloat16:
            mean = statistics.fmean(ratios) - 1
            return f"rounding costs {mean:+.2%} final loss (mean); {judged}"
        return judged  # fp32 params, bf16 moments
    parts = [("PASS: " if within else "FAIL: ") + judged]
    if bit is not None:
        parts.append(("masters bit-identical" if bit["identical"] else
                      f"masters NOT bit-identical ({bit['elements_differing']} of "
                      f"{bit['elements']} differ)") + " fp32 vs remainder on the same grads")
        sep = bit["separate_runs"]
        if sep is not None and not sep["identical"]:
            parts.append(f"trained separately they part (first by step "
                         f"{sep['params_first_differ_by_step']}: a master tie rounds to a "
                         f"different param)")
    return "; ".join(parts)


def build_table(records: list[dict]) -> str:
    head = ("| config | params | moments | master | final / base (mean, max) | "
            "curve avg / base (mean, max) | final loss | state B/param | moved B/param/step | "
            "opt.step ms | train step ms | verdict |")
    lines = [head, "|" + "---|" * 12]
    for r in records:
        lines.append(
            f"| {r['config']} | {r['param_dtype']} | {r['moments_dtype']} | "
            f"{r['master_weights'] or 'None'} | {fmt_ratio(r['final_ratio_mean'])}, "
            f"{fmt_ratio(r['final_ratio_max'])} | {fmt_ratio(r['avg_ratio_mean'])}, "
            f"{fmt_ratio(r['avg_ratio_max'])} | {r['final_loss_mean']:.4f} | "
            f"{r['state_bytes_per_param']:g} | {r['bytes_moved_per_param']} | "
            f"{r['opt_step_ms']:.2f} | {r['train_step_ms']:.1f} | {r['verdict']} |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped (matplotlib is not installed)"
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in records:
        ax.plot(r["curve"], label=r["config"], lw=2.0 if r["config"] == "fp32" else 1.0)
    ax.set_xlabel(f"step (x{max(1, records[0]['steps'] // len(records[0]['curve']))})")
    ax.set_ylabel("training loss (seed mean)")
    ax.axhline(records[0]["entropy_floor"], color="k", ls=":", lw=0.8, label="entropy floor")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("FusedAdamW low-precision modes, TinyLM on an order-2 Markov chain")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------- main


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="default 1000 (30 with --quick)")
    ap.add_argument("--seeds", default=None, help="comma list, default 0,1,2 (0 with --quick)")
    ap.add_argument("--configs", default=None,
                    help="comma list of " + ", ".join(CONFIGS) + ", or 'all'; default: "
                         + ",".join(DEFAULT_CONFIGS) + " (all with --quick); fp32 is "
                         "always added (the baseline)")
    ap.add_argument("--batch", type=int, default=None, help="default 16 (4 with --quick)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine two threads were "
                         "2-6x slower, an OpenMP barrier waiting on the other core)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    args.steps = args.steps or (30 if args.quick else 1000)
    args.batch = args.batch or (4 if args.quick else 16)
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    if args.configs in (None, "") and args.quick or args.configs == "all":
        names = list(CONFIGS)
    else:
        names = [c.strip() for c in (args.configs or ",".join(DEFAULT_CONFIGS)).split(",")]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    if "fp32" not in names:
        names.insert(0, "fp32")
    args.configs = [CONFIGS[c] for c in CONFIGS if c in names]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    commit = git_commit()  # the code that runs is the code at the start
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    table = markov_chain()
    snapshot_every = max(1, args.steps // 50)
    results: dict[tuple[str, int], RunResult] = {}
    floors, init_losses = [], []
    for seed in args.seeds:
        batches, floor = make_batches(table, args.steps, args.batch, seed)
        floors.append(floor)
        torch.manual_seed(seed)
        init = {k: v.clone() for k, v in TinyLM().state_dict().items()}
        for config in args.configs:
            t0 = time.perf_counter()
            r = train(config, init, batches, seed, snapshot_every)
            results[(config.name, seed)] = r
            init_losses.append(r.losses[0])
            print(f"[lowprec] seed {seed} {config.name:20s} final "
                  f"{statistics.fmean(r.losses[-max(1, round(FINAL_FRAC * len(r.losses))):]):.4f}"
                  f" in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t_start

    def final(r: RunResult) -> float:
        return statistics.fmean(r.losses[-max(1, round(FINAL_FRAC * len(r.losses))):])

    base_final = {s: final(results[("fp32", s)]) for s in args.seeds}
    base_avg = {s: statistics.fmean(results[("fp32", s)].losses) for s in args.seeds}
    bf = list(base_final.values())
    spread = (max(bf) - min(bf)) / statistics.fmean(bf) if len(bf) > 1 else 0.0
    tol, tol_src = (spread, "the baseline's seed spread") if spread > LOSS_TOL else \
        (LOSS_TOL, "0.5% of the baseline")

    # Bit identity, per moments dtype: the "fp32" run's master against its lockstep
    # "remainder" twin (same grads), and against the separately trained "remainder" run.
    bit_checks: dict[str, dict] = {}
    for fp32_name, rem_name in (("bf16-fp32", "bf16-remainder"),
                                ("bf16-m32-fp32", "bf16-m32-remainder")):
        if not all((fp32_name, s) in results for s in args.seeds):
            continue
        locks = [results[(fp32_name, s)].lockstep for s in args.seeds]
        check = {"identical": all(c["differing"] == 0 for c in locks),
                 "elements_differing": sum(c["differing"] for c in locks),
                 "elements": sum(c["elements"] for c in locks),
                 "params_differing": sum(c["params_differing"] for c in locks),
                 "pair": [fp32_name, rem_name + " (lockstep twin)"], "separate_runs": None}
        if all((rem_name, s) in results for s in args.seeds):
            per_seed = [compare_masters(results[(fp32_name, s)], results[(rem_name, s)],
                                        snapshot_every) for s in args.seeds]
            firsts = [c["params_first_differ_by_step"] for c in per_seed
                      if c["params_first_differ_by_step"] is not None]
            check["separate_runs"] = {
                "identical": all(c["identical"] for c in per_seed),
                "elements_differing": sum(c["elements_differing"] for c in per_seed),
                "elements": sum(c["elements"] for c in per_seed),
                "params_first_differ_by_step": min(firsts) if firsts else None}
        bit_checks[fp32_name] = check
        if (rem_name, args.seeds[0]) in results:
            bit_checks[rem_name] = check

    meta = {
        "device_name": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "fused_adamw": fused_adamw.__version__,
        "git_commit": commit,
        "loadavg_start_end": [load_start,
                              os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "elapsed_s": round(elapsed, 1),
        "entropy_floor": round(statistics.fmean(floors), 5),
        "initial_loss": round(statistics.fmean(init_losses), 5),
    }
    records = []
    for config in args.configs:
        runs = [results[(config.name, s)] for s in args.seeds]
        finals = [final(r) for r in runs]
        avgs = [statistics.fmean(r.losses) for r in runs]
        fr = [f / base_final[s] for f, s in zip(finals, args.seeds)]
        ar = [a / base_avg[s] for a, s in zip(avgs, args.seeds)]
        bit = bit_checks.get(config.name)
        n_steps = min(len(r.losses) for r in runs)
        curve = [statistics.fmean(r.losses[i] for r in runs) for i in range(n_steps)]
        rec = {
            "config": config.name, "param_dtype": SHORT[config.param_dtype],
            "moments_dtype": SHORT[config.moments_dtype],
            "state_dtype": SHORT[config.state_dtype] if config.state_dtype else None,
            "master_weights": config.master_weights, "seeds": args.seeds, "steps": args.steps,
            "batch": args.batch, "final_loss": finals, "avg_loss": avgs,
            "final_loss_mean": statistics.fmean(finals), "avg_loss_mean": statistics.fmean(avgs),
            "final_ratio_mean": statistics.fmean(fr), "final_ratio_max": max(fr),
            "avg_ratio_mean": statistics.fmean(ar), "avg_ratio_max": max(ar),
            "baseline_spread": spread, "tolerance": tol, "tolerance_source": tol_src,
            "state_bytes_per_param": runs[0].state_bytes_per_param,
            "state_scalar_bytes": runs[0].state_scalar_bytes,
            "bytes_moved_per_param": bytes_moved_per_param(config),
            "opt_step_ms": statistics.median(x for r in runs for x in r.opt_ms[2:] or r.opt_ms),
            "train_step_ms": statistics.median(x for r in runs
                                               for x in r.step_ms[2:] or r.step_ms),
            "bit_identical": None if bit is None else bit["identical"],
            "bit_identity": bit,
            "verdict": verdict_for(config, fr, tol, tol_src, bit),
            "curve": downsample(curve), "n_params": sum(p.numel() for p in TinyLM().parameters()),
            "backend": runs[0].backend, **meta, "plot": None,
        }
        records.append(rec)

    plot_msg = plot(records, out / "lowprec.png")
    for rec in records:
        rec["plot"] = plot_msg

    table_md = build_table(records)
    bits = {tuple(c["pair"]): c for c in bit_checks.values()}
    lines = [
        f"# FusedAdamW low-precision modes: {args.steps} steps x seeds {args.seeds}, "
        f"batch {args.batch}{' (--quick)' if args.quick else ''}",
        "",
        f"TinyLM ({records[0]['n_params']:,} params: {LAYERS} layers, width {WIDTH}, context "
        f"{SEQ}, vocab {VOCAB}) on an order-2 Markov chain; entropy floor "
        f"{meta['entropy_floor']:.4f} nats, initial loss {meta['initial_loss']:.4f}. "
        f"lr {LR} warmup {WARMUP_FRAC:.0%} + cosine, betas {BETAS}, wd {WEIGHT_DECAY}.",
        f"Baseline (fp32) final loss per seed: "
        + ", ".join(f"{base_final[s]:.4f}" for s in args.seeds)
        + f"; seed spread {spread:.3%}; tolerance for master modes {tol:.2%} ({tol_src}).",
        "Ratios are per seed against the fp32 baseline of the same seed (mean, max over seeds); "
        "final = mean of the last 5% of steps; state B/param from opt.state (per-element "
        "tensors; step counters excluded); moved B/param/step by formula "
        "(bytes_moved_per_param); times are medians (ms).",
        "",
        table_md,
        "",
    ]
    for pair, c in bits.items():
        lines.append(f"Bit identity {pair[0]} vs {pair[1]}, same grads every step (state "
                     f"master_param vs remainder_join(param, param_remainder)): "
                     f"{'identical' if c['identical'] else 'NOT identical'} "
                     f"({c['elements_differing']} of {c['elements']} elements differ; the "
                     f"bf16 params differ in {c['params_differing']}: ties rounded away "
                     f"from zero).")
        sep = c["separate_runs"]
        if sep is not None:
            lines.append(f"  Trained separately (each its own forward pass): masters "
                         f"{'identical' if sep['identical'] else 'differ'} "
                         f"({sep['elements_differing']} of {sep['elements']}); params first "
                         f"differ by step {sep['params_first_differ_by_step']}.")
    if not bits:
        lines.append("Bit identity: not checked (needs an fp32 and a remainder config).")
    lines += [f"Plot: {plot_msg}.",
              f"{meta['device_name']}, {meta['cores']} cores, {meta['threads']} threads, "
              f"torch {meta['torch']}, fused_adamw {meta['fused_adamw']} (backend "
              f"{records[0]['backend']}), git {meta['git_commit']}, {meta['date']}; "
              f"whole run {elapsed:.0f} s."]
    report = "\n".join(lines)
    print(report)
    (out / "lowprec.md").write_text(report + "\n")
    with open(out / "lowprec.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return records


if __name__ == "__main__":
    main()
