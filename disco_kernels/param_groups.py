"""Scion param groups for the paper's norm-everywhere setup (arXiv 2510.03871).

``classify(model)`` gives each trainable parameter a role; ``param_groups``
turns the roles into Scion groups with these defaults (each overridable):

    role    parameters                              norm                       lr
    input   nn.Embedding weights (vocab, d)         ColNorm(transpose=True)    lr · 1
    hidden  nn.Linear weights but the output layer  Spectral()                 lr · 1/8
    expert  other 3-D weights (experts, out, in)    Spectral(batch_dims=1)     lr · 1/8
    conv    nn.Conv1d / nn.Conv2d kernels           SpectralConv()             lr · 1/8
    output  the output nn.Linear (last registered)  RowNorm(normalized=True)   lr · 1
    vector  every 0-D / 1-D parameter               BiasRMS()                  lr · 1/8

A weight tied between an nn.Embedding and the output nn.Linear gets the role
``output``. A fused q, k, v projection stored (d, 3d) (GPT-2's ``Conv1D`` ``c_attn``,
found by class name and its ``nf``, without importing transformers) is ``hidden`` with
``splits=[d, d, d], split_dim=1`` added to the role's norm_kwargs: q, k and v are
orthogonalised apart; it is put in a group of its own. The paper trains these groups with ``unconstrained=True`` and
``momentum=1.0``, from the norms' init (see ``Scion.init`` or the model's own).
"""
from __future__ import annotations

import torch
from torch import nn

from .lmo import make_norm
from .scaling import LAYER_RATIO, layer_lr

ROLES = ("input", "hidden", "expert", "conv", "output", "vector")

DEFAULTS = {
    "input": {"norm": "ColNorm", "norm_kwargs": {"transpose": True}, "scale": 1.0},
    "hidden": {"norm": "Spectral", "norm_kwargs": {}, "scale": 1.0},
    "expert": {"norm": "Spectral", "norm_kwargs": {"batch_dims": 1}, "scale": 1.0},
    "conv": {"norm": "SpectralConv", "norm_kwargs": {}, "scale": 1.0},
    "output": {"norm": "RowNorm", "norm_kwargs": {"normalized": True}, "scale": 1.0},
    "vector": {"norm": "BiasRMS", "norm_kwargs": {}, "scale": 1.0},
}

_RULES = {nn.Embedding: "input", nn.Linear: "hidden", nn.Conv1d: "conv", nn.Conv2d: "conv"}

_LR_OF_ROLE = {"input": "input", "hidden": "hidden", "expert": "hidden", "conv": "hidden", "output": "output",
               "vector": "hidden"}
_CONV_3D = (nn.Conv1d, nn.ConvTranspose1d)  # the 3-D weights that are not experts


def _check_role(role, where: str) -> str:
    if role not in ROLES:
        raise ValueError(f"{where} must be one of {ROLES}, got {role!r}")
    return role


def _fused_qkv(model: nn.Module) -> dict[int, dict]:
    """{id(weight): the norm_kwargs that cut it} of every fused q, k, v ``Conv1D`` weight (d, 3d)."""
    found = {}
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if (type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and isinstance(w, nn.Parameter) and w.dim() == 2
                and w.shape[1] == mod.nf == 3 * w.shape[0]):
            found[id(w)] = {"splits": [w.shape[0]] * 3, "split_dim": 1}
    return found


