"""Scion and ScionLight: drop-in replacements for the reference optimizers.

Per parameter p with gradient g, in its group's (lr, momentum, norm, scale, unconstrained):

    buf = (1 - momentum) buf + momentum g      (no buffer when momentum == 1)
    u = scale * lmo(buf)
    p = p (1 - lr)  [unless unconstrained];  p = p - lr u

ScionLight keeps the momentum in p.grad instead: u = scale * lmo(p.grad), then
p.grad *= (1 - momentum), so the next backward adds the new gradient to it.

Beyond the reference: ``step(closure)``, params without grads skipped,
same-shaped matrices orthogonalised in one batched call, fused kernels for the
element/row/column-wise norms, validation before anything is modified, a
non-finite-gradient policy, and state_dict round trips that resume bit-identically.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch

from . import _backend, distributed
from ._finite import finite_mask
from ._validate import flag, like, number, real_tensor
from .distributed import local
from .lmo import Norm, make_norm
from .ops import fused_update
from .ops.fused_update import apply_update_, momentum_

NONFINITE = ("raise", "skip", "ignore")
GROUP_KEYS = ("params", "lr", "momentum", "norm", "norm_kwargs", "scale", "unconstrained")  # a Scion group's own keys
STATE_TENSORS = {"momentum_buffer", "grad_state"}  # per-param state: Scion's buffer, ScionLight's carried grad


@dataclass
class _Part:
    """The params of one group that share one concrete norm."""
    group: dict
    norm: Norm
    params: list
    grads: list


def _param_where(names, gi: int, i: int) -> str:
    """A param's name, or where it sits: param_groups[gi]['params'][i]."""
    return repr(names[i]) if names else f"param_groups[{gi}]['params'][{i}]"


def _param_name(group: dict, i: int, p: torch.Tensor, gi: int) -> str:
    return f"{_param_where(group.get('param_names'), gi, i)} (shape {tuple(p.shape)})"


def _check_hyper(group: dict) -> Norm:
    """Validate a group's hyper-parameters; return its norm. (Numbers are checked eagerly: traced by
    torch.compile, one that a schedule changes is symbolic.)"""
    number(group["lr"], "lr", 0.0)
    number(group["momentum"], "momentum", 0.0, 1.0)  # (one minus the usual factor: 0.1 means 0.9 in SGD terms)
    number(group["scale"], "scale")
    flag(group["unconstrained"], "unconstrained")
    return make_norm(group["norm"], group["norm_kwargs"])


