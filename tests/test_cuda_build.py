"""CUDA extension on CPU: it imports without a driver, lists its kernels and archs, turns
failed launches into exceptions naming the kernel, and its host/device math (run on the host
through the bindings, in fp32) is within the tolerance rule (tests/tolerances.py) against the
independent oracle (tests/oracle.py): exact is the oracle in fp64 and plain the oracle in fp32, both
from the same fp32 inputs.

The fused update knows no norm: it takes a kind ("sign", "scaled", "line"), per tensor a line dim and a
factor alpha, and eps. Its oracle here is ``restate``, the contract written out in plain torch (from
ops/fused_update_cuda.py's docstring, not from the package's code); ``declared`` maps the reference norms
of tests/oracle.py to (kind, dim, alpha), so that the kinds are also checked against the oracle's LMOs.
The launch code (disco_kernels/ops/fused_update_cuda.py) runs here too, through a stand-in extension that
runs the host emulation on the CPU tensors behind the pointers.

The fused-update helpers here (the contract's step of a tensor, the check of a list of updated tensors)
serve test_cuda_kernels.py; per_matrix, norm_kwargs, oracle_lmo and untie serve test_triton_fused_update.py."""
import ctypes
import importlib
import math
import os
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch

import disco_kernels as dk
from disco_kernels import _backend
import oracle
from tolerances import assert_close, plain_dtype

fu_mod = importlib.import_module("disco_kernels.ops.fused_update")
fu_cuda = importlib.import_module("disco_kernels.ops.fused_update_cuda")
ns_mod = importlib.import_module("disco_kernels.ops.newton_schulz")
pi_mod = importlib.import_module("disco_kernels.ops.power_iteration")


TINY = 4  # single-entry tensors per check: one rounding's luck alone, so measured together
# Host NS and power iteration: draws per check, the error measured over all of them. The host sums in plain
# sequential fp32 loops; one draw's error against plain torch's (blocked sums) is then much a matter of luck.
DRAWS = 8
EPS = oracle.EPS  # the eps the tests pass to the fused update (the package passes reference.LINE_EPS)


# ---------------------------------------------------------------- the oracle's LMOs by norm name (shared)

def per_matrix(fn, lmo, *ts):
    """fn over each matrix of the last two dims of ``ts`` (0-D / 1-D: one (1, n) row, as the op documents),
    reassembled; BiasRMS takes the whole tensor (its rms is over dim 0)."""
    if lmo == "BiasRMS":
        return fn(*ts)
    shape = ts[0].shape
    mats = [t.reshape(shape[:-2].numel(), *(shape[-2:] if len(shape) >= 2 else (1, t.numel()))) for t in ts]
    return torch.stack([fn(*m) for m in zip(*mats)]).reshape(shape)


def norm_kwargs(lmo, normalized, transpose):
    return {"Sign": {"normalized": normalized}, "BiasRMS": {}}.get(
        lmo, {"normalized": normalized, "transpose": transpose})


def oracle_lmo(g, lmo, normalized, transpose):
    """The oracle's LMO of a tensor (per matrix, see ``per_matrix``), in g's dtype."""
    return per_matrix(lambda x: oracle.lmo(lmo, x, **norm_kwargs(lmo, normalized, transpose)), lmo, g)


def untie(grads, bufs, momentum):
    """Flip the sign of each buf entry b with (1 - momentum) b + momentum g = 0 in decimal arithmetic and
    g != 0 (momentum = k / q: (q - k) b + k g = 0, exact in fp64 for these inputs). Sign is discontinuous at
    d = 0, and there the sign is decided by how momentum itself is rounded (fp64 oracle vs fp32 kernel);
    16-bit values hit such ties (b = -9 g at momentum 0.9) every few thousand entries."""
    mom = Fraction(momentum).limit_denominator(1000)
    k, q = mom.numerator, mom.denominator
    for g, b in zip(grads, bufs):
        tie = ((q - k) * b.double() + k * g.double() == 0) & (g != 0)
        b.copy_(torch.where(tie, -b, b))


# ---------------------------------------------------------------- the fused update's contract, restated

def declared(norm, shape, **kwargs):
    """(kind, line dim, alpha) that the reference norm ``norm`` (with its constructor kwargs) amounts to on a
    tensor of ``shape``, written from DESIGN.md's formulas (d_out, d_in = shape of the 2-D weight)."""
    if norm == "Sign":
        return "sign", -1, 1 / shape[-1] if kwargs.get("normalized", True) else 1.0
    if norm == "BiasRMS":  # g / (||g|| / sqrt(n) + eps); a 0-D g over |g| + eps
        return "line", -1, 1 / math.sqrt(shape[0]) if shape else 1.0
    d_out, d_in = shape
    if norm == "RowNorm":  # rows over ||row|| (sqrt(d_in) when normalized); transpose: the columns, d_in = d_out
        normalized = kwargs.get("normalized", True)
        if kwargs.get("transpose", False):
            return "line", -2, math.sqrt(d_out) if normalized else 1.0
        return "line", -1, math.sqrt(d_in) if normalized else 1.0
    assert norm == "ColNorm"  # columns over ||col|| / sqrt(d_out) (times d_in when normalized); transpose: rows
    normalized = kwargs.get("normalized", False)
    if kwargs.get("transpose", False):
        return "line", -1, (d_out if normalized else 1) / math.sqrt(d_in)
    return "line", -2, (d_in if normalized else 1) / math.sqrt(d_out)


def line_norms(d, dim):
    """||line||_2 of d's lines, kept for broadcasting: dim -1 the rows of d seen as (numel / size(-1), size(-1))
    (a 0-D or 1-D d is one line), dim -2 the columns of each matrix of the last two dims."""
    if d.dim() == 0:
        return d.abs()
    return d.pow(2).sum(dim, keepdim=True).sqrt()


