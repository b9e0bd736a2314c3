"""A benchmark case (one op or step, one shape, dtype and implementation) and its measurement.

Every case knows its work: ``flops`` (TFLOP/s are reported in them; for
Newton-Schulz DESIGN.md's 4m²n + 2m³ per step) and ``bytes`` (read + written
once, GB/s), and which of them bounds it. Their time at the device's peaks is
``floor_ms`` and ``share_of_peak = floor / measured time``. Where a kernel may
do less (``floor_flops``: X Xᵀ and A A computed one triangle each),
``share_of_floor`` is the same against that least work: a symmetric kernel can
pass 100% of peak in the first measure, never in the second.

A case may also carry ``floor_bytes``, the least bytes the whole call must move (the whole step:
shapes.step_bytes; the row gets it, and on a GPU ``floor_bytes_share`` = floor_bytes / time / memory
peak), and ask for ``memory``: the row's ``peak_extra_bytes`` is then the most memory one more call holds
beyond what existed before it (bench/memory.py), measured once after the timing.
"""
from __future__ import annotations

import functools
import gc
import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import disco_kernels as dk

from .device import Device, dtype_name
from .memory import peak_extra_bytes
from .timing import NOISY_SPREAD, interleaved, percentiles, spread


def _from_tests(name: str):
    """``tests/<name>.py`` as the test suite imports it (top-level ``name``, one module object for both):
    the benchmark checks against the suite's independent fp64 oracle and its one tolerance rule."""
    path = Path(__file__).resolve().parent.parent / "tests" / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
        return loaded
    if loaded is not None:  # another module holds the name: keep it, load ours under a private one
        name = f"_bench_tests_{name}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


oracle = _from_tests("oracle")  # fp64 restatement of the math; imports nothing of disco_kernels
tolerances = _from_tests("tolerances")  # rel_err and the rule: 1.25x plain torch's error in the same dtype + 4 u
rel_err = tolerances.rel_err
plain_dtype = tolerances.plain_dtype  # the dtype of the plain computation a result in a dtype is held to


def kernels(op: str) -> tuple[str, ...]:
    """The backends with a kernel for ``op`` (the KERNELS tuple of disco_kernels.ops.<op>)."""
    return importlib.import_module(f"disco_kernels.ops.{op}").KERNELS


@dataclass
class Plan:
    """What to run: device, preset ("smoke" | "quick" | "full"), dtypes and an optional impl filter."""
    device: Device
    preset: str = "quick"
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
    impls: frozenset[str] | None = None
    compile: bool = False  # time torch.compile too (costs seconds of compile time per shape)

    def wants(self, impl: str) -> bool:
        return self.impls is None or impl in self.impls

    def our_impls(self, backends: tuple[str, ...]) -> list[str]:
        """Our implementations given the ``backends`` an op has kernels for: the available ones (Triton off
        a GPU only when asked for by name: interpreted Triton is a correctness tool, its time means
        nothing), then "compile" when the plan has it."""
        dev = self.device.torch_device
        timed = dev.type == "cuda" or (self.impls is not None and "triton" in self.impls)
        names = [b for b in dk.available_backends(dev) if b in backends and (b != "triton" or timed)]
        if self.compile:
            names.append("compile")
        return [n for n in names if self.wants(n)]

    def generator(self) -> torch.Generator:
        return torch.Generator(self.device.torch_device).manual_seed(0)


