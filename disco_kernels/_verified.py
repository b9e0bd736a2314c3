"""Which GPU backends a GPU run has verified, and on which compute capability.

``backend="auto"`` takes a kernel backend on a GPU only once a GPU run has passed that backend's
GPU tests on a GPU of the same compute capability; until then it takes the next one (CUDA, then
Triton, then torch). ``VERIFIED`` below is the one place that says so. A forced backend
(``backend="cuda"`` / ``"triton"``) still runs unverified, with one warning per backend and
compute capability. ``DISCO_TRUST_UNVERIFIED=1`` in the environment makes "auto" treat every
backend as verified (GPU sessions set it, so that their tests exercise auto's kernel choice).

Matching rule: a record verifies its backend on every GPU with the same compute capability
(major, minor), whatever the torch, Triton and CUDA versions. The capability is what the
kernels are specialised on (cubins and PTX per sm_XY, tensor-core instructions, shared memory
per block: 8.0 gives 163 KiB, 8.6 and 8.9 give 99 KiB, so tile configs that fit one fail on the
other), so a run on one capability says nothing of another, not even of a later minor. The
versions are recorded for information and shown by ``python -m disco_kernels`` next to the
running ones: tying the record to them would silently send "auto" back to torch at every
upgrade, and the version-dependent parts (Triton's code generation, the extension's build) are
covered by the CPU suite (Triton interpreter, offline compiles for sm_80/sm_90) on every run.
After an upgrade that changes the kernels' code generation, rerun the GPU session and add a
record.

How a GPU session adds a record:

1. ``bash scripts/gpu_session.sh "$OUT"`` on the lent machine. Its tests stage runs
   ``pytest -m gpu`` with ``DISCO_TRUST_UNVERIFIED=1`` and a JUnit report, then ``main`` below
   (``--junit tests.xml --exit <pytest's status>``) prints one ``Record(...)`` per backend whose
   GPU tests passed (or why not) into ``summary.txt``.
   A backend's GPU tests pass when its own test files (``tests/test_cuda_kernels.py``;
   ``tests/test_triton_*.py``) have at least one passed test and no failure or error, and no
   other GPU test (optimizer, training, launch guard: they run whichever kernel auto takes)
   failed; a cut or interrupted run verifies nothing.
2. Commit the session's ``tests.log`` with its other results under
   ``bench/results/<device>-<date>/`` and paste the printed records into ``VERIFIED``, with
   ``result`` naming that committed log (``tests/test_backend.py`` checks that it exists).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import sys
import xml.etree.ElementTree as ET


@dataclasses.dataclass(frozen=True)
class Record:
    """One GPU run that passed a backend's GPU tests."""
    device: str                    # torch.cuda.get_device_name(), e.g. "NVIDIA H200"
    capability: tuple[int, int]    # torch.cuda.get_device_capability(): what the rule matches
    torch: str                     # torch.__version__ (information)
    triton: str                    # triton.__version__, "-" when not importable (information)
    cuda: str                      # torch.version.cuda (information)
    date: str                      # ISO date of the run
    command: str                   # what ran the tests
    result: str                    # the committed log of the passing tests, relative to the repository root
    tests: str                     # this backend's tally, e.g. "214 passed, 3 skipped (shared: 9 passed)"

    def describe(self) -> str:
        return (f"{self.device} (compute capability {self.capability[0]}.{self.capability[1]}), torch {self.torch}, "
                f"triton {self.triton}, CUDA {self.cuda}, {self.date}: {self.tests}; `{self.command}` -> {self.result}")


# backend -> the runs that verified it. Empty: no GPU run has passed any backend's GPU tests yet.
VERIFIED: dict[str, tuple[Record, ...]] = {
    "cuda": (),
    "triton": (),
}


def record_for(backend: str, cc: tuple[int, int]) -> Record | None:
    """The latest record that verifies ``backend`` on compute capability ``cc`` (None when none does)."""
    matching = [r for r in VERIFIED.get(backend, ()) if tuple(r.capability) == tuple(cc)]
    return max(matching, key=lambda r: r.date) if matching else None


