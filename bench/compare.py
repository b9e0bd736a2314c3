"""``python -m bench.compare --base REV [--quick | --smoke]``: the whole Scion step of a base revision and
of the working tree, side by side in one run.

The base revision is checked out into a temporary git worktree (with the link
``disco_kernels/triton_kernels -> ../triton_kernels`` that an installed package gets from its
package-dir mapping), and each side runs in its own Python process whose ``disco_kernels`` is imported
from its tree (that tree first on PYTHONPATH; the worker checks where its package came from). The
harness, this file and ``bench/shapes.py``, is the working tree's for both sides, and uses only
``dk.Scion``'s public constructor and ``step()``: any revision with those can be the base.

Cases: the whole-step models of ``python -m bench`` in the chosen preset (scaled down on a CPU), its
dtypes (fp32 on a CPU, bf16 on a GPU unless ``--dtypes``), impls "torch" and, on a GPU, "auto"; the same
random params and grads (seed 0), lr and momentum as the benchmark's step rows. Both processes hold the
case at once, and the timing alternates between them: per round, a burst of steps of one side, then of the
other, the order flipping every round, so drift of a shared, noisy machine (other jobs, clocks, heat) falls
on both sides alike. A step is timed by the wall clock, synchronised on a GPU, after one warm-up step per
side (which creates the momentum buffers). Reported per case: the median step time of each side over all
its timed steps, ``speedup`` = base ms / current ms, the rounds, and the quartiles of the per-round
ratios (base burst median / current burst median) as a measure of the noise. Nothing here asserts a
speed: the table is the result.

On a GPU the base worktree has no compiled extension (``disco_kernels._C``) unless its revision commits
one, so its "auto" runs the Triton or torch kernels; the working tree's runs whatever it has built.

Writes ``compare.csv`` and ``compare.md`` to ``--out`` (default bench/out/compare-{device}-{date}/) and
prints the markdown table.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .shapes import STEP_MODELS, Model, for_preset, make_groups

ROOT = Path(__file__).resolve().parent.parent  # the working tree
DEFAULT_OUT = str(ROOT / "bench" / "out" / "compare-{device}-{date}")
SIDES = ("base", "current")

# Per preset: (seconds of timing per case after the minimum rounds, minimum rounds, most rounds, seconds a
# burst of steps aims at). --quick fits in about 3 minutes on the 2-core CPU (whose steps take seconds:
# bf16 Newton-Schulz without native bf16 matmuls), and its minimum rounds give every case both orders.
BUDGETS = {"smoke": (0.0, 2, 2, 0.0), "quick": (20.0, 2, 40, 0.3), "full": (60.0, 4, 100, 1.0)}

# The worker's entry (run as ``python -c BOOT <working tree>``): the working tree's bench package, loaded
# by path so that the ``bench`` folder of the tree first on PYTHONPATH (the base's) cannot shadow it.
BOOT = """
import importlib.util, pathlib, sys
where = pathlib.Path(sys.argv[1]) / "bench"
spec = importlib.util.spec_from_file_location("bench", where / "__init__.py", submodule_search_locations=[str(where)])
module = importlib.util.module_from_spec(spec)
sys.modules["bench"] = module
spec.loader.exec_module(module)
from bench.compare import serve
serve()
"""


# ---------------------------------------------------------------------------------------------- worker side

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(state: dict, n: int) -> list[float]:
    step, device = state["step"], state["device"]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _handle(state: dict, msg: dict) -> dict:
    op = msg["op"]
    if op == "info":
        import disco_kernels as dk
        return {"file": str(Path(dk.__file__).resolve()), "version": getattr(dk, "__version__", "?")}
    if op == "build":
        import disco_kernels as dk
        state.clear()
        device = torch.device(msg["device"])
        groups = make_groups(Model(**msg["model"]), getattr(torch, msg["dtype"]), device,
                             torch.Generator(device).manual_seed(0))
        opt = dk.Scion(groups, lr=msg["lr"], momentum=msg["momentum"], backend=msg["impl"])
        state.update(step=opt.step, device=device, opt=opt)
        return {"seconds": _timed_steps(state, msg["warmup"])}
    if op == "time":
        return {"seconds": _timed_steps(state, msg["n"])}
    if op == "free":
        device = state.get("device")
        state.clear()
        gc.collect()
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()
        return {}
    raise ValueError(f"unknown op {op!r}")


def serve() -> None:
    """The worker: one JSON request per line on stdin, one JSON reply per line on the original stdout
    (anything else printed goes to stderr); an exception becomes {"error": ...}. Ends at end of input."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    state: dict = {}
    for line in sys.stdin:
        try:
            reply = _handle(state, json.loads(line))
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        replies.write(json.dumps(reply) + "\n")


