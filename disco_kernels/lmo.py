"""Norms and their linear minimisation oracles (LMOs), as in the reference Scion.

Each class takes the reference's constructor arguments (plus keyword-only
extras) and offers ``lmo(g)``, ``init(w)`` and ``lmo_many(gs)``, which batches
same-shaped matrices into one kernel launch. Each norm is declared here once,
by its ``kind`` and a factor ``alpha(shape)``:

    kind None     (Spectral, SpectralConv)  lmo(g) = NS(g) * alpha(shape)
    kind "sign"   (Sign)                    lmo(g) = sign(g) * alpha(shape)
    kind "line"   (ColNorm, RowNorm, BiasRMS) lmo(g) = g / (||line||_2 * alpha(shape) + LINE_EPS),
                                            lines along ``line_dim(shape)``

The fused kernels, the optimizer's plan and the distributed routes derive from these facts.
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
    kind: str | None = None  # the fused update's kind ("line", "sign"); None: the LMO needs Newton-Schulz

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

    def alpha(self, shape) -> float:
        """The LMO's factor for a tensor of ``shape`` (see the module docstring)."""
        raise NotImplementedError

    def line_dim(self, shape) -> int:
        """The dim the lines of a "line" norm run along (-1 for the others: unused)."""
        return -1

    def check_backend(self, backend: str, shape, p: torch.Tensor, g: torch.Tensor, name: str = "g") -> None:
        """Raise the error that a forced ``backend`` would raise on a param of full ``shape``, local
        tensor ``p`` and gradient ``g``, so that a step can fail before it modifies anything."""
        fused_backend(backend, [p], [g], None, self.kind, [self.line_dim(shape)], False, name)


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

    def check_backend(self, backend, shape, p, g, name="g"):
        """As ``Norm.check_backend``, for ``newton_schulz`` on the whole matrix."""
        G = g.new_empty(()).expand(shape[0], math.prod(shape[1:]))  # the matrix's shape, dtype and device
        ns_backend(backend, G, self.dtype, self.steps, name)

    def orthogonalise(self, G: torch.Tensor, *, backend="auto") -> torch.Tensor:
        """Newton-Schulz of (b, m, n) G, per matrix, unscaled (the LMO is this times ``alpha``)."""
        return newton_schulz(G, self.steps, self.coefficients, dtype=self.dtype, backend=backend)

    def lmo(self, g, *, backend="auto"):
        self.check(g.shape)
        return self.orthogonalise(g.reshape(g.size(0), -1), backend=backend).view(g.shape) * self.alpha(g.shape)

    def lmo_many(self, gs, *, backend="auto"):
        """Same-shaped tensors go through one batched Newton-Schulz call."""
        return [x * self.alpha(g.shape) for g, x in zip(gs, self.orthogonalise_many(gs, backend=backend))]

    def orthogonalise_many(self, gs, *, backend="auto") -> list[torch.Tensor]:
        """``orthogonalise`` of every tensor in ``gs`` (reshaped to (len, -1); same shapes batched)."""
        by_shape = defaultdict(list)
        for i, g in enumerate(gs):
            self.check(g.shape)
            by_shape[tuple(g.shape)].append(i)
        out = [None] * len(gs)
        for shape, idx in by_shape.items():
            G = torch.stack([gs[i].reshape(shape[0], -1) for i in idx]) if len(idx) > 1 \
                else gs[idx[0]].reshape(1, shape[0], -1)
            for i, x in zip(idx, self.orthogonalise(G, backend=backend).unbind(0)):
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

    def alpha(self, shape):
        return reference.spectral_scale(shape[0], shape[1], self.normalized, self.max)

    def init(self, w):
        self.check(w.shape, "w")
        return _set(w, _orthogonal_like(w) * self.alpha(w.shape))


class SpectralConv(_NewtonSchulzNorm):
    """Spectral LMO of a conv kernel (c_out, c_in, k[, k]) reshaped to (c_out, -1),
    times sqrt(c_out / c_in) / k (1-D conv) or / k² (2-D conv)."""

    ndims = (3, 4)

    def __init__(self, steps=5, *, coefficients="jordan", dtype="bfloat16"):
        super().__init__(steps, coefficients, dtype)

    def alpha(self, shape):
        return reference.spectral_conv_scale(shape)

    def init(self, w):
        self.check(w.shape, "w")
        w64 = w.detach().double()
        for pos in itertools.product(*map(range, w.shape[2:])):  # every tap, also of a (k1, k2) kernel
            torch.nn.init.orthogonal_(w64[(slice(None), slice(None), *pos)])
        return _set(w, w64 * self.alpha(w.shape))


