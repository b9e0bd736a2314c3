"""The scaling rules of "Optimal Scaling Needs Optimal Norm" (Filatov, Wang, Ebert,
Kesselheim 2025, arXiv 2510.03871), fitted on Llama-style norm-everywhere models
trained with unconstrained Scion on D = 2^31 ... 2^37 tokens.

Units: batch sizes are counted in sequences of ``seq_len`` tokens (the paper's
fit uses 4096), D in tokens, learning rates are the input/output-layer lr.

    log2 η*(B, D) = 0.62 log2 B - 0.56 log2 D + 9.8     (B in sequences of 4096 tokens)
    B*(D) = 128 · (D / 2^33)^0.45                        (anchor: the 69M proxy at D = 2^33)
    η*(D) = η*(B*(D), D) ∝ D^(0.62·0.45 - 0.56) = D^-0.281   (paper: D^-0.28 ± 0.07)

At the optimum the output layer's norm is log2 ‖W_out‖_{RMS→∞} ≈ 7.0 ± 0.2 across
horizons (7.4 ± 0.2 across widths and depths). Outside the fitted range these
rules are extrapolations. ``layer_lr`` gives the per-layer learning rates,
input : hidden : output = 1 : 1/8 : 1 by default.

``lr_for_norm`` predicts the lr whose run ends at a target output norm from one or two
runs; ``summarize_sweep`` fits the optimum, the optimal norms and the exponents above on an
(lr, batch size, token budget) sweep, and ``tuning_on_sweep`` measures ``lr_for_norm`` on it.
"""
from __future__ import annotations

import math

LR_LOG2_INTERCEPT = 9.8       # ± 1.6
LR_BATCH_EXPONENT = 0.62      # ± 0.05
LR_TOKENS_EXPONENT = -0.56    # ± 0.05
BATCH_TOKENS_EXPONENT = 0.45  # ± 0.07
LR_ALONG_OPTIMUM_EXPONENT = -0.28  # ± 0.07, as the paper reports it
ANCHOR_TOKENS = 2 ** 33
ANCHOR_BATCH = 128            # sequences of 4096 tokens
FIT_SEQ_LEN = 4096
FIT_TOKENS = (2 ** 31, 2 ** 37)

OUTPUT_NORM_LOG2 = 7.0        # ± 0.2, optimum across training horizons
OUTPUT_NORM_LOG2_WIDTH = 7.4  # ± 0.2, optimum across width and depth

LAYER_RATIO = (1.0, 1.0 / 8, 1.0)  # input : hidden : output


def _positive(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {x!r}")
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    return float(x)


def optimal_batch_size(tokens, *, seq_len: int = FIT_SEQ_LEN) -> float:
    """B*(D) = 128 · (D / 2^33)^0.45 sequences of 4096 tokens, returned in sequences of ``seq_len``."""
    D = _positive("tokens", tokens)
    seq_len = _positive("seq_len", seq_len)
    return ANCHOR_BATCH * (D / ANCHOR_TOKENS) ** BATCH_TOKENS_EXPONENT * FIT_SEQ_LEN / seq_len


def optimal_lr(batch_size=None, tokens=None, *, seq_len: int = FIT_SEQ_LEN) -> float:
    """η*(B, D) = 2^9.8 · B^0.62 · D^-0.56, B in sequences of 4096 tokens.

    ``batch_size`` counts sequences of ``seq_len`` tokens; None takes B*(tokens),
    which gives η*(D) ∝ D^-0.281.
    """
    if tokens is None:
        raise TypeError("tokens (the training horizon D in tokens) is required")
    D = _positive("tokens", tokens)
    seq_len = _positive("seq_len", seq_len)
    if batch_size is None:
        B = optimal_batch_size(D)
    else:
        B = _positive("batch_size", batch_size) * seq_len / FIT_SEQ_LEN
    return 2.0 ** (LR_LOG2_INTERCEPT + LR_BATCH_EXPONENT * math.log2(B) + LR_TOKENS_EXPONENT * math.log2(D))


def layer_lr(lr, ratio=LAYER_RATIO) -> dict[str, float]:
    """Per-layer learning rates {"input": lr·r_in, "hidden": lr·r_hid, "output": lr·r_out}.

    ``ratio`` = (input, hidden, output) multipliers; the paper's default (1, 1/8, 1)
    is always in its top 10% and up to 6% better in loss than equal rates.
    """
    lr = _positive("lr", lr)
    if isinstance(ratio, (str, bytes)) or not hasattr(ratio, "__len__") or len(ratio) != 3:
        raise ValueError(f"ratio must be (input, hidden, output) multipliers, got {ratio!r}")
    r_in, r_hid, r_out = (_positive(f"ratio[{i}]", r) for i, r in enumerate(ratio))
    return {"input": lr * r_in, "hidden": lr * r_hid, "output": lr * r_out}


# -- tuning by norm ------------------------------------------------------------------------------

def norm_vs_lr_fit(lrs, log2_norms, *, slope=None) -> tuple[float, float]:
    """(s, a) of the line log2 ‖W_out‖ = a + s · log2 η through runs at learning rates ``lrs``.

    All runs share the model, batch size and horizon; only the lr differs. With two or more
    runs s and a are the least-squares fit; with one run (or when ``slope`` is given) s is
    ``slope`` and a = mean(log2 N − s · log2 η). A run's final output norm grows with its lr
    (‖W_T‖ ≤ ‖W_0‖ + η·T for unconstrained Scion, whose output update has RMS→∞ norm η), so
    a fitted s ≤ 0 is an error.
    """
    xs = [math.log2(_positive(f"lrs[{i}]", lr)) for i, lr in enumerate(lrs)]
    ys = [float(n) for n in log2_norms]
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"need one log2 norm per lr, got {len(xs)} lrs and {len(ys)} norms")
    if not all(math.isfinite(y) for y in ys):
        raise ValueError(f"log2_norms must be finite (leave diverged runs out), got {ys}")
    if slope is None:
        if len(set(xs)) < 2:
            raise ValueError("one learning rate gives no slope: pass slope= or runs at two lrs")
        slope, _ = fit_line(xs, ys)
        if slope <= 0:
            raise ValueError(f"the output norm does not grow with the lr in these runs (slope {slope:.3g})")
    slope = _positive("slope", slope)
    return slope, sum(y - slope * x for x, y in zip(xs, ys)) / len(xs)


