"""Newton-Schulz (5 jordan steps) at transformer layer shapes and an (n, 4n) size sweep.

Ours: ``dk.ops.newton_schulz`` per backend and torch.compile of the reference
math. Baselines: the reference Scion NS (bf16, per matrix), torch.optim.Muon's,
and peer packages. Error: against the fp64 reference on the same input.
"""
from __future__ import annotations

import functools

import torch

import disco_kernels as dk
from disco_kernels import reference

from . import baselines
from .case import Case, Plan, kernels, compiled, rel_err
from .shapes import OP_MODELS, for_preset, ns_flops, ns_sweep

STEPS = 5


_last_exact: list = []  # [(G, its fp64 NS)]: consecutive cases (impls) share one input


def _exact(G: torch.Tensor) -> torch.Tensor:
    """fp64 reference NS of G, computed once for all the implementations timed on it."""
    hit = _last_exact and _last_exact[0][0].dtype == G.dtype and _last_exact[0][0].shape == G.shape \
        and torch.equal(_last_exact[0][0], G)
    if not hit:
        _last_exact.clear()
        _last_exact.append((G, reference.newton_schulz(G.double(), STEPS)))
    return _last_exact[0][1]


def _case(plan, model, name, shape, dtype, impl, baseline, fn_of_g, compute_dtype=None) -> Case:
    def build():
        G = torch.randn(shape, generator=plan.generator(), device=plan.device.torch_device).to(dtype)

        def check():
            return rel_err(fn_of_g(G), _exact(G))
        return functools.partial(fn_of_g, G), check
    return Case("newton_schulz", model, name, "x".join(map(str, shape)), dtype, impl, baseline,
                flops=ns_flops(shape, STEPS), bytes=0, bound="compute", build=build, compute_dtype=compute_dtype)


def _impls(plan: Plan):
    """(impl, baseline?, G -> X, compute dtype or None for G's dtype) of everything we time."""
    out = []
    for b in plan.our_impls(kernels("newton_schulz")):
        fn = (lambda G: compiled(reference.newton_schulz)(G, STEPS)) if b == "compile" else \
            functools.partial(lambda G, b: dk.ops.newton_schulz(G, STEPS, backend=b), b=b)
        out.append((b, False, fn, None))
    peers = {"reference": (baselines.reference_ns, torch.bfloat16)}
    if (muon := baselines.muon_ns()) is not None:
        peers["torch-muon"] = (muon, torch.bfloat16)
    peers.update(baselines.peer_ns(plan.device.torch_device))
    out += [(name, True, fn, cdt) for name, (fn, cdt) in peers.items()]
    return [x for x in out if plan.wants(x[0])]


def cases(plan: Plan) -> list[Case]:
    shapes = [(m.label, name, shape) for m in for_preset(OP_MODELS, plan.preset, plan.device.torch_device)
              for name, shape in m.matrices()]
    shapes += [("sweep", f"n={n}", (n, 4 * n)) for n in ns_sweep(plan.preset, plan.device.torch_device)]
    impls = _impls(plan)
    return [_case(plan, model, name, shape, dtype, impl, is_base, fn, cdt)
            for model, name, shape in shapes for dtype in plan.dtypes
            for impl, is_base, fn, cdt in impls]
