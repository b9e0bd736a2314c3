"""Scion and ScionLight steps against the oracle's ``scion_run`` (tests/oracle.py), in fp64.

Each group hyper-parameter (lr, momentum, scale, unconstrained, norm, every norm flag) and each
optimizer variant (Scion's buffer, ScionLight's carried p.grad, params listed twice, steps without a
gradient) changes the result of some case here; fp64 results agree to a few ulps of fp64.
"""
from __future__ import annotations

import pytest
import torch

import disco_kernels as dk
import oracle
from tolerances import assert_oracle, unit

NORMS = [  # (norm, norm_kwargs, param shapes)
    ("Spectral", {"dtype": "float64"}, [(6, 10), (10, 6), (6, 10)]),
    ("Spectral", {"dtype": "float64", "max": True, "normalized": False, "steps": 3}, [(6, 10), (10, 6)]),
    ("Spectral", {"dtype": "float64", "coefficients": "polar_express", "steps": 6}, [(6, 10)]),
    ("SpectralConv", {"dtype": "float64", "steps": 4}, [(4, 2, 3), (4, 2, 3, 3)]),
    ("ColNorm", {}, [(6, 10), (10, 6)]),
    ("ColNorm", {"normalized": True, "transpose": True}, [(6, 10)]),
    ("RowNorm", {}, [(6, 10), (10, 6)]),
    ("RowNorm", {"normalized": False, "transpose": True}, [(6, 10)]),
    ("Sign", {}, [(6, 10)]),
    ("Sign", {"normalized": False}, [(6, 10)]),
    ("BiasRMS", {}, [(7,), (1,)]),
    ("Auto", {"dtype": "float64", "steps": 2}, [(6, 10), (7,), (4, 2, 3), (6, 10)]),
]
HYPER = [  # lr, momentum, scale, unconstrained
    (0.1, 1.0, 1.0, False),
    (0.05, 0.3, 2.5, False),
    (0.2, 0.5, 0.5, True),
]


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run(cls, params, grads_per_step, **group):
    """Steps ``cls`` over ``grads_per_step``, each gradient accumulated into p.grad as a backward does
    (ScionLight carries its momentum there; with momentum 1 it keeps p.grad as it is, as the reference, so
    the gradients add up, as in the oracle)."""
    opt = cls([{"params": params, **group}], backend="torch")
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            if g is None:
                p.grad = None
            elif cls is dk.ScionLight and p.grad is not None:
                p.grad.add_(g)  # the next backward accumulates into the carried momentum
            else:
                p.grad = g.clone()
        opt.step()
    return opt


@pytest.mark.parametrize("light", [False, True], ids=["Scion", "ScionLight"])
@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "lr{}-m{}-s{}-u{}".format(*h))
@pytest.mark.parametrize("norm,kwargs,shapes", NORMS, ids=lambda x: str(x))
def test_steps_match_the_oracle(norm, kwargs, shapes, hyper, light):
    lr, momentum, scale, unconstrained = hyper
    params = [torch.nn.Parameter(_randn(s, i)) for i, s in enumerate(shapes)]
    start = [p.detach().clone() for p in params]
    grads = [[_randn(s, 100 * t + i) for i, s in enumerate(shapes)] for t in range(3)]
    group = dict(lr=lr, momentum=momentum, scale=scale, unconstrained=unconstrained, norm=norm, norm_kwargs=kwargs)
    _run(dk.ScionLight if light else dk.Scion, params, grads, **group)
    oracle_kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
    assert_oracle([p.detach() for p in params], oracle.scion_run, start, grads,
                  [{**group, "norm_kwargs": oracle_kwargs}] * len(shapes), light=light)


@pytest.mark.parametrize("cls", [dk.Scion, dk.ScionLight])
def test_steps_without_some_gradients(cls):
    """A param without a grad is skipped (ScionLight: its carried momentum is dropped with p.grad)."""
    shapes = [(6, 10), (6, 10), (7,), (10, 6)]
    params = [torch.nn.Parameter(_randn(s, i)) for i, s in enumerate(shapes)]
    start = [p.detach().clone() for p in params]
    grads = [[None if (t, i) in {(0, 1), (1, 2), (1, 0), (2, 3)} else _randn(s, 10 * t + i)
              for i, s in enumerate(shapes)] for t in range(4)]
    group = dict(lr=0.1, momentum=0.4, scale=1.5, unconstrained=False, norm="Auto", norm_kwargs={"dtype": "float64"})
    _run(cls, params, grads, **group)
    assert_oracle([p.detach() for p in params], oracle.scion_run, start, grads,
                  [{**group, "norm_kwargs": {}}] * len(shapes), light=cls is dk.ScionLight)


def test_groups_keep_their_own_hyper_parameters():
    shapes = [(6, 10), (6, 10), (7,), (10, 6)]
    params = [torch.nn.Parameter(_randn(s, i)) for i, s in enumerate(shapes)]
    start = [p.detach().clone() for p in params]
    groups = [dict(lr=0.1, momentum=0.5, scale=2.0, unconstrained=False, norm="Spectral",
                   norm_kwargs={"dtype": "float64"}),
              dict(lr=0.01, momentum=1.0, scale=3.0, unconstrained=True, norm="RowNorm", norm_kwargs={}),
              dict(lr=0.2, momentum=0.9, scale=1.0, unconstrained=False, norm="BiasRMS", norm_kwargs={}),
              dict(lr=0.05, momentum=0.2, scale=0.5, unconstrained=True, norm="ColNorm",
                   norm_kwargs={"normalized": True})]
    opt = dk.Scion([{"params": [p], **g} for p, g in zip(params, groups)], backend="torch")
    grads = [[_randn(s, 10 * t + i) for i, s in enumerate(shapes)] for t in range(3)]
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    per_param = [{**g, "norm_kwargs": {k: v for k, v in g["norm_kwargs"].items() if k != "dtype"}} for g in groups]
    assert_oracle([p.detach() for p in params], oracle.scion_run, start, grads, per_param)


