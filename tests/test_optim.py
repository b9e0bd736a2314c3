"""Scion / ScionLight against the independent oracle (tests/oracle.py) under the tolerance rule,
training smoke tests, state round trips, and bad input leaving everything untouched."""
import copy
import io
import math
import re

import pytest
import torch

import disco_kernels as dk
import oracle
from tolerances import assert_close, bound, plain_dtype, rel_err


NS_NORMS = ("Spectral", "SpectralConv", "Auto")


def oracle_run(params, grads_per_step, groups, light=False, dtype=torch.float64, ns_dtype=None):
    """The oracle's Scion (ScionLight) on copies of ``params`` and grads in ``dtype``, Newton-Schulz
    iterating in ``ns_dtype`` (default ``dtype``)."""
    groups = [{**g, "norm_kwargs": {**(g.get("norm_kwargs") or {}), "dtype": ns_dtype or dtype}}
              if g["norm"] in NS_NORMS else g for g in groups]
    return oracle.scion_run([p.detach().to(dtype) for p in params],
                            [[None if g is None else g.to(dtype) for g in gs] for gs in grads_per_step], groups, light)


def _setup(dtype=torch.float64):
    shapes = [(12, 20), (12, 20), (20, 12), (1, 1), (3, 2, 3, 3), (17,), (30, 8), (5, 8), (8, 8)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    spec = [
        {"idx": [0, 1, 2, 3, 4, 5], "norm": "Auto", "lr": 0.05, "momentum": 0.1, "scale": 2.0, "unconstrained": False},
        {"idx": [6], "norm": "ColNorm", "norm_kwargs": {"transpose": True}, "lr": 0.1, "momentum": 1.0, "scale": 1.0,
         "unconstrained": True},
        {"idx": [7], "norm": "Sign", "lr": 0.01, "momentum": 0.5, "scale": 3.0, "unconstrained": False},
        {"idx": [8], "norm": "RowNorm", "lr": 0.02, "momentum": 0.3, "scale": 1.0, "unconstrained": False},
    ]
    per_param = {}
    groups = []
    for s in spec:
        group = {k: v for k, v in s.items() if k != "idx"}
        if s["norm"] == "Auto":
            group["norm_kwargs"] = {"dtype": "float64"} if dtype == torch.float64 else {}
        groups.append({**group, "params": [params[i] for i in s["idx"]]})
        per_param.update({i: group for i in s["idx"]})
    return params, groups, [per_param[i] for i in range(len(params))]


def _grads(params, steps, missing=()):
    return [[None if (t, i) in missing else torch.randn_like(p) for i, p in enumerate(params)] for t in range(steps)]


def _run(opt, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            if g is None:
                p.grad = None
            elif isinstance(opt, dk.ScionLight):
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)
            else:
                p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("light", [False, True])
def test_matches_oracle_fp64(light):
    """fp64 params and Newton-Schulz, four steps with grads missing on some steps, every group's flags."""
    params, groups, per_param = _setup()
    grads = _grads(params, 4, missing={(1, 3), (2, 0)})
    exact = oracle_run(params, grads, per_param, light)
    plain = oracle_run(params, grads, per_param, light, dtype=torch.float32)
    _run((dk.ScionLight if light else dk.Scion)(groups), params, grads)
    for k, (p, e, pl) in enumerate(zip(params, exact, plain)):
        assert_close(p.detach(), e, pl, what=f"param {k}")


@pytest.mark.parametrize("flag,value", [("unconstrained", True), ("unconstrained", False), ("scale", 3.0),
                                        ("momentum", 0.3), ("lr", 0.2)])
def test_group_hyperparameters_change_the_step(flag, value):
    """Each group key is honoured: the step with the key changed matches the oracle with it changed, which
    differs from the oracle's step without the change."""
    params, groups, per_param = _setup()
    grads = _grads(params, 2)
    changed = [{**g, flag: value} for g in per_param]
    exact = oracle_run(params, grads, changed)
    plain = oracle_run(params, grads, changed, dtype=torch.float32)
    unchanged = oracle_run(params, grads, per_param)
    _run(dk.Scion([{**g, flag: value} for g in groups]), params, grads)
    differs = [rel_err(u, e) > bound(pl, e, torch.float64) for u, e, pl in zip(unchanged, exact, plain)]
    assert any(differs)
    for p, e, pl in zip(params, exact, plain):
        assert_close(p.detach(), e, pl)


def _check_within_rule(dtype, steps, backend="auto", ns_dtype=torch.bfloat16, light=False, missing=()):
    """``dtype`` params, Newton-Schulz in ``ns_dtype`` (the reference's bf16 by default): within the rule
    against the oracle run the same way."""
    params, groups, per_param = _setup(dtype)
    for g in groups:
        if g["norm"] == "Auto":
            g["norm_kwargs"] = {"dtype": ns_dtype}
    grads = _grads(params, steps, missing)
    exact = oracle_run(params, grads, per_param, light)
    plain = oracle_run(params, grads, per_param, light, dtype=plain_dtype(dtype), ns_dtype=plain_dtype(ns_dtype))
    _run((dk.ScionLight if light else dk.Scion)(groups, backend=backend), params, grads)
    for k, (p, e, pl) in enumerate(zip(params, exact, plain)):
        assert p.dtype == dtype
        assert_close(p.detach(), e, pl, what=f"param {k}")


def test_matches_oracle_default_bf16_iteration():
    _check_within_rule(torch.float32, 3)


@pytest.mark.parametrize("light", [False, True])
def test_triton_backend_matches_oracle(light):
    """The whole step through the Triton kernels (interpreted without a GPU): batched NS in fp32 and the
    fused updates, on fp32 params."""
    pytest.importorskip("triton")
    _check_within_rule(torch.float32, 3, "triton", torch.float32, light, missing={(1, 3)})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_params(dtype):
    _check_within_rule(dtype, 2)


@pytest.mark.parametrize("backend", dk.available_backends("cpu"))
@pytest.mark.parametrize("norm", ["Spectral", "RowNorm", "ColNorm", "Sign"])
def test_noncontiguous_grads(norm, backend):
    """Transposed-view grads (and the momentum buffers made from them) step as the reference rule, for the
    Newton-Schulz LMO and each fused one."""
    p = torch.nn.Parameter(torch.randn(6, 10, dtype=torch.float32))
    p0 = p.detach().double()
    g = torch.randn(10, 6, dtype=torch.float32).T
    p.grad = g
    kwargs = {"ColNorm": {"transpose": True}}.get(norm, {})
    ns = {"dtype": "float32"} if norm == "Spectral" else {}
    dk.Scion([p], lr=0.1, momentum=0.5, norm=norm, norm_kwargs={**kwargs, **ns}, backend=backend).step()
    group = {"lr": 0.1, "momentum": 0.5, "norm": norm, "norm_kwargs": kwargs}
    exact, plain = (oracle_run([p0], [[g]], [group], dtype=d)[0] for d in (torch.float64, torch.float32))
    assert not g.is_contiguous() and torch.equal(p.grad, g)
    assert_close(p.detach(), exact, plain)


def test_empty_and_gradless():
    with pytest.raises(ValueError):  # torch's own rule: an optimizer needs parameters
        dk.Scion([], lr=0.1)
    p = torch.nn.Parameter(torch.randn(3, 4))
    before = p.detach().clone()
    opt = dk.Scion([{"params": []}, {"params": [p]}], lr=0.1)
    opt.step()
    assert torch.equal(p, before) and not opt.state


def test_step_closure_and_no_autograd():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = dk.Scion([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.requires_grad and p.grad_fn is None and not p.grad.requires_grad


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 4))


def _train(model, opt, x, y, steps, loss_fn):
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=not isinstance(opt, dk.ScionLight))
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cls", [dk.Scion, dk.ScionLight])
def test_mlp_loss_decreases(cls):
    model = _mlp()
    groups = [{"params": [model[0].weight], "norm": "ColNorm", "scale": 1.0},
              {"params": [model[2].weight], "norm": "Spectral", "scale": 3.0},
              {"params": [model[4].weight], "norm": "Sign", "scale": 10.0},
              {"params": [model[0].bias, model[2].bias, model[4].bias], "norm": "BiasRMS", "scale": 1.0}]
    opt = cls(groups, lr=0.02, momentum=0.2)
    opt.init()
    x = torch.randn(256, 10)
    y = (x[:, :4] @ torch.randn(4, 4)).argmax(1)
    if cls is dk.ScionLight:  # momentum lives in grad: keep it, do not zero
        opt.zero_grad = lambda set_to_none=False: None
    losses = _train(model, opt, x, y, 60, torch.nn.functional.cross_entropy)
    assert losses[-1] < 0.6 * losses[0]


