"""``python -m bench [--quick | --smoke] [--out DIR]``: time every op and the whole
optimizer step against the reference and peers, with the share of the device's peak.

Writes results.json, results.csv (after every case, so a run killed at a time
limit keeps what it timed; on SIGINT it also writes the plots and the table)
and PNG plots to ``--out`` (default bench/out/{device}-{date}/) and prints a
short table. With no flag it runs the full suite (real shapes on
a GPU); ``--quick`` fits in two minutes on a 2-core CPU (shapes scaled down on
CPU, and said so); ``--smoke`` is a seconds-long run on tiny shapes (the test
suite uses it). Each case's ``rel_err`` is against the test suite's independent
fp64 oracle (tests/oracle.py) and ``err_bound`` is the suite's one tolerance rule
for it (tests/tolerances.py); a case beyond it gets a note. The whole-step rows also give the floor of
the bytes a step moves and its peak extra memory, ours beside the reference's.

The implementations of a case (ours and its baselines, each baseline at the iteration dtype ours runs in)
are timed interleaved (bench/timing.py); each row has ``compute`` (what it computes in), the median
``time_ms`` with ``p20_ms`` and ``p80_ms``, and ``share_of_peak`` against one peak per case, that of the dtype
ours computes in (``peak_dtype``). The run warns when the 1-minute load average is above the core count at
its start or end, or rows spread past timing.NOISY_SPREAD, and appends its timed rows to ``--history``
(bench/results/history.csv; not with --smoke) with date, git revision and machine.

``python -m bench.compare --base REV [--quick]`` times the whole step of a git revision and of the
working tree side by side, interleaved in one run (bench/compare.py).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import os
import sys
import time
from pathlib import Path

import torch

from . import fused_update, newton_schulz, optimizer_step, power_iteration, report
from .case import Plan, measure_group
from .device import Device, detect, dtype_name, environment
from .shapes import OP_MODELS, STEP_MODELS, for_preset

SUITES = {"newton_schulz": newton_schulz, "power_iteration": power_iteration, "fused_update": fused_update,
          "step": optimizer_step}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_OUT = str(Path(__file__).parent / "out" / "{device}-{date}")
DEFAULT_HISTORY = str(Path(__file__).parent / "results" / "history.csv")
QUICK_LIMIT = 100.0  # seconds of cases in --quick, leaving room for setup and plots within two minutes


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short run (< 2 min on a 2-core CPU)")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes, seconds (CI)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="output directory; {device} and {date} are filled in (default bench/out/{device}-{date})")
    ap.add_argument("--suites", default=",".join(SUITES), help=f"comma list, run in that order, of {', '.join(SUITES)}")
    ap.add_argument("--impls", help="comma list of implementations to time (e.g. torch,compile,reference); "
                    "naming triton times it even interpreted on a CPU")
    ap.add_argument("--dtypes", help="comma list of fp32, bf16, fp16 (default: fp32,bf16 in full runs; "
                    "else bf16 on a GPU, fp32 on a CPU)")
    ap.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--time-limit", type=float, metavar="S",
                    help=f"start no case after S seconds, the rest written as skipped (default: {QUICK_LIMIT:.0f} "
                    "with --quick, which keeps its promise on a loaded machine; else none)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--history", metavar="CSV",
                    help=f"append every timed row (date, git revision, machine) to CSV (default {DEFAULT_HISTORY}; "
                    "none with --smoke unless given)")
    ap.add_argument("--no-history", action="store_true", help="append nothing to the history CSV")
    return ap.parse_args(argv)


def _progress(groups, total):
    """The groups of cases, with a progress bar (tqdm, when installed) counting cases."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        with tqdm(total=total, unit="case", dynamic_ncols=True) as bar:
            for group in groups:
                yield group
                bar.update(len(group))
        return
    done = 0
    for group in groups:
        c = group[0]
        done += len(group)
        print(f"[{done}/{total}] {c.suite} {c.model} {c.case} {'/'.join(x.impl for x in group)}", flush=True)
        yield group


def group_cases(todo) -> list[list]:
    """Consecutive cases of one suite, model, case, shape and dtype: the implementations timed interleaved."""
    return [list(g) for _, g in itertools.groupby(todo, key=lambda c: (c.suite, c.model, c.case, c.shape, c.dtype))]


def load_warning(when: str, load: float, cores: int) -> str | None:
    """A warning when the 1-minute load average ``load`` is above the core count (other jobs share the cores)."""
    if load > cores:
        return (f"noisy machine: 1-minute load average {load:.2f} above the {cores} cores at the {when} of the run "
                "(other jobs share the cores; times are less trustworthy)")
    return None


def noise_warnings(rows, loads: dict, cores: int) -> list[str]:
    """The run's noise warnings: the load average at its start and end (``loads``) above the core count, and rows
    whose spread (p80 - p20) / p50 is past timing.NOISY_SPREAD."""
    from .timing import NOISY_SPREAD
    out = [w for when, load in loads.items() if (w := load_warning(when, load, cores))]
    noisy = [r for r in rows if r.get("status") == "ok" and r.get("noisy")]
    if noisy:
        worst = max(noisy, key=lambda r: r["spread"])
        out.append(f"noisy rows: {len(noisy)} of {sum(r.get('status') == 'ok' for r in rows)} with spread "
                   f"(p80 - p20) / p50 above {NOISY_SPREAD:.0%} (worst {worst['spread']:.0%}: {worst['suite']} "
                   f"{worst['model']} {worst['case']} {worst['dtype']} {worst['impl']})")
    return out


