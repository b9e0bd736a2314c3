import csv
import math

import pytest
import torch
from torch import nn

import disco_kernels as dk
from disco_kernels import norms
from disco_kernels.models import NormEverywhereLM
from tolerances import elementwise_tol, reduction_tol

SHAPES = [(1, 1), (1, 7), (7, 1), (129, 7), (7, 129), (33, 65)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def svdvals64(W):
    return torch.linalg.svdvals(W.detach().double())


def close(x, want, tol):
    return abs(float(x) - float(want)) <= tol * max(abs(float(want)), 1e-300)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_to_rms_is_scaled_top_singular_value(shape, dtype):
    W = torch.randn(shape).to(dtype)
    d_out, d_in = shape
    got = norms.rms_to_rms(W)
    assert got.dtype == torch.float64 and got.shape == ()
    assert close(got, math.sqrt(d_in / d_out) * svdvals64(W)[0], reduction_tol(torch.float64, max(shape)))


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_to_inf_is_attained_and_not_exceeded(shape):
    """sup over x with rms(x) = 1 of ||W x||_inf: attained at x = sqrt(d_in) W[i]/||W[i]|| for the largest row."""
    W = torch.randn(shape, dtype=torch.float64)
    d_in = shape[1]
    value = norms.rms_to_inf(W)
    i = W.norm(dim=1).argmax()
    x = math.sqrt(d_in) * W[i] / W[i].norm()
    assert close((W @ x).abs().max(), value, reduction_tol(torch.float64, d_in))
    xs = torch.randn(d_in, 4096, dtype=torch.float64)
    xs = xs / xs.pow(2).mean(0, keepdim=True).sqrt()
    assert (W @ xs).abs().max() <= value * (1 + reduction_tol(torch.float64, d_in))


@pytest.mark.parametrize("shape", SHAPES)
def test_l1_to_rms_is_attained_at_a_basis_vector_and_not_exceeded(shape):
    W = torch.randn(shape, dtype=torch.float64)
    d_out, d_in = shape
    value = norms.l1_to_rms(W)
    rms = lambda y: y.pow(2).mean(0).sqrt()  # noqa: E731
    assert close(rms(W @ torch.eye(d_in, dtype=torch.float64)).max(), value, reduction_tol(torch.float64, d_out))
    xs = torch.randn(d_in, 4096, dtype=torch.float64)
    xs = xs / xs.abs().sum(0, keepdim=True)
    assert rms(W @ xs).max() <= value * (1 + reduction_tol(torch.float64, d_in * d_out))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_supremum_and_condition_number(shape, dtype):
    W = torch.randn(shape).to(dtype)
    assert norms.supremum(W).item() == W.double().abs().max().item()
    s = svdvals64(W)
    assert close(norms.condition_number(W), s[0] / s[-1], reduction_tol(torch.float64, max(shape)) * s[0] / s[-1])


@pytest.mark.parametrize("shape", [(37, 23), (2, 37, 23), (1, 64)])
def test_line_norms_in_fp64_chunks_equal_the_whole(shape, monkeypatch):
    """Large weights are copied to fp64 a chunk at a time: the row and column maxima (and NaN) are
    those of the whole matrix."""
    W = torch.randn(shape).to(torch.bfloat16)
    whole = {-1: W.double().norm(dim=-1).amax(-1), -2: W.double().norm(dim=-2).amax(-1)}
    monkeypatch.setattr(dk.reference, "FP64_CHUNK", 50)  # a few lines per chunk
    for dim, want in whole.items():
        assert torch.equal(dk.reference.max_line_norm(W, dim), want)
    W[..., -1, -1] = float("nan")
    assert dk.reference.max_line_norm(W, -1).isnan().all() and norms.supremum(W).isnan().all()


def test_condition_number_of_a_singular_matrix_is_huge():
    W = torch.randn(9, 1, dtype=torch.float64) @ torch.randn(1, 5, dtype=torch.float64)  # rank 1
    assert norms.condition_number(W).item() > 1 / (9 * torch.finfo(torch.float64).eps)


def test_batched_norms_match_per_matrix_values():
    W = torch.randn(3, 5, 9)
    for fn in (norms.rms_to_rms, norms.rms_to_inf, norms.l1_to_rms, norms.supremum, norms.condition_number):
        got = fn(W)
        assert got.shape == (3,)
        for b in range(3):
            assert close(got[b], fn(W[b]), reduction_tol(torch.float64, 9)), fn.__name__


@pytest.mark.parametrize("shape", [(40, 24), (7, 129), (129, 7)])
def test_rms_to_rms_by_power_iteration_on_a_known_spectrum(shape):
    """σ = (2, 1, ..., 1): 30 power iterations leave an error of order 2^-60, far below float32 rounding."""
    d_out, d_in = shape
    k = min(shape)
    U, _ = torch.linalg.qr(torch.randn(d_out, k, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, k, dtype=torch.float64))
    s = torch.ones(k, dtype=torch.float64)
    s[0] = 2.0
    W = ((U * s) @ V.T).float()
    got = norms.rms_to_rms(W, exact=False, iters=30)
    assert close(got, norms.rms_to_rms(W), reduction_tol(torch.float32, max(shape)))


@pytest.mark.parametrize("fn", [norms.rms_to_rms, norms.rms_to_inf, norms.l1_to_rms, norms.supremum,
                                norms.condition_number])
def test_bad_input_names_w(fn):
    with pytest.raises(TypeError, match="W must be a torch.Tensor"):
        fn([[1.0, 2.0]])
    with pytest.raises(TypeError, match="W must be a floating-point"):
        fn(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"W must be .* shape \(5,\)"):
        fn(torch.ones(5))
    with pytest.raises(ValueError, match=r"shape \(0, 4\)"):
        fn(torch.ones(0, 4))


# -- NormMonitor --------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 24)
        self.hidden = nn.Linear(24, 129, bias=False)
        self.conv = nn.Conv1d(129, 33, 3, bias=False)
        self.out = nn.Linear(33, 11)


def test_monitor_tracks_sigma_within_one_percent_while_weights_drift():
    torch.manual_seed(1)
    model = MLP()
    with torch.no_grad():
        model.hidden.weight.normal_()  # Gaussian: no big spectral gap, the hard case for power iteration
        model.conv.weight.normal_()
    mon = norms.NormMonitor(model, every=1)
    for _ in range(15):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        rec = mon.step()
        assert close(rec["hidden.weight/rms_to_rms"], norms.rms_to_rms(model.hidden.weight), 0.01)
        conv = model.conv.weight.reshape(33, -1)
        assert close(rec["conv.weight/rms_to_rms"], norms.rms_to_rms(conv), 0.01)
        assert close(rec["embed.weight/l1_to_rms"], norms.l1_to_rms(model.embed.weight.T),
                     reduction_tol(torch.float32, 24))
        assert close(rec["out.weight/rms_to_inf"], norms.rms_to_inf(model.out.weight), reduction_tol(torch.float32, 33))
        assert rec["out.weight/supremum"] == norms.supremum(model.out.weight).item()
    assert "out.bias/supremum" not in rec  # vectors are not monitored


def test_monitor_reports_the_output_norm_and_its_distance_to_the_target():
    model = NormEverywhereLM("tiny")
    with torch.no_grad():
        model.head.weight.mul_(3.0)
    mon = norms.NormMonitor(model, every=1, target=7.0)
    rec = mon.record()
    exact = norms.rms_to_inf(model.head.weight).item()
    assert close(rec["output/rms_to_inf"], exact, elementwise_tol(torch.float64))
    assert close(rec["output/rms_to_inf"], 3.0, reduction_tol(torch.float32, 32))  # init has norm 1
    assert rec["output/log2_rms_to_inf"] == pytest.approx(math.log2(exact), abs=1e-12)
    assert rec["output/log2_distance"] == pytest.approx(math.log2(exact) - 7.0, abs=1e-12)
    assert mon.output_norm() == pytest.approx(exact, rel=1e-15)


def test_monitor_hooks_the_optimizer_and_logs_updates(tmp_path):
    """Unconstrained Scion: ΔW = −lr·u, and ColNorm/RowNorm updates have norm exactly lr in the monitored norms."""
    torch.manual_seed(2)
    model = NormEverywhereLM("tiny")
    lr = 0.1
    opt = dk.Scion(dk.param_groups(model, lr=lr), lr=lr, unconstrained=True)
    seen = []
    path = tmp_path / "norms.csv"
    mon = norms.NormMonitor(model, opt, every=3, callback=lambda step, rec: seen.append((step, rec)), csv_path=path)
    x = torch.randint(0, 256, (2, 17))
    for _ in range(7):
        model(x, x).backward()
        opt.step()
        opt.zero_grad()
    assert [s for s, _ in seen] == [3, 6] and [r["step"] for r in mon.history] == [3, 6]
    assert seen[-1][1] is mon.latest
    # ΔW is formed in float32 next to weights of norm ~1: relative rounding ~ u (1 + 1/lr)
    tol = elementwise_tol(torch.float32, 2) * (1 + 1 / lr)
    for rec in mon.history:
        assert close(rec["update/head.weight/rms_to_inf"], lr, tol)
        assert close(rec["update/embed.weight/l1_to_rms"], lr, tol)
        # bf16 Newton-Schulz leaves singular values in about [0.7, 1.2]: hidden steps are ~ lr / 8
        assert 0.5 * lr / 8 < rec["update/blocks.0.q.weight/rms_to_rms"] < 1.5 * lr / 8
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [3, 6]
    assert float(rows[-1]["output/log2_rms_to_inf"]) == pytest.approx(mon.latest["output/log2_rms_to_inf"])
    mon.remove()
    for _ in range(3):
        model(x, x).backward()
        opt.step()
    assert len(mon.history) == 2


def test_monitor_without_updates_or_output():
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    mon = norms.NormMonitor(model, every=2, updates=False, condition_numbers=True, roles={"1.weight": "hidden"})
    assert mon.step() is None
    rec = mon.step()
    assert not any(k.startswith("update/") or k.startswith("output/") for k in rec)
    s = svdvals64(model[1].weight)
    assert close(rec["1.weight/condition_number"], s[0] / s[-1], reduction_tol(torch.float64, 7) * s[0] / s[-1])
    with pytest.raises(ValueError, match="no output layer"):
        mon.output_norm()


@pytest.mark.parametrize("kwargs, exc, name", [
    ({"every": 0}, ValueError, "every"),
    ({"iters": 1.5}, ValueError, "iters"),
    ({"warmup_iters": -1}, ValueError, "warmup_iters"),
    ({"target": math.nan}, ValueError, "target"),
    ({"callback": 3}, TypeError, "callback"),
])
def test_monitor_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        norms.NormMonitor(MLP(), **kwargs)