def lr_for_norm(lrs, log2_norms, target_log2_norm=OUTPUT_NORM_LOG2, *, slope=None) -> float:
    """The learning rate whose run ends at the output norm ``target_log2_norm``.

    η = 2^((target − a) / s), with (s, a) = ``norm_vs_lr_fit(lrs, log2_norms, slope=slope)``:
    log2 ‖W_out‖ taken linear in log2 η at a fixed model, batch size and horizon. Give runs at
    the batch size and token budget you will train with; the target is the optimal norm of a
    small sweep of this setup, or the paper's 2^7 for the paper's setup (the paper finds it the
    same across horizons; on the committed CPU sweep, results/norm_transfer, it moves by a few
    tenths with the batch size and the seed). Between the runs' lrs this interpolates;
    outside, it extrapolates. One run needs ``slope`` (0.44–0.50 on that sweep).
    """
    if isinstance(target_log2_norm, bool) or not isinstance(target_log2_norm, (int, float)) \
            or not math.isfinite(target_log2_norm):
        raise ValueError(f"target_log2_norm must be a finite number (a log2 norm), got {target_log2_norm!r}")
    s, a = norm_vs_lr_fit(lrs, log2_norms, slope=slope)
    return 2.0 ** ((target_log2_norm - a) / s)


# -- fitting the rules on a sweep ----------------------------------------------------------------

