"""torch.compile with the default backend (inductor) over each custom op in each dtype on CPU, one
compiled Scion step, and torch.library.opcheck on the three custom ops (torch backend).

Compiled vs eager, bit for bit, where the compiled graph only feeds a custom op: the op is opaque to
inductor, which calls the same eager kernel, so any difference means the graph gave it other inputs
(dtype, layout), lost or misordered a mutation, or a fake impl misdescribed the output. Where inductor
generates code of its own (power_iteration's default start vector is computed outside the op; a
Spectral param's momentum and update in Scion.step), the result is held to the tolerance rule
(tests/tolerances.py) against the oracle (tests/oracle.py) instead.

Inductor compiles are slow on a small CPU: one compiled function per op serves every dtype (one graph
per dtype, the shapes fixed), and each graph is small.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import disco_kernels as dk
import oracle
from tolerances import assert_close

apply_update = importlib.import_module("disco_kernels.ops.fused_update").apply_update

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
JORDAN = [3.4445, -4.775, 2.0315]


def _acc(dtype):
    """The dtype power iteration computes in (fp32 for 16-bit W)."""
    return torch.promote_types(dtype, torch.float32)


# -- newton_schulz ---------------------------------------------------------------------------------

@torch.compile(fullgraph=True)
def _ns(G):
    return dk.ops.newton_schulz(G), dk.ops.newton_schulz(G, 3, "polar_express", dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_newton_schulz_inductor(dtype):
    """A tall batch (transposed inside the op) in ``dtype``, iterating in it and in bf16: as eager, bit for bit."""
    G = torch.randn(2, 12, 8, dtype=torch.float64).to(dtype)
    got = _ns(G)
    want = (dk.ops.newton_schulz(G), dk.ops.newton_schulz(G, 3, "polar_express", dtype=torch.bfloat16))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == G.shape and g.is_contiguous()
        assert torch.equal(g, w), f"max diff {(g.double() - w.double()).abs().max().item()}"


# -- power_iteration -------------------------------------------------------------------------------

@torch.compile(fullgraph=True)
def _pi(W, v):
    return dk.ops.power_iteration(W, v, iters=3), dk.ops.power_iteration(W, iters=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_power_iteration_inductor(dtype):
    """With v given, as eager bit for bit. From the default start vector, which inductor computes with code
    of its own (outside the op), within the rule of the oracle's iteration from the documented start:
    that start is an fp32 computation (1-ulp sin differs between ATen and inductor), so even for fp64 W
    the rule is fp32's there (compiled fp64 is ~1e-9 off eager; eager and the oracle agree exactly)."""
    W = torch.randn(2, 6, 9, dtype=torch.float64).to(dtype)
    v = torch.randn(2, 9, dtype=_acc(dtype))
    v = v / v.norm(dim=-1, keepdim=True)
    (sigma, v_out), (sigma0, v0) = _pi(W, v)
    want_sigma, want_v = dk.ops.power_iteration(W, v, iters=3)
    assert sigma.dtype == v_out.dtype == _acc(dtype)
    assert torch.equal(sigma, want_sigma) and torch.equal(v_out, want_v)
    start = oracle.start_vector(9, torch.float32).expand(2, 9)
    exact = oracle.power_iteration(W.double(), start.double(), 2)
    plain = oracle.power_iteration(W.float(), start, 2)
    assert sigma0.dtype == v0.dtype == _acc(dtype)
    assert_close(sigma0, exact[0], plain[0], torch.float32, what="sigma from the default start")
    assert_close(v0, exact[1], plain[1], torch.float32, what="v from the default start")


# -- fused_update ----------------------------------------------------------------------------------

SHAPES = [(5, 7), (6, 4), (7, 3), (9,)]


def _fused(ps, gs, bs):
    """Each LMO once, each mutation kind once, an apply pass; reads of p and g after the updates."""
    dk.ops.fused_update(ps[:1], gs[:1], bs[:1], lmo="Sign", lr=0.1, momentum=0.5, scale=2.0, normalized=False)
    dk.ops.fused_update(ps[1:2], gs[1:2], None, lmo="RowNorm", lr=0.1, transpose=True)
    apply_update(ps[1:2], bs[1:2], [0.5], lr=0.1, scale=2.0)  # (bs[1] only read)
    dk.ops.fused_update(ps[2:3], gs[2:3], None, lmo="ColNorm", lr=0.1, momentum=0.5, normalized=False, light=True)
    dk.ops.fused_update(ps[3:], gs[3:], bs[3:], lmo="BiasRMS", lr=0.1, momentum=0.5, unconstrained=True)
    return ps[0] * 2, gs[2] * 2  # exact in every dtype: the graph must read the mutated values


