"""Bad input gets a clear error that names the parameter, its place and its shape (DESIGN.md, Conventions).

The ops' public functions and the optimizers are checked message by message: each message says what
was wrong and with which value, so a message that loses its subject, its value or its place fails.
"""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

import disco_kernels as dk
import oracle
from tolerances import assert_oracle


def exact(msg: str) -> str:
    return "^" + re.escape(msg) + "$"


# -- ops ---------------------------------------------------------------------------------------------

def test_newton_schulz_messages():
    with pytest.raises(TypeError, match=exact("G must be a torch.Tensor, got list")):
        dk.ops.newton_schulz([[1.0]])
    with pytest.raises(ValueError, match=exact("G must be (m, n) or (b, m, n), got shape (5,)")):
        dk.ops.newton_schulz(torch.randn(5))
    with pytest.raises(TypeError, match=exact("G must be a floating-point tensor, got dtype torch.int64")):
        dk.ops.newton_schulz(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=exact("dtype must be one of ['bfloat16', 'float16', 'float32', 'float64'] or "
                                               "a floating-point torch.dtype, got torch.int32")):
        dk.ops.newton_schulz(torch.ones(3, 3), dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^steps must be a non-negative int, got -1$"):
        dk.ops.newton_schulz(torch.ones(3, 3), -1)
    with pytest.raises(ValueError, match=r"^backend must be one of \('auto', 'torch', 'triton', 'cuda'\), got 'tpu'$"):
        dk.ops.newton_schulz(torch.ones(3, 3), backend="tpu")


def test_power_iteration_messages():
    with pytest.raises(TypeError, match=exact("W must be a torch.Tensor, got list")):
        dk.ops.power_iteration([[1.0]])
    with pytest.raises(ValueError, match=exact("W must be (m, n) or (b, m, n), got shape (2, 2, 2, 2)")):
        dk.ops.power_iteration(torch.randn(2, 2, 2, 2))
    with pytest.raises(ValueError, match=exact("W must be (m, n) or (b, m, n), got shape (5,)")):
        dk.ops.power_iteration(torch.randn(5))
    with pytest.raises(TypeError, match=exact("W must be a floating-point tensor, got dtype torch.int64")):
        dk.ops.power_iteration(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=exact("v must have shape (2, 4) for W of shape (2, 3, 4), got (2, 3)")):
        dk.ops.power_iteration(torch.randn(2, 3, 4), torch.randn(2, 3))
    with pytest.raises(ValueError, match=exact("v must have shape (4,) for W of shape (3, 4), got (3,)")):
        dk.ops.power_iteration(torch.randn(3, 4), torch.randn(3))
    with pytest.raises(ValueError, match=r"^backend must be one of"):
        dk.ops.power_iteration(torch.randn(3, 4), backend="tpu")


@pytest.mark.parametrize("iters", [0, -2, True, False, 2.5, "3", None])
def test_power_iteration_iters_must_be_a_positive_int(iters):
    with pytest.raises(ValueError, match=exact(f"iters must be a positive int, got {iters!r}")):
        dk.ops.power_iteration(torch.randn(3, 4), iters=iters)


def test_fused_update_messages():
    p = [torch.zeros(3, 3)]
    with pytest.raises(ValueError, match=exact("lmo must be one of ('Sign', 'RowNorm', 'ColNorm', 'BiasRMS'), "
                                               "got 'Spectral'")):
        dk.ops.fused_update(p, p, lmo="Spectral", lr=0.1)
    with pytest.raises(ValueError, match=exact("params, grads and bufs must have equal lengths, got 1, 0, None")):
        dk.ops.fused_update(p, [], lmo="Sign", lr=0.1)
    with pytest.raises(ValueError, match=exact("params, grads and bufs must have equal lengths, got 1, 1, 2")):
        dk.ops.fused_update(p, p, [torch.zeros(3, 3)] * 2, lmo="Sign", lr=0.1)
    with pytest.raises(ValueError, match=exact("params, grads and bufs must have equal lengths, got 1, 1, 0")):
        dk.ops.fused_update(p, p, [], lmo="Sign", lr=0.1)
    with pytest.raises(ValueError, match=r"^backend must be one of"):
        dk.ops.fused_update(p, p, lmo="Sign", lr=0.1, backend="tpu")


def test_fused_update_norm_messages():
    """The norm decides the ranks and the line dims; a Norm instance carries its own flags."""
    p = [torch.zeros(3, 3)]
    with pytest.raises(ValueError, match=exact("lmo must be a norm of kind 'sign' or 'line' (a fused LMO), got "
                                               "Spectral of kind None (its LMO needs Newton-Schulz: newton_schulz, "
                                               "then apply_update)")):
        dk.ops.fused_update(p, p, lmo=dk.lmo.Spectral(), lr=0.1)
    with pytest.raises(ValueError, match=exact("normalized and transpose are flags of a named lmo; RowNorm carries "
                                               "its own (got normalized=True, transpose=True)")):
        dk.ops.fused_update(p, p, lmo=dk.lmo.RowNorm(), lr=0.1, transpose=True)
    with pytest.raises(ValueError, match=exact("normalized and transpose are flags of a named lmo; Sign carries "
                                               "its own (got normalized=False, transpose=False)")):
        dk.ops.fused_update(p, p, lmo=dk.lmo.Sign(), lr=0.1, normalized=False)
    with pytest.raises(ValueError, match=r"^RowNorm needs a 2-D tensor, but params\[1\] has shape \(6,\)"):
        dk.ops.fused_update(p + [torch.zeros(6)], p + [torch.zeros(6)], lmo="RowNorm", lr=0.1)
    with pytest.raises(ValueError, match=r"^BiasRMS needs a 0-D or 1-D tensor, but params\[0\] has shape \(3, 3\)"):
        dk.ops.fused_update(p, p, lmo=dk.lmo.BiasRMS(), lr=0.1)

    class Bad(dk.lmo.LineNorm):
        def __init__(self, dim, alpha=1.0):
            self.dim, self.a = dim, alpha

        def line_dim(self, shape):
            return self.dim

        def alpha(self, shape):
            return self.a

    with pytest.raises(ValueError, match=exact("Bad.line_dim((3, 3)) must be -1 (rows) or -2 (columns, of a tensor "
                                               "of at least 2 dims), got 0")):
        dk.ops.fused_update(p, p, lmo=Bad(0), lr=0.1)
    with pytest.raises(ValueError, match=exact("Bad.alpha((3, 3)) must be a finite number, got nan")):
        dk.ops.fused_update(p, p, lmo=Bad(-1, float("nan")), lr=0.1)


def test_fused_update_op_messages():
    """The custom op called directly: a kind it has, one line dim and alpha per param."""
    p = [torch.zeros(3, 3)]
    with pytest.raises(ValueError, match=exact("fused_update: kind must be one of ('sign', 'scaled', 'line') with one "
                                               "line dim and alpha per param, got 'RowNorm', 1 dims and 1 alphas for "
                                               "1 params")):
        torch.ops.disco_kernels.fused_update(p, p, [], "RowNorm", [-1], [1.0], 0.1, 1.0, 1.0, None, False, False,
                                             "torch")
    with pytest.raises(ValueError, match="got 'line', 2 dims and 1 alphas for 1 params$"):
        torch.ops.disco_kernels.fused_update(p, p, [], "line", [-1, -1], [1.0], 0.1, 1.0, 1.0, None, False, False,
                                             "torch")


def test_fused_update_shapes_messages():
    """``shapes``: one full shape per param, of the param's rank; the norm checks the full shape."""
    p = [torch.zeros(3, 4)]
    with pytest.raises(ValueError, match=exact("shapes must be None or a list of one shape per param (1), got []")):
        dk.ops.fused_update(p, p, lmo="Sign", lr=0.1, shapes=[])
    with pytest.raises(ValueError, match=exact("shapes[0] must be a shape (ints >= 0) of the rank of params[0] "
                                               "((3, 4)), got (12,)")):
        dk.ops.fused_update(p, p, lmo="Sign", lr=0.1, shapes=[(12,)])
    with pytest.raises(ValueError, match=exact("shapes[0] must be a shape (ints >= 0) of the rank of params[0] "
                                               "((3, 4)), got (6, -4)")):
        dk.ops.fused_update(p, p, lmo="Sign", lr=0.1, shapes=[(6, -4)])


def test_fused_update_shapes_give_alpha_and_lines():
    """A local shard updated with its full shape's alpha: a (3, 4) row shard of a (6, 4) RowNorm param moves
    as the same rows of the whole param would."""
    full = torch.randn(6, 4)
    grad = torch.randn(6, 4)
    whole, shard = full.clone(), full[:3].clone()
    dk.ops.fused_update([whole], [grad], lmo="ColNorm", transpose=True, lr=0.1)
    dk.ops.fused_update([shard], [grad[:3]], lmo="ColNorm", transpose=True, lr=0.1, shapes=[(6, 4)])
    torch.testing.assert_close(shard, whole[:3], rtol=0, atol=0)
    alone = full[:3].clone()
    dk.ops.fused_update([alone], [grad[:3]], lmo="ColNorm", transpose=True, lr=0.1)  # alpha of (3, 4): another step
    assert not torch.equal(alone, shard)


# -- optimizer hyper-parameters ------------------------------------------------------------------------

def _p(*shape):
    return torch.nn.Parameter(torch.randn(*shape))


@pytest.mark.parametrize("kwargs,err,msg", [
    ({"lr": -1.0}, ValueError, "lr must be a finite number >= 0.0, got -1.0"),
    ({"lr": "0.1"}, TypeError, "lr must be a real number, got '0.1'"),
    ({"lr": torch.tensor(-0.5)}, ValueError, "lr must be a finite number >= 0.0, got -0.5"),
    ({"lr": float("inf")}, ValueError, "lr must be a finite number >= 0.0, got inf"),
    ({"lr": True}, TypeError, "lr must be a real number, got True"),
    ({"momentum": 1.5}, ValueError, "momentum must be a finite number >= 0.0 and <= 1.0, got 1.5"),
    ({"momentum": -0.1}, ValueError, "momentum must be a finite number >= 0.0 and <= 1.0, got -0.1"),
    ({"momentum": "0.1"}, TypeError, "momentum must be a real number, got '0.1'"),
    ({"scale": float("nan")}, ValueError, "scale must be a finite number, got nan"),
    ({"scale": None}, TypeError, "scale must be a real number, got None"),
    ({"unconstrained": 1}, TypeError, "unconstrained must be a bool (True or False), got 1"),
    ({"unconstrained": "yes"}, TypeError, "unconstrained must be a bool (True or False), got 'yes'"),
    ({"nonfinite": "maybe"}, ValueError, "nonfinite must be one of ('raise', 'skip', 'ignore'), got 'maybe'"),
])
@pytest.mark.parametrize("cls", [dk.Scion, dk.ScionLight])
def test_hyper_parameter_messages(cls, kwargs, err, msg):
    with pytest.raises(err, match=exact(msg)):
        cls([_p(3, 3)], **kwargs)
    if "nonfinite" not in kwargs:  # the same check guards groups added later
        opt = cls([_p(3, 3)])
        with pytest.raises(err, match=exact(msg)):
            opt.add_param_group({"params": [_p(2, 2)], **kwargs})
        assert len(opt.param_groups) == 1


def test_a_tensor_lr_is_checked_by_value():
    opt = dk.Scion([_p(3, 3)], lr=torch.tensor(0.5))
    assert float(opt.param_groups[0]["lr"]) == 0.5


def test_momentum_zero_warning_says_why():
    with pytest.warns(UserWarning, match=exact(
            "momentum=0 keeps the momentum buffer at zero, so no gradient reaches the weights (momentum is one "
            "minus the usual factor: 0.1 means 0.9 in torch.optim.SGD terms)")):
        dk.Scion([_p(3, 3)], momentum=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dk.Scion([_p(3, 3)], momentum=0.1)  # no warning otherwise


# -- where a bad param sits ---------------------------------------------------------------------------------

def test_rank_errors_name_the_param_from_param_names():
    bias = _p(5)
    with pytest.raises(ValueError, match=r"but 'bias' has shape \(5,\) \(norm='Auto'"):
        dk.Scion([{"params": [bias], "param_names": ["bias"], "norm": "Spectral"}])
    with pytest.raises(ValueError, match=r"but param_groups\[1\]\['params'\]\[1\] has shape \(5,\)"):
        dk.Scion([{"params": [_p(2, 2)]}, {"params": [_p(3, 3), bias], "norm": "Spectral"}])


def _sign_step(p, g):
    return oracle.scion_step(p, g, lr=0.1, norm="Sign")


def test_a_group_params_may_be_one_tensor():
    w = _p(3, 3)
    opt = dk.Scion([{"params": w, "norm": "Sign"}], lr=0.1)
    assert opt.param_groups[0]["params"] == [w]
    w.grad = torch.ones(3, 3)
    before = w.detach().clone()
    opt.step()
    assert_oracle(w.detach(), _sign_step, before, w.grad)


def test_norm_kwargs_none_becomes_an_empty_dict():
    opt = dk.Scion([{"params": [_p(3, 3)], "norm_kwargs": None}, {"params": [_p(2, 2)]}], norm_kwargs=None)
    assert opt.defaults["norm_kwargs"] == {}
    assert [g["norm_kwargs"] for g in opt.param_groups] == [{}, {}]
    opt = dk.Scion([_p(3, 3)], norm="RowNorm", norm_kwargs={"normalized": False})
    assert opt.param_groups[0]["norm_kwargs"] == {"normalized": False}


def _reshaped_after_construction(names):
    """A param whose data became 1-D after the optimizer was built: the step's own check must name it."""
    w, v = _p(3, 3), _p(4, 4)
    groups = [{"params": [_p(2, 2)]}, {"params": [w, v], "norm": "Spectral"}]
    if names:  # torch wants names in every group or in none
        groups[0]["param_names"], groups[1]["param_names"] = ["u"], ["w", "v"]
    opt = dk.Scion(groups)
    v.data = torch.randn(5)
    v.grad = torch.randn(5)
    w.grad = torch.randn(3, 3)
    return opt


def test_rank_checked_again_at_step():
    with pytest.raises(ValueError, match=r"^Spectral needs a 2-D tensor, but param_groups\[1\]\['params'\]\[1\] has "
                                         r"shape \(5,\)"):
        _reshaped_after_construction(names=False).step()
    with pytest.raises(ValueError, match=r"^Spectral needs a 2-D tensor, but 'v' has shape \(5,\)"):
        _reshaped_after_construction(names=True).step()


def _sparse_grad_opt(names):
    w, v = _p(3, 3), _p(4, 4)
    groups = [{"params": [_p(2, 2)]}, {"params": [w, v], "norm": "Sign"}]
    if names:  # torch wants names in every group or in none
        groups[0]["param_names"], groups[1]["param_names"] = ["u"], ["w", "v"]
    opt = dk.Scion(groups)
    w.grad = torch.ones(3, 3)
    v.grad = torch.ones(4, 4).to_sparse()
    return opt


def test_sparse_gradients_name_the_param():
    with pytest.raises(ValueError, match=exact("Scion does not support sparse gradients: "
                                               "param_groups[1]['params'][1] (shape (4, 4))")):
        _sparse_grad_opt(names=False).step()
    with pytest.raises(ValueError, match=exact("Scion does not support sparse gradients: 'v' (shape (4, 4))")):
        _sparse_grad_opt(names=True).step()


# -- non-finite gradients ---------------------------------------------------------------------------------------

def _nan_opt(nonfinite, names=False):
    w, v = _p(3, 3), _p(4, 4)
    groups = [{"params": [_p(2, 2)]}, {"params": [w, v], "norm": "RowNorm"}]
    if names:  # torch wants names in every group or in none
        groups[0]["param_names"], groups[1]["param_names"] = ["u"], ["w", "v"]
    opt = dk.Scion(groups, nonfinite=nonfinite, lr=0.1)
    w.grad = torch.ones(3, 3)
    v.grad = torch.ones(4, 4)
    v.grad[1, 2] = float("nan")
    return opt, w, v


def test_nonfinite_raise_names_the_param():
    opt, _, _ = _nan_opt("raise")
    with pytest.raises(FloatingPointError, match=exact(
            "non-finite gradient in param_groups[1]['params'][1] (shape (4, 4)); no parameter or state was modified "
            "(nonfinite='skip' skips such steps)")):
        opt.step()
    opt, _, _ = _nan_opt("raise", names=True)
    with pytest.raises(FloatingPointError, match=r"^non-finite gradient in 'v' \(shape \(4, 4\)\); "):
        opt.step()


def test_nonfinite_skip_warning():
    opt, w, _ = _nan_opt("skip")
    before = w.detach().clone()
    with pytest.warns(RuntimeWarning, match=exact(
            "Scion: non-finite gradient, step skipped (parameters and state unchanged)")):
        opt.step()
    assert torch.equal(w.detach(), before)


def test_nonfinite_ignore_steps_without_a_check():
    opt, w, v = _nan_opt("ignore")
    before = w.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert_oracle(w.detach(), _sign_step, before, w.grad)  # the finite param stepped
    assert v.isnan().any()  # and the non-finite one took its NaN, as asked
    opt, w, _ = _nan_opt("ignore")
    opt.param_groups[1]["params"][1].grad = None
    before = w.detach().clone()
    opt.step()
    assert_oracle(w.detach(), _sign_step, before, w.grad)


# -- load_state_dict ---------------------------------------------------------------------------------------------

def _stepped(momentum=0.5):
    w, b = _p(3, 4), _p(4)
    opt = dk.Scion([{"params": [_p(2, 2)], "norm": "Sign"}, {"params": [w, b], "norm": "Auto"}], momentum=momentum)
    for p in (opt.param_groups[0]["params"][0], w, b):
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def test_load_state_dict_messages():
    opt = _stepped()
    sd = opt.state_dict()
    before = copy.deepcopy(opt.state_dict())
    not_a_sd = exact("state_dict must be a dict with a 'state' dict and a 'param_groups' list (as "
                     "Scion.state_dict() returns)")
    for bad in ({"state": {}}, {"state": {}, "param_groups": None}, {"param_groups": sd["param_groups"]},
                {"state": [], "param_groups": sd["param_groups"]}, [sd["state"], sd["param_groups"]]):
        with pytest.raises(ValueError, match=not_a_sd):
            opt.load_state_dict(bad)
    with pytest.raises(ValueError, match=exact("state_dict has 1 param groups, this optimizer has 2")):
        opt.load_state_dict({**sd, "param_groups": sd["param_groups"][:1]})
    bad = copy.deepcopy(sd)
    del bad["param_groups"][1]["scale"]
    with pytest.raises(ValueError, match=exact("state_dict param_groups[1] lacks ['scale'] (not a Scion state dict: "
                                               "a torch.optim one has no norm or scale)")):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0] = [0]
    with pytest.raises(ValueError, match=r"^state_dict param_groups\[0\] lacks \['params', 'lr', "):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][1]["params"] = bad["param_groups"][1]["params"] + [99]
    with pytest.raises(ValueError, match=exact("param_groups[1] has 2 params, the state_dict's has 3")):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][1]["params"] = (1, 2)
    with pytest.raises(ValueError, match=exact("param_groups[1] has 2 params, the state_dict's has tuple")):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][7] = {"momentum_buffer": torch.zeros(3, 4)}
    with pytest.raises(ValueError, match=exact("state_dict has state for param id 7, which no param group lists")):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][2] = torch.zeros(4)
    with pytest.raises(ValueError, match=exact("state_dict state[2] must be a dict, got Tensor")):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][2]["momentum_buffer"] = torch.zeros(5)
    with pytest.raises(ValueError, match=exact("state_dict state 'momentum_buffer' of param_groups[1]['params'][1] (shape (4,)) "
                                               "must be a floating-point tensor of shape (4,), got shape (5,)")):
        opt.load_state_dict(bad)
    bad["state"][2]["momentum_buffer"] = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=exact("state_dict state 'momentum_buffer' of param_groups[1]['params'][1] (shape (4,)) "
                                               "must be a floating-point tensor of shape (4,), got shape (4,)")):
        opt.load_state_dict(bad)
    bad["state"][2]["momentum_buffer"] = [0.0] * 4
    with pytest.raises(ValueError, match=exact("state_dict state 'momentum_buffer' of param_groups[1]['params'][1] (shape (4,)) "
                                               "must be a floating-point tensor of shape (4,), got list")):
        opt.load_state_dict(bad)
    bad["state"][2]["momentum_buffer"] = torch.tensor([0.0, float("inf"), 0.0, 0.0])
    with pytest.raises(FloatingPointError, match=exact(
            "state_dict state 'momentum_buffer' of param_groups[1]['params'][1] (shape (4,)) has inf or nan entries: it would "
            "poison the weights (nonfinite='ignore' loads it anyway)")):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["momentum"] = 2.0
    with pytest.raises(ValueError, match=r"^momentum must be a finite number >= 0\.0 and <= 1\.0, got 2\.0$"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["unconstrained"] = 1
    with pytest.raises(TypeError, match=r"^unconstrained must be a bool"):
        opt.load_state_dict(bad)
    # on every error above, nothing changed
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for pid, st in before["state"].items():
        for key, value in st.items():
            assert torch.equal(after["state"][pid][key], value)


def test_load_state_dict_names_the_param_from_param_names():
    w = _p(3, 4)
    opt = dk.Scion([{"params": [w], "param_names": ["w"], "norm": "Sign"}], momentum=0.5)
    w.grad = torch.randn_like(w)
    opt.step()
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0]["momentum_buffer"] = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=exact("state_dict state 'momentum_buffer' of 'w' (shape (3, 4)) must be a "
                                               "floating-point tensor of shape (3, 4), got shape (4, 3)")):
        opt.load_state_dict(bad)


def test_load_state_dict_nonfinite_ignore_loads_a_nonfinite_buffer():
    w = _p(3, 4)
    opt = dk.Scion([{"params": [w], "norm": "Sign"}], nonfinite="ignore", momentum=0.5)
    w.grad = torch.randn_like(w)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["momentum_buffer"][1, 2] = float("nan")
    opt.load_state_dict(sd)
    assert opt.state[w]["momentum_buffer"][1, 2].isnan()


def test_load_state_dict_accepts_scalars_and_missing_state():
    opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["step"] = torch.tensor(3.0)  # a 0-d tensor (as torch's optimizers keep "step") has no shape to match
    del sd["state"][2]  # a param without state (never stepped) loads
    opt = _stepped()
    opt.load_state_dict(sd)
    assert float(opt.state[opt.param_groups[1]["params"][0]]["step"]) == 3.0
    assert opt.param_groups[1]["params"][1] not in opt.state


def test_load_state_dict_twice_into_one_optimizer():
    opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
