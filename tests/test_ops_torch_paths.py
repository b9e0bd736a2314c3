"""The torch paths of the three ops (``backend="torch"``) against the independent oracle.

newton_schulz: every schedule, steps, dtype (and the fp32 / fp64 accumulation of the norm), tall,
batched and non-contiguous input. power_iteration: warm and default starts, iterations, dtypes.
fused_update: every LMO and flag, momentum, ScionLight, unconstrained, scale, lr, and the helpers
``direction`` (u of each kind from kind, line dim and alpha alone), ``momentum_``, ``apply_update_`` and
``read_hyper`` (numbers or 0-d tensors). fp64 agrees to a few ulps; other dtypes follow the
rule of tests/tolerances.py against the oracle run in that dtype.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

import disco_kernels as dk
import oracle
from tolerances import assert_close, assert_oracle, plain_dtype, rel_err

fu = importlib.import_module("disco_kernels.ops.fused_update")
ns_mod = importlib.import_module("disco_kernels.ops.newton_schulz")


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- newton_schulz -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (5, 9), (9, 5), (3, 5, 9), (2, 9, 5), (2, 3, 4, 6)])
@pytest.mark.parametrize("coefficients,steps", [("jordan", 5), ("jordan", 2), ("polar_express", 7),
                                                ([(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)], 3), ("jordan", 0)])
def test_newton_schulz_fp64(shape, coefficients, steps):
    G = randn(*shape)
    X = dk.ops.newton_schulz(G, steps, coefficients, backend="torch")
    assert X.shape == G.shape and X.dtype == torch.float64 and X.is_contiguous()
    assert_oracle(X, oracle.newton_schulz, G, steps, coefficients)


def test_newton_schulz_defaults():
    G = randn(6, 10)
    assert_oracle(dk.ops.newton_schulz(G), oracle.newton_schulz, G, 5, "jordan")


def test_newton_schulz_normalisation_of_a_tiny_g():
    """||G|| comparable to the eps of each schedule: the eps (1e-7, 1e-6) and multiplier (1, 1.02) count."""
    for coefficients, eps in (("jordan", 1e-7), ("polar_express", 1e-6)):
        G = randn(4, 6)
        G = G / G.norm() * eps
        X = dk.ops.newton_schulz(G, 1, coefficients, backend="torch")
        assert_oracle(X, oracle.newton_schulz, G, 1, coefficients)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 16, 24)])
@pytest.mark.parametrize("coefficients", ["jordan", "polar_express"])
def test_newton_schulz_in_dtype(dtype, shape, coefficients):
    G = randn(*shape)
    for source in (G, G.to(dtype)):
        X = dk.ops.newton_schulz(source, 5, coefficients, dtype=dtype, backend="torch")
        assert X.dtype == dtype
        exact = oracle.newton_schulz(source.double(), 5, coefficients)
        assert_close(X, exact, oracle.newton_schulz(source, 5, coefficients, dtype=dtype), dtype)


def test_newton_schulz_dtype_defaults_to_gs():
    G = randn(8, 12).float()
    X = dk.ops.newton_schulz(G, backend="torch")
    assert X.dtype == torch.float32
    assert_close(X, oracle.newton_schulz(G.double()), oracle.newton_schulz(G), torch.float32)


def test_newton_schulz_fp64_input_keeps_its_norm_in_fp64():
    """An fp64 G iterated in fp32 is normalised in fp64: the squares of entries ~1e30 overflow fp32, not fp64.
    (The plain fp32 error is taken on G / 1e30, the same matrix up to the eps.)"""
    G = randn(6, 10) * 1e30
    X = dk.ops.newton_schulz(G, dtype=torch.float32, backend="torch")
    assert_close(X, oracle.newton_schulz(G), oracle.newton_schulz(G * 1e-30, dtype=torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.float32])
def test_newton_schulz_fp16_g_past_its_norm(dtype):
    """The norm accumulates and is kept in fp32: an fp16 G whose norm (~2e5) overflows fp16 still works."""
    G = randn(64, 96)  # (not a tiny matrix: its error would be a handful of roundings, luck against the rule)
    G = (G / G.abs().max() * 3e4).half()
    assert torch.linalg.vector_norm(G).isinf()
    X = dk.ops.newton_schulz(G, dtype=dtype, backend="torch")
    d = dtype or torch.float16
    assert X.dtype == d and X.isfinite().all()
    assert_close(X, oracle.newton_schulz(G.double()), oracle.newton_schulz(G, dtype=d), d)


def test_newton_schulz_noncontiguous_and_tall_batches():
    G = randn(3, 12, 20).transpose(-2, -1)  # (3, 20, 12): tall and not contiguous
    X = dk.ops.newton_schulz(G, backend="torch")
    assert X.is_contiguous() and X.shape == (3, 20, 12)
    assert_oracle(X, oracle.newton_schulz, G)


def test_accumulate_dtype():
    assert ns_mod.accumulate_dtype(torch.bfloat16) == torch.float32
    assert ns_mod.accumulate_dtype(torch.float16) == torch.float32
    assert ns_mod.accumulate_dtype(torch.float32) == torch.float32
    assert ns_mod.accumulate_dtype(torch.float64) == torch.float64


def test_newton_schulz_torch_impl_directly():
    """``_torch`` takes (G, triples, mult, eps, dtype): each is used."""
    G = randn(4, 6)
    triples = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
    X = ns_mod._torch(G, triples, 1.02, 1e-6, torch.float64)
    assert rel_err(X, oracle.newton_schulz(G, 2, [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)])) > 1e-6  # mult 1.02 != 1
    def want(G):  # the iteration written out with mult 1.02 and eps 1e-6
        X = G / (1.02 * G.norm() + 1e-6)
        for a, b, c in triples:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
        return X
    assert_oracle(X, want, G)


# -- power_iteration ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (3, 6, 4)])
@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_power_iteration(shape, iters, dtype):
    W = randn(*shape).to(dtype)
    v0 = torch.nn.functional.normalize(randn(*shape[:-2], shape[-1], seed=1), dim=-1)
    sigma, v = dk.ops.power_iteration(W, v0.to(dtype), iters, backend="torch")
    acc = torch.promote_types(dtype, torch.float32)
    assert sigma.dtype == acc and v.dtype == acc and sigma.shape == shape[:-2] and v.shape == v0.shape
    # computed in acc (fp32 for 16-bit W) on the rounded inputs: held to the oracle in acc's plain dtype
    assert_oracle([sigma, v], oracle.power_iteration, W, v0.to(dtype), iters, dtype=acc)


def test_power_iteration_defaults():
    W = randn(2, 6, 8)
    sigma, v = dk.ops.power_iteration(W)  # one iteration from the documented start vector
    def want(W, v0):
        out = [oracle.power_iteration(w, v0, 1) for w in W]
        return [torch.stack([s for s, _ in out]), torch.stack([x for _, x in out])]
    assert_oracle([sigma, v], want, W, oracle.start_vector(8, torch.float32))  # the documented start, made in fp32
    more, _ = dk.ops.power_iteration(W, iters=2)
    assert rel_err(more, sigma) > 1e-6  # a second iteration moves the estimate by far more than fp32 roundoff


def test_power_iteration_moves_v_to_ws_device():
    W = torch.empty(2, 5, 4, device="meta")
    sigma, v = dk.ops.power_iteration(W, torch.ones(2, 4) / 2)
    assert sigma.device.type == "meta" and v.device.type == "meta" and sigma.shape == (2,) and v.shape == (2, 4)


def test_power_iteration_v_on_another_dtype_and_layout():
    W = randn(5, 8).float()
    v0 = torch.nn.functional.normalize(randn(8, seed=1), dim=-1)
    v_strided = torch.stack([v0, v0], dim=1)[:, 0]  # non-contiguous fp64 v
    sigma, v = dk.ops.power_iteration(W, v_strided, 2, backend="torch")
    assert sigma.dtype == torch.float32 and v.dtype == torch.float32
    assert_oracle([sigma, v], oracle.power_iteration, W, v0.float(), 2)


# -- fused_update -----------------------------------------------------------------------------------

FUSED = [  # lmo, flags, shapes
    ("Sign", {"normalized": True}, [(6, 10), (10, 6)]),
    ("Sign", {"normalized": False}, [(6, 10)]),
    ("RowNorm", {"normalized": True, "transpose": False}, [(6, 10), (10, 6)]),
    ("RowNorm", {"normalized": False, "transpose": True}, [(6, 10)]),
    ("ColNorm", {"normalized": True, "transpose": True}, [(6, 10), (10, 6)]),
    ("ColNorm", {"normalized": False, "transpose": False}, [(6, 10)]),
    ("BiasRMS", {}, [(7,), (1,), ()]),
]


def _with_zero_lines(shape, seed):
    g = randn(*shape, seed=seed)
    if len(shape) == 2:
        g[0] = 0
        g[:, -1] = 0
    return g


@pytest.mark.parametrize("lmo,flags,shapes", FUSED, ids=lambda x: str(x))
@pytest.mark.parametrize("momentum,light", [(1.0, False), (0.3, False), (0.3, True), (1.0, True)])
@pytest.mark.parametrize("unconstrained", [False, True])
def test_fused_update_fp64(lmo, flags, shapes, momentum, light, unconstrained):
    ps = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    gs = [_with_zero_lines(s, 10 + i) for i, s in enumerate(shapes)]
    bufs = [randn(*s, seed=20 + i) for i, s in enumerate(shapes)]
    ps2, gs2, bufs2 = [x.clone() for x in ps], [x.clone() for x in gs], [x.clone() for x in bufs]
    use_bufs = momentum != 1 and not light
    dk.ops.fused_update(ps2, gs2, bufs2 if use_bufs else None, lmo=lmo, lr=0.1, momentum=momentum, scale=2.5,
                        unconstrained=unconstrained, light=light, backend="torch", **flags)
    kwargs = {k: v for k, v in flags.items()} if lmo != "BiasRMS" else {}
    for p, g, b, p2, g2, b2 in zip(ps, gs, bufs, ps2, gs2, bufs2):
        def d(b, g):
            return b * (1 - momentum) + g * momentum if use_bufs else g
        assert_oracle(p2, lambda p, b, g: oracle.scion_step(p, d(b, g), lr=0.1, scale=2.5, unconstrained=unconstrained,
                                                            norm=lmo, norm_kwargs=kwargs), p, b, g)
        if light and momentum != 1:  # ScionLight decays g: one rounding of one product
            assert torch.equal(g2, g * (1 - momentum))
        else:
            assert torch.equal(g2, g)
        if use_bufs:
            assert_oracle(b2, d, b, g)
        else:
            assert torch.equal(b2, b)  # the buffer is left alone when unused


def test_fused_update_defaults():
    """momentum 1, scale 1, constrained, normalized=True, transpose=False."""
    p, g = randn(6, 10), randn(6, 10, seed=1)
    p2 = p.clone()
    dk.ops.fused_update([p2], [g.clone()], lmo="RowNorm", lr=0.1)
    assert_oracle(p2, oracle.scion_step, p, g, lr=0.1, norm="RowNorm", norm_kwargs={"normalized": True})
    p2 = p.clone()
    dk.ops.fused_update([p2], [g.clone()], lmo="ColNorm", lr=0.1)
    assert_oracle(p2, oracle.scion_step, p, g, lr=0.1, norm="ColNorm", norm_kwargs={"normalized": True})


def test_fused_update_with_bufs_and_default_momentum_and_light():
    """bufs given, momentum left at 1: the buffer becomes g; momentum given, light left False: Scion's buffer."""
    p, g, b = randn(6, 10), randn(6, 10, seed=1), randn(6, 10, seed=2)
    p2, b2 = p.clone(), b.clone()
    dk.ops.fused_update([p2], [g.clone()], [b2], lmo="RowNorm", lr=0.1)
    assert torch.equal(b2, g)  # momentum 1: (1 - 1) b + 1 g is g exactly
    assert_oracle(p2, oracle.scion_step, p, g, lr=0.1, norm="RowNorm")
    p2, g2, b2 = p.clone(), g.clone(), b.clone()
    dk.ops.fused_update([p2], [g2], [b2], lmo="RowNorm", lr=0.1, momentum=0.25)
    d = 0.75 * b + 0.25 * g
    assert_oracle(b2, lambda b, g: 0.75 * b + 0.25 * g, b, g)
    assert torch.equal(g2, g)
    assert_oracle(p2, oracle.scion_step, p, d, lr=0.1, norm="RowNorm")


