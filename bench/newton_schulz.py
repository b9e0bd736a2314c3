"""Newton-Schulz (5 jordan steps) at transformer layer shapes and an (n, 4n) size sweep.

Ours: ``dk.ops.newton_schulz`` per backend and torch.compile of the reference
math. Baselines: the reference Scion NS (bf16, per matrix), torch.optim.Muon's,
and peer packages. TFLOP/s and the share of peak count plain NS (DESIGN.md);
``share_of_floor`` is against the symmetric floor (``shapes.ns_floor_flops``).
Error: against tests/oracle.py's fp64 NS with the same coefficients on the same input; its bound (the
suite's rule, tests/tolerances.py) from the oracle's NS in the dtype the implementation iterates in.
"""
from __future__ import annotations

import functools

import torch

import disco_kernels as dk
from disco_kernels import reference

from . import baselines
from .case import Case, Check, Plan, compiled, kernels, oracle, plain_dtype
from .shapes import OP_MODELS, for_preset, ns_flops, ns_floor_flops, ns_sweep

STEPS = 5


_oracle_cache: dict = {}  # {"G": G, (coefficients, dtype): oracle NS of G}: consecutive cases (impls) share one input


def _oracle(G: torch.Tensor, coefficients, dtype: torch.dtype) -> torch.Tensor:
    """tests/oracle.py's NS of G iterated in ``dtype`` (fp64: the exact answer; else the plain torch
    computation in that dtype), one matrix at a time (memory), kept for the other implementations timed on G."""
    last = _oracle_cache.get("G")
    if last is None or last.dtype != G.dtype or last.shape != G.shape or not torch.equal(last, G):
        _oracle_cache.clear()
        _oracle_cache["G"] = G
    key = (str(coefficients), dtype)
    if key not in _oracle_cache:
        flat = G.reshape(-1, *G.shape[-2:])
        src = flat.double() if dtype == torch.float64 else flat
        _oracle_cache[key] = torch.stack([oracle.newton_schulz(g, STEPS, coefficients, dtype) for g in src]
                                         ).reshape(G.shape)
    return _oracle_cache[key]


def _case(plan, model, name, shape, dtype, impl, baseline, fn_of_g, compute_dtype=None, coefficients="jordan",
          warmup=1) -> Case:
    def build():
        G = torch.randn(shape, generator=plan.generator(), device=plan.device.torch_device).to(dtype)
        computed_in = compute_dtype or dtype

        def run():  # on a copy: some baselines normalise their input in place
            return ({"NS": fn_of_g(G.clone())}, {"NS": _oracle(G, coefficients, torch.float64)},
                    {"NS": _oracle(G, coefficients, plain_dtype(computed_in))})
        return functools.partial(fn_of_g, G), Check(run, computed_in)
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