def test_tiny_transformer_loss_decreases():
    torch.manual_seed(0)
    vocab, d, T = 32, 32, 16
    emb = torch.nn.Embedding(vocab, d)
    block = torch.nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
    head = torch.nn.Linear(d, vocab, bias=False)
    hidden = [p for p in block.parameters() if p.dim() == 2]
    vectors = [p for p in block.parameters() if p.dim() < 2]
    opt = dk.Scion([{"params": [emb.weight], "norm": "ColNorm", "norm_kwargs": {"transpose": True}},
                    {"params": hidden, "norm": "Spectral", "scale": 2.0},
                    {"params": vectors, "norm": "BiasRMS"},
                    {"params": [head.weight], "norm": "Sign", "scale": 16.0}], lr=0.02, momentum=0.1)
    data = torch.arange(T + 1).repeat(8, 1) * 3 % vocab  # a learnable sequence
    x, y = data[:, :-1], data[:, 1:]
    mask = torch.nn.Transformer.generate_square_subsequent_mask(T)

    def loss_fn(_, __):
        h = block(emb(x), src_mask=mask, is_causal=True)
        return torch.nn.functional.cross_entropy(head(h).reshape(-1, vocab), y.reshape(-1))

    losses = _train(lambda _: None, opt, None, None, 40, loss_fn)
    assert losses[-1] < 0.5 * losses[0]


