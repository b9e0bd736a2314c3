"""LMO classes vs the independent fp64 oracle (tests/oracle.py): every flag of every norm, each
dtype under the tolerance rule, batching, init, rank errors."""
import math

import pytest
import torch

import disco_kernels as dk
import oracle
from disco_kernels import lmo as L
from tolerances import assert_close, bound, rel_err

NS_NORMS = ("Spectral", "SpectralConv", "Auto")
# (norm, kwargs, shape): every flag of every norm, each at a shape where it changes the answer
# (test_flag_changes_the_answer checks that it does).
FLAG_CASES = [
    ("Spectral", {}, (7, 129)),
    ("Spectral", {"max": True}, (7, 129)),  # sqrt(7/129) < 1: max takes 1
    ("Spectral", {"max": True}, (129, 7)),  # sqrt(129/7) > 1: max changes nothing (not a flag case)
    ("Spectral", {"normalized": False}, (16, 24)),
    ("Spectral", {"steps": 3}, (16, 24)),
    ("Spectral", {"steps": 0}, (5, 9)),
    ("Spectral", {"coefficients": "polar_express"}, (16, 24)),
    ("Spectral", {"coefficients": "polar_express", "steps": 7}, (24, 16)),  # the last triple repeats
    ("Spectral", {"coefficients": [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)], "steps": 3}, (9, 5)),
    ("Spectral", {}, (1, 1)),
    ("SpectralConv", {}, (3, 4, 5, 5)),
    ("SpectralConv", {}, (6, 2, 3)),
    ("SpectralConv", {"steps": 2}, (3, 4, 3, 3)),
    ("SpectralConv", {"coefficients": "polar_express"}, (4, 2, 3)),
    ("ColNorm", {}, (7, 129)),
    ("ColNorm", {"normalized": True}, (7, 129)),
    ("ColNorm", {"transpose": True}, (129, 7)),
    ("ColNorm", {"normalized": True, "transpose": True}, (16, 24)),
    ("RowNorm", {}, (7, 129)),
    ("RowNorm", {"normalized": False}, (129, 7)),
    ("RowNorm", {"transpose": True}, (16, 24)),
    ("RowNorm", {"normalized": False, "transpose": True}, (1, 1)),  # not a flag case
    ("Sign", {}, (7, 129)),
    ("Sign", {"normalized": False}, (129, 7)),
    ("Sign", {"zero_init": True}, (1, 1)),  # changes init only (test_init_flags)
    ("BiasRMS", {}, (17,)),
    ("BiasRMS", {}, ()),
    ("Auto", {}, (7, 129)),
    ("Auto", {"steps": 2}, (4, 3, 3, 3)),
    ("Auto", {}, (17,)),
]
NOT_A_FLAG_CASE = {("Spectral", (129, 7)), ("Sign", (1, 1)), ("RowNorm", (1, 1))}  # odd sizes, same answer


def _ids(case):
    norm, kwargs, shape = case
    return f"{norm}-{'-'.join(f'{k}={v}' for k, v in kwargs.items()) or 'default'}-{'x'.join(map(str, shape))}"


def _ours(norm, kwargs, g, ns_dtype):
    """The package's LMO of ``g`` with its Newton-Schulz iterating in ``ns_dtype``."""
    extra = {"dtype": ns_dtype} if norm in NS_NORMS else {}
    return dk.norm_dict[norm](**kwargs, **extra).lmo(g)


def _exact_and_plain(norm, kwargs, g, dtype):
    """(fp64 answer, plain torch's answer in ``dtype`` -- fp32 for fp64) for the LMO of ``g``."""
    plain_dtype = torch.float32 if dtype == torch.float64 else dtype
    return oracle.lmo(norm, g.double(), **kwargs), oracle.lmo(norm, g.to(plain_dtype), **kwargs)


@pytest.mark.parametrize("case", FLAG_CASES, ids=map(_ids, FLAG_CASES))
def test_fp64_matches_oracle(case):
    norm, kwargs, shape = case
    g = torch.randn(shape, dtype=torch.float64)
    out = _ours(norm, kwargs, g, torch.float64)
    assert out.shape == g.shape and out.dtype == torch.float64
    assert_close(out, *_exact_and_plain(norm, kwargs, g, torch.float64), what=_ids(case))


@pytest.mark.parametrize("case", [c for c in FLAG_CASES if c[1] and (c[0], c[2]) not in NOT_A_FLAG_CASE],
                         ids=map(_ids, [c for c in FLAG_CASES if c[1] and (c[0], c[2]) not in NOT_A_FLAG_CASE]))
def test_flag_changes_the_answer(case):
    """Each flag case gives an answer that the norm's defaults do not: ignoring the flag fails
    test_fp64_matches_oracle."""
    norm, kwargs, shape = case
    g = torch.randn(shape, dtype=torch.float64)
    exact, plain = _exact_and_plain(norm, kwargs, g, torch.float64)
    default = oracle.lmo(norm, g)
    assert rel_err(default, exact) > bound(plain, exact, torch.float64)
    assert rel_err(_ours(norm, {}, g, torch.float64), exact) > bound(plain, exact, torch.float64)


DTYPE_CASES = [c for c in FLAG_CASES if math.prod(c[2]) > 1 and c[1].get("steps", 1)]


