"""pytest-benchmark suite on tiny shapes, and checks of the benchmark machinery.

CI runs it once as a smoke test: ``python -m pytest bench -q --benchmark-disable``.
Speed targets live in ``python -m bench``, never here.
"""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import disco_kernels as dk

from . import __main__ as cli
from . import baselines, compare, fused_update, newton_schulz, optimizer_step, power_iteration, report
from .__main__ import main
from .case import Case, Check, Plan, measure, measure_group, oracle, tolerances
from .device import Device, table_peaks
from .memory import peak_extra_bytes, running_peak
from .shapes import GPT2_124M, PROXY, ns_floor_flops, ns_flops, step_bytes
from .timing import NOISY_SPREAD, interleaved, percentiles

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


def test_step_bytes_floor_is_an_independent_count():
    """Floor of a step's bytes for a tiny param list, counted by hand: every element of every param reads
    g and reads + writes p (fp32: 4 + 8 bytes) and, with momentum, reads + writes its buffer (8 more);
    each Spectral param's Newton-Schulz reads and writes X once per step in its iteration dtype."""
    groups = [("input", "ColNorm", {"transpose": True}, [("embed", (10, 4))]),
              ("hidden", "Spectral", {}, [("w", (3, 5)), ("batch", (2, 3, 5))]),                 # bf16, 5 steps
              ("hidden32", "Spectral", {"dtype": "float32", "steps": 3}, [("v", (4, 6))]),     # fp32, 3 steps
              ("vectors", "BiasRMS", {}, [("gain", (7,))])]
    numel = 40 + 15 + 30 + 24 + 7
    newton_schulz_bytes = 5 * (2 * 15 * 2) + 5 * (2 * 30 * 2) + 3 * (2 * 24 * 4)
    assert step_bytes(groups, 4, momentum=0.1) == numel * (4 + 8 + 8) + newton_schulz_bytes
    assert step_bytes(groups, 4, momentum=1.0) == numel * (4 + 8) + newton_schulz_bytes
    assert step_bytes(groups, 2, momentum=1.0) == numel * (2 + 4) + newton_schulz_bytes


def test_peak_extra_bytes_counts_the_temporaries():
    """(x * 2) + 1 holds two x-sized tensors at once (the product, then the sum), an in-place op none; memory
    allocated before the call does not count."""
    x = torch.randn(256, 512)
    cpu = torch.device("cpu")
    small = 1024  # the 0-d tensors of wrapped Python scalars
    assert 2 * x.nbytes <= peak_extra_bytes(lambda: (x * 2) + 1, cpu) < 2 * x.nbytes + small
    assert 0 <= peak_extra_bytes(lambda: x.mul_(1.5), cpu) < small
    assert running_peak([(2, -5), (0, 10), (1, 3), (3, 4)]) == 13   # in time order: 10, 13, 8, 12
    assert running_peak([(0, -8)]) == 0                               # freeing older memory: no extra


def test_captured_row_only_with_a_gpu_and_captured_step(monkeypatch):
    """The captured-vs-eager row (GPT-2 124M, bf16) is planned only on CUDA with dk.CapturedStep; its build
    runs on the CPU with dk.CapturedStep where the package has it (every step eager there, after a notice)
    and with a stand-in that steps eagerly."""
    class StandIn:
        def __init__(self, optimizer):
            self.step = optimizer.step
    assert optimizer_step.captured_cases(PLAN) == []
    if hasattr(dk, "CapturedStep"):
        step, check = optimizer_step._captured_build(PLAN, GPT2_124M.scaled(24), "captured")()
        with pytest.warns(UserWarning, match="CapturedStep"):
            step()
        step()
        assert check is None
    monkeypatch.setattr(dk, "CapturedStep", StandIn, raising=False)
    gpu = Plan(Device(torch.device("cuda"), "gpu (test)", "measured", {"bf16": 1.0}, 1.0), "smoke", (torch.bfloat16,))
    assert optimizer_step.captured_cases(PLAN) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert optimizer_step.captured_cases(PLAN) == []   # a CPU plan, even where a GPU is there
    cases = optimizer_step.captured_cases(gpu)
    assert [(c.impl, c.baseline, c.dtype, c.model) for c in cases] == [
        ("eager", True, torch.bfloat16, "gpt2-124m/24"), ("captured", False, torch.bfloat16, "gpt2-124m/24")]
    for impl in ("eager", "captured"):
        step, check = optimizer_step._captured_build(PLAN, GPT2_124M.scaled(24), impl)()
        step()
        assert check is None


