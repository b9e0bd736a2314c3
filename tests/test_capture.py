"""CapturedStep: a graph-captured optimizer step.

On the CPU: the eager fallback (numbers, notice), the errors, and the capture logic itself, run through
``SimRunner``, a stand-in for the CUDA runner whose replay runs the step on exactly what was captured
(the groups as captured, with the owned hyper-parameter tensors; the captured gradient buffers) and
asserts that the memory a graph would touch has not moved. On a GPU (``gpu`` tests): 50 replayed steps
against 50 eager steps, bitwise, under an lr schedule; re-capture; new gradient tensors; no host sync.

The eager reference of a captured run is the same optimizer stepped eagerly with its lr, momentum and
scale held as 0-d tensors of the dtype CapturedStep uses (fp32 here) and written each step: a graph
replays the kernels of that step, so the two agree bitwise. Learning rates are dyadic (exact in fp32).
"""
import warnings

import pytest
import torch

import disco_kernels as dk
from disco_kernels import capture
from disco_kernels.capture import CapturedStep

from tolerances import assert_close

HAS_CUDA = torch.cuda.is_available()
BASE_LR = 2 ** -6
SHAPES = [(8, 6), (8, 6), (6, 10), (12, 4), (6,), (8,)]


def lr_at(t: int) -> float:
    """A saw-tooth schedule of dyadic values (exact in fp32)."""
    return BASE_LR * (16 - t % 8) / 16


def make(cls, device="cpu", dtype=torch.float32, momentum=0.25, last_momentum=None, **kw):
    """Spectral (two of one shape, one other) + ColNorm(transpose) + BiasRMS groups, always the same values."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype)) for s in SHAPES]
    groups = [{"params": ps[:3], "norm": "Spectral", "scale": 4.0},
              {"params": ps[3:4], "norm": "ColNorm", "norm_kwargs": {"transpose": True}, "scale": 2.0,
               "unconstrained": True},
              {"params": ps[4:], "norm": "BiasRMS", "scale": 1.0}]
    if last_momentum is not None:
        groups[2]["momentum"] = last_momentum
    return ps, cls(groups, lr=BASE_LR, momentum=momentum, nonfinite=kw.pop("nonfinite", "ignore"), **kw)


def all_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def grad_of(t: int, k: int, p: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * t + k)
    return torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)


def feed(opt, t: int, mode: str) -> None:
    """This step's gradients: "inplace" (zero_grad(set_to_none=False) + backward), "new" (set_to_none=True +
    backward: a new tensor each step), "accumulate" (ScionLight: backward adds to the carried momentum).
    A param with ``_grad_until = t0`` has none from step t0 on; ``_grad_from = t0`` none before t0."""
    for k, p in enumerate(all_params(opt)):
        if t >= getattr(p, "_grad_until", 1 << 30) or t < getattr(p, "_grad_from", 0):
            p.grad = None
            continue
        g = grad_of(t, k, p)
        if p.grad is None or mode == "new":
            p.grad = g
        elif mode == "accumulate":
            p.grad.add_(g)
        else:
            p.grad.copy_(g)


def tensorise(opt) -> None:
    """lr, momentum (unless the number 1) and scale as fp32 0-d tensors on the params' device."""
    for g in opt.param_groups:
        device = g["params"][0].device
        for k in ("lr", "momentum", "scale"):
            v = g[k]
            if not isinstance(v, torch.Tensor) and not (k == "momentum" and v == 1):
                g[k] = torch.tensor(float(v), dtype=torch.float32, device=device)


def set_lr(opt, t: int) -> None:
    for g in opt.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr_at(t))
        else:
            g["lr"] = lr_at(t)


def drive(opt, stepper, steps: int, mode: str, *, tensors: bool = False, mutate=None, start: int = 0,
          sched=None) -> None:
    """Steps start..steps-1 at lr_at(t): written into the groups (floats, or into tensors), or by ``sched``."""
    for t in range(start, steps):
        if mutate is not None:
            mutate(t, opt)
        if tensors:
            tensorise(opt)
        if sched is None:
            set_lr(opt, t)
        feed(opt, t, mode)
        stepper.step()
        if sched is not None:
            sched.step()