@dataclass
class Case:
    suite: str
    model: str
    case: str
    shape: str
    dtype: torch.dtype
    impl: str
    baseline: bool
    flops: float
    bytes: float
    bound: str                              # "compute", "memory" or "both"
    build: Callable[[], tuple[Callable[[], object], Callable[[], float] | None]]  # (timed fn, its Check or None)
    compute_dtype: torch.dtype | None = None  # the dtype the flops run in (default: dtype)
    floor_flops: float | None = None          # least FLOPs any implementation needs, when below flops
    warmup: int = 1                           # calls before timing (3 where torch.compile recompiles)
    floor_bytes: float | None = None          # least bytes the whole call must move (the step: shapes.step_bytes)
    memory: bool = False                      # measure the peak extra memory of one call (bench/memory.py)
    peak_dtype: torch.dtype | None = None     # the dtype whose peak scores it (default compute_dtype: where its
                                              # flops run, e.g. fp32 for a bf16 NS in the Gram form)
    extra: dict = field(default_factory=dict)

    def floor_seconds(self, device: Device, flops: float | None = None, peak_dtype: torch.dtype | None = None) -> float:
        """Time of the case's work (``flops`` instead of its own, when given) at the device's peaks (the
        compute peak of ``peak_dtype``, default the case's compute dtype)."""
        t = 0.0
        if self.bound in ("compute", "both"):
            t += (self.flops if flops is None else flops) / device.peak_flops(
                peak_dtype or self.compute_dtype or self.dtype)
        if self.bound in ("memory", "both"):
            t += self.bytes / (device.peak_gbps * 1e9)
        return t


@functools.cache
def compiled(fn):
    """torch.compile(fn), shared by all cases, with room for one graph per shape and dtype."""
    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, key):
            setattr(cfg, key, max(getattr(cfg, key), 1024))
    return torch.compile(fn)


def update_term(p0: torch.Tensor, p1: torch.Tensor, lr: float, unconstrained: bool = False) -> torch.Tensor:
    """u of a Scion step p1 = p0 (1 - lr) - lr u (no decay when unconstrained), in fp64: the error of a step
    is that of u, which the decay lr p0 would otherwise dominate (a wrong u would pass unseen)."""
    p0, p1 = p0.double(), p1.double()
    return ((p0 if unconstrained else p0 * (1 - lr)) - p1) / lr


@dataclass
class Check:
    """A case's error against the independent fp64 oracle (tests/oracle.py), part by part.

    ``run()`` returns three {part: tensor} dicts computed from the same inputs: the case's result, the
    oracle's in fp64 (exact), and the oracle's in ``plain_dtype(dtype)`` (the plain torch computation, the
    yardstick of tests/tolerances.py's rule; ``dtype`` is the one the case computes in). Parts are e.g. a
    step's param groups; "all" is every part together (the one ``rel_err`` the benchmark reports)."""
    run: Callable[[], tuple[dict, dict, dict]]
    dtype: torch.dtype

    def _parts(self):
        dicts = self.run()
        if len(dicts[0]) == 1:
            return tuple({"all": next(iter(d.values()))} for d in dicts)
        return tuple({"all": torch.cat([t.flatten() for t in d.values()]), **d} for d in dicts)

    def errors(self) -> dict[str, tuple[float, float]]:
        """{part: (rel_err against fp64, the rule's bound for it)}, "all" first."""
        ours, exact, plain = self._parts()
        return {k: (rel_err(ours[k], exact[k]), tolerances.bound(plain[k], exact[k], self.dtype)) for k in ours}

    def __call__(self) -> float:
        return self.errors()["all"][0]

    def assert_rule(self, what: str = "result") -> None:
        """tests/tolerances.py's assertion for every part and for all of them together."""
        ours, exact, plain = self._parts()
        failed = []
        for k in ours:
            try:
                tolerances.assert_close(ours[k], exact[k], plain[k], self.dtype, f"{what}, {k}")
            except AssertionError as e:
                failed.append(str(e))
        assert not failed, "\n".join(failed)


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def peak_dtype(cases: list[Case]) -> torch.dtype:
    """The one dtype whose peak every row of a case is scored against: the dtype ours computes in (the first
    of ours among ``cases``, where most of its flops run: its ``peak_dtype``, else its compute dtype; the first
    case's when all are baselines)."""
    ours = next((c for c in cases if not c.baseline), cases[0])
    return ours.peak_dtype or ours.compute_dtype or ours.dtype


def measure(case: Case, plan: Plan) -> dict:
    """``measure_group`` of one case."""
    return measure_group([case], plan)[0]


