import math

import pytest

from disco_kernels import scaling

# The rules compute 2**x with |x| < 32, so log2 of their ratio is off by about 2·|x|·u (u = 2^-53).
EXP_TOL = 4 * 32 * 2.0 ** -53


def log2_ratio(f, a, b):
    return math.log2(f(b) / f(a))


def test_lr_at_the_anchor_matches_the_fit():
    want = 2 ** (0.62 * 7 - 0.56 * 33 + 9.8)
    assert scaling.optimal_lr(128, 2 ** 33) == pytest.approx(want, rel=1e-12)
    assert 2 ** -5 < want < 2 ** -4  # inside the paper's grid 2^-8 ... 2^0


@pytest.mark.parametrize("D", [2 ** 31, 2 ** 34, 3e10])
def test_lr_exponents(D):
    assert log2_ratio(lambda B: scaling.optimal_lr(B, D), 64, 128) == pytest.approx(0.62, abs=EXP_TOL)
    assert log2_ratio(lambda d: scaling.optimal_lr(96, d), D, 2 * D) == pytest.approx(-0.56, abs=EXP_TOL)


def test_batch_size_anchor_and_exponent():
    assert scaling.optimal_batch_size(2 ** 33) == pytest.approx(128, rel=1e-12)
    assert log2_ratio(scaling.optimal_batch_size, 2 ** 32, 2 ** 35) / 3 == pytest.approx(0.45, abs=EXP_TOL)


def test_lr_along_the_optimal_batch_size_follows_the_reported_exponent():
    exponent = log2_ratio(lambda d: scaling.optimal_lr(None, d), 2 ** 31, 2 ** 37) / 6
    assert exponent == pytest.approx(0.62 * 0.45 - 0.56, abs=EXP_TOL)
    assert abs(exponent - scaling.LR_ALONG_OPTIMUM_EXPONENT) < 0.07  # the paper's ± 0.07
    assert scaling.optimal_lr(None, 2 ** 33) == pytest.approx(scaling.optimal_lr(128, 2 ** 33), rel=1e-12)


def test_seq_len_converts_units():
    # 256 sequences of 2048 tokens are 128 sequences of 4096
    assert scaling.optimal_lr(256, 2 ** 33, seq_len=2048) == pytest.approx(scaling.optimal_lr(128, 2 ** 33), rel=1e-12)
    assert scaling.optimal_batch_size(2 ** 33, seq_len=1024) == pytest.approx(512, rel=1e-12)


def test_layer_lr_default_ratio():
    lrs = scaling.layer_lr(0.04)
    assert lrs == {"input": 0.04, "hidden": 0.005, "output": 0.04}
    assert scaling.layer_lr(1.0, ratio=(2, 0.5, 0.25)) == {"input": 2.0, "hidden": 0.5, "output": 0.25}


