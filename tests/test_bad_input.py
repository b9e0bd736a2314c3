"""Bad input, class by class: a clear error naming the argument and what was wrong, raised before
anything is modified (parameters, gradients and optimizer state stay bit-identical)."""

import pytest
import torch
from torch import nn

import disco_kernels as dk
from disco_kernels import norms
from test_optim import _assert_unchanged, _snapshot  # (one copy of the nothing-changed check)


# -- norm flags and coefficient schedules --------------------------------------------------------

@pytest.mark.parametrize("norm,kwargs,name", [
    ("Spectral", {"normalized": "False"}, "normalized"), ("Spectral", {"max": 1}, "max"),
    ("ColNorm", {"transpose": None}, "transpose"), ("RowNorm", {"normalized": "yes"}, "normalized"),
    ("Sign", {"zero_init": "no"}, "zero_init"), ("Sign", {"normalized": 0}, "normalized"),
])
def test_flags_must_be_bools(norm, kwargs, name):
    """A string flag such as "False" would act as True: refused, naming the flag."""
    with pytest.raises(TypeError, match=rf"{name} must be a bool"):
        dk.norm_dict[norm](**kwargs)
    with pytest.raises(ValueError, match=rf"{name} must be a bool"):
        dk.Scion([nn.Parameter(torch.randn(4, 4))], norm=norm, norm_kwargs=kwargs)


@pytest.mark.parametrize("coefficients,steps,match", [
    ([(3.0, -3.2, float("nan"))], 5, "finite real numbers"), ([(3.0, "b", 1.0)], 5, "finite real numbers"),
    ([(3.0, -3.2, True)], 5, "finite real numbers"), ([(1.0, 2.0)], 5, "finite real numbers"),
    ([], 5, "non-empty"), (3, 5, "coefficients must be"), ("newton", 5, "coefficients must be"),
    ([(3.0, -3.2, 1.2)] * 7, 5, r"7 \(a, b, c\) triples for steps=5"),
])
def test_coefficient_schedules(coefficients, steps, match):
    """A list gives at most one finite (a, b, c) per step (the last repeats); anything else is refused."""
    with pytest.raises(ValueError, match=match):
        dk.ops.newton_schulz(torch.randn(4, 6), steps, coefficients)
    with pytest.raises(ValueError, match=match):
        dk.lmo.Spectral(steps=steps, coefficients=coefficients)


# -- ops -------------------------------------------------------------------------------------------

def test_newton_schulz_takes_dtype_names():
    G = torch.randn(4, 6)
    assert torch.equal(dk.ops.newton_schulz(G, dtype="bfloat16"), dk.ops.newton_schulz(G, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dtype must be one of"):
        dk.ops.newton_schulz(G, dtype="int8")


@pytest.mark.parametrize("v,exc,match", [
    ([0.5] * 6, TypeError, "v must be a torch.Tensor"), (torch.zeros(6), ValueError,
                                                                 r"^v must be a finite non-zero start vector per matrix"),
    (torch.full((6,), float("nan")), ValueError, "finite"), (torch.ones(6, dtype=torch.int64), TypeError, "v must"),
    (torch.ones(5), ValueError, r"v must have shape \(6,\)"),
])
def test_power_iteration_start_vector(v, exc, match):
    with pytest.raises(exc, match=match):
        dk.ops.power_iteration(torch.randn(4, 6), v)


def _fused_inputs():
    return [torch.randn(4, 6)], [torch.randn(4, 6)], [torch.randn(4, 6)]


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(params=a["params"][0]), TypeError, "params must be a list"),
    (lambda a: a.update(grads=(a["grads"][0], 1.0)), TypeError, r"grads\[1\] must be a torch.Tensor"),
    (lambda a: a.update(grads=[torch.randn(1, 6)]), ValueError, r"grads\[0\] \(shape \(1, 6\).* params\[0\]"),
    (lambda a: a.update(bufs=[torch.randn(4, 6).T]), ValueError,
     r"^bufs\[0\] \(shape \(6, 4\), cpu\) must have the shape and device of params\[0\] \(shape \(4, 6\), cpu\)$"),
    (lambda a: a.update(bufs=a["bufs"][0]), TypeError, "^bufs must be a list of tensors, got Tensor$"),
    (lambda a: a.update(bufs=[1.0]), TypeError, r"^bufs\[0\] must be a torch.Tensor, got float$"),
    (lambda a: a.update(transpose=True, params=[torch.randn(6)], grads=[torch.randn(6)], bufs=[torch.randn(6)]),
     ValueError, r"^RowNorm needs a 2-D tensor, but params\[0\] has shape \(6,\)"),
    (lambda a: a.update(lmo="ColNorm", params=[torch.randn(6)], grads=[torch.randn(6)], bufs=[torch.randn(6)]),
     ValueError, "ColNorm needs a 2-D tensor"),
    (lambda a: a.update(lr=float("nan")), ValueError, "lr must be a finite number >= 0"),
    (lambda a: a.update(lr=-0.1), ValueError, "lr must be"),
    (lambda a: a.update(momentum=5.0), ValueError, "momentum must be a finite number >= 0.0 and <= 1.0"),
    (lambda a: a.update(scale=float("inf")), ValueError, "scale must be"),
    (lambda a: a.update(normalized="False"), TypeError, "normalized must be a bool"),
    (lambda a: a.update(params=[torch.randn(4, 6, dtype=torch.complex64)]), TypeError, r"params\[0\] must be a real"),
])
def test_fused_update_bad_arguments_change_nothing(change, exc, match):
    params, grads, bufs = _fused_inputs()
    args = dict(params=params, grads=grads, bufs=bufs, lmo="RowNorm", lr=0.1, momentum=0.5)
    change(args)
    before = [[t.clone() for t in ts] for ts in (params, grads, bufs)]
    with pytest.raises(exc, match=match):
        dk.ops.fused_update(**args)
    for ts, ref in zip((params, grads, bufs), before):
        assert all(torch.equal(t, r) for t, r in zip(ts, ref))