def describe_shapes(plan: Plan) -> str:
    dev = plan.device.torch_device
    models = dict.fromkeys(for_preset(OP_MODELS, plan.preset, dev) + for_preset(STEP_MODELS, plan.preset, dev))
    scaled = [f"{m.label} (d={m.d}, {m.layers} layers, ffn={m.ffn}, vocab={m.vocab})" for m in models
              if m.scaled_by > 1]
    return "real model shapes" if not scaled else "shapes scaled down for CPU: " + "; ".join(scaled)


def make_plan(args, device: Device) -> Plan:
    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    default = "fp32,bf16" if preset == "full" else "bf16" if device.is_cuda else "fp32"
    dtypes = tuple(DTYPES[d] for d in (args.dtypes or default).split(","))
    impls = frozenset(args.impls.split(",")) if args.impls else None
    # torch.compile costs seconds of compile time per shape on a CPU: only in full runs there, or when named.
    compile_ = preset == "full" or (device.is_cuda and preset == "quick") or "compile" in (impls or ())
    return Plan(device, preset, dtypes, impls, compile_)


def distributed_rows(quick: bool) -> list[dict]:
    """Rows of bench/distributed.py (communication bytes, NS balance) when that module exists."""
    if importlib.util.find_spec("bench.distributed") is None:
        return []
    from . import distributed
    return distributed.run(quick)


def _skipped(case, why: str = "time limit") -> dict:
    return {"suite": case.suite, "model": case.model, "case": case.case, "shape": case.shape,
            "dtype": dtype_name(case.dtype), "impl": case.impl, "baseline": case.baseline,
            "status": f"skipped: {why}"}


def main(argv=None) -> Path:
    args = parse(argv)
    threads = torch.get_num_threads()
    if args.smoke:  # correctness, not speed: one thread never waits on a descheduled peer
        torch.set_num_threads(1)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> Path:
    t0 = time.perf_counter()
    limit = args.time_limit if args.time_limit is not None else QUICK_LIMIT if args.quick else None
    device = detect(args.device)
    plan = make_plan(args, device)
    for dtype in {*plan.dtypes, torch.bfloat16}:  # measured on a CPU: before the header and the timings
        device.peak_flops(dtype)
    out = Path(args.out.format(device=device.slug(), date=datetime.date.today().isoformat()))
    print(f"device: {device.name} | peaks ({device.peak_source}): "
          f"{', '.join(f'{k} {v:.3g} TFLOP/s' for k, v in device.peak_tflops.items())}, {device.peak_gbps:.4g} GB/s")
    print(f"preset: {plan.preset} | {describe_shapes(plan)}")
    cores = os.cpu_count() or 1
    loads = {"start": os.getloadavg()[0]}
    if w := load_warning("start", loads["start"], cores):
        print(f"WARNING: {w}", flush=True)
    if not plan.compile:
        print("torch.compile: not timed in this preset on CPU (compile time); the full preset or --impls compile do")
    if not device.is_cuda and "triton" in (plan.impls or ()):
        print("triton: timed interpreted on the CPU, as asked: its times say nothing about the kernels, "
              "and the interpreter's bf16 tl.dot is wrong")
    suites = [s.strip() for s in args.suites.split(",")]
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise SystemExit(f"unknown suites {sorted(unknown)}; choose from {', '.join(SUITES)}")
    cases = {s: SUITES[s].cases(plan) for s in suites}
    if "newton_schulz" in suites and (unmatched := newton_schulz.unmatched_baselines(plan)):
        print(f"newton_schulz: baselines timed only at their own iteration dtype, none of this run's "
              f"({', '.join(dtype_name(d) for d in plan.dtypes)}): not timed: {', '.join(unmatched)}")

    def meta():  # the environment as of now: peaks for dtypes first met in a case are measured then
        return {"environment": environment(device), "preset": plan.preset, "shapes": describe_shapes(plan),
                "seconds": round(time.perf_counter() - t0, 1), "cores": cores, "load_average": loads}

    todo = [c for s in suites for c in cases[s]]
    rows = []
    try:
        for group in _progress(group_cases(todo), len(todo)):
            late = limit is not None and time.perf_counter() - t0 > limit
            rows += [_skipped(c) for c in group] if late else measure_group(group, plan)
            if not late:  # keep every timed case: a run killed at a time limit still leaves its data
                report.add_speedups(rows)
                report.write(rows, meta(), out)
    except KeyboardInterrupt:  # SIGINT, e.g. from `timeout --signal=INT`: write what was timed, then plots
        print(f"\ninterrupted after {len(rows)} of {len(todo)} cases", flush=True)
        rows += [_skipped(c, "interrupted") for c in todo[len(rows):]]
    report.add_speedups(rows)
    loads["end"] = os.getloadavg()[0]
    warnings = noise_warnings(rows, loads, cores)
    files = report.write(rows, {**meta(), "warnings": warnings}, out)
    if dist := distributed_rows(plan.preset != "full"):
        files += report.write(dist, meta(), out, stem="distributed")
    if not args.no_plots:
        files += report.plot(rows, out, f"{device.name}, peaks {device.peak_source}, {plan.preset} preset")
    history = None if args.no_history else args.history or (None if args.smoke else DEFAULT_HISTORY)
    if history:
        n = report.append_history(rows, Path(history), machine=f"{device.name}, {cores} cores",
                                  preset=plan.preset)
        print(f"history: {n} rows appended to {history}")
    print(report.table(rows))
    for w in warnings:
        print(f"WARNING: {w}")
    print(f"\n{len(rows)} cases in {time.perf_counter() - t0:.0f} s; results and plots in {out}/:")
    for f in files:
        print(f"  {f.name}")
    return out

if __name__ == "__main__":
    main(sys.argv[1:])