# ---------------------------------------------------------------------------------------------- parent side

class SideError(Exception):
    """An exception in a worker (e.g. a revision that cannot build or step a case), named by its side."""


class Worker:
    """A worker process whose ``disco_kernels`` comes from ``tree``."""

    def __init__(self, name: str, tree: Path, cwd: Path):
        self.name, self.tree = name, tree
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(tree)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        # An idle side must not spin: OpenMP threads that busy-wait after a burst would take the cores the
        # other side is being timed on (both sides get the same setting).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.proc = subprocess.Popen([sys.executable, "-c", BOOT, str(ROOT)], cwd=cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=1)

    def request(self, **msg) -> dict:
        """The worker's reply to ``msg``; its error (an exception in the worker) raises SideError."""
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker ended (exit code {self.proc.wait()}); its error is above")
        reply = json.loads(line)
        if "error" in reply:
            raise SideError(f"{self.name}: {reply['error']}")
        return reply

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def describe(rev: str) -> str:
    """'<short sha> <subject>' of ``rev``."""
    return _git("log", "-1", "--format=%h %s", rev)


def add_worktree(rev: str, where: Path) -> Path:
    """``rev`` checked out (detached) at ``where``, with disco_kernels/triton_kernels linked as installed."""
    _git("worktree", "add", "--detach", "--quiet", str(where), rev)
    link = where / "disco_kernels" / "triton_kernels"
    if (where / "triton_kernels").is_dir() and not link.exists():
        link.symlink_to(Path("..") / "triton_kernels", target_is_directory=True)
    return where


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def compare_case(workers: dict, build: dict, budget: tuple[float, int, int, float]) -> dict:
    """Time one case on both sides, interleaved (module doc); returns its row."""
    try:
        return _interleaved(workers, build, *budget)
    except SideError as e:
        return {"status": f"error: {e}"}
    finally:
        for w in workers.values():
            w.request(op="free")


def _interleaved(workers: dict, build: dict, seconds: float, min_rounds: int, max_rounds: int,
                 burst_s: float) -> dict:
    warm = {side: max(workers[side].request(**build)["seconds"]) for side in SIDES}
    burst = max(1, min(100, round(burst_s / max(warm.values()))))
    times = {side: [] for side in SIDES}
    ratios = []
    start = time.perf_counter()
    rounds = 0
    # Rounds in pairs (both orders equally often) until the budget is spent, at least min_rounds.
    while rounds < max_rounds and (rounds < min_rounds or rounds % 2 or time.perf_counter() - start < seconds):
        order = SIDES if rounds % 2 == 0 else SIDES[::-1]
        got = {side: workers[side].request(op="time", n=burst)["seconds"] for side in order}
        for side in SIDES:
            times[side] += got[side]
        ratios.append(statistics.median(got["base"]) / statistics.median(got["current"]))
        rounds += 1
    base, current = (statistics.median(times[s]) * 1e3 for s in SIDES)
    lo, hi = _quartiles(ratios)
    return {"status": "ok", "base_ms": base, "current_ms": current, "speedup": base / current, "rounds": rounds,
            "steps_per_side": len(times["base"]), "ratio_q1": lo, "ratio_q3": hi}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare the working tree with (e.g. HEAD)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the quick preset's models (about 3 min on a 2-core CPU)")
    mode.add_argument("--smoke", action="store_true", help="tiny models, two rounds (the test suite)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory; {device} and {date} are filled in")
    ap.add_argument("--impls", help="comma list of backends (default: torch, and auto on a GPU)")
    ap.add_argument("--dtypes", help="comma list of fp32, bf16, fp16 (default: as python -m bench)")
    ap.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--seconds-per-case", type=float, metavar="S",
                    help="timing per case after the minimum rounds (default: by preset, "
                    + ", ".join(f"{k} {v[0]:g}" for k, v in BUDGETS.items()) + ")")
    return ap.parse_args(argv)


