"""Backend choice: which GPUs the compiled CUDA code and the Triton kernels can run on, and what
"auto" and a forced backend do on the others (devices faked on CPU; the launch guard on 2 GPUs)."""
from types import SimpleNamespace

import pytest
import torch

import disco_kernels as dk
from disco_kernels import _backend

KERNELS = ("torch", "triton", "cuda")
BUILT = "sm_80,sm_90a,compute_90 (PTX)"  # what the default DISCO_CUDA_ARCHS=80;90a reports


@pytest.mark.parametrize("arch,cc,runs", [
    ("sm_80", (8, 0), True), ("sm_80", (8, 6), True), ("sm_80", (8, 9), True), ("sm_80", (9, 0), False),
    ("sm_80", (7, 5), False), ("sm_90a", (9, 0), True), ("sm_90a", (10, 0), False), ("sm_86", (8, 0), False),
    ("compute_90 (PTX)", (12, 0), True), ("compute_90 (PTX)", (9, 0), True), ("compute_90 (PTX)", (8, 9), False),
    ("sm_100", (10, 3), True), ("bogus", (9, 0), False),
])
def test_arch_runs(arch, cc, runs):
    assert _backend.arch_runs(arch, cc) is runs


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend cuda:0 has a given compute capability and an extension built for BUILT."""
    if _backend.triton_error() is not None:
        pytest.skip("needs Triton importable")

    def make(cc, archs=BUILT, runtime=""):
        monkeypatch.setattr(_backend, "_capability", lambda index: cc)
        ext = SimpleNamespace(kernels=("newton_schulz",), cuda_archs=archs, cuda_runtime_version=13000,
                              runtime_status=lambda: runtime)
        monkeypatch.setattr(_backend, "cuda_extension", lambda: ext)
        _backend.runtime_status.cache_clear()
        return torch.device("cuda", 0)
    yield make
    _backend.runtime_status.cache_clear()


@pytest.mark.parametrize("cc,want", [((7, 0), "torch"), ((7, 5), "torch"), ((8, 0), "cuda"), ((8, 6), "cuda"),
                                     ((9, 0), "cuda"), ((10, 0), "cuda"), ((12, 0), "cuda")])
def test_auto_skips_what_cannot_run(fake_gpu, cc, want):
    device = fake_gpu(cc)
    assert _backend.resolve("auto", device, "newton_schulz", KERNELS) == want
    expected = ["torch"] + (["triton", "cuda"] if want == "cuda" else [])
    assert _backend.available_backends(device) == expected


def test_auto_takes_triton_when_the_build_misses_the_gpu(fake_gpu):
    device = fake_gpu((9, 0), archs="sm_80")
    assert _backend.resolve("auto", device, "newton_schulz", KERNELS) == "triton"
    with pytest.raises(RuntimeError, match=r"built for sm_80.*compute capability 9\.0.*DISCO_CUDA_ARCHS including 90"):
        _backend.resolve("cuda", device, "newton_schulz", KERNELS)


def test_auto_passes_over_a_runtime_the_driver_cannot_run(fake_gpu):
    device = fake_gpu((9, 0), runtime="cudaErrorInsufficientDriver (CUDA driver version is insufficient)")
    assert _backend.resolve("auto", device, "newton_schulz", KERNELS) == "triton"
    with pytest.raises(RuntimeError, match=r"runtime \(CUDA 13\.0, linked statically\) cannot run here: "
                                           r"cudaErrorInsufficientDriver.*rebuild"):
        _backend.resolve("cuda", device, "newton_schulz", KERNELS)


def test_forced_backend_on_an_old_gpu_is_clear(fake_gpu):
    device = fake_gpu((7, 5))

    def never():
        raise AssertionError("the input check runs only once the backend is available")
    with pytest.raises(RuntimeError, match=r"backend='cuda' is unavailable.*compute capability 7\.5"):
        _backend.resolve("cuda", device, "newton_schulz", KERNELS, never)
    with pytest.raises(RuntimeError, match=r"backend='triton' is unavailable.*>= 8\.0.*7\.5"):
        _backend.resolve("triton", device, "newton_schulz", KERNELS)


def test_input_check_decides_between_cuda_and_triton(fake_gpu):
    device = fake_gpu((9, 0))
    assert _backend.resolve("auto", device, "newton_schulz", KERNELS, lambda: "too large") == "triton"
    assert _backend.resolve("auto", device, "newton_schulz", KERNELS, lambda: None) == "cuda"
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run newton_schulz on G of shape \(4, 5\): too large"):
        _backend.resolve("cuda", device, "newton_schulz", KERNELS, lambda: "too large", "G of shape (4, 5)")
    with pytest.raises(RuntimeError, match="has no power_iteration kernel"):
        _backend.resolve("cuda", device, "power_iteration", KERNELS)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_kernels_run_on_the_tensors_gpu(backend):
    """Tensors on cuda:1 while cuda:0 is current: every op launches on cuda:1 and matches cuda:0."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    if backend not in dk.available_backends("cuda:1"):
        pytest.skip(f"{backend} unavailable")
    torch.cuda.set_device(0)
    G = torch.randn(3, 40, 72, device="cuda:0")
    results = []
    for dev in ("cuda:0", "cuda:1"):
        g = G.to(dev)
        ns = dk.ops.newton_schulz(g, dtype=torch.bfloat16, backend=backend)
        sigma, v = dk.ops.power_iteration(g, iters=3, backend=backend)
        p, grad, buf = g.clone(), g.flip(-1).contiguous(), torch.zeros_like(g)
        dk.ops.fused_update([p], [grad], [buf], lmo="RowNorm", lr=0.1, momentum=0.5, backend=backend)
        torch.cuda.synchronize(dev)
        assert {t.device for t in (ns, sigma, v, p, buf)} == {torch.device(dev)}
        results.append([t.cpu() for t in (ns, sigma, v, p, buf)])
    for a, b in zip(*results):  # same kernels on the same data; only reduction order may differ
        torch.testing.assert_close(a, b)
