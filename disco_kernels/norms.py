"""Operator norms of weights W stored (d_out, d_in), as nn.Linear stores them, and
``NormMonitor``, which tracks them per layer during training.

    rms_to_rms(W)       = sqrt(d_in / d_out) · σ_max(W)          (hidden layers)
    rms_to_inf(W)       = sqrt(d_in) · max_i ||W[i, :]||_2        (output layer; the paper's invariant)
    l1_to_rms(W)        = max_j ||W[:, j]||_2 / sqrt(d_out)       (input layer: pass the embedding transposed)
    supremum(W)         = max |W_ij|
    condition_number(W) = σ_max / σ_min over min(d_out, d_in) singular values

Exact values are float64 tensors of shape W.shape[:-2]; only ``rms_to_rms`` and
``condition_number`` need singular values. ``rms_to_rms(W, exact=False)`` estimates
σ_max by power iteration (``ops.power_iteration``, the fast kernels on GPU).
"""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from . import reference
from .ops import power_iteration
from .param_groups import assign
from .scaling import OUTPUT_NORM_LOG2


def _full(W: torch.Tensor) -> torch.Tensor:
    """W itself, or the whole matrix of a DTensor (FSDP2): an all-gather that every rank must call."""
    return W.full_tensor() if isinstance(W, DTensor) else W


def _check(W, name: str = "W") -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if not W.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {W.dtype}")
    if W.dim() < 2 or W.size(-1) == 0 or W.size(-2) == 0:
        raise ValueError(f"{name} must be a non-empty (d_out, d_in) or batched (..., d_out, d_in) matrix, "
                         f"got shape {tuple(W.shape)}")
    return W.detach()


# The norm each role is measured in (the geometry of its LMO): "spectral" is rms_to_rms of ``oriented``.
ROLE_NORM = {"input": "l1_to_rms", "bias_table": "l1_to_rms", "output": "rms_to_inf", "position": "rms_to_inf",
             "hidden": "rms_to_rms", "conv": "rms_to_rms", "expert": "rms_to_rms"}


def oriented(W: torch.Tensor, role: str, norm_kwargs: dict) -> torch.Tensor:
    """W as (b, d_out, d_in), as its role's norm reads it: a conv kernel reshaped (c_out, -1), an expert
    weight's matrices, a weight stored (d_in, d_out) (``transpose``) turned, an embedding (vocab, d) turned
    (its input geometry reads columns of Wᵀ)."""
    M = W.reshape(1, W.size(0), -1) if role == "conv" or W.dim() == 2 else W.reshape(-1, *W.shape[-2:])
    turn = bool(norm_kwargs.get("transpose")) != (role == "input")
    return M.mT if turn else M


def rms_to_rms(W: torch.Tensor, *, exact: bool = True, iters: int = 20) -> torch.Tensor:
    """sqrt(d_in / d_out) · σ_max(W): fp64 SVD, or ``iters`` power iterations when not ``exact``."""
    W = _check(W)
    if exact:
        return reference.rms_to_rms(W)
    d_out, d_in = W.shape[-2:]
    flat = W.reshape(-1, d_out, d_in) if W.dim() > 2 else W
    sigma, _ = power_iteration(flat, iters=iters)
    return math.sqrt(d_in / d_out) * sigma.double().reshape(W.shape[:-2])


def rms_to_inf(W: torch.Tensor) -> torch.Tensor:
    """sqrt(d_in) · max_i ||W[i, :]||_2: the largest ||W x||_∞ over inputs x of RMS 1."""
    return reference.rms_to_inf(_check(W))


def l1_to_rms(W: torch.Tensor) -> torch.Tensor:
    """max_j ||W[:, j]||_2 / sqrt(d_out): the largest RMS of W x over inputs x with ||x||_1 = 1."""
    return reference.l1_to_rms(_check(W))


def supremum(W: torch.Tensor) -> torch.Tensor:
    """max |W_ij|."""
    return reference.supremum(_check(W))


def condition_number(W: torch.Tensor) -> torch.Tensor:
    """σ_max / σ_min over the min(d_out, d_in) singular values, in fp64 (inf when singular)."""
    return reference.condition_number(_check(W))