def snapshot(opt) -> list:
    """Params, gradients and state tensors, in order."""
    out = []
    for p in all_params(opt):
        out += [p.detach().clone(), None if p.grad is None else p.grad.clone()]
        out += [v.clone() for k, v in sorted(opt.state.get(p, {}).items())
                if isinstance(v, torch.Tensor) and k != "grad_state"]
    return out


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            assert x is None and y is None, f"item {i}: one is None"
        else:
            assert torch.equal(x, y), f"item {i}: differs by {(x.double() - y.double()).abs().max().item():.3g}"


class SimRunner:
    """Stands in for the CUDA runner on the CPU. capture(fn) runs the step as a capture does: its Python side
    effects happen (plans, caches, state entries), its numbers are undone, what it read is recorded. replay()
    runs the step on exactly that (the groups as captured, holding the owned tensors; the captured gradient
    buffers), after asserting that the params and state tensors the graph would touch are those captured."""

    instances = []

    def __init__(self, device, optimizer):
        self.device, self.opt, self.graph = device, optimizer, None
        self.captures = self.replays = 0
        SimRunner.instances.append(self)

    def warmup(self, fn):
        fn()

    def _tensors(self):
        opt, seen, out = self.opt, set(), []
        for p in all_params(opt):
            for t in [p, p.grad] + [v for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]:
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
        return out

    def capture(self, fn):
        opt, snap = self.opt, {}
        saved = [(t, t.detach().clone()) for t in self._tensors()]
        real = type(opt).step.__get__(opt)

        def recorder(closure=None):
            snap["groups"] = [dict(g, params=list(g["params"])) for g in opt.param_groups]
            snap["grads"] = [(p, p.grad) for g in snap["groups"] for p in g["params"]]
            return real(closure)

        opt.step = recorder
        try:
            fn()
        finally:
            del opt.step
            with torch.no_grad():
                for t, c in saved:
                    t.copy_(c)
        snap["ptrs"] = [(p, p.data_ptr()) for p, _ in snap["grads"]]
        snap["state"] = [(p, k, v) for p, g in snap["grads"] if g is not None
                         for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor) and k != "grad_state"]
        self.graph = snap
        self.captures += 1

    def replay(self):
        opt, snap = self.opt, self.graph
        assert snap is not None, "replay without a graph"
        for p, ptr in snap["ptrs"]:
            assert p.data_ptr() == ptr, "replay of a stale graph: a param's memory moved"
        for p, k, v in snap["state"]:
            assert opt.state.get(p, {}).get(k) is v, f"replay of a stale graph: state {k!r} was replaced"
        groups, grads = opt.param_groups, [(p, p.grad) for p in all_params(opt)]
        try:
            opt.param_groups = snap["groups"]
            for p, g in snap["grads"]:
                p.grad = g
            type(opt).step(opt)
        finally:
            opt.param_groups = groups
            for p, g in grads:
                p.grad = g
        self.replays += 1

    def drop(self):
        self.graph = None


@pytest.fixture
def sim(monkeypatch):
    """CapturedStep on the CPU captures with SimRunner (no notice, no fallback)."""
    SimRunner.instances = []
    monkeypatch.setattr(capture, "_make_runner", lambda device, opt: SimRunner(device, opt))
    return SimRunner


CLASSES = [dk.Scion, dk.ScionLight]


def _mode(cls, mode):
    return "accumulate" if cls is dk.ScionLight and mode == "inplace" else mode


# -- the eager fallback on the CPU ----------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
def test_cpu_fallback_is_the_eager_step_with_one_notice(cls):
    _, ref = make(cls)
    drive(ref, ref, 6, _mode(cls, "inplace"))
    _, opt = make(cls)
    stepper = CapturedStep(opt)
    with pytest.warns(UserWarning, match="not on a CUDA device: every step runs eagerly") as rec:
        drive(opt, stepper, 6, _mode(cls, "inplace"))
    assert len([w for w in rec if "CapturedStep" in str(w.message)]) == 1
    assert_same(snapshot(opt), snapshot(ref))
    assert (stepper.eager_steps, stepper.captures, stepper.replays, stepper.captured) == (6, 0, 0, False)


