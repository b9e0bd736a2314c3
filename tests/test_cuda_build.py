"""CUDA extension on CPU: it imports without a driver, lists its kernels and archs, turns
failed launches into exceptions naming the kernel, and its host/device math (run on the host
through the bindings) matches the fp64 reference."""
import importlib
import os
import shutil

import numpy as np
import pytest
import torch

import disco_kernels as dk
from disco_kernels import _backend
from disco_kernels import reference as ref
from tolerances import elementwise_tol, reduction_tol, rel_err, unit

fu_mod = importlib.import_module("disco_kernels.ops.fused_update")
ns_mod = importlib.import_module("disco_kernels.ops.newton_schulz")
pi_mod = importlib.import_module("disco_kernels.ops.power_iteration")


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


UPDATE_CASES = [  # lmo, normalized, transpose, shape
    ("Sign", True, False, (7, 129)), ("Sign", False, False, (33,)),
    ("RowNorm", True, False, (7, 129)), ("RowNorm", False, False, (129,)), ("RowNorm", True, True, (129, 7)),
    ("RowNorm", True, False, (2, 5, 9)),
    ("ColNorm", False, False, (129, 7)), ("ColNorm", True, False, (7, 129)), ("ColNorm", False, True, (50, 24)),
    ("ColNorm", True, True, (2, 5, 9)),
    ("BiasRMS", True, False, (129,)), ("BiasRMS", True, False, (6, 10)), ("BiasRMS", True, False, (3, 4, 5)),
    ("BiasRMS", True, False, ()), ("Sign", True, False, (1, 1)), ("RowNorm", True, False, (1, 1)),
]


@pytest.mark.parametrize("lmo,normalized,transpose,shape", UPDATE_CASES)
@pytest.mark.parametrize("momentum,use_buf,light,unconstrained", [
    (1.0, False, False, False), (0.1, True, False, False), (0.1, True, False, True), (0.3, False, True, False)])
def test_host_fused_update_vs_fp64(ext, lmo, normalized, transpose, shape, momentum, use_buf, light, unconstrained):
    """The kernel's plan (line lengths, alpha, coef) and per-element math, on the host in fp32."""
    p, g, buf = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    lr, scale = 0.3, 2.5
    fn = fu_mod.lmo_fn(lmo, normalized, transpose)
    p_ref, buf_ref = ref.scion_update(p, g, buf if use_buf else None, fn, lr, momentum if use_buf else 1.0, scale,
                                      unconstrained)
    p32, g32, b32 = (t.float().numpy().copy() for t in (p, g, buf))
    ext.host_fused_update(ext.LMOS[lmo], normalized, transpose, unconstrained, light, lr, momentum, scale,
                          list(shape), p32, g32, b32 if use_buf else None)
    tol = reduction_tol(torch.float32, max(p.numel(), 2))
    assert rel_err(torch.from_numpy(p32), p_ref) < tol
    if use_buf:
        assert rel_err(torch.from_numpy(b32), buf_ref) < tol
    g_ref = g * (1 - momentum) if light else g
    assert rel_err(torch.from_numpy(g32), g_ref) < tol


def test_host_fused_update_update_is_visible(ext):
    """A wrong step factor would show: p starts at 0, so p' = -lr * scale * lmo(g) exactly."""
    g = torch.randn(5, 40, dtype=torch.float64)
    p32, g32 = np.zeros((5, 40), np.float32), g.float().numpy().copy()
    ext.host_fused_update(ext.LMOS["RowNorm"], True, False, False, False, 0.5, 1.0, 3.0, [5, 40], p32, g32, None)
    assert rel_err(torch.from_numpy(p32), -1.5 * ref.lmo_rownorm(g, True)) < elementwise_tol(torch.float32, 40)


def test_fused_update_plan_errors_are_value_errors(ext):
    p = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"ColNorm needs a tensor of at least 2 dims, got shape \(5,\)"):
        ext.host_fused_update(ext.LMOS["ColNorm"], True, False, False, False, 0.1, 1.0, 1.0, [5], p, p.copy(), None)
    with pytest.raises(ValueError, match="float32"):
        ext.host_fused_update(ext.LMOS["Sign"], True, False, False, False, 0.1, 1.0, 1.0, [5], p.astype(np.float64),
                              p.copy(), None)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 129), (1, 129, 7), (3, 7, 29)])
def test_host_power_iteration_vs_fp64(ext, shape):
    W = torch.randn(shape, dtype=torch.float64)
    v0 = ref.default_start_vector(W)
    sigma, v = ext.host_power_iteration(W.float().numpy(), v0.numpy(), 4)
    sigma_ref, v_ref = ref.power_iteration(W, v0.double(), 4)
    tol = elementwise_tol(torch.float32, 4 * shape[-1])
    assert rel_err(torch.from_numpy(sigma), sigma_ref) < tol and rel_err(torch.from_numpy(v), v_ref) < 16 * tol


def test_host_power_iteration_zero_keeps_v(ext):
    v0 = ref.default_start_vector(torch.zeros(2, 3, 4))
    sigma, v = ext.host_power_iteration(np.zeros((2, 3, 4), np.float32), v0.numpy(), 2)
    assert (sigma == 0).all() and np.array_equal(v, v0.numpy())


