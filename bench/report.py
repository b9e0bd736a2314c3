"""Results out: speedups against each baseline, JSON and CSV files, PNG plots, a short table."""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import subprocess
import textwrap
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
    """Rows by (impl, dtype, compute), as "<impl> <dtype> [<compute>]" (a row's compute: what it computes in)."""
    by = defaultdict(list)
    for r in rows:
        by[(r["impl"], r["dtype"], r.get("compute") or r["dtype"])].append(r)
    return sorted(by.items())


def _label(key) -> str:
    impl, dtype, compute = key
    return f"{impl} {dtype}" + (f" [{compute}]" if compute != dtype else "")


def _wrapped(text: str, fig_width_in: float, fontsize: float) -> str:
    """``text`` broken into lines that fit a figure ``fig_width_in`` inches wide at ``fontsize`` points."""
    chars = max(20, int(fig_width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars))


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _size(suite, r):
    """x of the time-vs-size plot: n of the (n, 4n) sweep for Newton-Schulz, else bytes moved."""
    return int(r["case"].removeprefix("n=")) if suite == "newton_schulz" else r["bytes"]


def plot(rows: list[dict], out: Path, title: str = "") -> list[Path]:
    """time_vs_size.png (log-log, one series per impl, dtype and compute; Newton-Schulz: the (n, 4n) sweep;
    lines where the size is one family's, else points) and share_of_peak.png (median share of peak per series,
    every row of a case scored against one peak: that of the dtype ours computes in, named per panel). A plot
    with nothing to show is not written (a notice says so, and a stale file of that name is removed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    files = []
    picked = {s: [r for r in _ok(rows, s) if s != "newton_schulz" or r["model"] == "sweep"] for s in SUITES}
    suites = [s for s in SUITES if picked[s]]
    target = out / "time_vs_size.png"
    if not suites:
        print(f"{target.name}: not written, no timed rows to plot (the Newton-Schulz sweep or another suite)")
        target.unlink(missing_ok=True)
    else:
        width = 5.5 * len(suites)
        fig, axes = plt.subplots(1, len(suites), figsize=(width, 4.8), squeeze=False)
        for ax, suite in zip(axes[0], suites):
            for key, rs in _series(picked[suite]):
                rs = sorted(rs, key=lambda r: _size(suite, r))
                ax.plot([_size(suite, r) for r in rs], [r["time_ms"] for r in rs], "o", ms=4, label=_label(key),
                        ls="-" if suite in ("newton_schulz", "step") else "none", lw=1,
                        mfc="white" if rs[0]["baseline"] else None)
            ax.set(xscale="log", yscale="log", title=suite + (" (n, 4n) sweep" if suite == "newton_schulz" else ""),
                   ylabel="median time (ms)",
                   xlabel="n of an (n, 4n) matrix" if suite == "newton_schulz" else "bytes (read + written once)")
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7, title="impl dtype [compute]; hollow: baselines", title_fontsize=7)
        fig.suptitle(_wrapped(title, width, 9), fontsize=9)
        fig.tight_layout()
        fig.savefig(target, dpi=120)
        plt.close(fig)
        files.append(target)

    suites = [s for s in SUITES if _ok(rows, s)]
    target = out / "share_of_peak.png"
    if not suites:
        print(f"{target.name}: not written, no timed rows")
        target.unlink(missing_ok=True)
        return files
    series = {s: _series(_ok(rows, s)) for s in suites}
    label_in = 0.075 * max(len(_label(k)) for ss in series.values() for k, _ in ss)  # the bar labels' width
    panel = 4.0 + label_in
    width = panel * len(suites)
    height = max(4.0, 2.0 + 0.3 * max(len(v) for v in series.values()))
    fig, axes = plt.subplots(1, len(suites), figsize=(width, height), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        ss = series[suite]
        values = [100 * _median(r["share_of_peak"] for r in rs) for _, rs in ss]
        ax.barh([_label(k) for k, _ in ss], values,
                color=["tab:gray" if rs[0]["baseline"] else "tab:blue" for _, rs in ss])
        for y, v in enumerate(values):
            ax.annotate(f"{v:.3g}%", (v, y), xytext=(2, 0), textcoords="offset points", va="center", fontsize=7)
        ax.invert_yaxis()
        peaks = " / ".join(sorted({r.get("peak_dtype") or r["dtype"] for _, rs in ss for r in rs}))
        ax.set_title(suite, fontsize=10)
        ax.set_xlabel(_wrapped(f"median share of the {peaks} peak (%), higher is better; every row of a case "
                               "against the peak of the dtype ours computes in", panel - label_in, 8), fontsize=8)
        ax.set_xlim(0, max(values) * 1.25 if values and max(values) > 0 else 1)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(handles=[Patch(color="tab:blue", label="ours"), Patch(color="tab:gray", label="baseline")],
                  fontsize=7, loc="best")
    fig.suptitle(_wrapped(title, width, 9), fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
    files.append(target)
    return files


HISTORY_FIELDS = ("date", "revision", "machine", "preset", "suite", "model", "case", "shape", "dtype", "compute",
                  "impl", "baseline", "p20_ms", "p50_ms", "p80_ms", "spread", "noisy", "speedup_vs_reference",
                  "rel_err")


def git_revision(root: Path | None = None) -> str:
    """Short hash of HEAD, "+dirty" when tracked files differ from it; "unknown" outside a git checkout."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               check=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def append_history(rows: list[dict], path: Path, machine: str, preset: str, date: str | None = None,
                   revision: str | None = None) -> int:
    """Append the timed rows to the history CSV ``path`` (HISTORY_FIELDS; the header when the file is new), so
    runs over time sit in one file and a regression shows; returns the rows appended."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return 0
    date = date or datetime.datetime.now().isoformat(timespec="seconds")
    revision = revision or git_revision()
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in ok:
            w.writerow({**r, "date": date, "revision": revision, "machine": machine, "preset": preset,
                        "p50_ms": r["time_ms"], "compute": r.get("compute") or r["dtype"]})
    return len(ok)


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
        lines.append(f"{suite:16s} {'impl':20s} {'dtype':5s} {'compute':22s} {'cases':>5s} {'median ms':>10s} "
                     f"{'p20-p80 %':>10s} {'%peak':>6s} " + "".join(f"{'x ' + b[:10]:>13s}" for b in bases)
                     + f" {'max err':>8s}")
        for (impl, dtype, compute), rs in _series(ok):
            errs = [r["rel_err"] for r in rs if isinstance(r.get("rel_err"), float) and not math.isnan(r["rel_err"])]
            gains = [None if b == impl else _geomean(r.get("speedup_vs_" + b) for r in rs) for b in bases]
            speedups = "".join(f"{_fmt(x, '.2f'):>13s}" for x in gains)
            spreads = [r["spread"] for r in rs if r.get("spread") is not None]
            lines.append(f"{'':16s} {impl:20s} {dtype:5s} {compute:22s} {len(rs):5d} "
                         f"{_median(r['time_ms'] for r in rs):10.3f} {_fmt(_median(spreads) * 100 if spreads else None, '10.1f')} "
                         f"{100 * _median(r['share_of_peak'] for r in rs):6.1f} {speedups} "
                         f"{_fmt(max(errs) if errs else None, '8.1e'):>8s}")
    steps = _ok(rows, "step")
    if steps:
        lines += ["", f"{'whole step':28s} {'dtype':5s} {'impl':18s} {'compute':32s} {'ms':>9s} {'p20':>9s} "
                  f"{'p80':>9s} {'%peak':>6s} {'x ref':>6s} {'x refc':>6s} "
                  f"{'err':>8s} {'bound':>8s} {'floor MB':>9s} {'%bw':>5s} {'extra MB':>9s} {'ref MB':>9s}"]
        for r in steps:
            lines.append(f"{r['model'] + ', ' + r['case'].split(', ')[-1]:28s} {r['dtype']:5s} {r['impl']:18s} "
                         f"{r.get('compute', '-'):32s} {r['time_ms']:9.2f} {_fmt(r.get('p20_ms'), '9.2f'):>9s} "
                         f"{_fmt(r.get('p80_ms'), '9.2f'):>9s} {100 * r['share_of_peak']:6.1f} "
                         f"{_fmt(r.get('speedup_vs_reference'), '6.2f'):>6s} "
                         f"{_fmt(r.get('speedup_vs_reference-compiled'), '6.2f'):>6s} {_fmt(r.get('rel_err'), '8.1e'):>8s} "
                         f"{_fmt(r.get('err_bound'), '8.1e'):>8s} {_fmt(_mb(r.get('floor_bytes')), '9.2f'):>9s} "
                         f"{_fmt(_pct(r.get('floor_bytes_share')), '5.1f'):>5s} "
                         f"{_fmt(_mb(r.get('peak_extra_bytes')), '9.2f'):>9s} "
                         f"{_fmt(_mb(r.get('reference_peak_extra_bytes')), '9.2f'):>9s}")
        lines.append("(x ref, x refc: the reference update rule's time over this row's, its Newton-Schulz eager and "
                     "torch.compile'd; floor MB: least bytes a step moves, 1e6 B; %bw: floor bytes / time against the memory peak, "
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
