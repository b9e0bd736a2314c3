"""Spectral over blocks: expert weights (batch_dims), fused projections (splits) and heads, stored (d_out, d_in)
or (d_in, d_out) (transpose), against an fp64 restatement that orthogonalises each block on its own
(tests/oracle.py's Newton-Schulz; a transposed block as the plain LMO of its transpose, transposed back)
and scales it by its own block's factor; the batching of same-shaped blocks, init, the engine's step,
bad arguments and param_groups' detection of experts and GPT-2's Conv1D and fused c_attn."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import disco_kernels as dk
import oracle
from disco_kernels import engine as E
from disco_kernels import lmo as L
from tolerances import assert_oracle


def blocked(g, *, batch_dims=0, splits=None, heads=None, transpose=False, **spectral_kwargs):
    """The LMO restated: every matrix of the (batch..., rows, cols) g cut along its output dim (rows; columns
    when ``transpose``) into blocks of ``splits`` (or ``heads`` equal ones), each block oracle.spectral'd
    (NS of it times sqrt(d_out / d_in) of that block) on its own; a transposed block as the LMO of its
    transpose (d_out, d_in), transposed back."""
    out = torch.empty_like(g)
    split_dim = 1 if transpose else 0
    for idx in itertools.product(*map(range, g.shape[:batch_dims])):
        n = g[idx].shape[split_dim]
        sizes = splits if splits is not None else [n // heads] * heads if heads else [n]
        for start, size in zip(itertools.accumulate(sizes, initial=0), sizes):
            cut = (slice(None),) * split_dim + (slice(start, start + size),)
            block = g[idx][cut]
            out[idx][cut] = oracle.spectral(block.mT, **spectral_kwargs).mT if transpose else \
                oracle.spectral(block, **spectral_kwargs)
    return out


# (kwargs, shape): experts (odd sizes, tall, 1 x 1), unequal splits of rows and (transposed) of columns, heads,
# together; whole transposed matrices, wide and tall
CASES = [
    ({"batch_dims": 1}, (3, 5, 7)),
    ({"batch_dims": 1}, (2, 9, 4)),
    ({"batch_dims": 1}, (1, 1, 1)),
    ({"batch_dims": 2}, (2, 3, 4, 6)),
    ({"splits": [8, 4, 4]}, (16, 12)),  # GQA-like: q rows, then k and v rows
    ({"splits": [3, 7, 1, 7]}, (18, 5)),  # two 7-row blocks in one call, a 1-row one
    ({"splits": [8, 4, 4], "transpose": True}, (12, 16)),
    ({"splits": [5, 5, 5], "transpose": True}, (5, 15)),  # GPT-2's c_attn stored (d, 3d)
    ({"transpose": True}, (6, 24)),  # GPT-2's c_fc stored (d, 4d): factor sqrt(24 / 6), not sqrt(6 / 24)
    ({"transpose": True}, (20, 5)),  # GPT-2's mlp.c_proj stored (4d, d)
    ({"batch_dims": 1, "transpose": True}, (2, 9, 4)),
    ({"heads": 4}, (16, 12)),
    ({"heads": 3, "transpose": True}, (7, 12)),
    ({"batch_dims": 1, "splits": [6, 2, 2]}, (3, 10, 4)),
    ({"batch_dims": 1, "heads": 2, "transpose": True}, (2, 3, 8)),
    ({"splits": [8, 4, 4], "normalized": False}, (16, 12)),
    ({"splits": [8, 2, 2], "max": True}, (12, 6)),  # sqrt(2/6) < 1: max takes 1 for the small blocks only
    ({"splits": [8, 2, 2], "max": True, "transpose": True}, (6, 12)),
    ({"splits": [5, 5, 5], "normalized": False, "transpose": True}, (5, 15)),  # sqrt(d_out): of the block's 5
    ({"splits": [8, 4, 4], "coefficients": "polar_express", "steps": 6}, (16, 12)),
]


def _ids(case):
    kwargs, shape = case
    return f"{'-'.join(f'{k}={v}' for k, v in kwargs.items())}-{'x'.join(map(str, shape))}"


DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
DTYPE_CASES = [(case, dtype) for case in CASES for dtype in DTYPES
               if dtype.itemsize > 2 or math.prod(case[1]) > 1]  # (a 1 x 1 in 16-bit: one scalar trajectory)


@pytest.mark.parametrize("case, dtype", DTYPE_CASES, ids=[f"{_ids(c)}-{d}" for c, d in DTYPE_CASES])
def test_lmo_is_each_block_on_its_own(case, dtype):
    """lmo, lmo_many and orthogonalise_many * alpha (the contract of the engine and the owner route), g and the
    iteration in ``dtype``, over a batch of eight g (one tiny matrix's error is a handful of roundings: luck,
    not a measure). An unequal block's factor ratio costs one more rounding of its factor: within the ulps."""
    kwargs, shape = case
    gs = [torch.randn(shape, dtype=torch.float64).to(dtype) for _ in range(8)]
    norm = L.Spectral(**kwargs, dtype=dtype)
    restated = lambda hs: torch.stack([blocked(h, **kwargs) for h in hs])  # noqa: E731
    assert_oracle(torch.stack([norm.lmo(g) for g in gs]), restated, gs, what="lmo")
    assert_oracle(torch.stack(norm.lmo_many(gs)), restated, gs, what="lmo_many")
    factors = norm.orthogonalise_many(gs)
    assert_oracle(torch.stack([x * norm.alpha(shape) for x in factors]), restated, gs, what="orthogonalise_many")