# -- state -------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [dk.Scion, dk.ScionLight])
def test_state_dict_resume_bit_identical(cls):
    params, groups, _ = _setup(torch.float32)
    grads = _grads(params, 5)
    opt = cls(groups)
    _run(opt, params, grads[:3])
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    _run(opt, params, grads[3:])

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    params2, groups2, _ = _setup(torch.float32)
    with torch.no_grad():
        for p, s in zip(params2, saved["params"]):
            p.copy_(s)
    opt2 = cls(groups2)
    opt2.load_state_dict(saved["opt"])
    if cls is dk.ScionLight:
        assert all(p.grad is not None for p in params2)
    _run(opt2, params2, grads[3:])
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


def test_deepcopy_steps_identically():
    params, groups, _ = _setup(torch.float32)
    model = torch.nn.ParameterList(params)
    opt = dk.Scion(groups)
    _run(opt, params, _grads(params, 2))
    model2 = copy.deepcopy(model)
    index = {id(p): i for i, p in enumerate(params)}
    groups2 = [{**g, "params": [model2[index[id(p)]] for p in g["params"]]} for g in groups]
    opt2 = dk.Scion(groups2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    grads = _grads(params, 1)
    _run(opt, params, grads)
    _run(opt2, list(model2), grads)
    for p, q in zip(params, model2):
        assert torch.equal(p, q)
    assert copy.deepcopy(opt).param_groups[0]["norm"] == "Auto"


# -- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "lr must be"), ({"lr": float("nan")}, "lr must be"), ({"momentum": -0.1}, "momentum must be"),
    ({"momentum": 1.5}, "momentum must be"), ({"norm": "Nuclear"}, "norm must be one of"),
    ({"norm": "Sign", "norm_kwargs": {"steps": 3}}, "norm_kwargs"), ({"scale": float("inf")}, "scale must be"),
    ({"backend": "tpu"}, "backend must be"), ({"nonfinite": "maybe"}, "nonfinite must be"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dk.Scion([torch.nn.Parameter(torch.randn(3, 3))], **kwargs)


@pytest.mark.parametrize("norm,shape", [("Spectral", (5,)), ("Sign", (2, 3, 4)), ("BiasRMS", (3, 3))])
def test_wrong_rank_names_param(norm, shape):
    """The error names the param (or its place), its shape once, and the ways out."""
    shape_re = re.escape(str(tuple(shape)))
    with pytest.raises(ValueError, match=rf"{norm} needs .* but 'w1' has shape {shape_re} \(norm='Auto'"):
        dk.Scion([("w0", torch.nn.Parameter(torch.randn(3, 3) if norm != "BiasRMS" else torch.randn(3))),
                  ("w1", torch.nn.Parameter(torch.randn(shape)))], norm=norm)
    with pytest.raises(ValueError, match=rf"but param_groups\[1\]\['params'\]\[0\] has shape {shape_re} "):
        dk.Scion([{"params": [torch.nn.Parameter(torch.randn(3, 3))]},
                  {"params": iter([torch.nn.Parameter(torch.randn(shape))]), "norm": norm}])


def test_forced_backend_that_cannot_run_fails_at_construction():
    """Like a bad lr: a backend that cannot run these params is an error when the optimizer is built."""
    if torch.cuda.is_available():
        pytest.skip("the CUDA backend can run here")
    w = torch.nn.Parameter(torch.randn(3, 3))
    for norm in ("Spectral", "Sign"):
        with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
            dk.Scion([w], norm=norm, backend="cuda")
    dk.Scion([w], norm="Sign", backend="torch")  # (and auto never raises)


def test_momentum_zero_warns():
    """momentum is one minus the usual factor: 0 never lets a gradient in (legal, as in the reference, but a trap)."""
    with pytest.warns(UserWarning, match="momentum=0 keeps the momentum buffer at zero"):
        dk.Scion([torch.nn.Parameter(torch.randn(3, 3))], momentum=0.0)


def test_add_param_group_validates():
    opt = dk.Scion([torch.nn.Parameter(torch.randn(3, 3))])
    with pytest.raises(ValueError, match="lr must be"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, 3))], "lr": -2})
    assert len(opt.param_groups) == 1


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _assert_unchanged(params, opt, snap):
    """Params, groups and every state tensor bit-identical to ``_snapshot``'s, and no state added or dropped."""
    for p, s in zip(params, snap[0]):
        assert torch.equal(p, s)
    after = opt.state_dict()
    assert after["param_groups"] == snap[1]["param_groups"]
    assert after["state"].keys() == snap[1]["state"].keys()
    for k, st in snap[1]["state"].items():
        for key, v in st.items():
            assert torch.equal(after["state"][k][key], v)