# -- params and gradients --------------------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: nn.Parameter(torch.randn(3, 3, dtype=torch.complex64)), "must be a real floating-point tensor"),
    (lambda: nn.Parameter(torch.ones(3, 3, dtype=torch.int64), requires_grad=False), "must be a real floating"),
    (lambda: nn.Parameter(torch.empty(3, 3, device="meta")), "is a meta tensor"),
])
def test_unusable_params_are_refused_when_added(make, match):
    good = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(TypeError, match=rf"param_groups\[1\]\['params'\]\[0\] {match}"):
        dk.Scion([{"params": [good]}, {"params": [make()]}])


@pytest.mark.parametrize("shape,bad_grad,norm", [
    ((4, 4), torch.randn(3, 3), "Spectral"), ((4, 6), torch.randn(1, 6), "RowNorm"), ((6,), torch.randn(1), "BiasRMS"),
    ((4, 6), torch.randn(6, 4), "Sign"), ((4, 6), torch.randn(4, 1), "ColNorm"),
])
@pytest.mark.parametrize("cls", [dk.Scion, dk.ScionLight])
def test_gradient_unlike_its_param_fails_before_any_write(shape, bad_grad, norm, cls):
    """A gradient of another shape (a broadcastable one would update every row) is refused before
    any group is updated or any buffer scaled: the good group first in the list is untouched too."""
    good = nn.Parameter(torch.randn(5, 5))
    bad = nn.Parameter(torch.randn(shape))
    opt = cls([{"params": [good], "norm": "Spectral"}, {"params": [bad], "norm": norm}], lr=0.1, momentum=0.5)
    good.grad, bad.grad = torch.randn(5, 5), torch.randn(shape)
    opt.step()  # momentum buffers exist
    bad.grad.data = bad_grad
    before = _snapshot([good, bad], opt)
    grads = good.grad.clone()
    with pytest.raises(ValueError, match=r"gradient of param_groups\[1\]\['params'\]\[0\].* must have the shape and "
                                         r"device of the param \(shape "):
        opt.step()
    _assert_unchanged([good, bad], opt, before)
    assert torch.equal(good.grad, grads)


@pytest.mark.parametrize("shape,norm", [((0, 4), "Auto"), ((4, 0), "Spectral"), ((4, 4, 0), "Auto"), ((0,), "Auto"),
                                        ((0, 4), "ColNorm"), ((4, 0), "Sign")])
@pytest.mark.parametrize("cls", [dk.Scion, dk.ScionLight])
def test_zero_size_params_step_and_init_as_nothing_to_do(shape, norm, cls):
    p = nn.Parameter(torch.empty(shape))
    q = nn.Parameter(torch.randn(3, 5))
    opt = cls([{"params": [p], "norm": norm}, {"params": [q]}], lr=0.1, momentum=0.5)
    opt.init()
    p.grad, q.grad = torch.empty(shape), torch.randn(3, 5)
    before = q.detach().clone()
    opt.step()
    assert p.shape == shape and not torch.equal(q, before)


# -- NormMonitor -------------------------------------------------------------------------------------

def test_monitor_refuses_bad_model_optimizer_and_path(tmp_path):
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        norms.NormMonitor(object())
    with pytest.raises(TypeError, match="optimizer must be"):
        norms.NormMonitor(model, object())
    with pytest.raises(ValueError, match="its directory does not exist"):
        norms.NormMonitor(model, csv_path=tmp_path / "missing" / "norms.csv")
    other = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="updates none of the model's monitored weights"):
        norms.NormMonitor(model, dk.Scion(other.parameters()))
    norms.NormMonitor(model, dk.Scion(model.parameters()), csv_path=tmp_path / "norms.csv")  # fine


