"""Fused Scion updates (Sign, RowNorm, ColNorm, BiasRMS) on the tensors a model gives each, and the
Newton-Schulz apply pass (``apply_update``: p (1 - lr) - lr scale alpha X, bf16 X) on its hidden matrices.

Bandwidth-bound: the floor reads p, g, buf and writes p, buf once (the apply pass: reads p and X,
writes p). Ours:
``dk.ops.fused_update`` per backend and torch.compile of the reference loop;
baseline: the reference per-parameter loop. Error: of the update term u of
p_new = p (1 - lr) - lr u (the decay would hide it in p_new - p) against
tests/oracle.py's step in fp64, bounded by the suite's rule (tests/tolerances.py)
from the oracle's step in the params' dtype (16-bit params start from 0 there:
an update of lr = 1e-2 of p would drown in the rounding of p).
"""
from __future__ import annotations

import torch

import disco_kernels as dk

from disco_kernels.ops.fused_update import apply_update

from .baselines import reference_lmo, reference_update_all_
from .case import Case, Check, Plan, compiled, kernels, oracle, plain_dtype, update_term
from .shapes import OP_MODELS, for_preset, update_bytes

LR, MOMENTUM, SCALE = 0.01, 0.1, 1.0


def targets(model):
    """(case, lmo, flags, shapes): which of the model's tensors each fused LMO updates."""
    groups = {g: shapes for g, _, _, shapes in model.groups()}
    out = [("ColNorm embeddings", "ColNorm", {"transpose": True, "normalized": False}, groups["input"]),
           ("RowNorm head", "RowNorm", {"normalized": True}, groups["output"]),
           ("Sign head", "Sign", {"normalized": True}, groups["output"])]
    if "vectors" in groups:
        out.append((f"BiasRMS {len(groups['vectors'])} vectors", "BiasRMS", {}, groups["vectors"]))
    return [(name, lmo, flags, [s for _, s in shapes]) for name, lmo, flags, shapes in out]


def _tensors(plan, shapes, dtype):
    gen, dev = plan.generator(), plan.device.torch_device
    make = lambda: [torch.randn(s, generator=gen, device=dev).to(dtype) for s in shapes]  # noqa: E731
    return make(), make(), make()


def _reference(lmo, flags):
    fn = reference_lmo(lmo, flags)
    return lambda ps, gs, bs: reference_update_all_(ps, gs, bs, fn, LR, MOMENTUM, SCALE, False)


def _impls(plan: Plan, lmo: str, flags: dict):
    """(impl, baseline?, (params, grads, bufs) -> None, updating in place)."""
    out = []
    for b in plan.our_impls(kernels("fused_update")):
        if b == "compile":
            ref = _reference(lmo, flags)
            out.append((b, False, lambda ps, gs, bs, ref=ref: compiled(ref)(ps, gs, bs)))
        else:
            out.append((b, False, lambda ps, gs, bs, b=b: dk.ops.fused_update(
                ps, gs, bs, lmo=lmo, lr=LR, momentum=MOMENTUM, scale=SCALE, backend=b, **flags)))
    out.append(("reference", True, _reference(lmo, flags)))
    return [x for x in out if plan.wants(x[0])]


def _oracle_updates(lmo, flags, ps, gs, bs, dtype) -> torch.Tensor:
    """The update terms (flat) of tests/oracle.py's Scion step on (p, g, buf) rounded to ``dtype``."""
    out = []
    for p, g, b in zip(ps, gs, bs):
        p, g, b = p.to(dtype), g.to(dtype), b.to(dtype)
        d = b * (1 - MOMENTUM) + g * MOMENTUM  # the buffer's update, as oracle.scion_run writes it
        out.append(update_term(p, oracle.scion_step(p, d, lr=LR, scale=SCALE, norm=lmo, norm_kwargs=flags), LR))
    return torch.cat([u.flatten() for u in out])


def _case(plan, model, name, lmo, flags, shapes, dtype, impl, baseline, fn) -> Case:
    def build():
        ps, gs, bs = _tensors(plan, shapes, dtype)

        def run():  # 16-bit p from 0: else the update (lr times p) drowns in the rounding of p
            p0 = [p.clone() if p.element_size() >= 4 else torch.zeros_like(p) for p in ps]
            mine = [p.clone() for p in p0], [g.clone() for g in gs], [b.clone() for b in bs]
            fn(*mine)
            ours = torch.cat([update_term(p, q, LR).flatten() for p, q in zip(p0, mine[0])])
            return ({lmo: ours}, {lmo: _oracle_updates(lmo, flags, p0, gs, bs, torch.float64)},
                    {lmo: _oracle_updates(lmo, flags, p0, gs, bs, plain_dtype(dtype))})
        return lambda: fn(ps, gs, bs), Check(run, dtype)
    numel = sum(torch.Size(s).numel() for s in shapes)
    shape = "x".join(map(str, shapes[0])) + (f" +{len(shapes) - 1}" if len(shapes) > 1 else "")
    return Case("fused_update", model, name, shape, dtype, impl, baseline, flops=0,
                bytes=update_bytes(numel, dtype.itemsize, MOMENTUM), bound="memory", build=build,
                warmup=3 if impl == "compile" else 1)