def test_cpu_fallback_accepts_any_nonfinite_policy():
    _, opt = make(dk.Scion, nonfinite="raise")
    stepper = CapturedStep(opt)
    with pytest.warns(UserWarning, match="eagerly"):
        drive(opt, stepper, 2, "inplace")


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, what", [
    ([torch.nn.Parameter(torch.randn(3, 3))], "list"),
    (None, "NoneType"),
    (torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=0.1), "a torch.optim optimizer other than Scion"),
])
def test_not_a_scion_optimizer(bad, what):
    with pytest.raises(TypeError, match=f"CapturedStep takes a disco_kernels Scion or ScionLight, got {what}"):
        CapturedStep(bad)


@pytest.mark.parametrize("warmup", [0, -1, True, 1.0, "2"])
def test_bad_warmup(warmup):
    _, opt = make(dk.Scion)
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        CapturedStep(opt, warmup=warmup)


def test_closure_is_refused():
    _, opt = make(dk.Scion)
    with pytest.raises(TypeError, match="takes no closure"):
        CapturedStep(opt).step(lambda: 0.0)


def test_nonfinite_check_cannot_be_captured(sim):
    _, opt = make(dk.Scion, nonfinite="raise")
    with pytest.raises(ValueError, match=r"needs Scion\(\.\.\., nonfinite='ignore'\), got nonfinite='raise'"):
        CapturedStep(opt)


def test_distributed_optimizer_cannot_be_captured(sim, one_rank_group):
    _, opt = make(dk.Scion, process_group=one_rank_group)
    with pytest.raises(ValueError, match="cannot capture a distributed Scion"):
        CapturedStep(opt)


# -- the capture logic, on the CPU stand-in ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["inplace", "new"])
@pytest.mark.parametrize("cls", CLASSES)
def test_replays_equal_eager_steps(sim, cls, mode):
    mode = _mode(cls, mode)
    _, ref = make(cls)
    drive(ref, ref, 12, mode, tensors=True)
    _, opt = make(cls)
    stepper = CapturedStep(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice: this is no fallback
        drive(opt, stepper, 12, mode)
    assert_same(snapshot(opt), snapshot(ref))
    assert (stepper.eager_steps, stepper.captures, stepper.replays) == (2, 1, 10)
    assert sim.instances[0].replays == 10
    # gradients that are new tensors are copied into the captured buffers, once each per replay after the
    # capture's own (whose gradients are the buffers)
    assert stepper.grad_copies == (9 * len(SHAPES) if mode == "new" else 0)
    if mode == "new":
        assert all(p.grad is g for p, g in sim.instances[0].graph["grads"])  # p.grad points at the buffers


@pytest.mark.parametrize("cls", CLASSES)
def test_scheduler_floats_stay_in_the_groups(sim, cls):
    """A torch scheduler drives the optimizer; the groups and the state_dict keep its floats."""
    _, ref = make(cls)
    tensorise(ref)
    _, opt = make(cls)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (16 - t % 8) / 16)
    stepper = CapturedStep(opt, warmup=1)
    mode = _mode(cls, "inplace")
    for t in range(10):
        feed(ref, t, mode)
        set_lr(ref, t)
        ref.step()
        feed(opt, t, mode)
        stepper.step()
        sched.step()
    assert_same(snapshot(opt), snapshot(ref))
    assert stepper.replays == 9
    sd = stepper.state_dict()
    assert all(not isinstance(v, torch.Tensor) for g in sd["param_groups"] for v in g.values())
    assert all(isinstance(g["lr"], float) for g in opt.param_groups)
    assert opt.param_groups[0]["lr"] == lr_at(10)


