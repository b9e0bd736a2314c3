"""Compile every Triton kernel of disco_kernels for real GPU targets, with no GPU present.

    env -u TRITON_INTERPRET python tests/compile_triton_kernels.py [--all] [80 90]

TRITON_INTERPRET must be unset: then ``triton.jit`` gives compilable JITFunctions and the kernel
modules pick their GPU launch settings (block sizes, autotuning configs). Each kernel is compiled
through ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` (the same API in
Triton 3.6 to 3.9) down to PTX and, with the ptxas Triton bundles, a cubin. By default: every kernel
and every code path a constexpr selects, in bf16 (the Gram form's R and polynomial in fp32 too), with one
config of the autotuned kernels; --all:
every config, and fp32 too (IEEE dots take another lowering). Pointers are taken as 16-byte aligned
and innermost strides as 1, as a launch on contiguous torch tensors specialises them; each compile is
repeated with every integer argument 1 (specialised to a constexpr, as a launch does). Prints a header
{"ptxas", "triton", "kernels" (every @triton.jit *_kernel of the modules)}, then one JSON line per compile: {"kernel", "group", "arch", "ok", "error",
"ptx", "cubin" (sizes), "shared" (bytes), "fits" (shared memory within the target's per-block limit)}.
"""
import json
import os
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from disco_kernels.triton_kernels import fused_update as fu
from disco_kernels.triton_kernels import newton_schulz as ns
from disco_kernels.triton_kernels import power_iteration as pi

# Largest shared memory one block may use (opt-in), by compute capability major.
MAX_SHARED = {8: 166912, 9: 232448}


def spec(label, fn, types, consts, config=None, group=None):
    """One compile: argument types by name (default i32), constexpr values, launch options.
    ``group`` names the autotuned kernel whose configs are alternatives (one of them must fit)."""
    assert isinstance(fn, triton.runtime.JITFunction), "TRITON_INTERPRET is set: unset it to compile"
    consts = {**consts, **(config.kwargs if config else {})}
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages} if config else {}
    return dict(label=label, fn=fn, sig=sig, consts=consts, attrs=attrs, options=options, group=group or label)


