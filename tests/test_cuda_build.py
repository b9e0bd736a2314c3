"""CUDA extension on CPU: it imports without a driver, lists its kernels and archs, turns
failed launches into exceptions naming the kernel, and its host/device math (run on the host
through the bindings, in fp32) is within the tolerance rule (tests/tolerances.py) against the
independent oracle (tests/oracle.py): exact is the oracle in fp64 and plain the oracle in fp32, both
from the same fp32 inputs.

The fused-update helpers here (the oracle's step of a tensor, the check of a list of updated tensors)
serve test_cuda_kernels.py too."""
import importlib
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
ns_mod = importlib.import_module("disco_kernels.ops.newton_schulz")
pi_mod = importlib.import_module("disco_kernels.ops.power_iteration")


TINY = 4  # single-entry tensors per check: one rounding's luck alone, so measured together
# Host NS and power iteration: draws per check, the error measured over all of them. The host sums in plain
# sequential fp32 loops; one draw's error against plain torch's (blocked sums) is then much a matter of luck.
DRAWS = 8


# ---------------------------------------------------------------- the oracle's fused update

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


def oracle_update(p, g, buf, *, lmo, normalized, transpose, lr, momentum, scale, unconstrained, light, dtype):
    """One fused-update step of one tensor from the given inputs, computed by the oracle in ``dtype``:
    (p, g, buf) after it (buf None without one: no bufs, or light). buf = buf (1 - momentum) + g momentum
    as oracle.scion_run; p = oracle.scion_step(p, buf or g); ScionLight then scales g by 1 - momentum."""
    p, g = p.to(dtype), g.to(dtype)
    d = g
    if buf is not None and not light:
        buf = d = buf.to(dtype) * (1 - momentum) + g * momentum
    else:
        buf = None
    kw = norm_kwargs(lmo, normalized, transpose)
    p = per_matrix(lambda a, b: oracle.scion_step(a, b, lr=lr, scale=scale, unconstrained=unconstrained, norm=lmo,
                                                  norm_kwargs=kw), lmo, p, d)
    return p, (g * (1 - momentum) if light and momentum != 1 else g), buf


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


def check_update(before, after, **step):
    """``before`` and ``after``: (p, g, buf) per tensor (buf None when none was passed) of one call with
    ``step`` (oracle_update's keywords but dtype). Each written role within the rule against the oracle in
    fp64 and in the storage dtype from the same inputs, the single-entry tensors' entries together; the
    roles the step must not write (g unless ScionLight with momentum != 1, buf under ScionLight) unchanged."""
    singles = {}
    for i, (b4, now) in enumerate(zip(before, after)):
        b4, now = [t.cpu() if t is not None else None for t in b4], [t.cpu() if t is not None else None for t in now]
        exact = oracle_update(*b4, **step, dtype=torch.float64)
        plain = oracle_update(*b4, **step, dtype=plain_dtype(now[0].dtype))
        for role, t0, t1, e, p in zip(("params", "grads", "bufs"), b4, now, exact, plain):
            written = role == "params" or (role == "bufs" and e is not None) or (
                role == "grads" and step["light"] and step["momentum"] != 1)
            if not written:
                assert t0 is None or torch.equal(t1, t0), f"{role}[{i}] {tuple(t0.shape)} changed"
            elif t1.numel() == 1:
                for acc, t in zip(singles.setdefault((role, t1.dtype), ([], [], [])), (t1, e, p)):
                    acc.append(t.reshape(1))
            else:
                assert_close(t1, e, p, what=f"{role}[{i}] {tuple(t1.shape)} {t1.dtype}")
    for (role, dtype), (fast, exact, plain) in singles.items():
        assert_close(torch.cat(fast), torch.cat(exact), torch.cat(plain), dtype,
                     what=f"{role}: {len(fast)} single-entry tensors ({dtype})")


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
    """The kernel's plan (line lengths, alpha, coef) and per-element math, on the host in fp32 (a
    single-entry shape: TINY draws, measured together)."""
    lr, scale = 0.3, 2.5
    step = dict(lmo=lmo, normalized=normalized, transpose=transpose, lr=lr, momentum=momentum, scale=scale,
                unconstrained=unconstrained, light=light)
    before, after = [], []
    for _ in range(TINY if torch.Size(shape).numel() == 1 else 1):
        p32, g32, b32 = (torch.randn(shape, dtype=torch.float64).float().numpy().copy() for _ in range(3))
        before.append((torch.from_numpy(p32.copy()), torch.from_numpy(g32.copy()),
                       torch.from_numpy(b32.copy()) if use_buf else None))
        ext.host_fused_update(ext.LMOS[lmo], normalized, transpose, unconstrained, light, lr, momentum, scale,
                              list(shape), p32, g32, b32 if use_buf else None)
        after.append((torch.from_numpy(p32), torch.from_numpy(g32), torch.from_numpy(b32) if use_buf else None))
    check_update(before, after, **step)


def test_host_fused_update_update_is_visible(ext):
    """A wrong step factor would show: p starts at 0, so p' = -lr * scale * lmo(g)."""
    g32 = torch.randn(5, 40, dtype=torch.float64).float()
    p32 = np.zeros((5, 40), np.float32)
    ext.host_fused_update(ext.LMOS["RowNorm"], True, False, False, False, 0.5, 1.0, 3.0, [5, 40], p32,
                          g32.numpy().copy(), None)
    exact, plain = (-1.5 * oracle.rownorm(g32.to(d), normalized=True) for d in (torch.float64, torch.float32))
    assert_close(torch.from_numpy(p32), exact, plain, what="p' = -lr scale RowNorm(g)")


def test_fused_update_plan_errors_are_value_errors(ext):
    p = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"ColNorm needs a tensor of at least 2 dims, got shape \(5,\)"):
        ext.host_fused_update(ext.LMOS["ColNorm"], True, False, False, False, 0.1, 1.0, 1.0, [5], p, p.copy(), None)
    with pytest.raises(ValueError, match="float32"):
        ext.host_fused_update(ext.LMOS["Sign"], True, False, False, False, 0.1, 1.0, 1.0, [5], p.astype(np.float64),
                              p.copy(), None)


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
    assert_close(dk.ops.newton_schulz(G), oracle.newton_schulz(G.double()), oracle.newton_schulz(G))  # auto


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