class NormMonitor:
    """Per-layer operator norms every ``every`` steps, cheap enough to leave on.

    Per role (see ``param_groups.classify``), on the weight after the step and, with
    ``updates=True``, on its change ΔW (= −lr·u for unconstrained Scion; this keeps a
    copy of the monitored weights during each recorded step):

        input, bias_table   l1_to_rms          output, position   rms_to_inf
        hidden, conv, expert     rms_to_rms (the largest of an expert weight's matrices)
    each of W ``oriented`` (d_out, d_in) (a Conv1D's (in, out) turned), and supremum of every weight.

    rms_to_rms comes from power iteration warm-started from the previous record
    (``warmup_iters`` on a layer's first record, ``iters`` after). Entries are named
    ``"<param name>/<norm>"`` and ``"update/<param name>/<norm>"``, plus
    ``"output/rms_to_inf"``, ``"output/log2_rms_to_inf"`` and ``"output/log2_distance"``
    (log2 ‖W_out‖_{RMS→∞} − ``target``; the paper's optimum is 7.0 ± 0.2).

    With ``optimizer`` the monitor hooks its ``step`` and records by itself; without,
    call ``monitor.step()`` after each optimizer step. Each record is appended to
    ``history``, passed to ``callback(step, record)`` and, with ``csv_path``, written.
    FSDP2 (DTensor) weights are gathered whole for each record, so every rank must record.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, every: int = 10,
                 target: float = OUTPUT_NORM_LOG2, updates: bool = True, iters: int = 1, warmup_iters: int = 50,
                 condition_numbers: bool = False, callback: Callable[[int, dict], None] | None = None,
                 csv_path=None, output: str | None = None, roles: dict | None = None):
        for name, value in (("every", every), ("iters", iters), ("warmup_iters", warmup_iters)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
            raise ValueError(f"target must be a finite number (a log2 norm), got {target!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if csv_path is not None and not Path(csv_path).parent.is_dir():
            raise ValueError(f"csv_path {str(csv_path)!r}: its directory does not exist")
        params = dict(model.named_parameters())
        self.layers = {n: (r, params[n]) for n, (r, kw) in assign(model, output=output, roles=roles).items()
                       if r in ROLE_NORM}
        self._kwargs = {n: kw for n, (_, kw) in assign(model, output=output, roles=roles).items()}
        self.output = next((n for n, (r, _) in self.layers.items() if r == "output"), None)
        self.every, self.target, self.updates = every, target, updates
        self.iters, self.warmup_iters, self.condition_numbers = iters, warmup_iters, condition_numbers
        self.callback, self.csv_path = callback, csv_path
        self.steps = 0
        self.history: list[dict] = []
        self.seconds = 0.0  # host time spent in the monitor
        self._v: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] | None = None
        self._hooks = []
        if optimizer is not None:
            stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if self.layers and not any(id(p) in stepped for _, p in self.layers.values()):
                raise ValueError("the optimizer updates none of the model's monitored weights (a monitor for "
                                 "another model would record zero updates)")
            self._hooks = [optimizer.register_step_pre_hook(lambda *_: self.before_step()),
                           optimizer.register_step_post_hook(lambda *_: self.step())]

    def remove(self) -> None:
        """Detach from the optimizer."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def latest(self) -> dict:
        """The last record ({} before the first)."""
        return self.history[-1] if self.history else {}

    def _due(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def before_step(self) -> None:
        """Keep the weights of the next step when it will be recorded (for update norms)."""
        if self.updates and self._due(self.steps + 1):
            start = time.perf_counter()
            self._before = {n: p.detach().clone() for n, (_, p) in self.layers.items()}
            self.seconds += time.perf_counter() - start

    def step(self) -> dict | None:
        """Count one optimizer step; record (and return the record) every ``every`` steps."""
        self.steps += 1
        if not self._due(self.steps):
            return None
        return self.record()

    def _spectral(self, key: str, M: torch.Tensor) -> torch.Tensor:
        """rms_to_rms of the largest of M's (b, d_out, d_in) matrices, by warm-started power iteration."""
        v = self._v.get(key)
        sigma, self._v[key] = power_iteration(M, v, iters=self.iters if v is not None else self.warmup_iters)
        return (math.sqrt(M.size(2) / M.size(1)) * sigma).max()

    def _norms(self, key: str, name: str, role: str, W: torch.Tensor) -> dict[str, torch.Tensor]:
        W = _full(W.detach())
        M = oriented(W, role, self._kwargs[name])
        norm = ROLE_NORM[role]
        out = {norm: self._spectral(key, M) if norm == "rms_to_rms" else getattr(reference, norm)(M).max()}
        out["supremum"] = reference.supremum(M).max()
        if self.condition_numbers:
            out["condition_number"] = reference.condition_number(M).max()
        return out

    @torch.no_grad()
    def record(self) -> dict:
        """Measure every layer now; returns the record (also appended to ``history``)."""
        cuda = [p.device for _, p in self.layers.values() if p.device.type == "cuda"]
        if cuda:  # let queued training work finish, so that ``seconds`` times the monitor alone
            torch.cuda.synchronize(cuda[0])
        start = time.perf_counter()
        values: dict[str, torch.Tensor] = {}
        for name, (role, p) in self.layers.items():
            for norm, v in self._norms(name, name, role, p).items():
                values[f"{name}/{norm}"] = v
            if self._before is not None:
                for norm, v in self._norms(f"update/{name}", name, role, p - self._before[name]).items():
                    values[f"update/{name}/{norm}"] = v
        self._before = None
        rec = {"step": self.steps}
        if values:  # one device-to-host copy for all values
            device = next(iter(values.values())).device
            flat = torch.stack([v.to(device, torch.float64).reshape(()) for v in values.values()])
            rec.update(zip(values, flat.cpu().tolist()))
        if self.output is not None:
            norm = rec[f"{self.output}/rms_to_inf"]
            rec["output/rms_to_inf"] = norm
            rec["output/log2_rms_to_inf"] = math.log2(norm) if norm > 0 else -math.inf
            rec["output/log2_distance"] = rec["output/log2_rms_to_inf"] - self.target
        self.history.append(rec)
        self.seconds += time.perf_counter() - start
        if self.csv_path is not None:
            self.to_csv(self.csv_path)
        if self.callback is not None:
            self.callback(self.steps, rec)
        return rec

    def output_norm(self) -> float:
        """‖W_out‖_{RMS→∞} now (exact; no record is made)."""
        if self.output is None:
            raise ValueError("this monitor has no output layer (pass output= or roles= to name one)")
        W = _full(self.layers[self.output][1].detach())
        return reference.rms_to_inf(W.reshape(W.size(0), -1)).item()

    def to_csv(self, path) -> None:
        """Write ``history`` as CSV (one row per record, one column per entry)."""
        columns = list(dict.fromkeys(k for rec in self.history for k in rec))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
