"""One rank of a distributed test in tests/test_distributed.py (CPU, gloo, loopback).

Run by the test as ``python _dist_worker.py SCENARIO IMPL OUT_DIR [JSON]`` in WORLD_SIZE
processes whose environment holds RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Each rank
writes what it measured to ``OUT_DIR/rank{RANK}.pt`` (``torch.save`` of plain tensors,
floats, strings, lists and dicts); the test process does every comparison, so that a failure
names the param, the step and the difference.

IMPL picks the optimizer under test ("ours"): ``fused`` is FusedAdamW (what the tests are
for; ``fused:NAME`` passes ``backend=NAME``, e.g. ``fused:torch``), ``torch`` is
torch.optim.AdamW's for-loop (``foreach=False``) and ``torch_fused`` is
torch.optim.AdamW(fused=True). The last two prove the harness: every test must pass with
them, the first bitwise, the second within the tolerances the tests use for FusedAdamW
(torch's fused CPU kernel rounds differently from its for-loop, as FusedAdamW does). The
reference every scenario compares with is always torch.optim.AdamW(foreach=False).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

LR = 1e-3  # the decay group; the no-decay group runs at NO_DECAY_LR
NO_DECAY_LR = 2e-3
WEIGHT_DECAY = 0.1
WARMUP = 5  # LambdaLR: linear warmup over the first WARMUP steps, then flat
GLOBAL_BATCH = 8
D_IN, D_MODEL, D_HIDDEN, D_OUT = 16, 33, 65, 5  # 33 and 65 split unevenly over 2 ranks


# ---------------------------------------------------------------------------- optimizers


def optimizer_class(impl: str):
    """(class, extra constructor kwargs) of the optimizer under test."""
    if impl == "fused" or impl.startswith("fused:"):
        from fused_adamw import FusedAdamW

        return FusedAdamW, ({"backend": impl.split(":", 1)[1]} if ":" in impl else {})
    if impl == "torch":
        return torch.optim.AdamW, {"foreach": False}
    if impl == "torch_fused":
        return torch.optim.AdamW, {"fused": True}
    raise ValueError(f"unknown impl {impl!r}; use fused, fused:BACKEND, torch or torch_fused")


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: matrices decay at LR; biases, norm weights and other 1-D params do not
    decay and run at NO_DECAY_LR. Order follows named_parameters (the same in every run)."""
    decay = [p for _, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": WEIGHT_DECAY, "lr": LR},
        {"params": no_decay, "weight_decay": 0.0, "lr": NO_DECAY_LR},
    ]


def make_optimizer(model: nn.Module, which: str):
    """``which`` is an impl name, or "ref" for the reference torch.optim.AdamW for-loop."""
    cls, extra = optimizer_class("torch" if which == "ref" else which)
    return cls(param_groups(model), lr=LR, weight_decay=WEIGHT_DECAY, **extra)


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / WARMUP)


def make_scheduler(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, warmup)


# ---------------------------------------------------------------------------- data, models


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of step ``step``'s global batch: a function of the step only, so
    that every run (uninterrupted, resumed, either optimizer) sees the same data."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, D_IN, generator=g)
    y = torch.randn(GLOBAL_BATCH, D_OUT + 1, generator=g)
    per = GLOBAL_BATCH // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


class Block(nn.Module):
    """A pre-norm MLP block: LayerNorm (1-D weight and bias) and two uneven Linears."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D_MODEL)
        self.fc1 = nn.Linear(D_MODEL, D_HIDDEN)
        self.fc2 = nn.Linear(D_HIDDEN, D_MODEL)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    """A tiny transformer-ish MLP. Under FSDP2 on 2 ranks (Shard(0)) every dim-0 size here
    is odd, so the last shard is the short one: 33 -> 17/16, 65 -> 33/32, 5 -> 3/2, and the
    (1, 33) value head and its (1,) bias leave rank 1 an *empty* local shard. ``scale`` is a
    bias-only 1-D param owned by the root module."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D_IN, D_MODEL)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.scale = nn.Parameter(torch.ones(D_MODEL))
        self.head = nn.Linear(D_MODEL, D_OUT)
        self.value = nn.Linear(D_MODEL, 1)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        h = h * self.scale
        return torch.cat([self.head(h), self.value(h)], dim=-1)


