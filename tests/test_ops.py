"""Ops through their public functions and custom ops: the torch backend against the independent oracle
under the tolerance rule, dispatch errors, and forced backends under torch.compile(fullgraph=True)
(inductor and opcheck: test_compile.py)."""
import importlib
import math

import pytest
import torch

import disco_kernels as dk
from disco_kernels import _backend
import oracle
from tolerances import assert_close, plain_dtype, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# A rank-1 G (one row or column) normalises to the same scalar iteration whatever its entries: in 16-bit its
# error is that one trajectory's rounding luck, so rank-1 shapes are checked in fp32 and fp64 only.
NS_CASES = ([(s, d) for s in [(7, 129), (129, 7), (3, 7, 129), (2, 16, 16)] for d in DTYPES]
            + [(s, d) for s in [(1, 1), (16, 1, 1), (1, 129), (129, 1)] for d in (torch.float32, torch.float64)])
apply_update = importlib.import_module("disco_kernels.ops.fused_update").apply_update  # (dk.ops.fused_update is the function)
BACKENDS = ["auto"] + dk.available_backends("cpu")  # + "triton" where it is interpreted
SCHEDULES = [("jordan", 5), ("polar_express", 5), ("polar_express", 7), ([(3.0, -3.2, 1.2)], 5),
             ([(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)], 3), ("jordan", 0)]


@pytest.mark.parametrize("shape,dtype", NS_CASES)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{s[0] if isinstance(s[0], str) else 'triples'}-{s[1]}")
def test_newton_schulz_vs_oracle(shape, dtype, schedule):
    """Every schedule and step count, within the rule against the plain iteration in ``dtype``."""
    coefficients, steps = schedule
    G = torch.randn(shape, dtype=torch.float64).to(dtype)
    out = dk.ops.newton_schulz(G, steps, coefficients, backend="torch")
    assert out.shape == G.shape and out.dtype == dtype and out.is_contiguous()
    exact = oracle.newton_schulz(G.double(), steps, coefficients)
    assert_close(out, exact, oracle.newton_schulz(G.to(plain_dtype(dtype)), steps, coefficients))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_newton_schulz_any_input_dtype(backend, in_dtype, dtype):
    """G of any float dtype iterates in ``dtype`` (e.g. fp64 params under the default bf16 Spectral)."""
    G = torch.randn(24, 40, dtype=torch.float64).to(in_dtype)
    out = dk.ops.newton_schulz(G, dtype=dtype, backend=backend)
    assert out.dtype == dtype
    assert_close(out, oracle.newton_schulz(G.double()), oracle.newton_schulz(G, dtype=dtype))


def test_newton_schulz_output_dtype_and_noncontiguous():
    G = torch.randn(40, 30).T  # non-contiguous (30, 40), computed in fp64
    out = dk.ops.newton_schulz(G, dtype=torch.float64)
    assert out.dtype == torch.float64
    assert_close(out, oracle.newton_schulz(G.double()), oracle.newton_schulz(G))


def test_newton_schulz_zero_and_empty():
    assert dk.ops.newton_schulz(torch.zeros(4, 6)).abs().max() == 0
    assert dk.ops.newton_schulz(torch.zeros(0, 5, 6)).shape == (0, 5, 6)


def test_newton_schulz_nonfinite_propagates():
    G = torch.randn(5, 8)
    G[1, 2] = float("nan")
    assert torch.isnan(dk.ops.newton_schulz(G)).all()


def _power_iteration_exact_and_plain(W, v, iters):
    """(exact, plain) (sigma, v) of ``iters`` iterations from ``v``; the op computes in fp32 for 16-bit W."""
    compute = plain_dtype(torch.promote_types(W.dtype, torch.float32))
    return oracle.power_iteration(W.double(), v.double(), iters), oracle.power_iteration(W.to(compute), v.to(compute), iters)


