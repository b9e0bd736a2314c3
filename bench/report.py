"""Results out: speedups against each baseline, JSON and CSV files, PNG plots, a short table."""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

SUITES = ("newton_schulz", "power_iteration", "fused_update", "step")
KEY = ("suite", "model", "case", "shape", "dtype")


def add_speedups(rows: list[dict]) -> None:
    """Give each timed row ``speedup_vs_<baseline>`` = baseline time / its time, same case and dtype."""
    base = defaultdict(dict)
    for r in rows:
        if r.get("baseline") and r.get("status") == "ok":
            base[tuple(r[k] for k in KEY)][r["impl"]] = r["time_ms"]
    for r in rows:
        if r.get("status") != "ok":
            continue
        for impl, t in base[tuple(r[k] for k in KEY)].items():
            if impl != r["impl"]:
                r[f"speedup_vs_{impl}"] = t / r["time_ms"]


def write(rows: list[dict], meta: dict, out: Path, stem: str = "results") -> list[Path]:
    """<stem>.json (meta + rows) and <stem>.csv (one line per row) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{stem}.json", out / f"{stem}.csv"]
    files[0].write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with files[1].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return files


def _ok(rows, suite):
    return [r for r in rows if r["suite"] == suite and r.get("status") == "ok"]


def _series(rows):
    by = defaultdict(list)
    for r in rows:
        by[f"{r['impl']} {r['dtype']}"].append(r)
    return sorted(by.items())


def plot(rows: list[dict], out: Path) -> list[Path]:
    """time_vs_size.png (log-log, one series per impl and dtype) and share_of_peak.png (median per series)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = [s for s in SUITES if _ok(rows, s)]
    if not suites:
        return []
    files = []
    fig, axes = plt.subplots(1, len(suites), figsize=(5 * len(suites), 4), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        for label, rs in _series(_ok(rows, suite)):
            size = "flops" if suite == "newton_schulz" else "bytes"
            rs = sorted(rs, key=lambda r: r[size])
            ax.plot([r[size] for r in rs], [r["time_ms"] for r in rs], "o-", ms=3, lw=1, label=label)
        ax.set(xscale="log", yscale="log", title=suite, ylabel="time (ms)",
               xlabel="FLOPs (NS floor)" if suite == "newton_schulz" else "bytes (read + written once)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    files.append(out / "time_vs_size.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(suites), figsize=(5 * len(suites), 4), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        series = _series(_ok(rows, suite))
        shares = [100 * sorted(r["share_of_peak"] for r in rs)[len(rs) // 2] for _, rs in series]
        ax.barh([label for label, _ in series], shares)
        ax.set(title=suite, xlabel="median share of peak (%)")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    files.append(out / "share_of_peak.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files


def _geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else math.nan


def table(rows: list[dict]) -> str:
    """Per suite, impl and dtype: cases, median time, median share of peak, geomean speedup vs the reference, max error."""
    lines = [f"{'suite':16s} {'impl':20s} {'dtype':5s} {'cases':>5s} {'median ms':>10s} {'%peak':>6s} "
             f"{'x ref':>6s} {'max err':>8s}"]
    for suite in SUITES:
        for label, rs in _series(_ok(rows, suite)):
            impl, dtype = label.rsplit(" ", 1)
            times = sorted(r["time_ms"] for r in rs)
            share = sorted(r["share_of_peak"] for r in rs)[len(rs) // 2]
            errs = [r["rel_err"] for r in rs if isinstance(r.get("rel_err"), float) and not math.isnan(r["rel_err"])]
            lines.append(f"{suite:16s} {impl:20s} {dtype:5s} {len(rs):5d} {times[len(times) // 2]:10.3f} "
                         f"{100 * share:6.1f} {_geomean(r.get('speedup_vs_reference') for r in rs):6.2f} "
                         f"{max(errs) if errs else math.nan:8.1e}")
    steps = _ok(rows, "step")
    if steps:
        lines += ["", f"{'step':28s} {'dtype':5s} {'impl':10s} {'ms':>9s} {'%peak':>6s} {'x ref':>6s} {'err':>8s}"]
        for r in steps:
            lines.append(f"{r['model']:28s} {r['dtype']:5s} {r['impl']:10s} {r['time_ms']:9.2f} "
                         f"{100 * r['share_of_peak']:6.1f} {r.get('speedup_vs_reference', math.nan):6.2f} "
                         f"{r.get('rel_err', math.nan):8.1e}")
    failed = [r for r in rows if r.get("status", "ok") != "ok"]
    for r in failed:
        lines.append(f"not timed: {r['suite']} {r['model']} {r['case']} {r['dtype']} {r['impl']}: {r['status']}")
    return "\n".join(lines)