def test_fused_update_buffer_with_light_is_left_alone():
    """light=True with bufs: the buffer is not updated, the step goes along g."""
    p, g, b = randn(6, 10), randn(6, 10, seed=1), randn(6, 10, seed=2)
    p2, g2, b2 = p.clone(), g.clone(), b.clone()
    dk.ops.fused_update([p2], [g2], [b2], lmo="Sign", lr=0.1, momentum=0.5, light=True, backend="torch")
    assert torch.equal(b2, b)
    assert_oracle(p2, oracle.scion_step, p, g, lr=0.1, norm="Sign")
    assert torch.equal(g2, 0.5 * g)  # a power of two: exact


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lmo,flags", [("RowNorm", {"transpose": True}), ("ColNorm", {}), ("BiasRMS", {}),
                                       ("Sign", {"normalized": False})])
def test_fused_update_low_precision(dtype, lmo, flags):
    """Line norms of 16-bit g in fp32 (no 0 / 0 on a zero line, no g² overflow); the update in g's dtype."""
    shape = (9,) if lmo == "BiasRMS" else (9, 16)
    p = randn(*shape).to(dtype)
    g = randn(*shape, seed=1)
    if lmo != "BiasRMS":
        g[4] = 0
        g[:, 2] = 0
    g[1] = 300.0
    g = g.to(dtype)
    kwargs = {"normalized": True, **flags} if lmo != "BiasRMS" else {}
    exact = oracle.scion_step(p.double(), g.double(), lr=0.1, norm=lmo, norm_kwargs=kwargs)
    wide = torch.promote_types(dtype, torch.float32)
    plain = (p * (1 - 0.1) - 0.1 * oracle.lmo(lmo, g.to(wide), **kwargs).to(dtype))
    p2 = p.clone()
    dk.ops.fused_update([p2], [g], lmo=lmo, lr=0.1, backend="torch", **kwargs)
    assert p2.dtype == dtype and p2.isfinite().all()
    assert_close(p2, exact, plain, dtype)


