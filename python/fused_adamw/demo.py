"""Trains one small model twice, with torch.optim.AdamW and with FusedAdamW, side by side.

    python -m fused_adamw.demo [--steps 30] [--device cuda] [--backend auto]

The model (Linear-LayerNorm-GELU-Linear-LayerNorm-GELU-Linear) uses the usual decay/no-decay
groups, gradient clipping and a linear-warmup + cosine schedule. Both copies start from the
same weights and see the same batches; the loss columns should agree to the printed digits.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch

from fused_adamw import BackendUnavailableError, FusedAdamW, weight_decay_groups


def build_model(width: int = 256) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, width), torch.nn.LayerNorm(width), torch.nn.GELU(),
        torch.nn.Linear(width, width), torch.nn.LayerNorm(width), torch.nn.GELU(),
        torch.nn.Linear(width, 10),
    )


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _device_or_exit(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """The device named by --device, or a one-line argparse error (exit status 2) when it is
    not a device name or torch cannot use it here."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        parser.error(f"--device {name}: not a device name ({e})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = (f"torch {torch.__version__} was built without CUDA"
                     if torch.version.cuda is None else "torch sees no CUDA GPU")
            parser.error(f"--device {name}: CUDA is not available ({built}); "
                         "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {name}: there is no CUDA device {device.index} "
                         f"(torch sees {torch.cuda.device_count()})")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            parser.error(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        parser.error(f"--device {name}: the demo runs on cpu, cuda or mps")
    return device


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    device = _device_or_exit(parser, args.device)

    torch.manual_seed(0)
    models = [build_model().to(device)]
    models.append(copy.deepcopy(models[0]))
    try:
        opts = [
            torch.optim.AdamW(weight_decay_groups(models[0], 0.1), lr=args.lr),
            FusedAdamW(weight_decay_groups(models[1], 0.1), lr=args.lr, backend=args.backend),
        ]
    except (BackendUnavailableError, ValueError) as e:
        parser.error(f"--backend {args.backend}: {e}")
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(5, args.steps)) for o in opts]
    data = torch.Generator().manual_seed(1)
    w_true = torch.randn(64, 10, generator=data)

    print(f"device {device}, fused_adamw backend {opts[1].backend}")
    print(f"{'step':>4} {'lr':>10} {'torch AdamW loss':>18} {'FusedAdamW loss':>18}")
    for step in range(args.steps):
        x = torch.randn(128, 64, generator=data)
        y = (x @ w_true).argmax(dim=1)
        x, y = x.to(device), y.to(device)
        losses, lr = [], opts[0].param_groups[0]["lr"]
        for model, opt, sched in zip(models, opts, scheds):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        print(f"{step:>4} {lr:>10.3e} {losses[0]:>18.6f} {losses[1]:>18.6f}")
    diff = max((p - q).abs().max().item()
               for p, q in zip(models[0].parameters(), models[1].parameters()))
    print(f"largest parameter difference after {args.steps} steps: {diff:.3e}")
    return diff


if __name__ == "__main__":
    main()
