"""Results out: speedups against each baseline, JSON and CSV files, PNG plots, a short table."""
from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from pathlib import Path

SUITES = ("newton_schulz", "power_iteration", "fused_update", "step")
KEY = ("suite", "model", "case", "shape", "dtype")


def add_speedups(rows: list[dict]) -> None:
    """Give each timed row ``speedup_vs_<baseline>`` = baseline time / its time, same case and dtype, and,
    where the baseline's peak extra memory was measured, that too as ``<baseline>_peak_extra_bytes``."""
    base = defaultdict(dict)
    for r in rows:
        if r.get("baseline") and r.get("status") == "ok":
            base[tuple(r[k] for k in KEY)][r["impl"]] = r
    for r in rows:
        if r.get("status") != "ok":
            continue
        for impl, b in base[tuple(r[k] for k in KEY)].items():
            if impl != r["impl"]:
                r[f"speedup_vs_{impl}"] = b["time_ms"] / r["time_ms"]
            if "peak_extra_bytes" in b:
                r[f"{impl}_peak_extra_bytes"] = b["peak_extra_bytes"]


def write(rows: list[dict], meta: dict, out: Path, stem: str = "results") -> list[Path]:
    """<stem>.json (meta + rows) and <stem>.csv (one line per row) in ``out``, each replaced whole
    (a run killed while writing leaves the previous version, never half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{stem}.json", out / f"{stem}.csv"]
    tmp = [f.with_name(f.name + ".tmp") for f in files]
    tmp[0].write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with tmp[1].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    for t, f in zip(tmp, files):
        os.replace(t, f)
    return files


def _ok(rows, suite):
    return [r for r in rows if r["suite"] == suite and r.get("status") == "ok"]


def _series(rows):
    by = defaultdict(list)
    for r in rows:
        by[f"{r['impl']} {r['dtype']}"].append(r)
    return sorted(by.items())


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _size(suite, r):
    """x of the time-vs-size plot: n of the (n, 4n) sweep for Newton-Schulz, else bytes moved."""
    return int(r["case"].removeprefix("n=")) if suite == "newton_schulz" else r["bytes"]


def plot(rows: list[dict], out: Path, title: str = "") -> list[Path]:
    """time_vs_size.png (log-log, one series per impl and dtype; Newton-Schulz: the (n, 4n) sweep; lines
    where the size is one family's, else points) and share_of_peak.png (median share of peak per series)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = [s for s in SUITES if _ok(rows, s)]
    if not suites:
        return []
    picked = {s: [r for r in _ok(rows, s) if s != "newton_schulz" or r["model"] == "sweep"] for s in suites}
    files = []
    fig, axes = plt.subplots(1, len(suites), figsize=(5 * len(suites), 4.4), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        for label, rs in _series(picked[suite]):
            rs = sorted(rs, key=lambda r: _size(suite, r))
            ax.plot([_size(suite, r) for r in rs], [r["time_ms"] for r in rs], "o", ms=4, label=label,
                    ls="-" if suite in ("newton_schulz", "step") else "none", lw=1)
        ax.set(xscale="log", yscale="log", title=suite, ylabel="time (ms)",
               xlabel="n of an (n, 4n) matrix" if suite == "newton_schulz" else "bytes (read + written once)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    files.append(out / "time_vs_size.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(suites), figsize=(5 * len(suites), 4.4), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        series = _series(_ok(rows, suite))
        ax.barh([label for label, _ in series], [100 * _median(r["share_of_peak"] for r in rs) for _, rs in series],
                color=["tab:gray" if rs[0]["baseline"] else "tab:blue" for _, rs in series])
        ax.set(title=suite, xlabel="median share of peak (%)")
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"{title}  (blue: ours, grey: baselines)", fontsize=9)
    fig.tight_layout()
    files.append(out / "share_of_peak.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files


def _geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else math.nan


def _mb(x):
    return None if x is None else x / 1e6


def _pct(x):
    return None if x is None else 100 * x


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(rows: list[dict]) -> str:
    """Per suite, impl and dtype: cases, median time, median share of peak, geomean speedup against each
    baseline of the suite, max error (against the fp64 oracle); then the whole step per model, with the
    error's bound by the suite's rule (tests/tolerances.py), the floor of its bytes (with their share of
    the memory peak on a GPU) and its peak extra memory beside the reference's; then what was not timed,
    and notes (an error beyond the rule among them)."""
    lines = []
    for suite in SUITES:
        ok = _ok(rows, suite)
        if not ok:
            continue
        bases = list(dict.fromkeys(r["impl"] for r in ok if r["baseline"]))
        lines.append(f"{suite:16s} {'impl':20s} {'dtype':5s} {'cases':>5s} {'median ms':>10s} {'%peak':>6s} "
                     + "".join(f"{'x ' + b[:10]:>13s}" for b in bases) + f" {'max err':>8s}")
        for label, rs in _series(ok):
            impl, dtype = label.rsplit(" ", 1)
            errs = [r["rel_err"] for r in rs if isinstance(r.get("rel_err"), float) and not math.isnan(r["rel_err"])]
            gains = [None if b == impl else _geomean(r.get("speedup_vs_" + b) for r in rs) for b in bases]
            speedups = "".join(f"{_fmt(x, '.2f'):>13s}" for x in gains)
            lines.append(f"{'':16s} {impl:20s} {dtype:5s} {len(rs):5d} {_median(r['time_ms'] for r in rs):10.3f} "
                         f"{100 * _median(r['share_of_peak'] for r in rs):6.1f} {speedups} "
                         f"{_fmt(max(errs) if errs else None, '8.1e'):>8s}")
    steps = _ok(rows, "step")
    if steps:
        lines += ["", f"{'whole step':28s} {'dtype':5s} {'impl':10s} {'ms':>9s} {'%peak':>6s} {'x ref':>6s} "
                  f"{'err':>8s} {'bound':>8s} {'floor MB':>9s} {'%bw':>5s} {'extra MB':>9s} {'ref MB':>9s}"]
        for r in steps:
            lines.append(f"{r['model'] + ', ' + r['case'].split(', ')[-1]:28s} {r['dtype']:5s} {r['impl']:10s} "
                         f"{r['time_ms']:9.2f} {100 * r['share_of_peak']:6.1f} "
                         f"{_fmt(r.get('speedup_vs_reference'), '6.2f'):>6s} {_fmt(r.get('rel_err'), '8.1e'):>8s} "
                         f"{_fmt(r.get('err_bound'), '8.1e'):>8s} {_fmt(_mb(r.get('floor_bytes')), '9.2f'):>9s} "
                         f"{_fmt(_pct(r.get('floor_bytes_share')), '5.1f'):>5s} "
                         f"{_fmt(_mb(r.get('peak_extra_bytes')), '9.2f'):>9s} "
                         f"{_fmt(_mb(r.get('reference_peak_extra_bytes')), '9.2f'):>9s}")
        lines.append("(floor MB: least bytes a step moves, 1e6 B; %bw: floor bytes / time against the memory peak, "
                     "GPU only; extra MB: peak memory beyond params, grads and state, ours and the reference's)")
    counted = {"unsupported": "outside what the CUDA kernels take",
               "skipped": "skipped: past the time limit or interrupted"}
    for kind, what in counted.items():
        if n := sum(r.get("status", "").startswith(kind) for r in rows):
            lines.append(f"\n{n} cases {what} (status in results.csv)")
    for r in rows:
        status = r.get("status", "ok")
        if status != "ok" and not status.startswith(tuple(counted)):
            lines.append(f"not timed: {r['suite']} {r['model']} {r['case']} {r['dtype']} {r['impl']}: {status}")
        elif r.get("note"):
            lines.append(f"note: {r['suite']} {r['model']} {r['case']} {r['dtype']} {r['impl']}: {r['note']}")
    return "\n".join(lines)
