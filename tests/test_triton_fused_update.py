"""Triton fused Scion update vs the same step in fp64 from the same inputs.

The kernels do fp32 math on fp32/fp16/bf16 storage, so they round differently from the torch backend
(which works in the storage dtype); the yardstick is fp64. Each stored result is one rounding to the
storage dtype of fp32 math whose only long computation is a norm over at most numel terms, so every
entry's error is bounded by that tolerance times the sum of the magnitudes of its terms:

    buf:  |b - b64| <= elementwise_tol(dtype) (|(1 - momentum) b| + |momentum g|)
    p:    |p - p64| <= (elementwise_tol(dtype) + reduction_tol(fp32, numel)) (|decay p| + |lr scale u|)

where u is the LMO of the *stored* buf (the kernel reads the rounded buf back, as its docstring says).
Parameters are drawn at the size of their update so that both terms are visible in the check.
Runs interpreted on CPU (CMAX = 32: rows wider than 32 take the two-sweep row path; 4 x 16 tiles, two
per program), at real sizes on a GPU.
"""
import pytest
import torch

import disco_kernels as dk
from disco_kernels.ops.fused_update import lmo_fn
from tolerances import elementwise_tol, reduction_tol, unit

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MATRICES = [(1, 1), (7, 129), (129, 7), (3, 20)]
VECTORS = [(), (1,), (129,), (7,)]  # BiasRMS takes 0-D and 1-D tensors
CASES = ([("Sign", n, False) for n in (True, False)] + [("BiasRMS", True, False)]
         + [(lmo, n, t) for lmo in ("RowNorm", "ColNorm") for n in (True, False) for t in (False, True)])


def shapes_for(lmo):
    return VECTORS if lmo == "BiasRMS" else MATRICES


def new(shapes, dtype, n=3):
    """n lists (params, grads, bufs) of fresh random tensors."""
    return [[torch.randn(s, device=DEVICE).to(dtype) for s in shapes] for _ in range(n)]


def fp64(ts):
    return [t.to(torch.float64, copy=True) for t in ts]


def check_step(params, grads, bufs=None, *, lmo, lr=0.1, momentum=0.9, scale=2.0, unconstrained=False,
               normalized=True, transpose=False, light=False):
    """Run the Triton step on the given tensors (params redrawn at the size of their update) and check
    params, bufs and grads against the fp64 step, entry by entry."""
    fn = lmo_fn(lmo, normalized, transpose)
    step = lr * scale
    for p, g in zip(params, grads):  # |p| ~ |lr scale u|: both terms of the update show in p
        u = fn(g.double())
        p.copy_(torch.randn(p.shape, device=DEVICE, dtype=torch.float64) * step * u.abs().mean().clamp_min(1e-3))
    p_in, g_in = fp64(params), fp64(grads)
    b_in = fp64(bufs) if bufs else None
    dk.ops.fused_update(params, grads, bufs, lmo=lmo, lr=lr, momentum=momentum, scale=scale,
                        unconstrained=unconstrained, normalized=normalized, transpose=transpose, light=light,
                        backend="triton")
    decay = 1.0 if unconstrained else 1 - lr
    for i, (p, g) in enumerate(zip(params, grads)):
        floor = torch.finfo(p.dtype).smallest_normal * unit(p.dtype)  # half a subnormal step
        d = g_in[i]
        if bufs and not light:
            b = bufs[i]
            terms = (1 - momentum) * b_in[i].abs() + momentum * g_in[i].abs()
            err = (b.double() - ((1 - momentum) * b_in[i] + momentum * g_in[i])).abs()
            assert (err <= elementwise_tol(b.dtype) * terms + floor).all(), f"bufs[{i}] {tuple(b.shape)}"
            d = b.double()
        elif bufs:
            assert torch.equal(bufs[i].double(), b_in[i]), f"bufs[{i}] changed with light=True"
        u = fn(d)
        terms = (decay * p_in[i]).abs() + step * u.abs()
        tol = elementwise_tol(p.dtype) + reduction_tol(torch.float32, max(p.numel(), 1))
        err = (p.double() - (decay * p_in[i] - step * u)).abs()
        assert (err <= tol * terms + floor).all(), f"params[{i}] {tuple(p.shape)}: max err {err.max().item():.3g}"
        if light and momentum != 1:
            g_ref = (1 - momentum) * g_in[i]
            assert ((g.double() - g_ref).abs() <= elementwise_tol(g.dtype) * g_ref.abs() + floor).all()
        else:
            assert torch.equal(g.double(), g_in[i]), f"grads[{i}] changed"


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


def test_fallbacks_in_a_mixed_list():
    """Tensors the kernels do not take (float64, rank 3, dtypes differing between roles) go through the
    torch path inside the same call; the rest through the kernels."""
    shapes = [(7, 129), (2, 5, 9), (40, 33), (6, 8)]
    params, grads, bufs = new(shapes, torch.float32)
    params[3], grads[3], bufs[3] = (t.double() for t in (params[3], grads[3], bufs[3]))
    check_step(params, grads, bufs, lmo="RowNorm")
    params, grads, bufs = new([(129,), (4, 7), ()], torch.float32)  # 2-D BiasRMS: rms over dim 0, torch
    check_step(params, grads, bufs, lmo="BiasRMS")
    params, grads, bufs = new([(7, 129), (40, 33)], torch.float32)
    bufs[1] = bufs[1].double()
    check_step(params, grads, bufs, lmo="ColNorm")


def test_zero_grads_and_empty_tensors():
    """Zero directions give a zero update (p only decays); empty tensors are skipped."""
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