def restate(p, g, buf, *, kind, dim, alpha, lr, momentum, scale, unconstrained, light, eps=EPS, hyper=False,
            dtypes=(torch.float64, torch.float64)):
    """One fused-update step of one tensor by plain torch, p in dtypes[0] and g, buf in dtypes[1] (d moved to
    the wider of the two; a line's division in at least fp32, as the package's torch path): (p, g, buf) after it,
    buf None without one (no bufs, or light). ``hyper``: lr, momentum and scale came as a device array, so
    ScionLight scales g also at momentum 1."""
    pd, gd = dtypes
    p, g = p.to(pd), g.to(gd)
    d = g
    if buf is not None and not light:
        buf = d = buf.to(gd) * (1 - momentum) + g * momentum
    else:
        buf = None
    d = d.to(torch.promote_types(pd, gd))
    if kind == "sign":  # NaN kept (torch.sign maps NaN to 0 on the CPU)
        u = torch.where(d.isnan(), d, torch.sign(d)) * alpha
    elif kind == "scaled":
        u = d * alpha
    else:
        wide = d.to(torch.promote_types(d.dtype, torch.float32))
        u = (wide / (line_norms(wide, dim) * alpha + eps)).to(d.dtype)
    p = ((p if unconstrained else p * (1 - lr)) - lr * (scale * u)).to(pd)
    return p, (g * (1 - momentum) if light and (hyper or momentum != 1) else g), buf


def check_update(before, after, *, kind, dims, alphas, **step):
    """``before`` and ``after``: (p, g, buf) per tensor (buf None when none was passed) of one call with
    ``step`` (restate's keywords but dims, alphas and dtypes). Each written role within the rule against the
    contract in fp64 and in the storage dtypes from the same inputs, the single-entry tensors' entries
    together; the roles the step must not write (g unless ScionLight scales it, buf under ScionLight) unchanged."""
    singles = {}
    for i, (b4, now) in enumerate(zip(before, after)):
        b4, now = [t.cpu() if t is not None else None for t in b4], [t.cpu() if t is not None else None for t in now]
        kw = dict(step, kind=kind, dim=dims[i], alpha=alphas[i])
        exact = restate(*b4, **kw)
        plain = restate(*b4, **kw, dtypes=(plain_dtype(now[0].dtype), plain_dtype(now[1].dtype)))
        scales_g = step["light"] and (step.get("hyper", False) or step["momentum"] != 1)
        for role, t0, t1, e, p in zip(("params", "grads", "bufs"), b4, now, exact, plain):
            written = role == "params" or (role == "bufs" and e is not None) or (role == "grads" and scales_g)
            if not written:
                assert t0 is None or torch.equal(t1, t0), f"{role}[{i}] {tuple(t0.shape)} changed"
                continue
            assert t1.dtype == t0.dtype, f"{role}[{i}] changed dtype"
            if t1.numel() == 1:
                for acc, t in zip(singles.setdefault((role, t1.dtype), ([], [], [])), (t1, e, p)):
                    acc.append(t.reshape(1))
            else:
                assert_close(t1, e, p, what=f"{role}[{i}] {tuple(t1.shape)} {t1.dtype}")
    for (role, dtype), (fast, exact, plain) in singles.items():
        assert_close(torch.cat(fast), torch.cat(exact), torch.cat(plain), dtype,
                     what=f"{role}: {len(fast)} single-entry tensors ({dtype})")


def case_alpha(kind, dim, shape):
    """A factor that keeps u of order one: 1 / sqrt(line length) for lines (an RMS), 1 / size(-1) for sign."""
    if kind == "line":
        n = 1 if not shape else shape[-1] if dim == -1 else shape[-2]
        return 1 / math.sqrt(max(n, 1))
    return 1 / shape[-1] if kind == "sign" and shape else 0.7


def _nvcc_present():
    homes = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")
    return any(h and os.path.isfile(os.path.join(h, "bin", "nvcc")) for h in homes) or shutil.which("nvcc")


@pytest.fixture(scope="module")
def ext():
    mod = _backend.cuda_extension()
    if mod is None:
        if _nvcc_present() and os.environ.get("DISCO_BUILD_CUDA", "1") != "0":
            pytest.fail("nvcc is present but disco_kernels._C was not built")
        pytest.skip("disco_kernels._C not built (no nvcc)")
    return mod


def test_extension_lists_kernels_and_archs(ext):
    assert set(ext.kernels) == {"fused_update", "power_iteration", "newton_schulz"}
    archs = ext.cuda_archs.split(",")
    assert "sm_80" in archs and "sm_90a" in archs and any("PTX" in a for a in archs)
    assert "cuda" in fu_mod.KERNELS and "cuda" in ns_mod.KERNELS and "cuda" in pi_mod.KERNELS


def test_cli_prints_kernels(ext, capsys):
    from disco_kernels.__main__ import main
    main()
    out = capsys.readouterr().out
    assert "newton_schulz" in out and "fused_update" in out and ext.cuda_archs in out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_storage_rounding_matches_torch(ext, dtype):
    x = torch.randn(4096) * torch.logspace(-6, 6, 4096)
    # Exact ties of bf16/fp16 (round half to even) and special values.
    ties = torch.tensor([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 65520.0, 1e39, -0.0])
    x = torch.cat([x, ties, torch.tensor([float("inf"), float("nan")])]).float()
    got = torch.from_numpy(ext.host_round(ext.DTYPES[str(dtype)[6:]], x.numpy()))
    want = x.to(dtype).float()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])


