"""Norms and their linear minimisation oracles (LMOs), as in the reference Scion.

Each class takes the reference's constructor arguments (plus keyword-only
extras) and offers ``lmo(g)``, ``init(w)`` and ``lmo_many(gs)``, which batches
same-shaped matrices into one kernel launch. Each norm is declared here once,
by its ``kind`` and a factor ``alpha(shape)``:

    kind None     (Spectral, SpectralConv)  lmo(g) = NS(g) * alpha(shape), NS per block of g
                                            (``_NewtonSchulzNorm.orthogonalise_param``)
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
from .ops.newton_schulz import check_method
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


def _set(w: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        w.copy_(value.to(w.dtype))
    return w


class _NewtonSchulzNorm(Norm):
    """Shared machinery of Spectral and SpectralConv: batched Newton-Schulz on a param's independent
    matrices. A param is ``batch_dims`` leading dims of matrices (rows: the next dim, columns: the rest),
    stored (d_out, d_in), or (d_in, d_out) when ``transpose``; each matrix may be cut along its output dim
    (rows, or columns when ``transpose``) into blocks, each orthogonalised on its own and scaled by its
    own factor ``block_alpha(rows, cols)``. Newton-Schulz itself does not care which dim is the output
    (polar(Wᵀ) = polar(W)ᵀ): ``transpose`` moves only the factors and the cut."""

    batch_dims = 0
    transpose = False

    def __init__(self, steps=5, coefficients="jordan", dtype="bfloat16", method="auto"):
        reference.ns_schedule(coefficients, count(steps, "steps"))  # validates
        self.steps = steps
        self.coefficients = coefficients
        self.dtype = as_dtype(dtype)
        check_method(method, self.dtype)
        self.method = method

    def check(self, shape, name="g"):
        super().check(shape, name)
        self._blocks(shape, name)

    def _sizes(self, shape, name: str = "g") -> list[int] | None:
        """The blocks' sizes along the output dim of one matrix (None: the matrix is one block); a ValueError
        naming ``name`` when they cannot cut a param of ``shape``."""
        return None

    def _blocks(self, shape, name: str = "g") -> list[tuple[int, int, int]]:
        """(start along the output dim, rows, cols) of each block of one matrix of a param of ``shape``, as stored."""
        bd = self.batch_dims
        rows, cols = shape[bd], math.prod(shape[bd + 1:])
        sizes = self._sizes(shape, name)
        if sizes is None:
            return [(0, rows, cols)]
        starts = itertools.accumulate(sizes, initial=0)
        return [(a, rows, s) if self.transpose else (a, s, cols) for a, s in zip(starts, sizes)]

    def matrices(self, shape) -> list[tuple[int, int]]:
        """(rows, cols) of every independent matrix (block) of a param of ``shape``: what Newton-Schulz runs on."""
        return [(r, c) for _, r, c in self._blocks(shape)] * math.prod(shape[:self.batch_dims])

    def block_alpha(self, rows: int, cols: int) -> float:
        """The LMO's factor of one block stored (rows, cols) (norms whose params may be cut into blocks)."""
        raise NotImplementedError

    def check_backend(self, backend, shape, p, g, name="g"):
        """As ``Norm.check_backend``, for ``newton_schulz`` on each shape of matrix that the param holds."""
        for rows, cols in dict.fromkeys(self.matrices(shape)):
            G = g.new_empty(()).expand(rows, cols)  # the matrix's shape, the gradient's dtype and device
            ns_backend(backend, G, self.dtype, self.steps, name)

    def orthogonalise(self, G: torch.Tensor, *, backend="auto") -> torch.Tensor:
        """Newton-Schulz of (b, m, n) G, per matrix, unscaled."""
        return newton_schulz(G, self.steps, self.coefficients, dtype=self.dtype, backend=backend, method=self.method)

    def orthogonalise_param(self, G: torch.Tensor, *, backend="auto") -> torch.Tensor:
        """The raw factor X (in ``dtype``) of a (b, *shape) batch of params, ``shape`` as this rank holds it:
        NS of each block times block_alpha(block) / block_alpha(first block), so that lmo = X * alpha(shape).
        Same-shaped blocks go through one call; equal blocks of rows (whole matrices, experts, heads) are
        views of G, the others are stacked and their results written back."""
        shape = G.shape[1:]
        bd, d = self.batch_dims, 2 if self.transpose else 1  # d: the cut dim of (matrices, rows, cols)
        M = G.reshape(len(G) * math.prod(shape[:bd]), shape[bd], math.prod(shape[bd + 1:]))  # a view of packed G
        blocks = self._blocks(shape)
        if len(blocks) == 1 or (d == 1 and len({r for _, r, _ in blocks}) == 1):
            X = self.orthogonalise(M.reshape(len(M) * len(blocks), *blocks[0][1:]), backend=backend)
            return X.view(G.shape)
        out = M.new_empty(M.shape, dtype=self.dtype)
        by_shape = defaultdict(list)
        for a, r, c in blocks:
            by_shape[r, c].append(a)
        for (r, c), starts in by_shape.items():
            size = (r, c)[d - 1]
            X = self.orthogonalise(torch.stack([M.narrow(d, a, size) for a in starts], 1).flatten(0, 1),
                                   backend=backend).unflatten(0, (M.size(0), len(starts)))
            ratio = self.block_alpha(r, c) / self.block_alpha(*blocks[0][1:])
            if ratio != 1:
                X.mul_(ratio)
            for j, a in enumerate(starts):
                out.narrow(d, a, size).copy_(X[:, j])
        return out.view(G.shape)

    def lmo(self, g, *, backend="auto"):
        self.check(g.shape)
        return self.orthogonalise_param(g.unsqueeze(0), backend=backend)[0] * self.alpha(g.shape)

    def lmo_many(self, gs, *, backend="auto"):
        """Same-shaped tensors go through one batched Newton-Schulz call."""
        return [x * self.alpha(g.shape) for g, x in zip(gs, self.orthogonalise_many(gs, backend=backend))]

    def orthogonalise_many(self, gs, *, backend="auto") -> list[torch.Tensor]:
        """``orthogonalise_param`` of every tensor in ``gs`` (same shapes batched): the LMOs over their alphas."""
        by_shape = defaultdict(list)
        for i, g in enumerate(gs):
            self.check(g.shape)
            by_shape[tuple(g.shape)].append(i)
        out = [None] * len(gs)
        for idx in by_shape.values():
            G = torch.stack([gs[i] for i in idx]) if len(idx) > 1 else gs[idx[0]].unsqueeze(0)
            for i, x in zip(idx, self.orthogonalise_param(G, backend=backend).unbind(0)):
                out[i] = x
        return out