def test_nonfinite_raises_and_changes_nothing():
    params, groups, _ = _setup(torch.float32)
    opt = dk.Scion(groups)
    _run(opt, params, _grads(params, 1))
    snap = _snapshot(params, opt)
    grads = _grads(params, 1)[0]
    grads[6][2, 3] = float("inf")
    for p, g in zip(params, grads):
        p.grad = g
    with pytest.raises(FloatingPointError, match=r"param_groups\[1\]\['params'\]\[0\] \(shape \(30, 8\)\)"):
        opt.step()
    _assert_unchanged(params, opt, snap)


def test_nonfinite_skip_warns():
    p = torch.nn.Parameter(torch.randn(4, 4))
    before = p.detach().clone()
    p.grad = torch.full((4, 4), float("nan"))
    opt = dk.Scion([p], momentum=0.5, nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert torch.equal(p, before) and not opt.state


def _edit(path, value):
    """A function that sets the nested key ``path`` of a state dict to ``value`` (deleting it for ...)."""
    def apply(sd):
        *head, last = path
        for k in head:
            sd = sd[k]
        if value is ...:
            del sd[last]
        else:
            sd[last] = value
    return apply


BAD_STATE = {  # case -> (edit of a valid state dict, or a whole replacement; error type; message)
    "not a dict": (lambda sd: [sd], ValueError, "must be a dict with a 'state' dict"),
    "no state": (_edit(["state"], ...), ValueError, "'state' dict"),
    "state is a list": (_edit(["state"], []), ValueError, "'state' dict"),
    "no groups": (_edit(["param_groups"], ...), ValueError, "'param_groups' list"),
    "fewer groups": (lambda sd: sd["param_groups"].pop(), ValueError, "param groups"),
    "group without params": (_edit(["param_groups", 0, "params"], ...), ValueError, r"lacks \['params'\]"),
    "group without scale": (_edit(["param_groups", 1, "scale"], ...), ValueError, r"lacks \['scale'\]"),
    "bad norm": (_edit(["param_groups", 0, "norm"], "Bogus"), ValueError, "norm must be one of"),
    "bad lr": (_edit(["param_groups", 0, "lr"], float("nan")), ValueError, "lr must be"),
    "unknown param id": (_edit(["state", 99], {}), ValueError, "param id 99"),
    "state entry not a dict": (_edit(["state", 0], [1.0]), ValueError, r"state\[0\] must be a dict"),
    "buffer of another shape": (_edit(["state", 0, "momentum_buffer"], torch.zeros(3, 3)), ValueError,
                                r"momentum_buffer.*shape \(12, 20\), got shape \(3, 3\)"),
    "0-d buffer": (_edit(["state", 0, "momentum_buffer"], torch.tensor(1.0)), ValueError, r"got shape \(\)"),
    "list buffer": (_edit(["state", 0, "momentum_buffer"], [0.0] * 20), ValueError, "got list"),
    "integer buffer": (_edit(["state", 0, "momentum_buffer"], torch.zeros(12, 20, dtype=torch.int64)), ValueError,
                       "floating-point tensor"),
    "nan buffer": (_edit(["state", 0, "momentum_buffer"], torch.full((12, 20), float("nan"))), FloatingPointError,
                   "inf or nan"),
    "SGD state dict": (None, ValueError, "torch.optim one has no norm or scale"),  # of the same params
}


@pytest.mark.parametrize("case", BAD_STATE)
def test_bad_state_dict_is_refused_and_changes_nothing(case):
    params, groups, _ = _setup(torch.float32)
    opt = dk.Scion(groups, momentum=0.5)
    _run(opt, params, _grads(params, 1))
    edit, exc, match = BAD_STATE[case]
    bad = copy.deepcopy(opt.state_dict())
    if edit is None:
        sgd = torch.optim.SGD([{"params": g["params"]} for g in groups], lr=0.1, momentum=0.9)
        sgd.step()
        bad = sgd.state_dict()
    elif case == "not a dict":
        bad = edit(bad)
    else:
        edit(bad)
    snap = _snapshot(params, opt)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(bad)
    _assert_unchanged(params, opt, snap)


def test_nan_buffer_loads_under_nonfinite_ignore():
    params, groups, _ = _setup(torch.float32)
    opt = dk.Scion(groups, momentum=0.5, nonfinite="ignore")
    _run(opt, params, _grads(params, 1))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["momentum_buffer"].fill_(float("nan"))
    opt.load_state_dict(sd)
    assert opt.state[params[0]]["momentum_buffer"].isnan().all()


@pytest.mark.parametrize("norm,kwargs,shape", [("Spectral", {}, (8, 12)), ("Auto", {}, (8,)), ("Auto", {}, (3, 2, 3, 3)),
                                               ("ColNorm", {"transpose": True}, (20, 8)), ("RowNorm", {}, (6, 9)),
                                               ("Sign", {"zero_init": True}, (4, 5)), ("Sign", {}, (4, 5))])
def test_init_matches_oracle_times_group_scale(norm, kwargs, shape):
    """init() gives the reference's init of each group's norm (same random draws), times the group's scale."""
    w = torch.nn.Parameter(torch.full(shape, float("nan")))
    torch.manual_seed(5)
    dk.Scion([{"params": [w], "norm": norm, "norm_kwargs": kwargs, "scale": 3.0}]).init()
    torch.manual_seed(5)
    exact = 3.0 * oracle.init(norm, shape, **kwargs)
    torch.manual_seed(5)
    assert_close(w.detach(), exact, 3.0 * oracle.init(norm, shape, compute=torch.float32, **kwargs))


def _compiled_run(params, groups, grads, compile_kwargs):
    """Scion over ``groups`` with ``torch.compile(opt.step, fullgraph=True, **compile_kwargs)``
    (nonfinite="ignore": the finiteness check is a host sync)."""
    opt = dk.Scion(groups, nonfinite="ignore")
    step = torch.compile(opt.step, fullgraph=True, **compile_kwargs)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        step()


def test_compiled_step_matches_oracle():
    """Inductor traces a whole fp64 step (Spectral, a tall matrix, BiasRMS, momentum) and takes the oracle's steps."""
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in [(16, 8), (4, 16), (16,), (4,)]]
    group = {"lr": 0.01, "momentum": 0.1, "norm": "Auto"}
    grads = _grads(params, 3)
    exact, plain = (oracle_run(params, grads, [group] * 4, dtype=d) for d in (torch.float64, torch.float32))
    _compiled_run(params, [{**group, "params": params, "norm_kwargs": {"dtype": "float64"}}], grads, {})
    for p, e, pl in zip(params, exact, plain):
        assert_close(p.detach(), e, pl)


