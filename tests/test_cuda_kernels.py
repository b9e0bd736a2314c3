"""CUDA kernels on a GPU vs the independent oracle (tests/oracle.py) under the tolerance rule
(tests/tolerances.py): odd shapes, batches, unaligned (offset) and non-contiguous storage, bf16/fp16/fp32,
>2^31 elements (``huge``). ``exact`` is the oracle in fp64 and ``plain`` the oracle in the storage (or
iteration) dtype, both from the same rounded inputs and on CPU copies. The fused update is launched through
disco_kernels/ops/fused_update_cuda.py with kinds, line dims and alphas; its oracle (``restate``, the contract
in plain torch), its check and why single-entry tensors are measured together and Sign ties untied are in
test_cuda_build.py, which also checks the host emulation of the same per-element math on CPU.
Run under compute-sanitizer with scripts/cuda_sanitizer.sh (see csrc/README.md)."""
import importlib

import pytest
import torch

import disco_kernels as dk
from disco_kernels import _backend
import oracle
from test_cuda_build import EPS, TINY, case_alpha, check_update, declared, restate, untie
from tolerances import assert_close, rel_err

fu_cuda = importlib.import_module("disco_kernels.ops.fused_update_cuda")

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PAIRS = [(d, d) for d in DTYPES] + [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                    (torch.bfloat16, torch.float32)]


@pytest.fixture(autouse=True)
def _needs_extension():
    if _backend.cuda_extension() is None:
        pytest.fail("a GPU run needs disco_kernels._C: install with nvcc available")


