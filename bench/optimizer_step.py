"""The whole optimizer step for whole models (parameter lists built from shapes).

Ours: ``dk.Scion`` per backend ("auto" on a GPU, and each backend that runs
every op) and torch.compile(Scion.step) (on the proxy only: tracing a step over
the ~150 tensors of the other models takes minutes); baseline: the reference
Scion as a per-parameter loop (bf16 Newton-Schulz). Floor: the Newton-Schulz
flops at the bf16 peak plus every update's bytes at the memory peak (with the
symmetric flops for ``share_of_floor``). Error: of the update against the reference loop in fp64, on the same
model cut to two layers (same shapes, less memory); not for "compile", which
compiles the checked torch step (a second compile would double its cost).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

import disco_kernels as dk

from .baselines import ReferenceScion
from .case import Case, Plan, kernels, rel_err
from .shapes import PROXY, STEP_MODELS, for_preset, ns_flops, ns_floor_flops, update_bytes

LR, MOMENTUM = 2 ** -10, 0.1


def make_groups(model, dtype, device, generator) -> list[dict]:
    """Param groups of ``model`` with random params and grads (the keys dk.Scion and ReferenceScion take)."""
    groups = []
    for _, norm, kwargs, shapes in model.groups():
        params = []
        for _, shape in shapes:
            p = torch.randn(shape, generator=generator, device=device).to(dtype)
            p.grad = torch.randn(shape, generator=generator, device=device).to(dtype)
            params.append(p)
        groups.append({"params": params, "norm": norm, "norm_kwargs": dict(kwargs), "scale": 1.0})
    return groups


def make_step(impl: str, groups: list[dict], ns_dtype: torch.dtype = torch.bfloat16):
    """The step function of ``impl`` over ``groups``."""
    if impl == "reference":
        return ReferenceScion(groups, LR, MOMENTUM, ns_dtype=ns_dtype).step
    opt = dk.Scion(groups, lr=LR, momentum=MOMENTUM, backend="torch" if impl == "compile" else impl)
    return torch.compile(opt.step) if impl == "compile" else opt.step


def step_error(impl: str, model, dtype, plan: Plan) -> float:
    """Relative error of one step's update against the fp64 reference loop, on ``model`` cut to 2 layers
    (16-bit params from 0: an update of lr times p would drown in the rounding of p)."""
    groups = make_groups(replace(model, layers=min(2, model.layers)), dtype, plan.device.torch_device,
                         plan.generator())
    if dtype.itemsize < 4:
        for g in groups:
            for p in g["params"]:
                p.zero_()
    exact = [{**g, "params": [p.double() for p in g["params"]]} for g in groups]
    for g64, g in zip(exact, groups):
        for p64, p in zip(g64["params"], g["params"]):
            p64.grad = p.grad.double()
    before = [p.double() for g in exact for p in g["params"]]
    make_step(impl, groups)()
    make_step("reference", exact, ns_dtype=torch.float64)()
    mine = torch.cat([(p.double() - b).flatten() for b, p in zip(before, (p for g in groups for p in g["params"]))])
    want = torch.cat([(p - b).flatten() for b, p in zip(before, (p for g in exact for p in g["params"]))])
    return rel_err(mine, want)


def work(model, dtype) -> tuple[float, float, float]:
    """(plain and floor Newton-Schulz flops, update bytes) of one step."""
    flops = floor = numel = 0
    for _, norm, _, shapes in model.groups():
        for _, shape in shapes:
            numel += math.prod(shape)
            if norm == "Spectral":
                flops += ns_flops(shape)
                floor += ns_floor_flops(shape)
    return flops, floor, update_bytes(numel, dtype.itemsize, MOMENTUM)


def _case(plan, model, dtype, impl) -> Case:
    def build():
        step = make_step(impl, make_groups(model, dtype, plan.device.torch_device, plan.generator()))
        return step, None if impl == "compile" else lambda: step_error(impl, model, dtype, plan)
    flops, floor, bytes_ = work(model, dtype)
    return Case("step", model.label, f"Scion step, {model.n_params() / 1e6:.1f}M params", "-", dtype, impl,
                impl == "reference", flops=flops, bytes=bytes_, bound="both", build=build,
                compute_dtype=torch.bfloat16, floor_flops=floor, warmup=3 if impl == "compile" else 1)


def cases(plan: Plan) -> list[Case]:
    shared = tuple(set(kernels("newton_schulz")) & set(kernels("fused_update")))  # a forced backend must run every op
    impls = [i for i in plan.our_impls(shared) if i != "cuda"]  # small-matrix CUDA kernels: "auto" runs them
    impls = (["auto"] if plan.device.is_cuda and plan.wants("auto") else []) + impls
    impls += ["reference"] if plan.wants("reference") else []
    out = [_case(plan, m, dtype, impl) for m in for_preset(STEP_MODELS, plan.preset, plan.device.torch_device)
           for dtype in plan.dtypes for impl in impls if impl != "compile" or m.name == PROXY.name]
    return sorted(out, key=lambda c: c.impl == "compile")  # its compile time last: a time limit keeps every model