def specs(full=False):
    """Every kernel and every code path a constexpr selects, in bf16 (and the Gram form's fp32 R and polynomial),
    with the last (smallest) config of the autotuned kernels; ``full``: also fp32 (IEEE dots lower differently)
    and every config."""
    out = []
    for dt in ("bf16", "fp32") if full else ("bf16",):
        prec = "ieee" if dt == "fp32" else "tf32"
        x = {"g_ptr": f"*{dt}", "x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "bm_ptr": f"*{dt}",
             "out_ptr": f"*{dt}", "part_ptr": "*fp32", "mult": "fp32", "eps": "fp32", "coef_a": "fp32",
             "coef_b": "fp32", "coef_c": "fp32"}
        scaled_set = (True, False) if full else (True,)  # SCALED=True compiles the False path plus the scaling
        out.append(spec(f"ns._sumsq_kernel[{dt}]", ns._sumsq_kernel, x, {"s_c": 1, "BR": 8, "BC": 64}))
        for k, c in configs(ns._sym_configs(), full):
            for scaled in scaled_set:
                out.append(spec(f"ns._gram_kernel[{dt},SCALED={scaled},cfg{k}]", ns._gram_kernel, x,
                                {"sx_n": 1, "SCALED": scaled, "PB": 64, "PREC": prec, "XDT": TL[dt]}, c,
                                f"ns._gram_kernel[{dt},SCALED={scaled}]"))
            out.append(spec(f"ns._sym_kernel[{dt},cfg{k}]", ns._sym_kernel, dict(x, c_ptr=f"*{dt}"), {"PREC": prec}, c,
                            f"ns._sym_kernel[{dt}]"))
            if dt == "bf16":  # the Gram form: R = X0 X0ᵀ in fp32 from bf16 tiles, its polynomial in fp32 (IEEE)
                out.append(spec(f"ns._gram_kernel[bf16->fp32,cfg{k}]", ns._gram_kernel, dict(x, a_ptr="*fp32"),
                                {"sx_n": 1, "SCALED": True, "PB": 64, "PREC": prec, "XDT": TL[dt]}, c,
                                "ns._gram_kernel[bf16->fp32]"))
                fp32 = {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32", "out_ptr": "*fp32"}
                out.append(spec(f"ns._sym_kernel[fp32 gram,cfg{k}]", ns._sym_kernel, dict(x, **fp32), {"PREC": "ieee"},
                                c, "ns._sym_kernel[fp32 gram]"))
        for k, c in configs(ns._update_configs(), full):
            for scaled in scaled_set:
                out.append(spec(f"ns._update_kernel[{dt},SCALED={scaled},cfg{k}]", ns._update_kernel, x,
                                {"sx_n": 1, "so_n": 1, "SCALED": scaled, "PB": 64, "PREC": prec}, c,
                                f"ns._update_kernel[{dt},SCALED={scaled}]"))

        max_m, max_elems = ns.SMALL_LIMITS[DTYPE_SIZE[dt]]
        for bm, bn in ((max_m, max_elems // max_m), (16, max_elems // 16)):
            out.append(spec(f"ns._small_kernel[{dt},{bm}x{bn}]", ns._small_kernel, dict(x, coef_ptr="*fp32"),
                            {"PREC": prec, "BM": bm, "BN": bn}, triton.Config({}, num_warps=8)))

        w = {"w_ptr": f"*{dt}", "v_ptr": "*fp32", "acc_ptr": "*fp32", "usq_ptr": "*fp32", "sigma_ptr": "*fp32"}
        for k, c in configs(pi._configs(), full):
            for one_pass in (True, False):
                out.append(spec(f"pi._sweep_kernel[{dt},ONE_PASS={one_pass},cfg{k}]", pi._sweep_kernel, w,
                                {"s_n": 1, "ONE_PASS": one_pass, "BN": pi.NMAX, "BM": c.kwargs["TILE"] // pi.NMAX},
                                c, f"pi._sweep_kernel[{dt},ONE_PASS={one_pass}]"))
        out.append(spec(f"pi._finish_kernel[{dt}]", pi._finish_kernel, w, {"BN": 1024}))

        # fused update: not autotuned, one launch setting per kernel; the flags split between the variants
        # so that each branch (buf or not, light or not, unconstrained or not, hyper-parameters from memory or
        # not, unit or strided columns, each kind) is compiled at least once; p in fp32 beside dt g and buf
        # (the roles' dtypes may differ: per-role alignment)
        t = {"tab": "*i64", "colsq_ptr": "*fp64", "p_base": "*fp32", "g_base": f"*{dt}", "b_base": f"*{dt}",
             "hyper": "*fp32", "lr": "fp32", "momentum": "fp32", "scale": "fp32"}
        align = dict(P_ALIGN=4, G_ALIGN=16 // DTYPE_SIZE[dt], B_ALIGN=16 // DTYPE_SIZE[dt], C_ALIGN=16 // DTYPE_SIZE[dt])
        scion = dict(HAS_BUF=True, LIGHT_DECAY=False, UNCONSTRAINED=False, HYPER=True, UNIT_C=True, **align,
                     LOG_T=4)
        light = dict(scion, HAS_BUF=False, LIGHT_DECAY=True, UNCONSTRAINED=True, HYPER=False, UNIT_C=False,
                     **dict.fromkeys(align, 1))
        tile = dict(BR=fu.TILE_BR, BC=fu.TILE_BC, LOOP=fu.TILE_LOOP)
        row = dict(BC=fu.CMAX, BR=max(1, fu.ROW_ELEMS // fu.CMAX))
        cfg = triton.Config({}, num_warps=fu.TILE_WARPS)
        variants = [(0, "sign", scion), (0, "scaled", light), (1, "line", scion), (2, "line", light)]
        if full:
            variants += [(0, "sign", light), (0, "scaled", scion), (1, "line", light), (2, "line", scion)]
        for mode, kind, flags in variants:
            out.append(spec(f"fu._tile_kernel[{dt},MODE={mode},{kind},light={flags['LIGHT_DECAY']}]", fu._tile_kernel,
                            t, dict(flags, **tile, MODE=mode, KIND=kind), cfg))
        cfg = triton.Config({}, num_warps=fu.ROW_WARPS)
        variants = [(True, light), (False, scion)]
        if full:
            variants += [(True, scion), (False, light)]
        for one_pass, flags in variants:
            out.append(spec(f"fu._row_kernel[{dt},ONE_PASS={one_pass},light={flags['LIGHT_DECAY']}]",
                            fu._row_kernel, t, dict(flags, **row, ONE_PASS=one_pass), cfg))
    return out + [ints_one(s) for s in out]


def ints_one(s):
    """``s`` with every integer argument 1: a launch specialises an int equal to 1 as a constexpr
    (m = 1 for a (1, n) G, one tensor in a fused update), a code path the interpreter never takes."""
    ints = {a: 1 for a, t in s["sig"].items() if t in ("i32", "i64")}
    return dict(s, label=s["label"][:-1] + ",ints=1]", sig={**s["sig"], **dict.fromkeys(ints, "constexpr")},
                consts={**s["consts"], **ints})


DTYPE_SIZE = {"bf16": 2, "fp32": 4}
TL = {"bf16": tl.bfloat16, "fp32": tl.float32}


def configs(cfgs, full):
    """(index, config) of the autotuning configs to compile: all, or the last (smallest)."""
    return list(enumerate(cfgs)) if full else [(len(cfgs) - 1, cfgs[-1])]


def compile_one(s, arch):
    res = {"kernel": s["label"], "group": s["group"], "arch": arch, "ok": False, "error": None}
    try:
        src = ASTSource(fn=s["fn"], signature=s["sig"], constexprs=s["consts"], attrs=s["attrs"])
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=s["options"])
        shared = k.metadata.shared
        res.update(ok=True, ptx=len(k.asm["ptx"]), cubin=len(k.asm["cubin"]), shared=shared,
                   fits=shared <= MAX_SHARED[arch // 10])
    except Exception as e:  # noqa: BLE001 - reported to the test
        res["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
    return res


def ptxas():
    """Path of the ptxas Triton will run for sm_80/sm_90, or None when it is missing."""
    try:
        path = triton.knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001 - a missing tool raises from the knob
        return None
    return path if path and os.path.isfile(path) else None


def _compile_nth(job):
    full, i, arch = job
    return compile_one(specs(full)[i], arch)


def main(archs, full=False):
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET to compile")
    kernels = sorted(f"{short}.{name}" for short, m in (("ns", ns), ("pi", pi), ("fu", fu))
                     for name, obj in vars(m).items()
                     if name.endswith("_kernel") and isinstance(obj, triton.runtime.JITFunction))
    print(json.dumps({"ptxas": ptxas(), "triton": triton.__version__, "kernels": kernels}), flush=True)
    jobs = [(full, i, arch) for arch in archs for i in range(len(specs(full)))]
    # compiles are independent and mostly single-threaded: one process per core (forked, no GPU state)
    with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1), mp_context=get_context("fork")) as pool:
        for res in pool.map(_compile_nth, jobs):
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    main([int(a) for a in args if a != "--all"] or [80, 90], full="--all" in args)