DT = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
HOST_CASES = [  # kind, line dim, shape
    ("sign", -1, (7, 129)), ("sign", -1, (33,)), ("sign", -1, ()), ("sign", -1, (1, 1)),
    ("scaled", -1, (7, 129)), ("scaled", -1, (2, 5, 9)), ("scaled", -1, ()),
    ("line", -1, (7, 129)), ("line", -1, (129, 7)), ("line", -1, (129,)), ("line", -1, ()), ("line", -1, (1, 1)),
    ("line", -1, (2, 5, 9)), ("line", -1, (6, 1)),
    ("line", -2, (129, 7)), ("line", -2, (7, 129)), ("line", -2, (2, 5, 9)), ("line", -2, (40, 1)),
    ("line", -2, (1, 9)), ("line", -2, (1, 1)),
]
STATES = [  # momentum, use_buf, light, unconstrained
    (1.0, False, False, False), (0.1, True, False, False), (0.1, True, False, True), (0.3, False, True, False),
    (1.0, False, True, False)]


def host_step(ext, kind, dims, alphas, cases, *, lr, momentum, scale, unconstrained=False, light=False, use_buf,
              eps=EPS, hyper=None, dtypes=(torch.float32, torch.float32)):
    """The host emulation over the (p, g, buf) ``cases`` (tensors of ``dtypes``; bufs passed when ``use_buf``):
    (before, after) as check_update takes them."""
    before, after = [], []
    for (p, g, b), dim, alpha in zip(cases, dims, alphas):
        if kind == "sign" and use_buf and not light:
            untie([g], [b], momentum if hyper is None else float(hyper[1]))
        before.append((p.clone(), g.clone(), b.clone() if use_buf else None))
        p32, g32, b32 = (t.float().numpy().copy() for t in (p, g, b))
        ext.host_fused_update(ext.KINDS[kind], dim, alpha, list(p.shape), p32, g32, b32 if use_buf else None, lr=lr,
                              momentum=momentum, scale=scale, unconstrained=unconstrained, light=light, eps=eps,
                              hyper=hyper, p_dtype=ext.DTYPES[DT[dtypes[0]]], g_dtype=ext.DTYPES[DT[dtypes[1]]])
        back = [torch.from_numpy(a).to(d) for a, d in ((p32, dtypes[0]), (g32, dtypes[1]), (b32, dtypes[1]))]
        after.append((back[0], back[1], back[2] if use_buf else None))
    return before, after


def draw(shape, dtypes=(torch.float32, torch.float32)):
    """(p, g, buf) of ``shape``, p in dtypes[0] and g, buf in dtypes[1]."""
    return tuple(torch.randn(shape, dtype=torch.float64).to(d) for d in (dtypes[0], dtypes[1], dtypes[1]))


@pytest.mark.parametrize("kind,dim,shape", HOST_CASES)
@pytest.mark.parametrize("momentum,use_buf,light,unconstrained", STATES)
def test_host_fused_update_vs_fp64(ext, kind, dim, shape, momentum, use_buf, light, unconstrained):
    """The kernel's plan (line lengths and strides), scalars and per-element math, on the host in fp32, against
    the contract (a single-entry shape: TINY draws, measured together)."""
    step = dict(lr=0.3, momentum=momentum, scale=2.5, unconstrained=unconstrained, light=light)
    n = TINY if torch.Size(shape).numel() == 1 else 1
    alpha = case_alpha(kind, dim, shape)
    before, after = host_step(ext, kind, [dim] * n, [alpha] * n, [draw(shape) for _ in range(n)], use_buf=use_buf,
                              **step)
    check_update(before, after, kind=kind, dims=[dim] * n, alphas=[alpha] * n, **step)


NORMS = [  # reference norm, kwargs, shape
    ("Sign", {"normalized": True}, (7, 129)), ("Sign", {"normalized": False}, (7, 129)),
    ("RowNorm", {"normalized": True}, (7, 129)), ("RowNorm", {"normalized": False}, (129, 7)),
    ("RowNorm", {"normalized": True, "transpose": True}, (129, 7)),
    ("RowNorm", {"normalized": False, "transpose": True}, (7, 20)),
    ("ColNorm", {"normalized": False}, (129, 7)), ("ColNorm", {"normalized": True}, (7, 129)),
    ("ColNorm", {"normalized": True, "transpose": True}, (50, 24)),
    ("ColNorm", {"normalized": False, "transpose": True}, (9, 33)),
    ("BiasRMS", {}, (129,)), ("BiasRMS", {}, ()),
]


@pytest.mark.parametrize("norm,kwargs,shape", NORMS)
def test_host_fused_update_kinds_are_the_reference_norms(ext, norm, kwargs, shape):
    """Each reference LMO of the oracle is a kind with a line dim and an alpha (``declared``): the emulated step
    with them is the oracle's Scion step (oracle.scion_step) with that norm."""
    kind, dim, alpha = declared(norm, shape, **kwargs)
    lr, scale = 0.3, 2.5
    n = TINY if torch.Size(shape).numel() == 1 else 1
    cases = [draw(shape) for _ in range(n)]
    _, after = host_step(ext, kind, [dim] * n, [alpha] * n, cases, lr=lr, momentum=1.0, scale=scale, use_buf=False)
    fast = torch.cat([a[0].flatten() for a in after])
    exact, plain = (torch.cat([oracle.scion_step(p.to(d), g.to(d), lr=lr, scale=scale, norm=norm,
                                                 norm_kwargs=kwargs).flatten() for p, g, _ in cases])
                    for d in (torch.float64, torch.float32))
    assert_close(fast, exact, plain, what=f"{norm}({kwargs}) as kind {kind!r}, dim {dim}, alpha {alpha:.4g}")


@pytest.mark.parametrize("kind,dim,shape", [("scaled", -1, (7, 129)), ("scaled", -1, (1, 1)), ("line", -1, (7, 129)),
                                            ("line", -2, (129, 7)), ("sign", -1, (33, 8))])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float16)])