_fused_compiled = torch.compile(_fused, fullgraph=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_update_inductor(dtype):
    """Sign with a momentum buffer, RowNorm(transpose) without and an apply pass after it, ColNorm as
    ScionLight (grads decay), BiasRMS unconstrained: params, buffers and grads mutated in place as eager,
    bit for bit, twice."""
    tensors = [[torch.randn(s, dtype=torch.float64).to(dtype) for s in SHAPES] for _ in range(3)]
    compiled, eager = [[t.clone() for t in ts] for ts in tensors], [[t.clone() for t in ts] for ts in tensors]
    for _ in range(2):  # the second step starts from mutated buffers and decayed grads
        got = _fused_compiled(*compiled)
        want = _fused(*eager)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    for role, cs, es in zip(("params", "grads", "bufs"), compiled, eager):
        for k, (c, e) in enumerate(zip(cs, es)):
            assert c.dtype == dtype and torch.equal(c, e), f"{role}[{k}] {dtype}"
    moved = {"params": [0, 1, 2, 3], "grads": [2], "bufs": [0, 3]}  # what the steps mutate, and only that
    for role, cs, before in zip(("params", "grads", "bufs"), compiled, tensors):
        for k, (c, b) in enumerate(zip(cs, before)):
            assert torch.equal(c, b) != (k in moved[role]), f"{role}[{k}] {dtype}"


def _hyper_step(ps, gs, bs, xs, lr, momentum):
    """A fused update and an apply pass whose lr (and momentum) a schedule changes."""
    dk.ops.fused_update(ps[:2], gs[:2], bs[:2], lmo="ColNorm", lr=lr, momentum=momentum, scale=2.0)
    dk.ops.fused_update(ps[2:], gs[2:], None, lmo=dk.lmo.Sign(), lr=lr, momentum=momentum, light=True)
    apply_update(ps[:2], xs, [0.5, 2.0], lr=lr, scale=1.5)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_tensor_hyper_parameters_do_not_recompile(backend):
    """torch.compile(fullgraph=True) of a step with lr and momentum as 0-d tensors: five schedule values,
    one compile (the numbers recompile on each new value: the counter sees compiles), each step as eager
    with the numbers, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(5, 7), (6, 4), (3, 8)]
    tensors = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    xs = [torch.randn(s, generator=gen).bfloat16() for s in shapes[:2]]
    compiled, eager = ([[t.clone() for t in ts] for ts in tensors] for _ in range(2))
    compiles = []

    def counting(gm, inputs):
        compiles.append(gm)
        return gm.forward if backend == "eager" else torch._inductor.compile_fx.compile_fx(gm, inputs)

    step = torch.compile(_hyper_step, fullgraph=True, backend=counting)
    lr, momentum = torch.tensor(0.1), torch.tensor(0.5)
    torch._dynamo.utils.counters.clear()
    for v_lr, v_m in ((0.1, 0.5), (0.2, 0.25), (0.05, 1.0), (0.3, 0.125), (0.125, 0.75)):
        lr.fill_(v_lr)
        momentum.fill_(v_m)
        step(*compiled, xs, lr, momentum)
        _hyper_step(*eager, xs, lr.item(), momentum)  # (a tensor momentum: ScionLight decays g even at 1)
        for role, cs, es in zip(("params", "grads", "bufs"), compiled, eager):
            assert all(torch.equal(c, e) for c, e in zip(cs, es)), (role, v_lr, v_m)
    assert len(compiles) == 1 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    if backend == "eager":  # the contrast: numbers are constants of the graph
        for v_lr in (0.1, 0.2, 0.05):
            step(*compiled, xs, v_lr, momentum)
        assert len(compiles) == 4


# -- one compiled Scion step ---------------------------------------------------------------------------

STEP_GROUPS = [  # (norm, kwargs, shapes); Spectral iterates in fp32 so that the rule applies in fp32
    ("Spectral", {"dtype": "float32"}, [(10, 6)]),
    ("ColNorm", {"transpose": True}, [(11, 4)]),
    ("RowNorm", {}, [(5, 8)]),
    ("Sign", {}, [(4, 4)]),
    ("BiasRMS", {}, [(6,)]),
]


def _step_run(compiled: bool):
    """Two Scion steps (momentum 0.5) of fresh params, the second compiled when ``compiled`` (the first makes
    the momentum buffers, so that one graph serves); (initial params, grads per step, final params)."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(norm, kw, s) for norm, kw, ss in STEP_GROUPS for s in ss]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for _, _, s in shapes]
    initial = [p.detach().clone() for p in params]
    opt = dk.Scion([{"params": [p], "norm": norm, "norm_kwargs": kw} for p, (norm, kw, _) in zip(params, shapes)],
                   lr=0.05, momentum=0.5, scale=2.0, nonfinite="ignore")
    grads = []
    for step in (opt.step, torch.compile(opt.step, fullgraph=True) if compiled else opt.step):
        grads.append([torch.randn(p.shape, generator=gen) for p in params])
        for p, g in zip(params, grads[-1]):
            p.grad = g.clone()
        step()
    return initial, grads, [p.detach().clone() for p in params]


@pytest.mark.slow
def test_compiled_scion_step():
    """Every norm in one compiled step (one graph): the fused-norm params as eager bit for bit (the fused op
    does their whole step), the Spectral param (inductor computes its momentum and update) within the rule
    of the oracle's run, as eager's is."""
    initial, grads, eager = _step_run(compiled=False)
    torch._dynamo.reset()  # fresh caches: the step must compile, not fall back past a recompile limit
    torch._dynamo.utils.counters.clear()
    _, _, compiled = _step_run(compiled=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    groups = [dict(lr=0.05, momentum=0.5, scale=2.0, norm=norm,
                   norm_kwargs={k: v for k, v in kw.items() if k != "dtype"})  # the oracle iterates in p's dtype
              for norm, kw, ss in STEP_GROUPS for _ in ss]
    exact, plain = (oracle.scion_run([p.to(d) for p in initial], [[g.to(d) for g in gs] for gs in grads], groups)
                    for d in (torch.float64, torch.float32))
    for k, group in enumerate(groups):
        what = f"{group['norm']} param {k}"
        assert not torch.equal(compiled[k], initial[k]), what
        if group["norm"] == "Spectral":
            assert_close(eager[k], exact[k], plain[k], torch.float32, what="eager " + what)
            assert_close(compiled[k], exact[k], plain[k], torch.float32, what="compiled " + what)
        else:
            assert torch.equal(compiled[k], eager[k]), what


# -- opcheck ----------------------------------------------------------------------------------------------

def _lists(shapes, dtype=torch.float32):
    return [[torch.randn(s, dtype=dtype) for s in shapes] for _ in range(3)]


OPCHECK_CASES = {
    "newton_schulz": [
        (torch.randn(2, 5, 7), JORDAN, 1.0, 1e-7, torch.float32, "torch"),
        (torch.randn(7, 5), JORDAN * 2, 1.0, 1e-7, torch.bfloat16, "torch"),  # tall, output in another dtype
        (torch.randn(3, 4, dtype=torch.float64), JORDAN, 1.02, 1e-6, torch.float64, "torch"),
    ],
    "power_iteration": [
        (torch.randn(2, 5, 7), torch.ones(2, 7) / 7 ** 0.5, 2, "torch"),
        (torch.randn(6, 4, dtype=torch.bfloat16), torch.ones(4) / 2, 1, "torch"),  # sigma and v in fp32
    ],
    "fused_update": [  # params, grads, bufs, kind, dims, alphas, lr, momentum, scale, hyper, unconstrained, light
        (*_lists([(5, 7), (3, 4)]), "line", [-1, -2], [2.0, 0.5], 0.1, 0.5, 2.0, None, False, False, "torch"),  # bufs
        (*_lists([(5, 7)])[:2], [], "line", [-2], [1.5], 0.1, 0.5, 1.0, None, False, True, "torch"),  # grads
        (*_lists([(4, 4)], torch.bfloat16)[:2], [], "sign", [-1], [0.25], 0.1, 1.0, 1.0, None, True, False, "torch"),
        (*_lists([(6,), ()]), "line", [-1, -1], [0.4, 1.0], 0.1, 0.9, 1.0, None, False, False, "torch"),
        (*_lists([(5, 7), (3, 4)]), "line", [-1, -1], [2.0, 0.5], float("nan"), 0.5, float("nan"),
         torch.tensor([0.1, 0.5, 2.0]), False, False, "torch"),  # hyper-parameters from a tensor
        ([torch.randn(5, 7)], [torch.randn(5, 7, dtype=torch.bfloat16)], [], "scaled", [-1], [0.5], 0.1, 1.0, 1.0,
         None, False, False, "torch"),  # the apply pass, X in another dtype
    ],
}


@pytest.mark.parametrize("op,k", [(op, k) for op, cases in OPCHECK_CASES.items() for k in range(len(cases))])
def test_custom_op_opcheck(op, k):
    """Schema (mutated args declared), fake impls, autograd registration and AOT dispatch of each op."""
    torch.library.opcheck(getattr(torch.ops.disco_kernels, op).default, OPCHECK_CASES[op][k])
