"""The step engine (disco_kernels/engine.py): the cached plan, the contiguous momentum batches that
Newton-Schulz reads without a copy, tensor hyper-parameters, and a scheduled compiled step that
compiles once. Values are checked against the oracle (tests/oracle.py) under the rule."""
from __future__ import annotations

import io

import pytest
import torch

import disco_kernels as dk
import oracle
from disco_kernels import engine as E
from tolerances import assert_close


def _model(dtype=torch.float64):
    """Three same-shaped hidden matrices, a tall one, an embedding and a bias."""
    shapes = [(8, 12), (8, 12), (8, 12), (12, 8), (20, 8), (8,)]
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]


def _groups(params, **hyper):
    ns = {"dtype": "float64"} if params[0].dtype == torch.float64 else {}
    common = dict(lr=0.05, momentum=0.25, scale=2.0, unconstrained=False) | hyper
    return [{"params": params[:4], "norm": "Spectral", "norm_kwargs": ns, **common},
            {"params": params[4:5], "norm": "ColNorm", "norm_kwargs": {"transpose": True}, **common},
            {"params": params[5:], "norm": "BiasRMS", **common}]


def _oracle_groups(groups):
    return [{k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
            for g in groups for _ in g["params"]]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


# -- the plan --------------------------------------------------------------------------------------

def test_plan_is_built_once_per_configuration(monkeypatch):
    params = _model()
    opt = dk.Scion(_groups(params))
    built = []
    build = opt.engine._build
    monkeypatch.setattr(opt.engine, "_build", lambda groups: built.append(1) or build(groups))
    for _ in range(3):
        _set_grads(params, [torch.randn_like(p) for p in params])
        opt.step()
    assert len(built) == 1
    params[5].grad = None  # another configuration: which params step
    opt.step()
    assert len(built) == 2
    _set_grads(params, [torch.randn_like(p) for p in params])
    opt.step()  # the first configuration again: cached
    assert len(built) == 2


def test_norms_are_built_once(monkeypatch):
    params = _model()
    opt = dk.Scion(_groups(params))
    made = []
    monkeypatch.setattr(E, "make_norm", lambda *a: made.append(a) or dk.lmo.make_norm(*a))
    for _ in range(3):
        _set_grads(params, [torch.randn_like(p) for p in params])
        opt.step()
    assert len(made) == 3  # one per group, at the first step


def test_parts_group_newton_schulz_params_by_shape():
    params = _model()
    opt = dk.Scion(_groups(params))
    _set_grads(params, [torch.randn_like(p) for p in params])
    parts = opt.engine.plan()
    shapes = [[tuple(p.shape) for p in part.params] for part in parts]
    assert shapes == [[(8, 12)] * 3, [(12, 8)], [(20, 8)], [(8,)]]
    assert [part.norm.kind for part in parts] == [None, None, "line", "line"]


def test_a_changed_gradient_is_checked_on_a_cached_plan():
    """The plan is cached, the gradients are not: a wrong one is refused before anything changes."""
    params = _model()
    opt = dk.Scion(_groups(params))
    _set_grads(params, [torch.randn_like(p) for p in params])
    opt.step()
    params[1].grad.data = torch.randn(12, 8, dtype=torch.float64)  # (past the assignment check)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"the gradient of param_groups\[0\]\['params'\]\[1\] \(shape \(8, 12\)\)"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


# -- momentum batches --------------------------------------------------------------------------------

def _is_batch_of(batch, views):
    return (batch.is_contiguous() and len(views) == batch.size(0)
            and all(v.data_ptr() == batch[i].data_ptr() for i, v in enumerate(views)))


def test_same_shaped_buffers_are_one_contiguous_batch_that_newton_schulz_reads(monkeypatch):
    params = _model()
    opt = dk.Scion(_groups(params))
    seen = []
    ns = dk.lmo.newton_schulz
    monkeypatch.setattr(dk.lmo, "newton_schulz", lambda G, *a, **k: seen.append(G) or ns(G, *a, **k))
    for _ in range(2):
        _set_grads(params, [torch.randn_like(p) for p in params])
        opt.step()
    bufs = [opt.state[p]["momentum_buffer"] for p in params[:3]]
    batches = [G for G in seen if G.shape == (3, 8, 12)]
    assert len(batches) == 2
    assert _is_batch_of(batches[-1], bufs)  # the buffers themselves: no stack copy
    assert batches[-1].data_ptr() == batches[0].data_ptr()  # the same batch every step


def test_batch_is_repacked_after_load_state_dict_and_numbers_continue():
    """A loaded state's buffers are copied into a new batch at the next step; the run continues as if
    uninterrupted (bitwise: the same operations on the same numbers)."""
    params = _model()
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, opt2 = dk.Scion(_groups(params)), dk.Scion(_groups(twin))
    steps = [[torch.randn_like(p) for p in params] for _ in range(4)]
    for gs in steps[:2]:
        for ps, o in ((params, opt), (twin, opt2)):
            _set_grads(ps, gs)
            o.step()
    buf = io.BytesIO()
    torch.save(opt2.state_dict(), buf)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    assert not _is_batch_of(opt2.engine._batches.get(tuple(id(p) for p in twin[:3]), (torch.empty(0), ()))[0],
                            [opt2.state[p]["momentum_buffer"] for p in twin[:3]])
    for gs in steps[2:]:
        for ps, o in ((params, opt), (twin, opt2)):
            _set_grads(ps, gs)
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin))
    bufs = [opt2.state[p]["momentum_buffer"] for p in twin[:3]]
    assert _is_batch_of(bufs[0]._base, bufs)