class Scion(torch.optim.Optimizer):
    """Scion (Pethick et al., 2025): steepest descent in a chosen norm per param group.

    Args: as the reference, ``params``, ``lr``, ``momentum`` (one minus the usual
    factor: 0.1 means 0.9 in torch.optim.SGD terms), ``norm`` (a key of
    ``norm_dict``), ``norm_kwargs``, ``scale``, ``unconstrained``.
    Keyword-only extras:
      backend: "auto" | "torch" | "triton" | "cuda", the kernels to use.
      nonfinite: "raise" (default) raises before any parameter or state is
        modified when a gradient has inf/nan; "skip" warns and skips the whole
        step; "ignore" does no check (saves one host sync per step).
      process_group: None, "default" (the world group) or a ProcessGroup over
        which replicated params (DDP) are sharded: each Newton-Schulz matrix
        gets one owner rank that computes its LMO and broadcasts it. DTensor
        params (FSDP2 ``fully_shard``) are sharded over their mesh without it.
        Every rank then agrees on failures and non-finite gradients before any
        update; ``comm_stats`` holds the last step's ``distributed.Stats``.

    Example::

        opt = Scion([{"params": hidden, "norm": "Spectral", "scale": 50.0},
                     {"params": [lm_head.weight], "norm": "Sign", "scale": 3000.0}],
                    lr=2**-12, momentum=0.1)
        opt.init()
        loss.backward(); opt.step(); opt.zero_grad()
    """

    _light = False

    def __init__(self, params, lr=1e-3, momentum=1.0, norm: str = "Auto", norm_kwargs: dict | None = None,
                 scale=1.0, unconstrained=False, *, backend: str = "auto", nonfinite: str = "raise",
                 process_group=None):
        _backend.check_backend(backend)
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        self.backend = backend
        self.nonfinite = nonfinite
        self.process_group = distributed.resolve_group(process_group)
        self.comm_stats = distributed.Stats()
        defaults = dict(lr=lr, momentum=momentum, scale=scale, unconstrained=unconstrained, norm=norm,
                        norm_kwargs={} if norm_kwargs is None else norm_kwargs)
        _check_hyper(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group after checking its hyper-parameters and each param's rank against its norm."""
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        if merged["norm_kwargs"] is None:
            merged["norm_kwargs"] = {}
        norm = _check_hyper(merged)
        if merged["momentum"] == 0:
            warnings.warn("momentum=0 keeps the momentum buffer at zero, so no gradient reaches the weights "
                          "(momentum is one minus the usual factor: 0.1 means 0.9 in torch.optim.SGD terms)",
                          UserWarning, stacklevel=3)
        params = param_group["params"]
        if not isinstance(params, set):  # torch rejects a set; a generator can be read only once
            params = [params] if isinstance(params, torch.Tensor) else list(params)
        if params and isinstance(next(iter(params)), tuple):  # named parameters
            names = [n for n, _ in params]
        else:
            names = param_group.get("param_names")
        for i, p in enumerate(params):
            p = p[1] if isinstance(p, tuple) else p
            if isinstance(p, torch.Tensor):
                where = _param_where(names, len(self.param_groups), i)
                real_tensor(p, where)
                norm.check(p.shape, where)
                if self.backend != "auto":  # a forced backend that cannot run these params fails now, not at step 1
                    local_p = local([p.detach()])[0]
                    norm.resolve(p.shape).check_backend(self.backend, p.shape, local_p, local_p, where)
        super().add_param_group({**param_group, "params": params, "norm_kwargs": merged["norm_kwargs"]})

    # -- step -----------------------------------------------------------------

    def _plan(self) -> list[_Part]:
        """Group every param with a grad by (group, concrete norm); validates, modifies nothing."""
        parts = []
        for gi, group in enumerate(self.param_groups):
            norm = _check_hyper(group)
            by_norm: dict[tuple[int, int], _Part] = {}
            seen: dict[int, int] = defaultdict(int)  # a param listed k times steps k times, as in the reference
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None or p.numel() == 0:  # (a zero-size param has nothing to step)
                    continue
                if g.is_sparse:
                    raise ValueError(f"Scion does not support sparse gradients: {_param_name(group, i, p, gi)}")
                like(g, p, lambda: f"the gradient of {_param_name(group, i, p, gi)}", "the param")  # (worded lazily)
                if isinstance(p, distributed.DTensor):  # and its local shard, which the sharded route reads
                    like(*local([g, p]), lambda: f"this rank's shard of the gradient of {_param_name(group, i, p, gi)}",
                         "the param's shard")
                concrete = norm.resolve(p.shape)
                concrete.check(p.shape, _param_where(group.get("param_names"), gi, i))
                if self.backend != "auto" and not torch.compiler.is_compiling():  # (the ops check it when compiled)
                    concrete.check_backend(self.backend, p.shape, *local([p, g]), _param_name(group, i, p, gi))
                part = by_norm.setdefault((id(concrete), seen[id(p)]), _Part(group, concrete, [], []))
                seen[id(p)] += 1
                part.params.append(p)
                part.grads.append(g)
            parts.extend(by_norm.values())
        return parts

    def _all_finite(self, parts: list[_Part]) -> bool:
        if self.nonfinite == "ignore":
            return True
        by_device = defaultdict(list)
        for part in parts:
            for g in part.grads:
                if g.numel():
                    by_device[g.device].append(g)
        if all(finite_mask(gs).all().item() for gs in by_device.values()):
            return True
        if self.nonfinite == "skip":
            warnings.warn("Scion: non-finite gradient, step skipped (parameters and state unchanged)", RuntimeWarning,
                          stacklevel=3)
            return False
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is not None and not p.grad.isfinite().all():
                    raise FloatingPointError(f"non-finite gradient in {_param_name(group, i, p, gi)}; "
                                             "no parameter or state was modified (nonfinite='skip' skips such steps)")
        return True

    def _buffers(self, params, grads) -> list[torch.Tensor]:
        bufs = []
        for p, g in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            bufs.append(state["momentum_buffer"])
        return bufs

    def _directions(self, part: _Part) -> list[torch.Tensor]:
        """The local tensors the LMO acts on: momentum buffers after this step's update, or the grads."""
        if part.group["momentum"] != 1 and not self._light:
            bufs = local(self._buffers(part.params, part.grads))
            momentum_(bufs, local(part.grads), part.group["momentum"])
            return bufs
        return local(part.grads)

    def _apply(self, part: _Part, updates: list[torch.Tensor]) -> None:
        """p = p (1 - lr) - lr * scale * u on the local tensors; ScionLight then decays p.grad."""
        group = part.group
        lr = group["lr"].item() if isinstance(group["lr"], torch.Tensor) else group["lr"]
        apply_update_(local(part.params), updates, lr, group["scale"], group["unconstrained"])
        if self._light and group["momentum"] != 1:
            torch._foreach_mul_(local(part.grads), 1 - group["momentum"])

    def _run(self, part: _Part) -> None:
        """The step of one part on this rank's tensors alone."""
        group, norm, params, grads = part.group, part.norm, part.params, part.grads
        if norm.fused is None:
            self._apply(part, norm.lmo_many(self._directions(part), backend=self.backend))
            return
        lr, momentum = group["lr"], group["momentum"]
        lr = lr.item() if isinstance(lr, torch.Tensor) else lr
        bufs = self._buffers(params, grads) if momentum != 1 and not self._light else None
        fused_update(local(params), local(grads), local(bufs), lmo=norm.fused, lr=lr, momentum=momentum,
                     scale=group["scale"], unconstrained=group["unconstrained"], light=self._light,
                     backend=self.backend, **norm.flags())

    def _flat_params(self) -> list[tuple[int, int, torch.Tensor]]:
        return [(gi, i, p) for gi, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])]

    def _is_distributed(self, flat) -> bool:
        return self.process_group is not None or any(isinstance(p, distributed.DTensor) for _, _, p in flat)

    @torch.no_grad()
    def step(self, closure=None):
        """One Scion step; returns ``closure()``'s loss when a closure is given."""
        loss, err = None, None
        flat = self._flat_params()
        spread = self._is_distributed(flat)
        if closure is not None:
            with torch.enable_grad():
                try:
                    loss = closure()
                except Exception as e:  # distributed: raised on every rank by the agreement, none left waiting
                    if not spread:
                        raise
                    err = e
        if spread:
            def name(k):
                gi, i, p = flat[k]
                return _param_name(self.param_groups[gi], i, p, gi)
            self.comm_stats = distributed.step(self, [p for _, _, p in flat], name, err)
            return loss
        parts = self._plan()
        if not self._all_finite(parts):
            return loss
        for part in parts:
            self._run(part)
        return loss

    @torch.no_grad()
    def init(self) -> None:
        """Initialise every param as its group's norm prescribes, times the group's scale."""
        for group in self.param_groups:
            norm = make_norm(group["norm"], group["norm_kwargs"])
            for p in group["params"]:
                if p.numel() == 0:
                    continue
                if isinstance(p, distributed.DTensor):  # the same full init on every rank, then its shard
                    full = torch.empty(p.shape, dtype=p.dtype, device=local([p])[0].device)
                    norm.resolve(p.shape).init(full)
                    distributed.set_from_full(p, full.mul_(group["scale"]))
                    continue
                norm.resolve(p.shape).init(p)
                p.mul_(group["scale"])

    # -- state ----------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load after checking that the saved groups and state fit these params (structure, group keys and
        values, buffer shapes and finiteness); on error nothing changes."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
                or not isinstance(state_dict.get("param_groups"), list):
            raise ValueError("state_dict must be a dict with a 'state' dict and a 'param_groups' list (as "
                             "Scion.state_dict() returns)")
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(saved_groups) != len(groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(groups)}")
        params = {}
        for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
            missing = [k for k in GROUP_KEYS if not isinstance(saved, dict) or k not in saved]
            if missing:
                raise ValueError(f"state_dict param_groups[{gi}] lacks {missing} (not a Scion state dict: a "
                                 "torch.optim one has no norm or scale)")
            if not isinstance(saved["params"], list) or len(saved["params"]) != len(group["params"]):
                got = len(saved["params"]) if isinstance(saved["params"], list) else type(saved["params"]).__name__
                raise ValueError(f"param_groups[{gi}] has {len(group['params'])} params, the state_dict's has {got}")
            _check_hyper(saved)
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                params[pid] = (gi, i, p)
        for pid, state in state_dict["state"].items():
            if pid not in params:
                raise ValueError(f"state_dict has state for param id {pid!r}, which no param group lists")
            gi, i, p = params[pid]
            if not isinstance(state, dict):
                raise ValueError(f"state_dict state[{pid!r}] must be a dict, got {type(state).__name__}")
            for key in STATE_TENSORS & set(state):
                self._check_saved(state[key], key, p, _param_name(groups[gi], i, p, gi))
        super().load_state_dict(state_dict)

    def _check_saved(self, value, key: str, p: torch.Tensor, where: str) -> None:
        """A saved momentum of ``p``: a real tensor of p's shape, finite unless nonfinite='ignore'."""
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.shape != p.shape:
            got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"state_dict state {key!r} of {where} must be a floating-point tensor of shape "
                             f"{tuple(p.shape)}, got {got}")
        if self.nonfinite != "ignore" and not local([value])[0].isfinite().all():
            raise FloatingPointError(f"state_dict state {key!r} of {where} has inf or nan entries: it would poison "
                                     "the weights (nonfinite='ignore' loads it anyway)")


