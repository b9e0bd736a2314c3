"""Newton-Schulz (5 jordan steps) at transformer layer shapes, an (n, 4n) size sweep and an aspect sweep.

Ours: ``dk.ops.newton_schulz`` per backend (method "auto") and torch.compile of the reference
math, iterating in the input's dtype; on the aspect sweep ((m, r m) for r = 1, 2, 4, 8: ``shapes.ns_aspects``)
also each method forced, as "<backend>/standard" and "<backend>/gram". Baselines, like with like: each
only at the iteration dtype ours runs in: the reference Scion NS (per matrix, iterated in that dtype),
torch.optim.Muon's (bf16 only), and peer packages (gram-newton-schulz among them, when installed, each at
its own dtype); ``unmatched_baselines`` names those a plan's dtypes leave out.
Each row's ``compute`` says what it computes in: the iteration dtype, and for the Gram form the dtype
of its polynomial. TFLOP/s and the share of peak count plain NS (DESIGN.md), whatever the method;
``share_of_floor`` is against the symmetric floor (``shapes.ns_floor_flops``).
Error: against tests/oracle.py's fp64 NS with the same coefficients on the same input; its bound (the
suite's rule, tests/tolerances.py) from the oracle's NS in the dtype the implementation iterates in.
"""
from __future__ import annotations

import functools
import importlib

import torch

import disco_kernels as dk
from disco_kernels import reference

from . import baselines
from .case import Case, Check, Plan, compiled, kernels, oracle, plain_dtype
from .device import dtype_name
from .shapes import OP_MODELS, for_preset, ns_aspects, ns_flops, ns_floor_flops, ns_sweep

ops_ns = importlib.import_module("disco_kernels.ops.newton_schulz")  # (dk.ops.newton_schulz is the function)

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


def compute_label(impl: str, shape, dtype: torch.dtype, device: torch.device, compute_dtype=None) -> str:
    """What a row computes in: the iteration dtype, "+ <dtype> Gram" where ours runs the Gram form (its
    polynomial's dtype), as "auto" chooses it for ``impl`` ("<backend>" or "<backend>/<method>")."""
    compute = compute_dtype or dtype
    backend, _, method = impl.partition("/")
    if backend in ops_ns.KERNELS and method != "standard":
        G = torch.empty((), dtype=dtype, device=device).expand(shape)
        try:
            runs = method or ops_ns.choose_method("auto", ops_ns.choose_backend(backend, G, compute, STEPS), G, compute)
        except (ValueError, RuntimeError):  # a backend that cannot take G: the row says so
            runs = "standard"
        if runs == "gram":
            return f"{dtype_name(compute)} + {dtype_name(ops_ns.gram_dtype(compute))} Gram"
    return dtype_name(compute)


def _case(plan, model, name, shape, dtype, impl, baseline, fn_of_g, compute_dtype=None, coefficients="jordan",
          warmup=1) -> Case:
    def build():
        G = torch.randn(shape, generator=plan.generator(), device=plan.device.torch_device).to(dtype)
        computed_in = compute_dtype or dtype

        def run():  # on a copy: some baselines normalise their input in place
            return ({"NS": fn_of_g(G.clone())}, {"NS": _oracle(G, coefficients, torch.float64)},
                    {"NS": _oracle(G, coefficients, plain_dtype(computed_in))})
        return functools.partial(fn_of_g, G), Check(run, computed_in)
    compute = compute_label(impl, shape, dtype, plan.device.torch_device, compute_dtype)
    return Case("newton_schulz", model, name, "x".join(map(str, shape)), dtype, impl, baseline,
                flops=ns_flops(shape, STEPS), bytes=0, bound="compute", build=build, compute_dtype=compute_dtype,
                floor_flops=ns_floor_flops(shape, STEPS), warmup=warmup, extra={"compute": compute},
                peak_dtype=ops_ns.gram_dtype(compute_dtype or dtype) if "Gram" in compute else None)


def _baselines(plan: Plan, dtype: torch.dtype) -> dict[str, baselines.Orthogonaliser]:
    """The NS baselines that iterate in ``dtype``, the dtype ours iterates in on a ``dtype`` input: the
    reference in it, the others only where it is their own."""
    out = {}
    for name, o in baselines.ns_baselines(plan.device.torch_device).items():
        if name == "reference":
            o = o._replace(fn=functools.partial(baselines.reference_ns, steps=STEPS, dtype=dtype), compute_dtype=dtype)
        if o.compute_dtype == dtype:
            out[name] = o
    return out


def unmatched_baselines(plan: Plan) -> list[str]:
    """'<name> (<its dtype>)' of each NS baseline not timed: none of the plan's dtypes is its iteration dtype."""
    timed = {n for d in plan.dtypes for n in _baselines(plan, d)}
    return [f"{n} ({dtype_name(o.compute_dtype)})" for n, o in baselines.ns_baselines(plan.device.torch_device).items()
            if n not in timed and plan.wants(n)]


def _impls(plan: Plan, dtype: torch.dtype, methods: bool = False):
    """(impl, baseline?, G -> X, compute dtype or None for G's dtype, coefficients, warm-up calls) for a ``dtype``
    input; ``methods``: also each backend with each method forced ("<backend>/<method>", where the backend has
    that method)."""
    out = []
    for b in plan.our_impls(kernels("newton_schulz")):
        if b == "compile":
            out.append((b, False, lambda G: compiled(reference.newton_schulz)(G, STEPS), None, "jordan", 3))
            continue
        out.append((b, False, functools.partial(lambda G, b: dk.ops.newton_schulz(G, STEPS, backend=b), b=b),
                    None, "jordan", 1))
        for method in ("standard", "gram") if methods else ():
            if method == "standard" or b in ops_ns.GRAM_KERNELS:
                out.append((f"{b}/{method}", False, functools.partial(
                    lambda G, b, method: dk.ops.newton_schulz(G, STEPS, backend=b, method=method), b=b,
                    method=method), None, "jordan", 1))
    for name, o in _baselines(plan, dtype).items():
        if not o.compiles or plan.compile:  # a self-compiling peer costs seconds per shape: where compile is timed
            out.append((name, True, o.fn, o.compute_dtype, o.coefficients, 3 if o.compiles else 1))
    return [x for x in out if plan.wants(x[0]) or plan.wants(x[0].partition("/")[0])]


def cases(plan: Plan) -> list[Case]:
    shapes = [(m.label, name, shape) for m in for_preset(OP_MODELS, plan.preset, plan.device.torch_device)
              for name, shape in m.matrices()]
    shapes += [("sweep", f"n={n}", (n, 4 * n)) for n in ns_sweep(plan.preset, plan.device.torch_device)]
    aspects = [("aspect", f"m={m} 1:{r}", (m, r * m)) for m, r in ns_aspects(plan.preset, plan.device.torch_device)]
    # --quick on a CPU times only ours on the aspect sweep: the baselines' bf16 (emulated on most CPUs) would
    # add ~10 s to a suite that has 100 s in all; they are timed at the layer shapes, and at every aspect in full
    quick_cpu = plan.preset == "quick" and plan.device.torch_device.type == "cpu"
    out = []
    for group, methods in ((shapes, False), (aspects, True)):
        for model, name, shape in group:
            for dtype in plan.dtypes:
                impls = [x for x in _impls(plan, dtype, methods) if not (methods and x[1] and quick_cpu)]
                out += [_case(plan, model, name, shape, dtype, impl, is_base, fn, cdt, coeffs, warmup)
                        for impl, is_base, fn, cdt, coeffs, warmup in impls]
    return out