def test_lr_as_cpu_tensor_and_float(sim):
    """A group's lr may switch between a float and a 0-d CPU tensor that a schedule fills: no re-capture."""
    def mutate(t, opt):
        if t == 4:
            opt.param_groups[0]["lr"] = torch.tensor(0.0, dtype=torch.float64)
        if t == 8:
            opt.param_groups[0]["lr"] = 0.0
    _, ref = make(dk.Scion)
    drive(ref, ref, 12, "inplace", tensors=True)
    _, opt = make(dk.Scion)
    stepper = CapturedStep(opt)
    drive(opt, stepper, 12, "inplace", mutate=mutate)
    assert_same(snapshot(opt), snapshot(ref))
    assert stepper.captures == 1


def _add_group(t, opt):
    if t == 5:
        gen = torch.Generator().manual_seed(7)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(5, 7, generator=gen))], "norm": "Spectral",
                             "scale": 2.0})


def _set(t, opt, gi, key, value):
    if t == 5:
        opt.param_groups[gi][key] = value


def _grad_until(t, opt):
    if t == 0:
        opt.param_groups[0]["params"][1]._grad_until = 5


def _grad_from(t, opt):
    if t == 0:
        opt.param_groups[1]["params"][0]._grad_from = 5


def _move(t, opt):
    if t == 5:
        p = opt.param_groups[0]["params"][2]
        p.data = p.data.clone()


def _norm_kwargs_in_place(t, opt):
    if t == 5:
        opt.param_groups[1]["norm_kwargs"]["normalized"] = True  # (its own dict: groups share the default one)


def _replace_buffer(t, opt):
    if t == 5:
        st = opt.state[opt.param_groups[0]["params"][0]]
        st["momentum_buffer"] = st["momentum_buffer"].clone()


def _clear_state(t, opt):
    if t == 5:
        opt.state.clear()


def _reload(t, opt):
    if t == 5:
        opt.load_state_dict(opt.state_dict())


RECAPTURES = {
    "group added": (_add_group, "param groups"),
    "param loses its gradient": (_grad_until, "lost its gradient"),
    "param gets a gradient": (_grad_from, "has a gradient now"),
    "param memory moved": (_move, "moved"),
    "norm_kwargs changed in place": (_norm_kwargs_in_place, "'norm_kwargs'"),
    "unconstrained changed": (lambda t, o: _set(t, o, 0, "unconstrained", True), "'unconstrained'"),
    "momentum became 1": (lambda t, o: _set(t, o, 2, "momentum", 1.0), "became 1"),
    "momentum left 1": (lambda t, o: _set(t, o, 1, "momentum", 0.5), "'momentum'"),
    "momentum buffer replaced": (_replace_buffer, "'momentum_buffer'"),
    "state cleared": (_clear_state, "optimizer's state"),
    "load_state_dict": (_reload, "load_state_dict"),
}


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("case", list(RECAPTURES))
def test_recaptures_when_the_layout_changes(sim, case, cls):
    mutate, reason = RECAPTURES[case]
    if cls is dk.ScionLight and case in ("momentum buffer replaced", "state cleared"):
        pytest.skip("ScionLight keeps no momentum buffer")
    momenta = {"momentum left 1": dict(momentum=1.0, last_momentum=0.25)}.get(case, {})
    mode = _mode(cls, "inplace")
    _, ref = make(cls, **momenta)
    drive(ref, ref, 14, mode, tensors=True, mutate=mutate)
    _, opt = make(cls, **momenta)
    stepper = CapturedStep(opt)
    drive(opt, stepper, 14, mode, mutate=mutate)
    assert_same(snapshot(opt), snapshot(ref))
    assert stepper.captures == 2, stepper
    assert reason in stepper.last_reason
    assert (stepper.eager_steps, stepper.replays) == (4, 10)


def test_bad_lr_raises_before_the_replay(sim):
    _, opt = make(dk.Scion)
    stepper = CapturedStep(opt, warmup=1)
    drive(opt, stepper, 3, "inplace")
    before = snapshot(opt)
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must be a finite number >= 0.0, got -1.0"):
        stepper.step()
    assert_same(snapshot(opt), before)
    opt.param_groups[1]["lr"] = BASE_LR
    stepper.step()
    assert stepper.captures == 1 and stepper.replays == 3