def test_every_case_is_not_the_whole_matrix():
    """Each case's restatement differs from the tensor orthogonalised as one matrix (len, -1) and, with splits
    or heads, from its matrices orthogonalised whole (so the tests above see the blocks)."""
    for kwargs, shape in CASES:
        if math.prod(shape) == 1:
            continue
        g = torch.randn(shape, dtype=torch.float64)
        flags = {k: v for k, v in kwargs.items() if k in ("normalized", "max", "coefficients", "steps")}
        others = [oracle.spectral(g.reshape(shape[0], -1), **flags).view(shape)]
        if "splits" in kwargs or "heads" in kwargs:
            others.append(blocked(g, batch_dims=kwargs.get("batch_dims", 0), **flags))
        if kwargs.get("transpose") and shape[-1] != shape[-2]:  # the factor read from the stored shape
            others.append(blocked(g, **{**kwargs, "transpose": False, "splits": None, "heads": None}))
        for other in others:
            assert (blocked(g, **kwargs) - other).norm() > 1e-3 * other.norm(), _ids((kwargs, shape))


def _calls(monkeypatch):
    seen = []
    real = L.newton_schulz
    monkeypatch.setattr(L, "newton_schulz", lambda G, *a, **k: seen.append(G) or real(G, *a, **k))
    return seen


@pytest.mark.parametrize("kwargs, shape, calls, view", [
    ({}, (8, 12), [(1, 8, 12)], True),
    ({"batch_dims": 1}, (4, 6, 8), [(4, 6, 8)], True),
    ({"heads": 4}, (16, 12), [(4, 4, 12)], True),
    ({"batch_dims": 1, "splits": [3, 3]}, (2, 6, 8), [(4, 3, 8)], True),
    ({"splits": [8, 4, 4]}, (16, 12), [(1, 8, 12), (2, 4, 12)], False),
    ({"heads": 3, "transpose": True}, (5, 12), [(3, 5, 4)], False),
    ({"transpose": True}, (5, 12), [(1, 5, 12)], True),
])
def test_same_shaped_blocks_go_through_one_call(monkeypatch, kwargs, shape, calls, view):
    """One Newton-Schulz call per block shape; equal blocks of rows read the param's own memory."""
    seen = _calls(monkeypatch)
    g = torch.randn(shape, dtype=torch.float64)
    L.Spectral(**kwargs, dtype=torch.float64).lmo(g)
    assert [tuple(G.shape) for G in seen] == calls
    assert (seen[0].data_ptr() == g.data_ptr()) == view


def test_unblocked_spectral_is_unchanged(monkeypatch):
    """The defaults, one split and one head are today's single call on the matrix itself, bitwise."""
    g = torch.randn(9, 14, dtype=torch.float64)
    today = dk.ops.newton_schulz(g, 5, dtype=torch.float64) * math.sqrt(9 / 14)
    seen = _calls(monkeypatch)
    for kwargs in ({}, {"batch_dims": 0, "splits": None, "heads": None, "transpose": False}, {"splits": [9]},
                   {"heads": 1}):
        assert torch.equal(L.Spectral(**kwargs, dtype=torch.float64).lmo(g), today), kwargs
    assert [tuple(G.shape) for G in seen] == [(1, 9, 14)] * 4 and all(G.data_ptr() == g.data_ptr() for G in seen)


