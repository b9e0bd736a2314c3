"""CapturedStep: a Scion step captured once in a CUDA graph and replayed on every later step.

    opt = dk.Scion(groups, lr=2**-8, momentum=0.1, nonfinite="ignore")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)  # schedules drive opt, not this
    step = dk.CapturedStep(opt)
    for batch in data:
        loss(model, batch).backward()
        step.step()                        # warm-up steps, one capture, then one graph replay per call
        sched.step()
        opt.zero_grad(set_to_none=False)   # keeps the gradients where the graph reads them

How it works. A replay runs the kernels of the captured step on the memory they touched at capture: the
params, their gradients, the optimizer state and three small device tensors per param group that this
class owns, one each for ``lr``, ``momentum`` and ``scale``. The step is captured with those tensors in
the groups (a tensor hyper-parameter is read on the device, so the step neither syncs nor bakes the value
in); right after the capture the groups get back the values the user had put there, floats as a rule.
Before each replay the groups' current values are written into the owned tensors, so a scheduler or
``group["lr"] = x`` keeps working with floats, 0-d CPU tensors or 0-d tensors on the device; a number is
written (one small fill) only when it changed since the last step. ``momentum == 1`` (the number) is the
exception: the optimizer keeps no momentum buffer then, so it is captured as a constant (a change to or
from 1 re-captures).

Gradients. Each param's gradient at capture is the graph's static gradient buffer. Before a replay,
a gradient that is another tensor (after ``zero_grad()``, whose default sets gradients to None, the next
backward allocates new ones) is copied into that buffer, with one multi-tensor copy, and ``p.grad`` is
pointed back at the buffer (so ScionLight's decayed momentum stays in ``p.grad``).
``zero_grad(set_to_none=False)`` keeps the buffers and saves that copy; ScionLight wants no zeroing at all.

Re-capture. Before every replay the captured layout is checked against the optimizer (a Python pass
over the params, no device work): a group added or replaced, a param added, removed or replaced, a
param's memory moved (``p.data = ...``, ``model.to(...)``), a gradient that appeared, vanished or
changed shape or dtype, a state tensor replaced (``load_state_dict``), or a change of any other group key
(``norm``, ``norm_kwargs``, ``unconstrained``, ...) drops the graph: that step and the next ``warmup - 1``
run eagerly, then the step is captured again. ``last_reason`` says why the last graph was dropped.

Requirements (checked, with errors naming the problem): a ``Scion`` or ``ScionLight``, built with
``nonfinite="ignore"`` (the non-finite check is a host sync: it cannot be captured), all params on one
CUDA device, no ``process_group`` and no DTensor params (the distributed step agrees across ranks on
the host), no closure. Params not on a CUDA device (CPU): every step is the eager ``optimizer.step()``,
with a one-time notice. A capture holds a private memory pool of the size of the step's temporaries.
A replay runs no Python: the optimizer's step hooks run at warm-up and capture steps only (device work
they do at capture is replayed with the step).
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch

from ._validate import hyper
from .engine import HYPER_RANGES
from .optim import Scion

LIVE = ("lr", "momentum", "scale")  # the hyper-parameters that a replay reads from tensors
_NOT_READ = ("grad_state",)  # state entries the step does not read (ScionLight's copy of p.grad for state_dict)
WARN_AFTER_CAPTURES = 8  # captures of one CapturedStep after which a re-capture warns (once)


def _make_runner(device: torch.device, optimizer):
    """The graph runner for ``optimizer``'s params on ``device``: a CUDA one, or None (eager fallback).
    (The tests put a CPU stand-in here that replays by running the step on what was captured.)"""
    return _CudaRunner(device) if device.type == "cuda" else None


class _CudaRunner:
    """Warm-up, capture and replay of one CUDA graph. Warm-up steps and the capture run on one side stream
    (as torch.cuda.graphs asks: lazily created state such as library workspaces exists before the capture);
    replays run on the current stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.graph = None

    def warmup(self, fn) -> None:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            fn()
        current.wait_stream(self.stream)

    def capture(self, fn) -> None:
        self.graph = None  # (the old graph's pool is freed before the new capture empties the cache)
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.device(self.device):
            # thread_local: a data loader's pinning thread may keep using CUDA while this thread captures
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                fn()
        current.wait_stream(self.stream)
        self.graph = graph

    def replay(self) -> None:
        self.graph.replay()

    def drop(self) -> None:
        self.graph = None