@pytest.mark.parametrize("call, name", [
    (lambda: scaling.optimal_lr(0, 1e9), "batch_size"),
    (lambda: scaling.optimal_lr(8, -1.0), "tokens"),
    (lambda: scaling.optimal_lr(8, math.nan), "tokens"),
    (lambda: scaling.optimal_lr(8, 1e9, seq_len=0), "seq_len"),
    (lambda: scaling.optimal_batch_size(0), "tokens"),
    (lambda: scaling.layer_lr(-0.1), "lr"),
    (lambda: scaling.layer_lr(0.1, ratio=(1, 0, 1)), "ratio[1]"),
    (lambda: scaling.layer_lr(0.1, ratio=(1, 1)), "ratio"),
])
def test_non_positive_inputs_raise_value_error_naming_them(call, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        call()


@pytest.mark.parametrize("call, name", [
    (lambda: scaling.optimal_lr("8", 1e9), "batch_size"),
    (lambda: scaling.optimal_lr(True, 1e9), "batch_size"),
    (lambda: scaling.optimal_lr(8), "tokens"),
    (lambda: scaling.layer_lr(None), "lr"),
])
def test_wrong_types_raise_type_error_naming_them(call, name):
    with pytest.raises(TypeError, match=name):
        call()


# -- tuning by norm and the sweep's maths, on synthetic data with a known answer -----------------------
# The data are chosen so that every step is exact in binary floating point (quarters, small integers);
# only least-squares solves round, by a few ulps of numbers below 2^6.
FIT_TOL = 2.0 ** -40


def test_lr_for_norm_inverts_a_line_through_two_runs():
    # log2 N = 3 + 0.75 log2 lr: runs at 2^-3 and 2^-1 end at 0.75 and 2.25; N = 2^6 needs log2 lr = 4
    assert scaling.norm_vs_lr_fit([2 ** -3, 2 ** -1], [0.75, 2.25]) == (0.75, 3.0)
    assert scaling.lr_for_norm([2 ** -1, 2 ** -3], [2.25, 0.75], 6.0) == 16.0  # order does not matter
    assert scaling.lr_for_norm([2 ** -3, 2 ** -1], [0.75, 2.25], 1.5) == 2 ** -2  # between the guesses


def test_lr_for_norm_least_squares_through_three_runs():
    # residuals +0.25, -0.5, +0.25 around log2 N = 1 + 0.5 log2 lr cancel in the fit
    assert scaling.norm_vs_lr_fit([1, 2, 4], [1.25, 1.0, 2.25]) == (0.5, 1.0)
    assert scaling.lr_for_norm([1, 2, 4], [1.25, 1.0, 2.25], 3.0) == 16.0


def test_lr_for_norm_from_one_run_takes_the_given_slope():
    assert scaling.lr_for_norm([2 ** -2], [4.0], 7.0, slope=1.0) == 2.0
    assert scaling.lr_for_norm([2 ** -2], [4.0], 7.0, slope=0.75) == 2 ** 2
    # slope given: the intercept is the mean of log2 N − s log2 lr = 1.75, 2.25
    assert scaling.lr_for_norm([1.0, 2.0], [1.75, 2.75], 5.0, slope=0.5) == 2.0 ** 6


@pytest.mark.parametrize("call, error, match", [
    (lambda: scaling.lr_for_norm([0.1], [3.0], 7.0), ValueError, "slope"),
    (lambda: scaling.lr_for_norm([0.1, 0.1], [3.0, 3.5], 7.0), ValueError, "slope"),
    (lambda: scaling.lr_for_norm([0.1, 0.2], [3.0, 2.0], 7.0), ValueError, "does not grow"),
    (lambda: scaling.lr_for_norm([0.1, 0.2], [3.0], 7.0), ValueError, "one log2 norm per lr"),
    (lambda: scaling.lr_for_norm([0.1, 0.2], [3.0, math.nan], 7.0), ValueError, "finite"),
    (lambda: scaling.lr_for_norm([0.1, -0.2], [3.0, 4.0], 7.0), ValueError, r"lrs\[1\]"),
    (lambda: scaling.lr_for_norm([0.1, 0.2], [3.0, 4.0], math.inf), ValueError, "target"),
    (lambda: scaling.lr_for_norm([0.1], [3.0], 7.0, slope=0), ValueError, "slope"),
])
def test_lr_for_norm_rejects_what_it_cannot_fit(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_grid_minimum_is_the_parabola_vertex_inside_the_grid():
    xs = [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert scaling.grid_minimum(xs, [(x - 0.25) ** 2 for x in xs]) == (0.25, False)
    assert scaling.grid_minimum(xs, [(x + 0.75) ** 2 + 3 for x in xs]) == (-0.75, False)
    assert scaling.grid_minimum(xs, [(x - 3) ** 2 for x in xs]) == (2.0, True)  # optimum beyond the grid
    assert scaling.grid_minimum(xs, [4.0, 1.0, 0.0, math.nan, 9.0]) == (0.0, False)  # a diverged neighbour
    assert scaling.grid_minimum(xs, [1.0, 0.0, 0.0, 1.0, 2.0]) == (-0.5, False)  # a tie: between the two
    assert scaling.grid_minimum([3.0], [1.0]) == (3.0, False)


def test_interpolate_is_linear_between_grid_points_and_nan_outside():
    xs, ys = [0.0, 1.0, 3.0], [1.0, 3.0, 2.0]
    assert [scaling.interpolate(x, xs, ys) for x in (0.0, 0.5, 1.0, 2.0, 3.0)] == [1.0, 2.0, 3.0, 2.5, 2.0]
    assert math.isnan(scaling.interpolate(-0.5, xs, ys)) and math.isnan(scaling.interpolate(3.5, xs, ys))


def synthetic_sweep(drift=0.0, slope=lambda d: 0.75):
    """Rows of a sweep whose optimum is known in closed form (all logs base 2):

        loss = (log lr − log η*(B, D))² + ½ (log B − log B*(D))² + 8 − ¼ log D
        log η*(B, D) = ½ log B − ¼ log D − ¾       log B*(D) = ¼ log D + ¼
        log N_out = 5 + drift · (log D − 12) + slope(log D) · (log lr − log η*(B, D))
    on D = 2^10, 2^12, 2^14; B = 4 ... 32; lr = 2^-6 ... 2^0, and lr = 2 diverged (NaN) everywhere.
    Every log η* sits ¼ from the nearest grid point, so each batch size's grid minimum is 1/16 above
    its curve's and B* is recovered exactly. ``drift``: the optimal norm's change per doubling of D;
    ``slope``: the norm's slope against log lr (¾ by default)."""
    rows = []
    for d in (10, 12, 14):
        for b in (2, 3, 4, 5):
            for x in range(-6, 2):
                opt = b / 2 - d / 4 - 0.75
                loss = (x - opt) ** 2 + (b - (d / 4 + 0.25)) ** 2 / 2 + 8 - d / 4 if x < 1 else math.nan
                rows.append({"tokens": 2 ** d, "batch_size": 2 ** b, "lr": 2.0 ** x, "val_loss": loss,
                             "log2_output_norm": 5 + drift * (d - 12) + slope(d) * (x - opt) if x < 1 else math.nan})
    return rows


def test_summarize_sweep_recovers_the_known_optimum():
    s = scaling.summarize_sweep(synthetic_sweep())
    assert [z["tokens"] for z in s["sizes"]] == [2 ** 10, 2 ** 12, 2 ** 14]
    assert [z["diverged"] for z in s["sizes"]] == [4, 4, 4] and [z["runs"] for z in s["sizes"]] == [32, 32, 32]
    # best runs: B = 8, 8, 16 (log B* = 2.75, 3.25, 3.75 on a grid of integers; 3.25 rounds down)
    assert [(z["best"]["batch_size"], z["best"]["lr"]) for z in s["sizes"]] == [(8, 0.25), (8, 0.25), (16, 0.25)]
    assert [math.log2(z["batch_opt"]) for z in s["sizes"]] == [2.75, 3.25, 3.75]
    assert not any(z["batch_opt_at_edge"] or z["lr_opt_at_edge"] for z in s["sizes"])
    for z in s["sizes"]:
        d = math.log2(z["tokens"])
        assert [math.log2(p["lr_opt"]) for p in z["per_batch"]] == [b / 2 - d / 4 - 0.75 for b in (2, 3, 4, 5)]
    assert [math.log2(z["lr_opt"]) for z in s["sizes"]] == [-1.75, -2.25, -2.25]  # at the best batch sizes
    # the norm is 5 at every η*(B, D); the best runs sit a quarter step off it: 5 − 3/16, 5 + 3/16, 5 + 3/16
    assert [z["log2_output_norm_at_lr_opt"] for z in s["sizes"]] == [5.0, 5.0, 5.0]
    assert s["optimal_log2_output_norm"]["at_lr_opt"] == {"mean": 5.0, "spread": 0.0, "std": 0.0}
    best = s["optimal_log2_output_norm"]["best_runs"]
    assert best["mean"] == 5 + 1 / 16 and best["spread"] == 0.375
    assert abs(best["std"] - math.sqrt(2) * 0.375 / 3) < FIT_TOL  # sqrt(mean (x - mean)²) of −1/4, 1/8, 1/8 (× 3/4)
    e = s["exponents"]
    assert e["batch_opt_vs_tokens"] == {"fit": 0.25, "paper": 0.45}
    # through (10, −1.75), (12, −2.25), (14, −2.25): the best batch size moves in whole grid steps
    assert e["lr_opt_vs_tokens"] == {"fit": -0.125, "paper": -0.28}
    assert abs(e["lr_opt_vs_batch_at_fixed_tokens"]["fit"] - 0.5) < FIT_TOL
    assert abs(e["lr_opt_vs_tokens_at_fixed_batch"]["fit"] + 0.25) < FIT_TOL
    assert e["lr_opt_vs_batch_at_fixed_tokens"]["paper"] == 0.62
    assert e["lr_opt_vs_tokens_at_fixed_batch"]["paper"] == -0.56


def test_summarize_sweep_of_one_budget_fits_no_exponent():
    s = scaling.summarize_sweep([r for r in synthetic_sweep() if r["tokens"] == 2 ** 12])
    assert all(e["fit"] is None for e in s["exponents"].values())
    assert s["optimal_log2_output_norm"]["at_lr_opt"]["spread"] == 0.0


def test_tuning_on_the_sweep_hits_the_optimum_from_every_pair_and_every_run():
    rows = synthetic_sweep()
    tuned = scaling.tuning_on_sweep(rows, scaling.summarize_sweep(rows))
    assert [t["batch_size"] for t in tuned] == [8, 8, 16]
    for t in tuned:
        assert t["target_log2_norm"] == 5.0 and t["slope"] == t["one_run"]["slope"] == 0.75
        two, one = t["two_runs"], t["one_run"]
        assert two["trials"] == two["inside_grid"] == 21 and one["trials"] == 7  # 7 finite runs, NaN left out
        d = math.log2(t["tokens"])
        b = math.log2(t["batch_size"])
        for trials in (two, one):
            assert {math.log2(p["lr"]) for p in trials["by_trial"]} == {b / 2 - d / 4 - 0.75}  # η* exactly
            # the sweep's loss between grid points ¼ and ¾ away from η*: 1/16 + ¼ (9/16 − 1/16) = 3/16, best 1/16
            assert {p["regret"] for p in trials["by_trial"]} == {0.125}
            assert trials["median_regret"] == trials["worst_regret"] == 0.125
        assert two["median_baseline_regret"] > 0.125 and min(p["baseline_regret"] for p in two["by_trial"]) == 0.0
        assert sorted(p["baseline_regret"] for p in one["by_trial"])[:3] == [0.0, 0.5, 1.5]  # runs ¼, ¾, 1¼ off η*


def test_tuning_on_the_sweep_takes_its_target_from_the_other_budgets():
    # optimal norms 4.75, 5, 5.25: the targets are the others' means, 5.125, 5, 4.875; the lr predicted
    # lands half a grid step above, at and below η* (norm slope ¾), where the interpolated loss is
    # 1/16 + ¾ · ½ = 7/16, 3/16 and 7/16 against the best 1/16
    rows = synthetic_sweep(drift=0.125)
    tuned = scaling.tuning_on_sweep(rows, scaling.summarize_sweep(rows))
    assert [t["target_log2_norm"] for t in tuned] == [5.125, 5.0, 4.875]
    for trials in ("two_runs", "one_run"):
        shift = [{math.log2(p["lr"]) - (math.log2(t["batch_size"]) / 2 - math.log2(t["tokens"]) / 4 - 0.75)
                  for p in t[trials]["by_trial"]} for t in tuned]
        assert shift == [{0.5}, {0.0}, {-0.5}]
        assert [{p["regret"] for p in t[trials]["by_trial"]} for t in tuned] == [{0.375}, {0.125}, {0.375}]


def test_tuning_with_one_run_carries_the_slope_over_from_the_other_budgets():
    rows = synthetic_sweep(slope=lambda d: (d - 6) / 8)  # ½, ¾, 1 at D = 2^10, 2^12, 2^14
    tuned = scaling.tuning_on_sweep(rows, scaling.summarize_sweep(rows))
    assert [t["slope"] for t in tuned] == [0.5, 0.75, 1.0]
    assert [t["one_run"]["slope"] for t in tuned] == [0.875, 0.75, 0.625]
    assert {p["regret"] for p in tuned[1]["one_run"]["by_trial"]} == {0.125}  # the carried slope is right at 2^12
    # at 2^10 the true slope is ½, the carried one ⅞: a guess g off η* lands (1 − ½/⅞)(g − η*) off,
    # 3/7 of the way
    opt = 3 / 2 - 10 / 4 - 0.75  # log η*(8, 2^10)
    for p in tuned[0]["one_run"]["by_trial"]:
        (guess,) = p["guesses"]
        assert abs((math.log2(p["lr"]) - opt) / (math.log2(guess) - opt) - 3 / 7) < FIT_TOL