def test_matrices_and_alpha():
    assert L.Spectral(batch_dims=1).matrices((3, 5, 7)) == [(5, 7)] * 3
    assert L.Spectral(splits=[8, 4, 4]).matrices((16, 12)) == [(8, 12), (4, 12), (4, 12)]
    assert L.Spectral(batch_dims=1, heads=2, transpose=True).matrices((2, 3, 8)) == [(3, 4)] * 4
    assert L.Spectral(transpose=True, splits=[4, 8]).matrices((6, 12)) == [(6, 4), (6, 8)]
    assert L.Spectral().matrices((6, 4)) == [(6, 4)] and L.SpectralConv().matrices((4, 2, 3, 3)) == [(4, 18)]
    assert L.Spectral(splits=[8, 4, 4]).alpha((16, 12)) == math.sqrt(8 / 12)  # the first block's
    assert L.Spectral(batch_dims=1).alpha((3, 5, 7)) == math.sqrt(5 / 7)
    assert L.Spectral(transpose=True).alpha((64, 256)) == 2.0 and L.Spectral(transpose=True).alpha((256, 64)) == 0.5
    assert L.Spectral(transpose=True, splits=[4, 8]).alpha((6, 12)) == math.sqrt(4 / 6)
    assert L.Spectral(transpose=True, normalized=False).alpha((6, 12)) == math.sqrt(12)
    assert L.Spectral(transpose=True, max=True).alpha((12, 6)) == 1.0
    assert L.Spectral(transpose=True).block_alpha(6, 12) == L.Spectral().block_alpha(12, 6)
    assert L.Spectral(batch_dims=1).ndims == (3,) and L.Spectral().ndims == (2,)
    assert L.Spectral().batch_dims == L.SpectralConv().batch_dims == 0 and L.Spectral(batch_dims=2).batch_dims == 2


def test_check_backend_asks_about_each_block_shape(monkeypatch):
    seen = []
    monkeypatch.setattr(L, "ns_backend", lambda backend, G, *a: seen.append(tuple(G.shape)))
    g = torch.zeros(16, 12)
    L.Spectral(splits=[8, 4, 4]).check_backend("torch", (16, 12), g, g)
    assert seen == [(8, 12), (4, 12)]


