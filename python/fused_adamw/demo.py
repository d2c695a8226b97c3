"""Trains one small model twice, with a torch optimizer and with fused_adamw's, side by side.

The model (Linear-LayerNorm-GELU-Linear-LayerNorm-GELU-Linear) uses the usual decay/no-decay
groups, gradient clipping and a linear-warmup + cosine schedule. Both copies start from the
same weights and see the same batches; the loss columns should agree to the printed digits.
Beside them: each optimizer's ``step()`` time in milliseconds, and at the end its median and
the backend that ran (torch's for-loop, foreach or fused path; fused_adamw's backend).

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
import statistics
import time

import torch

from fused_adamw import BackendUnavailableError, FusedAdam, FusedAdamW, weight_decay_groups
from fused_adamw._dispatch import BACKENDS

PROG = "python -m fused_adamw.demo"
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




def _fail(parser: argparse.ArgumentParser, message: str) -> None:
    """Exits with status 2 and one line, argparse's error format without the usage: for
    arguments that parse but cannot be used here (a device that is not there, a backend that
    cannot run), where the usage would bury the reason."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def _number(kind, minimum, strict: bool):
    """An argparse type: ``kind`` (int or float) that is > ``minimum`` (``strict``) or >= it;
    argparse names the flag in the error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or (value <= minimum if strict else value < minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid <name> value" for other errors
    return parse


def _device_or_exit(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """The device named by --device, or one error line (exit status 2) when it is not a
    device name or torch cannot use it here."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        _fail(parser, f"--device {name}: not a device name ({e})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = (f"torch {torch.__version__} was built without CUDA"
                     if torch.version.cuda is None else "torch sees no CUDA GPU")
            _fail(parser, f"--device {name}: CUDA is not available ({built}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            _fail(parser, f"--device {name}: there is no CUDA device {device.index} "
                          f"(torch sees {torch.cuda.device_count()})")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            _fail(parser, f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        _fail(parser, f"--device {name}: the demo runs on cpu, cuda or mps")
    return device


def torch_path(opt: torch.optim.Optimizer) -> str:
    """Which of torch's implementations ``opt`` steps with: "fused", "foreach" or "for-loop"
    (torch's own default rule when the optimizer was built with neither flag)."""
    group = opt.param_groups[0]
    if group.get("fused"):
        return "fused"
    if group.get("foreach") is not None:
        return "foreach" if group["foreach"] else "for-loop"
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
    except ImportError:  # a private helper; torch's rule, if it ever moves
        return "default"
    params = [p for g in opt.param_groups for p in g["params"]]
    _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return "foreach" if foreach else "for-loop"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """Every option's default after its help; the description's lines kept as written."""


def build_parser() -> argparse.ArgumentParser:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    paragraphs = __doc__.strip().split("\n\n")
    parser = argparse.ArgumentParser(prog=PROG, description="\n\n".join(paragraphs[:2]),
                                     epilog="\n\n".join(paragraphs[2:]),
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--steps", type=_number(int, 1, strict=False), default=30,
                        help="training steps (at least 1)")
    parser.add_argument("--device", default=default_device,
                        help="where both models train: cpu, cuda, cuda:N or mps; the default "
                             "is cuda when torch sees a GPU, else cpu")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="fused_adamw's backend; auto picks the fastest that can run")
    parser.add_argument("--lr", type=_number(float, 0.0, strict=True), default=3e-3,
                        help="peak learning rate of the warmup + cosine schedule (> 0)")
    parser.add_argument("--form", choices=FORMS, default="adamw",
                        help="the weight decay: torch's AdamW, Adam's L2, or the paper's "
                             "decoupled decay (decouple_lr=True)")
    parser.add_argument("--weight-decay", type=_number(float, 0.0, strict=False), default=None,
                        help="weight decay of the form (>= 0); None: 0.1 for adamw, 1e-4 for "
                             "adam-l2, lr * 0.1 for adamw-paper (3e-4 at the default lr)")
    return parser


def _timed_step(opt: torch.optim.Optimizer, device: torch.device) -> float:
    """opt.step()'s wall time in milliseconds, the device synchronised around it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    opt.step()
    sync()
    return (time.perf_counter() - start) * 1e3


def main(argv=None) -> float:
    """Runs the demo; returns the largest parameter difference between the two models."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = _device_or_exit(parser, args.device)

    torch.manual_seed(0)
    models = [build_model().to(device)]
    models.append(copy.deepcopy(models[0]))
    try:
        *opts, names = build_optimizers(args.form, models[0], models[1], args.lr,
                                        args.weight_decay, args.backend)
        backend = opts[1].backend
    except BackendUnavailableError as e:
        _fail(parser, f"--backend {args.backend}: {e}")
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(5, args.steps)) for o in opts]
    data = torch.Generator().manual_seed(1)
    w_true = torch.randn(64, 10, generator=data)
    labels = [f"torch {names[0]} ({torch_path(opts[0])})", f"{names[1]} ({backend})"]

    print(f"device {device}, fused_adamw backend {backend}, form {args.form}")
    if args.form == "adamw-paper":
        wd = opts[1].param_groups[0]["weight_decay"]
        print(f"FusedAdamW(weight_decay={wd:.3g}, decouple_lr=True, max_lr={args.lr:.3g}) vs "
              f"torch AdamW(weight_decay={opts[0].param_groups[0]['weight_decay']:.3g})")
    print(f"{'step':>4} {'lr':>10} {'torch ' + names[0] + ' loss':>18} "
          f"{names[1] + ' loss':>18} {'step ms':>9} {'step ms':>9}")
    times: list[list[float]] = [[], []]
    for step in range(args.steps):
        x = torch.randn(128, 64, generator=data)
        y = (x @ w_true).argmax(dim=1)
        x, y = x.to(device), y.to(device)
        losses, lr = [], opts[0].param_groups[0]["lr"]
        for model, opt, sched, ms in zip(models, opts, scheds, times):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            ms.append(_timed_step(opt, device))
            sched.step()
            losses.append(loss.item())
        print(f"{step:>4} {lr:>10.3e} {losses[0]:>18.6f} {losses[1]:>18.6f} "
              f"{times[0][-1]:>9.3f} {times[1][-1]:>9.3f}")
    diff = max((p - q).abs().max().item()
               for p, q in zip(models[0].parameters(), models[1].parameters()))
    print(f"largest parameter difference after {args.steps} steps: {diff:.3e}")
    for label, ms in zip(labels, times):
        print(f"median step() time, {label}: {statistics.median(ms):.3f} ms "
              f"over {len(ms)} steps")
    return diff


if __name__ == "__main__":
    main()