def loss_fn(model, x, y):
    return F.mse_loss(model(x), y)


def init_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the same full (unsharded) init on every rank
    return Net()


def fsdp_model(mesh, seed: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = init_model(seed)
    for m in (model.inp, *model.blocks, model.head, model.value):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model, opt, sched, steps: range, rank: int, world: int) -> list[float]:
    """Ordinary training steps; returns this rank's local loss of each step."""
    losses = []
    for step in steps:
        x, y = batch(step, rank, world)
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def full_params(model) -> dict[str, torch.Tensor]:
    """Every param gathered to its full tensor (a collective: all ranks, same order)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = t.detach().clone()
    return out


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------- scenarios


def scenario_fsdp2(impl: str, rank: int, world: int, out: Path, args: dict) -> dict:
    """Trains the FSDP2 model with "ours" and with the reference from the same init."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    steps = args["steps"]
    mesh = init_device_mesh("cpu", (world,))
    result = {}
    for which in (impl, "ref"):
        model = fsdp_model(mesh, seed=0)
        result["init"] = full_params(model)
        opt = make_optimizer(model, which)
        sched = make_scheduler(opt)
        losses = train(model, opt, sched, range(steps), rank, world)
        run = {"losses": losses, "params": full_params(model), "state": {}, "exp_avg": {},
               "exp_avg_sq": {}, "lr": [g["lr"] for g in opt.param_groups]}
        for name, p in model.named_parameters():
            st = opt.state[p]
            info = {"keys": sorted(st.keys()), "param_type": type(p).__name__}
            for key in ("exp_avg", "exp_avg_sq"):
                t = st.get(key)
                info[key] = None if t is None else {
                    "type": type(t).__name__,
                    "is_dtensor": isinstance(t, DTensor),
                    "placements_match": isinstance(t, DTensor) and t.placements == p.placements,
                    "mesh_match": isinstance(t, DTensor) and t.device_mesh == p.device_mesh,
                    "shape": tuple(t.shape),
                    "param_shape": tuple(p.shape),
                    "local_shape": tuple((t.to_local() if isinstance(t, DTensor) else t).shape),
                    "param_local_shape": tuple(p.to_local().shape),
                    "dtype": str(t.dtype),
                    "param_dtype": str(p.dtype),
                }
            s = st.get("step")
            info["step"] = None if s is None else float(full(s).detach().cpu().reshape(()))
            info["step_numel"] = None if s is None else full(s).numel()
            run["state"][name] = info
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    run[key][name] = full(st[key]).detach().clone()
        result[which if which == "ref" else "ours"] = run
    return result