def test_failed_capture_is_an_error_that_changes_nothing(sim, monkeypatch):
    _, opt = make(dk.Scion)
    stepper = CapturedStep(opt, warmup=1)
    drive(opt, stepper, 1, "inplace")

    def failing(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(SimRunner, "capture", failing)
    before = snapshot(opt)
    for _ in range(2):  # and again, without trying to capture
        with pytest.raises(RuntimeError, match="capturing Scion.step\\(\\) in a CUDA graph failed: RuntimeError: "
                                               "operation not permitted"):
            stepper.step()
        assert_same(snapshot(opt), before)
    monkeypatch.undo()
    monkeypatch.setattr(capture, "_make_runner", lambda device, o: SimRunner(device, o))
    stepper.invalidate()
    drive(opt, stepper, 3, "inplace", start=1)
    assert stepper.captures == 1


def test_state_created_while_capturing(sim):
    """Optimizer state cleared after the warm-up: the capture would create the buffers in the graph; that step
    runs eagerly instead, the next one captures."""
    def clear(t, opt):
        if t == 2:
            opt.state.clear()
    _, ref = make(dk.Scion)
    drive(ref, ref, 8, "inplace", tensors=True, mutate=clear)
    _, opt = make(dk.Scion)
    stepper = CapturedStep(opt)
    drive(opt, stepper, 8, "inplace", mutate=clear)
    assert_same(snapshot(opt), snapshot(ref))
    assert (stepper.eager_steps, stepper.captures, stepper.replays) == (3, 1, 5)


def test_state_created_on_every_step_is_an_error(sim):
    class Counting(dk.Scion):
        def step(self, closure=None):
            for p in all_params(self):
                self.state[p]["calls"] = torch.zeros(())
            return super().step(closure)
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    opt = Counting([p], lr=0.1, momentum=0.5, nonfinite="ignore")
    stepper = CapturedStep(opt, warmup=1)
    p.grad = torch.ones_like(p)
    stepper.step()
    stepper.step()  # capture creates state: restored, this step eager
    assert stepper.captures == 0 and stepper.eager_steps == 2
    with pytest.raises(RuntimeError, match="creates or replaces optimizer state on every step"):
        stepper.step()


def test_many_recaptures_warn_once(sim):
    _, opt = make(dk.Scion)
    stepper = CapturedStep(opt, warmup=1)
    with pytest.warns(UserWarning, match="captured the step 8 times") as rec:
        for t in range(2 * capture.WARN_AFTER_CAPTURES + 4):
            feed(opt, t, "inplace")
            stepper.step()
            if t % 2:
                stepper.invalidate()
    assert len([w for w in rec if "captured the step" in str(w.message)]) == 1


def test_optimizer_load_state_dict_drops_the_graph(sim):
    """Loading into the optimizer itself (not through CapturedStep) is seen too (a post-load hook)."""
    _, opt = make(dk.Scion)
    stepper = CapturedStep(opt, warmup=1)
    drive(opt, stepper, 3, "inplace")
    assert stepper.captured
    opt.load_state_dict(opt.state_dict())
    assert not stepper.captured and "load_state_dict" in stepper.last_reason
    stepper.load_state_dict(stepper.state_dict())
    assert not stepper.captured


def test_no_gradients_nothing_captured(sim):
    _, opt = make(dk.Scion)
    stepper = CapturedStep(opt)
    before = snapshot(opt)
    stepper.step()
    assert_same(snapshot(opt), before)
    assert stepper.captures == 0 and stepper.eager_steps == 1


def test_optimizer_settings_are_part_of_the_graph(sim):
    _, opt = make(dk.Scion)
    stepper = CapturedStep(opt, warmup=1)
    drive(opt, stepper, 3, "inplace")
    opt.backend = "torch"
    drive(opt, stepper, 6, "inplace", start=3)
    assert stepper.captures == 2 and "backend or nonfinite" in stepper.last_reason
    opt.nonfinite = "raise"
    feed(opt, 6, "inplace")
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        stepper.step()


def test_passthrough(sim):
    _, opt = make(dk.ScionLight)
    stepper = CapturedStep(opt)
    assert stepper.param_groups is opt.param_groups and stepper.state is opt.state
    feed(opt, 0, "inplace")
    stepper.zero_grad()
    assert all(p.grad is not None and not p.grad.any() for p in all_params(opt))
    assert "CapturedStep(ScionLight, warmup=2" in repr(stepper)


# -- on a GPU ---------------------------------------------------------------------------------------


def _gpu_runs(cls, mode, steps, mutate=None, warmup=2, scheduler=False):
    """(captured optimizer, CapturedStep, eager reference with device-tensor hyper-parameters)."""
    _, ref = make(cls, "cuda")
    drive(ref, ref, steps, mode, tensors=True, mutate=mutate)
    _, opt = make(cls, "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_at(t) / BASE_LR) if scheduler else None
    stepper = CapturedStep(opt, warmup=warmup)
    drive(opt, stepper, steps, mode, mutate=mutate, sched=sched)
    torch.cuda.synchronize()
    return opt, stepper, ref


@pytest.mark.gpu
@pytest.mark.parametrize("cls", CLASSES)
def test_gpu_50_replays_equal_50_eager_steps(cls):
    opt, stepper, ref = _gpu_runs(cls, _mode(cls, "inplace"), 52, scheduler=True)
    assert (stepper.eager_steps, stepper.captures, stepper.replays) == (2, 1, 50)
    assert opt.param_groups[0]["lr"] == lr_at(52)
    assert_same(snapshot(opt), snapshot(ref))


@pytest.mark.gpu
def test_gpu_replays_within_the_rule_of_float_eager_steps():
    """Against the plain eager step with float hyper-parameters, by the suite's rule (fp64 run as the exact
    answer; fp32 Newton-Schulz so that the comparison is about the step, not bf16)."""
    def build(dtype, ns):
        _, opt = make(dk.Scion, "cuda", dtype)
        opt.param_groups[0]["norm_kwargs"] = {"dtype": ns}
        return opt
    opt, plain = build(torch.float32, "float32"), build(torch.float32, "float32")
    exact = build(torch.float64, "float64")
    stepper = CapturedStep(opt)
    drive(opt, stepper, 52, "inplace")
    drive(plain, plain, 52, "inplace")
    drive(exact, exact, 52, "inplace")
    assert stepper.replays == 50
    for i, (p, q, e) in enumerate(zip(all_params(opt), all_params(plain), all_params(exact))):
        assert_close(p.detach(), e.detach(), q.detach(), torch.float32, f"param {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("cls", CLASSES)
def test_gpu_recapture_when_a_group_is_added(cls):
    opt, stepper, ref = _gpu_runs(cls, _mode(cls, "inplace"), 30, mutate=_add_group)
    assert stepper.captures == 2 and "param groups" in stepper.last_reason
    assert_same(snapshot(opt), snapshot(ref))


@pytest.mark.gpu
@pytest.mark.parametrize("cls", CLASSES)
def test_gpu_new_gradient_tensors(cls):
    opt, stepper, ref = _gpu_runs(cls, "new", 20)
    assert stepper.captures == 1 and stepper.grad_copies == 17 * len(SHAPES)
    assert_same(snapshot(opt), snapshot(ref))


@pytest.mark.gpu
def test_gpu_replay_does_not_sync():
    _, opt = make(dk.Scion, "cuda")
    stepper = CapturedStep(opt, warmup=1)
    drive(opt, stepper, 3, "new")
    params = all_params(opt)
    grads = {t: [grad_of(t, k, p) for k, p in enumerate(params)] for t in range(3, 13)}  # (copies to the GPU sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(3, 13):  # a schedule and new gradient tensors: fills and copies, no sync
            set_lr(opt, t)
            for p, g in zip(params, grads[t]):
                p.grad = g.clone()
            stepper.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert stepper.captures == 1 and stepper.replays == 12


@pytest.mark.gpu
def test_gpu_setup_errors():
    p = torch.nn.Parameter(torch.randn(4, 4, device="cuda"))
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        CapturedStep(dk.Scion([p], lr=0.1))
    q = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"every param on one CUDA device, got params on \['cpu', 'cuda:0'\]"):
        CapturedStep(dk.Scion([p, q], lr=0.1, nonfinite="ignore"))