@pytest.mark.parametrize("momentum,use_buf,light", [(1.0, False, False), (0.1, True, False), (0.3, False, True)])
def test_host_fused_update_storage_dtypes(ext, kind, dim, shape, dtypes, momentum, use_buf, light):
    """p of one dtype, g and buf of another (fp32 params stepped along a bf16 Newton-Schulz result, kind
    "scaled"), or both 16-bit: the emulation rounds buf' to g's dtype before using it, and p' and g' once, as
    the kernel stores them; within the rule against the contract in the storage dtypes."""
    step = dict(lr=0.3, momentum=momentum, scale=2.5, unconstrained=False, light=light)
    n = TINY if torch.Size(shape).numel() == 1 else 1
    alpha = case_alpha(kind, dim, shape)
    before, after = host_step(ext, kind, [dim] * n, [alpha] * n, [draw(shape, dtypes) for _ in range(n)],
                              use_buf=use_buf, dtypes=dtypes, **step)
    check_update(before, after, kind=kind, dims=[dim] * n, alphas=[alpha] * n, **step)
    if use_buf and dtypes[0] == torch.float32:  # d is buf' as stored (rounded to g's dtype), not fp32's buf'
        along = dict(step, kind=kind, dim=dim, alpha=alpha, momentum=1.0)
        fast, exact, plain = (torch.cat([t.flatten() for t in ts]) for ts in zip(*[
            (p1, restate(p0, b1, None, **along)[0], restate(p0, b1, None, **along, dtypes=(torch.float32,) * 2)[0])
            for (p0, _, _), (p1, _, b1) in zip(before, after)]))
        assert_close(fast, exact, plain, what="p' along buf' as stored")


def test_host_fused_update_update_is_visible(ext):
    """A wrong step factor would show: p starts at 0, so p' = -lr * scale * u (RowNorm(normalized) of the oracle)."""
    g32 = torch.randn(5, 40, dtype=torch.float64).float()
    p32 = np.zeros((5, 40), np.float32)
    ext.host_fused_update(ext.KINDS["line"], -1, math.sqrt(40), [5, 40], p32, g32.numpy().copy(), None, lr=0.5,
                          momentum=1.0, scale=3.0, eps=EPS)
    exact, plain = (-1.5 * oracle.rownorm(g32.to(d), normalized=True) for d in (torch.float64, torch.float32))
    assert_close(torch.from_numpy(p32), exact, plain, what="p' = -lr scale RowNorm(g)")


@pytest.mark.parametrize("dim,shape,line", [(-1, (6, 9), (1,)), (-2, (6, 9), (slice(None), 1)), (-1, (17,), ()),
                                            (-1, (), ()), (-1, (9, 1), (1,)), (-2, (2, 9, 1), (0,)),
                                            (-2, (2, 3, 4), (1, slice(None), 2))])
def test_host_fused_update_zero_lines_only_decay(ext, dim, shape, line):
    """A zero line maps to 0 (0 / (0 + eps), not 0 / 0): its entries of p only decay, exactly; the other lines
    are stepped as usual."""
    p, g, b = draw(shape)
    g[line] = 0
    zero = g == 0
    step = dict(lr=0.25, momentum=1.0, scale=2.0, unconstrained=False, light=False)
    before, after = host_step(ext, "line", [dim], [1.3], [(p, g, b)], use_buf=False, **step)
    assert torch.equal(after[0][0][zero], p[zero] * 0.75)
    check_update(before, after, kind="line", dims=[dim], alphas=[1.3], **step)


@pytest.mark.parametrize("dim,shape", [(-1, (7, 129)), (-2, (129, 7)), (-1, (33,))])
@pytest.mark.parametrize("eps", [EPS, 0.25])
def test_host_fused_update_takes_eps(ext, dim, shape, eps):
    """Lines of norm about eps (1e-8 scaled gradients for EPS; unit ones for 0.25): d / (||d|| alpha + eps) must
    add exactly the eps it is given, which at ordinary sizes is invisible."""
    lr, scale = 0.2, 1.5
    p, g, b = draw(shape)
    tiny = eps / math.sqrt(shape[dim])
    g, b = g * tiny, b * tiny
    p = p * lr * scale * 0.5
    step = dict(lr=lr, momentum=0.1, scale=scale, unconstrained=False, light=False, eps=eps)
    before, after = host_step(ext, "line", [dim], [1.0], [(p, g, b)], use_buf=True, **step)
    check_update(before, after, kind="line", dims=[dim], alphas=[1.0], **step)
    if eps == 0.25:  # and is not the 1e-8 of the reference
        other = restate(*before[0], kind="line", dim=dim, alpha=1.0, **dict(step, eps=EPS))[0]
        assert (after[0][0].double() - other).norm() > 0.1 * other.norm()


@pytest.mark.parametrize("kind,dim,shape", [("line", -1, (7, 129)), ("line", -2, (6, 9)), ("sign", -1, (33,)),
                                            ("scaled", -1, (4, 5))])
@pytest.mark.parametrize("momentum,use_buf,light,unconstrained", STATES)
def test_host_fused_update_hyper_array(ext, kind, dim, shape, momentum, use_buf, light, unconstrained):
    """lr, momentum and scale read from a float32 array (the kernel's device array): bit for bit the step with
    those fp32 values as plain numbers (the plain ones are then not read: NaN here), except that ScionLight then
    scales g also at momentum 1; within the rule against the contract."""
    lr, scale = 0.3, 2.5
    hyper = np.array([lr, momentum, scale], np.float32)
    lr32, m32, s32 = (float(x) for x in hyper)
    alpha = case_alpha(kind, dim, shape)
    case = draw(shape)
    common = dict(unconstrained=unconstrained, light=light, use_buf=use_buf)
    before, after = host_step(ext, kind, [dim], [alpha], [case], lr=math.nan, momentum=math.nan, scale=math.nan,
                              hyper=hyper, **common)
    _, plain_numbers = host_step(ext, kind, [dim], [alpha], [tuple(t.clone() for t in before[0][:2]) + (case[2],)],
                                 lr=lr32, momentum=m32, scale=s32, **common)
    for role, t1, t2 in zip(("p", "g", "buf"), after[0], plain_numbers[0]):
        if role == "g" and light and momentum == 1:
            assert torch.equal(t1, before[0][1] * 0) and torch.equal(t2, before[0][1])
        elif t1 is not None:
            assert torch.equal(t1, t2), role
    check_update(before, after, kind=kind, dims=[dim], alphas=[alpha], lr=lr32, momentum=m32, scale=s32,
                 unconstrained=unconstrained, light=light, hyper=True)


