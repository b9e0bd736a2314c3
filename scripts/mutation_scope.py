"""The scope of the mutation score (issue 12): which mutmut mutants count, and the score file.

    python scripts/mutation_scope.py patterns      # the in-scope mutant globs, for `mutmut run`
    python scripts/mutation_scope.py survivors     # in-scope mutants that survived (or never ran)
    python scripts/mutation_scope.py report OUT    # write the score file from mutants/*.meta

In scope: the math and the plan. reference.py, lmo.py, engine.py and optim.py whole; of ops/ the public
functions (their validation), the ``_torch`` paths and the helpers they call; of distributed.py
the planning functions. Out of scope (mutated by mutmut, never run, counted apart): the CUDA and
Triton launch code of ops/ (``cuda_unsupported``, ``choose_backend``, ``_cuda``, ``_triton``) and the
collective-running code of distributed.py, which only the multi-process tests reach.

Equivalent mutants are listed, each with why, in tests/mutation/equivalent.txt:
``<mutant name> | <why>`` per line (``#`` comments). A listed name whose mutant is gone or was
killed is reported as stale.
"""
from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "tests" / "mutation" / "equivalent.txt"

# module -> in-scope functions (mutmut's mangled names: x_<function>, xǁ<Class>ǁ<method>); "*" for all
SCOPE = {
    "disco_kernels.reference": ["*"],
    "disco_kernels.lmo": ["*"],
    "disco_kernels.optim": ["*"],
    "disco_kernels.engine": ["*"],
    "disco_kernels.ops.newton_schulz": ["x_newton_schulz", "x_accumulate_dtype", "x__torch"],
    "disco_kernels.ops.power_iteration": ["x_power_iteration", "x__torch"],
    "disco_kernels.ops.fused_update": ["x_fused_update", "x_apply_update", "x__as_norm", "x__shapes", "x__line_dim", "x__alpha", "x__hyper",
                                      "x_read_hyper", "x_momentum_", "x_apply_update_", "x_direction", "x__torch"],
    "disco_kernels.distributed": ["x_layout", "x_route", "x_ns_flops",
                                  "x_assign_owners", "x_plan_rounds", "x_row_splits", "x_order_items",
                                  "x_schedule", "x_sharded_splits"],
}
# Functions mutmut 3 never mutates because they are decorated (it mutates only undecorated functions,
# staticmethods and classmethods): listed in the score file so that the gap is visible.
DECORATED = ["disco_kernels.distributed.row_splits (functools.lru_cache)",
             "disco_kernels.optim.Scion.step (torch.no_grad)", "disco_kernels.optim.Scion.init (torch.no_grad)",
             "disco_kernels.ops.*._*_op and their register_fake impls (torch.library.custom_op)"]

KILLED = ("killed", "timeout", "segfault")  # a mutant that makes the tests fail, hang or crash is caught


def patterns() -> list[str]:
    return [f"{mod}.{fn}__mutmut_*" if fn != "*" else f"{mod}.*" for mod, fns in SCOPE.items() for fn in fns]


def in_scope(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns())


def results() -> dict[str, int | None]:
    out = {}
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def status(code) -> str:
    from mutmut.stats import status_by_exit_code
    return status_by_exit_code[code]


def equivalents() -> dict[str, str]:
    eq = {}
    if EQUIVALENT.exists():
        for line in EQUIVALENT.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, why = line.partition("|")
                eq[name.strip()] = why.strip()
    return eq


