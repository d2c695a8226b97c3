"""Backends: each module defines ``BACKEND``, an object with this interface.

``name: str``
    What ``FusedAdamW.backend`` reports.
``unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None``
    None when this backend can step a bucket of that device and storage dtype here, else a
    sentence saying why not (shown to users who asked for this backend by name).
``step(bucket: fused_adamw._flat.FlatBucket) -> None``
    One AdamW step over the whole bucket: ``bucket.grad`` holds this step's grads,
    ``bucket.steps`` is already advanced for the active params, ``bucket.active`` says which
    params to touch, ``bucket.hparams`` holds this step's hyperparameters. No host sync, no
    Python loop over params.

Only ``fused_adamw._dispatch`` imports these modules (lazily, so optional dependencies stay
optional).
"""
