"""Triton Newton-Schulz vs the independent fp64 oracle under the tolerance rule (tests/tolerances.py): its
error is at most 1.25x that of the plain torch iteration in the same dtype from the same G (the oracle run in
that dtype), plus 4 u. Runs interpreted on CPU, at real sizes on a GPU (the oracle then runs on CPU copies).

Under the interpreter bf16 tiles are multiplied in fp32 (its bf16 tl.dot is wrong) and fp32 -> bf16 casts
truncate instead of rounding to nearest; the 16-bit results are still well within the rule, as the kernels
accumulate in fp32 and round once per product. A rank-1 G (a single line, or 1 x 1) is one scalar trajectory
whose error is one rounding's luck; in 16-bit the kernels' fp32 accumulation keeps it far inside the rule, but
in fp32 the kernels and plain torch do the same arithmetic, so there those shapes are checked over a batch of
draws (``LINES`` lines in all, each drawn and run separately at its own shape), the error measured over the
whole batch."""
import pytest
import torch

import disco_kernels as dk
import oracle
from tolerances import assert_close

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from disco_kernels.triton_kernels.newton_schulz import _upper_tile  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LINES = 8  # rank-1 shapes in fp32: lines per check, in as many draws of the shape as that takes


@pytest.fixture(params=["fused", "tiled"])
def path(request, monkeypatch):
    """The CPU tests run on both paths: the one-launch fused kernel for small matrices (what the small test
    shapes take by default) and the tiled three-kernels-per-step path (forced by disabling the fused one)."""
    from disco_kernels.triton_kernels import newton_schulz as module
    if request.param == "tiled":
        monkeypatch.setattr(module, "SMALL_LIMITS", {2: (0, 0), 4: (0, 0)})
    return request.param