def test_inductor_step_with_batched_tall_matrices():
    """Inductor compiles a step whose bf16 Newton-Schulz batches tall matrices (an MLP's up projections)
    to the oracle's numbers. Transposing the bf16 batch outside the op once made inductor's CPU code
    read it wrongly (NaN weights), so the transposes stay inside the op."""
    params = [torch.nn.Parameter(torch.randn(96, 32)) for _ in range(2)] + [torch.nn.Parameter(torch.randn(32, 96))]
    group = {"lr": 0.1, "norm": "Spectral", "momentum": 0.5, "unconstrained": True}
    grads = _grads(params, 2)
    exact = oracle_run(params, grads, [group] * 3)
    plain = oracle_run(params, grads, [group] * 3, dtype=torch.float32, ns_dtype=torch.bfloat16)
    _compiled_run(params, [{**group, "params": params}], grads, {})
    for p, e, pl in zip(params, exact, plain):
        assert p.isfinite().all()
        assert_close(p.detach(), e, pl, torch.bfloat16)


def test_compiled_step_follows_an_lr_schedule():
    """A compiled step whose lr changes every step (a schedule) traces without error and takes the oracle's
    steps at each step's lr."""
    params = [torch.nn.Parameter(torch.randn(6, 8)), torch.nn.Parameter(torch.randn(6))]
    grads = _grads(params, 4)
    exact, plain = ([p.detach().to(d) for p in params] for d in (torch.float64, torch.float32))
    opt = dk.Scion([{"params": params[:1], "norm": "Spectral", "norm_kwargs": {"dtype": "float32"}},
                    {"params": params[1:], "norm": "BiasRMS"}], lr=0.1, momentum=1.0, nonfinite="ignore")
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    for k, gs in enumerate(grads):
        lr = 0.1 * 0.5 ** k
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(params, gs):
            p.grad = g.clone()
        step()
        group = {"lr": lr, "norm": "Auto"}  # momentum 1: each step depends on this step's grad alone
        exact = oracle_run(exact, [gs], [group] * 2)
        plain = oracle_run(plain, [gs], [group] * 2, dtype=torch.float32)
    for p, e, pl in zip(params, exact, plain):
        assert_close(p.detach(), e, pl)


