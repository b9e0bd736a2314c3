import csv
import math

import pytest
import torch
from torch import nn

import disco_kernels as dk
from disco_kernels import norms
from disco_kernels.models import NormEverywhereLM
import oracle
from tolerances import assert_close, bound

SHAPES = [(1, 1), (1, 7), (7, 1), (129, 7), (7, 129), (33, 65)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


def exact_norm(name, W):
    """(fp64 value, plain fp32 value) of the oracle's norm ``name`` of W."""
    fn = getattr(oracle, name)
    return fn(W.double()), fn(W.float()).float()


NAMES = ["rms_to_rms", "rms_to_inf", "l1_to_rms", "supremum", "condition_number"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES + [(3, 5, 9)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_vs_oracle(name, shape, dtype):
    """Every norm, every dtype of W (read exactly), batched too: an fp64 result within the rule."""
    W = torch.randn(shape).to(dtype)
    got = getattr(norms, name)(W)
    assert got.dtype == torch.float64 and got.shape == shape[:-2]
    assert_close(got, *exact_norm(name, W), torch.float64, what=name)


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_to_inf_is_attained_and_not_exceeded(shape):
    """sup over x with rms(x) = 1 of ||W x||_inf: attained at x = sqrt(d_in) W[i]/||W[i]|| for the largest row."""
    W = torch.randn(shape, dtype=torch.float64)
    d_in = shape[1]
    value = norms.rms_to_inf(W)
    i = W.norm(dim=1).argmax()
    x = math.sqrt(d_in) * W[i] / W[i].norm()
    attained = (W @ x).abs().max()
    assert_close(attained, value, (W.float() @ x.float()).abs().max())
    xs = torch.randn(d_in, 4096, dtype=torch.float64)
    xs = xs / xs.pow(2).mean(0, keepdim=True).sqrt()
    assert (W @ xs).abs().max() <= value * (1 + bound((W.float() @ x.float()).abs().max(), value, torch.float64))


@pytest.mark.parametrize("shape", SHAPES)
def test_l1_to_rms_is_attained_at_a_basis_vector_and_not_exceeded(shape):
    W = torch.randn(shape, dtype=torch.float64)
    d_out, d_in = shape
    value = norms.l1_to_rms(W)
    rms = lambda y: y.pow(2).mean(0).sqrt()  # noqa: E731
    attained, plain = rms(W).max(), rms(W.float()).max()  # at the basis vector of the largest column
    assert_close(attained, value, plain)
    xs = torch.randn(d_in, 4096, dtype=torch.float64)
    xs = xs / xs.abs().sum(0, keepdim=True)
    assert rms(W @ xs).max() <= value * (1 + bound(plain, value, torch.float64))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_supremum_is_exact(shape, dtype):
    W = torch.randn(shape).to(dtype)
    assert norms.supremum(W).item() == oracle.supremum(W).item()


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
    plain = math.sqrt(d_in / d_out) * oracle.power_iteration(W, oracle.start_vector(d_in, torch.float32), 30)[0]
    assert_close(got, oracle.rms_to_rms(W), plain, torch.float32)


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
        # the documented accuracy of one warm-started power iteration per record (not a rounding bound)
        for key, W in (("hidden", model.hidden.weight), ("conv", model.conv.weight.reshape(33, -1))):
            assert rec[f"{key}.weight/rms_to_rms"] == pytest.approx(oracle.rms_to_rms(W).item(), rel=0.01)
        for key, name, W in (("embed.weight/l1_to_rms", "l1_to_rms", model.embed.weight.T),
                             ("out.weight/rms_to_inf", "rms_to_inf", model.out.weight)):
            assert_close(f64(rec[key]), *exact_norm(name, W), torch.float64, what=key)
        assert rec["out.weight/supremum"] == oracle.supremum(model.out.weight).item()
    assert "out.bias/supremum" not in rec  # vectors are not monitored


def test_monitor_reports_the_output_norm_and_its_distance_to_the_target():
    model = NormEverywhereLM("tiny")
    with torch.no_grad():
        model.head.weight.mul_(3.0)
    mon = norms.NormMonitor(model, every=1, target=7.0)
    rec = mon.record()
    value = rec["output/rms_to_inf"]
    assert_close(f64(value), *exact_norm("rms_to_inf", model.head.weight), torch.float64)
    assert rec["output/log2_rms_to_inf"] == math.log2(value)
    assert rec["output/log2_distance"] == math.log2(value) - 7.0
    assert mon.output_norm() == value


def test_monitor_hooks_the_optimizer_and_logs_updates(tmp_path):
    """Unconstrained Scion: ΔW = −lr·u, and ColNorm/RowNorm updates have norm exactly lr in the monitored norms."""
    torch.manual_seed(2)
    model = NormEverywhereLM("tiny")
    lr = 0.1
    opt = dk.Scion(dk.param_groups(model, lr=lr), lr=lr, unconstrained=True)
    seen = []
    path = tmp_path / "norms.csv"
    weights = {"head": model.head.weight, "embed": model.embed.weight}
    snaps = []  # (before, after) of each step, taken around the monitor's own hooks
    opt.register_step_pre_hook(lambda *_: snaps.append({k: w.detach().clone() for k, w in weights.items()}))
    mon = norms.NormMonitor(model, opt, every=3, callback=lambda step, rec: seen.append((step, rec)), csv_path=path)
    opt.register_step_post_hook(lambda *_: snaps.append({k: w.detach().clone() for k, w in weights.items()}))
    x = torch.randint(0, 256, (2, 17))
    for _ in range(7):
        model(x, x).backward()
        opt.step()
        opt.zero_grad()
    assert [s for s, _ in seen] == [3, 6] and [r["step"] for r in mon.history] == [3, 6]
    assert seen[-1][1] is mon.latest
    for rec in mon.history:
        before, after = snaps[2 * rec["step"] - 2], snaps[2 * rec["step"] - 1]
        # the exact update has norm lr; its plain measurement is the fp32 difference of the weights
        assert_close(f64(rec["update/head.weight/rms_to_inf"]), f64(lr),
                     oracle.rms_to_inf(after["head"] - before["head"]), torch.float32)
        assert_close(f64(rec["update/embed.weight/l1_to_rms"]), f64(lr),
                     oracle.l1_to_rms((after["embed"] - before["embed"]).T), torch.float32)
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
    # (the plumbing: the right quantity of the right layer, held to fp32's rule; a scalar's fp64 error is
    # a handful of LAPACK roundings, luck against the fp32-scaled bound, and test_norms_vs_oracle checks it)
    assert_close(f64(rec["1.weight/condition_number"]), *exact_norm("condition_number", model[1].weight),
                 torch.float32)
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


class Conv1D(nn.Module):
    """GPT-2's Conv1D as transformers defines it: y = x W + b, W stored (nx, nf) = (d_in, d_out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class MixedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.wpe = nn.Embedding(7, 6)
        self.fc = Conv1D(24, 6)   # (6, 24): d_in 6, d_out 24
        self.experts = nn.Parameter(torch.randn(3, 5, 6))
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.wte.weight  # tied: the positions get the "position" role


def test_monitor_reads_each_weight_in_its_role_and_layout():
    """A Conv1D's (in, out) weight is measured as (out, in); an expert weight by its largest expert; learned
    positions of a tied model as the output layer is: fp64 restatements (tests/oracle.py)."""
    torch.manual_seed(0)
    model = MixedModel()
    monitor = norms.NormMonitor(model, every=1, updates=False, warmup_iters=200)
    rec = monitor.step()
    fc, experts = model.fc.weight.detach().double(), model.experts.detach().double()
    assert rec["fc.weight/rms_to_rms"] == pytest.approx(oracle.rms_to_rms(fc.T).item(), rel=1e-5)
    want = max(oracle.rms_to_rms(e).item() for e in experts)
    assert rec["experts/rms_to_rms"] == pytest.approx(want, rel=1e-5)
    assert rec["wpe.weight/rms_to_inf"] == pytest.approx(oracle.rms_to_inf(model.wpe.weight.detach().double()).item())
    from disco_kernels.train import layer_log2_norms
    logs = layer_log2_norms(model)
    assert logs["fc.weight/rms_to_rms"] == pytest.approx(math.log2(oracle.rms_to_rms(fc.T).item()))
    assert logs["experts/rms_to_rms"] == pytest.approx(math.log2(want))