def draws(shape, dtype=torch.float32, device=DEVICE, compute=None):
    """Gaussian G of ``shape`` in ``dtype``: one, or when the iteration runs in fp32 (``compute``, default
    ``dtype``) and the shape is rank 1, enough draws for ``LINES`` lines."""
    rank1 = min(shape[-2:]) == 1 and (compute or dtype) == torch.float32
    batch = -(-LINES // torch.Size(shape[:-2]).numel()) if rank1 else 1
    return [torch.randn(shape, device=device).to(dtype) for _ in range(batch)]


def check(Gs, steps, coefficients="jordan", dtype=None):
    """Triton NS of each G in ``Gs`` (a tensor or a list, each run on its own) within the rule against the
    oracle's fp64 iteration, over all of them at once; plain is the oracle iterating in ``dtype``. The oracle
    runs on CPU copies of G."""
    Gs = [Gs] if isinstance(Gs, torch.Tensor) else Gs
    dtype = dtype or Gs[0].dtype
    outs = []
    for G in Gs:
        out = dk.ops.newton_schulz(G, steps, coefficients, dtype=dtype, backend="triton")
        assert out.shape == G.shape and out.dtype == dtype and out.is_contiguous()
        outs.append(out.cpu().flatten())
    exact = torch.cat([oracle.newton_schulz(G.cpu().double(), steps, coefficients).flatten() for G in Gs])
    plain = torch.cat([oracle.newton_schulz(G.cpu(), steps, coefficients, dtype).flatten() for G in Gs])
    assert_close(torch.cat(outs), exact, plain, dtype, what=f"NS of {len(Gs)} x {tuple(Gs[0].shape)}")
    return outs


# 16 x 16 tiles under the interpreter: (7, 129) and (129, 7) mask one row tile and the last k tile,
# (2, 40, 50) has a 3 x 3 tile grid (off-diagonal mirrors, edges on both sides); m = 1 (wide and tall) is an
# argument a GPU launch specialises (see compile_triton_kernels.py).
@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (129, 7), (3, 7, 129), (2, 40, 50), (2, 1, 40), (50, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vs_fp64(shape, dtype, path):
    check(draws(shape, dtype), steps=3)


@pytest.mark.parametrize("coefficients", ["jordan", "polar_express", [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]])
def test_schedules(coefficients, path):
    """Five steps of each schedule (the custom one repeats its last triple)."""
    check(torch.randn(2, 20, 33, device=DEVICE), steps=5, coefficients=coefficients)


def test_noncontiguous_and_cast(path):
    """Transposed and strided views are read in place; G's dtype may differ from the compute dtype."""
    base = torch.randn(50, 2, 40, device=DEVICE)
    check(base[:, 0, :].T, steps=2)  # (40, 50), column stride 80
    check(base[:, 1, :33], steps=2, dtype=torch.float16)  # tall (50, 33), fp32 in, fp16 out


@pytest.mark.parametrize("coefficients", ["jordan", "polar_express"])
def test_norm_eps_of_a_tiny_g(coefficients, path):
    """||G||_F of 1e-6, the size of the schedule's eps (1e-7 jordan, 1e-6 polar_express): X0 = G / (mult ||G||_F
    + eps) must take the schedule's eps, which at ordinary sizes is invisible."""
    G = torch.randn(2, 20, 33, device=DEVICE)
    check(G * (1e-6 / G.norm(dim=(-2, -1), keepdim=True)), steps=5, coefficients=coefficients)


def test_one_step_tall(path):
    """A single step reads G and writes the (transposed-back) result with no buffer in between."""
    check(torch.randn(3, 21, 5, device=DEVICE), steps=1)


def test_zero_nan_empty_and_fallbacks(path):
    assert dk.ops.newton_schulz(torch.zeros(2, 4, 6, device=DEVICE), 2, backend="triton").abs().max() == 0
    G = torch.randn(5, 8, device=DEVICE)
    G[1, 2] = float("nan")
    assert torch.isnan(dk.ops.newton_schulz(G, 2, backend="triton")).all()
    for shape in [(0, 5, 6), (3, 0, 5), (3, 5, 0), (0, 5)]:  # any zero dim
        assert dk.ops.newton_schulz(torch.zeros(shape, device=DEVICE), backend="triton").shape == shape
    G = torch.randn(6, 9, device=DEVICE, dtype=torch.float64)  # fp64 and zero steps: the torch path
    for steps in (0, 2):
        out = dk.ops.newton_schulz(G, steps, backend="triton")
        assert torch.equal(out, dk.ops.newton_schulz(G, steps, backend="torch"))
        assert_close(out.cpu(), oracle.newton_schulz(G.cpu(), steps), oracle.newton_schulz(G.cpu().float(), steps),
                     torch.float64, what=f"fp64, {steps} steps")
    assert torch.equal(dk.ops.newton_schulz(G.float(), 0, backend="triton"),
                       dk.ops.newton_schulz(G.float(), 0, backend="torch"))
    check(G.float(), steps=0)


@triton.jit
def _upper_tiles_kernel(out_i, out_j, t, total, BLOCK: tl.constexpr):
    k = tl.arange(0, BLOCK)
    i, j = _upper_tile(k, t)
    tl.store(out_i + k, i, mask=k < total)
    tl.store(out_j + k, j, mask=k < total)


def test_upper_tile_enumerates_the_triangle():
    """_upper_tile maps 0 .. t(t+1)/2 - 1 one-to-one onto the tiles (i, j), j >= i, of a t x t grid."""
    for t in (1, 2, 3, 7, 64, 181):
        total = t * (t + 1) // 2
        i, j = (torch.empty(total, dtype=torch.int32, device=DEVICE) for _ in range(2))
        _upper_tiles_kernel[(1,)](i, j, t, total, BLOCK=triton.next_power_of_2(total))
        expect = torch.triu_indices(t, t, device=DEVICE)
        assert torch.equal(i.long(), expect[0]) and torch.equal(j.long(), expect[1])


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1024, 4096), (4096, 1024), (32, 512, 512), (64, 129, 257), (2048, 2048),
                                   (2, 1, 3000), (3000, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_real_sizes(shape, dtype):
    check(draws(shape, device="cuda", compute=dtype), steps=5, dtype=dtype)


@pytest.mark.gpu
def test_gpu_spectral_lmo_many_is_one_batched_launch():
    """The Spectral LMO (bf16 iteration) of same-shaped grads, batched, within the rule against the oracle's."""
    gs = [torch.randn(256, 384, device="cuda") for _ in range(8)]
    out = dk.lmo.Spectral().lmo_many(gs, backend="triton")
    assert all(o.shape == g.shape for o, g in zip(out, gs))
    exact = torch.stack([oracle.spectral(g.cpu().double()) for g in gs])
    plain = torch.stack([oracle.spectral(g.cpu(), dtype=torch.bfloat16) for g in gs])
    assert_close(torch.stack(out).cpu(), exact, plain, torch.bfloat16, what="Spectral lmo_many")


def test_batch_beyond_grid_limit_runs_in_chunks(monkeypatch, path):
    """Batches larger than grid axis 1 allows run in chunks, each matrix computed exactly as unchunked."""
    from disco_kernels.triton_kernels import newton_schulz as module
    G = torch.randn(5, 9, 6, device=DEVICE)  # tall: the chunks are transposed back too
    whole = dk.ops.newton_schulz(G, 2, backend="triton")
    monkeypatch.setattr(module, "MAX_GRID_Y", 2)
    assert torch.equal(dk.ops.newton_schulz(G, 2, backend="triton"), whole)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(256, 64, 64), (32, 48, 200), (96, 16, 1024), (8, 200, 40)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_fused_small(shape, dtype):
    """Per-head sized batches take the one-launch fused kernel."""
    from disco_kernels.triton_kernels.newton_schulz import _small_tile
    if _small_tile(*sorted(shape[-2:]), dtype) is None:
        assert dtype == torch.float32  # fp32's tile is smaller: these shapes take the tiled path
    check(torch.randn(shape, device="cuda"), steps=5, dtype=dtype)