# -- the Newton-Schulz apply pass ----------------------------------------------------------------------

X_DTYPE = torch.bfloat16  # Newton-Schulz's default iteration dtype: X reaches the apply pass in bf16


def apply_shapes(model) -> list[tuple[int, ...]]:
    """One hidden matrix of each distinct shape of the model (the pass is per matrix, bandwidth-bound)."""
    hidden = next(shapes for g, _, _, shapes in model.groups() if g == "hidden")
    return list(dict.fromkeys(s for _, s in hidden))


def _alphas(shapes):
    return [(d_out / d_in) ** 0.5 for d_out, d_in in shapes]  # Spectral's sqrt(d_out / d_in)


def _reference_apply(ps, xs, alphas):
    """The reference's apply: p *= 1 - lr, then p -= lr scale alpha X (X widened to p's dtype), per param."""
    for p, x, a in zip(ps, xs, alphas):
        p.mul_(1 - LR)
        p.add_(x.to(p.dtype) * (SCALE * a), alpha=-LR)


def _apply_impls(plan: Plan):
    out = []
    for b in plan.our_impls(kernels("fused_update")):
        if b == "compile":
            out.append((b, False, lambda ps, xs, alphas: compiled(_reference_apply)(ps, xs, alphas)))
        else:
            out.append((b, False, lambda ps, xs, alphas, b=b: apply_update(ps, xs, alphas, lr=LR, scale=SCALE,
                                                                           backend=b)))
    out.append(("reference", True, _reference_apply))
    return [x for x in out if plan.wants(x[0])]


def _apply_case(plan, model, shapes, dtype, impl, baseline, fn) -> Case:
    alphas = _alphas(shapes)

    def build():
        gen, dev = plan.generator(), plan.device.torch_device
        ps = [torch.randn(s, generator=gen, device=dev).to(dtype) for s in shapes]
        xs = [torch.randn(s, generator=gen, device=dev).to(X_DTYPE) for s in shapes]

        def run():  # 16-bit p from 0, as the fused cases
            p0 = [p.clone() if p.element_size() >= 4 else torch.zeros_like(p) for p in ps]
            mine = [p.clone() for p in p0]
            fn(mine, xs, alphas)
            ours = torch.cat([update_term(p, q, LR).flatten() for p, q in zip(p0, mine)])
            terms = {d: torch.cat([update_term(p.to(d), p.to(d) * (1 - LR) - LR * (SCALE * a * x.to(d)), LR).flatten()
                                   for p, x, a in zip(p0, xs, alphas)])  # the step restated in d, as the
                     for d in (torch.float64, plain_dtype(dtype))}         # fused cases' oracle step
            return {"apply": ours}, {"apply": terms[torch.float64]}, {"apply": terms[plain_dtype(dtype)]}
        return lambda: fn(ps, xs, alphas), Check(run, dtype)
    numel = sum(torch.Size(s).numel() for s in shapes)
    shape = "x".join(map(str, shapes[0])) + (f" +{len(shapes) - 1}" if len(shapes) > 1 else "")
    return Case("fused_update", model, "Spectral apply (bf16 X)", shape, dtype, impl, baseline, flops=0,
                bytes=numel * (2 * dtype.itemsize + X_DTYPE.itemsize), bound="memory", build=build,
                warmup=3 if impl == "compile" else 1)


def cases(plan: Plan) -> list[Case]:
    out = []
    for model in for_preset(OP_MODELS, plan.preset, plan.device.torch_device):
        for name, lmo, flags, shapes in targets(model):
            for dtype in plan.dtypes:
                for impl, is_base, fn in _impls(plan, lmo, flags):
                    out.append(_case(plan, model.label, name, lmo, flags, shapes, dtype, impl, is_base, fn))
        for dtype in plan.dtypes:
            for impl, is_base, fn in _apply_impls(plan):
                out.append(_apply_case(plan, model.label, apply_shapes(model), dtype, impl, is_base, fn))
    return out