@pytest.mark.parametrize("case", CASES, ids=map(_ids, CASES))
def test_init_is_orthogonal_per_block_times_its_factor(case):
    """init draws one orthogonal matrix per block, matrix by matrix and block by block in order (each as
    the reference draws a whole matrix, in the layout it is stored), times the block's factor."""
    kwargs, shape = case
    w = torch.full(shape, float("nan"))
    torch.manual_seed(3)
    L.Spectral(**kwargs).init(w)
    torch.manual_seed(3)
    exact = torch.empty(shape, dtype=torch.float64)
    batch_dims, split_dim = kwargs.get("batch_dims", 0), int(kwargs.get("transpose", False))
    flags = {k: v for k, v in kwargs.items() if k in ("normalized", "max")}
    for idx in itertools.product(*map(range, shape[:batch_dims])):
        n = shape[batch_dims + split_dim]
        sizes = kwargs.get("splits") or [n // kwargs.get("heads", 1)] * kwargs.get("heads", 1)
        for start, size in zip(itertools.accumulate(sizes, initial=0), sizes):
            cut = (slice(None),) * split_dim + (slice(start, start + size),)
            block = torch.nn.init.orthogonal_(torch.empty(exact[idx][cut].shape, dtype=torch.float64))
            d_out, d_in = block.shape[::-1] if split_dim else block.shape  # transpose: stored (d_in, d_out)
            exact[idx][cut] = block * oracle.spectral_scale(d_out, d_in, **flags)
    assert torch.equal(w, exact.float())


# -- the optimizer's step ---------------------------------------------------------------------------

STEP_GROUPS = [({"batch_dims": 1}, (3, 6, 10)), ({"splits": [8, 4, 4]}, (16, 12)),
               ({"splits": [4, 8], "transpose": True}, (6, 12)), ({"heads": 2}, (8, 5)),
               ({"transpose": True}, (4, 16))]


@pytest.mark.parametrize("momentum", [1.0, 0.5])
def test_scion_steps_equal_the_restatement(momentum):
    """Two Scion steps over groups of blocked params (three same-shaped params each: the packed momentum
    batch) equal p (1 - lr) - lr scale lmo(buf) with the restated LMO."""
    params = [nn.Parameter(torch.randn(shape, dtype=torch.float64)) for _, shape in STEP_GROUPS for _ in range(3)]
    groups = [{"params": params[3 * i:3 * i + 3], "norm": "Spectral", "norm_kwargs": {**kwargs, "dtype": "float64"},
               "lr": 0.1, "momentum": momentum, "scale": 2.0} for i, (kwargs, _) in enumerate(STEP_GROUPS)]
    opt = dk.Scion(groups)
    steps = [[torch.randn_like(p) for p in params] for _ in range(2)]
    kwargs_of = [kwargs for kwargs, _ in STEP_GROUPS for _ in range(3)]

    def restated(ps, grads_per_step):
        ps, bufs = list(ps), [torch.zeros_like(p) for p in ps]
        for grads in grads_per_step:
            for i, g in enumerate(grads):
                bufs[i] = bufs[i] * (1 - momentum) + g * momentum if momentum != 1 else g
                ps[i] = ps[i] * (1 - 0.1) - 0.1 * 2.0 * blocked(bufs[i], **kwargs_of[i])
        return ps

    start = [p.detach().clone() for p in params]
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    assert_oracle([p.detach() for p in params], restated, start, steps, what="params after two steps")


def test_a_shard_of_whole_experts_steps_on_its_own():
    """The engine views the batch by the local tensors' shape (a Shard(0) of a batch_dims=1 param holds
    whole experts) and takes alpha from the full shape."""
    class Shard:  # what the engine reads of a DTensor sharded Shard(0) over two ranks, on rank 1
        def __init__(self, full):
            self.shape, self.local = full.shape, full[2:].clone()

        def to_local(self):
            return self.local

    full, grad = torch.randn(4, 10, 6, dtype=torch.float64), torch.randn(4, 10, 6, dtype=torch.float64)
    p = Shard(full)
    p.grad = Shard(grad)
    kwargs = {"batch_dims": 1, "splits": [6, 2, 2]}
    group = {"params": [p], "lr": 0.1, "momentum": 1.0, "scale": 1.0, "unconstrained": True}
    engine = E.Engine(dk.Scion([nn.Parameter(torch.zeros(1))]), light=False)
    engine._run_newton_schulz(E.Part(group, L.Spectral(**kwargs, dtype=torch.float64), [p]))
    assert_oracle(p.local, lambda w, g: w - 0.1 * blocked(g, **kwargs), full[2:], grad[2:], what="the shard")


# -- bad arguments --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"batch_dims": -1}, "batch_dims"), ({"batch_dims": 1.0}, "batch_dims"), ({"batch_dims": True}, "batch_dims"),
    ({"splits": []}, "splits"), ({"splits": 8}, "splits"), ({"splits": [4, 0]}, r"splits\[1\]"),
    ({"splits": [4.0, 4]}, r"splits\[0\]"), ({"heads": 0}, "heads"), ({"heads": True}, "heads"),
    ({"splits": [4, 4], "heads": 2}, "splits or heads"),
])
def test_bad_kwargs_name_themselves_and_change_nothing(kwargs, match):
    with pytest.raises(ValueError, match=match):
        L.Spectral(**kwargs)
    p = nn.Parameter(torch.randn(8, 8))
    p.grad = torch.randn(8, 8)
    opt = dk.Scion([p], norm="Spectral", momentum=0.5)
    opt.param_groups[0]["norm_kwargs"] = kwargs  # (past the constructor's check)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert torch.equal(p, before) and not opt.state[p]
    with pytest.raises(ValueError, match=match):
        dk.Scion([p], norm="Spectral", norm_kwargs=kwargs)


@pytest.mark.parametrize("kwargs", [{"transpose": 1}, {"transpose": "False"}, {"split_dim": 1}])
def test_transpose_is_a_bool_and_split_dim_is_gone(kwargs):
    """The cut is along the output dim, which ``transpose`` locates; the former ``split_dim`` is refused."""
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        L.Spectral(**kwargs)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        dk.Scion([nn.Parameter(torch.randn(4, 4))], norm="Spectral", norm_kwargs=kwargs)