# -- huge finite gradients ---------------------------------------------------------------------------

HUGE = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float64: 1e200}  # squares overflow the dtype


HUGE_CASES = [(dtype, backend) for dtype in HUGE for backend in dk.available_backends("cpu")
              if backend == "torch" or dtype != torch.float64]  # (the kernels take 16/32-bit tensors)


@pytest.mark.parametrize("dtype,backend", HUGE_CASES, ids=str)
@pytest.mark.parametrize("norm,kwargs", [("Spectral", {"dtype": "float32"}), ("ColNorm", {"transpose": True}),
                                         ("ColNorm", {}), ("RowNorm", {}), ("BiasRMS", {}), ("Sign", {})])
def test_huge_finite_gradients_do_not_overflow(dtype, backend, norm, kwargs):
    """Norms of a huge but finite gradient are taken without overflow: every LMO is invariant to the
    gradient's scale but for its 1e-8, so the step is the one of the gradient scaled down to norms of
    ~1e10 (where the 1e-8 is below fp64's rounding and no square overflows), within the rule (plain: the
    oracle in the dtype on that scaled-down gradient)."""
    import oracle
    from tolerances import assert_close, plain_dtype

    shape = (17,) if norm == "BiasRMS" else (6, 9)
    g = torch.randn(shape, dtype=torch.float64)
    p = nn.Parameter(torch.zeros(shape, dtype=dtype))
    p.grad = (g * HUGE[dtype]).to(dtype)
    dk.Scion([p], lr=1.0, norm=norm, norm_kwargs=kwargs, unconstrained=True, backend=backend).step()
    kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}  # the oracle iterates in its input's dtype
    scaled = p.grad.double() * (1e10 / HUGE[dtype])
    exact = -oracle.lmo(norm, scaled, **kwargs)
    d = torch.float32 if norm == "Spectral" and dtype == torch.float64 else dtype  # (fp32 Newton-Schulz)
    plain = -oracle.lmo(norm, scaled.to(torch.float32 if norm == "Spectral" else plain_dtype(d)), **kwargs)
    assert p.isfinite().all()
    assert_close(p.detach(), exact, plain.to(plain_dtype(d)), d)  # (stored in p's dtype)


def test_cuda_newton_schulz_math_takes_huge_gradients():
    """The fused Newton-Schulz kernel's normalisation (run on the host through the extension's emulation,
    the same source) sums squares in fp64: a 1e30 fp32 G orthogonalises as its scaled-down self (the
    fused update's line math: test_cuda_build.py's huge-gradient test)."""
    import oracle
    from disco_kernels import _backend
    from tolerances import assert_close

    ext = _backend.cuda_extension()
    if ext is None:
        pytest.skip("the CUDA extension was not built (no nvcc at install)")
    G = torch.randn(5, 8, dtype=torch.float64)
    out = ext.host_newton_schulz((G * 1e30).float().numpy(), list(oracle.JORDAN) * 5, 1.0, 1e-7)
    assert_close(torch.from_numpy(out), oracle.newton_schulz(G), oracle.newton_schulz(G.float()))


def test_power_iteration_start_vectors_are_checked_per_matrix():
    """Each matrix's start vector is checked (a zero one among good ones is refused); an empty one (n = 0) is
    fine: sigma is 0 and v stays."""
    W, v = torch.randn(3, 4, 6), torch.randn(3, 6)
    v[1] = 0
    with pytest.raises(ValueError, match="non-zero start vector"):
        dk.ops.power_iteration(W, v)
    sigma, v_out = dk.ops.power_iteration(torch.zeros(3, 5, 0), torch.empty(3, 0), backend="torch")
    assert sigma.shape == (3,) and (sigma == 0).all() and v_out.shape == (3, 0)


def test_fsdp_gradient_shard_unlike_its_param_shard(one_rank_group):
    """A DTensor gradient whose global shape is right but whose local shard is not is refused, naming both."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (1,))
    p = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(0)]))
    opt = dk.Scion([p], norm="Sign")
    p.grad = DTensor.from_local(torch.randn(3, 3), mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride())
    before = p.to_local().clone()
    with pytest.raises(ValueError, match=r"^this rank's shard of the gradient of param_groups\[0\]\['params'\]\[0\] "
                                         r"\(shape \(4, 6\)\) \(shape \(3, 3\), cpu\) must have the shape and device of "
                                         r"the param's shard \(shape \(4, 6\), cpu\)"):
        opt.step()
    assert torch.equal(p.to_local(), before)