class ScionLight(Scion):
    """Memory-light Scion: the momentum lives in p.grad (do not zero grads between steps).

    After each step p.grad is scaled by (1 - momentum) so that the next backward
    accumulates the new gradient into it. p.grad travels in the state_dict (as
    ``grad_state``) so that a resumed run continues exactly.
    """

    _light = True

    def __init__(self, params, lr=1e-3, momentum=1.0, norm: str = "Auto", norm_kwargs: dict | None = None,
                 scale=1.0, unconstrained=False, *, backend: str = "auto", nonfinite: str = "raise",
                 process_group=None):
        super().__init__(params, lr, momentum, norm, norm_kwargs, scale, unconstrained, backend=backend,
                         nonfinite=nonfinite, process_group=process_group)
        self._store_grads_in_state()
        self.register_state_dict_pre_hook(type(self)._store_grads_in_state)
        self.register_load_state_dict_post_hook(type(self)._load_grads_from_state)

    def __getstate__(self):
        self._store_grads_in_state()
        return super().__getstate__()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._load_grads_from_state()

    def _store_grads_in_state(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["grad_state"] = p.grad
                elif p in self.state:  # the momentum was dropped (p.grad = None): no stale one to resume from
                    self.state[p].pop("grad_state", None)
                    if not self.state[p]:
                        del self.state[p]

    def _load_grads_from_state(self) -> None:
        for p, state in self.state.items():
            p.grad = state.get("grad_state")
