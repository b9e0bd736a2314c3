"""The step engine: a plan of the step, built once per configuration, and the executor that runs it.

    plan      which params step (those with a gradient), with which concrete norm, in which part:
              params of one group sharing one concrete norm (Newton-Schulz norms: and one shape), so
              that a part is one fused launch or one batched Newton-Schulz call. Built from the
              param groups and cached on their configuration; the gradients are checked each step.
    execute   per part, on this rank's tensors:
                fused (kind "sign", "line"):  one ``fused_update`` (momentum, LMO, decay, write)
                Newton-Schulz (kind None):    momentum into the part's contiguous (b, m, n) batch,
                                              NS on that batch as it is, one ``apply_update`` pass
                                              p = p (1 - lr) - lr scale alpha X
              The distributed executor (``distributed.step``) runs the same parts, using
              ``directions`` and ``apply`` around its communication.

Hyper-parameters (lr, momentum, scale) may be numbers or 0-d tensors; a tensor momentum always keeps
a buffer (its value is not read on the host), so a step over tensors never syncs.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ._finite import finite_mask
from ._validate import flag, hyper, like
from .lmo import Norm, make_norm
from .ops.fused_update import apply_update, fused_update, momentum_

NONFINITE = ("raise", "skip", "ignore")


def local(ts):
    """Local tensors (the shard of a DTensor, the tensor itself otherwise); None stays None."""
    if ts is None:
        return None
    return [t.to_local() if hasattr(t, "to_local") else t for t in ts]


def param_where(names, gi: int, i: int) -> str:
    """A param's name (from a group's ``param_names``), or where it sits: param_groups[gi]['params'][i]."""
    return repr(names[i]) if names else f"param_groups[{gi}]['params'][{i}]"


def param_name(group: dict, gi: int, i: int) -> str:
    """A param's name or place, and its shape."""
    return f"{param_where(group.get('param_names'), gi, i)} (shape {tuple(group['params'][i].shape)})"


# The hyper-parameters a step reads, with their ranges (momentum is one minus the usual factor: 0.1 means
# 0.9 in torch.optim.SGD terms); each a number or a 0-d tensor.
HYPER_RANGES = {"lr": (0.0, math.inf), "momentum": (0.0, 1.0), "scale": (-math.inf, math.inf)}


def check_hyper(group: dict) -> None:
    """Validate a group's numbers (``HYPER_RANGES``) and its ``unconstrained`` flag."""
    for key, (low, high) in HYPER_RANGES.items():
        hyper(group[key], key, low, high)
    flag(group["unconstrained"], "unconstrained")


def averages(momentum) -> bool:
    """Whether momentum mixes steps (momentum != 1); a tensor's value is not read on the host: always."""
    return isinstance(momentum, torch.Tensor) or momentum != 1


def uses_buffer(momentum, light: bool) -> bool:
    """Whether a step keeps a momentum buffer (Scion; ScionLight keeps its momentum in p.grad)."""
    return not light and averages(momentum)


@dataclass
class Part:
    """Params of one group that share one concrete norm (Newton-Schulz norms: and one shape)."""
    group: dict
    norm: Norm
    params: list
    where: list = field(default_factory=list)  # (gi, i) of each param, to name it in errors

    def grads(self) -> list:
        return [p.grad for p in self.params]

    def alphas(self) -> list[float]:
        """The norm's factor of each param, from its full shape (a DTensor's, not its shard's)."""
        return [self.norm.alpha(p.shape) for p in self.params]


def _frozen(kwargs) -> str:
    return repr(sorted(kwargs.items())) if isinstance(kwargs, dict) else repr(kwargs)


