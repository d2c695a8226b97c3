"""FusedAdamW under torch.distributed: FSDP2 (DTensor params), DCP checkpoints and ZeRO.

Every test runs 2 processes on CPU with the gloo backend over loopback (``_dist_worker.py``,
one launch per scenario shared by the tests that read it); the workers write what they
measured to files and the comparisons happen here. A launch that does not finish in
LAUNCH_TIMEOUT_S is killed and its test fails with both ranks' output; a rank that fails
takes the other down at once.

The optimizer under test is injectable: ``FUSED_ADAMW_DIST_IMPL=torch`` runs every test with
torch.optim.AdamW's for-loop as "ours" (every comparison then holds bitwise) and
``FUSED_ADAMW_DIST_IMPL=torch_fused`` with torch.optim.AdamW(fused=True), whose CPU kernel
rounds differently from the for-loop, as FusedAdamW does; both must pass, which proves the
harness and the tolerances. The default, and what CI runs, is ``fused``: FusedAdamW with its
automatic backend (``fused:NAME`` picks FusedAdamW's ``backend=NAME``, e.g. ``fused:torch``).

Tolerances. FusedAdamW computes in fp32 in the fma form of torch's fused CUDA AdamW; the
reference is torch's for-loop AdamW (Python-double hyperparameters, lerp, separate sqrt and
divide). Both are correct to rounding, so after each step params differ by a few ulp of
``lr * update`` (lr ~1e-3, update ~1) plus a few ulp of |p| (~0.1-1) from the decay and the
subtraction, fed back through slightly different grads, which over 16 steps grows at most
linearly: ~1e-7 absolute. Measured with torch's fused CPU AdamW as "ours": params within
6e-8 (about 1% of the CLOSE bound), losses within 1.5% of it. CLOSE (rtol 1e-5, atol 1e-6)
keeps that ~100x headroom and is still ~100x below one step's update (2e-4 to 2e-3 per
element), so an optimizer that skips a step, drops the decay, uses the wrong group's lr or
step count, misses a bias correction or updates the wrong shard fails it. Resuming the same
optimizer from a checkpoint must be bitwise: DCP stores the exact tensors and the same
arithmetic then runs on the same inputs (it holds bitwise for torch.optim.AdamW).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

IMPL = os.environ.get("FUSED_ADAMW_DIST_IMPL", "fused")
WORLD = 2
LAUNCH_TIMEOUT_S = 120
WORKER = Path(__file__).with_name("_dist_worker.py")
CLOSE = dict(rtol=1e-5, atol=1e-6)
# Moments: exp_avg is a signed running mean, so some elements cancel to ~0 and no
# elementwise relative bound holds; they are compared against their tensor's scale instead,
# max |ours - ref| <= MOMENTS_RTOL * max |ref|. The bound is set by the fp32 hyperparameters
# of torch's fused CUDA arithmetic, which FusedAdamW follows: it computes (1 - beta2) from
# beta2 rounded to float, and float(0.999) = 0.99900001287, so (1 - beta2) and with it every
# exp_avg_sq is 1.29e-5 smaller, relatively, than the for-loop's (double 1 - 0.999, rounded
# once); measured: 1.30e-5 from the first step on, while exp_avg (1 - 0.9 in float: 2.4e-7)
# stays within 1.2e-6 over 16 steps. For any beta2 in [0.99, 1) the rounding is at most half
# an ulp of beta2 over (1 - beta2), <= 3e-5 at 0.999. 1e-4 covers that with 3x headroom and
# still catches a wrong moment: dropping one of 16 steps, or a wrong beta, moves it by > 1%.
MOMENTS_RTOL = 1e-4


def _distributed_unavailable() -> str | None:
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    return None


def _fsdp2_unavailable() -> str | None:
    reason = _distributed_unavailable()
    if reason:
        return reason
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.distributed.tensor import DTensor  # noqa: F401
    except ImportError as e:
        return f"FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6) is unavailable: {e}"
    return None


def _dcp_unavailable() -> str | None:
    reason = _fsdp2_unavailable()
    if reason:
        return reason
    try:
        import torch.distributed.checkpoint  # noqa: F401
        from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: F401
    except ImportError as e:
        return f"torch.distributed.checkpoint.state_dict is unavailable: {e}"
    return None


def _needs(reason: str | None):
    return pytest.mark.skipif(reason is not None, reason=str(reason))


needs_dist = _needs(_distributed_unavailable())
needs_fsdp2 = _needs(_fsdp2_unavailable())
needs_dcp = _needs(_dcp_unavailable())


# ---------------------------------------------------------------------------- launching


class LaunchFailed(Exception):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, port: int) -> dict:
    env = dict(os.environ)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
               LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, whatever the hostname says
    # The workers import the same fused_adamw this process would (source tree or wheel).
    spec = importlib.util.find_spec("fused_adamw")
    if spec is not None and spec.origin:
        site = str(Path(spec.origin).parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            [site] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no output>"


def launch(scenario: str, out: Path, **args) -> list[dict]:
    """Runs ``scenario`` on WORLD ranks and returns each rank's results. Raises LaunchFailed
    with every rank's output when a rank fails or the launch runs past LAUNCH_TIMEOUT_S.
    The free port is picked, released and then bound by rank 0, so another process can take
    it in between: that one failure is retried once with a new port."""
    try:
        return _launch_once(scenario, out, **args)
    except LaunchFailed as e:
        if "address already in use" not in str(e).lower():
            raise
        return _launch_once(scenario, out / "retry", **args)


def _launch_once(scenario: str, out: Path, **args) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs, logs = [], []
    for rank in range(WORLD):
        log = out / f"rank{rank}.log"
        logs.append(log)
        with open(log, "wb") as f:
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), scenario, IMPL, str(out), json.dumps(args)],
                env=_env(rank, port), stdout=f, stderr=subprocess.STDOUT, cwd=str(out)))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    why = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                break
            if any(c not in (None, 0) for c in codes):
                bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
                why = f"rank(s) {bad} exited with {[codes[r] for r in bad]}"
                break
            if time.monotonic() > deadline:
                why = f"timed out after {LAUNCH_TIMEOUT_S} s"
                break
            time.sleep(0.05)
    finally:
        for p in procs:  # only our own children, by object
            if p.poll() is None:
                p.kill()
            p.wait()
    if why is not None:
        text = "\n".join(f"----- rank {r} output (tail) -----\n{_tail(log)}"
                         for r, log in enumerate(logs))
        raise LaunchFailed(f"{scenario} (impl={IMPL}) failed: {why}\n{text}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


class Launch:
    """One scenario's launch, run at most once and shared by the tests that read it: a
    launch that failed fails each of them with its output (rather than erroring in setup)."""

    def __init__(self, scenario: str, out: Path, **args):
        self.scenario, self.out, self.args = scenario, out, args
        self._result = None
        self._error = None

    def get(self) -> list[dict]:
        if self._result is None and self._error is None:
            try:
                self._result = launch(self.scenario, self.out, **self.args)
            except LaunchFailed as e:
                self._error = str(e)
        if self._error is not None:
            pytest.fail(self._error, pytrace=False)
        return self._result


# ---------------------------------------------------------------------------- comparisons


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor, **tol) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if not torch.allclose(ours, ref, **tol):
        diff = (ours.double() - ref.double()).abs()
        raise AssertionError(
            f"{name}: max |diff| {diff.max().item():.3e} at flat index "
            f"{diff.argmax().item()} (max |ref| {ref.abs().max().item():.3e}); tolerance {tol}")


def assert_equal(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if not torch.equal(ours, ref):
        diff = (ours.double() - ref.double()).abs()
        raise AssertionError(f"{name}: not bitwise equal, max |diff| {diff.max().item():.3e}, "
                             f"{(diff > 0).sum().item()} of {diff.numel()} elements differ")


def assert_params(label: str, ours: dict, ref: dict, exact: bool) -> None:
    assert ours.keys() == ref.keys(), f"{label}: param names differ"
    for name in ref:
        if exact:
            assert_equal(f"{label}: {name}", ours[name], ref[name])
        else:
            assert_close(f"{label}: {name}", ours[name], ref[name], **CLOSE)


def assert_losses(label: str, ours: list, ref: list, exact: bool) -> None:
    assert len(ours) == len(ref), f"{label}: {len(ours)} losses vs {len(ref)}"
    a, b = torch.tensor(ours, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    if exact:
        assert_equal(f"{label}: losses per step", a, b)
    else:
        assert_close(f"{label}: losses per step", a, b, **CLOSE)


# ---------------------------------------------------------------------------- 1. FSDP2

FSDP_STEPS = 16


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    return Launch("fsdp2", tmp_path_factory.mktemp("fsdp2"), steps=FSDP_STEPS)


@needs_fsdp2
def test_fsdp2_matches_torch_adamw(fsdp2_run):
    """FSDP2 (fully_shard per layer and root, 2 ranks, uneven and empty last shards), two
    param groups (decay at lr 1e-3 / no decay at 2e-3), LambdaLR warmup, 16 steps: every
    step's loss on each rank, and every gathered full param at the end, match
    torch.optim.AdamW(foreach=False) run from the same init on the same data within CLOSE
    (rounding of two correct orders of the same arithmetic; see the module docstring)."""
    for rank, res in enumerate(fsdp2_run.get()):
        ours, ref = res["ours"], res["ref"]
        assert_losses(f"rank {rank}", ours["losses"], ref["losses"], exact=False)
        assert_params(f"rank {rank}", ours["params"], ref["params"], exact=False)
        assert ours["lr"] == pytest.approx(ref["lr"], rel=1e-12)


@needs_fsdp2
def test_fsdp2_every_param_moved(fsdp2_run):
    """Every param, including the ones whose shard on rank 1 is empty, moved from its init
    by far more than CLOSE: the comparison above compares trained params, and an optimizer
    that skips a shard or a group cannot hide inside the tolerance."""
    for rank, res in enumerate(fsdp2_run.get()):
        for name, p in res["ours"]["params"].items():
            moved = (p - res["init"][name]).abs().max().item()
            assert moved > 1e-3, f"rank {rank}: {name} moved only {moved:.2e} in {FSDP_STEPS} steps"


@needs_fsdp2
def test_fsdp2_state_is_dtensor_like_torch(fsdp2_run):
    """``opt.state[p]`` for a DTensor param holds what torch.optim.AdamW holds: exp_avg and
    exp_avg_sq are DTensors with the param's device_mesh, placements, global shape, local
    shard shape and dtype (so DCP saves and reshards them), the same keys as torch's, and
    ``step`` is one number equal to the number of steps taken. The moments' gathered values
    match torch's within MOMENTS_RTOL of each tensor's largest element (they are the global
    moments, each element at its place)."""
    for rank, res in enumerate(fsdp2_run.get()):
        ours, ref = res["ours"], res["ref"]
        assert ours["state"].keys() == ref["state"].keys()
        for name, info in ours["state"].items():
            where = f"rank {rank}: state of {name}"
            assert info["keys"] == ref["state"][name]["keys"], (
                f"{where}: keys {info['keys']} != torch's {ref['state'][name]['keys']}")
            for key in ("exp_avg", "exp_avg_sq"):
                t = info[key]
                assert t is not None, f"{where}: no {key}"
                assert t["is_dtensor"], f"{where}: {key} is a {t['type']}, not a DTensor"
                assert t["mesh_match"], f"{where}: {key} has another device_mesh"
                assert t["placements_match"], f"{where}: {key} has other placements"
                assert t["shape"] == t["param_shape"], f"{where}: {key} global shape"
                assert t["local_shape"] == t["param_local_shape"], f"{where}: {key} local shape"
                assert t["dtype"] == t["param_dtype"], f"{where}: {key} dtype"
                scale = ref[key][name].abs().max().item()
                assert_close(f"{where}: {key}", ours[key][name], ref[key][name],
                             rtol=0, atol=MOMENTS_RTOL * scale)
            assert info["step_numel"] == 1, f"{where}: step has {info['step_numel']} elements"
            assert info["step"] == FSDP_STEPS, f"{where}: step {info['step']} != {FSDP_STEPS}"


# ---------------------------------------------------------------------------- 2. DCP

DCP_N, DCP_M = 6, 6


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    return Launch("dcp", out, n=DCP_N, m=DCP_M, ckpt_dir=str(out / "ckpt"))


@needs_dcp
def test_dcp_resume_same_optimizer_is_bitwise(dcp_run):
    """FusedAdamW trained DCP_N steps under FSDP2, saved with get_state_dict + dcp.save, then
    loaded (dcp.load + set_state_dict) into a fresh model (other init) and a fresh FusedAdamW
    and trained DCP_M more steps: every loss of those steps and every final param are bitwise
    those of an uninterrupted FusedAdamW run. Tolerance 0: the checkpoint holds the exact
    params, moments and step counts, and the same code then runs on the same inputs."""
    for rank, res in enumerate(dcp_run.get()):
        r = res["ours_from_ours"]
        assert r["loaded_steps"] == [float(DCP_N)] * len(r["loaded_steps"]), (
            f"rank {rank}: steps after load {r['loaded_steps']}")
        assert_losses(f"rank {rank}: resumed", r["losses"], res["ours_full"]["losses"],
                      exact=True)
        assert_params(f"rank {rank}: resumed", r["params"], res["ours_full"]["params"],
                      exact=True)


@needs_dcp
def test_dcp_fused_checkpoint_loads_into_torch_adamw(dcp_run):
    """A FusedAdamW DCP checkpoint (FSDP2) resumes in torch.optim.AdamW: the DCP_M steps
    after loading match the uninterrupted FusedAdamW run within CLOSE (the two optimizers'
    rounding differs; see the module docstring); the optimizer state in the checkpoint has
    exactly torch's per-param keys and its param groups carry every key torch's do."""
    for rank, res in enumerate(dcp_run.get()):
        r = res["ref_from_ours"]
        assert r["loaded_steps"] == [float(DCP_N)] * len(r["loaded_steps"])
        assert_losses(f"rank {rank}: torch from ours", r["losses"],
                      res["ours_full"]["losses"], exact=False)
        assert_params(f"rank {rank}: torch from ours", r["params"],
                      res["ours_full"]["params"], exact=False)
        assert res["schema_ours"]["optim_state_keys"] == res["schema_ref"]["optim_state_keys"]
        for ours_keys, ref_keys in zip(res["schema_ours"]["optim_group_keys"],
                                       res["schema_ref"]["optim_group_keys"]):
            missing = set(ref_keys) - set(ours_keys)
            assert not missing, f"the checkpoint's param groups lack torch's keys {missing}"


@needs_dcp
def test_dcp_torch_checkpoint_loads_into_fused(dcp_run):
    """The reverse: a torch.optim.AdamW DCP checkpoint (FSDP2) resumes in FusedAdamW; the
    DCP_M steps after loading match the uninterrupted torch run within CLOSE, the step
    counts are restored and the scheduled lr is the one a FusedAdamW checkpoint gives."""
    for rank, res in enumerate(dcp_run.get()):
        r = res["ours_from_ref"]
        assert r["loaded_steps"] == [float(DCP_N)] * len(r["loaded_steps"])
        assert r["lr"] == pytest.approx(res["ours_from_ours"]["lr"], rel=1e-12)
        assert_losses(f"rank {rank}: ours from torch", r["losses"],
                      res["ref_full"]["losses"], exact=False)
        assert_params(f"rank {rank}: ours from torch", r["params"],
                      res["ref_full"]["params"], exact=False)


# ---------------------------------------------------------------------------- 3. ZeRO

ZERO_STEPS = 10


@pytest.fixture(scope="module", params=[True, False], ids=["bucket_view", "no_bucket_view"])
def zero_run(request, tmp_path_factory):
    bv = request.param
    out = tmp_path_factory.mktemp("zero_bv" if bv else "zero_nobv")
    return Launch("zero", out, steps=ZERO_STEPS, bucket_view=bv)


@needs_dist
def test_zero_ranks_stay_identical(zero_run):
    """ZeroRedundancyOptimizer(optimizer_class=FusedAdamW, parameters_as_bucket_view=True and
    False) under DDP: after every step both ranks hold bitwise the same params (each rank
    updates its partition and ZeRO broadcasts it; a local optimizer that moves params out of
    ZeRO's buckets updates memory that is never broadcast, and the ranks drift apart)."""
    r0, r1 = zero_run.get()
    assert r0["local_optimizer"] == r1["local_optimizer"]
    for step, (a, b) in enumerate(zip(r0["zero"]["params"], r1["zero"]["params"])):
        for name in a:
            assert_equal(f"step {step + 1}: {name} rank 0 vs rank 1", a[name], b[name])


@needs_dist
def test_zero_matches_ddp_torch_adamw(zero_run):
    """The ZeRO run (two param groups, LambdaLR) matches plain DDP + torch.optim.AdamW
    (foreach=False) on the same data after every one of ZERO_STEPS steps, within CLOSE
    (rounding only; see the module docstring)."""
    for rank, res in enumerate(zero_run.get()):
        assert_losses(f"rank {rank}", res["zero"]["losses"], res["ref"]["losses"], exact=False)
        for step, (a, b) in enumerate(zip(res["zero"]["params"], res["ref"]["params"])):
            assert_params(f"rank {rank}, step {step + 1}", a, b, exact=False)


# ---------------------------------------------------------------------------- 4. clipping (#19)

CLIP_STEPS = 8
# The grads of this model have a total norm of ~0.3-1.5: 0.5 clips on most steps.
CLIP_MAX_NORM = 0.5


CLIP_MAX_NORM_INF = 0.1  # the largest |grad| is ~0.1-0.4


@pytest.fixture(scope="module", params=["2.0", "inf"])
def clip_run(request, tmp_path_factory):
    max_norm = CLIP_MAX_NORM if request.param == "2.0" else CLIP_MAX_NORM_INF
    return Launch("clip", tmp_path_factory.mktemp(f"clip_{request.param}"), steps=CLIP_STEPS,
                  max_norm=max_norm, norm_type=request.param), max_norm


def _check_clip_run(label, ours, ref, tracked: bool, max_norm=CLIP_MAX_NORM):
    # The total norm: float32 sums in another order than torch's (per-tile partials, float64
    # across tiles and ranks vs torch's norm of per-shard norms): a few ulp; 1e-6 relative.
    for s, (a, b) in enumerate(zip(ours["norms"], ref["norms"])):
        assert a == pytest.approx(b, rel=1e-6), f"{label}: grad_norm of step {s}: {a} vs {b}"
    assert sum(n > max_norm for n in ref["norms"]) >= CLIP_STEPS // 2, (
        f"{label}: the clip acted on too few steps to test it: {ref['norms']}")
    assert_losses(label, ours["losses"], ref["losses"], exact=False)
    assert_params(label, ours["params"], ref["params"], exact=False)
    if not tracked or IMPL not in ("fused",) and not IMPL.startswith("fused:"):
        return
    for s, (got, want) in enumerate(zip(ours["tracked"], ours["expected"])):
        assert got.keys() == want.keys(), f"{label}: step {s}: tracked {sorted(got)}"
        for name in want:
            # float32 sums of the local squares, summed over the ranks, vs float64 full-tensor
            # norms: a few float32 ulp; the delta (~1e-3 of the param) as well.
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-9,
                                       msg=f"{label}: step {s}: norms of {name}")


