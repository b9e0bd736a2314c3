"""The one tolerance rule of the suite.

A fast path in dtype d may be at most ``RATIO`` times as far from the exact (fp64) answer as the
plain torch computation of the same math in d (the oracle run on the same inputs rounded to d),
plus ``ULPS`` units of roundoff of d for the output's own rounding and reordered sums:

    rel_err(fast, exact) <= RATIO * rel_err(plain_d, exact) + ULPS * unit(d)

In fp64 the exact answer is the oracle's fp64 result, itself off by a plain computation's error:
there ``plain`` is the fp32 computation, its error scaled by u(fp64) / u(fp32) (rounding errors
grow linearly in u) estimates the fp64 one, and it is counted once more for the oracle's own.

Errors are normwise (Frobenius) relative errors in fp64. No test states a tolerance of its own.
An error made of a handful of roundings is one sample of luck, not a measure of exactness: tests
take tiny matrices in batches (a rank-1 matrix in 16-bit is one scalar trajectory whatever its
entries, so it is checked in fp32 and fp64 only).
"""
import torch

RATIO = 1.25  # a fast path may be this much less exact than plain torch in the same dtype
ULPS = 4  # one rounding of the output, and sums taken in another order


def unit(dtype: torch.dtype) -> float:
    """Unit roundoff u = eps / 2: 2^-8 for bf16, 2^-11 for fp16, 2^-24 for fp32, 2^-53 for fp64."""
    return torch.finfo(dtype).eps / 2


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in fp64 (absolute when ref is 0; NaN anywhere gives NaN, which fails any bound)."""
    x, ref = torch.as_tensor(x).double(), torch.as_tensor(ref).double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def plain_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the plain computation that a fast path in ``dtype`` is held to (fp32 for fp64)."""
    return torch.float32 if dtype == torch.float64 else dtype


def bound(plain: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    """The error a fast path in ``dtype`` may have against ``exact``, given the plain computation's
    result (in ``dtype``; in fp32 when ``dtype`` is fp64)."""
    if dtype == torch.float64:
        plain_err = rel_err(plain, exact) * unit(torch.float64) / unit(torch.float32)
        return (RATIO + 1) * plain_err + ULPS * unit(dtype)
    return RATIO * rel_err(plain, exact) + ULPS * unit(dtype)


def assert_close(fast: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype | None = None,
                 what: str = "result") -> None:
    """Assert the rule for ``fast`` (computed in ``dtype``, default its own) against ``exact`` and ``plain``
    (the oracle in ``dtype``, or in fp32 for an fp64 ``fast``)."""
    dtype = dtype or fast.dtype
    err, limit = rel_err(fast, exact), bound(plain, exact, dtype)
    assert err <= limit, (f"{what}: error {err:.3g} vs fp64 exceeds the bound {limit:.3g} (plain torch's error "
                          f"{rel_err(plain, exact):.3g}, {dtype})")


def assert_oracle(fast, fn, *args, dtype: torch.dtype | None = None, what: str = "result", **kwargs) -> None:
    """The rule for ``fast`` (computed in ``dtype``, default its own) against the oracle function ``fn``: run on
    ``args`` with their floating-point tensors (also inside lists and tuples) cast to fp64 for the exact answer
    and to ``plain_dtype(dtype)`` for the plain one. A list or tuple result is checked item by item."""
    def cast(a, d):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.to(d)
        if isinstance(a, (list, tuple)):
            return type(a)(cast(x, d) for x in a)
        return a
    dtype = dtype or (fast[0] if isinstance(fast, (list, tuple)) else fast).dtype
    exact = fn(*cast(args, torch.float64), **kwargs)
    plain = fn(*cast(args, plain_dtype(dtype)), **kwargs)
    if isinstance(exact, (list, tuple)):
        assert len(fast) == len(exact), f"{what}: {len(fast)} results, the oracle gives {len(exact)}"
        for i, (f, e, p) in enumerate(zip(fast, exact, plain)):
            assert_close(f, e, p, dtype, f"{what}[{i}]")
    else:
        assert_close(fast, exact, plain, dtype, what)