@dataclass
class _Group:
    """One param group as captured (or as warmed up)."""
    group: dict
    params: tuple
    ptrs: tuple            # each param's data_ptr
    grads: tuple           # each param's gradient (None where it had none): the graph's static buffers
    gptrs: tuple
    live: dict             # key -> the owned 0-d device tensor the step reads
    last: dict             # key -> the number last written into it (None: copied from a tensor)
    others: dict           # every other key (momentum when it is the constant 1) -> its value at capture
    nkeys: int
    states: tuple = ()     # (state dict, key, tensor) of the stepped params' state tensors, after capture


@dataclass
class _Record:
    groups: list
    device: torch.device
    stepped: list = field(default_factory=list)  # params with a gradient
    state: object = None   # the optimizer's state mapping at capture, and its length
    nstate: int = 0
    settings: tuple = ()   # the optimizer's own settings that the step reads (backend, nonfinite)


def _same(a, b) -> bool:
    """Whether a group value is unchanged (tensors by identity: comparing device values would sync)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # (a value without a usable ==)
        return False


def _freeze(v):
    """A copy of a group value that an in-place change of the original (a norm_kwargs dict) cannot reach."""
    if isinstance(v, dict):
        return dict(v)
    if isinstance(v, (list, set)):
        return type(v)(v)
    return v


def _is_one(v) -> bool:
    return not isinstance(v, torch.Tensor) and not isinstance(v, bool) and v == 1


def _value(v, key: str):
    """A number from a group value (a checked float; a CPU tensor is read for free), or the device tensor."""
    v = hyper(v, key, *HYPER_RANGES[key])
    return v if isinstance(v, torch.Tensor) and v.device.type != "cpu" else float(v)


class CapturedStep:
    """Runs ``optimizer.step()`` as a CUDA graph: warm-up steps, one capture, then one replay per call.

    Args:
      optimizer: a ``Scion`` or ``ScionLight`` built with ``nonfinite="ignore"``, its params on one CUDA
        device (on the CPU every step runs eagerly, after a one-time notice).
      warmup: eager steps (on a side stream) before each capture, >= 1: the first creates the momentum
        buffers and compiles or tunes the kernels; the second, by default, runs the path that is captured.

    Each ``step()`` is one optimizer step: eager while warming up, then capture + replay, then replay.
    Schedulers and ``group["lr"] = x`` keep writing into ``optimizer.param_groups`` as usual (floats or
    0-d tensors); each replay reads the values they wrote. Re-captures happen by themselves when the param
    set, a gradient's presence, a param's memory or a group's other keys change (see the module doc).

    Counters: ``captures``, ``replays``, ``eager_steps``, ``grad_copies`` (gradients copied into the
    graph's buffers), and ``last_reason`` (why the last graph was dropped).

    Example::

        opt = dk.Scion([{"params": hidden, "norm": "Spectral", "scale": 50.0},
                        {"params": vectors, "norm": "BiasRMS"}], lr=2**-8, momentum=0.1, nonfinite="ignore")
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2**-6, total_steps=1000, cycle_momentum=False)
        step = dk.CapturedStep(opt)
        for x, y in data:
            F.mse_loss(model(x), y).backward()
            step.step()
            sched.step()
            opt.zero_grad(set_to_none=False)
    """

    def __init__(self, optimizer, *, warmup: int = 2):
        if not isinstance(optimizer, Scion):
            what = "a torch.optim optimizer other than Scion" if isinstance(optimizer, torch.optim.Optimizer) \
                else type(optimizer).__name__
            raise TypeError(f"CapturedStep takes a disco_kernels Scion or ScionLight, got {what} "
                            f"({type(optimizer).__name__})")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (eager steps before each capture: the first creates the "
                             f"momentum buffers, which a capture must not), got {warmup!r}")
        self.optimizer = optimizer
        self.warmup = warmup
        self.captures = self.replays = self.eager_steps = self.grad_copies = 0
        self.last_reason: str | None = None
        self._record: _Record | None = None   # the captured step
        self._pending: _Record | None = None  # the layout being warmed up
        self._warm = 0
        self._runner = None
        self._noticed = False
        self._retry = False  # a capture created optimizer state once: the next one must not
        self._broken: str | None = None
        me = weakref.ref(self)
        self._hook = optimizer.register_load_state_dict_post_hook(
            lambda opt: me() is not None and me().invalidate("load_state_dict replaced the optimizer state"))
        if self._runner_for(self._devices()) is not None:  # CUDA params: a setup that cannot capture fails now
            self._check_capturable()

    def __repr__(self) -> str:
        return (f"CapturedStep({type(self.optimizer).__name__}, warmup={self.warmup}, captured={self.captured}, "
                f"captures={self.captures}, replays={self.replays}, eager_steps={self.eager_steps})")

    # -- pass-through -----------------------------------------------------------------------------

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def captured(self) -> bool:
        """Whether the next step can replay a graph (if nothing changed in between)."""
        return self._record is not None

    def zero_grad(self, set_to_none: bool = False) -> None:
        """The optimizer's zero_grad, by default in place: the gradients stay where the graph reads them."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The optimizer's state_dict (its groups hold the user's values, never this class's tensors)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load into the optimizer; the graph is dropped (the state and the groups are new tensors)."""
        self.optimizer.load_state_dict(state_dict)
        self.invalidate("load_state_dict replaced the optimizer state")

    def invalidate(self, reason: str = "invalidate() was called") -> None:
        """Drop the graph: the next steps warm up and capture again. The checks before each replay see the
        changes listed in the module doc; this is for others (a norm object changed inside, say)."""
        if self._record is not None or self._pending is not None:
            self.last_reason = reason
        self._record = self._pending = None
        self._warm = 0
        self._broken = None
        if self._runner is not None:
            self._runner.drop()

    # -- step -------------------------------------------------------------------------------------

    def step(self, closure=None) -> None:
        """One optimizer step: a graph replay when the captured step still fits, else eager / capture."""
        if closure is not None:
            raise TypeError("CapturedStep.step() takes no closure: a graph cannot capture the forward and "
                            "backward that a closure runs; call backward() before step()")
        record = self._record
        if record is not None:
            reason = self._check(record, feed=True)
            if reason is None:
                self._runner.replay()
                self.replays += 1
                return None
            self._drop(reason)
        self._step_slow()
        return None

    def _step_slow(self) -> None:
        opt = self.optimizer
        runner = self._runner_for(self._devices())
        if runner is None:
            if not self._noticed:
                self._noticed = True
                where = ", ".join(sorted({str(d) for d in self._devices()})) or "nowhere (no params)"
                warnings.warn(f"CapturedStep: the params are on {where}, not on a CUDA device: every step runs "
                              f"eagerly ({type(opt).__name__}.step()), nothing is captured", UserWarning,
                              stacklevel=3)
            self.eager_steps += 1
            opt.step()
            return
        if self._broken is not None:
            raise RuntimeError(self._broken)
        self._check_capturable()
        if not any(p.grad is not None for group in opt.param_groups for p in group["params"]):
            self.eager_steps += 1  # nothing to step, nothing to capture
            opt.step()
            return
        pending = self._pending
        if pending is None or self._check(pending, feed=False) is not None:
            pending = self._pending = self._scan(runner.device)
            self._warm = 0
        if self._warm < self.warmup:
            self._write_hypers(pending)
            runner.warmup(lambda: self._run(pending))
            self._warm += 1
            self.eager_steps += 1
            return
        self._capture(runner)

    def _capture(self, runner) -> None:
        opt = self.optimizer
        record = self._scan(runner.device)
        self._write_hypers(record)
        before = {id(p): (p, dict(opt.state[p]) if p in opt.state else None) for p in record.stepped}
        try:
            runner.capture(lambda: self._run(record))
        except Exception as e:
            self._restore_state(before)
            runner.drop()
            self._pending = None
            self._broken = (f"CapturedStep: capturing {type(opt).__name__}.step() in a CUDA graph failed: "
                            f"{type(e).__name__}: {e}. The step did work that a graph cannot hold (a host "
                            f"synchronisation, or memory that is not a device tensor); no param or state was "
                            f"changed by this step. Run {type(opt).__name__}.step() eagerly, or call invalidate() "
                            f"to try again")
            raise RuntimeError(self._broken) from e
        if self._restore_state(before):  # the step created or replaced state while capturing: not replayable
            runner.drop()
            if self._retry:
                self._broken = (f"CapturedStep: {type(opt).__name__}.step() creates or replaces optimizer state "
                                f"on every step, even after {self.warmup} warm-up steps: it cannot be replayed "
                                f"from a CUDA graph")
                raise RuntimeError(self._broken)
            self._retry = True
            self._pending, self._warm = record, self.warmup  # this step eagerly, the next one captures again
            runner.warmup(lambda: self._run(record))
            self.eager_steps += 1
            return
        self._retry = False
        for g in record.groups:
            states = [opt.state[p] for p, grad in zip(g.params, g.grads) if grad is not None and p in opt.state]
            g.states = tuple((st, k, t) for st in states for k, t in st.items()
                             if isinstance(t, torch.Tensor) and k not in _NOT_READ)
        record.state, record.nstate = opt.state, len(opt.state)
        self._record, self._pending = record, None
        self.captures += 1
        if self.captures == WARN_AFTER_CAPTURES:
            warnings.warn(f"CapturedStep has captured the step {self.captures} times (the last graph was dropped "
                          f"because {self.last_reason}); each capture costs a device synchronisation and "
                          f"{self.warmup} eager steps: keep the param set, the gradients' presence and the "
                          f"group settings fixed between steps", UserWarning, stacklevel=4)
        runner.replay()
        self.replays += 1

    def _drop(self, reason: str) -> None:
        self.last_reason = reason
        self._record = None
        self._runner.drop()

    def _restore_state(self, before: dict) -> bool:
        """Put back the state entries of these params as they were; whether any had changed."""
        state, changed = self.optimizer.state, False
        for p, saved in before.values():
            now = state.get(p)
            if saved is None:
                if now:
                    changed = True
                if p in state:
                    del state[p]
            elif now is None or now.keys() != saved.keys() or any(now[k] is not v for k, v in saved.items()):
                changed = True
                state[p] = saved
        return changed

    # -- what the graph reads ---------------------------------------------------------------------

    def _devices(self) -> set:
        return {p.device for group in self.optimizer.param_groups for p in group["params"]}

    def _runner_for(self, devices: set):
        """The runner for these param devices (made once per device), None to run eagerly."""
        if len(devices) > 1:
            if any(d.type == "cuda" for d in devices):
                raise ValueError(f"CapturedStep needs every param on one CUDA device, got params on "
                                 f"{sorted(str(d) for d in devices)}")
            return None
        if not devices:
            return None
        (device,) = devices
        if self._runner is None or self._runner.device != device:
            if self._runner is not None:
                self._drop(f"the params moved to {device}")
            self._runner = _make_runner(device, self.optimizer)
            self._pending = None
        return self._runner

    def _check_capturable(self) -> None:
        opt = self.optimizer
        name = type(opt).__name__
        if opt.nonfinite != "ignore":
            raise ValueError(f"CapturedStep needs {name}(..., nonfinite='ignore'), got nonfinite={opt.nonfinite!r}: "
                             f"the non-finite gradient check is a host synchronisation, which a CUDA graph cannot "
                             f"capture")
        if getattr(opt, "process_group", None) is not None:
            raise ValueError(f"CapturedStep cannot capture a distributed {name} (process_group is set): its step "
                             f"agrees across ranks on the host; step it eagerly")
        for group in opt.param_groups:
            for p in group["params"]:
                if hasattr(p, "to_local"):
                    raise ValueError(f"CapturedStep cannot capture a step over DTensor params (FSDP2, shape "
                                     f"{tuple(p.shape)}): the distributed step agrees across ranks on the host; "
                                     f"step it eagerly")

    def _scan(self, device: torch.device) -> _Record:
        """The optimizer's layout now, with owned hyper-parameter tensors holding the groups' values."""
        opt = self.optimizer
        stepped = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in stepped) else torch.float32
        groups = []
        for group in opt.param_groups:
            params = tuple(group["params"])
            grads = tuple(p.grad for p in params)
            live, last = {}, {}
            for key in LIVE:
                if key not in group or (key == "momentum" and _is_one(group[key])):
                    continue  # momentum 1: no buffer, a constant of the graph
                v = group[key]
                live[key] = torch.zeros((), dtype=v.dtype if isinstance(v, torch.Tensor) else dtype, device=device)
                last[key] = None
            others = {k: _freeze(v) for k, v in group.items() if k != "params" and k not in live}
            groups.append(_Group(group, params, tuple(p.data_ptr() for p in params), grads,
                                 tuple(None if g is None else g.data_ptr() for g in grads), live, last, others,
                                 len(group)))
        return _Record(groups, device, stepped, settings=(opt.backend, opt.nonfinite))

    def _write_hypers(self, record: _Record) -> None:
        """Write the groups' current lr / momentum / scale into the owned tensors (a number only if it changed)."""
        for g in record.groups:
            group, last = g.group, g.last
            for key, owned in g.live.items():
                v = group[key]
                if v.__class__ is float and v == last[key]:
                    continue  # (the common case: a float that did not change)
                v = _value(v, key)
                if isinstance(v, torch.Tensor):
                    owned.copy_(v)  # (device to device, queued)
                    last[key] = None
                elif v != last[key]:
                    owned.fill_(v)
                    last[key] = v

    def _run(self, record: _Record) -> None:
        """optimizer.step() with the owned tensors in the groups, then the user's values back."""
        saved = []
        try:
            for g in record.groups:
                for key, owned in g.live.items():
                    saved.append((g.group, key, g.group[key]))
                    g.group[key] = owned
            self.optimizer.step()
        finally:
            for group, key, v in saved:
                group[key] = v

    def _check(self, record: _Record, feed: bool) -> str | None:
        """Why the recorded layout no longer fits the optimizer (None: it fits). With ``feed``, and when it
        fits, gradients that are new tensors are copied into the graph's buffers and the hyper-parameters
        written: the graph can be replayed."""
        opt = self.optimizer
        groups = opt.param_groups
        if len(groups) != len(record.groups):
            return f"the optimizer has {len(groups)} param groups, the graph {len(record.groups)}"
        if (opt.backend, opt.nonfinite) != record.settings:
            return f"the optimizer's backend or nonfinite changed (was {record.settings})"
        if record.state is not None and (opt.state is not record.state or len(opt.state) != record.nstate):
            return "the optimizer's state was replaced, or entries were added or removed"
        dst, src, rebind = [], [], []
        for gi, (group, g) in enumerate(zip(groups, record.groups)):
            if group is not g.group:
                return f"param_groups[{gi}] was replaced"
            params = group["params"]
            if len(params) != len(g.params):
                return f"param_groups[{gi}] has {len(params)} params, the graph {len(g.params)}"
            if len(group) != g.nkeys:
                return f"param_groups[{gi}] has keys {sorted(group)}, the graph {sorted(g.others) + sorted(g.live)}"
            for i, (p, p0, ptr, g0, gptr) in enumerate(zip(params, g.params, g.ptrs, g.grads, g.gptrs)):
                if p is not p0:
                    return f"param_groups[{gi}]['params'][{i}] is another tensor"
                if p.data_ptr() != ptr:
                    return f"the memory of param_groups[{gi}]['params'][{i}] moved"
                grad = p.grad
                if grad is g0:
                    if g0 is not None and grad.data_ptr() != gptr:
                        return f"the gradient memory of param_groups[{gi}]['params'][{i}] moved"
                    continue
                if grad is None or g0 is None:
                    return (f"param_groups[{gi}]['params'][{i}] " + ("lost its gradient" if grad is None
                                                                    else "has a gradient now"))
                if grad.shape != g0.shape or grad.dtype != g0.dtype or grad.device != g0.device:
                    return f"the gradient of param_groups[{gi}]['params'][{i}] changed shape, dtype or device"
                if feed and not (grad.data_ptr() == gptr and grad.stride() == g0.stride()):
                    dst.append(g0)
                    src.append(grad)
                    rebind.append((p, g0))
            for st, key, t in g.states:
                if st.get(key) is not t:
                    return f"the optimizer state {key!r} of a param of param_groups[{gi}] was replaced"
            for key, v0 in g.others.items():
                if not _same(group.get(key, _same), v0):
                    return f"param_groups[{gi}][{key!r}] changed"
            if "momentum" in g.live and _is_one(group["momentum"]):
                return f"param_groups[{gi}]['momentum'] became 1 (no momentum buffer)"
        if feed:
            self._write_hypers(record)  # (first: a bad value raises before anything is written)
            if dst:
                torch._foreach_copy_(dst, src)
                for p, g0 in rebind:
                    p.grad = g0
                self.grad_copies += len(dst)
        return None
