"""Power iteration (one warm-started iteration, as a norm monitor runs it) at layer shapes.

Bandwidth-bound: the floor reads W once per iteration (u = W v and Wᵀ u can
share one pass over row blocks). Ours per backend and torch.compile of the plain
torch iteration; baselines: that plain iteration (two passes over an fp32 copy
of W; ours accumulates in fp32 too: every row's ``compute`` is fp32 but for fp64 W) and, in full runs and on GPUs, the exact sigma_max from
torch.linalg.matrix_norm(ord=2), an SVD (up to SVD_MAX_NUMEL elements: seconds
per call above). Error: against tests/oracle.py's fp64 iteration from the same start vector, bounded by
the suite's rule (tests/tolerances.py) from the oracle's iteration in W's dtype.
"""
from __future__ import annotations

import functools
import math

import torch

import disco_kernels as dk
from disco_kernels import reference

from .case import Case, Check, Plan, compiled, kernels, oracle, plain_dtype
from .shapes import OP_MODELS, for_preset

ITERS = 1
SVD_MAX_NUMEL = 1 << 24


def plain(W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sigma from ``ITERS`` plain torch power iterations on W in fp32."""
    return reference.power_iteration(W.float(), v, ITERS)[0]


def _impls(plan: Plan):
    """(impl, baseline?, (W, v) -> sigma, warm-up calls)."""
    out = []
    for b in plan.our_impls(kernels("power_iteration")):
        if b == "compile":
            out.append((b, False, lambda W, v: compiled(plain)(W, v), 3))
        else:
            out.append((b, False, functools.partial(lambda W, v, b: dk.ops.power_iteration(W, v, ITERS, backend=b)[0],
                                                    b=b), 1))
    out.append(("reference", True, plain, 1))
    if plan.preset == "full" or plan.device.is_cuda:  # an SVD per case costs seconds on a small CPU
        out.append(("torch-svd", True, lambda W, v: torch.linalg.matrix_norm(W.float(), ord=2), 1))
    return [x for x in out if plan.wants(x[0])]


def _case(plan, model, name, shape, dtype, impl, baseline, fn, warmup) -> Case:
    def build():
        W = torch.randn(shape, generator=plan.generator(), device=plan.device.torch_device).to(dtype)
        v = reference.default_start_vector(W)

        def run():  # the oracle from the same start vector: in fp64, and plain in W's dtype
            d = plain_dtype(dtype)
            return ({"sigma": fn(W, v)}, {"sigma": oracle.power_iteration(W.double(), v.double(), ITERS)[0]},
                    {"sigma": oracle.power_iteration(W.to(d), v.to(d), ITERS)[0]})
        check = Check(run, dtype)
        return functools.partial(fn, W, v), None if impl == "torch-svd" else check  # exact sigma: no 1-step twin
    *batch, m, n = shape
    bytes_ = math.prod(batch) * (ITERS * m * n * dtype.itemsize + 8 * n)  # W per iteration; v in and out (fp32)
    return Case("power_iteration", model, name, "x".join(map(str, shape)), dtype, impl, baseline,
                flops=math.prod(batch) * ITERS * 4 * m * n, bytes=bytes_, bound="memory", build=build, warmup=warmup,
                compute_dtype=torch.promote_types(dtype, torch.float32) if not baseline else torch.float32)


def cases(plan: Plan) -> list[Case]:
    shapes = [(m.label, name, shape) for m in for_preset(OP_MODELS, plan.preset, plan.device.torch_device)
              for name, shape in m.matrices() if len(shape) == 2 or "per head" in name]
    impls = _impls(plan)
    return [_case(plan, model, name, shape, dtype, impl, is_base, fn, warmup)
            for model, name, shape in shapes for dtype in plan.dtypes for impl, is_base, fn, warmup in impls
            if impl != "torch-svd" or math.prod(shape) <= SVD_MAX_NUMEL]