def markdown(rows: list[dict], header: list[str]) -> str:
    lines = header + ["", "| model | dtype | impl | base ms | current ms | speedup | rounds | ratio q1-q3 |",
                      "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['dtype']} | {r['impl']} | - | - | - | - | {r['status']} |")
            continue
        lines.append(f"| {r['model']} | {r['dtype']} | {r['impl']} | {r['base_ms']:.2f} | {r['current_ms']:.2f} | "
                     f"{r['speedup']:.3f} | {r['rounds']} | {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} |")
    ok = [r for r in rows if r["status"] == "ok"]
    lines += ["", f"current faster than base on {sum(r['speedup'] > 1 for r in ok)} of {len(ok)} cases "
              f"({len(rows) - len(ok)} failed)"]
    return "\n".join(lines)


def main(argv=None) -> Path:
    from .__main__ import make_plan
    from .device import Device, dtype_name
    from .optimizer_step import LR, MOMENTUM

    args = parse(argv)
    t0 = time.perf_counter()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    plan = make_plan(args, Device(dev, name, "not measured"))
    impls = [i for i in (["auto"] if dev.type == "cuda" else []) + ["torch"] if plan.wants(i)]
    if args.impls:
        impls = args.impls.split(",")
    budget = BUDGETS[plan.preset]
    if args.seconds_per_case is not None:
        budget = (args.seconds_per_case, *budget[1:])
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    out = Path(args.out.format(device=slug, date=datetime.date.today().isoformat()))
    try:
        base_sha = _git("rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}")
    except subprocess.CalledProcessError:
        raise SystemExit(f"--base {args.base!r} is no commit of the repository at {ROOT}") from None
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    header = [f"# Scion step: base vs current, {plan.preset} preset, {name}", "",
              f"- base: `{args.base}` = {describe(base_sha)}",
              f"- current: working tree at {describe('HEAD')}{' + uncommitted changes' if dirty else ''}",
              f"- torch {torch.__version__}, {torch.get_num_threads()} threads; median wall-clock ms per step, "
              "the sides interleaved in bursts, order flipped every round"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="disco-compare-") as tmp:
        tmp = Path(tmp)
        (tmp / "cwd").mkdir()
        tree = add_worktree(base_sha, tmp / "base")
        workers = {}
        try:
            workers = {"base": Worker("base", tree, tmp / "cwd"), "current": Worker("current", ROOT, tmp / "cwd")}
            for side, w in workers.items():
                try:
                    info = w.request(op="info")
                except SideError as e:
                    raise SystemExit(f"cannot import disco_kernels: {e}") from None
                want = (tree if side == "base" else ROOT).resolve()
                if not Path(info["file"]).is_relative_to(want):
                    raise SystemExit(f"{side}: disco_kernels came from {info['file']}, not from {want}")
            cases = [(m, d, i) for m in for_preset(STEP_MODELS, plan.preset, dev) for d in plan.dtypes for i in impls]
            for i, (model, dtype, impl) in enumerate(cases, 1):
                print(f"[{i}/{len(cases)}] {model.label} {dtype_name(dtype)} {impl}", flush=True)
                build = {"op": "build", "model": dataclasses.asdict(model), "dtype": str(dtype).removeprefix("torch."),
                         "device": str(dev), "impl": impl, "lr": LR, "momentum": MOMENTUM, "warmup": 1}
                row = {"model": model.label, "dtype": dtype_name(dtype), "impl": impl}
                row.update(compare_case(workers, build, budget))
                rows.append(row)
                print(f"  base {row['base_ms']:.2f} ms, current {row['current_ms']:.2f} ms, x{row['speedup']:.3f}"
                      if row["status"] == "ok" else f"  {row['status']}", flush=True)
        finally:
            for w in workers.values():
                w.close()
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    header.append(f"- {len(rows)} cases in {time.perf_counter() - t0:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    fields = ["model", "dtype", "impl", "status", "base_ms", "current_ms", "speedup", "rounds", "steps_per_side",
              "ratio_q1", "ratio_q3"]
    with (out / "compare.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    text = markdown(rows, header)
    (out / "compare.md").write_text(text + "\n")
    print(text)
    print(f"\nwritten: {out / 'compare.csv'}, {out / 'compare.md'}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