# -- tensor hyper-parameters ------------------------------------------------------------------------

@pytest.mark.parametrize("light", [False, True])
def test_tensor_hyper_parameters_give_the_float_numbers(light):
    """lr, momentum and scale as 0-d CPU tensors (values exact in fp32) step as the floats do."""
    cls = dk.ScionLight if light else dk.Scion
    params = _model(torch.float32)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    floats = cls(_groups(params, lr=2 ** -5, momentum=0.25, scale=2.0))
    tensors = cls(_groups(twin, lr=torch.tensor(2 ** -5), momentum=torch.tensor(0.25), scale=torch.tensor(2.0)))
    for _ in range(3):
        gs = [torch.randn_like(p) for p in params]
        for ps, opt in ((params, floats), (twin, tensors)):
            if light:
                for p, g in zip(ps, gs):
                    p.grad = g.clone() if p.grad is None else p.grad.add_(g)
            else:
                _set_grads(ps, gs)
            opt.step()
    for p, q in zip(params, twin):
        assert_close(q.detach(), p.detach().double(), p.detach().double(), torch.float32)


def test_a_schedule_writing_into_the_tensor_changes_the_step():
    params = _model()
    start = [p.detach().clone() for p in params]
    lr = torch.tensor(0.1, dtype=torch.float64)
    opt = dk.Scion(_groups(params, lr=lr, momentum=1.0))
    gs = [torch.randn_like(p) for p in params]
    _set_grads(params, gs)
    opt.step()
    lr.fill_(0.01)
    _set_grads(params, gs)
    opt.step()
    exact = start
    for rate in (0.1, 0.01):
        exact = oracle.scion_run(exact, [gs], _oracle_groups(_groups(params, lr=rate, momentum=1.0)))
    for p, e in zip(params, exact):
        assert_close(p.detach(), e, e.float())


@pytest.mark.parametrize("key,value,match", [
    ("lr", torch.tensor([0.1]), "lr must be a real number or a 0-d floating-point tensor"),
    ("momentum", torch.tensor(1, dtype=torch.int64), "momentum must be a real number or a 0-d floating-point"),
    ("lr", torch.tensor(-0.1), r"lr must be a finite number >= 0.0"),
    ("momentum", torch.tensor(1.5), r"momentum must be a finite number >= 0.0 and <= 1.0"),
])
def test_bad_tensor_hyper_parameters(key, value, match):
    with pytest.raises((TypeError, ValueError), match=match):
        dk.Scion([torch.nn.Parameter(torch.randn(3, 3))], **{key: value})


# -- a compiled step under a schedule ---------------------------------------------------------------

def _counting_backend():
    compiled = []

    def backend(gm, example_inputs):
        compiled.append(gm)
        return gm.forward
    return backend, compiled


def test_scheduled_compiled_step_compiles_once():
    """torch.compile(opt.step, fullgraph=True) with a tensor lr that LambdaLR-style writes change every
    step: one compilation over 20 steps, and the eager numbers."""
    params = _model(torch.float32)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lr, lr2 = torch.tensor(0.05), torch.tensor(0.05)
    compiled_opt = dk.Scion(_groups(params, lr=lr, momentum=1.0), nonfinite="ignore")
    eager_opt = dk.Scion(_groups(twin, lr=lr2, momentum=1.0), nonfinite="ignore")
    backend, compiled = _counting_backend()
    step = torch.compile(compiled_opt.step, fullgraph=True, backend=backend)
    for k in range(20):
        for t in (lr, lr2):
            t.fill_(0.05 * 0.9 ** k)
        gs = [torch.randn_like(p) for p in params]
        _set_grads(params, gs)
        _set_grads(twin, gs)
        step()
        eager_opt.step()
    assert len(compiled) == 1
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


def test_scheduled_compiled_step_with_momentum_compiles_once_after_the_first_step():
    """With momentum the first step creates the buffers (state the graph then reads): after one eager step,
    20 compiled steps under a schedule compile once."""
    params = _model(torch.float32)
    lr = torch.tensor(0.05)
    opt = dk.Scion(_groups(params, lr=lr, momentum=torch.tensor(0.25)), nonfinite="ignore")
    _set_grads(params, [torch.randn_like(p) for p in params])
    opt.step()
    backend, compiled = _counting_backend()
    step = torch.compile(opt.step, fullgraph=True, backend=backend)
    for k in range(20):
        lr.fill_(0.05 * 0.9 ** k)
        _set_grads(params, [torch.randn_like(p) for p in params])
        step()
    assert len(compiled) == 1
    assert all(p.isfinite().all() for p in params)


def test_lambda_lr_schedules_a_tensor_lr():
    """torch's LambdaLR writes group['lr'] (a tensor here: it fills it in place) each step."""
    params = _model(torch.float32)
    opt = dk.Scion(_groups(params, lr=torch.tensor(0.1)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    for _ in range(3):
        _set_grads(params, [torch.randn_like(p) for p in params])
        opt.step()
        sched.step()
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)
    assert [float(g["lr"]) for g in opt.param_groups] == [pytest.approx(0.1 * 0.5 ** 3)] * 3


def test_distributed_step_uses_no_private_method_of_the_optimizer():
    import inspect

    from disco_kernels import distributed
    source = inspect.getsource(distributed)
    assert "opt._" not in source and "optimizer._" not in source
