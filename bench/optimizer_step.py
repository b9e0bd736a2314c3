"""The whole optimizer step for whole models (parameter lists built from shapes).

Ours: ``dk.Scion`` per backend ("auto" on a GPU, and each backend that runs
every op) and torch.compile(Scion.step) (on the proxy only: tracing a step over
the ~150 tensors of the other models takes minutes); baseline: the reference
Scion as a per-parameter loop (bf16 Newton-Schulz), its NS eager ("reference") and torch.compile'd
("reference-compiled", where the plan compiles or names it). Each row's ``compute``: params' dtype, NS
iteration dtype and, for ours, the method "auto" picks. Floor: the Newton-Schulz flops at the peak of the
dtype ours computes them in (bf16; fp32 where ours runs the Gram form everywhere: its fp32 polynomial) plus every update's bytes at the memory peak (with the
symmetric flops for ``share_of_floor``). Error: of the update term u of a second step
(p = p (1 - lr) - lr u; in p_new - p the decay lr p would hide u) against tests/oracle.py's Scion in fp64,
over all params and per param group (reported: over all), on the same model cut to two layers (same
shapes, less memory), bounded by the suite's rule (tests/tolerances.py) from the oracle run in the
params' dtype (bf16 Newton-Schulz, as ours and the reference); not for "compile", which compiles the
checked torch step (a second compile would double its cost).

Each row also has ``floor_bytes``, the least bytes a step moves (shapes.step_bytes: grads read, params and
momentum buffers read and written, Newton-Schulz's iterates read and written once per step), with
``floor_bytes_share`` on a GPU (those bytes over the time, against the memory peak), and
``peak_extra_bytes``, the most memory the step holds beyond params, grads and optimizer state (one step
after the timing, bench/memory.py; report.add_speedups gives each row the reference's beside it as
``reference_peak_extra_bytes``). On a GPU with ``dk.CapturedStep``: GPT-2 124M in bf16, the step
replayed from a CUDA graph ("captured") against the same step run eagerly ("eager", its baseline).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import replace

import torch

import disco_kernels as dk

from .baselines import ReferenceScion
from .case import Case, Check, Plan, kernels, oracle, plain_dtype, update_term
from .device import dtype_name
from .shapes import (GPT2_124M, PROXY, STEP_MODELS, for_preset, make_groups, ns_flops, ns_floor_flops, step_bytes,
                     update_bytes)

ops_ns = importlib.import_module("disco_kernels.ops.newton_schulz")

LR, MOMENTUM = 2 ** -10, 0.1
# The reference update rule, its Newton-Schulz eager and torch.compile'd (seconds of compile per shape: timed
# where the plan compiles, or when named in --impls).
BASELINES = ("reference", "reference-compiled")


def make_step(impl: str, groups: list[dict], ns_dtype: torch.dtype = torch.bfloat16):
    """The step function of ``impl`` over ``groups``."""
    if impl in BASELINES:
        return ReferenceScion(groups, LR, MOMENTUM, ns_dtype=ns_dtype, compile_ns=impl == "reference-compiled").step
    opt = dk.Scion(groups, lr=LR, momentum=MOMENTUM, backend="torch" if impl == "compile" else impl)
    return torch.compile(opt.step) if impl == "compile" else opt.step


def _grads(groups, generator) -> list[list[torch.Tensor]]:
    """Fresh random grads for every param of ``groups`` (their dtype and device)."""
    return [[torch.randn(p.shape, generator=generator, device=p.device).to(p.dtype) for p in g["params"]]
            for g in groups]


def _oracle_updates(groups, p0, grads, dtype, ns_dtype) -> list[torch.Tensor]:
    """Per group, the flat update term of the second step of tests/oracle.py's Scion from ``p0`` with
    ``grads`` [step 1, step 2], all rounded to ``dtype``, Spectral's Newton-Schulz iterating in ``ns_dtype``."""
    out = []
    for gi, (g, ps) in enumerate(zip(groups, p0)):
        kwargs = {**g["norm_kwargs"], "dtype": ns_dtype} if g["norm"] == "Spectral" else g["norm_kwargs"]
        spec = [{"lr": LR, "momentum": MOMENTUM, "scale": g["scale"], "norm": g["norm"],
                 "norm_kwargs": kwargs}] * len(ps)
        ps = [p.to(dtype) for p in ps]
        steps = [[q.to(dtype) for q in step[gi]] for step in grads]
        p1 = oracle.scion_run(ps, steps[:1], spec)
        p2 = oracle.scion_run(ps, steps, spec)
        out.append(torch.cat([update_term(a, b, LR).flatten() for a, b in zip(p1, p2)]))
    return out


