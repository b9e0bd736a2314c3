"""disco-kernels: fast, exact kernels for the Scion optimizer family.

    import disco_kernels as dk
    opt = dk.Scion(model.parameters(), lr=1e-3)       # drop-in for the reference Scion
    X = dk.ops.newton_schulz(G, steps=5)             # batched Newton-Schulz

Importing this package never touches a GPU and works without Triton or the
compiled CUDA extension.
"""
from . import lmo, ops, reference
from ._backend import available_backends
from .lmo import norm_dict
from .optim import Scion, ScionLight
from .capture import CapturedStep
from . import models, norms, scaling
from .param_groups import param_groups  # the function; the module stays importable

__version__ = "0.1.0"

__all__ = ["CapturedStep", "Scion", "ScionLight", "available_backends", "lmo", "models", "norm_dict", "norms", "ops", "param_groups",
           "reference", "scaling"]