@pytest.mark.parametrize("kind,dim", [("line", -1), ("line", -2), ("sign", -1), ("scaled", -1)])
def test_host_fused_update_nonfinite_stays_in_its_line(ext, kind, dim):
    """NaN in g poisons its own line (line kind) or entry and nothing else; inf gives NaN at its own entry and a
    zero update on the rest of its line (line kind), a finite step elsewhere (sign: sign(inf) = 1)."""
    shape = (6, 9)
    step = dict(lr=0.1, momentum=1.0, scale=1.0, unconstrained=False, light=False)
    for bad in (float("nan"), float("inf")):
        p, g, b = draw(shape)
        g[1, 3] = bad
        before, after = host_step(ext, kind, [dim], [0.5], [(p, g, b)], use_buf=False, **step)
        want = restate(*before[0], kind=kind, dim=dim, alpha=0.5, **step)[0]
        got = after[0][0]
        assert torch.equal(got.isnan(), want.isnan())
        n_nan = (9 if dim == -1 else 6) if kind == "line" and bad != bad else 1 if kind == "line" or bad != bad else 0
        assert want.isnan().sum() == n_nan and want.isinf().sum() == (1 if kind == "scaled" and bad > 0 else 0)
        assert torch.equal(got.isinf(), want.isinf())
        ok = want.isfinite()
        plain = restate(*before[0], kind=kind, dim=dim, alpha=0.5, **step, dtypes=(torch.float32,) * 2)[0]
        assert_close(got[ok], want[ok], plain[ok], torch.float32, what=f"the finite entries ({bad} in g)")


@pytest.mark.parametrize("dim,shape", [(-1, (6, 9)), (-2, (6, 9)), (-1, (17,))])
def test_host_fused_update_takes_huge_gradients(ext, dim, shape):
    """fp64 sums of squares: a 1e30 fp32 gradient (its squares overflow fp32) steps as its scaled-down self."""
    g = torch.randn(shape, dtype=torch.float64)
    p32, g32 = np.zeros(shape, np.float32), (g * 1e30).float().numpy()
    ext.host_fused_update(ext.KINDS["line"], dim, 0.5, list(shape), p32, g32, None, lr=1.0, momentum=1.0, scale=1.0,
                          unconstrained=True, eps=EPS)
    scaled = torch.from_numpy(g32).double() * 1e-20  # norms ~1e10: the eps below fp64's rounding
    exact, plain = (restate(torch.zeros(shape), scaled, None, kind="line", dim=dim, alpha=0.5, lr=1.0, momentum=1.0,
                            scale=1.0, unconstrained=True, light=False, dtypes=(d, d))[0]
                    for d in (torch.float64, torch.float32))
    assert torch.from_numpy(p32).isfinite().all() and torch.from_numpy(p32).abs().max() > 0
    assert_close(torch.from_numpy(p32), exact, plain)


def test_fused_update_plan_errors_are_value_errors(ext):
    p = np.zeros(5, np.float32)
    run = lambda kind, dim, shape, a=p, **kw: ext.host_fused_update(  # noqa: E731
        kind, dim, 1.0, shape, a, a.copy(), None, lr=0.1, momentum=1.0, scale=1.0, eps=EPS, **kw)
    with pytest.raises(ValueError, match=r"lines along dim -2 need a tensor of at least 2 dims, got shape \(5,\)"):
        run(ext.KINDS["line"], -2, [5])
    with pytest.raises(ValueError, match="the line dim must be -1 or -2, got 0"):
        run(ext.KINDS["line"], 0, [5])
    with pytest.raises(ValueError, match="unknown kind code 7"):
        run(7, -1, [5])
    with pytest.raises(ValueError, match="float32"):
        run(ext.KINDS["sign"], -1, [5], p.astype(np.float64))
    with pytest.raises(ValueError, match="unsupported dtype codes"):
        run(ext.KINDS["sign"], -1, [5], p_dtype=ext.DTYPES["float16"], g_dtype=ext.DTYPES["bfloat16"])
    with pytest.raises(ValueError, match="hyper must hold 3 values"):
        run(ext.KINDS["sign"], -1, [5], hyper=np.zeros(2, np.float32))
    run(ext.KINDS["sign"], 3, [5])  # the dim is read for the line kind only


