"""Scion in torchtitan: an optimizer container whose config builds Scion over ``dk.param_groups``.

torchtitan builds its optimizer from ``Trainer.Config.optimizer`` (an ``OptimizersContainer.Config``:
``config.optimizer.build(model_parts=...)``) and checkpoints it through the container's flat,
FQN-keyed state dict. ``ScionOptimizersContainer.Config`` plugs Scion into both::

    from disco_kernels.integrations.torchtitan import ScionOptimizersContainer

    config.optimizer = ScionOptimizersContainer.Config(lr=2**-4)    # in a config_registry function

Two ways to build groups:

* ``param_groups`` empty (the default): one ``Scion`` per model part over ``dk.param_groups(part, lr=lr,
  ratio=ratio, output=output, roles=roles, settings=settings)``, i.e. the paper's norms and per-layer
  learning rates (embedding ColNorm, hidden Spectral, output RowNorm, vectors BiasRMS; lr 1 : 1/8 : 1),
  with ``momentum``, ``unconstrained``, ``backend`` and ``nonfinite`` for every group. Names in
  ``output`` and ``roles`` are torchtitan's canonical FQNs (without activation-checkpoint or compile
  wrappers). With several model parts (pipeline parallelism) give ``output``: a part that does not
  hold it has no output layer.
* torchtitan's own regex ``param_groups`` (``ParamGroupConfig``): ``"Scion"`` is one more
  ``optimizer_name`` beside ``"AdamW"`` and the others, its ``optimizer_kwargs`` are Scion's group keys
  (``lr``, ``norm``, ``norm_kwargs``, ``scale``, ``momentum``, ``unconstrained``), and
  ``optimizer_factory_kwargs_by_name["Scion"]`` takes Scion's keyword-only extras (``backend``,
  ``nonfinite``).

FSDP2, HSDP, TP and EP parameters are DTensors, which Scion shards its work over by itself. The state
dict is torchtitan's (``state.{fqn}.momentum_buffer``, ``param_groups.{fqn}.{key}``), so DCP saves,
reshards and loads it. ``ScionLight`` is not offered: torchtitan zeroes (and clips) gradients every
step, and ScionLight keeps its momentum in them. torchtitan clips gradients to ``training.max_norm``
before the step; Scion's updates do not depend on the gradient's scale (with ``momentum < 1`` the
clipping reweights the average). A fused ``wqkv`` projection is orthogonalised as one matrix, as
torchtitan's Muon does (``roles``/``settings`` change roles and norms; separate q, k, v projections,
``fuse_qkv=False`` in the model, are orthogonalised apart).

Importing this module imports torchtitan; importing ``disco_kernels`` does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torchtitan.components.checkpointer.utils import canonical_fqn
from torchtitan.components.optimizer import OptimizersContainer

from ..optim import Scion
from ..param_groups import output_weight, param_groups as _param_groups
from ..scaling import LAYER_RATIO

__all__ = ["ScionOptimizersContainer", "build_scion"]

_IMPL_KEYS = ("fused", "foreach")  # torchtitan adds these to every regex group; Scion has no such modes


def build_scion(param_groups: list[dict], **kwargs) -> Scion:
    """The "Scion" optimizer factory for torchtitan's regex groups: Scion over them, without the
    fused/foreach keys torchtitan adds; ``kwargs`` are Scion's keyword-only extras."""
    return Scion([{k: v for k, v in g.items() if k not in _IMPL_KEYS} for g in param_groups], **kwargs)


class ScionOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` with Scion: see the module docstring."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        lr: float = 2 ** -4
        """Input and output layers' learning rate; hidden layers and vectors get lr · ratio[1]."""
        ratio: tuple[float, float, float] = LAYER_RATIO
        """Learning rates of input : hidden : output layers, relative to lr."""
        momentum: float = 1.0
        """Scion's momentum (one minus the usual factor); 1.0: none, as the paper trains."""
        unconstrained: bool = True
        """False: each step also shrinks the weights by (1 - lr), towards the norm ball."""
        output: str | None = None
        """Canonical FQN of the output layer's weight (default: the last nn.Linear registered)."""
        roles: dict[str, str] = field(default_factory=dict)
        """{canonical FQN: role} for parameters to force (see dk.param_groups)."""
        settings: dict[str, dict[str, Any]] = field(default_factory=dict)
        """{role: {Scion group key: value}} replacing a role's defaults (norm, norm_kwargs, scale, ...)."""
        backend: str = "auto"
        """Scion's kernels: "auto", "torch", "triton" or "cuda"."""
        nonfinite: str = "raise"
        """A non-finite gradient: "raise", "skip" the step, or "ignore" (no check, no host sync)."""

    @staticmethod
    def _resolve_optimizer_factory(name: str):
        if name == "Scion":
            return build_scion
        return OptimizersContainer._resolve_optimizer_factory(name)

    def __init__(self, config: Config, *, model_parts: list) -> None:
        if config.param_groups:  # torchtitan's regex groups, where "Scion" is one more optimizer name
            super().__init__(config, model_parts=model_parts)
            return
        self.model_parts = model_parts
        self.optimizers = []
        if len(model_parts) > 1 and config.output is None:
            raise ValueError("ScionOptimizersContainer with several model parts (pipeline parallelism) needs "
                             "output=<canonical FQN of the output layer's weight>: each part's last nn.Linear "
                             "would be taken for it")
        found: set[str] = set()
        all_params = []
        for model in model_parts:
            groups = _param_groups(model, lr=config.lr, ratio=tuple(config.ratio), settings=config.settings or None,
                                   **_names_in_part(model, config, found))
            for group in groups:
                group["param_names"] = [canonical_fqn(n) for n in group["param_names"]]
                all_params.extend(group["params"])
            self.optimizers.append(Scion(groups, momentum=config.momentum, unconstrained=config.unconstrained,
                                         backend=config.backend, nonfinite=config.nonfinite))
        missing = sorted({*config.roles, *([config.output] if config.output else [])} - found)
        if missing:
            raise ValueError(f"ScionOptimizersContainer: {missing} named in output/roles are parameters of no "
                             "model part (names are canonical FQNs, e.g. 'layers.0.attention.wo.weight')")
        self._validate_params(all_params)
        self._post_init(all_params)


def _names_in_part(model, config, found: set) -> dict:
    """``output`` and ``roles`` for dk.param_groups on one model part, from canonical FQNs to the part's own
    names; a part without the output weight gets none (its last nn.Linear is hidden). Adds the names
    found to ``found``."""
    actual = {canonical_fqn(n): n for n, _ in model.named_parameters(remove_duplicate=False)}
    roles = {actual[n]: role for n, role in config.roles.items() if n in actual}
    found.update(n for n in config.roles if n in actual)
    output = None
    if config.output is not None:
        if config.output in actual:
            output = actual[config.output]
            found.add(config.output)
        else:
            try:
                name, _ = output_weight(model, roles=roles)
            except ValueError:  # no nn.Linear in this part
                name = None
            if name is not None and name not in roles:
                roles[name] = "hidden"
    return {"output": output, "roles": roles or None}
