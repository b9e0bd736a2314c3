"""Gram-space Newton-Schulz (``method="gram"``, and what ``method="auto"`` picks) against the independent fp64
oracle (tests/oracle.py's standard iteration: the Gram form is the same X in exact arithmetic) under the one
tolerance rule (tests/tolerances.py): at most 1.25x the error of the plain standard iteration in the same dtype,
plus 4 u.

Gaussian G is well conditioned off the square; the Gram form's weak point is the small singular values of an
ill-conditioned G (R = X Xᵀ squares them), so every dtype also runs decaying and low-rank spectra, where an R or
a polynomial kept in the iteration dtype is up to 1000x (bf16) or 150x (fp32, with fp32 R) off. Rank-1 G (one
scalar trajectory, see test_ops.py) is checked in fp32 only, over a batch. Triton runs interpreted on CPU
(tests/conftest.py): bf16 tiles are multiplied in fp32 there and fp32 -> bf16 casts truncate."""
import importlib
import math

import pytest
import torch

import disco_kernels as dk
import oracle
from tolerances import assert_close

ns = importlib.import_module("disco_kernels.ops.newton_schulz")
BACKENDS = ["torch"] + (["triton"] if "triton" in dk.available_backends("cpu") else [])
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
LINES = 8  # rank-1 shapes in fp32: lines per check


def check(G, steps=5, coefficients="jordan", dtype=None, backend="torch", method="gram", what=""):
    """NS of G by ``method`` within the rule against the oracle's fp64 standard iteration; plain: the oracle's
    standard iteration in ``dtype`` (default G's)."""
    dtype = dtype or G.dtype
    out = dk.ops.newton_schulz(G, steps, coefficients, dtype=dtype, backend=backend, method=method)
    assert out.shape == G.shape and out.dtype == dtype and out.is_contiguous()
    exact = oracle.newton_schulz(G.double(), steps, coefficients)
    plain = oracle.newton_schulz(G, steps, coefficients, dtype)
    assert_close(out, exact, plain, dtype, what=f"{method} NS of {tuple(G.shape)} {what}")
    return out


def spectrum(m, n, kind, gen):
    """(m, n) G = U diag(s) Vᵀ in fp32 with singular values s of ``kind`` (fp64 orthogonal factors)."""
    U = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(n, m, dtype=torch.float64, generator=gen))[0]
    i = torch.arange(1, m + 1, dtype=torch.float64)
    s = {"decay": 1 / i, "exp": torch.exp(-20 * i / m), "lowrank": torch.where(i <= 4, 1.0, 1e-3),
         "cond1e4": torch.logspace(0, -4, m, dtype=torch.float64)}[kind]
    return ((U * s) @ V.mT).float()


