"""A small CUDA workload for compute-sanitizer: a few FusedAdamW steps of each kernel family.

    compute-sanitizer --tool memcheck --error-exitcode 9 \\
        python bench/sanitize_step.py [--backends cuda,triton] [--families plain,amsgrad,...]

Families (``--families``, default all):

* ``plain``: fp32 and bf16 params of odd sizes;
* ``amsgrad``: the same with amsgrad=True;
* ``scaler``: GradScaler's sync-free path (``opt.grad_scale`` and ``opt.found_inf``, as
  ``scaler.step`` sets them): a taken step (the unscaled grad written back), then a skipped one;
* ``lowp``: the low-precision kernels: bf16 params under each master mode ("fp32",
  "remainder", "kahan", "stochastic") with fp32 moments, and fp32 params with bf16 moments.

Each backend of ``--backends`` (default cuda,triton; each when it can run; in that order)
steps each family three times over params of odd sizes: new grad tensors (the last param
without a grad at first: skipped), then the same grads zeroed in place
(``zero_grad(set_to_none=False)``).
One process runs every family (torch's start-up under the sanitizer is the slow part).
Exits 0 after a synchronize; 3 (with the reason) when there is no CUDA device or no backend
asked for can run.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fused_adamw import FusedAdamW, _dispatch

SIZES = [1, 7, 1023, 1025, 4097, 278011]
FAMILIES = ("plain", "amsgrad", "scaler", "lowp")
MODES = ("fp32", "remainder", "kahan", "stochastic")


def configs(family: str) -> list[dict]:
    """The optimizer settings that exercise one kernel family (with the param dtype)."""
    if family in ("plain", "amsgrad", "scaler"):
        return [dict(dtype=d, amsgrad=family == "amsgrad") for d in (torch.float32,
                                                                      torch.bfloat16)]
    out = [dict(dtype=torch.bfloat16, master_weights=m, state_dtype=torch.float32,
                amsgrad=True) for m in MODES]
    return out + [dict(dtype=torch.float32, state_dtype=torch.bfloat16, amsgrad=True)]


def run(device: torch.device, backend: str, family: str, dtype: torch.dtype,
        **options) -> None:
    params = [torch.nn.Parameter(torch.randn(n, device=device, dtype=dtype)) for n in SIZES]
    params.append(torch.nn.Parameter(torch.randn(3, 5, device=device, dtype=dtype)))
    opt = FusedAdamW(params, lr=1e-3, weight_decay=1e-2, backend=backend, **options)
    scaled = family == "scaler"
    for p in params[:-1]:
        p.grad = torch.randn_like(p)
    opt.step()  # new grad tensors; the last param has none
    params[-1].grad = torch.randn_like(params[-1])
    if scaled:  # a taken step: the kernels unscale the grads and write them back
        opt.grad_scale = torch.tensor(1024.0, device=device)
        opt.found_inf = torch.tensor(0.0, device=device)
    opt.step()
    opt.zero_grad(set_to_none=False)  # the same grad tensors, zeroed in place
    for p in params:
        p.grad.normal_()
    if scaled:  # a skipped step: nothing may be written
        opt.grad_scale = torch.tensor(1024.0, device=device)
        opt.found_inf = torch.tensor(1.0, device=device)
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("backends_positional", nargs="?", default=None,
                    help=argparse.SUPPRESS)  # the old form: sanitize_step.py cuda,triton
    ap.add_argument("--backends", default="cuda,triton", help="comma list (default cuda,triton)")
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help=f"comma list from {', '.join(FAMILIES)} (default: all)")
    ap.add_argument("--device", default="cuda",
                    help="cuda (default), or cpu for a smoke test of this script")
    args = ap.parse_args(argv)
    args.backends = (args.backends_positional or args.backends).split(",")
    args.families = [f for f in args.families.split(",") if f]
    bad = [f for f in args.families if f not in FAMILIES]
    if bad:
        ap.error(f"--families: unknown {', '.join(bad)}; expected from {', '.join(FAMILIES)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: nothing to sanitize")
            return 3
        device = torch.device("cuda", torch.cuda.current_device())
    backends = []
    for b in args.backends:
        reason = _dispatch.unavailable_reason(b, device, torch.float32)
        if reason is None:
            backends.append(b)
        else:
            print(f"backend {b} cannot run: {reason}")
    if not backends:
        return 3
    for backend in backends:  # the first backend's every family first (a run may be cut)
        for family in args.families:
            for options in configs(family):
                run(device, backend, family, **options)
                shown = ", ".join(f"{k}={v}" for k, v in options.items())
                print(f"ok: family={family} backend={backend} {shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
