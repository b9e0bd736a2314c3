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