def test_host_power_iteration_nan_reaches_sigma(ext):
    """A diverged (NaN) matrix must not read as sigma = 0; its neighbour in the batch is unaffected."""
    W = torch.randn(2, 5, 6)
    W[0, 2, 3] = float("nan")
    sigma, _ = ext.host_power_iteration(W.numpy(), ref.default_start_vector(W).numpy(), 2)
    sigma_ref, _ = ref.power_iteration(W.double(), None, 2)
    assert np.isnan(sigma[0]) and sigma_ref[0].isnan() and np.isfinite(sigma[1])


@pytest.mark.parametrize("shape", [(1, 1), (7, 29), (29, 7), (16, 16)])
@pytest.mark.parametrize("coefficients", ["jordan", "polar_express", [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]])
def test_host_newton_schulz_vs_fp64(ext, shape, coefficients):
    """Normalisation, tall-matrix indexing and the (a, b, c) order the op passes to the kernel."""
    G = torch.randn(shape, dtype=torch.float64)
    triples, mult, eps = ref.ns_schedule(coefficients, 5)
    out = ext.host_newton_schulz(G.float().numpy(), [x for t in triples for x in t], mult, eps)
    exact = ref.newton_schulz(G, 5, coefficients)
    assert rel_err(torch.from_numpy(out), exact) <= 1.5 * rel_err(ref.newton_schulz(G.float(), 5, coefficients), exact) + 64 * unit(torch.float32)


def test_launch_errors_name_the_kernel(ext):
    """Shared memory beyond any GPU's limit: the launcher reports it, naming the kernel (with or without a GPU)."""
    with pytest.raises(RuntimeError, match="newton_schulz_small_kernel"):
        ext.newton_schulz_small(1, 1, 0, 0, 1, 128, 2000, [3.4445, -4.775, 2.0315], 1.0, 1e-7, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver path; on a GPU the launch would run")
def test_launches_without_driver_raise(ext):
    with pytest.raises(RuntimeError, match="power_iteration pass_kernel"):
        ext.power_iteration(1, 0, 1, 8, 8, 0, 0, 0, 0, 1, 0)
    with pytest.raises(RuntimeError, match="fused_update_kernel"):
        ext.fused_update(1, 0, True, False, False, False, False, 0.1, 1.0, 1.0, [0], [0], [0], [[4, 4]], 0)


def test_binding_argument_checks(ext):
    with pytest.raises(ValueError, match="min\\(m, n\\) must be <= 128"):
        ext.newton_schulz_small(1, 1, 0, 0, 1, 129, 300, [1.0, 0.0, 0.0], 1.0, 1e-7, 0)
    with pytest.raises(ValueError, match="n <= 16384"):
        ext.power_iteration(1, 0, 1, 8, 16385, 0, 0, 0, 0, 1, 0)
    with pytest.raises(ValueError, match="unknown lmo"):
        ext.fused_update(1, 9, True, False, False, False, False, 0.1, 1.0, 1.0, [0], [0], [0], [[4]], 0)


def test_negative_sizes_are_value_errors(ext):
    """A negative size reaching a kernel would index before its buffers (pass_kernel writes out[n])."""
    for m, n in ((-1, 8), (8, -1)):
        with pytest.raises(ValueError, match="power_iteration: sizes must be non-negative"):
            ext.power_iteration(1, 0, 1, m, n, 0, 0, 0, 0, 1, 0)
        with pytest.raises(ValueError, match="newton_schulz_small: sizes must be non-negative"):
            ext.newton_schulz_small(1, 1, 0, 0, 1, m, n, [1.0, 0.0, 0.0], 1.0, 1e-7, 0)
    with pytest.raises(ValueError, match=r"negative size in shape \(-2, -3\)"):
        ext.fused_update(1, 1, True, False, False, False, False, 0.1, 1.0, 1.0, [0], [0], [0], [[-2, -3]], 0)


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
    assert rel_err(dk.ops.newton_schulz(G), ref.newton_schulz(G.double())) < 1e-4  # auto: torch on CPU


def test_newton_schulz_cuda_limits_explained(ext):
    why = ns_mod.cuda_unsupported(torch.empty(129, 300), torch.bfloat16, 5)
    assert "min(m, n) <= 128" in why and "(129, 300)" in why
    assert "bfloat16 or float16" in ns_mod.cuda_unsupported(torch.empty(8, 8), torch.float32, 5)
    assert "at most 64 steps" in ns_mod.cuda_unsupported(torch.empty(8, 8), torch.bfloat16, 65)
    assert "bfloat16" in str(ns_mod.cuda_unsupported(torch.empty(8, 8, dtype=torch.float64), torch.bfloat16, 5))


def test_fused_update_cuda_limits_explained(ext):
    p = [torch.empty(4, 4)]
    assert "must match" in fu_mod.cuda_unsupported(p, [torch.empty(4, 4, dtype=torch.bfloat16)], None, "Sign",
                                                   False, True, False)
    assert "at least 2 dims" in fu_mod.cuda_unsupported([torch.empty(4)], [torch.empty(4)], None, "ColNorm",
                                                        False, True, False)
    assert fu_mod.cuda_unsupported(p, [torch.empty(4, 4)], [torch.empty(4, 4)], "RowNorm", True, True, False) is None
    two = [torch.empty(4, 4), torch.empty(4, 4, device="meta")]
    assert "one device" in fu_mod.cuda_unsupported(two, two, None, "Sign", False, True, False)