_oracle_cache: list = []  # [(key, inputs, exact, plain)]: the impls of one model and dtype share their inputs


def step_check(impl: str, model, dtype, plan: Plan, ns_dtype: torch.dtype = torch.bfloat16) -> Check:
    """The update term u of a second step (p2 = p1 (1 - lr) - lr u, after a first step with other grads:
    the momentum buffer mixes both) of ``impl`` on ``model`` cut to 2 layers (same shapes, less memory),
    per param group and over all, against tests/oracle.py's Scion in fp64; its plain computation in
    ``dtype`` bounds it (tests/tolerances.py). 16-bit params start from 0: lr times p would drown in the
    rounding of p (the decay is checked in fp32). Spectral iterates in ``ns_dtype``: bf16, as dk.Scion and
    the reference do by default (the plain computation too; the exact one in fp64)."""
    model = replace(model, layers=min(2, model.layers))
    names = [f"{name} {norm}" for name, norm, _, _ in model.groups()]

    def run():
        gen = plan.generator()
        groups = make_groups(model, dtype, plan.device.torch_device, gen, ns_dtype)
        if dtype.itemsize < 4:
            for g in groups:
                for p in g["params"]:
                    p.zero_()
        grads = [[[p.grad for p in g["params"]] for g in groups], _grads(groups, gen)]
        p0 = [[p.detach().clone() for p in g["params"]] for g in groups]
        step = make_step(impl, groups, ns_dtype)
        step()
        p1 = [[p.detach().clone() for p in g["params"]] for g in groups]
        for g, gs in zip(groups, grads[1]):
            for p, q in zip(g["params"], gs):
                p.grad = q
        step()
        ours = [torch.cat([update_term(a, b, LR).flatten() for a, b in zip(ps, g["params"])])
                for ps, g in zip(p1, groups)]
        del p1, step
        inputs = [t for ps in p0 for t in ps] + [t for step in grads for gs in step for t in gs]
        cached = _oracle_cache[0] if _oracle_cache else None
        if cached is None or cached[0] != (model, dtype, ns_dtype) or not all(map(torch.equal, cached[1], inputs)):
            _oracle_cache[:] = [((model, dtype, ns_dtype), inputs,
                                 _oracle_updates(groups, p0, grads, torch.float64, torch.float64),
                                 _oracle_updates(groups, p0, grads, plain_dtype(dtype), plain_dtype(ns_dtype)))]
        *_, exact, plain = _oracle_cache[0]
        return tuple(dict(zip(names, us)) for us in (ours, exact, plain))
    return Check(run, dtype)


def work(model, dtype) -> tuple[float, float, float, float]:
    """(plain and floor Newton-Schulz flops, update bytes, floor bytes) of one step: the update bytes are
    every param's update read + written once (shapes.update_bytes), the floor bytes add Newton-Schulz's
    own traffic (shapes.step_bytes)."""
    flops = floor = numel = 0
    for _, norm, _, shapes in model.groups():
        for _, shape in shapes:
            numel += math.prod(shape)
            if norm == "Spectral":
                flops += ns_flops(shape)
                floor += ns_floor_flops(shape)
    return (flops, floor, update_bytes(numel, dtype.itemsize, MOMENTUM),
            step_bytes(model.groups(), dtype.itemsize, MOMENTUM))


def _case(plan, model, dtype, impl) -> Case:
    def build():
        step = make_step(impl, make_groups(model, dtype, plan.device.torch_device, plan.generator()))
        return step, None if impl == "compile" else step_check(impl, model, dtype, plan)
    flops, floor, bytes_, floor_bytes = work(model, dtype)
    compute = step_compute(impl, model, dtype, plan)
    return Case("step", model.label, f"Scion step, {model.n_params() / 1e6:.1f}M params", "-", dtype, impl,
                impl in BASELINES, flops=flops, bytes=bytes_, bound="both", build=build,
                compute_dtype=torch.bfloat16, floor_flops=floor, warmup=3 if impl in ("compile", "reference-compiled") else 1,
                floor_bytes=floor_bytes, memory=True, extra={"compute": compute},
                peak_dtype=torch.float32 if compute.endswith("+ fp32 Gram") else None)


