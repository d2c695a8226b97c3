"""fused_adamw: a drop-in torch.optim.AdamW whose step is one fused pass over flat buffers.

    from fused_adamw import FusedAdamW, weight_decay_groups
    opt = FusedAdamW(weight_decay_groups(model, 0.1), lr=3e-4)
"""

from . import _install_check
from ._dispatch import BackendUnavailableError
from ._version import __version__
from .groups import weight_decay_groups
from .optimizer import FusedAdamW

_install_check.warn_once()  # a GPU torch sees but this build cannot use: say so, once

__all__ = ["BackendUnavailableError", "FusedAdamW", "__version__", "weight_decay_groups"]
