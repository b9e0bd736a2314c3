"""Triton power iteration vs the independent fp64 oracle, from the same start vector and iteration count,
under the tolerance rule (tests/tolerances.py).

W is read exactly in every storage dtype and all arithmetic is fp32 (sigma and v are fp32), so the plain
computation the kernels are held to is the oracle's iteration in fp32 on the same W and start: sigma and v
are each within 1.25x its error against the fp64 iteration, plus 4 u(fp32). The start is the documented
vector rounded to fp32 (what the op iterates from), given to both. The oracle runs on CPU copies.
Runs interpreted on CPU (NMAX = 64: rows wider than 64 take the two-sweep path), at real sizes on a GPU.
bf16 is tested here too: the kernels load and convert it, they use no tl.dot.
"""
import pytest
import torch

import disco_kernels as dk
import oracle
from tolerances import assert_close

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def start(W):
    """The documented start vector rounded to fp32, one per matrix of W."""
    n = W.size(-1)
    return oracle.start_vector(n).float().expand(*W.shape[:-2], n).contiguous().to(W.device)


def exact_and_plain(W, v, iters):
    """The oracle's (sigma, v) after ``iters`` iterations from ``v``: in fp64 and in fp32, on CPU."""
    W, v = W.cpu(), v.cpu()
    return oracle.power_iteration(W.double(), v.double(), iters), oracle.power_iteration(W.float(), v.float(), iters)


def check(W, iters=3, v=None):
    """(sigma, v) of the Triton backend from ``v`` (default: the documented start) within the rule."""
    v = start(W) if v is None else v
    sigma, vo = dk.ops.power_iteration(W, v, iters, backend="triton")
    assert sigma.shape == W.shape[:-2] and vo.shape == v.shape
    assert sigma.dtype == vo.dtype == torch.float32
    (s64, v64), (s32, v32) = exact_and_plain(W, v, iters)
    assert_close(sigma.cpu(), s64, s32, what=f"sigma of {tuple(W.shape)} {W.dtype}")
    assert_close(vo.cpu(), v64, v32, what=f"v of {tuple(W.shape)} {W.dtype}")
    return sigma, vo


# (7, 129) and (3, 7, 129): n > NMAX, two sweeps; (129, 7) and (5, 64): one pass (64 = NMAX exactly);
# (5, 65): one column past NMAX.
@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (129, 7), (3, 7, 129), (5, 64), (5, 65)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vs_fp64(shape, dtype):
    check(torch.randn(shape, device=DEVICE).to(dtype))


def test_wide_rows_take_two_sweeps():
    """Rows several NMAX wide (on CPU), many row blocks per program, and a random (non-default) unit start."""
    W = torch.randn(2, 20, 200, device=DEVICE)
    v = torch.randn(2, 200, device=DEVICE)
    check(W, iters=3, v=v / v.norm(dim=-1, keepdim=True))


def test_noncontiguous():
    """Transposed and strided views are read in place through their strides."""
    base = torch.randn(40, 2, 130, device=DEVICE)
    check(base[:, 0, :].T)  # (130, 40), row stride 1, column stride 260
    check(base[:, 1, ::2])  # (40, 65), column stride 2
    check(base.permute(1, 0, 2)[:, :, :33].to(torch.float16))  # (2, 40, 33) batch of strided views


def test_zero_matrix_keeps_v():
    """W v = 0: sigma is 0 and v is returned unchanged (a zero matrix in a batch leaves the others alone)."""
    W = torch.randn(3, 9, 70, device=DEVICE)
    W[1] = 0
    v = start(W)
    sigma, vo = check(W, iters=2, v=v)
    assert sigma[1] == 0 and torch.equal(vo[1], v[1]) and (sigma[[0, 2]] > 0).all()


def test_subnormal_norms_are_kept():
    """W ~ 1e-11: every ||v'||² is below fp32's smallest normal (its entries are normal). Its square root
    must not flush it to zero (GPU tl.sqrt does: sigma 0 and v unchanged); the squares themselves round to
    the subnormal grid, as they do in the plain fp32 computation."""
    W = torch.randn(8, 16, device=DEVICE) * 2e-11
    assert torch.linalg.matrix_norm(W.double(), ord=2).item() ** 4 < torch.finfo(torch.float32).smallest_normal
    sigma, _ = check(W, iters=3)
    assert sigma > 0