def measure_group(cases: list[Case], plan: Plan) -> list[dict]:
    """Time the implementations of one case (same suite, model, case, shape and dtype) on the plan's device,
    interleaved (bench/timing.py), scored against one peak (``peak_dtype``); one result row each, in order
    (status "error: ..." for one that fails to build; a failing error check alone, e.g. the fp64 twin out of
    memory, leaves rel_err NaN and a note). Each row: ``time_ms`` (the median) with ``p20_ms`` and ``p80_ms``,
    ``spread`` and ``noisy`` (spread past timing.NOISY_SPREAD), ``compute`` (what it computes in) and
    ``peak_dtype`` (the peak its share is against)."""
    rows, built = [], []
    peak = peak_dtype(cases)
    try:
        for case in cases:
            row = {"suite": case.suite, "model": case.model, "case": case.case, "shape": case.shape,
                   "dtype": dtype_name(case.dtype), "impl": case.impl, "baseline": case.baseline,
                   "flops": case.flops, "bytes": case.bytes, **case.extra}
            row.setdefault("compute", dtype_name(case.compute_dtype or case.dtype))
            rows.append(row)
            try:
                fn, check = case.build()
                _check(row, check)
                check = None
            except Exception as e:  # a peer or backend failing must not end the run
                unsupported = case.impl == "cuda" and isinstance(e, ValueError) and "cannot run" in str(e)
                row.update(status=f"{'unsupported' if unsupported else 'error'}: {_why(e)}")
                continue
            built.append((case, row, fn))
        if built:
            try:
                times = interleaved([fn for *_, fn in built], plan.device.torch_device, plan.preset,
                                    [c.warmup for c, *_ in built])
            except Exception as e:
                for _, row, _ in built:
                    row.update(status=f"error: {_why(e)}")
                return rows
            for (case, row, fn), ts in zip(built, times):
                if case.memory:  # once, after the timing: fn is warm (a step's state exists)
                    try:
                        row["peak_extra_bytes"] = peak_extra_bytes(fn, plan.device.torch_device)
                    except Exception as e:
                        row["peak_extra_bytes"] = None
                        row["note"] = "; ".join(filter(None, [row.get("note"),
                                                              f"peak memory not measured: {_why(e)}"]))
                _timed(row, case, plan, ts, peak)
    finally:
        built = fn = None
        if plan.device.is_cuda and torch.cuda.memory_allocated() > 1 << 30:  # free what a cycle may still hold
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def _check(row: dict, check) -> None:
    try:
        if isinstance(check, Check):
            errors = check.errors()
            row["rel_err"], row["err_bound"] = errors["all"]
            beyond = [f"{k} {e:.3g} > {b:.3g}" for k, (e, b) in errors.items() if not e <= b]
            if beyond:
                row["note"] = "error beyond the tolerance rule (tests/tolerances.py): " + ", ".join(beyond)
        else:
            row["rel_err"] = check() if check is not None else math.nan
    except Exception as e:
        row.update(rel_err=math.nan, note=f"error check failed: {_why(e)}")


def _timed(row: dict, case: Case, plan: Plan, times: list[float], peak: torch.dtype) -> None:
    p20, seconds, p80 = percentiles(times)
    floor = case.floor_seconds(plan.device, peak_dtype=peak)
    row.update(status="ok", time_ms=seconds * 1e3, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3, runs=len(times),
               spread=spread(p20, seconds, p80), noisy=spread(p20, seconds, p80) > NOISY_SPREAD,
               tflops=case.flops / seconds / 1e12 if case.flops else None,
               gbps=case.bytes / seconds / 1e9 if case.bytes else None, floor_ms=floor * 1e3,
               share_of_peak=floor / seconds, peak_dtype=dtype_name(peak))
    if case.floor_flops is not None:
        row["share_of_floor"] = case.floor_seconds(plan.device, case.floor_flops, peak) / seconds
    if case.floor_bytes is not None:
        row["floor_bytes"] = case.floor_bytes
        if plan.device.is_cuda:  # a CPU step is compute-bound and its working set partly cached: no share there
            row["floor_bytes_share"] = case.floor_bytes / seconds / (plan.device.peak_gbps * 1e9)