# ---------------------------------------------------------------- from a GPU run to records

def backend_of_test(classname: str) -> str | None:
    """The backend whose own GPU tests a JUnit ``classname`` (``tests.test_cuda_kernels``, ``test_triton_x.Cls``)
    belongs to; None for the shared ones."""
    module = next((part for part in classname.split(".") if part.startswith("test_")), "")
    if module == "test_cuda_kernels":
        return "cuda"
    if module.startswith("test_triton_"):
        return "triton"
    return None


def tally(junit_path: str) -> dict[str | None, dict[str, int]]:
    """{backend or None (shared): {"passed": n, "failed": n, "skipped": n}} from a pytest JUnit report."""
    counts: dict[str | None, dict[str, int]] = {}
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        outcome = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        by = counts.setdefault(backend_of_test(case.get("classname", "")), {"passed": 0, "failed": 0, "skipped": 0})
        by[outcome] += 1
    return counts


def _summary(c: dict[str, int]) -> str:
    return ", ".join(f"{n} {what}" for what, n in c.items() if n) or "none"


def verdicts(counts: dict[str | None, dict[str, int]], pytest_exit: int) -> dict[str, str | None]:
    """{backend: None when the run verifies it, else why not}."""
    zero = {"passed": 0, "failed": 0, "skipped": 0}
    shared = counts.get(None, zero)
    out = {}
    for backend in VERIFIED:
        own = counts.get(backend, zero)
        if pytest_exit not in (0, 1):  # 0: all passed, 1: some failed; else interrupted, cut, or no tests
            out[backend] = f"pytest exited with {pytest_exit} (interrupted, cut or nothing collected)"
        elif own["failed"]:
            out[backend] = f"{own['failed']} of its GPU tests failed ({_summary(own)})"
        elif not own["passed"]:
            out[backend] = f"none of its GPU tests passed ({_summary(own)})"
        elif shared["failed"]:
            out[backend] = f"{shared['failed']} shared GPU tests failed ({_summary(shared)})"
        else:
            out[backend] = None
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().removeprefix("nvidia")).strip("-")


def main(argv=None) -> int:
    """Print the ``Record`` a passing GPU run adds to ``VERIFIED`` for each backend (run on that GPU)."""
    parser = argparse.ArgumentParser(prog="disco_kernels._verified.main", description=main.__doc__)
    parser.add_argument("--junit", required=True, help="pytest --junitxml report of `pytest -m gpu tests`")
    parser.add_argument("--exit", type=int, required=True, help="pytest's exit status")
    parser.add_argument("--command", default="bash scripts/gpu_session.sh OUT_DIR", help="what ran the tests")
    parser.add_argument("--result", default=None,
                        help="where the tests' log gets committed (default bench/results/<device>-<date>/tests.log)")
    args = parser.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("no CUDA device: a record names the GPU the tests ran on, so run this on it", file=sys.stderr)
        return 2
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "-"
    name, cc = torch.cuda.get_device_name(), tuple(torch.cuda.get_device_capability())
    date = datetime.date.today().isoformat()
    counts = tally(args.junit)
    shared = counts.get(None)
    print(f"verification of {name} (compute capability {cc[0]}.{cc[1]}) by {args.junit}:")
    for backend, why in verdicts(counts, args.exit).items():
        if why is not None:
            print(f"# {backend}: not verified: {why}")
            continue
        tests = _summary(counts[backend]) + (f" (shared: {_summary(shared)})" if shared else "")
        record = Record(device=name, capability=cc, torch=torch.__version__, triton=triton_version,
                        cuda=str(torch.version.cuda), date=date, command=args.command,
                        result=args.result or f"bench/results/{_slug(name)}-{date}/tests.log", tests=tests)
        print(f"# {backend}: verified; add to VERIFIED[{backend!r}] in disco_kernels/_verified.py:")
        print(f"    {record!r},")
    return 0
