"""fused_adamw: drop-in torch.optim.AdamW and torch.optim.Adam whose step is one fused pass per
(device, dtype).

    from fused_adamw import FusedAdamW, weight_decay_groups
    opt = FusedAdamW(weight_decay_groups(model, 0.1), lr=3e-4)

``FusedAdam`` is torch.optim.Adam's drop-in (L2 weight decay, or decoupled with
``decoupled_weight_decay=True``); both take ``decouple_lr=True`` for the paper's decoupled decay.
"""

from . import _install_check
from ._dispatch import BackendUnavailableError
from ._version import __version__
from .groups import weight_decay_groups
from .optimizer import FusedAdam, FusedAdamW

_install_check.warn_once()  # a GPU torch sees but this build cannot use: say so, once

__all__ = ["BackendUnavailableError", "FusedAdam", "FusedAdamW", "__version__",
           "weight_decay_groups"]