def test_defaults_are_the_references():
    """lr 1e-3, momentum 1 (no buffer), scale 1, constrained, norm Auto (bf16 Newton-Schulz)."""
    p = torch.nn.Parameter(_randn((6,), 0))
    start = p.detach().clone()
    opt = dk.Scion([p])
    assert {k: opt.defaults[k] for k in ("lr", "momentum", "scale", "unconstrained", "norm", "norm_kwargs")} == dict(
        lr=1e-3, momentum=1.0, scale=1.0, unconstrained=False, norm="Auto", norm_kwargs={})
    g = _randn((6,), 1)
    p.grad = g.clone()
    opt.step()
    assert_oracle(p.detach(), lambda s, g: oracle.scion_step(s, g, lr=1e-3), start, g)
    assert opt.state[p] == {}  # momentum 1: no buffer
    assert dk.ScionLight([torch.nn.Parameter(torch.zeros(2))]).defaults == opt.defaults


def test_lr_as_a_tensor():
    shapes = [(6, 10), (7,)]
    params = [torch.nn.Parameter(_randn(s, i)) for i, s in enumerate(shapes)]
    start = [p.detach().clone() for p in params]
    opt = dk.Scion([{"params": params[:1], "norm": "Spectral", "norm_kwargs": {"dtype": "float64"}},
                    {"params": params[1:], "norm": "BiasRMS"}], lr=torch.tensor(0.1), momentum=0.5)
    grads = [[_randn(s, 10 * t + i) for i, s in enumerate(shapes)] for t in range(2)]
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    lr = torch.tensor(0.1).item()  # the fp32 number, read once as a Python float (not 1 - lr rounded to fp32)
    groups = [dict(lr=lr, momentum=0.5, norm="Spectral"), dict(lr=lr, momentum=0.5, norm="BiasRMS")]
    assert_oracle([p.detach() for p in params], oracle.scion_run, start, grads, groups)


def test_momentum_buffer_is_the_references():
    p = torch.nn.Parameter(_randn((6, 10), 0))
    opt = dk.Scion([p], momentum=0.3, norm="Sign")
    g1, g2 = _randn((6, 10), 1), _randn((6, 10), 2)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
    buf = opt.state[p]["momentum_buffer"]
    assert_oracle(buf, lambda g1, g2: (0.3 * g1) * 0.7 + 0.3 * g2, g1, g2)  # the oracle's buffer recurrence
    assert buf.dtype == p.dtype and buf.shape == p.shape


def test_scion_light_decays_the_gradient():
    p = torch.nn.Parameter(_randn((6, 10), 0))
    opt = dk.ScionLight([p], momentum=0.25, norm="RowNorm")
    g = _randn((6, 10), 1)
    p.grad = g.clone()
    opt.step()
    assert torch.equal(p.grad, g * 0.75) and opt.state[p].keys() <= {"grad_state"}  # one exact-by-construction product
    p2 = torch.nn.Parameter(_randn((6, 10), 0))
    opt2 = dk.ScionLight([p2], momentum=1.0, norm="Spectral", norm_kwargs={"dtype": "float64"})
    p2.grad = g.clone()
    opt2.step()
    assert torch.equal(p2.grad, g)  # momentum 1: the gradient is left as it is


@pytest.mark.parametrize("cls", [dk.Scion, dk.ScionLight])
@pytest.mark.parametrize("norm,kwargs,shape", [("Spectral", {"dtype": "float64"}, (6, 10)), ("RowNorm", {}, (6, 10)),
                                                ("BiasRMS", {}, (7,))])
def test_param_listed_twice_steps_twice(cls, norm, kwargs, shape):
    p = torch.nn.Parameter(_randn(shape, 0))
    start = p.detach().clone()
    opt = cls([{"params": [p, p], "norm": norm, "norm_kwargs": kwargs}], lr=0.1, momentum=0.5)
    g = _randn(shape, 1)
    p.grad = g.clone()
    opt.step()
    group = dict(lr=0.1, momentum=0.5, norm=norm)
    if cls is dk.Scion:  # the same buffer updated twice, then the param stepped twice
        assert_oracle([p.detach()], oracle.scion_run, [start], [[g], [g]], [group])
    else:  # the same p.grad used twice, decayed after each
        assert_oracle([p.detach()], oracle.scion_run, [start], [[g], [torch.zeros_like(g)]], [group], light=True)


def test_init_is_the_norms_init_times_scale():
    torch.manual_seed(0)
    w, b, e = torch.nn.Parameter(torch.zeros(4, 6)), torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(
        torch.zeros(7, 3))
    opt = dk.Scion([{"params": [w, b], "norm": "Auto", "scale": 3.0},
                    {"params": [e], "norm": "ColNorm", "norm_kwargs": {"transpose": True}, "scale": 0.5}])
    opt.init()
    # The fp32 weights are the exact ones rounded at most twice (the cast, the scale), so by Weyl's inequality each
    # singular value, and each row's norm, is off by at most ||W32 - W||_F <= 2 u(fp32) ||W||_F (rows: ||row||).
    s = torch.linalg.svdvals(w.detach().double())
    want = 3.0 * (4 / 6) ** 0.5
    assert (s - want).abs().max() <= 2 * unit(torch.float32) * want * 4 ** 0.5
    assert b.abs().max() == 0
    rows = e.detach().double().norm(dim=1)
    want = 0.5 * oracle.init_line_norm("ColNorm", (7, 3), transpose=True)
    assert (rows - want).abs().max() <= 2 * unit(torch.float32) * want
