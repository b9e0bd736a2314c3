"""Triton power iteration vs the fp64 reference from the same start vector and iteration count.

W is read exactly in every storage dtype (the reference takes the same values in fp64), so all
the error is the kernels' fp32 arithmetic: each iteration's v' entries are sums of m·n products.
Runs interpreted on CPU (NMAX = 64: rows wider than 64 take the two-sweep path), at real sizes on
a GPU. bf16 is tested here too: the kernels load and convert it, they use no tl.dot.
"""
import pytest
import torch

import disco_kernels as dk
from disco_kernels import reference as ref
from tolerances import reduction_tol, rel_err, unit

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(W, iters=3, v=None):
    """(sigma, v) of the Triton backend match the fp64 reference: the error is within the torch
    backend's (fp32 math) plus the bound for ``iters`` rounds of m·n-term fp32 sums."""
    v = ref.default_start_vector(W) if v is None else v
    sigma, vo = dk.ops.power_iteration(W, v, iters, backend="triton")
    assert sigma.shape == W.shape[:-2] and vo.shape == v.shape
    assert sigma.dtype == vo.dtype == torch.float32
    s_ref, v_ref = ref.power_iteration(W.double(), v.double(), iters)
    s_t, v_t = dk.ops.power_iteration(W, v, iters, backend="torch")
    tol = iters * reduction_tol(torch.float32, W.size(-2) * W.size(-1))
    assert rel_err(sigma, s_ref) <= 1.25 * rel_err(s_t, s_ref) + tol
    assert rel_err(vo, v_ref) <= 1.25 * rel_err(v_t, v_ref) + tol
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
    v = ref.default_start_vector(W)
    sigma, vo = check(W, iters=2)
    assert sigma[1] == 0 and torch.equal(vo[1], v[1]) and (sigma[[0, 2]] > 0).all()


def test_subnormal_norms_are_kept():
    """W ~ 1e-11: every ||v'||² is below fp32's smallest normal (its entries are normal). Its square root
    must not flush it to zero (GPU tl.sqrt does: sigma 0 and v unchanged). The squares of v' entries round
    to the subnormal grid, off by up to tiny u each: a relative n tiny u / ||v'||² on ||v'||² (least at the
    first iteration: ||WᵀW v|| only grows)."""
    W = torch.randn(8, 16, device=DEVICE) * 2e-11
    W64, v = W.double(), ref.default_start_vector(W)
    tiny = torch.finfo(torch.float32).smallest_normal
    assert torch.linalg.matrix_norm(W64, ord=2).item() ** 4 < tiny
    ss1 = (W64.T @ (W64 @ v.double())).square().sum().item()
    sigma, vo = dk.ops.power_iteration(W, v, 3, backend="triton")
    s_ref, v_ref = ref.power_iteration(W64, v.double(), 3)
    tol = 3 * reduction_tol(torch.float32, W.numel()) + 16 * tiny * unit(torch.float32) / ss1
    assert rel_err(sigma, s_ref) <= tol and rel_err(vo, v_ref) <= tol


def test_warm_start_continues_the_iteration():
    """Passing the returned v back in continues the iteration: 2 + 3 iterations == 5 at once."""
    W = torch.randn(2, 9, 100, device=DEVICE)
    s5, v5 = check(W, iters=5)
    _, v2 = dk.ops.power_iteration(W, iters=2, backend="triton")
    s, v = dk.ops.power_iteration(W, v2, iters=3, backend="triton")
    tol = 5 * reduction_tol(torch.float32, 9 * 100)
    assert rel_err(s, s5) <= tol and rel_err(v, v5) <= tol


def test_converges_to_the_spectral_norm():
    """With sigma_2 / sigma_1 = 1/4, v's error shrinks 16-fold per iteration: after 12 it is far
    below fp32 roundoff and sigma is ||W||_2 to within one iteration's rounding."""
    m, n, iters = 24, 80, 12
    U, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, dtype=torch.float64))
    s = torch.cat([torch.tensor([4.0], dtype=torch.float64), torch.rand(m - 1, dtype=torch.float64)])
    W = ((U * s) @ V.T).float().to(DEVICE)
    assert n * (1 / 4) ** (2 * iters) < unit(torch.float32)  # start-vector transient (tan² <= n) times decay
    sigma, v = dk.ops.power_iteration(W, iters=iters, backend="triton")
    exact = torch.linalg.matrix_norm(W.double(), ord=2)
    tol = reduction_tol(torch.float32, m * n)
    assert rel_err(sigma, exact) <= tol
    v1 = torch.linalg.svd(W.double())[2][0]
    assert 1 - abs(torch.dot(v.double(), v1)).item() <= tol


def test_empty_and_fallbacks():
    """Empty W (any zero dim) returns sigma 0 and v unchanged, as the torch path; float64 takes the torch path."""
    for shape in [(3, 0, 5), (3, 5, 0), (0, 5, 6), (0, 5)]:
        W = torch.zeros(shape, device=DEVICE)
        v = torch.randn(shape[:-2] + shape[-1:], device=DEVICE)
        sigma, vo = dk.ops.power_iteration(W, v, backend="triton")
        assert torch.equal(sigma, torch.zeros(shape[:-2], device=DEVICE)) and torch.equal(vo, v)
    W = torch.randn(2, 6, 9, device=DEVICE, dtype=torch.float64)
    for a, b in zip(dk.ops.power_iteration(W, iters=3, backend="triton"),
                    dk.ops.power_iteration(W, iters=3, backend="torch")):
        assert a.dtype == torch.float64 and torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype", [((8192, 8192), torch.bfloat16), ((16, 1024, 4096), torch.bfloat16),
                                          ((16, 4096, 1024), torch.float16), ((4096, 4096), torch.float32),
                                          ((64, 20000), torch.bfloat16), ((3, 257, 129), torch.float32)])
def test_gpu_real_sizes(shape, dtype):
    """Real sizes, both paths (n = 20000 > NMAX re-reads rows in a second sweep)."""
    check(torch.randn(shape, device="cuda").to(dtype), iters=5)


@pytest.mark.gpu
def test_gpu_spectral_gap_convergence():
    W = torch.randn(4096, 1024, device="cuda", dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    S[0] = 4 * S[1]
    W = ((U * S) @ Vh).bfloat16()
    sigma, _ = dk.ops.power_iteration(W, iters=20, backend="triton")
    assert rel_err(sigma, torch.linalg.matrix_norm(W.double(), ord=2)) <= reduction_tol(torch.float32, W.numel())


def test_batch_beyond_grid_limit_runs_in_chunks(monkeypatch):
    """Batches larger than grid axis 1 allows run in chunks (programs per matrix may differ, so the atomic
    sums may be ordered differently: equal up to fp32 reductions)."""
    from disco_kernels.triton_kernels import power_iteration as module
    W = torch.randn(5, 7, 9, device=DEVICE)
    whole = dk.ops.power_iteration(W, iters=3, backend="triton")
    monkeypatch.setattr(module, "MAX_GRID_Y", 2)
    for a, b in zip(dk.ops.power_iteration(W, iters=3, backend="triton"), whole):
        assert a.shape == b.shape and rel_err(a, b) <= 3 * reduction_tol(torch.float32, 7 * 9)