def step_compute(impl: str, model, dtype, plan: Plan) -> str:
    """What a step row computes in: the params' dtype, and its Spectral Newton-Schulz's iteration dtype (bf16,
    dk.Scion's default and the reference's) with the method ours picks ("auto") for the model's hidden shapes."""
    label = f"{dtype_name(dtype)} params, bf16 NS"
    if impl in BASELINES or impl in ("eager", "captured"):
        return label + (" (compiled)" if impl == "reference-compiled" else "")
    backend = "torch" if impl == "compile" else impl
    methods = set()
    for _, shape in model.hidden():
        G = torch.empty((), dtype=dtype, device=plan.device.torch_device).expand(shape)
        try:
            methods.add(ops_ns.choose_method("auto", ops_ns.choose_backend(backend, G, torch.bfloat16, 5), G,
                                             torch.bfloat16))
        except (ValueError, RuntimeError):
            methods.add("standard")
    return label + (" + fp32 Gram" if methods == {"gram"} else " (Gram where faster)" if "gram" in methods else "")


def captured_cases(plan: Plan) -> list[Case]:
    """GPT-2 124M in bf16: ``dk.CapturedStep(opt).step()`` (a CUDA graph replay of the step) against the
    eager ``opt.step()`` (the baseline, impl "eager"; both Scions on "auto" with ``nonfinite="ignore"``, which
    a capture needs). Only where a GPU and ``dk.CapturedStep`` are both there; no error check (the graph
    replays the eager step's kernels, which the other rows check)."""
    if not (plan.device.is_cuda and torch.cuda.is_available() and hasattr(dk, "CapturedStep")):
        return []
    out = []
    for model in for_preset([GPT2_124M], plan.preset, plan.device.torch_device):
        flops, floor, bytes_, floor_bytes = work(model, torch.bfloat16)
        for impl in ("eager", "captured"):
            if plan.wants(impl):
                out.append(Case("step", model.label, f"Scion step, captured vs eager, {model.n_params() / 1e6:.1f}M "
                                "params", "-", torch.bfloat16, impl, impl == "eager", flops=flops, bytes=bytes_,
                                bound="both", build=_captured_build(plan, model, impl), compute_dtype=torch.bfloat16,
                                floor_flops=floor, warmup=4 if impl == "captured" else 1, floor_bytes=floor_bytes))
    return out


def _captured_build(plan: Plan, model, impl: str):
    """build() of a captured-vs-eager case: (the step, no check); warm-up steps and the capture happen in the
    case's warm-up calls (CapturedStep's default: 2 eager steps, then the capture)."""
    def build():
        groups = make_groups(model, torch.bfloat16, plan.device.torch_device, plan.generator())
        opt = dk.Scion(groups, lr=LR, momentum=MOMENTUM, nonfinite="ignore")
        return (dk.CapturedStep(opt).step if impl == "captured" else opt.step), None
    return build


def cases(plan: Plan) -> list[Case]:
    shared = tuple(set(kernels("newton_schulz")) & set(kernels("fused_update")))  # a forced backend must run every op
    impls = [i for i in plan.our_impls(shared) if i != "cuda"]  # small-matrix CUDA kernels: "auto" runs them
    impls = (["auto"] if plan.device.is_cuda and plan.wants("auto") else []) + impls
    impls += ["reference"] if plan.wants("reference") else []
    if (plan.compile and plan.impls is None) or "reference-compiled" in (plan.impls or ()):
        impls.append("reference-compiled")
    out = [_case(plan, m, dtype, impl) for m in for_preset(STEP_MODELS, plan.preset, plan.device.torch_device)
           for dtype in plan.dtypes for impl in impls if impl != "compile" or m.name == PROXY.name]
    out += captured_cases(plan)
    return sorted(out, key=lambda c: c.impl == "compile")  # its compile time last: a time limit keeps every model
