"""fused_adamw: a drop-in torch.optim.AdamW whose step is one fused pass over flat buffers."""

from ._version import __version__

__all__ = ["__version__"]
