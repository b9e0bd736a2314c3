"""The reference math itself: schedules, NS convergence, LMO definitions, norms."""
import math

import pytest
import torch

from disco_kernels import reference as ref
from tolerances import rel_err, unit

SHAPES = [(1, 1), (7, 129), (129, 7), (16, 16), (3, 5)]


def test_schedules():
    triples, mult, eps = ref.ns_schedule("jordan", 3)
    assert triples == [ref.JORDAN] * 3 and (mult, eps) == (1.0, 1e-7)
    triples, mult, eps = ref.ns_schedule("polar_express", 7)
    assert triples[:5] == list(ref.POLAR_EXPRESS) and triples[5:] == [ref.POLAR_EXPRESS[-1]] * 2
    assert (mult, eps) == (1.02, 1e-6)
    assert ref.ns_schedule([(1, 2, 3), (4, 5, 6)], 3)[0] == [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0), (4.0, 5.0, 6.0)]
    assert ref.ns_schedule("jordan", 0)[0] == []


@pytest.mark.parametrize("bad", ["nope", [(1, 2)], [], 3])
def test_schedule_errors(bad):
    with pytest.raises(ValueError, match="coefficients"):
        ref.ns_schedule(bad, 5)


@pytest.mark.parametrize("steps", [-1, 2.5, True])
def test_schedule_steps_errors(steps):
    with pytest.raises(ValueError, match="steps"):
        ref.ns_schedule("jordan", steps)


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_orthogonalises(shape):
    """Many steps of a convergent cubic schedule reach the polar factor."""
    G = torch.randn(shape, dtype=torch.float64)
    X = ref.newton_schulz(G, steps=60, coefficients=[(1.5, -0.5, 0.0)])
    assert rel_err(X, ref.polar_factor(G)) < 1e-8


def test_newton_schulz_singular_values():
    """5 steps land singular values in a band around 1 (jordan ~[0.68, 1.13]);
    polar_express's smallest singular value is closer to 1 than jordan's."""
    G = torch.randn(64, 96, dtype=torch.float64)
    s_j = torch.linalg.svdvals(ref.newton_schulz(G, 5, "jordan"))
    s_p = torch.linalg.svdvals(ref.newton_schulz(G, 5, "polar_express"))
    assert 0.6 < s_j.min() and s_j.max() < 1.2
    assert 0.8 < s_p.min() and s_p.max() < 1.2 and s_p.min() > s_j.min()


def test_newton_schulz_batched_and_tall():
    G = torch.randn(3, 9, 4, dtype=torch.float64)
    X = ref.newton_schulz(G)
    for i in range(3):
        torch.testing.assert_close(X[i], ref.newton_schulz(G[i]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(X, ref.newton_schulz(G.mT).mT, rtol=1e-12, atol=1e-12)


def test_polar_factor_zero():
    assert ref.polar_factor(torch.zeros(4, 6)).abs().max() == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_colnorm_rownorm_definitions(shape):
    g = torch.randn(shape, dtype=torch.float64)
    d_out, d_in = shape
    col = ref.lmo_colnorm(g)
    torch.testing.assert_close(col.norm(dim=0) / math.sqrt(d_out), torch.ones(d_in, dtype=g.dtype))
    row = ref.lmo_rownorm(g)
    torch.testing.assert_close(row.norm(dim=1) * math.sqrt(d_in), torch.ones(d_out, dtype=g.dtype))
    torch.testing.assert_close(ref.lmo_colnorm(g, transpose=True), ref.lmo_colnorm(g.T).T)
    torch.testing.assert_close(ref.lmo_rownorm(g, normalized=False).norm(dim=1), torch.ones(d_out, dtype=g.dtype))
    torch.testing.assert_close(ref.lmo_colnorm(g, normalized=True), col / d_in)


def test_sign_bias_rms():
    g = torch.tensor([[1.0, -2.0, 0.0]])
    assert torch.equal(ref.lmo_sign(g), torch.tensor([[1.0, -1.0, 0.0]]) / 3)
    b = torch.randn(11, dtype=torch.float64)
    torch.testing.assert_close(ref.lmo_bias_rms(b).pow(2).mean(), torch.tensor(1.0, dtype=b.dtype))


def test_power_iteration_converges():
    W = torch.randn(2, 30, 50, dtype=torch.float64)
    sigma, v = ref.power_iteration(W, iters=500)
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(W, ord=2), rtol=1e-6, atol=0)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(2, dtype=W.dtype))


def test_power_iteration_zero_matrix():
    sigma, v = ref.power_iteration(torch.zeros(5, 3), iters=3)
    assert sigma.item() == 0 and torch.isfinite(v).all() and abs(v.norm().item() - 1) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_operator_norms(shape):
    W = torch.randn(shape, dtype=torch.float64)
    d_out, d_in = shape
    s = torch.linalg.svdvals(W)
    torch.testing.assert_close(ref.rms_to_rms(W), math.sqrt(d_in / d_out) * s[0])
    torch.testing.assert_close(ref.rms_to_inf(W), math.sqrt(d_in) * W.norm(dim=1).max())
    torch.testing.assert_close(ref.l1_to_rms(W), W.norm(dim=0).max() / math.sqrt(d_out))
    torch.testing.assert_close(ref.supremum(W), W.abs().max())
    torch.testing.assert_close(ref.condition_number(W), s[0] / s[-1])


def test_unit_roundoff():
    assert unit(torch.bfloat16) == 2.0 ** -8 and unit(torch.float32) == 2.0 ** -24
