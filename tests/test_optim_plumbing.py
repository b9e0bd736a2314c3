"""What the optimizers hand on: the forced backend to every op and backend check (with the param's name
for its error), the process group to the sharded step, their own arguments from ScionLight to Scion,
and what they keep in their state.

The ops and checks are replaced by spies that record their arguments and then run the torch backend.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import disco_kernels as dk
import oracle
from disco_kernels import lmo as L
from tolerances import assert_oracle

engine = importlib.import_module("disco_kernels.engine")


def _p(*shape, seed=0):
    return torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                                          dtype=torch.float64))


@pytest.fixture
def spies(monkeypatch):
    """Record the backend that each op is called with, then run it on torch."""
    seen = {"newton_schulz": [], "fused_update": [], "apply_update": []}
    real_ns, real_fused, real_apply = L.newton_schulz, engine.fused_update, engine.apply_update

    def newton_schulz(G, *args, backend="auto", **kwargs):
        seen["newton_schulz"].append(backend)
        return real_ns(G, *args, backend="torch", **kwargs)

    def fused_update(*args, backend="auto", **kwargs):
        seen["fused_update"].append(backend)
        return real_fused(*args, backend="torch", **kwargs)

    def apply_update(*args, backend="auto", **kwargs):
        seen["apply_update"].append(backend)
        return real_apply(*args, backend="torch", **kwargs)

    monkeypatch.setattr(L, "newton_schulz", newton_schulz)
    monkeypatch.setattr(engine, "fused_update", fused_update)
    monkeypatch.setattr(engine, "apply_update", apply_update)
    return seen


@pytest.mark.parametrize("cls", [dk.Scion, dk.ScionLight])
def test_forced_backend_reaches_every_op(cls, spies):
    w, h, b = _p(4, 6), _p(5, 3), _p(4)
    opt = cls([{"params": [w, b], "norm": "Auto", "norm_kwargs": {"dtype": "float64"}},
               {"params": [h], "norm": "RowNorm"}], backend="triton", momentum=0.5)
    for p in (w, h, b):
        p.grad = torch.ones_like(p)
    opt.step()
    assert spies["newton_schulz"] == ["triton"]
    assert spies["fused_update"] == ["triton", "triton"]  # BiasRMS of b, RowNorm of h
    assert spies["apply_update"] == ["triton"]  # the Newton-Schulz apply pass of w


def _spy_checks(monkeypatch):
    names = []

    def check_backend(self, backend, shape, p, g, name="g"):
        names.append((type(self).__name__, backend, tuple(shape), name))

    for cls in (L.Norm, L._NewtonSchulzNorm):
        monkeypatch.setattr(cls, "check_backend", check_backend)
    return names


def test_forced_backend_is_checked_per_param_with_its_name(monkeypatch):
    """At construction (the param's place) and again at each step (place and shape), for the concrete norm."""
    names = _spy_checks(monkeypatch)
    w, b = _p(4, 6), _p(4)
    opt = dk.Scion([{"params": [_p(2, 2)], "norm": "Sign"}, {"params": [w, b], "norm": "Auto"}], backend="torch")
    assert names == [("Sign", "torch", (2, 2), "param_groups[0]['params'][0]"),
                     ("Spectral", "torch", (4, 6), "param_groups[1]['params'][0]"),
                     ("BiasRMS", "torch", (4,), "param_groups[1]['params'][1]")]
    names.clear()
    b.grad = torch.ones_like(b)
    opt.step()
    assert names == [("BiasRMS", "torch", (4,), "param_groups[1]['params'][1] (shape (4,))")]


def test_auto_backend_is_not_checked(monkeypatch):
    names = _spy_checks(monkeypatch)
    w = _p(4, 6)
    opt = dk.Scion([w])
    w.grad = torch.ones_like(w)
    opt.step()
    assert names == []


def test_a_backend_made_impossible_after_construction_fails_before_any_change():
    w, h = _p(4, 6), _p(5, 3)
    opt = dk.Scion([{"params": [w]}, {"params": [h], "norm": "RowNorm"}], backend="torch")
    opt.backend = "cuda"
    before = [w.detach().clone(), h.detach().clone()]
    w.grad, h.grad = torch.ones_like(w), torch.ones_like(h)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
            opt.step()
        assert torch.equal(w.detach(), before[0]) and torch.equal(h.detach(), before[1])


# -- ScionLight hands its arguments on -------------------------------------------------------------------

def test_scion_light_passes_every_argument():
    p = _p(3, 4)
    opt = dk.ScionLight([p], 0.2, 0.3, "RowNorm", {"normalized": False}, 4.0, True, backend="torch",
                        nonfinite="skip")
    assert opt.defaults == dict(lr=0.2, momentum=0.3, scale=4.0, unconstrained=True, norm="RowNorm",
                                norm_kwargs={"normalized": False})
    assert (opt.backend, opt.nonfinite, opt.process_group) == ("torch", "skip", None)
    assert isinstance(opt.comm_stats, dk.distributed.Stats) and opt.comm_stats == dk.distributed.Stats()
    opt = dk.Scion([p], 0.2, 0.3, "RowNorm", {"normalized": False}, 4.0, True, backend="torch", nonfinite="ignore")
    assert opt.defaults["unconstrained"] is True and opt.nonfinite == "ignore"
    assert isinstance(opt.comm_stats, dk.distributed.Stats)


# -- state ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["Spectral", "RowNorm", "BiasRMS"])
def test_no_momentum_buffer_without_momentum(norm):
    p = _p(4) if norm == "BiasRMS" else _p(4, 6)
    for cls, momentum in ((dk.Scion, 1.0), (dk.ScionLight, 0.5), (dk.ScionLight, 1.0)):
        opt = cls([p], norm=norm, momentum=momentum)
        p.grad = torch.ones_like(p)
        opt.step()
        assert "momentum_buffer" not in opt.state.get(p, {}), (cls.__name__, momentum)
    opt = dk.Scion([p], norm=norm, momentum=0.5)
    p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(opt.state[p]["momentum_buffer"], 0.5 * torch.ones_like(p))


@pytest.mark.parametrize("norm", ["Spectral", "RowNorm"])
def test_param_listed_three_times_steps_three_times(norm):
    p = _p(4, 6)
    start = p.detach().clone()
    opt = dk.Scion([{"params": [p, p, p], "norm": norm, "norm_kwargs": {"dtype": "float64"} if norm == "Spectral"
                     else {}}], lr=0.1, momentum=0.5)
    g = torch.randn(4, 6, dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    assert_oracle([p.detach()], oracle.scion_run, [start], [[g]] * 3, [dict(lr=0.1, momentum=0.5, norm=norm)])


def test_scion_light_state_dict_after_the_state_was_looked_at():
    """An empty state entry (opt.state is a defaultdict) and no grad: state_dict drops the entry."""
    p, q = _p(3, 4), _p(2, 2)
    opt = dk.ScionLight([p, q], momentum=0.5, norm="Sign")
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[q] == {}  # creates the entry
    sd = opt.state_dict()
    assert list(sd["state"]) == [0] and set(sd["state"][0]) == {"grad_state"}
    p.grad = None
    assert opt.state_dict()["state"] == {}


# -- the process group --------------------------------------------------------------------------------------



@pytest.mark.parametrize("cls", [dk.Scion, dk.ScionLight])
def test_process_group_takes_the_sharded_step(cls, one_rank_group):
    w, b = _p(4, 6), _p(4, seed=1)
    start = [w.detach().clone(), b.detach().clone()]
    opt = cls([w, b], lr=0.1, momentum=0.5, norm_kwargs={"dtype": "float64"}, process_group="default")
    assert opt.process_group is one_rank_group
    g = [torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    w.grad, b.grad = g[0].clone(), g[1].clone()
    opt.step()
    assert opt.comm_stats.collectives >= 1  # the agreement all-reduce at least: the distributed step ran
    assert_oracle([w.detach(), b.detach()], oracle.scion_run, start, [g], [dict(lr=0.1, momentum=0.5)] * 2,
                  light=cls is dk.ScionLight)


def test_no_process_group_takes_the_local_step():
    w = _p(4, 6)
    opt = dk.Scion([w])
    w.grad = torch.ones_like(w)
    opt.step()
    assert opt.process_group is None and opt.comm_stats == dk.distributed.Stats()
