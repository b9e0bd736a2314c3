"""pytest-benchmark suite on tiny shapes, and checks of the benchmark machinery.

CI runs it once as a smoke test: ``python -m pytest bench -q --benchmark-disable``.
Speed targets live in ``python -m bench``, never here.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import disco_kernels as dk
from disco_kernels import reference

from . import baselines, fused_update, newton_schulz, optimizer_step, power_iteration, report
from .__main__ import main
from .case import Case, Plan, measure, rel_err
from .device import Device, table_peaks
from .shapes import GPT2_124M, PROXY, ns_floor_flops, ns_flops

# Fixed peaks: the tests check the arithmetic, not this machine.
CPU = Device(torch.device("cpu"), "cpu (test)", "measured", {"fp32": 0.05, "bf16": 0.05}, 10.0)
PLAN = Plan(CPU, "smoke", (torch.float32,))
CASES = [c for suite in (newton_schulz, power_iteration, fused_update, optimizer_step) for c in suite.cases(PLAN)
         if c.impl in ("torch", "reference")]


def _tolerance(case) -> float:
    """Error bound from the dtype the math runs in (64 ulp), not from trial and error."""
    return 64 * torch.finfo(case.compute_dtype or case.dtype).eps


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.suite}-{c.model}-{c.case}-{c.impl}".replace(" ", "_"))
def test_case(benchmark, case):
    fn, check = case.build()
    if check is not None:
        assert check() < _tolerance(case)
    benchmark(fn)


def test_reference_ns_is_the_reference_math():
    G = torch.randn(3, 40, 24, dtype=torch.float64)
    torch.testing.assert_close(baselines.reference_ns(G, dtype=torch.float64), reference.newton_schulz(G, 5))


@pytest.mark.parametrize("name", ["torch-muon", "gram-newton-schulz", "emerging-optimizers"])
def test_installed_ns_baselines_orthogonalise(name):
    """Each baseline that imports here runs on batches and matches fp64 NS with its coefficients."""
    o = baselines.ns_baselines(torch.device("cpu")).get(name)
    if o is None:
        pytest.skip(f"{name} is not installed here")
    G = torch.randn(2, 40, 24)
    want = reference.newton_schulz(G.double(), 5, o.coefficients)
    assert rel_err(o.fn(G.clone()), want) < 64 * torch.finfo(o.compute_dtype).eps


def test_reference_scion_matches_dk_scion_in_fp64():
    """The step baseline is the same rule as dk.Scion: equal to rounding in fp64."""
    model = PROXY.scaled(8)
    ours = optimizer_step.make_groups(model, torch.float64, "cpu", torch.Generator().manual_seed(1))
    theirs = [{**g, "params": [p.clone() for p in g["params"]]} for g in ours]
    for g, t in zip(ours, theirs):
        for p, q in zip(g["params"], t["params"]):
            q.grad = p.grad.clone()
        if g["norm"] == "Spectral":
            g["norm_kwargs"] = {"dtype": "float64"}
    opt = dk.Scion(ours, lr=optimizer_step.LR, momentum=optimizer_step.MOMENTUM, backend="torch")
    ref = baselines.ReferenceScion(theirs, optimizer_step.LR, optimizer_step.MOMENTUM, ns_dtype=torch.float64)
    for _ in range(2):  # the second step exercises the momentum buffers
        opt.step()
        ref.step()
    for g, t in zip(ours, theirs):
        for p, q in zip(g["params"], t["params"]):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_measure_reports_time_share_and_speedup():
    cases = [c for c in newton_schulz.cases(PLAN) if c.model == "sweep"]
    rows = [measure(c, PLAN) for c in cases]
    report.add_speedups(rows)
    assert {r["status"] for r in rows} == {"ok"}
    for r in rows:
        assert r["time_ms"] > 0 and r["tflops"] > 0 and 0 < r["share_of_peak"]
        if r["impl"] != "reference":
            assert r["speedup_vs_reference"] > 0


def test_fused_targets_cover_every_lmo():
    lmos = {lmo for _, lmo, _, _ in fused_update.targets(GPT2_124M)}
    assert lmos == {"Sign", "RowNorm", "ColNorm", "BiasRMS"}


def test_ns_flops_plain_and_symmetric_floor():
    assert ns_flops((768, 3072)) == 5 * (4 * 768 ** 2 * 3072 + 2 * 768 ** 3)
    assert ns_flops((3072, 768)) == ns_flops((768, 3072))
    assert ns_flops((12, 64, 768)) == 12 * ns_flops((64, 768))
    # X Xᵀ and A A computed one triangle each: half their 2 m² n and 2 m³.
    assert ns_floor_flops((768, 3072)) == ns_flops((768, 3072)) - 5 * (768 ** 2 * 3072 + 768 ** 3)
    case = next(c for c in newton_schulz.cases(PLAN) if c.impl == "torch")
    assert case.floor_flops == ns_floor_flops(tuple(map(int, case.shape.split("x"))))
    assert case.floor_seconds(CPU) == case.flops / 0.05e12  # DESIGN.md's share of peak: 4m²n + 2m³
    assert case.floor_seconds(CPU, case.floor_flops) == case.floor_flops / 0.05e12


def test_interpreted_triton_is_timed_only_when_named(monkeypatch):
    monkeypatch.setattr(dk, "available_backends", lambda device: ["torch", "triton"])
    assert Plan(CPU, "smoke").our_impls(("torch", "triton")) == ["torch"]
    assert Plan(CPU, "smoke", impls=frozenset({"triton"})).our_impls(("torch", "triton")) == ["triton"]


def test_failed_error_check_still_times():
    def build():
        def check():
            raise MemoryError("fp64 twin")
        return (lambda: None), check
    case = Case("fused_update", "m", "c", "1", torch.float32, "torch", False, flops=0, bytes=8, bound="memory",
                build=build)
    row = measure(case, PLAN)
    assert row["status"] == "ok" and math.isnan(row["rel_err"]) and "fp64 twin" in row["note"]


def test_step_compiles_last(monkeypatch):
    """torch.compile's minutes come after every model's eager step, so a time limit cuts compile first."""
    monkeypatch.setattr(dk, "available_backends", lambda device: ["torch"])
    impls = [c.impl for c in optimizer_step.cases(Plan(CPU, "quick", (torch.float32,), compile=True))]
    assert "compile" in impls and impls.index("compile") == len(impls) - impls.count("compile")


def test_model_sizes():
    assert abs(GPT2_124M.n_params() - 163.0e6) < 1e6   # 124M + the untied 38.6M head
    assert abs(PROXY.n_params() - 69.8e6) < 0.1e6       # the paper's 69M proxy


@pytest.mark.parametrize("name, label", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe")])
def test_peak_table(name, label):
    assert table_peaks(name)[0] == label


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "NVIDIA GH200 480GB", "NVIDIA H20"])
def test_peak_table_unknown_gpu(name):
    assert table_peaks(name) is None


def test_cli_keeps_every_case_and_stops_cleanly_on_sigint(tmp_path, monkeypatch):
    """Results are on disk after each case; SIGINT (a stage's time limit) writes the rest as skipped."""
    import bench.__main__ as cli
    out = tmp_path / "r"
    timed = []

    def fake_measure(case, plan):
        if len(timed) == 2:
            assert len(json.loads((out / "results.json").read_text())["rows"]) == 2
            raise KeyboardInterrupt
        timed.append(case)
        return {**cli._skipped(case), "status": "ok", "time_ms": 1.0, "share_of_peak": 0.5}
    monkeypatch.setattr(cli, "measure", fake_measure)
    main(["--smoke", "--suites", "fused_update", "--no-plots", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows[:2]] == ["ok", "ok"] and len(rows) > 3
    assert {r["status"] for r in rows[2:]} == {"skipped: interrupted"}
    assert not list(out.glob("*.tmp"))


def test_cli_time_limit_and_out_template(tmp_path):
    out = main(["--smoke", "--suites", "fused_update", "--time-limit", "0", "--no-plots",
                "--out", str(tmp_path / "{device}-{date}")])
    assert out.parent == tmp_path and out.name.startswith("cpu-2")
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows and {r["status"] for r in rows} == {"skipped: time limit"}


def test_cli_writes_results_and_plots(tmp_path):
    out = main(["--smoke", "--suites", "newton_schulz,step", "--dtypes", "fp32", "--out", str(tmp_path / "r")])
    data = json.loads((out / "results.json").read_text())
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["peak_gbps"] > 0 and env["peak_tflops"]["fp32"] > 0
    rows = data["rows"]
    assert {r["suite"] for r in rows} == {"newton_schulz", "step"}
    assert all(r["status"] == "ok" and r["time_ms"] > 0 and r["share_of_peak"] > 0 for r in rows)
    assert all(math.isfinite(r["speedup_vs_reference"]) for r in rows if r["impl"] != "reference")
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == len(rows) + 1
    for png in ("time_vs_size.png", "share_of_peak.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
