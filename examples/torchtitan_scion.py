"""torchtitan configs that train with Scion (a config_registry module for torchtitan's --module/--config).

From a torchtitan checkout (the debug config reads its test tokenizer and the c4_test data there), with
disco-kernels installed and this directory on the path:

    PYTHONPATH=/path/to/disco-kernels torchrun --nproc_per_node 2 -m torchtitan.train \\
        --module examples.torchtitan_scion --config llama3_debugmodel_scion

Overrides work as for any torchtitan config, e.g. ``--optimizer.lr 0.125 --optimizer.momentum 0.1``.
The optimizer is ``ScionOptimizersContainer.Config`` (disco_kernels.integrations.torchtitan): one Scion
per model part over ``dk.param_groups``, checkpointed through torchtitan's flat state dict.
"""
from __future__ import annotations

from torchtitan.components.optimizer import LRSchedulersContainer, ParamGroupConfig
from torchtitan.models.llama3.config_registry import llama3_debugmodel

from disco_kernels.integrations.torchtitan import ScionOptimizersContainer


def llama3_debugmodel_scion():
    """torchtitan's Llama-3 debug model trained as the paper does: the paper's norms and per-layer learning
    rates (input : hidden : output = 1 : 1/8 : 1), unconstrained, no momentum, constant learning rate."""
    config = llama3_debugmodel()
    config.optimizer = ScionOptimizersContainer.Config(lr=2 ** -4, momentum=1.0, unconstrained=True)
    config.lr_scheduler = LRSchedulersContainer.Config(warmup_steps=0, decay_ratio=0.0)  # constant
    return config


def llama3_debugmodel_scion_adamw_vectors():
    """Scion on the hidden matrices (Spectral), AdamW on everything else, through torchtitan's own regex
    param groups, where "Scion" is one more optimizer name."""
    config = llama3_debugmodel()
    config.optimizer = ScionOptimizersContainer.Config(
        implementation="for-loop",
        param_groups=[
            ParamGroupConfig(pattern=r"layers\.\d+\.(attention|feed_forward)\..*weight$", optimizer_name="Scion",
                             optimizer_kwargs={"lr": 2 ** -7, "norm": "Spectral", "momentum": 0.1}),
            ParamGroupConfig(pattern=r".*", optimizer_name="AdamW",
                             optimizer_kwargs={"lr": 8e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}),
        ])
    return config