def classify(model: nn.Module, *, output: str | None = None, roles: dict | None = None) -> dict[str, str]:
    """Role of every trainable parameter, by name (model.named_parameters() order).

    ``output``: name of the output weight (default: the weight of the nn.Linear
    registered last). ``roles``: {name: role} for parameters to force, including
    those no rule covers (a 2-D nn.Parameter outside nn.Linear/nn.Embedding, ...).
    Names may be any alias of a tied weight; results use named_parameters() names.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    every = dict(model.named_parameters(remove_duplicate=False))  # tied weights under each name
    forced = {}
    for name, role in (roles or {}).items():
        if name not in every:
            raise ValueError(f"roles names {name!r}, which is not a parameter of the model")
        forced[id(every[name])] = _check_role(role, f"roles[{name!r}]")
    if output is not None and output not in every:
        raise ValueError(f"output={output!r} is not a parameter of the model")
    owners: dict[int, set] = {}
    linears = []
    for _, mod in model.named_modules():
        for attr, p in mod.named_parameters(recurse=False):
            base = next((t for t in _RULES if isinstance(mod, t)), type(mod))
            owners.setdefault(id(p), set()).add((base, attr))
            if isinstance(mod, nn.Linear) and attr == "weight":
                linears.append(p)
    out_id = id(every[output]) if output is not None else (id(linears[-1]) if linears else None)
    fused = _fused_qkv(model)
    result = {}
    for name, p in named.items():
        if id(p) in forced:
            result[name] = forced[id(p)]
        elif p.dim() <= 1:
            result[name] = "vector"
        elif id(p) == out_id:
            result[name] = "output"
        elif id(p) in fused:
            result[name] = "hidden"
        elif p.dim() == 3 and not any(issubclass(t, _CONV_3D) for t, _ in owners[id(p)]):
            result[name] = "expert"
        else:
            rules = {_RULES.get(t) for t, attr in owners[id(p)] if attr == "weight"}
            if len(rules) != 1 or None in rules:
                raise ValueError(f"cannot classify parameter {name!r} (shape {tuple(p.shape)}): it is not the weight "
                                 f"of exactly one kind of nn.Embedding, nn.Linear, nn.Conv1d/2d, nor a 3-D expert "
                                 f"weight or a fused Conv1D c_attn; pass roles={{{name!r}: <role>}} with a role in "
                                 f"{ROLES}")
            result[name] = rules.pop()
    return result


def param_groups(model: nn.Module, lr: float | None = None, *, ratio=LAYER_RATIO, output: str | None = None,
                 roles: dict | None = None, settings: dict | None = None) -> list[dict]:
    """Scion param groups, one per non-empty role (and per param's own norm_kwargs in it: a fused q, k, v
    projection's splits), each with "params", "param_names", "role", "norm", "norm_kwargs", "scale" and
    (when ``lr`` is given) "lr" = ``layer_lr(lr, ratio)``.

    ``settings``: {role: {key: value}} replaces the defaults of a role (any Scion group
    key, e.g. {"hidden": {"norm_kwargs": {"steps": 6}}, "output": {"scale": 2.0}}).
    ``output`` and ``roles`` are passed to ``classify``. Frozen parameters are left out.
    """
    settings = dict(settings or {})
    for role, keys in settings.items():
        _check_role(role, "settings keys")
        if not isinstance(keys, dict):
            raise TypeError(f"settings[{role!r}] must be a dict of Scion group keys, got {type(keys).__name__}")
        if "params" in keys or "param_names" in keys:
            raise ValueError(f"settings[{role!r}] cannot set 'params' or 'param_names'; use roles= to move parameters")
    lrs = layer_lr(lr, ratio) if lr is not None else None
    by_role: dict[str, list] = {}
    for name, role in classify(model, output=output, roles=roles).items():
        by_role.setdefault(role, []).append(name)
    params = dict(model.named_parameters())
    fused = _fused_qkv(model)
    groups = []
    for role in ROLES:
        defaults = {**DEFAULTS[role], "norm_kwargs": dict(DEFAULTS[role]["norm_kwargs"])}  # callers may mutate
        group = {**defaults, **({"lr": lrs[_LR_OF_ROLE[role]]} if lrs else {}), **settings.get(role, {})}
        by_own: dict[str, tuple[dict, list]] = {}  # the params' own norm_kwargs -> (them, names)
        for name in by_role.get(role, []):
            own = fused.get(id(params[name]), {}) if role == "hidden" else {}
            by_own.setdefault(repr(own), (own, []))[1].append(name)
        for own, names in by_own.values():
            norm_kwargs = {**(group["norm_kwargs"] or {}), **own} if own else group["norm_kwargs"]
            norm = make_norm(group["norm"], norm_kwargs)
            for name in names:
                shape = params[name].shape
                norm.resolve(shape).check(shape, f"{name!r} (shape {tuple(shape)}, role {role!r})")
            groups.append({"params": [params[n] for n in names], "param_names": names, "role": role,
                           **group, "norm_kwargs": norm_kwargs})
    return groups


def output_weight(model: nn.Module, **classify_kwargs) -> tuple[str, torch.Tensor]:
    """(name, parameter) of the model's output layer weight, as ``classify`` finds it."""
    params = dict(model.named_parameters())
    for name, role in classify(model, **classify_kwargs).items():
        if role == "output":
            return name, params[name]
    raise ValueError("the model has no output layer (no nn.Linear weight and no output= given)")
