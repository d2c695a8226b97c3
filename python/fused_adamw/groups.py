"""The usual two param groups: weight decay for weight matrices, none for the rest."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def weight_decay_groups(
    model: torch.nn.Module,
    weight_decay: float = 1e-2,
    *,
    no_decay: Iterable[str] = (),
) -> list[dict]:
    """Splits a model's trainable params into a decayed group and an undecayed one.

    Params with two or more dimensions (linear and conv weights, embeddings) are decayed;
    biases, norm weights and other 0-d and 1-d params are not, nor are params whose name
    contains one of ``no_decay``. Frozen params (``requires_grad=False``) are left out;
    shared (tied) params appear once.

    Args:
        model: the module whose ``named_parameters()`` are split.
        weight_decay: the decayed group's weight_decay. Default: 1e-2 (torch's AdamW default).
        no_decay: substrings of param names to exclude from decay in addition to the rule
            above, e.g. ``("pos_embed",)``. Default: none.

    Returns:
        ``[{"params": decay, "weight_decay": weight_decay}, {"params": rest,
        "weight_decay": 0.0}]``, ready for ``FusedAdamW(groups, lr=...)``.
    """
    no_decay = tuple(no_decay)
    decay, rest = [], []
    for name, p in model.named_parameters():  # yields each shared param once
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and not any(s in name for s in no_decay):
            decay.append(p)
        else:
            rest.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
