"""A small CUDA workload for compute-sanitizer: a few FusedAdamW steps on odd sizes.

    compute-sanitizer --tool memcheck --error-exitcode 1 \
        python bench/sanitize_step.py [cuda,triton]

Steps the "cuda" backend and then "triton" (or the comma list given; each when it can run)
over params of odd sizes in fp32 and bf16, with and without amsgrad, with grads assigned as new
tensors and with the same grads zeroed in place (``zero_grad(set_to_none=False)``), and one
param without a grad (skipped). Exits 0 after a synchronize; 3 (with the reason) when there is
no CUDA device or no backend asked for can run.
"""

from __future__ import annotations

import sys

import torch

from fused_adamw import FusedAdamW, _dispatch

SIZES = [1, 7, 1023, 1025, 4097, 278011]


def run(backend: str, dtype: torch.dtype, amsgrad: bool) -> None:
    params = [torch.nn.Parameter(torch.randn(n, device="cuda", dtype=dtype)) for n in SIZES]
    params.append(torch.nn.Parameter(torch.randn(3, 5, device="cuda", dtype=dtype)))
    opt = FusedAdamW(params, lr=1e-3, weight_decay=1e-2, amsgrad=amsgrad, backend=backend)
    for p in params[:-1]:
        p.grad = torch.randn_like(p)
    opt.step()  # new grad tensors; the last param has none
    params[-1].grad = torch.randn_like(params[-1])
    opt.step()
    opt.zero_grad(set_to_none=False)  # the same grad tensors, zeroed in place
    for p in params:
        p.grad.normal_()
    opt.step()
    torch.cuda.synchronize()


def main(argv: list[str]) -> int:
    wanted = (argv[0] if argv else "cuda,triton").split(",")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to sanitize")
        return 3
    device = torch.device("cuda", torch.cuda.current_device())
    backends = [b for b in wanted
                if _dispatch.unavailable_reason(b, device, torch.float32) is None]
    for b in wanted:
        if b not in backends:
            reason = _dispatch.unavailable_reason(b, device, torch.float32)
            print(f"backend {b} cannot run: {reason}")
    if not backends:
        return 3
    for backend in backends:
        for dtype in (torch.float32, torch.bfloat16):
            for amsgrad in (False, True):
                run(backend, dtype, amsgrad)
                print(f"ok: backend={backend} dtype={dtype} amsgrad={amsgrad}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
