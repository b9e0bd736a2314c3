"""Backend choice: which GPUs the compiled CUDA code and the Triton kernels can run on, and what
"auto" and a forced backend do on the others; "auto" takes only backends a GPU run verified
(devices faked on CPU; the launch guard on 2 GPUs)."""
import dataclasses
import datetime
import pathlib
import warnings
from types import SimpleNamespace

import pytest
import torch

import disco_kernels as dk
from disco_kernels import __main__ as cli
from disco_kernels import _backend, _verified

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

    def make(cc, archs=BUILT, runtime="", trust=True):
        """``trust``: DISCO_TRUST_UNVERIFIED=1, so that "auto" takes what is available, verified or not."""
        if trust:
            monkeypatch.setenv(_backend.TRUST_ENV, "1")
        else:
            monkeypatch.delenv(_backend.TRUST_ENV, raising=False)
        monkeypatch.setattr(_backend, "_capability", lambda index: cc)
        monkeypatch.setattr(_backend, "_warned", set())
        ext = SimpleNamespace(kernels=("newton_schulz",), cuda_archs=archs, cuda_runtime_version=13000,
                              runtime_status=lambda: runtime)
        monkeypatch.setattr(_backend, "cuda_extension", lambda: ext)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
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


# ---------------------------------------------------------------- only verified backends for "auto"

def record(cc=(9, 0), date="2026-12-01", device="NVIDIA H200"):
    return _verified.Record(device=device, capability=cc, torch="2.13.0", triton="3.9.0", cuda="13.0", date=date,
                            command="bash scripts/gpu_session.sh OUT_DIR", result="bench/results/h200/tests.log",
                            tests="12 passed")


@pytest.fixture
def verified(monkeypatch):
    """verified(backend=[records]...): this table instead of the package's."""
    def make(**records):
        table = {"cuda": (), "triton": (), **{b: tuple(r) for b, r in records.items()}}
        monkeypatch.setattr(_verified, "VERIFIED", table)
    make()
    return make


def test_auto_takes_only_verified_backends(fake_gpu, verified):
    device = fake_gpu((9, 0), trust=False)
    assert _backend.resolve("auto", device, "newton_schulz", KERNELS) == "torch"  # available, not verified
    verified(triton=[record()])
    assert _backend.resolve("auto", device, "newton_schulz", KERNELS) == "triton"
    verified(cuda=[record()])
    assert _backend.resolve("auto", device, "newton_schulz", KERNELS) == "cuda"
    verified(cuda=[record()], triton=[record()])
    assert _backend.resolve("auto", device, "newton_schulz", KERNELS) == "cuda"
    # the CUDA kernel cannot take this input: the next verified backend, else torch
    assert _backend.resolve("auto", device, "newton_schulz", KERNELS, lambda: "too large") == "triton"
    verified(cuda=[record()])
    assert _backend.resolve("auto", device, "newton_schulz", KERNELS, lambda: "too large") == "torch"


def test_verification_needs_the_same_compute_capability(fake_gpu, verified):
    verified(cuda=[record((8, 0))], triton=[record((9, 0))])
    for cc, want in (((8, 0), "cuda"), ((8, 6), "torch"), ((9, 0), "triton"), ((10, 0), "torch"), ((12, 0), "torch")):
        assert _backend.resolve("auto", fake_gpu(cc, trust=False), "newton_schulz", KERNELS) == want, cc
    device = fake_gpu((8, 6), trust=False)
    assert "not verified on compute capability 8.6" in _backend.unverified_reason("cuda", device)
    assert _backend.unverified_reason("torch", device) is None
    assert _backend.unverified_reason("cuda", torch.device("cpu")) is None  # off CUDA: not a question
    # the latest matching record is the one shown
    verified(cuda=[record((9, 0), "2026-12-01"), record((9, 0), "2027-01-05", "NVIDIA H100"), record((8, 0))])
    assert _verified.record_for("cuda", (9, 0)).device == "NVIDIA H100"
    assert _verified.record_for("cuda", (8, 9)) is None and _verified.record_for("triton", (9, 0)) is None