class _FakeSide:
    """A bench.compare worker that takes ``ms`` per step and logs what it is asked into ``log``."""

    def __init__(self, name, ms, log, fail=False):
        self.name, self.ms, self.log, self.fail = name, ms, log, fail

    def request(self, op, **msg):
        self.log.append(f"{op} {self.name}")
        if op == "build" and self.fail:
            raise compare.SideError(f"{self.name}: cannot build")
        return {"seconds": [self.ms / 1e3] * msg.get("n", msg.get("warmup", 1))} if op in ("build", "time") else {}


def test_compare_interleaves_the_sides_and_reports_errors():
    """Both sides build, then timed bursts alternate with the order flipped every round (so drift falls on
    both alike); a side that fails gives the case an error row and frees both."""
    log = []
    sides = {"base": _FakeSide("base", 20.0, log), "current": _FakeSide("current", 10.0, log)}
    row = compare.compare_case(sides, {"op": "build", "warmup": 1}, (0.0, 2, 10, 0.0))
    assert log == ["build base", "build current", "time base", "time current", "time current", "time base",
                   "free base", "free current"]
    assert row["status"] == "ok" and row["rounds"] == 2 and row["speedup"] == pytest.approx(2.0)
    assert (row["base_ms"], row["current_ms"], row["ratio_q1"], row["ratio_q3"]) == pytest.approx((20, 10, 2, 2))
    log.clear()
    sides["base"].fail = True
    row = compare.compare_case(sides, {"op": "build", "warmup": 1}, (0.0, 2, 10, 0.0))
    assert row == {"status": "error: base: cannot build"} and log == ["build base", "free base", "free current"]