@needs_fsdp2
def test_fsdp2_clip_matches_torch_clip_grad_norm(clip_run):
    """FusedAdamW(max_grad_norm, track_norms) on the FSDP2 model (2 ranks, uneven and empty
    shards, two groups) matches torch's clip_grad_norm_(model.parameters()) + AdamW on the
    same model: every step's total norm (the full tensors' norm, not a rank's), every loss
    and every final param (CLOSE), and opt.norms holds each param's full-tensor norms of its
    grad, its value after the step and its change."""
    run, max_norm = clip_run
    for rank, res in enumerate(run.get()):
        _check_clip_run(f"rank {rank}", res["ours"], res["ref"], tracked=True,
                        max_norm=max_norm)


@needs_dist
def test_zero_clip_with_grad_norm_process_group(tmp_path_factory):
    """ZeroRedundancyOptimizer(optimizer_class=FusedAdamW, max_grad_norm=...,
    grad_norm_process_group=WORLD): each rank's local optimizer clips by the norm over every
    rank's partition, which equals DDP + torch's clip over all params + AdamW (CLOSE)."""
    run = Launch("zero_clip", tmp_path_factory.mktemp("zero_clip"), steps=CLIP_STEPS,
                 max_norm=CLIP_MAX_NORM, norm_type="2.0")
    for rank, res in enumerate(run.get()):
        _check_clip_run(f"rank {rank}", res["zero"], res["ref"], tracked=False)
