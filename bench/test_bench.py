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

from . import baselines, fused_update, newton_schulz, optimizer_step, power_iteration, report
from .__main__ import main
from .case import Case, Check, Plan, measure, oracle, tolerances
from .device import Device, table_peaks
from .shapes import GPT2_124M, PROXY, ns_floor_flops, ns_flops

# Fixed peaks: the tests check the arithmetic, not this machine.
CPU = Device(torch.device("cpu"), "cpu (test)", "measured", {"fp32": 0.05, "bf16": 0.05}, 10.0)
PLAN = Plan(CPU, "smoke", (torch.float32,))
# Ours ("torch") and the baselines timed against it ("reference"), each op and the whole step; the step also
# with bf16 params (from 0, as the benchmark runs them).
CASES = [c for suite in (newton_schulz, power_iteration, fused_update, optimizer_step) for c in suite.cases(PLAN)
         if c.impl in ("torch", "reference")]
CASES += [c for c in optimizer_step.cases(Plan(CPU, "smoke", (torch.bfloat16,))) if c.impl in ("torch", "reference")]


def _id(case) -> str:
    return f"{case.suite}-{case.model}-{case.case}-{case.dtype}-{case.impl}".replace(" ", "_").replace("torch.", "")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_case(benchmark, case):
    """Each case's result obeys the suite's rule (tests/tolerances.py) against the fp64 oracle
    (tests/oracle.py): the whole step's update term per param group and over all params."""
    fn, check = case.build()
    if check is not None:
        check.assert_rule(_id(case))
    benchmark(fn)


def test_reference_ns_is_the_oracle_math():
    """The bench's reference NS in fp64 is the oracle's (its fp32 run bounds it, tests/tolerances.py)."""
    G = torch.randn(3, 40, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tolerances.assert_close(baselines.reference_ns(G, dtype=torch.float64), oracle.newton_schulz(G),
                            oracle.newton_schulz(G.float()))


@pytest.mark.parametrize("name", ["torch-muon", "gram-newton-schulz", "emerging-optimizers"])
def test_installed_ns_baselines_orthogonalise(name):
    """Each baseline that imports here runs on batches and is fp64 NS with its coefficients, as exact as
    the oracle's NS iterated in the baseline's compute dtype (the rule, tests/tolerances.py)."""
    o = baselines.ns_baselines(torch.device("cpu")).get(name)
    if o is None:
        pytest.skip(f"{name} is not installed here")
    G = torch.randn(2, 40, 24, generator=torch.Generator().manual_seed(0))
    tolerances.assert_close(o.fn(G.clone()), oracle.newton_schulz(G.double(), 5, o.coefficients),
                            oracle.newton_schulz(G, 5, o.coefficients, o.compute_dtype), o.compute_dtype)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_step_in_fp64_is_the_oracle_rule(impl):
    """dk.Scion and the step baseline in fp64 (fp64 Newton-Schulz) are the oracle's Scion to rounding:
    the update term of a second step (the momentum buffer mixing two grads), per group and over all."""
    optimizer_step.step_check(impl, PROXY.scaled(8), torch.float64, PLAN, ns_dtype=torch.float64).assert_rule(impl)


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


def test_error_beyond_the_rule_is_noted():
    """The CLI reports an error past the rule's bound in the row's note, naming the part."""
    exact = {"a": torch.ones(4, dtype=torch.float64), "b": torch.ones(4, dtype=torch.float64)}
    ours = {"a": exact["a"].float(), "b": 1.3 * exact["b"].float()}
    check = Check(lambda: (ours, exact, {k: v.float() for k, v in exact.items()}), torch.float32)
    case = Case("fused_update", "m", "c", "1", torch.float32, "torch", False, flops=0, bytes=8, bound="memory",
                build=lambda: ((lambda: None), check))
    row = measure(case, PLAN)
    assert row["status"] == "ok" and row["rel_err"] > row["err_bound"] and "b 0.3 >" in row["note"]
    assert "a " not in row["note"].split(": ", 1)[1]
    with pytest.raises(AssertionError, match="b: error 0.3"):
        check.assert_rule()


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