def _save(model, opt, sched, path: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    # The scheduler is not what is under test; its few numbers travel beside the checkpoint.
    return {"sched": sched.state_dict(), "optim_state_keys": {
        fqn: sorted(st.keys()) for fqn, st in osd["state"].items()},
        "optim_group_keys": [sorted(k for k in g if k != "params") for g in osd["param_groups"]]}


def _load(mesh, which: str, path: Path, saved: dict):
    """A fresh model (from another seed, so that a load that does nothing shows) and a fresh
    optimizer of kind ``which``, restored from the checkpoint at ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = fsdp_model(mesh, seed=123)
    opt = make_optimizer(model, which)
    sched = make_scheduler(opt)
    # torch's load_state_dict takes every group key from the checkpoint, "foreach" and
    # "fused" included, which would turn the for-loop reference into whatever saved the
    # checkpoint; each optimizer keeps its own implementation flags.
    flags = [{k: g[k] for k in ("foreach", "fused") if k in g} for g in opt.param_groups]
    msd, osd = get_state_dict(model, opt)  # creates the optimizer's state (a step at lr 0)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    for g, f in zip(opt.param_groups, flags):
        g.update(f)
    sched.load_state_dict(saved["sched"])
    return model, opt, sched


def scenario_dcp(impl: str, rank: int, world: int, out: Path, args: dict) -> dict:
    """Checkpoint round trips through torch.distributed.checkpoint, both directions."""
    from torch.distributed.device_mesh import init_device_mesh

    n, m = args["n"], args["m"]
    ckpt_root = Path(args["ckpt_dir"])
    mesh = init_device_mesh("cpu", (world,))
    res = {}

    def uninterrupted(which):
        model = fsdp_model(mesh, seed=0)
        opt = make_optimizer(model, which)
        sched = make_scheduler(opt)
        losses = train(model, opt, sched, range(n + m), rank, world)
        return {"losses": losses[n:], "params": full_params(model)}

    def saved_after_n(which, path):
        model = fsdp_model(mesh, seed=0)
        opt = make_optimizer(model, which)
        sched = make_scheduler(opt)
        train(model, opt, sched, range(n), rank, world)
        return _save(model, opt, sched, path)

    def resumed(which, path, saved):
        model, opt, sched = _load(mesh, which, path, saved)
        steps = [float(full(opt.state[p]["step"]).reshape(())) for p in model.parameters()]
        losses = train(model, opt, sched, range(n, n + m), rank, world)
        return {"losses": losses, "params": full_params(model), "loaded_steps": steps,
                "lr": [g["lr"] for g in opt.param_groups]}

    res["ours_full"] = uninterrupted(impl)
    res["ref_full"] = uninterrupted("ref")
    saved_ours = saved_after_n(impl, ckpt_root / "ours")
    saved_ref = saved_after_n("ref", ckpt_root / "ref")
    res["schema_ours"] = {k: saved_ours[k] for k in ("optim_state_keys", "optim_group_keys")}
    res["schema_ref"] = {k: saved_ref[k] for k in ("optim_state_keys", "optim_group_keys")}
    res["ours_from_ours"] = resumed(impl, ckpt_root / "ours", saved_ours)
    res["ref_from_ours"] = resumed("ref", ckpt_root / "ours", saved_ours)
    res["ours_from_ref"] = resumed(impl, ckpt_root / "ref", saved_ref)
    return res


def scenario_zero(impl: str, rank: int, world: int, out: Path, args: dict) -> dict:
    """ZeroRedundancyOptimizer(optimizer_class=ours) under DDP vs DDP + reference AdamW."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    steps, bucket_view = args["steps"], args["bucket_view"]
    res = {}
    for which in ("zero", "ref"):
        model = init_model(seed=0)
        ddp = DDP(model)
        if which == "zero":
            cls, extra = optimizer_class(impl)
            opt = ZeroRedundancyOptimizer(
                param_groups(model), optimizer_class=cls,
                parameters_as_bucket_view=bucket_view, lr=LR, weight_decay=WEIGHT_DECAY,
                **extra)
        else:
            opt = make_optimizer(model, "ref")
        sched = make_scheduler(opt)
        losses, snapshots = [], []
        for step in range(steps):
            x, y = batch(step, rank, world)
            loss = loss_fn(ddp, x, y)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        res[which] = {"losses": losses, "params": snapshots}
        if which == "zero":
            res["local_optimizer"] = type(opt.optim).__name__
    return res


def _clip_kwargs(impl: str, args: dict) -> dict:
    """FusedAdamW's clipping arguments (issue #19), none for torch's optimizers (the harness
    checks: they clip with clip_grad_norm_ like the reference)."""
    if not impl.startswith("fused"):
        return {}
    kw = {"max_grad_norm": args["max_norm"], "grad_norm_type": float(args["norm_type"]),
          "track_norms": True}
    if args.get("group"):
        kw["grad_norm_process_group"] = dist.group.WORLD
    return kw


def _clip_train(model, opt, sched, steps, rank, world, args, clip_outside, ddp=None):
    """Training steps with clipping: returns per step the local loss, the total norm, and
    (FusedAdamW) the tracked norms of each named param next to the full-tensor norms of its
    grad before the step, its value after and its change."""
    max_norm, norm_type = args["max_norm"], float(args["norm_type"])
    named = list(model.named_parameters())
    out = {"losses": [], "norms": [], "tracked": [], "expected": []}
    for step in steps:
        x, y = batch(step, rank, world)
        loss = loss_fn(ddp if ddp is not None else model, x, y)
        loss.backward()
        before = {n: full(p).detach().clone() for n, p in named}
        grads = {n: full(p.grad).detach().clone() for n, p in named}
        if clip_outside and norm_type == float("inf"):
            # torch's clip_grad_norm_ cannot take the inf norm of FSDP2's empty shards
            # (_foreach_norm has no identity for max): its formula on the gathered grads.
            norm = max(float(g.abs().max()) for g in grads.values())
            coef = min(max_norm / (norm + 1e-6), 1.0)
            for p in model.parameters():
                p.grad.mul_(coef)
            out["norms"].append(norm)
        elif clip_outside:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm,
                                                  norm_type=norm_type)
            out["norms"].append(float(full(norm)))
        opt.step()
        local = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer's local optimizer
        if not clip_outside:
            out["norms"].append(float(local.grad_norm))
            tracked = {n: local.norms[p].clone() for n, p in named if p in local.norms}
            out["tracked"].append(tracked)
            out["expected"].append({n: torch.stack([
                grads[n].double().norm(), full(p).detach().double().norm(),
                (full(p).detach().double() - before[n].double()).norm()]).float()
                for n, p in named})
        sched.step()
        opt.zero_grad(set_to_none=True)
        out["losses"].append(loss.item())
    return out