@pytest.mark.parametrize("value,want", [("1", "cuda"), ("0", "torch"), ("", "torch"), ("yes", "torch")])
def test_trust_env_lets_auto_take_unverified_backends(fake_gpu, verified, monkeypatch, value, want):
    device = fake_gpu((9, 0), trust=False)
    monkeypatch.setenv(_backend.TRUST_ENV, value)
    assert _backend.resolve("auto", device, "newton_schulz", KERNELS) == want


def test_forced_unverified_backend_runs_and_warns_once(fake_gpu, verified):
    device = fake_gpu((9, 0), trust=False)
    for backend in ("cuda", "triton"):
        with pytest.warns(_backend.UnverifiedBackendWarning, match=rf"backend='{backend}' forced: .*not verified on "
                                                                      r"compute capability 9\.0"):
            assert _backend.resolve(backend, device, "newton_schulz", KERNELS) == backend
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _backend.resolve(backend, device, "newton_schulz", KERNELS) == backend  # once
    verified(cuda=[record()])
    device = fake_gpu((9, 0), trust=False)  # (a fresh warning set)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve("cuda", device, "newton_schulz", KERNELS) == "cuda"  # verified: no warning
    with pytest.raises(RuntimeError, match="has no power_iteration kernel"):  # unavailable still raises first
        _backend.resolve("cuda", device, "power_iteration", KERNELS)


