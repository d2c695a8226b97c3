"""Backends: each module defines ``BACKEND``, an object with this interface.

``name: str``
    What ``FusedAdamW.backend`` reports.
``unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None``
    None when this backend can step a table of that device and storage dtype here, else a
    sentence saying why not (shown to users who asked for this backend by name).
``step(table: fused_adamw._table.Table) -> None``
    One AdamW step over every row of the table (``fused_adamw._table``: params and grads
    where they live, the optimizer's state, ``table.hparams`` this step's hyperparameters):
    every row's step count advances by one, then its elements are updated. No host sync, no
    Python loop over params.

Only ``fused_adamw._dispatch`` imports these modules (lazily, so optional dependencies stay
optional).
"""
