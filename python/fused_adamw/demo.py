"""Trains one small model twice, with a torch optimizer and with fused_adamw's, side by side.

    python -m fused_adamw.demo [--steps 30] [--device cuda] [--backend auto]
                               [--form adamw|adam-l2|adamw-paper] [--weight-decay WD]

The model (Linear-LayerNorm-GELU-Linear-LayerNorm-GELU-Linear) uses the usual decay/no-decay
groups, gradient clipping and a linear-warmup + cosine schedule. Both copies start from the
same weights and see the same batches; the loss columns should agree to the printed digits.

--form picks the weight decay (README, "Three forms of weight decay"):

- adamw (default): FusedAdamW against torch.optim.AdamW, p *= 1 - lr * wd (wd 0.1);
- adam-l2: FusedAdam against torch.optim.Adam, L2 added to the gradient (wd 1e-4);
- adamw-paper: FusedAdamW(decouple_lr=True), p *= 1 - wd * lr / max_lr, with max_lr = --lr
  and wd = 3e-4 (= lr * 0.1), against torch.optim.AdamW with wd / max_lr (0.1): the same
  decay under this schedule, since lr / max_lr is the schedule's multiplier.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch

from fused_adamw import BackendUnavailableError, FusedAdam, FusedAdamW, weight_decay_groups

FORMS = ("adamw", "adam-l2", "adamw-paper")


def build_optimizers(form: str, model_torch, model_fused, lr: float, weight_decay,
                     backend: str):
    """(torch optimizer, fused_adamw optimizer, their names) for one form of weight decay.
    ``weight_decay`` None: the form's usual value."""
    if form == "adamw":
        wd = 0.1 if weight_decay is None else weight_decay
        return (torch.optim.AdamW(weight_decay_groups(model_torch, wd), lr=lr),
                FusedAdamW(weight_decay_groups(model_fused, wd), lr=lr, backend=backend),
                ("AdamW", "FusedAdamW"))
    if form == "adam-l2":
        wd = 1e-4 if weight_decay is None else weight_decay
        return (torch.optim.Adam(weight_decay_groups(model_torch, wd), lr=lr),
                FusedAdam(weight_decay_groups(model_fused, wd), lr=lr, backend=backend),
                ("Adam", "FusedAdam"))
    # The paper's form: decay wd_paper * lr / max_lr, max_lr = lr (the group's lr when built,
    # before the scheduler scales it). torch's AdamW decays by lr * wd_torch: the same when
    # wd_torch = wd_paper / max_lr.
    wd = lr * 0.1 if weight_decay is None else weight_decay
    return (torch.optim.AdamW(weight_decay_groups(model_torch, wd / lr), lr=lr),
            FusedAdamW(weight_decay_groups(model_fused, wd), lr=lr, backend=backend,
                       decouple_lr=True),
            ("AdamW", "FusedAdamW"))


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
    parser.add_argument("--form", choices=FORMS, default="adamw",
                        help="the weight decay: torch's AdamW, Adam's L2, or the paper's "
                             "decoupled decay (decouple_lr=True); default adamw")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="weight decay of the form (default: 0.1, 1e-4, and lr * 0.1 for "
                             "adamw-paper: 3e-4 at the default lr)")
    args = parser.parse_args(argv)
    if args.form == "adamw-paper" and args.lr <= 0:
        parser.error("--form adamw-paper needs --lr > 0 (the decay is relative to it)")
    device = _device_or_exit(parser, args.device)

    torch.manual_seed(0)
    models = [build_model().to(device)]
    models.append(copy.deepcopy(models[0]))
    try:
        *opts, names = build_optimizers(args.form, models[0], models[1], args.lr,
                                        args.weight_decay, args.backend)
    except (BackendUnavailableError, ValueError) as e:
        parser.error(f"--backend {args.backend}: {e}")
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(5, args.steps)) for o in opts]
    data = torch.Generator().manual_seed(1)
    w_true = torch.randn(64, 10, generator=data)

    print(f"device {device}, fused_adamw backend {opts[1].backend}, form {args.form}")
    if args.form == "adamw-paper":
        wd = opts[1].param_groups[0]["weight_decay"]
        print(f"FusedAdamW(weight_decay={wd:.3g}, decouple_lr=True, max_lr={args.lr:.3g}) vs "
              f"torch AdamW(weight_decay={opts[0].param_groups[0]['weight_decay']:.3g})")
    print(f"{'step':>4} {'lr':>10} {'torch ' + names[0] + ' loss':>18} "
          f"{names[1] + ' loss':>18}")
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