# aspect 1:1 to 1:16, wide and tall, batched; m = 24 for the torch path
@pytest.mark.parametrize("shape", [(24, 24), (24, 48), (24, 96), (24, 192), (24, 384), (192, 24), (3, 12, 96)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_gaussian(shape, dtype):
    check(torch.randn(shape).to(dtype))


@pytest.mark.parametrize("kind", ["decay", "exp", "lowrank", "cond1e4"])
@pytest.mark.parametrize("aspect", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_torch_ill_conditioned(kind, aspect, dtype):
    """Where an R (or polynomial) in the iteration dtype loses the small singular values (see the module doc)."""
    G = spectrum(48, 48 * aspect, kind, torch.Generator().manual_seed(aspect))
    check(G.to(dtype), what=kind)


@pytest.mark.parametrize("coefficients,steps", [("polar_express", 5), ("polar_express", 7), ("jordan", 1),
                                                ([(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)], 3), ("jordan", 0)])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_schedules(coefficients, steps, backend, dtype):
    """Each schedule and step count (zero steps: X0 itself; one step: no R update)."""
    check(torch.randn(2, 20, 50).to(dtype), steps, coefficients, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_zero_empty_nonfinite(backend):
    for dtype in (torch.bfloat16, torch.float32):
        assert dk.ops.newton_schulz(torch.zeros(2, 4, 9), dtype=dtype, backend=backend, method="gram").abs().max() == 0
        for shape in [(0, 5, 6), (3, 0, 5), (3, 5, 0), (0, 5)]:
            out = dk.ops.newton_schulz(torch.zeros(shape), dtype=dtype, backend=backend, method="gram")
            assert out.shape == shape and out.dtype == dtype
        G = torch.randn(5, 8)
        G[1, 2] = float("nan")
        assert torch.isnan(dk.ops.newton_schulz(G, dtype=dtype, backend=backend, method="gram")).all()
    for shape in [(LINES, 1, 1), (LINES, 1, 33), (LINES, 33, 1)]:  # rank 1: a batch, fp32 (the module doc)
        check(torch.randn(shape), backend=backend)
    for coefficients in ("jordan", "polar_express"):  # ||G||_F at the schedule's eps
        G = torch.randn(2, 6, 30)
        check(G * (1e-6 / G.norm(dim=(-2, -1), keepdim=True)), coefficients=coefficients, backend=backend)


@pytest.mark.parametrize("method", ["standard", "gram"])
def test_fp32_at_2_18_entries(method):
    """128 x 2048 in fp32 (Gram's side of the CPU threshold): X0's norm, summed in fp32 on CPU, must stay near u
    (vector_norm's reduction was 1.7e-6 off there: 1.7x the rule for either method)."""
    check(torch.randn(128, 2048, generator=torch.Generator().manual_seed(16)), method=method)


# Triton: 16 x 16 tiles under the interpreter, so m = 40 has a 3 x 3 tile grid (mirrors, edges); (20, 70) and
# (70, 20) mask the last row and k tiles; (1, 40) is m = 1. fp32 iterations take the torch path (fp64 polynomial).
@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
@pytest.mark.parametrize("shape", [(2, 40, 90), (20, 70), (70, 20), (2, 1, 40), (3, 5, 9)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton(shape, dtype):
    check(torch.randn(shape), dtype=dtype, backend="triton")


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
def test_triton_ill_conditioned_strided_and_fp32():
    check(spectrum(40, 160, "decay", torch.Generator().manual_seed(0)), dtype=torch.bfloat16, backend="triton")
    base = torch.randn(90, 2, 40)
    check(base[:, 0, :].T, dtype=torch.bfloat16, backend="triton")  # (40, 90), column stride 80
    check(base[:, 1, :33], dtype=torch.float16, backend="triton")  # tall (90, 33), fp32 in, fp16 out
    G = torch.randn(2, 20, 50)
    assert torch.equal(dk.ops.newton_schulz(G, backend="triton", method="gram"),
                       dk.ops.newton_schulz(G, backend="torch", method="gram"))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
def test_triton_batch_beyond_grid_limit(monkeypatch):
    from disco_kernels.triton_kernels import newton_schulz as module
    G = torch.randn(5, 30, 12)
    whole = dk.ops.newton_schulz(G, 2, dtype=torch.bfloat16, backend="triton", method="gram")
    monkeypatch.setattr(module, "MAX_GRID_Y", 2)
    assert torch.equal(dk.ops.newton_schulz(G, 2, dtype=torch.bfloat16, backend="triton", method="gram"), whole)


def test_method_is_validated():
    G = torch.randn(4, 8)
    for bad in ("fast", "Gram", None, 1):
        with pytest.raises(ValueError, match="method must be one of 'auto', 'standard', 'gram'"):
            dk.ops.newton_schulz(G, method=bad)
    with pytest.raises(ValueError, match="method='gram' needs a dtype wider"):
        dk.ops.newton_schulz(G, dtype=torch.float64, method="gram")
    with pytest.raises(RuntimeError, match="method='gram'.*no cuda kernel"):
        dk.ops.newton_schulz(G, backend="cuda", method="gram")


def _runs(G, dtype, backend="torch"):
    """Which method "auto" ran, told by the bits of its result."""
    auto = dk.ops.newton_schulz(G, dtype=dtype, backend=backend)
    gram = dk.ops.newton_schulz(G, dtype=dtype, backend=backend, method="gram")
    standard = dk.ops.newton_schulz(G, dtype=dtype, backend=backend, method="standard")
    assert not torch.equal(gram, standard)
    return "gram" if torch.equal(auto, gram) else "standard" if torch.equal(auto, standard) else "neither"


def test_auto_follows_the_thresholds(monkeypatch):
    """On a CPU without 16-bit units: 16-bit always Gram, fp32 from 1:16 (tall too); fp64 never; "cpu16"
    (oneDNN multiplies the dtype) never for 16-bit."""
    monkeypatch.setattr(ns, "cpu_multiplies", lambda dtype: False)
    assert _runs(torch.randn(16, 16), torch.bfloat16) == "gram"
    assert _runs(torch.randn(16, 16), torch.float16) == "gram"
    assert _runs(torch.randn(16, 128), torch.float32) == "standard"
    assert _runs(torch.randn(256, 16), torch.float32) == "gram"
    assert _runs(torch.randn(2, 16, 256), torch.float32) == "gram"
    G = torch.randn(4, 256, dtype=torch.float64)
    assert torch.equal(dk.ops.newton_schulz(G), dk.ops.newton_schulz(G, method="standard"))
    monkeypatch.setattr(ns, "cpu_multiplies", lambda dtype: True)
    assert _runs(torch.randn(16, 512), torch.bfloat16) == "standard"
    monkeypatch.setitem(ns.GRAM_MIN_ASPECT, ("cpu", 4), 2.0)
    monkeypatch.setattr(ns, "cpu_multiplies", lambda dtype: False)
    assert _runs(torch.randn(16, 32), torch.float32) == "gram"
    assert _runs(torch.randn(16, 31), torch.float32) == "standard"


def test_auto_never_on_the_fused_kernels():
    """The fused small-matrix kernels (CUDA; Triton's one-launch path) keep "auto" standard; the Triton tiled
    path and CUDA tensors use the "gpu" thresholds."""
    G = torch.randn(8, 512)
    assert ns.choose_method("auto", "cuda", G, torch.bfloat16) == "standard"
    assert ns.gram_is_faster("triton", torch.randn(64, 64 * 32), torch.bfloat16) == (
        ns.GRAM_MIN_ASPECT["gpu", 2] <= 32)
    if "triton" in BACKENDS:
        assert ns.choose_method("auto", "triton", G, torch.bfloat16) == "standard"  # 8 x 512 fits the fused tile
        assert _runs(torch.randn(20, 70), torch.bfloat16, "triton") == "standard"  # 1:3.5 on the "gpu" threshold
    assert ns.choose_method("gram", "torch", G, torch.bfloat16) == "gram"
    assert ns.choose_method("standard", "torch", G, torch.bfloat16) == "standard"


def test_spectral_lmo_takes_auto(monkeypatch):
    """Spectral calls newton_schulz without ``method``: on a CPU without bf16 units its bf16 iteration is Gram,
    within the rule of the oracle's Spectral LMO."""
    monkeypatch.setattr(ns, "cpu_multiplies", lambda dtype: False)
    g = torch.randn(32, 96)
    out = dk.lmo.Spectral().lmo(g)
    gram = dk.ops.newton_schulz(g, dtype=torch.bfloat16, method="gram") * math.sqrt(32 / 96)
    assert torch.equal(out, gram.to(out.dtype))
    assert_close(out, oracle.spectral(g.double()), oracle.spectral(g, dtype=torch.bfloat16), torch.bfloat16)


@torch.compile(fullgraph=True)
def _compiled(G):
    return (dk.ops.newton_schulz(G, dtype=torch.bfloat16, method="gram"), dk.ops.newton_schulz(G, 3, "polar_express"),
            dk.ops.newton_schulz(G, method="standard"))


def test_torch_compile_and_opcheck():
    """Inductor traces the op with ``method`` (bit for bit as eager: the op is opaque); opcheck with it given."""
    G = torch.randn(2, 24, 8)
    want = (dk.ops.newton_schulz(G, dtype=torch.bfloat16, method="gram"), dk.ops.newton_schulz(G, 3, "polar_express"),
            dk.ops.newton_schulz(G, method="standard"))
    for got, w in zip(_compiled(G), want):
        assert got.dtype == w.dtype and torch.equal(got, w)
    jordan = [3.4445, -4.775, 2.0315]
    for args in [(G, jordan * 2, 1.0, 1e-7, torch.bfloat16, "torch", "gram"),
                 (torch.randn(7, 5), jordan, 1.0, 1e-7, torch.float32, "torch", "gram")]:
        torch.library.opcheck(torch.ops.disco_kernels.newton_schulz.default, args)


@pytest.mark.parametrize("method", ["standard", "gram"])
def test_spectral_norm_kwarg_forces_the_method(monkeypatch, method):
    """norm_kwargs={"method": ...} reaches the op (the op's own tests check each method's numbers)."""
    seen = []
    real = torch.ops.disco_kernels.newton_schulz

    class Spy:
        def __call__(self, *args):
            seen.append(args[-1])
            return real(*args)
    monkeypatch.setattr(torch.ops.disco_kernels, "newton_schulz", Spy())
    p = torch.nn.Parameter(torch.randn(8, 32))
    p.grad = torch.randn(8, 32)
    dk.Scion([p], norm="Spectral", norm_kwargs={"method": method, "dtype": "float32"}, backend="torch").step()
    assert seen == [method]


def test_spectral_rejects_a_bad_method_before_any_step():
    with pytest.raises(ValueError, match="method must be one of"):
        dk.lmo.Spectral(method="fast")
    with pytest.raises(ValueError, match="method='gram' needs a dtype wider"):
        dk.lmo.Spectral(method="gram", dtype="float64")