def test_fused_update_pairs_agree(ext):
    """The launch module's dtype pairs are those the extension is built for, and include what the contract
    asks for: equal dtypes, fp32 params with 16-bit grads, bf16 params with fp32 grads."""
    built = {(getattr(torch, p), getattr(torch, g)) for p, g in ext.FUSED_UPDATE_PAIRS}
    assert built == set(fu_cuda.PAIRS)
    assert {(d, d) for d in fu_cuda.DTYPES} | {(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                             (torch.bfloat16, torch.float32)} <= built
    assert set(ext.KINDS) == set(fu_cuda.KINDS)


def start(b, n):
    """The documented start vector rounded to fp32, for each of b matrices."""
    return oracle.start_vector(n).float().expand(b, n).contiguous()


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 129), (1, 129, 7), (3, 7, 29)])
def test_host_power_iteration_vs_fp64(ext, shape):
    """Four iterations from the documented start, DRAWS matrices of ``shape`` (one call each)."""
    out, exact, plain = ([], []), ([], []), ([], [])
    v0 = start(shape[0], shape[-1])
    for _ in range(DRAWS):
        W = torch.randn(shape, dtype=torch.float64).float()
        for acc, res in zip((out, exact, plain), (ext.host_power_iteration(W.numpy(), v0.numpy(), 4),
                                                  oracle.power_iteration(W.double(), v0.double(), 4),
                                                  oracle.power_iteration(W, v0, 4))):
            for a, t in zip(acc, res):
                a.append(torch.as_tensor(t).flatten())
    for k, what in enumerate(("sigma", "v")):
        assert_close(torch.cat(out[k]), torch.cat(exact[k]), torch.cat(plain[k]), what=f"{what} of {DRAWS} x {shape}")


def test_host_power_iteration_zero_keeps_v(ext):
    v0 = start(2, 4).numpy()
    sigma, v = ext.host_power_iteration(np.zeros((2, 3, 4), np.float32), v0, 2)
    assert (sigma == 0).all() and np.array_equal(v, v0)


def test_host_power_iteration_nan_reaches_sigma(ext):
    """A diverged (NaN) matrix must not read as sigma = 0; its neighbour in the batch is unaffected."""
    W = torch.randn(2, 5, 6)
    W[0, 2, 3] = float("nan")
    v0 = start(2, 6)
    sigma, _ = ext.host_power_iteration(W.numpy(), v0.numpy(), 2)
    sigma_ref, _ = oracle.power_iteration(W.double(), v0.double(), 2)
    assert np.isnan(sigma[0]) and sigma_ref[0].isnan() and np.isfinite(sigma[1])


def host_newton_schulz(ext, G, coefficients, steps=5):
    triples, mult, eps = oracle.schedule(coefficients, steps)
    return torch.from_numpy(ext.host_newton_schulz(G.numpy(), [x for t in triples for x in t], mult, eps))


@pytest.mark.parametrize("shape", [(1, 1), (7, 29), (29, 7), (16, 16)])
@pytest.mark.parametrize("coefficients", ["jordan", "polar_express", [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]])
def test_host_newton_schulz_vs_fp64(ext, shape, coefficients):
    """Normalisation, tall-matrix indexing and the (a, b, c) order the op passes to the kernel (DRAWS draws)."""
    Gs = [torch.randn(shape, dtype=torch.float64).float() for _ in range(DRAWS)]
    out = torch.cat([host_newton_schulz(ext, G, coefficients).flatten() for G in Gs])
    exact = torch.cat([oracle.newton_schulz(G.double(), 5, coefficients).flatten() for G in Gs])
    plain = torch.cat([oracle.newton_schulz(G, 5, coefficients).flatten() for G in Gs])
    assert_close(out, exact, plain, what=f"host NS of {len(Gs)} x {shape}")


@pytest.mark.parametrize("coefficients", ["jordan", "polar_express"])
def test_host_newton_schulz_norm_eps_of_a_tiny_g(ext, coefficients):
    """||G||_F of 1e-6, the size of the schedule's eps (1e-7 jordan, 1e-6 polar_express): X0 = G / (mult ||G||_F
    + eps) must take the schedule's eps, which at ordinary sizes is invisible."""
    G = torch.randn(DRAWS, 7, 29, dtype=torch.float64)
    G = (G * (1e-6 / G.norm(dim=(-2, -1), keepdim=True))).float()
    out = torch.stack([host_newton_schulz(ext, g, coefficients) for g in G])
    assert_close(out, oracle.newton_schulz(G.double(), 5, coefficients), oracle.newton_schulz(G, 5, coefficients),
                 what=f"host NS of {DRAWS} tiny G")


