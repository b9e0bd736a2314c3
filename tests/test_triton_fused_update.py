"""Triton fused Scion update vs the independent oracle under the tolerance rule (tests/tolerances.py).

For every tensor, from the same (rounded) inputs p, g, buf: ``exact`` is the oracle's step in fp64 and
``plain`` the same step computed in the storage dtype (fp32 for fp64 tensors), both on CPU copies:

    buf = buf (1 - momentum) + g momentum           (Scion with bufs; as oracle.scion_run)
    p   = oracle.scion_step(p, d, ...)              d = buf, or g (momentum 1, or ScionLight)
    g   = g (1 - momentum)                          (ScionLight, momentum != 1)

and the stored buf, p and g are each within RATIO x plain's normwise error plus ULPS u. The kernels do fp32
math on 16-bit storage and round each result once, so there they are well inside the bound. A single-entry
tensor (1 x 1, 0-D, (1,)) is one rounding's luck, amplified where decay p and the update nearly cancel: the
lists hold ``TINY`` of them, and their entries are measured together, as one vector per role and dtype.
Sign is discontinuous where d = 0: a buf entry that cancels its grad entry exactly in decimal arithmetic
(b = -9 g at momentum 0.9, which 16-bit values can hit) leaves the sign to the rounding of momentum itself
(+ in the fp64 oracle, - in fp32 kernels), so such draws get the buf entry's sign flipped.
The oracle's line LMOs are written for matrices:
they are applied per matrix of the last two dims, a 0-D or 1-D tensor as one (1, n) row, as the op documents
(BiasRMS on the whole tensor: its rms is over dim 0). Parameters are drawn at the size of their update so
that both terms of the step show in the check.
Runs interpreted on CPU (CMAX = 32: rows wider than 32 take the two-sweep row path; 4 x 16 tiles, two
per program), at real sizes on a GPU.
"""

import importlib
import math

import pytest
import torch

