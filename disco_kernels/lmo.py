"""Norms and their linear minimisation oracles (LMOs), as in the reference Scion.

Each class takes the reference's constructor arguments (plus keyword-only
extras) and offers ``lmo(g)``, ``init(w)`` and ``lmo_many(gs)``, which batches
same-shaped matrices into one kernel launch. ``fused`` names the LMO that
``ops.fused_update`` implements for this norm (None when the LMO needs
Newton-Schulz). The math of each LMO is in ``reference.py``.
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict

import torch

from . import reference
from ._validate import as_dtype, count, flag
from .ops import newton_schulz
from .ops.fused_update import choose_backend as fused_backend
from .ops.newton_schulz import choose_backend as ns_backend

class Norm:
    """Base class: the tensor ranks a norm accepts and the LMO API."""

    ndims: tuple[int, ...] = (2,)
    fused: str | None = None

    def check(self, shape, name: str = "g") -> None:
        """Raise ValueError when this norm cannot take a tensor of ``shape``."""
        if len(shape) not in self.ndims:
            ranks = " or ".join(f"{d}-D" for d in self.ndims)
            raise ValueError(f"{type(self).__name__} needs a {ranks} tensor, but {name} has shape {tuple(shape)} "
                             "(norm='Auto' picks the norm by rank; disco_kernels.param_groups(model) groups a model)")

    def resolve(self, shape) -> "Norm":
        """The concrete norm that handles a tensor of ``shape`` (itself, except for Auto)."""
        return self

    def lmo(self, g: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        raise NotImplementedError

    def lmo_many(self, gs: list[torch.Tensor], *, backend: str = "auto") -> list[torch.Tensor]:
        """LMO of every tensor in ``gs`` (same order)."""
        return [self.lmo(g, backend=backend) for g in gs]

    def init(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def flags(self) -> dict:
        """Keyword flags of ``ops.fused_update`` for this norm."""
        return {}

    def check_backend(self, backend: str, shape, p: torch.Tensor, g: torch.Tensor, name: str = "g") -> None:
        """Raise the error that a forced ``backend`` would raise on a param of full ``shape``, local
        tensor ``p`` and gradient ``g``, so that a step can fail before it modifies anything."""
        flags = {"normalized": True, "transpose": False, **self.flags()}
        fused_backend(backend, [p], [g], None, self.fused, flags["transpose"], flags["normalized"], False, name)


def _orthogonal_like(w: torch.Tensor) -> torch.Tensor:
    """A float64 orthogonal matrix of w's shape (same RNG use as the reference)."""
    w64 = w.detach().double()
    torch.nn.init.orthogonal_(w64)
    return w64