DIRECTIONS = [  # (norm, kwargs, shape): each built-in fused norm as the op sees it, kind, line dim and alpha
    ("RowNorm", {"normalized": True, "transpose": True}, (6, 10)), ("RowNorm", {"normalized": False}, (6, 10)),
    ("ColNorm", {"normalized": True}, (6, 10)), ("ColNorm", {"normalized": False, "transpose": True}, (10, 6)),
    ("Sign", {"normalized": True}, (6, 10)), ("Sign", {"normalized": False}, (6, 10)),
    ("BiasRMS", {}, (10,)), ("BiasRMS", {}, ()),
]


@pytest.mark.parametrize("norm,kwargs,shape", DIRECTIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_direction_of_each_norm(norm, kwargs, shape, dtype):
    """``direction`` from nothing but the norm's kind, line dim and alpha is the oracle's LMO of that norm:
    Sign exactly, the line norms within the rule (16-bit g: norms in fp32 or wider, rounded once)."""
    g = randn(*shape)
    if len(shape) == 2:
        g[2] = 0
    g = g.to(dtype)
    n = dk.lmo.make_norm(norm, kwargs)
    out = fu.direction(n.kind, g, n.line_dim(shape), n.alpha(shape))
    assert out.dtype == dtype
    if norm == "Sign":
        assert torch.equal(out, oracle.lmo(norm, g, **kwargs))
    else:
        assert_close(out, oracle.lmo(norm, g.double(), **kwargs), oracle.lmo(norm, g.to(plain_dtype(dtype)), **kwargs))


def test_direction_kinds_and_dtypes():
    """Kind "scaled" is d alpha; u is computed in the wider of d's and the param's dtype (fp32 params
    along bf16 d get an fp32 u, not a bf16 rounding of it); the line dim picks rows or columns."""
    d = randn(5, 7).bfloat16()
    assert torch.equal(fu.direction("scaled", d, -1, 0.3), d * 0.3)
    wide = fu.direction("scaled", d, -1, 0.3, torch.float32)
    assert wide.dtype == torch.float32 and torch.equal(wide, d.float() * 0.3)
    assert fu.direction("sign", d, -1, 0.1, torch.float32).dtype == torch.float32
    assert fu.direction("line", d, -1, 1.0, torch.float16).dtype == torch.float32
    g = randn(5, 7)
    rows, cols = fu.direction("line", g, -1, 1.0), fu.direction("line", g, -2, 1.0)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(cols.norm(dim=0), torch.ones(7, dtype=torch.float64))


def test_momentum_and_apply_update_helpers():
    bufs, grads = [randn(3, 4), randn(5)], [randn(3, 4, seed=1), randn(5, seed=1)]
    b0 = [b.clone() for b in bufs]
    fu.momentum_(bufs, grads, 0.25)
    assert_oracle(bufs, lambda bs, gs: [b * 0.75 + g * 0.25 for b, g in zip(bs, gs)], b0, grads)
    params, updates = [randn(3, 4, seed=2), randn(5, seed=2)], [randn(3, 4, seed=3), randn(5, seed=3)]
    for unconstrained in (False, True):
        ps = [p.clone() for p in params]
        fu.apply_update_(ps, updates, 0.1, 3.0, unconstrained)
        for p, p0, u in zip(ps, params, updates):
            assert_oracle(p, lambda p0, u: (p0 if unconstrained else p0 * 0.9) - 0.1 * 3.0 * u, p0, u)
    ups = [u.clone() for u in updates]
    fu.apply_update_([p.clone() for p in params], ups, 0.1, 3.0, False)
    assert all(torch.equal(u, v) for u, v in zip(ups, updates))  # the updates are not scaled in place


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_helpers_take_tensor_hyper_parameters(dtype):
    """The tensor arithmetic that a device ``hyper`` takes (no host read), here with CPU 0-d tensors:
    the same step as the numbers, within the rule, in the tensors' dtype; nothing but the targets written."""
    bufs, grads = [randn(3, 4).to(dtype), randn(5).to(dtype)], [randn(3, 4, seed=1).to(dtype), randn(5, seed=1).to(dtype)]
    b0 = [b.clone() for b in bufs]
    m = torch.tensor(0.375)
    fu.momentum_(bufs, grads, m)
    assert_oracle(bufs, lambda bs, gs: [b * 0.625 + g * 0.375 for b, g in zip(bs, gs)], b0, grads)
    params = [randn(3, 4, seed=2).to(dtype), randn(5, seed=2).to(dtype)]
    updates = [randn(3, 4, seed=3).to(dtype), randn(5, seed=3).to(dtype)]
    u0 = [u.clone() for u in updates]
    for unconstrained in (False, True):
        ps = [p.clone() for p in params]
        fu.apply_update_(ps, updates, torch.tensor(0.125), torch.tensor(3.0), unconstrained)
        assert all(p.dtype == dtype for p in ps)
        assert_oracle(ps, lambda ps, us: [(p if unconstrained else p * 0.875) - 0.125 * 3.0 * u for p, u in zip(ps, us)],
                      params, updates)
    assert all(torch.equal(u, v) for u, v in zip(updates, u0))
    assert m.item() == 0.375


def test_read_hyper():
    """Numbers pass through; a CPU hyper is read as floats (free); a device one stays tensors (no sync)."""
    assert fu.read_hyper(0.1, 0.5, 2.0, None) == (0.1, 0.5, 2.0)
    hyper = torch.tensor([0.125, 0.5, 3.0])
    assert fu.read_hyper(math.nan, 0.5, math.nan, hyper) == (0.125, 0.5, 3.0)
    meta = fu.read_hyper(math.nan, math.nan, math.nan, hyper.to("meta"))
    assert all(isinstance(t, torch.Tensor) and t.dim() == 0 and t.is_meta for t in meta)


def test_hyper_is_built_only_for_tensors():
    """All numbers: no tensor (nothing to launch); any tensor: [lr, momentum, scale] on the params' device,
    fp32 (fp64 for fp64 params), the tensors' floats NaN (ScionLight then reads momentum as != 1)."""
    cpu = torch.device("cpu")
    assert fu._hyper(cpu, torch.float32, 0.1, 1.0, 2.0) == ((0.1, 1.0, 2.0), None)
    floats, hyper = fu._hyper(cpu, torch.bfloat16, 0.1, torch.tensor(1.0, dtype=torch.float64), 2.0)
    assert floats[0] == 0.1 and math.isnan(floats[1]) and floats[2] == 2.0
    assert hyper.dtype == torch.float32 and hyper.tolist() == [float(torch.tensor(0.1)), 1.0, 2.0]
    floats, hyper = fu._hyper(cpu, torch.float64, torch.tensor(0.1, dtype=torch.float64), 0.5, 2.0)
    assert math.isnan(floats[0]) and floats[1:] == (0.5, 2.0)
    assert hyper.dtype == torch.float64 and hyper.tolist() == [0.1, 0.5, 2.0]


def test_fused_update_empty_list_is_a_no_op():
    dk.ops.fused_update([], [], None, lmo="Sign", lr=0.1)
    dk.ops.fused_update([], [], [], lmo="RowNorm", lr=0.1, backend="torch")