import disco_kernels as dk
from disco_kernels.lmo import LineNorm
import oracle
from test_cuda_build import norm_kwargs, oracle_lmo, per_matrix, untie  # (shared with the CUDA tests)
from tolerances import assert_close, plain_dtype, rel_err

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = 4  # single-entry tensors per list, measured together
MATRICES = [(1, 1)] * TINY + [(7, 129), (129, 7), (3, 20)]
VECTORS = [(), (1,)] * (TINY // 2) + [(129,), (7,)]  # BiasRMS takes 0-D and 1-D tensors
CASES = ([("Sign", n, False) for n in (True, False)] + [("BiasRMS", True, False)]
         + [(lmo, n, t) for lmo in ("RowNorm", "ColNorm") for n in (True, False) for t in (False, True)])


def shapes_for(lmo):
    return VECTORS if lmo == "BiasRMS" else MATRICES


def new(shapes, dtype, n=3):
    """n lists (params, grads, bufs) of fresh random tensors."""
    return [[torch.randn(s, device=DEVICE).to(dtype) for s in shapes] for _ in range(n)]


def oracle_step(p, d, *, lmo, normalized, transpose, lr, scale, unconstrained):
    """oracle.scion_step of one tensor along direction d, in p's dtype."""
    kw = norm_kwargs(lmo, normalized, transpose)
    return per_matrix(lambda a, b: oracle.scion_step(a, b, lr=lr, scale=scale, unconstrained=unconstrained,
                                                     norm=lmo, norm_kwargs=kw), lmo, p, d)


def check_step(params, grads, bufs=None, *, lmo, lr=0.1, momentum=0.9, scale=2.0, unconstrained=False,
               normalized=True, transpose=False, light=False):
    """Run the Triton step on the given tensors (params redrawn at the size of their update) and check
    params, bufs and grads against the oracle's step under the rule, tensor by tensor (single entries
    together)."""
    flags = dict(lmo=lmo, normalized=normalized, transpose=transpose)
    for p, g in zip(params, grads):  # |p| ~ |lr scale u|: both terms of the update show in p
        u = oracle_lmo(g.double(), **flags)
        p.copy_(torch.randn(p.shape, device=p.device, dtype=torch.float64) * lr * scale * u.abs().mean().clamp_min(1e-3))
    if lmo == "Sign" and bufs and not light:
        untie(grads, bufs, momentum)
    p_in, g_in = [p.cpu().clone() for p in params], [g.cpu().clone() for g in grads]
    b_in = [b.cpu().clone() for b in bufs] if bufs else None
    dk.ops.fused_update(params, grads, bufs, lr=lr, momentum=momentum, scale=scale, unconstrained=unconstrained,
                        light=light, backend="triton", **flags)
    m = momentum
    singles = {}  # (role, dtype) -> single entries (fast, exact, plain)

    def check(role, i, fast, exact, plain):
        if fast.numel() == 1:
            for acc, t in zip(singles.setdefault((role, fast.dtype), ([], [], [])), (fast, exact, plain)):
                acc.append(t.reshape(1).cpu())
        else:
            assert_close(fast.cpu(), exact, plain, what=f"{role}[{i}] {tuple(fast.shape)} {fast.dtype}")

    for i, (p, g) in enumerate(zip(params, grads)):
        pd = plain_dtype(p.dtype)
        if bufs and not light:
            b, bd = bufs[i], plain_dtype(bufs[i].dtype)
            b_exact = b_in[i].double() * (1 - m) + g_in[i].double() * m
            check("bufs", i, b, b_exact, b_in[i].to(bd) * (1 - m) + g_in[i].to(bd) * m)
            d_exact, d_plain = b_exact, b_in[i].to(pd) * (1 - m) + g_in[i].to(pd) * m
        else:
            if bufs:
                assert torch.equal(bufs[i].cpu(), b_in[i]), f"bufs[{i}] changed with light=True"
            d_exact, d_plain = g_in[i].double(), g_in[i].to(pd)
        step = dict(flags, lr=lr, scale=scale, unconstrained=unconstrained)
        check("params", i, p, oracle_step(p_in[i].double(), d_exact, **step), oracle_step(p_in[i].to(pd), d_plain, **step))
        if light and m != 1:
            gd = plain_dtype(g.dtype)
            check("grads", i, g, g_in[i].double() * (1 - m), g_in[i].to(gd) * (1 - m))
        else:
            assert torch.equal(g.cpu(), g_in[i]), f"grads[{i}] changed"
    for (role, dtype), (fast, exact, plain) in singles.items():
        assert_close(torch.cat(fast), torch.cat(exact), torch.cat(plain), dtype,
                     what=f"{role}: the {len(fast)} single-entry tensors ({dtype})")


@pytest.mark.parametrize("lmo, normalized, transpose", CASES)
def test_every_lmo_and_flag(lmo, normalized, transpose):
    """Scion (momentum into bufs) over a list of odd shapes in one call: for the row LMOs one group
    per row-width bucket (one pass up to 32 columns, two sweeps beyond), the column LMOs one launch."""
    check_step(*new(shapes_for(lmo), torch.float32), lmo=lmo, normalized=normalized, transpose=transpose)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lmo", ["Sign", "RowNorm", "ColNorm", "BiasRMS"])
def test_storage_dtypes(dtype, lmo):
    """16-bit storage: fp32 math, buf and p rounded once to the storage dtype."""
    check_step(*new(shapes_for(lmo), dtype), lmo=lmo)


@pytest.mark.parametrize("lmo", ["Sign", "RowNorm", "ColNorm", "BiasRMS"])
def test_light_keeps_momentum_in_grads(lmo):
    """ScionLight: d = g, then g *= 1 - momentum; bufs, if passed, are not touched."""
    params, grads, bufs = new(shapes_for(lmo), torch.float32)
    check_step(params, grads, bufs, lmo=lmo, light=True)
    params, grads = new(shapes_for(lmo), torch.bfloat16, 2)
    check_step(params, grads, lmo=lmo, light=True, momentum=0.5, transpose=True)


@pytest.mark.parametrize("lmo", ["Sign", "RowNorm", "ColNorm", "BiasRMS"])
def test_no_momentum_and_unconstrained(lmo):
    """momentum = 1 without bufs (d = g, nothing but p written), and unconstrained (no decay)."""
    params, grads = new(shapes_for(lmo), torch.float32, 2)
    check_step(params, grads, lmo=lmo, momentum=1.0, unconstrained=True)
    params, grads = new(shapes_for(lmo), torch.float16, 2)
    check_step(params, grads, lmo=lmo, momentum=1.0, light=True)  # light with momentum 1: g kept


@pytest.mark.parametrize("lmo", ["Sign", "RowNorm", "ColNorm"])
def test_transposed_views(lmo):
    """p, g and buf as transposed views (column stride != 1), mixed with contiguous ones."""
    shapes = [(129, 7), (33, 40), (5, 3)]
    params, grads, bufs = ([torch.randn(s[::-1], device=DEVICE).T for s in shapes] for _ in range(3))
    grads[1] = grads[1].contiguous()  # roles of one tensor may differ in layout
    check_step(params, grads, bufs, lmo=lmo)


@pytest.mark.parametrize("lmo", ["Sign", "RowNorm", "ColNorm", "BiasRMS"])
def test_views_into_one_flat_buffer(lmo):
    """Every tensor a view into one flat buffer per role (as a flat-parameter optimizer keeps them),
    one element past the start and one element apart: no view is 16-byte aligned."""
    shapes = shapes_for(lmo)
    sizes = [torch.Size(s).numel() for s in shapes]
    total = 1 + sum(sizes) + len(sizes)

    def views(flat):
        out, at = [], 1
        for s, k in zip(shapes, sizes):
            out.append(flat[at:at + k].view(s))
            at += k + 1
        return out

    flats = [torch.randn(total, device=DEVICE) for _ in range(3)]
    check_step(*(views(f) for f in flats), lmo=lmo)


@pytest.fixture
def torch_path_calls(monkeypatch):
    """The tensors (by shape) that a Triton call hands to the torch path."""
    fu_op = importlib.import_module("disco_kernels.ops.fused_update")
    calls, real = [], fu_op._torch

    def spy(params, *args):
        calls.extend(tuple(p.shape) for p in params)
        return real(params, *args)

    monkeypatch.setattr(fu_op, "_torch", spy)
    return calls


def test_fallbacks_in_a_mixed_list(torch_path_calls):
    """Tensors the kernels do not take (float64) go through the torch path inside the same call; the rest,
    16/32-bit in any mix of dtypes between the roles, through the kernels."""
    shapes = [(7, 129), (2, 9), (40, 33), (6, 8)]
    params, grads, bufs = new(shapes, torch.float32)
    params[3], grads[3], bufs[3] = (t.double() for t in (params[3], grads[3], bufs[3]))
    check_step(params, grads, bufs, lmo="RowNorm")
    params, grads, bufs = new([(7, 129), (40, 33)], torch.float32)
    bufs[1] = bufs[1].double()
    check_step(params, grads, bufs, lmo="ColNorm")
    assert torch_path_calls == [(6, 8), (40, 33)]


@pytest.mark.parametrize("lmo", ["Sign", "RowNorm", "ColNorm", "BiasRMS"])
def test_roles_of_other_dtypes(lmo, torch_path_calls):
    """fp32 params with bf16 grads (a bf16 model's grads into fp32 master weights) and fp16 ones with fp32
    grads and buffers: one launch per dtype tuple, every role read and written in its own dtype."""
    shapes = shapes_for(lmo)
    params, grads = new(shapes, torch.float32, 2)
    check_step(params, [g.bfloat16() for g in grads], lmo=lmo, momentum=1.0)  # d = g, exact in fp32
    params, grads, bufs = new(shapes, torch.float32)
    check_step([p.half() for p in params], grads, bufs, lmo=lmo, momentum=0.5)
    params, grads = new(shapes, torch.float32, 2)
    check_step(params, [g.half() for g in grads], lmo=lmo, momentum=0.5, light=True)
    assert torch_path_calls == []


def test_zero_grads_and_empty_tensors():
    """Zero directions give a zero update (p only decays; d / (0 + 1e-8) = 0); empty tensors are skipped."""
    shapes = [(7, 129), (0, 5), (40, 33)]
    for lmo in ("Sign", "RowNorm", "ColNorm"):
        params, grads, bufs = new(shapes, torch.float32)
        grads[0].zero_()
        bufs[0].zero_()
        check_step(params, grads, bufs, lmo=lmo)


@pytest.mark.parametrize("lmo", ["RowNorm", "ColNorm", "BiasRMS"])
def test_tiny_grads_see_the_eps(lmo):
    """Line norms of about 1e-8, the size of the LMO's eps: d / (||d|| f + 1e-8) must add exactly that eps,
    which at ordinary sizes is invisible."""
    params, grads, bufs = new(shapes_for(lmo), torch.float32)
    for t in grads + bufs:
        t.mul_(1e-9)
    check_step(params, grads, bufs, lmo=lmo)


# -- a new line-wise norm is one class --------------------------------------------------------------

class HalfRootLines(LineNorm):
    """Test only: lines along ``dim`` (the columns by default), alpha = 0.5 sqrt(d_in). Nothing else is
    declared: the op, its torch path and the kernels must derive the whole LMO from these two facts."""

    def __init__(self, dim=-2):
        self.dim = dim

    def line_dim(self, shape):
        return self.dim

    def alpha(self, shape):
        return 0.5 * math.sqrt(shape[-1])


def half_root_step(p, g, buf, *, dim, lr, momentum, scale, unconstrained):
    """The step of ``HalfRootLines`` restated from its definition, in the inputs' dtype: (p, buf) after it."""
    d = g if buf is None else buf * (1 - momentum) + g * momentum
    norm = d.pow(2).sum(dim, keepdim=True).sqrt()
    u = d / (norm * (0.5 * math.sqrt(d.size(-1))) + 1e-8)
    return (p if unconstrained else p * (1 - lr)) - lr * scale * u, d


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dim", [-2, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_new_line_norm_is_one_class(backend, dim, dtype, torch_path_calls):
    """A LineNorm subclass that declares only its line dim and alpha runs through fused_update on the torch
    path and the Triton kernels (columns: the two-pass column kernel; rows: the row kernel, one pass and two
    sweeps), within the rule against the restatement above in fp64 and in the storage dtype; a zero line
    takes no step."""
    shapes = [(7, 129), (129, 7), (3, 20), (1, 1)]
    params, grads, bufs = new(shapes, dtype)
    grads[0][:, 3] = grads[0][2] = 0
    bufs[0][:, 3] = bufs[0][2] = 0
    step = dict(lr=0.1, momentum=0.75, scale=2.0, unconstrained=False)
    p_in, g_in, b_in = ([t.clone() for t in ts] for ts in (params, grads, bufs))
    dk.ops.fused_update(params, grads, bufs, lmo=HalfRootLines(dim), backend=backend, **step)
    for i in range(len(shapes)):
        exact = half_root_step(p_in[i].double(), g_in[i].double(), b_in[i].double(), dim=dim, **step)
        plain = half_root_step(*(t.to(plain_dtype(dtype)) for t in (p_in[i], g_in[i], b_in[i])), dim=dim, **step)
        if shapes[i] != (1, 1):  # (one entry: one rounding's luck, and d / |d| alpha exactly)
            assert_close(params[i], exact[0], plain[0], what=f"params[{i}] {shapes[i]}")
            assert_close(bufs[i], exact[1], plain[1], what=f"bufs[{i}] {shapes[i]}")
        assert torch.equal(grads[i], g_in[i])
    zero = (slice(None), 3) if dim == -2 else (2,)
    assert_close(params[0][zero], p_in[0][zero].double() * 0.9, p_in[0][zero].to(plain_dtype(dtype)) * 0.9,
                 what="a zero line (only the decay)")
    assert torch_path_calls == []  # (the Triton run: every tensor through the kernels)


def test_alpha_reaches_every_kernel_per_tensor(torch_path_calls):
    """Each tensor of one launch gets its own alpha: a list of equal shapes whose alphas differ only by the
    tensor (a subclass keyed on the shape's first dim), through the tile, row and column kernels."""
    class ByRows(HalfRootLines):
        def alpha(self, shape):
            return float(shape[0])

    class SignByRows(dk.lmo.Sign):
        def alpha(self, shape):
            return 1.0 / shape[0]

    shapes = [(2, 5), (3, 5), (4, 5), (5, 5)]
    for lmo in (ByRows(-1), ByRows(-2), SignByRows()):
        params, grads = new(shapes, torch.float32, 2)
        want = [p.clone() for p in params]
        dk.ops.fused_update(want, [g.clone() for g in grads], lmo=lmo, lr=0.1, backend="torch")
        dk.ops.fused_update(params, grads, lmo=lmo, lr=0.1, backend="triton")
        for got, w in zip(params, want):
            assert rel_err(got, w) < 1e-6, type(lmo).__name__
    assert torch_path_calls == []


GPT2_SMALL = [(50257, 768), (1024, 768), (768, 2304), (768, 768), (768, 3072), (3072, 768), (768,), (2304,)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lmo, transpose", [("Sign", False), ("RowNorm", False), ("RowNorm", True),
                                            ("ColNorm", False), ("ColNorm", True), ("BiasRMS", False)])