def offset(t: torch.Tensor) -> torch.Tensor:
    """A copy of t whose storage starts one element past a 16-byte boundary (scalar-load path)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    return flat.view(t.shape).copy_(t)


# ---------------------------------------------------------------- fused_update

UPDATE_CASES = [  # kind, line dim, shape
    ("sign", -1, (7, 129)), ("sign", -1, (1, 1)), ("sign", -1, (40000,)), ("sign", -1, ()),
    ("scaled", -1, (7, 129)), ("scaled", -1, (3, 64, 1024)), ("scaled", -1, (1, 1)), ("scaled", -1, (40001,)),
    ("line", -1, (7, 129)), ("line", -1, (129, 7)), ("line", -1, (3, 64, 1024)), ("line", -1, (129,)),
    ("line", -1, ()), ("line", -1, (1, 1)), ("line", -1, (64, 40)), ("line", -1, (5000, 1)),
    ("line", -2, (129, 7)), ("line", -2, (7, 129)), ("line", -2, (300, 256)), ("line", -2, (1000, 64)),
    ("line", -2, (2, 9, 16)), ("line", -2, (50, 1)), ("line", -2, (1, 9)),
]
STATES = [  # momentum, use_buf, light, unconstrained
    (1.0, False, False, False), (0.1, True, False, False), (0.1, True, False, True), (0.3, False, True, False),
    (1.0, False, True, False)]


def make_case(shape, dtypes, kind, dim, alpha, lr, scale, layout="contiguous"):
    """p (dtypes[0]), g and buf (dtypes[1]) on the GPU, with the update as large as p itself (so a wrong step
    factor shows in any dtype)."""
    g = torch.randn(shape, dtype=torch.float64)
    u = restate(torch.zeros(shape, dtype=torch.float64), g, None, kind=kind, dim=dim, alpha=alpha, lr=1.0,
                momentum=1.0, scale=1.0, unconstrained=True, light=False)[0]
    p = torch.randn(shape, dtype=torch.float64) * (lr * scale * u.abs().mean().clamp_min(1e-30))
    buf = torch.randn(shape, dtype=torch.float64)
    p, g, buf = p.to("cuda", dtypes[0]), g.to("cuda", dtypes[1]), buf.to("cuda", dtypes[1])
    if layout == "offset":
        p, g, buf = offset(p), offset(g), offset(buf)
    elif layout == "noncontiguous" and g.dim() >= 2:
        p, g, buf = (t.mT.contiguous().mT for t in (p, g, buf))
    return p, g, buf


def run_update(cases, *, kind, dims, alphas, lr, momentum, scale, unconstrained=False, light=False, use_buf,
               hyper=None, eps=EPS):
    """One fused_update_cuda.launch over the (p, g, buf) ``cases`` (bufs passed when ``use_buf``), checked by
    check_update (Sign's exact ties in buf untied first). ``hyper``: pass lr, momentum, scale as a device array."""
    ps, gs, bs = (list(x) for x in zip(*cases))
    if kind == "sign" and use_buf and not light:
        untie(gs, bs, momentum)
    before = [(p.clone(), g.clone(), b.clone() if use_buf else None) for p, g, b in zip(ps, gs, bs)]
    assert fu_cuda.unsupported(ps, gs, bs if use_buf else None, kind, dims, light) is None
    if hyper:
        h = torch.tensor([lr, momentum, scale], dtype=torch.float32, device="cuda")
        lr, momentum, scale = (float(x) for x in h.cpu())  # the fp32 values the kernel reads
        fu_cuda.launch(ps, gs, bs if use_buf else None, kind, dims, alphas, None, None, None, h, unconstrained, light,
                       eps)
    else:
        fu_cuda.launch(ps, gs, bs if use_buf else None, kind, dims, alphas, lr, momentum, scale, None, unconstrained,
                       light, eps)
    check_update(before, [(p, g, b if use_buf else None) for p, g, b in zip(ps, gs, bs)], kind=kind, dims=dims,
                 alphas=alphas, lr=lr, momentum=momentum, scale=scale, unconstrained=unconstrained, light=light,
                 eps=eps, hyper=bool(hyper))


@pytest.mark.parametrize("dtypes", [(d, d) for d in DTYPES], ids=lambda p: "-".join(str(d)[6:] for d in p))
@pytest.mark.parametrize("kind,dim,shape", UPDATE_CASES)
@pytest.mark.parametrize("momentum,use_buf,light,unconstrained", STATES)
def test_fused_update_vs_fp64(dtypes, kind, dim, shape, momentum, use_buf, light, unconstrained):
    """One tensor per call (a single-entry shape: TINY of them in one call, measured together)."""
    lr, scale = 0.2, 1.5
    n = TINY if torch.Size(shape).numel() == 1 else 1
    alpha = case_alpha(kind, dim, shape)
    cases = [make_case(shape, dtypes, kind, dim, alpha, lr, scale) for _ in range(n)]
    run_update(cases, kind=kind, dims=[dim] * n, alphas=[alpha] * n, lr=lr, momentum=momentum, scale=scale,
               unconstrained=unconstrained, light=light, use_buf=use_buf)


@pytest.mark.parametrize("dtypes", PAIRS[3:], ids=lambda p: "-".join(str(d)[6:] for d in p))
@pytest.mark.parametrize("kind,dim", [("scaled", -1), ("sign", -1), ("line", -1), ("line", -2)])
@pytest.mark.parametrize("momentum,use_buf,light", [(1.0, False, False), (0.1, True, False), (0.3, False, True)])
@pytest.mark.parametrize("layout", ["contiguous", "offset"])
def test_fused_update_mixed_dtypes(dtypes, kind, dim, momentum, use_buf, light, layout):
    """p of one dtype, g and buf of another: fp32 params stepped along a 16-bit Newton-Schulz result (kind
    "scaled", the apply pass), bf16 params with fp32 grads; vector and scalar loads."""
    lr, scale = 0.2, 1.5
    shapes = [(64, 128), (7, 129), (129, 8), (2, 9, 16), (3, 40000 // 3)] + [(1, 1)] * TINY
    alphas = [case_alpha(kind, dim, s) for s in shapes]
    cases = [make_case(s, dtypes, kind, dim, a, lr, scale, layout) for s, a in zip(shapes, alphas)]
    run_update(cases, kind=kind, dims=[dim] * len(shapes), alphas=alphas, lr=lr, momentum=momentum, scale=scale,
               light=light, use_buf=use_buf)


@pytest.mark.parametrize("layout", ["offset", "noncontiguous"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,dim", [("sign", -1), ("scaled", -1), ("line", -1), ("line", -2)])
@pytest.mark.parametrize("momentum,use_buf,light", [(0.1, True, False), (0.3, False, True)])
def test_fused_update_layouts(layout, dtype, kind, dim, momentum, use_buf, light):
    """One group of tensors, each one element past a 16-byte boundary or transposed in memory
    (p, g and buf; the mutated ones are written back)."""
    lr, scale = 0.2, 1.5
    shapes = [(64, 128), (7, 129), (129, 8), (2, 9, 16)] + [(1, 1)] * TINY
    alphas = [case_alpha(kind, dim, s) for s in shapes]
    cases = [make_case(s, (dtype, dtype), kind, dim, a, lr, scale, layout) for s, a in zip(shapes, alphas)]
    run_update(cases, kind=kind, dims=[dim] * len(shapes), alphas=alphas, lr=lr, momentum=momentum, scale=scale,
               light=light, use_buf=use_buf)


@pytest.mark.parametrize("norm,kwargs,shape", [
    ("RowNorm", {"normalized": True}, (7, 129)), ("RowNorm", {"normalized": True, "transpose": True}, (129, 7)),
    ("ColNorm", {"normalized": True}, (300, 256)), ("ColNorm", {"normalized": False, "transpose": True}, (1000, 64)),
    ("Sign", {"normalized": True}, (7, 129)), ("BiasRMS", {}, (129,))])
def test_fused_update_kinds_are_the_reference_norms(norm, kwargs, shape):
    """The reference norms as (kind, dim, alpha) (``declared``): the kernel's step is the oracle's Scion step."""
    kind, dim, alpha = declared(norm, shape, **kwargs)
    lr, scale = 0.2, 1.5
    p, g, _ = make_case(shape, (torch.float32,) * 2, kind, dim, alpha, lr, scale)
    p0, g0 = p.cpu().clone(), g.cpu().clone()
    fu_cuda.launch([p], [g], None, kind, [dim], [alpha], lr, 1.0, scale, None, False, False, EPS)
    exact, plain = (oracle.scion_step(p0.to(d), g0.to(d), lr=lr, scale=scale, norm=norm, norm_kwargs=kwargs)
                    for d in (torch.float64, torch.float32))
    assert_close(p.cpu(), exact, plain, what=f"{norm}({kwargs}) as kind {kind!r}, dim {dim}")


def test_fused_update_mixed_lists():
    """A list with tensors of every supported dtype pair: one launch per pair, each tensor updated once."""
    lr, scale = 0.2, 1.5
    cases, dims, alphas = [], [], []
    for s in ((33, 20), (8, 64)):
        for dtypes in PAIRS:
            for dim in (-1, -2):
                alphas.append(case_alpha("line", dim, s))
                dims.append(dim)
                cases.append(make_case(s, dtypes, "line", dim, alphas[-1], lr, scale))
    run_update(cases, kind="line", dims=dims, alphas=alphas, lr=lr, momentum=0.1, scale=scale, use_buf=True)


def test_fused_update_many_tensors_and_empty():
    """More tensors than one launch's table (128), empty tensors among them, one dtype per launch."""
    lr, scale = 0.1, 2.0
    shapes = [(3 + i % 5, 8 + i % 17) for i in range(300)]
    dims = [-1 if i % 3 else -2 for i in range(300)]
    alphas = [case_alpha("line", d, s) for d, s in zip(dims, shapes)]
    cases = [make_case(s, (torch.bfloat16,) * 2, "line", d, a, lr, scale) for s, d, a in zip(shapes, dims, alphas)]
    for at, shape in ((5, (0, 7)), (77, (7, 0)), (200, (0,))):
        cases.insert(at, tuple(torch.empty(shape, dtype=torch.bfloat16, device="cuda") for _ in range(3)))
        dims.insert(at, -2 if len(shape) == 2 else -1)
        alphas.insert(at, 1.0)
    run_update(cases, kind="line", dims=dims, alphas=alphas, lr=lr, momentum=0.5, scale=scale, use_buf=True)


@pytest.mark.parametrize("kind,dim", [("sign", -1), ("scaled", -1), ("line", -1), ("line", -2)])
@pytest.mark.parametrize("momentum,use_buf,light,unconstrained", STATES)
def test_fused_update_hyper_tensor(kind, dim, momentum, use_buf, light, unconstrained):
    """lr, momentum and scale read from a float32 device array (then ScionLight scales g also at momentum 1)."""
    lr, scale = 0.2, 1.5
    shapes = [(64, 128), (7, 129), (2, 9, 16)] + [(1, 1)] * TINY
    alphas = [case_alpha(kind, dim, s) for s in shapes]
    cases = [make_case(s, (torch.float32, torch.bfloat16), kind, dim, a, lr, scale) for s, a in zip(shapes, alphas)]
    run_update(cases, kind=kind, dims=[dim] * len(shapes), alphas=alphas, lr=lr, momentum=momentum, scale=scale,
               unconstrained=unconstrained, light=light, use_buf=use_buf, hyper=True)


def test_fused_update_in_a_cuda_graph():
    """The launch with a hyper array is captured in a CUDA graph; replays with new values written into the array
    (no recapture) step with those values."""
    groups = [("line", -1, (64, 40)), ("line", -2, (33, 20)), ("sign", -1, (7, 129))]
    lists = [[make_case(s, (torch.float32, torch.bfloat16), k, d, case_alpha(k, d, s), 0.1, 1.0) for _ in range(2)]
             for k, d, s in groups]
    hyper = torch.tensor([0.1, 0.2, 1.0], device="cuda")

    def step():
        for (kind, dim, shape), cases in zip(groups, lists):
            ps, gs, bs = (list(x) for x in zip(*cases))
            fu_cuda.launch(ps, gs, bs, kind, [dim] * 2, [case_alpha(kind, dim, shape)] * 2, None, None, None, hyper,
                           False, False, EPS)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for lr, momentum, scale in ((0.125, 0.25, 1.5), (0.05, 0.5, 2.0)):
        hyper.copy_(torch.tensor([lr, momentum, scale]))
        f32 = [float(x) for x in hyper.cpu()]
        for cases in lists:
            for _, g, b in cases:
                untie([g], [b], f32[1])
        before = [[tuple(t.clone() for t in c) for c in cases] for cases in lists]
        graph.replay()
        torch.cuda.synchronize()
        for (kind, dim, shape), b4, cases in zip(groups, before, lists):
            check_update(b4, cases, kind=kind, dims=[dim] * 2, alphas=[case_alpha(kind, dim, shape)] * 2, lr=f32[0],
                         momentum=f32[1], scale=f32[2], unconstrained=False, light=False, hyper=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,line", [(-1, "row"), (-2, "col")])
@pytest.mark.parametrize("vec", [True, False])
def test_fused_update_nonfinite_stays_in_its_line(dtype, dim, line, vec):
    """NaN in g poisons its own line (row-mode warp or column-mode strip) and nothing else; inf gives NaN at its
    own entry and a zero update on the rest of its line, as the contract."""
    shape = (40, 64) if vec else (40, 63)
    step = dict(lr=0.1, momentum=1.0, scale=1.0, unconstrained=False, light=False)
    alpha = case_alpha("line", dim, shape)
    for bad in (float("nan"), float("inf")):
        p, g, _ = make_case(shape, (dtype, dtype), "line", dim, alpha, 0.1, 1.0)
        g[1, 3] = bad
        p0, g0 = p.cpu().clone(), g.cpu().clone()
        fu_cuda.launch([p], [g], None, "line", [dim], [alpha], 0.1, 1.0, 1.0, None, False, False, EPS)
        want = restate(p0, g0, None, kind="line", dim=dim, alpha=alpha, **step)[0]
        plain = restate(p0, g0, None, kind="line", dim=dim, alpha=alpha, **step, dtypes=(dtype, dtype))[0]
        assert torch.equal(p.isnan().cpu(), want.isnan())
        assert want.isnan()[1, 3] and (want.isnan().sum() == (1 if bad > 0 else shape[1] if line == "row" else 40))
        ok = want.isfinite()
        assert_close(p.cpu()[ok], want[ok], plain[ok], dtype, what=f"the finite entries ({bad} in g)")


@pytest.mark.parametrize("kind", ["sign", "scaled"])
def test_fused_update_nonfinite_elementwise(kind):
    """Sign keeps NaN (and sign(inf) = 1); scaled passes NaN and inf through; no other entry is touched."""
    p = torch.zeros(4, 33, device="cuda")
    g = torch.randn(4, 33, device="cuda")
    g[1, 3], g[2, 5] = float("nan"), float("inf")
    fu_cuda.launch([p], [g], None, kind, None, [0.5], 0.1, 1.0, 1.0, None, False, False, EPS)
    assert p[1, 3].isnan() and p.isnan().sum() == 1
    assert p[2, 5] == (-0.05 if kind == "sign" else -float("inf")) and p.isinf().sum() == int(kind == "scaled")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,dim", [("sign", -1), ("scaled", -1), ("line", -1), ("line", -2)])
def test_fused_update_zero_grad_only_decays(dtype, kind, dim):
    """g = 0: every kind gives u = 0 (d / (0 + eps) = 0 for lines), so p' = (1 - lr) p once rounded.
    plain is that decay alone: plain fp16 cannot take the lines of 0 (its eps rounds to 0: 0 / 0)."""
    p = torch.randn(33, 72, device="cuda").to(dtype)
    p0 = p.cpu().clone()
    fu_cuda.launch([p], [torch.zeros_like(p)], None, kind, [dim], [0.3], 0.1, 1.0, 1.0, None, False, False, EPS)
    exact = restate(p0, torch.zeros_like(p0), None, kind=kind, dim=dim, alpha=0.3, lr=0.1, momentum=1.0, scale=1.0,
                    unconstrained=False, light=False)[0]
    assert_close(p.cpu(), exact, p0 * (1 - 0.1), what="p after a zero gradient")


@pytest.mark.parametrize("dim", [-1, -2])
@pytest.mark.parametrize("eps", [EPS, 0.25])
def test_fused_update_tiny_grads_see_the_eps(dim, eps):
    """Line norms of about eps: d / (||d|| alpha + eps) must add exactly the eps it is given, which at ordinary
    sizes is invisible (fp32; see also test_lines.py)."""
    lr, scale = 0.2, 1.5
    shapes = [(7, 129), (129, 7), (40, 33)] + ([(129,), (7,)] if dim == -1 else [])
    cases = []
    for s in shapes:
        p, g, buf = make_case(s, (torch.float32,) * 2, "line", dim, 1.0, lr, scale)
        tiny = eps / s[dim] ** 0.5
        cases.append((p, g * tiny, buf * tiny))
    run_update(cases, kind="line", dims=[dim] * len(shapes), alphas=[1.0] * len(shapes), lr=lr, momentum=0.1,
               scale=scale, use_buf=True, eps=eps)


def test_fused_update_runs_on_the_current_stream():
    s = torch.cuda.Stream()
    p, g, b = make_case((300, 256), (torch.bfloat16,) * 2, "line", -2, 0.1, 0.1, 1.0)
    before = [(p.clone(), g.clone(), b.clone())]
    s.wait_stream(torch.cuda.current_stream())  # p, g, b are written (and read for before) on the default stream
    with torch.cuda.stream(s):
        fu_cuda.launch([p], [g], [b], "line", [-2], [0.1], 0.1, 0.3, 1.0, None, False, False, EPS)
    s.synchronize()
    check_update(before, [(p, g, b)], kind="line", dims=[-2], alphas=[0.1], lr=0.1, momentum=0.3, scale=1.0,
                 unconstrained=False, light=False)


def needs_free_gpu_memory(gib):
    if torch.cuda.mem_get_info()[0] < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory")


HUGE_ROWS, HUGE_COLS = 2**31 // 4096 + 3, 4096  # 2^31 + 3 * 4096 elements


@pytest.mark.slow
@pytest.mark.parametrize("kind,dim", [("sign", -1), ("line", -1), ("line", -2)])
def test_fused_update_huge(kind, dim):
    """Past 2^31 elements (64-bit offsets): g = 1 except its last row (-2), p = 0, so every element of p'
    is one of two values (a first row's, the last row's), written once (a second write would scale it by
    1 - lr). The lines are independent, so the contract's step on a stand-in with the same lines gives both:
    for sign and rows the (2, C) matrix of a first and the last row; for columns one (R, 1) column with the
    same alpha."""
    needs_free_gpu_memory(12)
    lr, scale = 0.5, 1.0
    R, C = HUGE_ROWS, HUGE_COLS
    alpha = case_alpha(kind, dim, (R, C))
    p = torch.zeros(R, C, dtype=torch.bfloat16, device="cuda")
    g = torch.ones_like(p)
    g[-1] = -2
    fu_cuda.launch([p], [g], None, kind, [dim], [alpha], lr, 1.0, scale, None, False, False, EPS)
    assert (p[:-1] == p[0, 0]).all() and (p[-1] == p[-1, 0]).all()
    step = dict(kind=kind, alpha=alpha, lr=lr, momentum=1.0, scale=scale, unconstrained=False, light=False)
    if dim == -2:
        line = torch.ones(R, 1, dtype=torch.float64)
        line[-1] = -2
        pick = lambda t: t[[0, -1], 0]  # noqa: E731
    else:
        line = torch.tensor([[1.0] * C, [-2.0] * C], dtype=torch.float64)
        pick = lambda t: t[:, 0]  # noqa: E731
    exact, plain = (pick(restate(torch.zeros_like(line), line, None, dim=dim, **step, dtypes=(d, d))[0])
                    for d in (torch.float64, torch.bfloat16))
    assert_close(torch.stack([p[0, 0], p[-1, 0]]).cpu(), exact, plain, what="p' of the first rows and the last")


# ---------------------------------------------------------------- power_iteration

def start(W):
    """The documented start vector rounded to fp32, one per matrix of W."""
    n = W.size(-1)
    return oracle.start_vector(n).float().expand(*W.shape[:-2], n).contiguous().to(W.device)


def check_power_iteration(W, v0, iters, sigma, v):
    """(sigma, v) from ``iters`` iterations from v0 within the rule: the kernels read W exactly and compute
    in fp32, so plain is the oracle's iteration in fp32 on the same W and start."""
    W, v0 = W.cpu(), v0.cpu()
    (s64, v64), (s32, v32) = (oracle.power_iteration(W.to(d), v0.to(d), iters) for d in (torch.float64, torch.float32))
    assert_close(sigma.cpu(), s64, s32, what=f"sigma of {tuple(W.shape)} {W.dtype}")
    assert_close(v.cpu(), v64, v32, what=f"v of {tuple(W.shape)} {W.dtype}")


@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (129, 7), (3, 7, 129), (2, 300, 1000), (1, 20, 16384),
                                   (5, 64, 4000), (3, 50, 5001), (2, 33, 16383)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "offset", "noncontiguous"])
def test_power_iteration_vs_fp64(shape, dtype, layout):
    W = torch.randn(shape, dtype=torch.float64).to(device="cuda", dtype=dtype)
    if layout == "offset":
        W = offset(W)
    elif layout == "noncontiguous":
        W = W.mT.contiguous().mT
    sigma, v = dk.ops.power_iteration(W, start(W), iters=4, backend="cuda")
    assert sigma.dtype == torch.float32 and sigma.shape == shape[:-2] and v.shape == shape[:-2] + shape[-1:]
    check_power_iteration(W, start(W), 4, sigma, v)


def test_power_iteration_converges_and_warm_starts():
    W = torch.randn(3, 40, 60, device="cuda")
    sigma, v = dk.ops.power_iteration(W, iters=200, backend="cuda")
    exact = torch.linalg.matrix_norm(W.double(), ord=2)
    sigma2, _ = dk.ops.power_iteration(W, v, iters=1, backend="cuda")
    assert rel_err(sigma, exact) < 1e-3 and rel_err(sigma2, exact) < 1e-3
    zero_sigma, zero_v = dk.ops.power_iteration(torch.zeros(2, 5, 6, device="cuda"), v[:2, :6].contiguous(), iters=2,
                                                backend="cuda")
    assert (zero_sigma == 0).all() and torch.equal(zero_v, v[:2, :6])


def test_power_iteration_limits():
    with pytest.raises(ValueError, match="n <= 16384"):
        dk.ops.power_iteration(torch.randn(2, 16385, device="cuda"), backend="cuda")
    sigma, _ = dk.ops.power_iteration(torch.randn(2, 16385, device="cuda"))  # auto: another backend
    assert sigma.isfinite()


@pytest.mark.slow
def test_power_iteration_huge():
    """Past 2^31 elements: W = a 1ᵀ with a = (1, ..., 1, 1000) (last row past 2^31), so one iteration
    from any start with 1ᵀ v > 0 gives sigma = sqrt(n) ||a|| and v = 1 / sqrt(n) exactly; a wrapped offset
    would miss the 1000s. plain is the oracle's fp32 iteration on the same W (on the host, 8 GiB)."""
    needs_free_gpu_memory(6)
    W = torch.ones(1, HUGE_ROWS, HUGE_COLS, dtype=torch.bfloat16, device="cuda")
    W[0, -1] = 1000
    v0 = start(W)
    assert v0.sum() > 0
    sigma, v = dk.ops.power_iteration(W, v0, iters=1, backend="cuda")
    exact_sigma = torch.tensor([(HUGE_COLS * (HUGE_ROWS - 1 + 1000.0 ** 2)) ** 0.5], dtype=torch.float64)
    exact_v = torch.full((1, HUGE_COLS), HUGE_COLS ** -0.5, dtype=torch.float64)
    s32, v32 = oracle.power_iteration(W.cpu().float(), v0.cpu(), 1)
    assert_close(sigma.cpu(), exact_sigma, s32, what="sigma")
    assert_close(v.cpu(), exact_v, v32, what="v")


# ---------------------------------------------------------------- newton_schulz (fused small)

NS_SHAPES = [(1, 1), (7, 129), (129, 7), (3, 7, 129), (2, 16, 16), (4, 128, 128), (2, 100, 300), (2, 300, 100),
             (3, 48, 80), (2, 2, 5, 9)]


def check_newton_schulz(out, G, steps=5, coefficients="jordan", dtype=torch.bfloat16):
    """``out`` (NS of G in ``dtype``) within the rule: exact the oracle's fp64 iteration of G, plain the
    oracle iterating in ``dtype`` (on CPU)."""
    assert out.shape == G.shape and out.dtype == dtype and out.is_contiguous()
    G = G.cpu()
    assert_close(out.cpu(), oracle.newton_schulz(G.double(), steps, coefficients),
                 oracle.newton_schulz(G, steps, coefficients, dtype), dtype, what=f"NS of {tuple(G.shape)} {G.dtype}")


@pytest.mark.parametrize("shape", NS_SHAPES)
@pytest.mark.parametrize("in_dtype,dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                            (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                            (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("coefficients", ["jordan", "polar_express", [(3.0, -3.2, 1.2)]])
def test_newton_schulz_small_vs_fp64(shape, in_dtype, dtype, coefficients):
    """Error vs the fp64 iteration within the rule against the plain iteration in ``dtype``."""
    Gd = torch.randn(shape, dtype=torch.float64).to(in_dtype)
    check_newton_schulz(dk.ops.newton_schulz(Gd.cuda(), 5, coefficients, dtype=dtype, backend="cuda"), Gd, 5,
                        coefficients, dtype)


@pytest.mark.parametrize("layout", ["offset", "noncontiguous"])
@pytest.mark.parametrize("in_dtype,dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                            (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(3, 37, 90), (2, 90, 37)])
def test_newton_schulz_small_layouts(layout, in_dtype, dtype, shape):
    Gd = torch.randn(shape, dtype=torch.float64).to(device="cuda", dtype=in_dtype)
    Gd = offset(Gd) if layout == "offset" else Gd.mT.contiguous().mT
    check_newton_schulz(dk.ops.newton_schulz(Gd, 5, dtype=dtype, backend="cuda"), Gd, dtype=dtype)


@pytest.mark.parametrize("coefficients", ["jordan", "polar_express"])
def test_newton_schulz_small_norm_eps_of_a_tiny_g(coefficients):
    """||G||_F of 1e-6, the size of the schedule's eps (1e-7 jordan, 1e-6 polar_express): X0 = G / (mult ||G||_F
    + eps) must take the schedule's eps, which at ordinary sizes is invisible (fp32 G, bf16 iteration)."""
    G = torch.randn(2, 20, 33, device="cuda")
    G = G * (1e-6 / G.norm(dim=(-2, -1), keepdim=True))
    check_newton_schulz(dk.ops.newton_schulz(G, 5, coefficients, dtype=torch.bfloat16, backend="cuda"), G, 5,
                        coefficients)


def test_newton_schulz_small_special_values():
    assert dk.ops.newton_schulz(torch.zeros(2, 6, 9, device="cuda", dtype=torch.bfloat16), backend="cuda").abs().max() == 0
    G = torch.randn(5, 8, device="cuda", dtype=torch.bfloat16)
    G[1, 2] = float("nan")
    assert torch.isnan(dk.ops.newton_schulz(G, backend="cuda")).all()
    G = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
    check_newton_schulz(dk.ops.newton_schulz(G, steps=0, backend="cuda"), G, steps=0)  # X0 only


@pytest.mark.parametrize("s", [17, 65, 128])
def test_newton_schulz_small_largest_fitting(s):
    """The widest matrix the device's shared memory takes (odd width), wide and tall."""
    ext = _backend.cuda_extension()
    l = max(x for x in range(s, 4097) if ext.newton_schulz_small_fits(s, x, torch.cuda.current_device()))
    l -= (l + 1) % 2
    for shape in ((2, s, l), (2, l, s)):
        G = torch.randn(shape, dtype=torch.float64).to(torch.bfloat16)
        check_newton_schulz(dk.ops.newton_schulz(G.cuda(), 5, backend="cuda"), G)


@pytest.mark.slow
def test_newton_schulz_small_huge():
    """A batch of more than 2^31 elements: the last matrix is read and written at 64-bit offsets."""
    needs_free_gpu_memory(12)
    one = torch.randn(1, 128, 512, device="cuda", dtype=torch.bfloat16)
    G = one.expand(2**31 // (128 * 512) + 1, 128, 512).contiguous()
    G[-1] = -one[0]
    out = dk.ops.newton_schulz(G, 5, backend="cuda")
    first = dk.ops.newton_schulz(one, 5, backend="cuda")[0]
    assert torch.equal(out[0], first) and torch.equal(out[-2], first) and torch.equal(out[-1], -first)


def test_newton_schulz_dispatch_by_shape():
    big = torch.randn(129, 200, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"min\(m, n\) <= 128"):
        dk.ops.newton_schulz(big, backend="cuda")
    with pytest.raises(ValueError, match="shared memory"):
        dk.ops.newton_schulz(torch.randn(128, 4000, device="cuda", dtype=torch.bfloat16), backend="cuda")
    # auto takes another backend for big or fp32 problems, and still gets them right
    for G, dtype in ((big, torch.bfloat16), (torch.randn(64, 64, device="cuda"), torch.float32)):
        check_newton_schulz(dk.ops.newton_schulz(G, dtype=dtype), G, dtype=dtype)


def test_kernels_run_on_the_current_stream():
    s = torch.cuda.Stream()
    G = torch.randn(64, 32, 32, device="cuda", dtype=torch.bfloat16)
    s.wait_stream(torch.cuda.current_stream())  # G is written on the default stream
    v0 = start(G)
    with torch.cuda.stream(s):
        out = dk.ops.newton_schulz(G, backend="cuda")
        sigma, v = dk.ops.power_iteration(G.float(), v0, iters=3, backend="cuda")
    s.synchronize()
    check_newton_schulz(out, G)
    check_power_iteration(G.float(), v0, 3, sigma, v)