class Engine:
    """Plans and runs Scion steps over an optimizer's param groups and state."""

    def __init__(self, optimizer, light: bool):
        self.opt = optimizer
        self.light = light
        self._norms: dict = {}  # (name, kwargs) -> Norm: built once, not per step
        self._plans: dict = {}  # configuration -> parts
        self._batches: dict = {}  # Newton-Schulz part's params -> (batch, its views)

    @property
    def backend(self) -> str:
        return self.opt.backend

    # -- plan -------------------------------------------------------------------------------------

    def norm_of(self, group: dict) -> Norm:
        """The group's norm, built once (traced by torch.compile, built each trace: a cache would add guards)."""
        if torch.compiler.is_compiling():
            return make_norm(group["norm"], group["norm_kwargs"])
        key = (group["norm"], _frozen(group["norm_kwargs"]))
        if key not in self._norms:
            self._norms[key] = make_norm(group["norm"], group["norm_kwargs"])
        return self._norms[key]

    def plan(self) -> list[Part]:
        """The parts of this step, every gradient checked against its param; modifies nothing."""
        groups = self.opt.param_groups
        for group in groups:
            check_hyper(group)
        if torch.compiler.is_compiling():  # (traced once; a cache lookup would add guards)
            parts = self._build(groups)
        else:
            key = tuple((id(g), g["norm"], _frozen(g["norm_kwargs"]),
                         tuple((id(p), p.grad is not None, tuple(p.shape)) for p in g["params"])) for g in groups)
            parts = self._plans.get(key)
            if parts is None:
                if len(self._plans) > 64:  # (a model whose grads come and go: keep the cache small)
                    self._plans.clear()
                parts = self._plans[key] = self._build(groups)
        for part in parts:
            self._check_grads(part)
        return parts

    def _build(self, groups) -> list[Part]:
        parts = []
        for gi, group in enumerate(groups):
            norm = self.norm_of(group)
            by_key: dict = {}
            seen: dict[int, int] = defaultdict(int)  # a param listed k times steps k times, as in the reference
            for i, p in enumerate(group["params"]):
                if p.grad is None or p.numel() == 0:  # (a zero-size param has nothing to step)
                    continue
                concrete = norm.resolve(p.shape)
                concrete.check(p.shape, param_where(group.get("param_names"), gi, i))
                key = (id(concrete), seen[id(p)], tuple(p.shape) if concrete.kind is None else None)
                seen[id(p)] += 1
                part = by_key.setdefault(key, Part(group, concrete, []))
                part.params.append(p)
                part.where.append((gi, i))
            parts.extend(by_key.values())
        return parts

    def _check_grads(self, part: Part) -> None:
        """Each gradient a dense real tensor of its param's shape and device (and its shard of the param's
        shard); a forced backend able to run it. Errors are worded lazily: this runs every step."""
        groups = self.opt.param_groups
        for p, (gi, i) in zip(part.params, part.where):
            g = p.grad
            name = lambda: param_name(groups[gi], gi, i)  # noqa: E731
            if g.is_sparse:
                raise ValueError(f"Scion does not support sparse gradients: {name()}")
            like(g, p, lambda: f"the gradient of {name()}", "the param")
            if hasattr(p, "to_local"):  # a DTensor: and its local shard, which the sharded route reads
                like(*local([g, p]), lambda: f"this rank's shard of the gradient of {name()}", "the param's shard")
            if self.backend != "auto" and not torch.compiler.is_compiling():  # (the ops check it when compiled)
                part.norm.check_backend(self.backend, p.shape, *local([p, g]), name())

    # -- non-finite gradients ---------------------------------------------------------------------

    def nonfinite_found(self, parts: list[Part]) -> torch.Tensor | None:
        """A 0-d bool tensor (on the grads' device, no sync): does any gradient of ``parts`` have inf or
        nan? None when nonfinite='ignore' or there is nothing to check."""
        if self.opt.nonfinite == "ignore":
            return None
        by_device = defaultdict(list)
        for part in parts:
            for g in local(part.grads()):
                if g.numel():
                    by_device[g.device].append(g)
        if not by_device:
            return None
        found = [~finite_mask(gs).all() for gs in by_device.values()]
        return found[0] if len(found) == 1 else torch.stack([f.cpu() for f in found]).any()

    def nonfinite_verdict(self, found: bool, first_bad, where: str = "") -> bool:
        """The non-finite policy, in one place: True to step. ``first_bad()`` names the first bad
        gradient (called only to raise)."""
        if not found:
            return True
        if self.opt.nonfinite == "skip":
            warnings.warn(f"Scion: non-finite gradient{where}, step skipped{' on every rank' if where else ''} "
                          "(parameters and state unchanged)", RuntimeWarning, stacklevel=4)
            return False
        raise FloatingPointError(f"non-finite gradient in {first_bad()}{where}; no parameter or state was "
                                 f"modified{' on any rank' if where else ''} (nonfinite='skip' skips such steps)")

    def first_nonfinite(self, parts: list[Part]) -> str:
        """(Error path) the name of the first param whose gradient has inf or nan on this rank."""
        groups = self.opt.param_groups
        for part in parts:
            for p, (gi, i) in zip(part.params, part.where):
                if not local([p.grad])[0].isfinite().all():
                    return param_name(groups[gi], gi, i)
        return "no gradient of this rank"

    # -- execute ----------------------------------------------------------------------------------

    def run(self, part: Part) -> None:
        """The whole step of one part on this rank's tensors."""
        if part.norm.kind is None:
            self._run_newton_schulz(part)
            return
        group = part.group
        bufs = self._buffers(part) if uses_buffer(group["momentum"], self.light) else None
        fused_update(local(part.params), local(part.grads()), local(bufs), lmo=part.norm, lr=group["lr"],
                     momentum=group["momentum"], scale=group["scale"], unconstrained=group["unconstrained"],
                     light=self.light, backend=self.backend, shapes=[tuple(p.shape) for p in part.params])

    def directions(self, part: Part) -> list[torch.Tensor]:
        """The local tensors the LMO acts on: the momentum buffers after this step's update, or the grads."""
        return self._directions(part)[0]

    def _directions(self, part: Part):
        """(directions, batch): batch is the (b, *shape) tensor whose views the directions are, or None."""
        momentum = part.group["momentum"]
        grads = local(part.grads())
        if not uses_buffer(momentum, self.light):
            return grads, None
        packed = self._batch(part)
        bufs = list(packed[1]) if packed is not None else local(self._buffers(part))
        momentum_(bufs, grads, momentum)
        return bufs, None if packed is None else packed[0]

    def apply(self, part: Part, updates: list[torch.Tensor], alphas: list[float]) -> None:
        """p = p (1 - lr) [unless unconstrained] - lr scale alpha u on the local tensors, one pass;
        ScionLight then decays p.grad."""
        group = part.group
        apply_update(local(part.params), updates, alphas, lr=group["lr"], scale=group["scale"],
                     unconstrained=group["unconstrained"], backend=self.backend)
        if self.light and averages(group["momentum"]):
            torch._foreach_mul_(local(part.grads()), 1 - group["momentum"])

    def _run_newton_schulz(self, part: Part) -> None:
        """Momentum, batched Newton-Schulz on the part's (b, *local shape) directions (one call per shape of
        block: ``orthogonalise_param``), one apply pass with the alphas of the full shape. A shard that holds
        whole matrices (experts of a Shard(0) param with batch_dims=1) runs here on its own."""
        dirs, G = self._directions(part)  # G: the momentum buffers themselves, when packed (no stack copy)
        if G is None:
            G = dirs[0].unsqueeze(0) if len(dirs) == 1 else torch.stack(dirs)
        X = part.norm.orthogonalise_param(G, backend=self.backend)
        self.apply(part, list(X.unbind(0)), part.alphas())

    # -- momentum buffers -------------------------------------------------------------------------

    def _buffers(self, part: Part) -> list[torch.Tensor]:
        state = self.opt.state
        bufs = []
        for p in part.params:
            if "momentum_buffer" not in state[p]:
                state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
            bufs.append(state[p]["momentum_buffer"])
        return bufs

    def _batch(self, part: Part):
        """(batch, views): the part's momentum buffers as views of one contiguous (b, *shape) tensor, which
        the state holds; packed on first use (and again after load_state_dict replaced the buffers). None
        where buffers cannot share one tensor (line norms' parts, DTensors, mixed gradient dtypes). (A param
        listed twice is in two parts of one param each, which share the same batch.)"""
        params = part.params
        key = tuple(id(p) for p in params)
        state = self.opt.state
        cached = self._batches.get(key)
        if cached is not None and all(state[p].get("momentum_buffer") is v for p, v in zip(params, cached[1])):
            return cached
        grads = part.grads()
        if (part.norm.kind is not None or any(hasattr(p, "to_local") for p in params)
                or len({(g.dtype, g.device) for g in grads}) != 1):
            return None
        for other in [k for k in self._batches if set(k) & set(key)]:  # (a batch these params leave)
            del self._batches[other]
        batch = torch.zeros((len(params), *params[0].shape), dtype=grads[0].dtype, device=grads[0].device)
        views = tuple(batch.unbind(0))
        for p, v in zip(params, views):
            old = state[p].get("momentum_buffer")
            if old is not None:
                v.copy_(old)
            state[p]["momentum_buffer"] = v
        self._batches[key] = (batch, views)
        return batch, views

    def forget(self) -> None:
        """Drop the cached plans and batches (after load_state_dict or a change of the param groups)."""
        self._plans.clear()
        self._batches.clear()


def step_local(engine: Engine, parts: list[Part]) -> None:
    """The single-process step: the non-finite policy, then every part."""
    found = engine.nonfinite_found(parts)
    if found is not None and not engine.nonfinite_verdict(bool(found), lambda: engine.first_nonfinite(parts)):
        return
    for part in parts:
        engine.run(part)