def test_gpu_gpt2_small(dtype, lmo, transpose):
    """GPT-2-small shaped lists (matrices; vectors for BiasRMS), Scion and ScionLight."""
    shapes = [s for s in GPT2_SMALL if (len(s) == 1) == (lmo == "BiasRMS")]
    check_step(*new(shapes, dtype), lmo=lmo, transpose=transpose)
    params, grads = new(shapes, dtype, 2)
    check_step(params, grads, lmo=lmo, transpose=transpose, light=True)


@pytest.mark.gpu
def test_gpu_wide_rows_and_views():
    """Rows wider than CMAX (8192) take two sweeps, up to 8192 one pass; transposed views; a flat buffer."""
    check_step(*new([(64, 20000), (3, 8193)], torch.bfloat16), lmo="RowNorm")
    check_step(*new([(5, 8192), (7, 4097)], torch.bfloat16), lmo="RowNorm")  # one pass, 8192 wide
    params, grads, bufs = ([torch.randn(768, 3072, device="cuda").T for _ in range(2)] for _ in range(3))
    check_step(params, grads, bufs, lmo="ColNorm", transpose=True)
    flat = [torch.randn(1 + 768 * 768 + 1 + 768 * 3072, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    views = [[f[1:1 + 768 * 768].view(768, 768), f[2 + 768 * 768:].view(768, 3072)] for f in flat]
    check_step(*views, lmo="Sign")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_list_spanning_two_devices():
    """One list with tensors on cuda:0 and cuda:1: each device's group launches on that device."""
    shapes = [(7, 129), (40, 33)]
    params, grads, bufs = new(shapes, torch.float32)
    for ts in (params, grads, bufs):
        ts.append(ts[1].to("cuda:1"))
    check_step(params, grads, bufs, lmo="RowNorm")