def fit_line(xs, ys) -> tuple[float, float]:
    """Least-squares (slope, intercept) of y = slope · x + intercept."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx == 0:
        raise ValueError(f"a line needs at least two distinct x, got {list(xs)}")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def grid_minimum(xs, ys) -> tuple[float, bool]:
    """(x*, at_edge): where y is smallest over sorted grid ``xs``, refined between grid points.

    x* is the vertex of the parabola through the grid minimum (x1, y1) and its neighbours:
    x1 − ½·[(x1−x0)²(y1−y2) − (x1−x2)²(y1−y0)] / [(x1−x0)(y1−y2) − (x1−x2)(y1−y0)].
    It is the grid point itself at an edge of the grid (``at_edge``: the optimum may lie
    outside) or next to a non-finite y (a diverged run). Non-finite ys count as +inf.
    """
    key = [y if math.isfinite(y) else math.inf for y in ys]
    i = min(range(len(xs)), key=key.__getitem__)
    if i in (0, len(xs) - 1):
        return xs[i], len(xs) > 1
    (x0, x1, x2), (y0, y1, y2) = xs[i - 1:i + 2], key[i - 1:i + 2]
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    if not math.isfinite(y0 + y2):
        return x1, False
    return x1 - 0.5 * ((x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)) / den, False


def interpolate(x, xs, ys) -> float:
    """y at x, linear between the neighbouring points of sorted grid ``xs``; NaN outside the grid."""
    if not xs[0] <= x <= xs[-1]:
        return math.nan
    j = next(j for j in range(1, len(xs)) if x <= xs[j]) if len(xs) > 1 else 0
    if x == xs[j]:
        return ys[j]
    t = (x - xs[j - 1]) / (xs[j] - xs[j - 1])
    return ys[j - 1] + t * (ys[j] - ys[j - 1])


def fit_plane(x1s, x2s, ys) -> tuple[float, float, float]:
    """Least-squares (b1, b2, c) of y = b1 · x1 + b2 · x2 + c (fp64)."""
    import torch
    A = torch.tensor([[a, b, 1.0] for a, b in zip(x1s, x2s)], dtype=torch.float64)
    if torch.linalg.matrix_rank(A) < 3:
        raise ValueError("a plane needs points spanning both x1 and x2")
    sol = torch.linalg.lstsq(A, torch.tensor(list(ys), dtype=torch.float64)[:, None], driver="gelsd").solution
    return tuple(sol[:, 0].tolist())


def _spread(values) -> dict:
    """mean, max − min and (population) standard deviation."""
    mean = sum(values) / len(values)
    return {"mean": mean, "spread": max(values) - min(values),
            "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))}


def _grid(rows, tokens, batch_size) -> tuple[list, list, list]:
    """(log2 lr, val loss, log2 output norm) of the runs at (tokens, batch_size), by lr."""
    cell = sorted((math.log2(r["lr"]), r["val_loss"], r["log2_output_norm"]) for r in rows
                  if r["tokens"] == tokens and r["batch_size"] == batch_size)
    return [c[0] for c in cell], [c[1] for c in cell], [c[2] for c in cell]


def _finite_loss(r) -> float:
    return r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf


def _size_optimum(rows, D) -> dict:
    """The optimum at token budget D; see ``summarize_sweep``."""
    at_D = [r for r in rows if r["tokens"] == D]
    best = min(at_D, key=_finite_loss)
    per_batch = []
    for B in sorted({r["batch_size"] for r in at_D}):
        x, loss, _ = _grid(rows, D, B)
        lr_log2, edge = grid_minimum(x, loss)
        per_batch.append({"batch_size": B, "lr_opt": 2.0 ** lr_log2, "lr_opt_at_edge": edge,
                          "val_loss": min(loss, key=lambda y: y if math.isfinite(y) else math.inf)})
    b_log2, b_edge = grid_minimum([math.log2(p["batch_size"]) for p in per_batch], [p["val_loss"] for p in per_batch])
    at_best = next(p for p in per_batch if p["batch_size"] == best["batch_size"])
    x, _, norm = _grid(rows, D, best["batch_size"])
    return {"tokens": D, "runs": len(at_D), "diverged": sum(not math.isfinite(r["val_loss"]) for r in at_D),
            "best": {k: best[k] for k in ("lr", "batch_size", "val_loss", "log2_output_norm")},
            "lr_opt": at_best["lr_opt"], "lr_opt_at_edge": at_best["lr_opt_at_edge"],
            "batch_opt": 2.0 ** b_log2, "batch_opt_at_edge": b_edge,
            "log2_output_norm_at_lr_opt": interpolate(math.log2(at_best["lr_opt"]), x, norm),
            "per_batch": per_batch}


def summarize_sweep(rows) -> dict:
    """The optimum of an (lr, batch size) sweep at each token budget D, and the rules fitted on it.

    ``rows``: dicts with tokens, batch_size, lr, val_loss and log2_output_norm (NaN loss for a
    diverged run). Per budget D:
      best                         the run of lowest validation loss
      per_batch lr_opt = η*(B, D)  ``grid_minimum`` of the loss over log2 η at batch size B
      batch_opt = B*(D)            ``grid_minimum`` over log2 B of each batch size's lowest loss
      lr_opt = η*(D)               η*(B, D) at the best run's batch size
      log2_output_norm_at_lr_opt   the output norm at η*(D), linear in log2 η between runs
    Across budgets: mean, spread (max − min) and std of the optimal log2 output norms (the best
    runs' and the interpolated ones), and least-squares exponents beside the paper's:
      log2 η*(D) vs log2 D (−0.28), log2 B*(D) vs log2 D (0.45), and the plane
      log2 η*(B, D) = β log2 B + δ log2 D + c (β = 0.62, δ = −0.56).
    Exponents need two budgets (the plane also two batch sizes); otherwise they are None.
    """
    sizes = [_size_optimum(rows, D) for D in sorted({r["tokens"] for r in rows})]
    out = {"sizes": sizes, "optimal_log2_output_norm": {
        "best_runs": _spread([s["best"]["log2_output_norm"] for s in sizes]),
        "at_lr_opt": _spread([s["log2_output_norm_at_lr_opt"] for s in sizes]),
        "paper": OUTPUT_NORM_LOG2}}
    logD = [math.log2(s["tokens"]) for s in sizes]
    exps = {"lr_opt_vs_tokens": {"paper": LR_ALONG_OPTIMUM_EXPONENT},
            "batch_opt_vs_tokens": {"paper": BATCH_TOKENS_EXPONENT},
            "lr_opt_vs_batch_at_fixed_tokens": {"paper": LR_BATCH_EXPONENT},
            "lr_opt_vs_tokens_at_fixed_batch": {"paper": LR_TOKENS_EXPONENT}}
    for e in exps.values():
        e["fit"] = None
    if len(sizes) > 1:
        exps["lr_opt_vs_tokens"]["fit"] = fit_line(logD, [math.log2(s["lr_opt"]) for s in sizes])[0]
        exps["batch_opt_vs_tokens"]["fit"] = fit_line(logD, [math.log2(s["batch_opt"]) for s in sizes])[0]
        cells = [(math.log2(p["batch_size"]), math.log2(s["tokens"]), math.log2(p["lr_opt"]))
                 for s in sizes for p in s["per_batch"]]
        if len({c[0] for c in cells}) > 1:
            beta, delta, _ = fit_plane(*zip(*cells))
            exps["lr_opt_vs_batch_at_fixed_tokens"]["fit"] = beta
            exps["lr_opt_vs_tokens_at_fixed_batch"]["fit"] = delta
    out["exponents"] = exps
    return out


def tuning_on_sweep(rows, summary) -> list[dict]:
    """How well ``lr_for_norm`` picks the lr at each budget of a sweep, measured on the sweep.

    At budget D and its best batch size B, the target is the mean optimal log2 output norm
    (``log2_output_norm_at_lr_opt``) of the *other* budgets: the norm transferred from other
    horizons (D's own when it is the only one). Guesses are runs of the sweep at (B, D): every
    pair of finite runs ("two_runs"), and every finite run alone ("one_run") with the slope of
    log2 norm against log2 η carried over the same way (the mean of the other budgets' slopes,
    each fitted on all finite runs at their best batch size). The predicted lr's loss is the
    sweep's loss interpolated linearly in log2 η (NaN outside the grid: counted, not averaged).
    Regret = that loss − the best loss at D. Beside it, the baseline the guesses give for free:
    the better guess's own regret.
    """
    sizes = summary["sizes"]
    grids = [_grid(rows, s["tokens"], s["best"]["batch_size"]) for s in sizes]
    finite = [[i for i in range(len(x)) if math.isfinite(loss[i]) and math.isfinite(norm[i])]
              for x, loss, norm in grids]
    slopes = [norm_vs_lr_fit([2.0 ** x[i] for i in ok], [norm[i] for i in ok])[0] if len(ok) > 1 else None
              for (x, _, norm), ok in zip(grids, finite)]
    out = []
    for k, (s, (x, loss, norm), ok) in enumerate(zip(sizes, grids, finite)):
        target = _mean_of_others([z["log2_output_norm_at_lr_opt"] for z in sizes], k)
        slope = _mean_of_others(slopes, k)
        best = s["best"]["val_loss"]

        def trial(guesses, given_slope=None):
            lr = lr_for_norm([2.0 ** x[i] for i in guesses], [norm[i] for i in guesses], target, slope=given_slope)
            return {"guesses": [2.0 ** x[i] for i in guesses], "lr": lr,
                    "regret": interpolate(math.log2(lr), x, loss) - best,
                    "baseline_regret": min(loss[i] for i in guesses) - best}

        pairs = [trial([i, j]) for n, i in enumerate(ok) for j in ok[n + 1:]]
        singles = [trial([i], slope) for i in ok] if slope is not None else []
        out.append({"tokens": s["tokens"], "batch_size": s["best"]["batch_size"], "target_log2_norm": target,
                    "slope": slopes[k], "two_runs": _regrets(pairs), "one_run": dict(slope=slope, **_regrets(singles))})
    return out


def _mean_of_others(values, k):
    """Mean of the values other than the k-th (the k-th when it is the only one; None if none is known)."""
    others = [v for i, v in enumerate(values) if i != k and v is not None] or [values[k]]
    return None if None in others else sum(others) / len(others)


def _regrets(trials) -> dict:
    """Median and worst regret of the trials inside the grid, and of their baseline over all trials."""
    inside = [t["regret"] for t in trials if math.isfinite(t["regret"])]
    base = [t["baseline_regret"] for t in trials]
    return {"trials": len(trials), "inside_grid": len(inside),
            "median_regret": _median(inside), "worst_regret": max(inside, default=math.nan),
            "median_baseline_regret": _median(base), "worst_baseline_regret": max(base, default=math.nan),
            "by_trial": trials}


def _median(values) -> float:
    v = sorted(values)
    if not v:
        return math.nan
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2