def test_warm_start_continues_the_iteration():
    """Passing the returned v back in continues the iteration: 2 + 3 iterations are 5 iterations."""
    W = torch.randn(2, 9, 100, device=DEVICE)
    check(W, iters=5)
    _, v2 = dk.ops.power_iteration(W, start(W), iters=2, backend="triton")
    s, v = dk.ops.power_iteration(W, v2, iters=3, backend="triton")
    (s64, v64), (s32, v32) = exact_and_plain(W, start(W), 5)
    assert_close(s.cpu(), s64, s32, what="sigma, 2 + 3 iterations")
    assert_close(v.cpu(), v64, v32, what="v, 2 + 3 iterations")


def test_converges_to_the_spectral_norm():
    """With sigma_2 / sigma_1 = 1/4, v's error shrinks 16-fold per iteration: after 12 it is far below fp32
    roundoff, so sigma and v are held to the exact ||W||_2 and top right singular vector (fp64 SVD), with the
    plain fp32 iteration's error against them as the yardstick."""
    m, n, iters = 24, 80, 12
    U, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, dtype=torch.float64))
    s = torch.cat([torch.tensor([4.0], dtype=torch.float64), torch.rand(m - 1, dtype=torch.float64)])
    W = ((U * s) @ V.T).float().to(DEVICE)
    assert n * (1 / 4) ** (2 * iters) < torch.finfo(torch.float32).eps / 2  # start transient (tan² <= n) x decay
    sigma, v = dk.ops.power_iteration(W, start(W), iters=iters, backend="triton")
    _, (s32, v32) = exact_and_plain(W, start(W), iters)
    v1 = torch.linalg.svd(W.cpu().double())[2][0]
    v1 = v1 * torch.sign(torch.dot(v1, v32.double()))
    assert_close(sigma.cpu(), oracle.singular_values(W.cpu())[0], s32, what="sigma vs ||W||_2")
    assert_close(v.cpu(), v1, v32, what="v vs the top singular vector")


def test_empty_and_fallbacks():
    """Empty W (any zero dim) returns sigma 0 and v unchanged, as the torch path; float64 takes the torch path."""
    for shape in [(3, 0, 5), (3, 5, 0), (0, 5, 6), (0, 5)]:
        W = torch.zeros(shape, device=DEVICE)
        v = torch.randn(shape[:-2] + shape[-1:], device=DEVICE)
        sigma, vo = dk.ops.power_iteration(W, v, backend="triton")
        assert torch.equal(sigma, torch.zeros(shape[:-2], device=DEVICE)) and torch.equal(vo, v)
    W = torch.randn(2, 6, 9, device=DEVICE, dtype=torch.float64)
    v0 = start(W).double()
    out = dk.ops.power_iteration(W, v0, iters=3, backend="triton")
    for a, b in zip(out, dk.ops.power_iteration(W, v0, iters=3, backend="torch")):
        assert a.dtype == torch.float64 and torch.equal(a, b)
    exact = oracle.power_iteration(W.cpu(), v0.cpu(), 3)
    plain = oracle.power_iteration(W.cpu().float(), v0.cpu().float(), 3)
    for a, e, p, what in zip(out, exact, plain, ("sigma", "v")):
        assert_close(a.cpu(), e, p, what=f"fp64 {what}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype", [((8192, 8192), torch.bfloat16), ((16, 1024, 4096), torch.bfloat16),
                                          ((16, 4096, 1024), torch.float16), ((4096, 4096), torch.float32),
                                          ((64, 20000), torch.bfloat16), ((3, 257, 129), torch.float32)])
def test_gpu_real_sizes(shape, dtype):
    """Real sizes, both paths (n = 20000 > NMAX re-reads rows in a second sweep)."""
    check(torch.randn(shape, device="cuda").to(dtype), iters=5)


@pytest.mark.gpu
def test_gpu_spectral_gap_convergence():
    """sigma_1 = 4 sigma_2: after 20 iterations sigma is ||W||_2 up to rounding (transient ~ 16^-20)."""
    W = torch.randn(4096, 1024, device="cuda", dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    S[0] = 4 * S[1]
    W = ((U * S) @ Vh).bfloat16()
    sigma, _ = dk.ops.power_iteration(W, start(W), iters=20, backend="triton")
    _, (s32, _) = exact_and_plain(W, start(W), 20)
    assert_close(sigma.cpu(), oracle.singular_values(W.cpu())[0], s32, what="sigma vs ||W||_2")


def test_batch_beyond_grid_limit_runs_in_chunks(monkeypatch):
    """Batches larger than grid axis 1 allows run in chunks (programs per matrix may differ, so the atomic
    sums may be ordered differently): each chunk within the rule, as the whole."""
    from disco_kernels.triton_kernels import power_iteration as module
    W = torch.randn(5, 7, 9, device=DEVICE)
    check(W, iters=3)
    monkeypatch.setattr(module, "MAX_GRID_Y", 2)
    check(W, iters=3)