FINITE_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # the check has a CPU and a GPU branch


@pytest.mark.parametrize("device", FINITE_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_check_has_no_overflow(dtype, device):
    """Gradients at the top of their dtype's range are finite (no sum or square to overflow); one inf, -inf
    or nan anywhere is not."""
    from disco_kernels._finite import finite_mask
    big = torch.finfo(dtype).max
    grads = [torch.full((5, 7), big, dtype=dtype, device=device), torch.full((3,), -big, dtype=dtype, device=device),
             torch.tensor(big, dtype=dtype, device=device)]
    assert finite_mask(grads).tolist() == [True, True, True]
    for bad in (math.inf, -math.inf, math.nan):
        g = torch.zeros(4, 9, dtype=dtype, device=device)
        g[2, 5] = bad
        assert finite_mask([grads[0], g]).tolist() == [True, False]
    p = torch.nn.Parameter(torch.zeros(5, 7, dtype=dtype, device=device))
    p.grad = grads[0].clone()
    dk.Scion([p], norm="Sign", lr=0.0).step()  # raises if the check overflowed


@pytest.mark.parametrize("device", FINITE_DEVICES)
def test_finite_check_mixed_dtypes(device):
    """One check over grads of several dtypes: values are promoted, never narrowed (1e300 stays finite)."""
    from disco_kernels._finite import finite_mask
    grads = [torch.full((3,), 6e4, dtype=torch.float16), torch.full((2, 2), 1e300, dtype=torch.float64),
             torch.tensor([1.0, math.nan], dtype=torch.bfloat16), torch.tensor(-math.inf)]
    assert finite_mask([g.to(device) for g in grads]).tolist() == [True, True, False, False]


@pytest.mark.gpu
def test_gpu_cuda_graph_step_matches_eager():
    """After warm-up (state, autotuning, cached launch tables) a whole step can be captured in a CUDA graph
    (nonfinite="ignore": no host sync) and its replays track the eager optimizer."""
    def make():
        torch.manual_seed(0)
        shapes = {"Spectral": [(64, 256), (64, 256), (384, 512), (700, 300)], "Sign": [(50, 64)],
                  "ColNorm": [(1000, 64)], "RowNorm": [(64, 1000)], "BiasRMS": [(64,), (33,)]}
        groups = [{"params": [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in ss], "norm": norm}
                  for norm, ss in shapes.items()]
        for g in groups:
            if g["norm"] == "ColNorm":
                g["norm_kwargs"] = {"transpose": True}
        params = [p for g in groups for p in g["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        return params, dk.Scion(groups, lr=0.01, momentum=0.1, nonfinite="ignore")

    eager_params, eager = make()
    graph_params, graphed = make()
    start = [p.detach().cpu() for p in eager_params]
    per_param = [{**{k: v for k, v in g.items() if k != "params"}, "lr": 0.01, "momentum": 0.1}
                 for g in eager.param_groups for _ in g["params"]]
    gen = torch.Generator(device="cuda").manual_seed(1)
    grads = []

    def new_grads():
        grads.append([torch.randn(a.shape, device="cuda", generator=gen) for a in eager_params])
        for a, b, g in zip(eager_params, graph_params, grads[-1]):
            a.grad.copy_(g)
            b.grad.copy_(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            new_grads()
            eager.step()
            graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for _ in range(3):
        new_grads()
        eager.step()
        graph.replay()
    cpu_grads = [[g.cpu() for g in gs] for gs in grads]
    exact = oracle_run(start, cpu_grads, per_param)
    plain = oracle_run(start, cpu_grads, per_param, dtype=torch.float32, ns_dtype=torch.bfloat16)
    for a, b, e, pl in zip(eager_params, graph_params, exact, plain):
        assert_close(b.detach().cpu(), e, pl, torch.bfloat16, what="graph replays")
        assert_close(a.detach().cpu(), e, pl, torch.bfloat16, what="eager")


def test_unavailable_backend_fails_before_any_state():
    """A forced backend that cannot run a param's kernel fails in validation: no momentum buffer is created
    or updated, whichever norm comes first."""
    a, b = torch.nn.Parameter(torch.randn(5, 5)), torch.nn.Parameter(torch.randn(4, 6))
    a.grad, b.grad = torch.randn(5, 5), torch.randn(4, 6)
    before = [a.detach().clone(), b.detach().clone()]
    for groups in ([{"params": [a], "norm": "Spectral"}, {"params": [b], "norm": "Sign"}],
                   [{"params": [b], "norm": "Sign"}, {"params": [a], "norm": "Spectral"}]):
        opt = dk.Scion(groups, momentum=0.5)
        opt.backend = "cuda"  # forced after construction (which would refuse it): CPU tensors are never runnable
        with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
            opt.step()
        assert torch.equal(a, before[0]) and torch.equal(b, before[1]) and not opt.state


@pytest.mark.parametrize("cls", [dk.Scion, dk.ScionLight])
def test_param_listed_twice_steps_twice_like_reference(cls):
    """The reference loops over a group's list, so a param listed twice (torch warns) takes two steps in a row."""
    p = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    g, gb = torch.randn(6, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    group = {"lr": 0.1, "momentum": 0.5, "norm": "Auto"}
    light = cls is dk.ScionLight
    # two oracle steps with the same grad (ScionLight: no new backward between them, nothing added)
    again = [torch.zeros_like(g), torch.zeros_like(gb)] if light else [g, gb]
    exact, plain = (oracle_run([p, b], [[g, gb], again], [group] * 2, light, dtype=d)
                    for d in (torch.float64, torch.float32))
    p.grad, b.grad = g.clone(), gb.clone()
    with pytest.warns(UserWarning, match="duplicate"):
        opt = cls([p, b, p, b], lr=0.1, momentum=0.5, norm_kwargs={"dtype": "float64"})
    opt.step()
    for x, e, pl in zip((p, b), exact, plain):
        assert_close(x.detach(), e, pl)


def test_light_state_dict_drops_momentum_of_zeroed_grad():
    """After zero_grad() (p.grad = None) a ScionLight checkpoint carries no stale momentum: resuming from it
    steps like the run that was not interrupted."""
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = dk.ScionLight([p], momentum=0.5)
    p.grad = torch.randn(4, 6)
    opt.step()
    opt.state_dict()
    with pytest.warns(UserWarning, match="wipes the momentum"):  # (deliberately, here)
        opt.zero_grad()
    saved = copy.deepcopy(opt.state_dict())
    assert not saved["state"]
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = dk.ScionLight([q], momentum=0.5)
    opt2.load_state_dict(saved)
    assert q.grad is None


def test_group_params_from_generators():
    """Groups given as in the README, {"params": module.parameters()}: the generator is read once and every
    param lands in the group (and steps)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = dk.Scion([{"params": model[0].parameters(), "norm": "Auto"},
                    {"params": model[1].parameters(), "norm": "Auto"}], lr=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    named = dk.Scion([{"params": model.named_parameters()}])
    assert named.param_groups[0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
