"""Newton-Schulz (5 jordan steps) at transformer layer shapes and an (n, 4n) size sweep.

Ours: ``dk.ops.newton_schulz`` per backend and torch.compile of the reference
math. Baselines: the reference Scion NS (bf16, per matrix), torch.optim.Muon's,
and peer packages. TFLOP/s and the share of peak count plain NS (DESIGN.md);
``share_of_floor`` is against the symmetric floor (``shapes.ns_floor_flops``).
Error: against fp64 NS with the same coefficients on the same input.
"""
from __future__ import annotations

import functools

import torch

import disco_kernels as dk
from disco_kernels import reference

from . import baselines
from .case import Case, Plan, kernels, compiled, rel_err
from .shapes import OP_MODELS, for_preset, ns_flops, ns_floor_flops, ns_sweep

STEPS = 5


_last_exact: list = []  # [(G, coefficients, its fp64 NS as fp32)]: consecutive cases (impls) share one input


def _exact(G: torch.Tensor, coefficients="jordan") -> torch.Tensor:
    """NS of G in fp64, one matrix at a time (memory), kept in fp32 for all the implementations timed on G."""
    last = _last_exact[0] if _last_exact else None
    if last is None or last[1] != coefficients or last[0].dtype != G.dtype or last[0].shape != G.shape \
            or not torch.equal(last[0], G):
        flat = G.reshape(-1, *G.shape[-2:])
        exact = torch.stack([reference.newton_schulz(g.double(), STEPS, coefficients).float() for g in flat])
        _last_exact[:] = [(G, coefficients, exact.reshape(G.shape))]
    return _last_exact[0][2]


def _case(plan, model, name, shape, dtype, impl, baseline, fn_of_g, compute_dtype=None, coefficients="jordan",
          warmup=1) -> Case:
    def build():
        G = torch.randn(shape, generator=plan.generator(), device=plan.device.torch_device).to(dtype)

        def check():  # on a copy: some baselines normalise their input in place
            return rel_err(fn_of_g(G.clone()), _exact(G, coefficients))
        return functools.partial(fn_of_g, G), check
    return Case("newton_schulz", model, name, "x".join(map(str, shape)), dtype, impl, baseline,
                flops=ns_flops(shape, STEPS), bytes=0, bound="compute", build=build, compute_dtype=compute_dtype,
                floor_flops=ns_floor_flops(shape, STEPS), warmup=warmup)


def _impls(plan: Plan):
    """(impl, baseline?, G -> X, compute dtype or None for G's dtype, coefficients, warm-up calls)."""
    out = []
    for b in plan.our_impls(kernels("newton_schulz")):
        if b == "compile":
            out.append((b, False, lambda G: compiled(reference.newton_schulz)(G, STEPS), None, "jordan", 3))
        else:
            out.append((b, False, functools.partial(lambda G, b: dk.ops.newton_schulz(G, STEPS, backend=b), b=b),
                        None, "jordan", 1))
    for name, o in baselines.ns_baselines(plan.device.torch_device).items():
        if not o.compiles or plan.compile:  # a self-compiling peer costs seconds per shape: where compile is timed
            out.append((name, True, o.fn, o.compute_dtype, o.coefficients, 3 if o.compiles else 1))
    return [x for x in out if plan.wants(x[0])]


def cases(plan: Plan) -> list[Case]:
    shapes = [(m.label, name, shape) for m in for_preset(OP_MODELS, plan.preset, plan.device.torch_device)
              for name, shape in m.matrices()]
    shapes += [("sweep", f"n={n}", (n, 4 * n)) for n in ns_sweep(plan.preset, plan.device.torch_device)]
    impls = _impls(plan)
    return [_case(plan, model, name, shape, dtype, impl, is_base, fn, cdt, coeffs, warmup)
            for model, name, shape in shapes for dtype in plan.dtypes
            for impl, is_base, fn, cdt, coeffs, warmup in impls]