def test_launch_errors_name_the_kernel(ext):
    """Shared memory beyond any GPU's limit: the launcher reports it, naming the kernel (with or without a GPU)."""
    with pytest.raises(RuntimeError, match="newton_schulz_small_kernel"):
        ext.newton_schulz_small(1, 1, 0, 0, 1, 128, 2000, [3.4445, -4.775, 2.0315], 1.0, 1e-7, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver path; on a GPU the launch would run")
def test_launches_without_driver_raise(ext):
    with pytest.raises(RuntimeError, match="power_iteration pass_kernel"):
        ext.power_iteration(1, 0, 1, 8, 8, 0, 0, 0, 0, 1, 0)
    with pytest.raises(RuntimeError, match="fused_update_kernel"):
        ext.fused_update(0, 0, 2, False, False, False, 0.1, 1.0, 1.0, 0, 1e-8, [0], [0], [0], [[4, 4]], [-1], [1.0], 0)


def test_binding_argument_checks(ext):
    with pytest.raises(ValueError, match="min\\(m, n\\) must be <= 128"):
        ext.newton_schulz_small(1, 1, 0, 0, 1, 129, 300, [1.0, 0.0, 0.0], 1.0, 1e-7, 0)
    with pytest.raises(ValueError, match="n <= 16384"):
        ext.power_iteration(1, 0, 1, 8, 16385, 0, 0, 0, 0, 1, 0)
    with pytest.raises(ValueError, match="unknown kind code 9"):
        ext.fused_update(0, 0, 9, False, False, False, 0.1, 1.0, 1.0, 0, 1e-8, [0], [0], [0], [[4]], [-1], [1.0], 0)
    with pytest.raises(ValueError, match="unsupported dtype codes"):
        ext.fused_update(2, 1, 2, False, False, False, 0.1, 1.0, 1.0, 0, 1e-8, [0], [0], [0], [[4]], [-1], [1.0], 0)
    with pytest.raises(ValueError, match="equal lengths"):
        ext.fused_update(0, 0, 2, False, False, False, 0.1, 1.0, 1.0, 0, 1e-8, [0], [0], [0], [[4]], [], [1.0], 0)


def test_negative_sizes_are_value_errors(ext):
    """A negative size reaching a kernel would index before its buffers (pass_kernel writes out[n])."""
    for m, n in ((-1, 8), (8, -1)):
        with pytest.raises(ValueError, match="power_iteration: sizes must be non-negative"):
            ext.power_iteration(1, 0, 1, m, n, 0, 0, 0, 0, 1, 0)
        with pytest.raises(ValueError, match="newton_schulz_small: sizes must be non-negative"):
            ext.newton_schulz_small(1, 1, 0, 0, 1, m, n, [1.0, 0.0, 0.0], 1.0, 1e-7, 0)
    with pytest.raises(ValueError, match=r"negative size in shape \(-2, -3\)"):
        ext.fused_update(0, 0, 2, False, False, False, 0.1, 1.0, 1.0, 0, 1e-8, [0], [0], [0], [[-2, -3]], [-1], [1.0], 0)


def test_runtime_status(ext):
    """The statically linked runtime reports whether it can run here: '' exactly when torch sees a GPU
    (no driver, an old driver or no device each give the runtime's error)."""
    status = ext.runtime_status()
    assert isinstance(status, str) and (status == "") == torch.cuda.is_available(), status
    assert ext.cuda_runtime_version >= 12000


def test_op_dispatch_on_cpu(ext):
    G = torch.randn(8, 8)
    with pytest.raises(RuntimeError, match="CUDA kernels need a CUDA tensor"):
        dk.ops.newton_schulz(G, backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA kernels need a CUDA tensor"):
        dk.ops.power_iteration(G, backend="cuda")
    assert_close(dk.ops.newton_schulz(G), oracle.newton_schulz(G.double()), oracle.newton_schulz(G))  # auto


def test_newton_schulz_cuda_limits_explained(ext):
    why = ns_mod.cuda_unsupported(torch.empty(129, 300), torch.bfloat16, 5)
    assert "min(m, n) <= 128" in why and "(129, 300)" in why
    assert "bfloat16 or float16" in ns_mod.cuda_unsupported(torch.empty(8, 8), torch.float32, 5)
    assert "at most 64 steps" in ns_mod.cuda_unsupported(torch.empty(8, 8), torch.bfloat16, 65)
    assert "bfloat16" in str(ns_mod.cuda_unsupported(torch.empty(8, 8, dtype=torch.float64), torch.bfloat16, 5))


def test_fused_update_cuda_limits_explained():
    """fused_update_cuda.unsupported names what the kernel cannot take (no extension or GPU needed)."""
    e = torch.empty
    why = fu_cuda.unsupported
    p = [e(4, 4)]
    assert why(p, [e(4, 4)], [e(4, 4)], "line", [-1], False) is None
    assert why(p, [e(4, 4, dtype=torch.bfloat16)], None, "scaled", None, False) is None  # fp32 p, bf16 X
    assert why([e(4, 4, dtype=torch.bfloat16)], [e(4, 4)], [e(4, 4)], "sign", None, False) is None
    assert "no kind 'spectral'" in why(p, p, None, "spectral", [-1], False)
    assert "(float32, bfloat16)" in why([e(4, dtype=torch.float16)], [e(4, dtype=torch.bfloat16)], None, "sign",
                                        None, False)
    assert "float64" in why([e(4, dtype=torch.float64)], [e(4, dtype=torch.float64)], None, "sign", None, False)
    assert "shape and device of params[0]" in why(p, [e(4, 5)], None, "sign", None, False)
    assert "grads[0]'s dtype (bfloat16)" in why(p, [e(4, 4, dtype=torch.bfloat16)], [e(4, 4)], "scaled", None, False)
    assert why(p, [e(4, 4, dtype=torch.bfloat16)], [e(4, 4)], "scaled", None, True) is None  # light: bufs unread
    assert "bufs" in why(p, p, [e(4, 4), e(4, 4)], "sign", None, False)
    assert "at least 2 dims" in why([e(4)], [e(4)], None, "line", [-2], False)
    assert why([e(4)], [e(4)], None, "line", [-1], False) is None and why([e(())], [e(())], None, "line", [-1],
                                                                          False) is None
    assert "dim -1 or -2" in why(p, p, None, "line", [0], False)
    assert "one line dim per param" in why(p, p, None, "line", None, False)
    assert why([e(2, 3, 4)], [e(2, 3, 4)], None, "line", [-2], False) is None  # columns of each matrix
    two = [e(4, 4), e(4, 4, device="meta")]
    assert "one device" in why(two, two, None, "sign", None, False)


class HostExtension:
    """The extension with fused_update replaced by a stand-in that records each launch and, for float32 tensors,
    runs the host emulation on the CPU memory behind the pointers (so launch() runs end to end on CPU)."""

    def __init__(self, ext, emulate=True):
        self.ext, self.emulate, self.calls = ext, emulate, []
        self.DTYPES, self.KINDS = ext.DTYPES, ext.KINDS

    def fused_update(self, p_dtype, g_dtype, kind, unconstrained, light, has_buf, lr, momentum, scale, hyper, eps,
                     p, g, buf, shapes, dims, alphas, stream):
        self.calls.append(dict(p_dtype=p_dtype, g_dtype=g_dtype, kind=kind, has_buf=has_buf, hyper=hyper, eps=eps,
                               shapes=shapes, dims=dims, alphas=alphas, stream=stream, p=p))
        if not self.emulate:
            return
        assert p_dtype == g_dtype == self.DTYPES["float32"]

        def view(ptr, n):
            return np.ctypeslib.as_array((ctypes.c_float * n).from_address(ptr))

        hy = view(hyper, 3).copy() if hyper else None
        for i, shape in enumerate(shapes):
            n = math.prod(shape)
            if n:
                self.ext.host_fused_update(kind, dims[i], alphas[i], shape, view(p[i], n), view(g[i], n),
                                           view(buf[i], n) if has_buf else None, lr=lr, momentum=momentum,
                                           scale=scale, unconstrained=unconstrained, light=light, eps=eps, hyper=hy)


@pytest.mark.parametrize("light,use_buf,momentum", [(False, True, 0.2), (True, False, 0.3), (False, False, 1.0)])
@pytest.mark.parametrize("use_hyper", [False, True])
def test_launch_on_cpu_through_the_emulation(ext, monkeypatch, light, use_buf, momentum, use_hyper):
    """launch(): one tensor table per dtype pair, dims and alphas per tensor in order, eps passed on,
    non-contiguous p, g and buf through copies written back (g only when ScionLight scales it), hyper as a
    pointer whose values replace lr, momentum and scale; the result is the contract's step."""
    fake = HostExtension(ext)
    monkeypatch.setattr(_backend, "cuda_extension", lambda: fake)
    lr, scale = 0.25, 1.5
    shapes, dims = [(7, 9), (9, 7), (5,), (), (3, 0), (2, 4, 6)], [-1, -2, -1, -1, -2, -2]
    cases = [draw(s) for s in shapes]
    cases[1] = tuple(t.mT.contiguous().mT for t in cases[1])  # non-contiguous p, g, buf
    cases[5] = tuple(t.transpose(0, 2).contiguous().transpose(0, 2) for t in cases[5])
    alphas = [0.5, 1.25, 2.0, 1.0, 1.0, 0.75]
    before = [(p.clone(), g.clone(), b.clone() if use_buf else None) for p, g, b in cases]
    ps, gs, bs = (list(x) for x in zip(*cases))
    hyper = torch.tensor([lr, momentum, scale]) if use_hyper else None
    fu_cuda.launch(ps, gs, bs if use_buf else None, "line", dims, alphas, None if use_hyper else lr,
                   None if use_hyper else momentum, None if use_hyper else scale, hyper, False, light, 0.125)
    (call,) = fake.calls
    assert call["dims"] == dims and call["alphas"] == alphas and call["eps"] == 0.125 and call["stream"] == 0
    assert call["shapes"] == [list(s) for s in shapes] and call["has_buf"] == use_buf
    assert (call["hyper"] != 0) == use_hyper
    assert call["p"][0] == ps[0].data_ptr() and call["p"][1] != ps[1].data_ptr()  # the copy of a transposed p
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    step = dict(lr=f32(lr), momentum=f32(momentum), scale=f32(scale)) if use_hyper else dict(
        lr=lr, momentum=momentum, scale=scale)
    check_update(before, [(p, g, b if use_buf else None) for p, g, b in zip(ps, gs, bs)], kind="line", dims=dims,
                 alphas=alphas, unconstrained=False, light=light, eps=0.125, hyper=use_hyper, **step)


def test_launch_groups_by_dtype_pair(ext, monkeypatch):
    """One launch per (param dtype, grad dtype) pair, in first-seen order, each with its tensors in list order;
    an empty list launches nothing; kind codes and alphas go through."""
    fake = HostExtension(ext, emulate=False)
    monkeypatch.setattr(_backend, "cuda_extension", lambda: fake)
    f32, bf16 = torch.float32, torch.bfloat16
    pairs = [(f32, f32), (f32, bf16), (f32, f32), (bf16, bf16), (f32, bf16)]
    ps = [torch.zeros(3, 4, dtype=p) for p, _ in pairs]
    gs = [torch.zeros(3, 4, dtype=g) for _, g in pairs]
    fu_cuda.launch(ps, gs, None, "scaled", None, [1.0, 2.0, 3.0, 4.0, 5.0], 0.1, 1.0, 1.0, None, True, False, EPS)
    got = [(c["p_dtype"], c["g_dtype"], c["alphas"], c["p"], c["kind"], c["hyper"]) for c in fake.calls]
    D = ext.DTYPES
    assert got == [
        (D["float32"], D["float32"], [1.0, 3.0], [ps[0].data_ptr(), ps[2].data_ptr()], ext.KINDS["scaled"], 0),
        (D["float32"], D["bfloat16"], [2.0, 5.0], [ps[1].data_ptr(), ps[4].data_ptr()], ext.KINDS["scaled"], 0),
        (D["bfloat16"], D["bfloat16"], [4.0], [ps[3].data_ptr()], ext.KINDS["scaled"], 0)]
    fake.calls.clear()
    fu_cuda.launch([], [], None, "sign", None, [], 0.1, 1.0, 1.0, None, False, False, EPS)
    assert fake.calls == []
    with pytest.raises(ValueError, match="hyper must be a float32 tensor"):
        fu_cuda.launch(ps[:1], gs[:1], None, "sign", None, [1.0], None, None, None, torch.zeros(3, dtype=torch.float64),
                       False, False, EPS)
    with pytest.raises(ValueError, match="1 params but 2 alphas"):
        fu_cuda.launch(ps[:1], gs[:1], None, "sign", None, [1.0, 2.0], 0.1, 1.0, 1.0, None, False, False, EPS)


def test_launch_module_imports_without_the_extension(monkeypatch):
    """The module imports with no extension and no GPU; launching then says why it cannot."""
    monkeypatch.setattr(_backend, "cuda_extension", lambda: None)
    mod = importlib.reload(fu_cuda)
    with pytest.raises(RuntimeError, match="was not built"):
        mod.launch([torch.zeros(2)], [torch.zeros(2)], None, "sign", None, [1.0], 0.1, 1.0, 1.0, None, False, False,
                   EPS)