@pytest.mark.slow
def test_compare_against_head_writes_its_table(tmp_path):
    """bench.compare in its smoke preset against HEAD: a worktree of HEAD and the working tree, each in its
    own process, every smoke model timed on both sides (numbers, not speeds, are checked), the worktree
    removed afterwards."""
    try:
        compare._git("rev-parse", "--verify", "HEAD")
    except Exception:
        pytest.skip("not in a git checkout")
    out = compare.main(["--base", "HEAD", "--smoke", "--out", str(tmp_path / "c")])
    with (out / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["dtype"], r["impl"]) for r in rows] == [
        ("gpt2-124m/24", "fp32", "torch"), ("proxy-4x256/8", "fp32", "torch")]
    for r in rows:
        assert r["status"] == "ok" and int(r["rounds"]) == 2
        base, current = float(r["base_ms"]), float(r["current_ms"])
        assert base > 0 and current > 0 and float(r["speedup"]) == pytest.approx(base / current)
    table = (out / "compare.md").read_text()
    assert "| model | dtype | impl | base ms | current ms | speedup |" in table and "gpt2-124m/24" in table
    assert str(tmp_path) not in compare._git("worktree", "list")


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

    def fake_measure(cases, plan):
        if len(timed) >= 2:
            assert len(json.loads((out / "results.json").read_text())["rows"]) == len(timed)
            raise KeyboardInterrupt
        timed.extend(cases)
        return [{**cli._skipped(c), "status": "ok", "time_ms": 1.0, "share_of_peak": 0.5} for c in cases]
    monkeypatch.setattr(cli, "measure_group", fake_measure)
    main(["--smoke", "--suites", "fused_update", "--no-plots", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    n = len(timed)
    assert n >= 2 and [r["status"] for r in rows[:n]] == ["ok"] * n and len(rows) > n + 1
    assert {r["status"] for r in rows[n:]} == {"skipped: interrupted"}
    assert not list(out.glob("*.tmp"))


def test_cli_time_limit_and_out_template(tmp_path):
    out = main(["--smoke", "--suites", "fused_update", "--time-limit", "0", "--no-plots",
                "--out", str(tmp_path / "{device}-{date}")])
    assert out.parent == tmp_path and out.name.startswith("cpu-2")
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows and {r["status"] for r in rows} == {"skipped: time limit"}


def test_cli_writes_results_and_plots(tmp_path):
    history = tmp_path / "history.csv"
    out = main(["--smoke", "--suites", "newton_schulz,step", "--dtypes", "fp32", "--out", str(tmp_path / "r"),
                "--history", str(history)])
    data = json.loads((out / "results.json").read_text())
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["peak_gbps"] > 0 and env["peak_tflops"]["fp32"] > 0
    rows = data["rows"]
    assert {r["suite"] for r in rows} == {"newton_schulz", "step"}
    assert all(r["status"] == "ok" and r["time_ms"] > 0 and r["share_of_peak"] > 0 for r in rows)
    assert all(0 < r["p20_ms"] <= r["time_ms"] <= r["p80_ms"] and r["compute"] and r["peak_dtype"] for r in rows)
    # like with like: every Newton-Schulz baseline iterates in the dtype ours does (fp32 here)
    assert {r["compute"] for r in rows if r["suite"] == "newton_schulz" and r["baseline"]} == {"fp32"}
    assert all(r["compute"].startswith("fp32 params, bf16 NS") for r in rows if r["suite"] == "step")
    with history.open() as f:
        hist = list(csv.DictReader(f))
    assert len(hist) == len(rows) and hist[0]["revision"] and hist[0]["machine"] and hist[0]["date"]
    assert all(math.isfinite(r["speedup_vs_reference"]) for r in rows if r["impl"] != "reference")
    for r in (r for r in rows if r["suite"] == "step"):  # floor bytes beyond the update's; memory measured
        assert r["floor_bytes"] > r["bytes"] > 0 and "floor_bytes_share" not in r   # (a GPU-only share)
        assert r["peak_extra_bytes"] > 0 and r["reference_peak_extra_bytes"] > 0
    assert "extra MB" in report.table(rows)
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == len(rows) + 1
    for png in ("time_vs_size.png", "share_of_peak.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_percentiles_are_ordered_and_exact():
    assert percentiles([5.0]) == (5.0, 5.0, 5.0)
    xs = [9.0, 1.0, 5.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 10.0, 100.0]
    p20, p50, p80 = percentiles(xs)
    assert p20 <= p50 <= p80
    assert (p20, p50, p80) == pytest.approx((3.0, 6.0, 9.0))   # inclusive quantiles of 1..10 and 100
    import random
    rng = random.Random(0)
    for _ in range(200):
        p20, p50, p80 = percentiles([rng.expovariate(1.0) for _ in range(rng.randint(2, 30))])
        assert p20 <= p50 <= p80


def test_interleaved_alternates_and_times_each_call():
    """Warm-ups first, then one burst per implementation per round, the order flipping every round."""
    log, now = [], [0.0]

    def clock():
        return now[0]

    def fn(name, ms):
        def f():
            log.append(name)
            now[0] += ms / 1e3
        return f
    times = interleaved([fn("a", 10.0), fn("b", 30.0)], torch.device("cpu"), "smoke", [2, 1], clock=clock)
    assert log[:3] == ["a", "a", "b"]  # warm-up calls (the last one timed as the estimate)
    timed = log[3:]  # bursts of one call (the smoke budget): a b, then b a, ... in an even number of rounds
    assert len(timed) % 4 == 0 and timed == ["a", "b", "b", "a"] * (len(timed) // 4)
    assert len(times[0]) >= 3 and len(times[1]) >= 3
    assert times[0] == pytest.approx([0.01] * len(times[0])) and times[1] == pytest.approx([0.03] * len(times[1]))


def test_measure_group_reports_spread_and_flags_noise(monkeypatch):
    """Each row gets p20 <= median <= p80 of its own calls; a spread past NOISY_SPREAD flags it noisy, and the
    run's warnings name it."""
    import bench.case as case_mod
    fake = [[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]]
    monkeypatch.setattr(case_mod, "interleaved", lambda fns, *a, **k: fake[:len(fns)])
    mk = lambda impl, base: Case("fused_update", "m", "c", "1", torch.float32, impl, base, flops=0, bytes=8,  # noqa
                                 bound="memory", build=lambda: ((lambda: None), None))
    quiet, noisy = measure_group([mk("torch", False), mk("reference", True)], PLAN)
    assert (quiet["p20_ms"], quiet["time_ms"], quiet["p80_ms"]) == (1e3, 1e3, 1e3) and not quiet["noisy"]
    assert noisy["p20_ms"] < noisy["time_ms"] < noisy["p80_ms"] and noisy["spread"] > NOISY_SPREAD and noisy["noisy"]
    warnings = cli.noise_warnings([quiet, noisy], {"start": 0.0, "end": 0.0}, 2)
    assert len(warnings) == 1 and "noisy rows: 1 of 2" in warnings[0] and "reference" in warnings[0]
    assert cli.noise_warnings([quiet], {"start": 0.0, "end": 0.0}, 2) == []


def test_load_average_above_the_cores_warns():
    assert cli.load_warning("start", 2.0, 2) is None
    assert "load average 2.50 above the 2 cores at the end" in cli.load_warning("end", 2.5, 2)
    w = cli.noise_warnings([], {"start": 3.1, "end": 1.0}, 2)
    assert len(w) == 1 and "start" in w[0]


def test_history_appends_rows_with_date_revision_machine(tmp_path):
    path = tmp_path / "h" / "history.csv"
    row = {"suite": "step", "model": "m", "case": "c", "shape": "-", "dtype": "fp32", "impl": "torch",
           "baseline": False, "status": "ok", "time_ms": 2.0, "p20_ms": 1.5, "p80_ms": 2.5, "compute": "fp32"}
    assert report.append_history([row, {**row, "status": "skipped: time limit"}], path, "cpu, 2 cores", "quick",
                                 date="2026-12-02T10:00:00", revision="abc1234") == 1
    assert report.append_history([{**row, "time_ms": 3.0}], path, "cpu, 2 cores", "quick") == 1
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["p50_ms"] for r in rows] == ["2.0", "3.0"] and path.read_text().count("date,revision") == 1
    assert (rows[0]["date"], rows[0]["revision"], rows[0]["machine"]) == ("2026-12-02T10:00:00", "abc1234",
                                                                          "cpu, 2 cores")
    assert rows[1]["revision"] and rows[1]["date"].startswith("20")


def _ok_row(suite, model, case, impl, baseline, ms, share, peak="fp32", dtype="fp32", compute="fp32"):
    return {"suite": suite, "model": model, "case": case, "shape": "1", "dtype": dtype, "impl": impl,
            "baseline": baseline, "status": "ok", "time_ms": ms, "share_of_peak": share, "bytes": 8,
            "compute": compute, "peak_dtype": peak}


def test_no_empty_plot(tmp_path, capsys):
    """A suite with no rows for time_vs_size (Newton-Schulz without its sweep) writes no empty plot, says so
    and removes a stale one; share_of_peak still plots what exists. With no rows at all, no plot."""
    (tmp_path / "time_vs_size.png").write_bytes(b"stale")
    rows = [_ok_row("newton_schulz", "gpt2", "c_fc", "torch", False, 1.0, 0.5),
            _ok_row("newton_schulz", "gpt2", "c_fc", "reference", True, 2.0, 0.25)]
    files = report.plot(rows, tmp_path, "t")
    assert [f.name for f in files] == ["share_of_peak.png"] and not (tmp_path / "time_vs_size.png").exists()
    assert "time_vs_size.png: not written" in capsys.readouterr().out
    assert report.plot([], tmp_path / "none", "t") == [] and not (tmp_path / "none" / "share_of_peak.png").exists()
    rows.append(_ok_row("newton_schulz", "sweep", "n=16", "torch", False, 1.0, 0.5))
    files = report.plot(rows, tmp_path, "t")
    assert [f.name for f in files] == ["time_vs_size.png", "share_of_peak.png"]


def test_one_peak_per_case():
    """Every row of a case is scored against the peak of the dtype ours computes in, whatever a baseline
    computes in: a slower baseline can never show a larger share than ours."""
    dev = Device(torch.device("cpu"), "cpu (test)", "measured", {"fp32": 1.0, "bf16": 0.01}, 10.0)
    plan = Plan(dev, "smoke", (torch.float32,))
    mk = lambda impl, base, cdt: Case("newton_schulz", "m", "c", "8x8", torch.float32, impl, base, flops=1e9,  # noqa
                                      bytes=0, bound="compute", build=lambda: ((lambda: None), None), compute_dtype=cdt)
    import bench.case as case_mod
    real = case_mod.interleaved
    try:
        case_mod.interleaved = lambda fns, *a, **k: [[1.0], [2.0]]
        ours, base = measure_group([mk("torch", False, torch.float32), mk("reference", True, torch.bfloat16)], plan)
    finally:
        case_mod.interleaved = real
    assert ours["peak_dtype"] == base["peak_dtype"] == "fp32" and base["compute"] == "bf16"
    assert ours["share_of_peak"] == pytest.approx(2 * base["share_of_peak"])
