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

import torch

from . import _backend, distributed
from ._validate import real_tensor
from .engine import NONFINITE, Engine, averages, check_hyper, local, param_name, param_where, step_local
from .lmo import make_norm

GROUP_KEYS = ("params", "lr", "momentum", "norm", "norm_kwargs", "scale", "unconstrained")  # a Scion group's own keys
STATE_TENSORS = {"momentum_buffer", "grad_state"}  # per-param state: Scion's buffer, ScionLight's carried grad


def _check_hyper(group: dict):
    """Validate a group's hyper-parameters; return its norm."""
    check_hyper(group)
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
        self.engine = Engine(self, self._light)
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
                where = param_where(names, len(self.param_groups), i)
                real_tensor(p, where)
                norm.check(p.shape, where)
                if self.backend != "auto":  # a forced backend that cannot run these params fails now, not at step 1
                    local_p = local([p.detach()])[0]
                    norm.resolve(p.shape).check_backend(self.backend, p.shape, local_p, local_p, where)
        super().add_param_group({**param_group, "params": params, "norm_kwargs": merged["norm_kwargs"]})

    # -- step -----------------------------------------------------------------

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
                gi, i, _ = flat[k]
                return param_name(self.param_groups[gi], gi, i)
            self.comm_stats = distributed.step(self.engine, [p for _, _, p in flat], name, self.process_group, err)
            return loss
        step_local(self.engine, self.engine.plan())
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
                self._check_saved(state[key], key, p, param_name(groups[gi], gi, i))
        super().load_state_dict(state_dict)
        self.engine.forget()

    def __setstate__(self, state):
        super().__setstate__(state)
        self.engine = Engine(self, self._light)

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

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad, which also wipes ScionLight's momentum: warns (once) when it drops one, i.e. a
        group has momentum != 1 and one of its params carries a gradient (Lightning zeroes every step unless
        the LightningModule overrides ``optimizer_zero_grad``). ``model.zero_grad()`` goes unseen."""
        if not getattr(self, "_warned_zero_grad", False) and any(
                averages(g["momentum"]) and any(p.grad is not None for p in g["params"]) for g in self.param_groups):
            self._warned_zero_grad = True
            warnings.warn("ScionLight.zero_grad() wipes the momentum that ScionLight keeps in p.grad (momentum != 1): "
                          "do not zero gradients between ScionLight steps (in Lightning: override the "
                          "LightningModule's optimizer_zero_grad and zero_grad to do nothing), or use Scion",
                          UserWarning, stacklevel=2)
        super().zero_grad(set_to_none=set_to_none)

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
