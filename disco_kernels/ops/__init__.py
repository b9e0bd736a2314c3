"""Ops: one module per op, each a public function over a torch.library custom op
with a fake (meta) implementation and backend dispatch (torch / Triton / CUDA)."""
from .fused_update import fused_update
from .newton_schulz import newton_schulz
from .power_iteration import power_iteration

__all__ = ["fused_update", "newton_schulz", "power_iteration"]
