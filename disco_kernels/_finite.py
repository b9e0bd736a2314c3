"""Which gradients are all finite, in one pass over each and one host sync for the caller."""
from __future__ import annotations

import math

import torch


def finite_mask(grads: list[torch.Tensor]) -> torch.Tensor:
    """1-D bool on the grads' (one) device, True where a (non-empty) gradient has no inf or nan.

    On GPU, max |g| of all grads in one multi-tensor launch (torch._foreach_norm, ord=inf);
    on CPU, where that norm is a slow per-tensor loop, min and max of each grad in one pass
    (torch.aminmax: nan propagates, ±inf shows). Neither overflows on finite values."""
    if grads[0].device.type == "cpu":
        extremes = torch.stack([v for g in grads for v in torch.aminmax(g.reshape(-1))])  # promotes, never narrows
        return extremes.isfinite().view(-1, 2).all(1)
    return torch.stack(torch._foreach_norm(grads, ord=math.inf)).isfinite()  # (stack promotes: one launch)