def test_cli_names_the_verified_state(fake_gpu, verified, monkeypatch, capsys):
    device = fake_gpu((9, 0), trust=False)
    text = "\n".join(cli.verification_lines(device, "3.9.0"))
    assert "cuda: not verified on any GPU yet" in text and "triton: not verified on any GPU yet" in text
    assert "auto on cuda:0 (Fake GPU, compute capability 9.0):" in text
    assert "newton_schulz: torch\n    passes over cuda: cuda is not verified on compute capability 9.0" in text
    verified(triton=[record((9, 0))], cuda=[record((8, 0), device="NVIDIA A100")])
    text = "\n".join(cli.verification_lines(device, "3.10.1"))
    assert "triton: verified on NVIDIA H200 (compute capability 9.0), torch 2.13.0, triton 3.9.0" in text
    assert "now triton 3.10.1 (recorded 3.9.0)" in text  # information: the capability is what matches
    assert "cuda: verified on NVIDIA A100 (compute capability 8.0)" in text
    assert "newton_schulz: triton (where its kernel takes the input, else the next)" in text
    assert "passes over cuda: cuda is not verified on compute capability 9.0" in text
    # off a GPU it says so; the trust variable is named when set
    monkeypatch.setenv(_backend.TRUST_ENV, "1")
    monkeypatch.setattr(cli, "self_check", lambda: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main() == 0
    out = capsys.readouterr().out
    assert "auto on this machine's GPU: no GPU here" in out and "DISCO_TRUST_UNVERIFIED=1: auto takes" in out
    assert "cuda: verified on NVIDIA A100" in out and "triton: verified on NVIDIA H200" in out


def test_package_table_is_well_formed():
    """Every record names a capability, an ISO date and a committed result file, under a backend auto tries."""
    root = pathlib.Path(__file__).resolve().parents[1]
    assert set(_verified.VERIFIED) == set(_backend.AUTO_ORDER)
    for backend, records in _verified.VERIFIED.items():
        for r in records:
            assert isinstance(r, _verified.Record), (backend, r)
            assert len(r.capability) == 2 and all(isinstance(x, int) for x in r.capability), r
            datetime.date.fromisoformat(r.date)
            assert (root / r.result).is_file(), f"{backend}: {r.result} is not committed"


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_cuda_kernels" name="test_a[x]"/>
<testcase classname="tests.test_cuda_kernels" name="test_b"><skipped message="s"/></testcase>
<testcase classname="tests.test_triton_newton_schulz" name="test_c">{triton}</testcase>
<testcase classname="tests.test_triton_power_iteration.TestX" name="test_d"><skipped message="s"/></testcase>
<testcase classname="tests.test_optim" name="test_e[cuda]">{shared}</testcase>
</testsuite></testsuites>"""


@pytest.mark.parametrize("triton,shared,exit,want", [
    ("", "", 0, {"cuda": None, "triton": None}),
    ('<failure message="f"/>', "", 1, {"cuda": None, "triton": "1 of its GPU tests failed"}),
    ('<error message="e"/>', "", 1, {"cuda": None, "triton": "1 of its GPU tests failed"}),
    ('<skipped message="s"/>', "", 0, {"cuda": None, "triton": "none of its GPU tests passed"}),
    ("", '<failure message="f"/>', 1, {"cuda": "1 shared GPU tests failed", "triton": "1 shared GPU tests failed"}),
    ("", "", 2, {"cuda": "pytest exited with 2", "triton": "pytest exited with 2"}),
    ("", "", 124, {"cuda": "pytest exited with 124", "triton": "pytest exited with 124"}),
])
def test_gpu_run_verdicts(tmp_path, triton, shared, exit, want):
    path = tmp_path / "tests.xml"
    path.write_text(JUNIT.format(triton=triton, shared=shared))
    counts = _verified.tally(str(path))
    assert counts["cuda"] == {"passed": 1, "failed": 0, "skipped": 1}
    got = _verified.verdicts(counts, exit)
    assert set(got) == set(want)
    for backend, why in want.items():
        assert (got[backend] is None) if why is None else why in got[backend], (backend, got[backend])


def test_gpu_run_prints_records_to_paste(tmp_path, monkeypatch, capsys):
    """On the GPU the tests ran on, a passing backend's record is printed as Python to paste into VERIFIED."""
    path = tmp_path / "tests.xml"
    path.write_text(JUNIT.format(triton='<failure message="f"/>', shared=""))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _verified.main(["--junit", str(path), "--exit", "1", "--command", "bash scripts/gpu_session.sh OUT"]) == 0
    out = capsys.readouterr().out
    assert "# triton: not verified: 1 of its GPU tests failed" in out
    assert "# cuda: verified; add to VERIFIED['cuda']" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("Record("))
    rec = eval(line.strip().rstrip(","), {"Record": _verified.Record})
    assert rec.capability == (9, 0) and rec.device == "NVIDIA H200" and rec.torch == torch.__version__
    assert rec.command == "bash scripts/gpu_session.sh OUT" and rec.tests == "1 passed, 1 skipped (shared: 1 passed)"
    assert rec.result == f"bench/results/h200-{rec.date}/tests.log"
    monkeypatch.setattr(_verified, "VERIFIED", {"cuda": (rec,), "triton": ()})
    assert _verified.record_for("cuda", (9, 0)) == dataclasses.replace(rec)


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


def test_fused_update_backend_choice_on_cpu():
    """fused_update's choice from kind and line dims (no norm names): CPU tensors run on torch under "auto",
    on a forced available backend as asked, and a forced CUDA kernel without a GPU is refused by name, also
    through a norm's ``check_backend`` (which the optimizer calls before a step)."""
    import importlib
    fu = importlib.import_module("disco_kernels.ops.fused_update")
    p, x = torch.zeros(4, 6), torch.zeros(4, 6, dtype=torch.bfloat16)
    for kind, dims in (("line", [-2]), ("sign", [-1]), ("scaled", [-1])):
        assert fu.choose_backend("auto", [p], [x], None, kind, dims, False) == "torch"
        for backend in dk.available_backends("cpu"):
            assert fu.choose_backend(backend, [p], [x], None, kind, dims, False) == backend
        with pytest.raises(RuntimeError, match=r"^backend='cuda' is unavailable for fused_update"):
            fu.choose_backend("cuda", [p], [x], None, kind, dims, False)
    with pytest.raises(RuntimeError, match=r"^backend='cuda' is unavailable for fused_update"):
        dk.lmo.ColNorm(transpose=True).check_backend("cuda", (4, 6), p, p)
    dk.lmo.ColNorm(transpose=True).check_backend("torch", (4, 6), p, p)