class LineNorm(Norm):
    """A line-wise LMO, declared by two facts: the dim its lines run along and a factor alpha(shape):

        lmo(g) = g / (||line||_2 * alpha(shape) + LINE_EPS)

    The torch path, the fused kernels (which receive dim and alpha per tensor) and the distributed
    routes all derive from these two. A new line-wise norm is one subclass."""

    kind = "line"

    def line_dim(self, shape) -> int:
        """-1: the lines are rows (a vector is one line); -2: they are columns."""
        raise NotImplementedError

    def lmo(self, g, *, backend="auto"):
        self.check(g.shape)
        return reference.line_lmo(g, self.line_dim(g.shape), self.alpha(g.shape))

    def init(self, w):
        """Gaussian, then each line scaled to norm 1 / alpha(shape) (the reference's init)."""
        self.check(w.shape, "w")
        v = self._draw(w.detach().clone())
        dim = self.line_dim(w.shape) if w.dim() else ()
        return _set(w, v / torch.linalg.vector_norm(v, dim=dim, keepdim=True) / self.alpha(w.shape))

    def _draw(self, v):
        torch.nn.init.normal_(v)
        return v


class _FlippableLineNorm(LineNorm):
    """ColNorm and RowNorm: lines along ``own_dim``, swapped by ``transpose``."""

    own_dim = -1

    def __init__(self, normalized, transpose):
        self.normalized = flag(normalized, "normalized")
        self.transpose = flag(transpose, "transpose")

    def line_dim(self, shape):
        return -3 - self.own_dim if self.transpose else self.own_dim

    def _draw(self, v):
        torch.nn.init.normal_(v.mT if self.transpose else v)  # (the reference draws in the transposed layout)
        return v

    def _lengths(self, shape):
        """(L, O): the length of a line and the number of lines."""
        dim = self.line_dim(shape)
        return shape[dim], shape[-3 - dim]


class ColNorm(_FlippableLineNorm):
    """Column-wise LMO: each column over (||col||_2 / sqrt(d_out)) (times d_in if normalized) + LINE_EPS.
    ``transpose=True`` for embeddings stored (vocab, dim): each vocab row then has RMS 1."""

    own_dim = -2

    def __init__(self, normalized=False, transpose=False):
        super().__init__(normalized, transpose)

    def alpha(self, shape):
        length, lines = self._lengths(shape)
        return (lines if self.normalized else 1) / math.sqrt(length)


class RowNorm(_FlippableLineNorm):
    """Row-wise LMO: each row over ||row||_2 (times sqrt(d_in) if normalized) + LINE_EPS."""

    own_dim = -1

    def __init__(self, normalized=True, transpose=False):
        super().__init__(normalized, transpose)

    def alpha(self, shape):
        return math.sqrt(self._lengths(shape)[0]) if self.normalized else 1.0


class BiasRMS(LineNorm):
    """RMS LMO for biases and gains: g / (rms(g) + LINE_EPS); init zero."""

    ndims = (0, 1)

    def line_dim(self, shape):
        return -1

    def alpha(self, shape):
        return 1 / math.sqrt(shape[0]) if shape else 1.0

    def init(self, w):
        self.check(w.shape, "w")
        return _set(w, torch.zeros_like(w))


class Sign(Norm):
    """Sign LMO: sign(g) * alpha(shape), alpha = 1 / d_in if normalized, else 1."""

    kind = "sign"

    def __init__(self, zero_init=False, normalized=True):
        self.zero_init = flag(zero_init, "zero_init")
        self.normalized = flag(normalized, "normalized")

    def alpha(self, shape) -> float:
        return 1 / shape[-1] if self.normalized else 1.0

    def lmo(self, g, *, backend="auto"):
        self.check(g.shape)
        return reference.sign_lmo(g, self.alpha(g.shape))

    def init(self, w):
        self.check(w.shape, "w")
        if self.zero_init:
            return _set(w, torch.zeros_like(w))
        v = torch.randint(0, 2, w.shape, dtype=w.dtype, device=w.device) * 2 - 1
        return _set(w, v * self.alpha(w.shape))


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