@pytest.mark.parametrize("case", DTYPE_CASES, ids=map(_ids, DTYPE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_within_rule(case, dtype):
    """g in ``dtype``, Newton-Schulz in ``dtype``: within the rule against plain torch in ``dtype``."""
    norm, kwargs, shape = case
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    out = _ours(norm, kwargs, g, dtype)
    assert out.dtype == dtype
    assert_close(out, *_exact_and_plain(norm, kwargs, g, dtype), what=_ids(case))


@pytest.mark.parametrize("shape", [(7, 129), (129, 7), (16, 24), (2, 9, 40)])
def test_spectral_default_bf16_iteration_within_rule(shape):
    """The default (bf16 iteration, as the reference Scion) on fp32 g: within the rule against the plain
    bf16 iteration."""
    g = torch.randn(shape, dtype=torch.float64)
    if len(shape) == 3:  # a batch of matrices through lmo_many
        out = torch.stack(L.Spectral().lmo_many(list(g.float())))
        exact = torch.stack([oracle.spectral(x) for x in g])
        plain = torch.stack([oracle.spectral(x.float(), dtype=torch.bfloat16) for x in g])
    else:
        out = L.Spectral().lmo(g.float())
        exact, plain = oracle.spectral(g), oracle.spectral(g.float(), dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_close(out, exact, plain, torch.bfloat16)


def test_lmo_many_batches_same_shapes(monkeypatch):
    """One Newton-Schulz call per shape, each result bitwise the LMO of its matrix alone (whose values
    the spectral tests check against the oracle)."""
    calls = []
    real = L.newton_schulz
    monkeypatch.setattr(L, "newton_schulz", lambda G, *a, **k: calls.append(tuple(G.shape)) or real(G, *a, **k))
    gs = [torch.randn(8, 12, dtype=torch.float64) for _ in range(4)] + [torch.randn(12, 8, dtype=torch.float64)]
    norm = L.Spectral(dtype=torch.float64, max=True)
    out = norm.lmo_many(gs)
    assert sorted(calls) == [(1, 12, 8), (4, 8, 12)]
    for g, u in zip(gs, out):
        assert torch.equal(u, norm.lmo(g))


def test_auto_lmo_many_mixed():
    gs = [torch.randn(6, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64),
          torch.randn(6, 4, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)]
    out = L.Auto(dtype="float64", steps=3).lmo_many(gs)
    for g, u in zip(gs, out):
        assert_close(u, oracle.auto(g, steps=3), oracle.auto(g.float(), steps=3))


@pytest.mark.parametrize("norm,shape", [(L.Spectral(), (5,)), (L.Sign(), (2, 3, 4)), (L.BiasRMS(), (3, 3)),
                                        (L.SpectralConv(), (3, 3)), (L.ColNorm(), (4,))])
def test_rank_errors_name_shape(norm, shape):
    with pytest.raises(ValueError, match=rf"{type(norm).__name__} needs .* shape {tuple(shape)}".replace("(", r"\(").replace(")", r"\)")):
        norm.lmo(torch.randn(shape))


def test_make_norm_errors():
    with pytest.raises(ValueError, match="norm must be one of"):
        L.make_norm("Frobenius")
    with pytest.raises(ValueError, match="norm_kwargs"):
        L.make_norm("Sign", {"steps": 5})
    with pytest.raises(ValueError, match="dtype"):
        L.make_norm("Spectral", {"dtype": "int8"})


INIT_CASES = [
    ("Spectral", {}, (8, 12)), ("Spectral", {"normalized": False}, (8, 12)), ("Spectral", {"max": True}, (8, 12)),
    ("Spectral", {}, (12, 8)), ("Spectral", {}, (1, 1)),
    ("SpectralConv", {}, (4, 2, 3, 3)), ("SpectralConv", {}, (4, 2, 3)), ("SpectralConv", {}, (4, 2, 3, 1)),
    ("SpectralConv", {}, (4, 2, 1, 3)), ("SpectralConv", {}, (4, 2, 2, 5)),
    ("ColNorm", {}, (50, 16)), ("ColNorm", {"transpose": True}, (50, 16)), ("ColNorm", {"normalized": True}, (7, 129)),
    ("ColNorm", {"normalized": True, "transpose": True}, (129, 7)),
    ("RowNorm", {}, (10, 16)), ("RowNorm", {"normalized": False}, (10, 16)), ("RowNorm", {"transpose": True}, (7, 129)),
    ("Sign", {}, (3, 4)), ("Sign", {"normalized": False}, (3, 4)), ("Sign", {"zero_init": True}, (3, 4)),
    ("BiasRMS", {}, (5,)), ("Auto", {}, (6, 9)), ("Auto", {}, (3, 2, 3, 3)), ("Auto", {}, (5,)),
]


@pytest.mark.parametrize("case", INIT_CASES, ids=map(_ids, INIT_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_init_matches_oracle(case, dtype):
    """init() draws the reference's random numbers in the reference's order (the same seed gives the
    reference's weights) and computes them within the rule (every tap of a non-square conv kernel too)."""
    norm, kwargs, shape = case
    w = torch.full(shape, float("nan"), dtype=dtype)
    torch.manual_seed(7)
    dk.norm_dict[norm](**kwargs).init(w)
    torch.manual_seed(7)
    exact = oracle.init(norm, shape, dtype, torch.float64, **kwargs)
    torch.manual_seed(7)
    plain = oracle.init(norm, shape, dtype, dtype, **kwargs)
    assert w.dtype == dtype and w.isfinite().all()
    assert_close(w, exact, plain, what=_ids(case))


@pytest.mark.parametrize("case", [c for c in INIT_CASES if c[1]], ids=map(_ids, [c for c in INIT_CASES if c[1]]))
def test_init_flag_changes_the_weights(case):
    norm, kwargs, shape = case
    torch.manual_seed(7)
    flagged = oracle.init(norm, shape, **kwargs)
    torch.manual_seed(7)
    assert rel_err(oracle.init(norm, shape), flagged) > 0.01


def test_norm_dict_names():
    assert set(dk.norm_dict) == {"Spectral", "SpectralConv", "ColNorm", "RowNorm", "Sign", "BiasRMS", "Auto"}