@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (129, 7), (3, 7, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("iters", [1, 4])
def test_power_iteration_vs_oracle(shape, dtype, iters):
    """From the documented start vector, ``iters`` iterations: sigma and v within the rule."""
    W = torch.randn(shape, dtype=torch.float64).to(dtype)
    start = oracle.start_vector(shape[-1]).expand(*shape[:-2], shape[-1])
    sigma, v = dk.ops.power_iteration(W, start, iters=iters, backend="torch")
    assert sigma.dtype == v.dtype == torch.promote_types(dtype, torch.float32) and sigma.shape == shape[:-2]
    (s64, v64), (s_plain, v_plain) = _power_iteration_exact_and_plain(W, start, iters)
    assert_close(sigma, s64, s_plain, what="sigma")
    assert_close(v, v64, v_plain, what="v")


@pytest.mark.parametrize("n", [1, 7, 129])
def test_power_iteration_default_start_vector(n):
    """Without v, the iteration starts from the documented vector (computed in fp32)."""
    W = torch.eye(n)  # one iteration keeps v: it comes back as the start vector
    _, v = dk.ops.power_iteration(W, iters=1)
    assert_close(v, oracle.start_vector(n), oracle.start_vector(n, torch.float32))


def test_power_iteration_warm_start_continues():
    """v passed back in continues the iteration: 3 + 2 iterations are 5 iterations."""
    W = torch.randn(3, 20, 30)
    _, v = dk.ops.power_iteration(W, oracle.start_vector(30).float().expand(3, 30), iters=3)
    sigma, v = dk.ops.power_iteration(W, v, iters=2)
    (s64, v64), (s32, v32) = _power_iteration_exact_and_plain(W, oracle.start_vector(30).expand(3, 30), 5)
    assert_close(sigma, s64, s32, what="sigma")
    assert_close(v, v64, v32, what="v")


@pytest.mark.parametrize("backend", BACKENDS)
def test_power_iteration_nonfinite_and_zero(backend):
    """A diverged (NaN) matrix reads as sigma = NaN, never as a healthy 0; a zero one as 0 with v kept;
    neighbours in the batch are unaffected."""
    W = torch.randn(3, 6, 20)
    W[0, 2, 3] = float("nan")
    W[1] = 0
    v0 = oracle.start_vector(20).float().expand(3, 20)
    sigma, v = dk.ops.power_iteration(W, v0, iters=2, backend=backend)
    (want, _), (plain, _) = _power_iteration_exact_and_plain(W[2], v0[2], 2)
    assert sigma[0].isnan()
    assert sigma[1] == 0 and torch.equal(v[1], v0[1])
    assert_close(sigma[2], want, plain)


def test_power_iteration_converges():
    """A convergence property, not a rounding bound: 200 iterations reach sigma_max to 1e-3 (a Gaussian
    40 x 60 matrix's top singular gap makes the error ~ (s2/s1)^400 far below that)."""
    W = torch.randn(3, 40, 60)
    sigma, v = dk.ops.power_iteration(W, iters=200)
    exact = torch.linalg.matrix_norm(W.double(), ord=2)
    sigma2, _ = dk.ops.power_iteration(W, v, iters=1)  # warm start: one more pass stays converged
    assert rel_err(sigma, exact) < 1e-3 and rel_err(sigma2, exact) < 1e-3
    assert (sigma <= exact * (1 + 1e-5)).all()  # a Rayleigh-type estimate never overshoots


def test_power_iteration_errors():
    with pytest.raises(ValueError, match="W must be"):
        dk.ops.power_iteration(torch.randn(5))
    with pytest.raises(ValueError, match="iters"):
        dk.ops.power_iteration(torch.randn(3, 3), iters=0)
    with pytest.raises(ValueError, match="v must have shape"):
        dk.ops.power_iteration(torch.randn(3, 4), torch.randn(3))


def test_newton_schulz_errors():
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        dk.ops.newton_schulz(torch.randn(5))
    with pytest.raises(TypeError, match="floating-point"):
        dk.ops.newton_schulz(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        dk.ops.newton_schulz([[1.0]])
    with pytest.raises(ValueError, match="backend"):
        dk.ops.newton_schulz(torch.randn(3, 3), backend="tpu")
    with pytest.raises(ValueError, match="coefficients"):
        dk.ops.newton_schulz(torch.randn(3, 3), coefficients="newton")


def test_forced_backend_unavailable_is_clear():
    if _backend.cuda_extension() is None or not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
            dk.ops.newton_schulz(torch.randn(3, 3), backend="cuda")


def test_auto_on_cpu_is_torch():
    assert _backend.resolve("auto", torch.device("cpu"), "newton_schulz", ("torch", "triton", "cuda")) == "torch"


FUSED = [("Sign", {"normalized": True}), ("Sign", {"normalized": False}), ("BiasRMS", {}),
         ("RowNorm", {"normalized": True, "transpose": False}), ("RowNorm", {"normalized": False, "transpose": True}),
         ("ColNorm", {"normalized": False, "transpose": False}), ("ColNorm", {"normalized": True, "transpose": True})]


def fused_oracle(lmo, flags, ps, gs, bufs, *, lr, momentum, scale, unconstrained, light):
    """The step of ``ops.fused_update`` restated with the oracle, in the inputs' dtype: (params, bufs, grads)."""
    kwargs = {k: v for k, v in flags.items() if lmo != "BiasRMS" and (lmo != "Sign" or k == "normalized")}
    out = ([], [], [])
    for p, g, b in zip(ps, gs, bufs):
        d = g if light or momentum == 1 else b * (1 - momentum) + g * momentum
        new_p = oracle.scion_step(p, d, lr=lr, scale=scale, unconstrained=unconstrained, norm=lmo, norm_kwargs=kwargs)
        for lst, x in zip(out, (new_p, d, g * (1 - momentum) if light else g)):
            lst.append(x)
    return out


@pytest.mark.parametrize("lmo,flags", FUSED, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in f.items())}" for n, f in FUSED])
@pytest.mark.parametrize("momentum,light,unconstrained", [(1.0, False, False), (0.1, False, True), (0.1, True, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_fused_update_torch_vs_oracle(lmo, flags, momentum, light, unconstrained, dtype):
    """Params, momentum buffers and (ScionLight) carried grads after one step, within the rule (errors over
    the whole list: the single-element tensors alone would be one rounding's luck)."""
    shapes = [(7,), (1,), (33,), ()] if lmo == "BiasRMS" else [(7, 129), (1, 1), (129, 7), (1, 33)]
    ps, gs, bufs = ([torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(3))
    step = dict(lr=0.1, momentum=momentum, scale=2.0, unconstrained=unconstrained, light=light)
    exact = fused_oracle(lmo, flags, *([x.double() for x in xs] for xs in (ps, gs, bufs)), **step)
    plain = fused_oracle(lmo, flags, *([x.to(plain_dtype(dtype)) for x in xs] for xs in (ps, gs, bufs)), **step)
    use_bufs = None if momentum == 1 or light else bufs
    dk.ops.fused_update(ps, gs, use_bufs, lmo=lmo, backend="torch", **step, **flags)
    flat = lambda xs: torch.cat([x.reshape(-1).double() for x in xs])  # noqa: E731
    for what, got, e, pl in zip(("params", "bufs", "grads"), (ps, bufs, gs), exact, plain):
        if what != "bufs" or use_bufs is not None:
            assert_close(flat(got), flat(e), flat(pl), dtype, what=what)


@pytest.mark.parametrize("lmo", ["RowNorm", "ColNorm", "BiasRMS"])
@pytest.mark.parametrize("backend", dk.available_backends("cpu"))
def test_fused_update_fp16_zero_and_large_lines(lmo, backend):
    """fp16 g with a zero line and entries past sqrt(fp16 max): line norms in fp32 (as the kernels take
    them) keep the update finite where fp16 math gives 0 / 0 (1e-8 rounds to 0) or g² = inf; within the
    rule against the plain computation in fp32 (fp16's own is not finite)."""
    shape = (144,) if lmo == "BiasRMS" else (9, 16)
    p = torch.randn(shape).half()
    g = torch.randn(shape).half()
    if lmo == "BiasRMS":  # one line: large, then (second call) zero
        g[5] = 300.0
    else:
        g[:, 2] = g[4] = 0  # a zero column and a zero row
        g[1, 5] = 300.0
    step = dict(lr=0.1, momentum=1.0, scale=1.0, unconstrained=False, light=False)
    flags = {"normalized": True, "transpose": False} if lmo != "BiasRMS" else {}
    for g in (g, torch.zeros_like(g)) if lmo == "BiasRMS" else (g,):
        exact = fused_oracle(lmo, flags, [p.double()], [g.double()], [None], **step)[0][0]
        plain = fused_oracle(lmo, flags, [p.float()], [g.float()], [None], **step)[0][0]
        q = p.clone()
        dk.ops.fused_update([q], [g], None, lmo=lmo, lr=0.1, backend=backend)
        assert q.isfinite().all()
        assert_close(q, exact, plain.half(), torch.float16)


# -- tensor hyper-parameters ---------------------------------------------------------------------------

HYPER_CASES = [("RowNorm", [(7, 33), (1, 5)]), ("ColNorm", [(7, 33), (40, 3)]), ("Sign", [(7, 33), (2, 2)]),
               ("BiasRMS", [(33,), ()])]
NUMBERS = dict(lr=float(torch.tensor(0.1)), momentum=0.375, scale=2.5)  # fp32 numbers: a tensor holds them exactly


def _fused_run(lmo, shapes, backend, light, **step):
    """One fused_update of fresh (seeded) tensors: the (params, grads, bufs) after it."""
    gen = torch.Generator().manual_seed(5)
    ps, gs, bs = ([torch.randn(s, generator=gen) for s in shapes] for _ in range(3))
    dk.ops.fused_update(ps, gs, bs, lmo=lmo, backend=backend, light=light, **step)
    return ps, gs, bs


@pytest.mark.parametrize("backend", dk.available_backends("cpu"))
@pytest.mark.parametrize("lmo,shapes", HYPER_CASES, ids=[c[0] for c in HYPER_CASES])
@pytest.mark.parametrize("which", ["lr", "momentum", "scale", "all"])
def test_tensor_hyper_parameters_are_the_numbers(backend, lmo, shapes, which):
    """lr, momentum, scale as CPU 0-d tensors (fp32 or fp64) give the numbers they hold, bit for bit, on
    every backend: params, momentum buffers and ScionLight's carried grads."""
    names = list(NUMBERS) if which == "all" else [which]
    for light in (False, True):
        want = _fused_run(lmo, shapes, backend, light, **NUMBERS)
        for dtype in (torch.float32, torch.float64):
            tensors = {k: torch.tensor(v, dtype=dtype) if k in names else v for k, v in NUMBERS.items()}
            got = _fused_run(lmo, shapes, backend, light, **tensors)
            for role, gs, ws in zip(("params", "grads", "bufs"), got, want):
                for k, (g, w) in enumerate(zip(gs, ws)):
                    assert torch.equal(g, w), f"{role}[{k}] light={light} {dtype}"
            assert all(tensors[k].item() == NUMBERS[k] for k in names)  # read, never written


@pytest.mark.parametrize("backend", dk.available_backends("cpu"))
def test_schedule_writes_into_the_tensors(backend):
    """The same tensors, written between steps (as a schedule does), give each step the new values."""
    lr, scale = torch.tensor(0.25), torch.tensor(1.0)
    for v_lr, v_scale in ((0.25, 1.0), (0.0625, 3.0), (0.0, 0.5)):
        lr.fill_(v_lr)
        scale.copy_(torch.tensor(v_scale))
        got = _fused_run("RowNorm", [(7, 33)], backend, False, lr=lr, momentum=0.5, scale=scale)
        want = _fused_run("RowNorm", [(7, 33)], backend, False, lr=v_lr, momentum=0.5, scale=v_scale)
        assert all(torch.equal(g, w) for gs, ws in zip(got, want) for g, w in zip(gs, ws)), (v_lr, v_scale)
    assert not torch.equal(_fused_run("RowNorm", [(7, 33)], backend, False, lr=0.25, momentum=0.5)[0][0],
                           _fused_run("RowNorm", [(7, 33)], backend, False, lr=0.0625, momentum=0.5)[0][0])


@pytest.mark.parametrize("backend", dk.available_backends("cpu"))
def test_tensor_momentum_of_one(backend):
    """A tensor momentum is a schedule's: ScionLight decays g by 1 - momentum even at 1 (g becomes 0),
    where the number 1 leaves g alone (also beside a tensor lr); with bufs, momentum 1 makes the buffer g."""
    g0 = _fused_run("Sign", [(7, 33)], backend, True, lr=0.0, momentum=0.0)[1][0]  # the draw, untouched
    for lr, momentum, grads_after in ((0.1, 1.0, "kept"), (torch.tensor(0.1), 1.0, "kept"),
                                      (0.1, torch.tensor(1.0), "zero"), (torch.tensor(0.1), torch.tensor(1.0), "zero")):
        ps, gs, bs = _fused_run("Sign", [(7, 33)], backend, True, lr=lr, momentum=momentum)
        assert torch.equal(gs[0], g0 if grads_after == "kept" else torch.zeros_like(g0)), (lr, momentum)
    ps, gs, bs = _fused_run("Sign", [(7, 33)], backend, False, lr=0.1, momentum=torch.tensor(1.0))
    assert torch.equal(bs[0], gs[0])


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([0.1]), r"^lr must be a real number or a 0-d floating-point tensor, got a tensor of shape \(1,\)"),
    (torch.tensor(1), "^lr must be a real number or a 0-d floating-point tensor"),
    (torch.tensor(-0.1), "^lr must be a finite number >= 0"),
    (torch.tensor(float("nan")), "^lr must be a finite number >= 0"),
])
def test_bad_tensor_hyper_parameters(bad, match):
    p = [torch.zeros(3, 3)]
    with pytest.raises((TypeError, ValueError), match=match):
        dk.ops.fused_update(p, p, lmo="Sign", lr=bad)
    with pytest.raises((TypeError, ValueError), match=match):
        apply_update(p, p, [1.0], lr=bad)


# -- apply_update: the Newton-Schulz apply pass ----------------------------------------------------------

def apply_oracle(ps, xs, alphas, *, lr, scale, unconstrained, dtype):
    """p (1 - lr) [unless unconstrained] - lr scale alpha X, computed in ``dtype`` from the same inputs."""
    return [(p.to(dtype) if unconstrained else p.to(dtype) * (1 - lr)) - lr * scale * a * x.to(dtype)
            for p, x, a in zip(ps, xs, alphas)]


def _ns_like_updates(dtype):
    """bf16 "Newton-Schulz results" as the optimizer holds them: views of batches, one transposed (a tall
    matrix's), one a conv kernel's (c_out, c_in, k, k) view of its (c_out, c_in k²) matrix."""
    gen = torch.Generator().manual_seed(11)
    batch = torch.randn(3, 7, 33, generator=gen).to(dtype)
    tall = torch.randn(2, 9, 40, generator=gen).to(dtype)
    conv = torch.randn(6, 4 * 9, generator=gen).to(dtype)
    return [batch[0], batch[2], tall[1].mT, conv.view(6, 4, 3, 3), torch.randn(5, generator=gen).to(dtype)]


@pytest.mark.parametrize("backend", dk.available_backends("cpu"))
@pytest.mark.parametrize("p_dtype,x_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float32), (torch.float64, torch.bfloat16)])
@pytest.mark.parametrize("unconstrained", [False, True])
@pytest.mark.parametrize("tensors", [False, True])
def test_apply_update(backend, p_dtype, x_dtype, unconstrained, tensors, monkeypatch):
    """p = p (1 - lr) - lr scale alpha_i X_i for updates of another dtype than the params (fp32 master
    weights, bf16 Newton-Schulz), strided and conv-shaped views, numbers or tensor lr and scale: params within
    the rule against the restatement in fp64 and in the params' dtype (X widened exactly), X only read. The
    Triton backend runs every 16/32-bit tensor in its kernels (fp64 params take the torch path)."""
    fu_op = importlib.import_module("disco_kernels.ops.fused_update")
    to_torch, real = [], fu_op._torch
    monkeypatch.setattr(fu_op, "_torch", lambda params, *a: (to_torch.extend(params), real(params, *a)))
    xs = _ns_like_updates(x_dtype)
    x_in = [x.clone() for x in xs]
    gen = torch.Generator().manual_seed(12)
    ps = [(torch.randn(x.shape, generator=gen) * 0.05).to(p_dtype) for x in xs]  # |p| ~ |lr scale alpha X|
    p_in = [p.clone() for p in ps]
    alphas = [math.sqrt(7 / 33), 0.5, math.sqrt(40 / 9), 1 / 3, 2.0]
    lr, scale = 0.1, 0.25
    apply_update(ps, xs, alphas, lr=torch.tensor(lr) if tensors else lr,
                        scale=torch.tensor(scale) if tensors else scale, unconstrained=unconstrained, backend=backend)
    step = dict(lr=float(torch.tensor(lr)) if tensors else lr, scale=scale, unconstrained=unconstrained)
    exact = apply_oracle(p_in, x_in, alphas, **step, dtype=torch.float64)
    plain = apply_oracle(p_in, x_in, alphas, **step, dtype=plain_dtype(p_dtype))
    for k, (p, e, pl) in enumerate(zip(ps, exact, plain)):
        assert p.dtype == p_dtype and p.shape == xs[k].shape
        assert_close(p, e, pl, p_dtype, what=f"params[{k}] {tuple(p.shape)}")
    assert all(torch.equal(x, x0) for x, x0 in zip(xs, x_in))
    if backend == "triton":
        assert len(to_torch) == (len(ps) if p_dtype == torch.float64 else 0)


def test_apply_update_errors():
    p = [torch.zeros(3, 3)]
    with pytest.raises(ValueError, match=r"^params, updates and alphas must have equal lengths, got 1, 1, 2$"):
        apply_update(p, p, [1.0, 2.0], lr=0.1)
    with pytest.raises(TypeError, match="^alphas must be a list of numbers, got Tensor$"):
        apply_update(p, p, torch.ones(1), lr=0.1)
    with pytest.raises(ValueError, match=r"^alphas\[0\] must be a finite number, got inf$"):
        apply_update(p, p, [math.inf], lr=0.1)
    with pytest.raises(ValueError, match=r"^updates\[0\] \(shape \(3,\), cpu\) must have the shape and device of "):
        apply_update(p, [torch.zeros(3)], [1.0], lr=0.1)
    apply_update([], [], [], lr=0.1)  # nothing to do


def test_fused_update_errors():
    p = [torch.zeros(3, 3)]
    with pytest.raises(ValueError, match="lmo must be"):
        dk.ops.fused_update(p, p, lmo="Spectral", lr=0.1)
    with pytest.raises(ValueError, match="equal lengths"):
        dk.ops.fused_update(p, [], lmo="Sign", lr=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_every_backend(backend):
    """Backend choice runs inside the custom ops, so tracing never probes Triton or the extension
    (importlib would break the graph); a forced backend traces as well as "auto"."""
    @torch.compile(fullgraph=True, backend="eager")
    def f(G, p, g):
        dk.ops.fused_update([p], [g], lmo="RowNorm", lr=0.1, backend=backend)
        return dk.ops.newton_schulz(G, backend=backend), dk.ops.power_iteration(G, backend=backend)[0]

    G, p, g = torch.randn(2, 24, 40), torch.randn(5, 6), torch.randn(5, 6)
    p_eager = p.clone()
    X, sigma = f(G, p, g)
    dk.ops.fused_update([p_eager], [g], lmo="RowNorm", lr=0.1, backend=backend)
    torch.testing.assert_close(X, dk.ops.newton_schulz(G, backend=backend))
    torch.testing.assert_close(sigma, dk.ops.power_iteration(G, backend=backend)[0])
    torch.testing.assert_close(p, p_eager)
