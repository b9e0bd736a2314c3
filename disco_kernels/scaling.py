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