def diff(name: str) -> str:
    """The mutated line(s) of ``name`` ("-" old, "+" new), from ``mutmut show``."""
    shown = subprocess.run(["mutmut", "show", name], cwd=ROOT, capture_output=True, text=True).stdout
    lines = [ln for ln in shown.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    return "\n".join("      " + re.sub(r"\s+", " ", ln) for ln in lines)


def report(out: Path, minutes: float | None = None) -> None:
    res, eq = results(), equivalents()
    scope = {k: v for k, v in res.items() if in_scope(k)}
    outside = len(res) - len(scope)
    by = Counter(status(v) for v in scope.values())
    survivors = sorted(k for k, v in scope.items() if status(v) not in KILLED)
    equivalent = [k for k in survivors if k in eq]
    open_ = [k for k in survivors if k not in eq]
    stale = sorted(k for k in eq if k not in survivors)
    killed = sum(by[s] for s in KILLED)
    counted = len(scope) - len(equivalent)
    score = killed / counted if counted else 0.0
    per_module = {}
    for k, v in scope.items():
        mod = k.rsplit(".", 1)[0]
        c = per_module.setdefault(mod, Counter())
        c["total"] += 1
        c["killed" if status(v) in KILLED else ("equivalent" if k in eq else "survived")] += 1
    w = []
    w.append("Mutation score of disco-kernels (issue 12): mutmut over the math and the plan")
    w.append("written by scripts/mutation.sh (scripts/mutation_scope.py report); see README, 'Mutation testing'")
    w.append("")
    w.append(f"tool: mutmut {_version()}; tests per mutant: the fast CPU tests that cover the mutated function")
    if minutes is not None:
        w.append(f"run time: {minutes:.0f} min on this machine (2 workers)")
    w.append("")
    w.append(f"mutants generated in the mutated files:   {len(res)}")
    w.append(f"  out of scope (not run):                 {outside}")
    w.append(f"  in scope:                               {len(scope)}")
    w.append(f"    killed:                               {by['killed']}")
    w.append(f"    timeout (counted as killed):          {by['timeout']}")
    w.append(f"    segfault (counted as killed):         {by['segfault']}")
    w.append(f"    survived:                             {by['survived']}")
    w.append(f"    no tests:                             {by['no tests']}")
    w.append(f"    not checked / other:                  {len(scope) - killed - by['survived'] - by['no tests']}")
    w.append(f"    equivalent (triaged, of the above):   {len(equivalent)}")
    w.append(f"    open survivors (not triaged):         {len(open_)}")
    w.append("")
    w.append(f"score = killed / (in scope - equivalent) = {killed} / {counted} = {100 * score:.1f}%")
    w.append("")
    w.append("per module: total / killed / equivalent / survived")
    for mod, c in sorted(per_module.items()):
        w.append(f"  {mod:40s} {c['total']:5d} {c['killed']:5d} {c['equivalent']:5d} {c['survived']:5d}")
    w.append("")
    w.append("in scope: " + "; ".join(f"{m}: {', '.join(f)}" for m, f in SCOPE.items()))
    w.append("never mutated by mutmut (decorated): " + "; ".join(DECORATED))
    w.append("")
    w.append(f"== open survivors ({len(open_)}) ==")
    for k in open_:
        w.append(f"  {k}  [{status(scope[k])}]")
        w.append(diff(k))
    w.append("")
    w.append(f"== equivalent survivors ({len(equivalent)}), from tests/mutation/equivalent.txt ==")
    for k in equivalent:
        w.append(f"  {k}: {eq[k]}")
        w.append(diff(k))
    if stale:
        w.append("")
        w.append(f"== stale entries of equivalent.txt (killed or gone: remove them) ({len(stale)}) ==")
        w.extend(f"  {k}" for k in stale)
    out.write_text("\n".join(w) + "\n")
    print(f"score {killed}/{counted} = {100 * score:.1f}% ({len(open_)} open survivors, {len(equivalent)} equivalent)")


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("mutmut")
    except Exception:
        return "?"


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "patterns":
        print("\n".join(patterns()))
    elif cmd == "survivors":
        print("\n".join(k for k, v in sorted(results().items()) if in_scope(k) and status(v) not in KILLED))
    elif cmd == "report":
        report(Path(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else None)
    else:
        sys.exit(__doc__)