class Spectral(_NewtonSchulzNorm):
    """Spectral norm LMO: NS(g) * sqrt(d_out / d_in) (normalized) or sqrt(d_out); max=True takes max(1, .).

    Extras: ``coefficients`` ("jordan", "polar_express" or (a, b, c) triples), ``dtype`` of the
    iteration (bfloat16 by default, as the reference) and ``method`` ("auto", "standard", "gram": the
    Newton-Schulz form, ``ops.newton_schulz``; auto takes Gram where it is measured faster).
    ``transpose=True``: each matrix is stored (d_in, d_out), as GPT-2's ``Conv1D`` (y = x W) stores it:
    d_out is its last dim, d_in the one before, for the factor, the init and the blocks.
    Blocks, each orthogonalised and scaled as its own matrix, NS(block) * sqrt(block's d_out / d_in):
    ``batch_dims=k``: the leading k dims index independent matrices (MoE experts (E, d_out, d_in): 1);
    ``splits=[a, b, ...]``: each matrix cut along its output dim into blocks of these sizes (a fused
    q, k, v projection: [d, d, d]; GPT-2's c_attn, stored (d, 3d), with ``transpose=True``);
    ``heads=n``: n equal blocks along the output dim (GQA per head, with unequal q and kv:
    splits=[head_dim] * (n_q + 2 n_kv)).
    """

    def __init__(self, max=False, normalized=True, steps=5, *, coefficients="jordan", dtype="bfloat16",
                 method="auto", transpose=False, batch_dims=0, splits=None, heads=None):
        super().__init__(steps, coefficients, dtype, method)
        self.max = flag(max, "max")
        self.normalized = flag(normalized, "normalized")
        self.transpose = flag(transpose, "transpose")
        self.batch_dims = count(batch_dims, "batch_dims")
        self.ndims = (2 + batch_dims,)
        if splits is not None and heads is not None:
            raise ValueError(f"give splits or heads, not both (got splits={splits!r}, heads={heads!r}); "
                             "heads of unequal sizes are splits=[head_dim] * (n_q + 2 n_kv)")
        if splits is not None:
            if not isinstance(splits, (list, tuple)) or not splits:
                raise ValueError(f"splits must be a non-empty list of positive ints, got {splits!r}")
            splits = tuple(count(s, f"splits[{i}]", 1) for i, s in enumerate(splits))
        self.splits = splits
        self.heads = None if heads is None else count(heads, "heads", 1)

    def _sizes(self, shape, name="g"):
        if self.splits is None and self.heads is None:
            return None
        dim = self.batch_dims + (1 if self.transpose else 0)
        n = shape[dim]
        where = (f"the output dim (dim {dim}{', transpose=True' if self.transpose else ''}) of {name} "
                 f"(shape {tuple(shape)})")
        if self.splits is not None:
            if sum(self.splits) != n:
                raise ValueError(f"Spectral(splits={list(self.splits)}) cuts {where}: the splits must sum to {n}, "
                                 f"they sum to {sum(self.splits)}")
            return list(self.splits)
        if n % self.heads:
            raise ValueError(f"Spectral(heads={self.heads}) cuts {where} into equal heads: {n} is not a multiple "
                             f"of {self.heads}")
        return [n // self.heads] * self.heads

    def block_alpha(self, rows, cols):
        d_out, d_in = (cols, rows) if self.transpose else (rows, cols)
        return reference.spectral_scale(d_out, d_in, self.normalized, self.max)

    def alpha(self, shape):
        """The factor of the first block (of the whole matrix when not cut; see ``orthogonalise_param``)."""
        return self.block_alpha(*self._blocks(shape)[0][1:])

    def init(self, w):
        """Orthogonal (the reference's draw, on each block as stored) per block, in order, times the block's
        factor."""
        self.check(w.shape, "w")
        w64 = torch.empty(w.shape, dtype=torch.float64, device=w.device)
        cut = 1 if self.transpose else 0
        for matrix in w64.view(-1, *w.shape[self.batch_dims:]):
            for a, r, c in self._blocks(w.shape):
                block = matrix.narrow(cut, a, (r, c)[cut])
                torch.nn.init.orthogonal_(block).mul_(self.block_alpha(r, c))
        return _set(w, w64)


class SpectralConv(_NewtonSchulzNorm):
    """Spectral LMO of a conv kernel (c_out, c_in, k[, k]) reshaped to (c_out, -1),
    times sqrt(c_out / c_in) / k (1-D conv) or / k² (2-D conv)."""

    ndims = (3, 4)

    def __init__(self, steps=5, *, coefficients="jordan", dtype="bfloat16", method="auto"):
        super().__init__(steps, coefficients, dtype, method)

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
    """Spectral for 2-D, SpectralConv for 3-D/4-D, BiasRMS for 0-D/1-D tensors (the reference's rule).

    Auto sees only a shape, so a 3-D tensor is a conv kernel here; MoE expert weights (E, d_out, d_in)
    need ``Spectral(batch_dims=1)``, which ``param_groups`` gives them (role "expert")."""

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