def scenario_clip(impl: str, rank: int, world: int, out: Path, args: dict) -> dict:
    """Issue #19 under FSDP2: FusedAdamW(max_grad_norm, track_norms) vs the reference with
    torch's clip_grad_norm_(model.parameters()) on the same fully_shard model."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    res = {}
    for which in (impl, "ref"):
        model = fsdp_model(mesh, seed=0)
        cls, extra = optimizer_class("torch" if which == "ref" else which)
        kw = _clip_kwargs(which, args) if which != "ref" else {}
        opt = cls(param_groups(model), lr=LR, weight_decay=WEIGHT_DECAY, **extra, **kw)
        run = _clip_train(model, opt, make_scheduler(opt), range(args["steps"]), rank, world,
                          args, clip_outside=not kw)
        run["params"] = full_params(model)
        res["ref" if which == "ref" else "ours"] = run
    return res


def scenario_zero_clip(impl: str, rank: int, world: int, out: Path, args: dict) -> dict:
    """Issue #19 with ZeRO: ZeroRedundancyOptimizer(optimizer_class=FusedAdamW,
    max_grad_norm, grad_norm_process_group=WORLD) under DDP vs DDP + torch's clip over all
    params + the reference AdamW."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    res = {}
    for which in ("zero", "ref"):
        model = init_model(seed=0)
        ddp = DDP(model)
        if which == "zero":
            cls, extra = optimizer_class(impl)
            kw = _clip_kwargs(impl, {**args, "group": True})
            opt = ZeroRedundancyOptimizer(param_groups(model), optimizer_class=cls, lr=LR,
                                          weight_decay=WEIGHT_DECAY, **extra, **kw)
        else:
            kw = {}
            opt = make_optimizer(model, "ref")
        run = _clip_train(model, opt, make_scheduler(opt), range(args["steps"]), rank, world,
                          args, clip_outside=not kw, ddp=ddp)
        run["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        res[which] = run
    return res


SCENARIOS = {"fsdp2": scenario_fsdp2, "dcp": scenario_dcp, "zero": scenario_zero,
             "clip": scenario_clip, "zero_clip": scenario_zero_clip}


def main() -> None:
    scenario, impl, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    args = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # Collectives give up (and the rank exits non-zero) well before the test's own timeout.
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = SCENARIOS[scenario](impl, rank, world, out, args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    result["impl"] = impl
    tmp = out / f"rank{rank}.pt.tmp"
    torch.save(result, tmp)
    tmp.rename(out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