@pytest.mark.parametrize("kwargs, shape, match", [
    ({"splits": [8, 4, 4]}, (17, 12), r"splits=\[8, 4, 4\].*shape \(17, 12\).*sum to 17"),
    ({"splits": [4, 4], "transpose": True}, (8, 7), r"splits=\[4, 4\]\).*dim 1, transpose=True.*shape \(8, 7\)"),
    ({"heads": 2, "transpose": True, "batch_dims": 1}, (2, 4, 5), r"heads=2.*dim 2, transpose=True.*5 is not a"),
    ({"heads": 3}, (16, 12), r"heads=3.*shape \(16, 12\).*16 is not a multiple of 3"),
    ({"batch_dims": 1}, (6, 6), r"needs a 3-D tensor.*shape \(6, 6\)"),
])
def test_blocks_that_do_not_fit_the_param_are_named(kwargs, shape, match):
    p = nn.Parameter(torch.randn(shape))
    with pytest.raises(ValueError, match=match):
        dk.Scion([p], norm="Spectral", norm_kwargs=kwargs)
    with pytest.raises(ValueError, match=match):
        L.Spectral(**kwargs).lmo(torch.randn(shape))
    with pytest.raises(ValueError, match=match):
        L.Spectral(**kwargs).init(p)


# -- param_groups --------------------------------------------------------------------------------------

class Conv1D(nn.Module):
    """transformers' Conv1D as GPT-2 uses it: y = x W + b, W stored (nx, nf)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))


class MoE(nn.Module):
    def __init__(self, d=8, experts=4):
        super().__init__()
        self.c_attn = Conv1D(3 * d, d)
        self.router = nn.Linear(d, experts)
        self.w_in = nn.Parameter(torch.randn(experts, 2 * d, d))
        self.w_out = nn.Parameter(torch.randn(experts, d, 2 * d))
        self.conv = nn.Conv1d(d, d, 3)
        self.head = nn.Linear(d, 11)


def test_param_groups_find_experts_and_the_fused_projection():
    model = MoE()
    groups = dk.param_groups(model, lr=0.8)
    by_names = {tuple(g["param_names"]): g for g in groups}
    expert = by_names["w_in", "w_out"]
    assert (expert["role"], expert["norm"], expert["norm_kwargs"], expert["lr"]) == (
        "expert", "Spectral", {"batch_dims": 1}, 0.1)
    fused = by_names["c_attn.weight",]
    assert (fused["role"], fused["norm"], fused["norm_kwargs"], fused["lr"]) == (
        "hidden", "Spectral", {"transpose": True, "splits": [8, 8, 8]}, 0.1)
    assert by_names["router.weight",]["norm_kwargs"] == {} and by_names["conv.weight",]["role"] == "conv"
    settings = {"hidden": {"norm_kwargs": {"steps": 3}}}
    fused = next(g for g in dk.param_groups(model, settings=settings) if "c_attn.weight" in g["param_names"])
    assert fused["norm_kwargs"] == {"steps": 3, "transpose": True, "splits": [8, 8, 8]}
    opt = dk.Scion(groups)
    opt.init()
    w = model.w_in.detach().double()
    assert torch.allclose(torch.linalg.svdvals(w), torch.full((4, 8), math.sqrt(2.0), dtype=torch.float64))
    q = model.c_attn.weight.detach().double()[:, :8]  # init: q orthogonal on its own
    assert torch.allclose(q.T @ q, torch.eye(8, dtype=torch.float64), atol=1e-5)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


def test_other_conv1d_weights_are_transposed_hidden_and_transposed_convs_are_not_guessed():
    model = nn.Module()
    model.c_proj, model.c_fc, model.mlp_proj = Conv1D(8, 8), Conv1D(32, 8), Conv1D(8, 32)  # not a fused q, k, v
    g = dk.param_groups(model)
    hidden = next(grp for grp in g if grp["role"] == "hidden")
    assert hidden["param_names"] == ["c_proj.weight", "c_fc.weight", "mlp_proj.weight"]
    assert hidden["norm_kwargs"] == {"transpose": True} and len(g) == 2  # and the biases
    assert L.Spectral(**hidden["norm_kwargs"]).alpha(model.c_fc.weight.shape) == 2.0  # sqrt(d_out / d_in) = sqrt(4)
    model = nn.Module()
    model.up = nn.ConvTranspose1d(4, 4, 3)  # 3-D, but a kernel, not experts
    with pytest.raises(ValueError, match=r"cannot classify 1 parameter:.*\n  parameter 'up.weight'"):
        dk.param_groups(model)