def _set(w: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        w.copy_(value.to(w.dtype))
    return w


class _NewtonSchulzNorm(Norm):
    """Shared machinery of Spectral and SpectralConv: batched Newton-Schulz."""

    def __init__(self, steps=5, coefficients="jordan", dtype="bfloat16"):
        reference.ns_schedule(coefficients, count(steps, "steps"))  # validates
        self.steps = steps
        self.coefficients = coefficients
        self.dtype = as_dtype(dtype)

    def scale_for(self, shape) -> float:
        raise NotImplementedError

    def check_backend(self, backend, shape, p, g, name="g"):
        """As ``Norm.check_backend``, for ``newton_schulz`` on the whole matrix."""
        G = g.new_empty(()).expand(shape[0], math.prod(shape[1:]))  # the matrix's shape, dtype and device
        ns_backend(backend, G, self.dtype, self.steps, name)

    def _ns(self, g, backend):
        return newton_schulz(g, self.steps, self.coefficients, dtype=self.dtype, backend=backend)

    def lmo(self, g, *, backend="auto"):
        self.check(g.shape)
        return self._ns(g.reshape(g.size(0), -1), backend).view(g.shape) * self.scale_for(g.shape)

    def lmo_many(self, gs, *, backend="auto"):
        """Same-shaped tensors go through one batched Newton-Schulz call."""
        by_shape = defaultdict(list)
        for i, g in enumerate(gs):
            self.check(g.shape)
            by_shape[tuple(g.shape)].append(i)
        out = [None] * len(gs)
        for shape, idx in by_shape.items():
            if len(idx) == 1:
                out[idx[0]] = self.lmo(gs[idx[0]], backend=backend)
                continue
            batch = torch.stack([gs[i].reshape(shape[0], -1) for i in idx])
            X = self._ns(batch, backend) * self.scale_for(shape)
            for i, x in zip(idx, X.unbind(0)):
                out[i] = x.view(shape)
        return out


class Spectral(_NewtonSchulzNorm):
    """Spectral norm LMO: NS(g) * sqrt(d_out / d_in) (normalized) or sqrt(d_out); max=True takes max(1, .).

    Extras: ``coefficients`` ("jordan", "polar_express" or (a, b, c) triples) and
    ``dtype`` of the iteration (bfloat16 by default, as the reference).
    """

    def __init__(self, max=False, normalized=True, steps=5, *, coefficients="jordan", dtype="bfloat16"):
        super().__init__(steps, coefficients, dtype)
        self.max = flag(max, "max")
        self.normalized = flag(normalized, "normalized")

    def scale_for(self, shape):
        return reference.spectral_scale(shape[0], shape[1], self.normalized, self.max)

    def init(self, w):
        self.check(w.shape, "w")
        return _set(w, _orthogonal_like(w) * self.scale_for(w.shape))


class SpectralConv(_NewtonSchulzNorm):
    """Spectral LMO of a conv kernel (c_out, c_in, k[, k]) reshaped to (c_out, -1),
    times sqrt(c_out / c_in) / k (1-D conv) or / k² (2-D conv)."""

    ndims = (3, 4)

    def __init__(self, steps=5, *, coefficients="jordan", dtype="bfloat16"):
        super().__init__(steps, coefficients, dtype)

    def scale_for(self, shape):
        return reference.spectral_conv_scale(shape)

    def init(self, w):
        self.check(w.shape, "w")
        w64 = w.detach().double()
        for pos in itertools.product(*map(range, w.shape[2:])):  # every tap, also of a (k1, k2) kernel
            torch.nn.init.orthogonal_(w64[(slice(None), slice(None), *pos)])
        return _set(w, w64 * self.scale_for(w.shape))


class _AxisNorm(Norm):
    """Shared by ColNorm and RowNorm: an LMO that normalises along one axis, ``transpose`` swapping it."""

    reference_lmo = None  # reference.lmo_colnorm or reference.lmo_rownorm

    def __init__(self, normalized, transpose):
        self.normalized = flag(normalized, "normalized")
        self.transpose = flag(transpose, "transpose")

    def flags(self):
        return {"normalized": self.normalized, "transpose": self.transpose}

    def lmo(self, g, *, backend="auto"):
        self.check(g.shape)
        return self.reference_lmo(g, self.normalized, self.transpose)

    def init(self, w):
        """Gaussian, then each column (ColNorm) or row (RowNorm) of the (transposed) weight scaled to
        the norm that ``init_scale(d_out, d_in)`` gives."""
        self.check(w.shape, "w")
        v = w.detach().clone()
        v = v.mT if self.transpose else v
        torch.nn.init.normal_(v)
        v = v / torch.linalg.vector_norm(v, dim=self.axis, keepdim=True) * self.init_scale(*v.shape)
        return _set(w, v.mT if self.transpose else v)


class ColNorm(_AxisNorm):
    """Column-wise LMO: each column over (||col||_2 / sqrt(d_out)) (times d_in if normalized) + 1e-8.
    ``transpose=True`` for embeddings stored (vocab, dim): each vocab row then has RMS 1."""

    fused = "ColNorm"
    axis = 0
    reference_lmo = staticmethod(reference.lmo_colnorm)

    def __init__(self, normalized=False, transpose=False):
        super().__init__(normalized, transpose)

    def init_scale(self, d_out, d_in):
        return math.sqrt(d_out) / (d_in if self.normalized else 1)


class RowNorm(_AxisNorm):
    """Row-wise LMO: each row over ||row||_2 (times sqrt(d_in) if normalized) + 1e-8."""

    fused = "RowNorm"
    axis = 1
    reference_lmo = staticmethod(reference.lmo_rownorm)

    def __init__(self, normalized=True, transpose=False):
        super().__init__(normalized, transpose)

    def init_scale(self, d_out, d_in):
        return 1 / math.sqrt(d_in) if self.normalized else 1.0


class Sign(Norm):
    """Sign LMO: sign(g), divided by d_in if normalized."""

    fused = "Sign"

    def __init__(self, zero_init=False, normalized=True):
        self.zero_init = flag(zero_init, "zero_init")
        self.normalized = flag(normalized, "normalized")

    def flags(self):
        return {"normalized": self.normalized}

    def lmo(self, g, *, backend="auto"):
        self.check(g.shape)
        return reference.lmo_sign(g, self.normalized)

    def init(self, w):
        self.check(w.shape, "w")
        if self.zero_init:
            return _set(w, torch.zeros_like(w))
        v = torch.randint(0, 2, w.shape, dtype=w.dtype, device=w.device) * 2 - 1
        return _set(w, v / w.size(1) if self.normalized else v)


class BiasRMS(Norm):
    """RMS LMO for biases and gains: g / (rms(g) + 1e-8)."""

    ndims = (0, 1)
    fused = "BiasRMS"

    def lmo(self, g, *, backend="auto"):
        self.check(g.shape)
        return reference.lmo_bias_rms(g)

    def init(self, w):
        self.check(w.shape, "w")
        return _set(w, torch.zeros_like(w))


class Auto(Norm):
    """Spectral for 2-D, SpectralConv for 3-D/4-D, BiasRMS for 0-D/1-D tensors."""

    ndims = (0, 1, 2, 3, 4)

    def __init__(self, **ns_kwargs):
        self.ns_kwargs = ns_kwargs
        conv, bias = SpectralConv(**ns_kwargs), BiasRMS()
        self._by_rank = {0: bias, 1: bias, 2: Spectral(**ns_kwargs), 3: conv, 4: conv}

    def resolve(self, shape):
        self.check(shape)
        return self._by_rank[len(shape)]

    def lmo(self, g, *, backend="auto"):
        return self.resolve(g.shape).lmo(g, backend=backend)

    def lmo_many(self, gs, *, backend="auto"):
        by_norm = defaultdict(list)
        for i, g in enumerate(gs):
            by_norm[id(self.resolve(g.shape))].append(i)
        out = [None] * len(gs)
        for idx in by_norm.values():
            norm = self.resolve(gs[idx[0]].shape)
            for i, u in zip(idx, norm.lmo_many([gs[i] for i in idx], backend=backend)):
                out[i] = u
        return out

    def init(self, w):
        return self.resolve(w.shape).init(w)


norm_dict = {
    "ColNorm": ColNorm,
    "RowNorm": RowNorm,
    "BiasRMS": BiasRMS,
    "SpectralConv": SpectralConv,
    "Spectral": Spectral,
    "Sign": Sign,
    "Auto": Auto,
}


def make_norm(name, kwargs=None) -> Norm:
    """Build ``norm_dict[name](**kwargs)`` with errors that name the bad argument."""
    if name not in norm_dict:
        raise ValueError(f"norm must be one of {sorted(norm_dict)}, got {name!r}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"norm_kwargs must be a dict or None, got {type(kwargs).__name__}")
    try:
        return norm_dict[name](**(kwargs or {}))
    except TypeError as e:
        raise ValueError(f"norm_kwargs {kwargs!r} do not fit norm {name!r}: {e}") from None
