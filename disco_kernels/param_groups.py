"""Scion param groups for the paper's norm-everywhere setup (arXiv 2510.03871), and for models as they come
(Hugging Face GPT-2, Llama, OPT, T5, BERT, ...), without hand-written roles.

``classify(model)`` gives each trainable parameter a role; ``param_groups`` turns the roles into Scion
groups with these defaults (each overridable):

    role        parameters                                     norm                       lr
    input       nn.Embedding weights (vocab, d)                ColNorm(transpose=True)    lr · 1
    hidden      nn.Linear weights but the output layer;        Spectral()                 lr · 1/8
                weights stored (in, out) (GPT-2's Conv1D)      Spectral(transpose=True)
    expert      other 3-D weights (experts, out, in)           Spectral(batch_dims=1)     lr · 1/8
    conv        nn.Conv1d / nn.Conv2d kernels                  SpectralConv()             lr · 1/8
    output      the output nn.Linear (the last registered      RowNorm(normalized=True)   lr · 1
                outside an nn.ModuleList's blocks)
    vector      every 0-D / 1-D parameter                      BiasRMS()                  lr · 1/8
    position    the other embeddings of a model whose token    RowNorm(normalized=True)   lr · 1
                embedding is tied to its output layer
                (learned positions, token types)
    bias_table  attention-bias tables (T5's                    ColNorm()                  lr · 1/8
                relative_attention_bias (buckets, heads))

Layouts. A weight is stored (d_out, d_in) as nn.Linear stores it, or (d_in, d_out): nn.Embedding,
transformers' ``Conv1D`` (found by class name and its ``nf``, without importing transformers) and any
module whose ``nx``/``nf``, ``in_features``/``out_features``, ``in_dim``/``out_dim`` or
``input_dim``/``output_dim`` say so. A param whose layout is not its role's default gets it in its own
norm_kwargs (``{"transpose": True}`` for a hidden or output weight stored (in, out), ``{"transpose": False}``
for an input weight stored (out, in)); a fused q, k, v ``Conv1D`` (d, 3d) (GPT-2's ``c_attn``) also gets
``splits=[d, d, d]``: q, k and v are orthogonalised apart. Params with their own norm_kwargs form groups
of their own.

Tied embeddings. A weight shared by an nn.Embedding and the output nn.Linear is ``output``: as the output
layer it sets the logits' scale, and the input geometry there (rows of RMS 1) trains worse. Then the
embeddings added to it (learned positions, token types) take role ``position``, the same norm and lr,
so that each token's and each position's vector stay in proportion; with the input norm they would grow
sqrt(d) / (1 / sqrt(d)) = d times faster than the tokens and drown them (tiny GPT-2, 150 steps, best lr of
each: 1.050 against 1.744 nats; README "Tied embeddings"). Untied, they are ``input`` like the tokens.

Attention-bias tables (an nn.Embedding or 2-D parameter whose name holds "bias", as T5's
``relative_attention_bias`` and Swin's ``relative_position_bias_table``) hold one additive bias per
(bucket, head), not vectors of an input: ColNorm scales each head's column to RMS 1 (BiasRMS per head)
at the vectors' lr.

The paper trains these groups with ``unconstrained=True`` and ``momentum=1.0``, from the norms' init
(see ``Scion.init``) or the model's own.
"""
from __future__ import annotations

import torch
from torch import nn

from .lmo import make_norm
from .scaling import LAYER_RATIO, layer_lr

ROLES = ("input", "hidden", "expert", "conv", "output", "vector", "position", "bias_table")

DEFAULTS = {
    "input": {"norm": "ColNorm", "norm_kwargs": {"transpose": True}, "scale": 1.0},
    "hidden": {"norm": "Spectral", "norm_kwargs": {}, "scale": 1.0},
    "expert": {"norm": "Spectral", "norm_kwargs": {"batch_dims": 1}, "scale": 1.0},
    "conv": {"norm": "SpectralConv", "norm_kwargs": {}, "scale": 1.0},
    "output": {"norm": "RowNorm", "norm_kwargs": {"normalized": True}, "scale": 1.0},
    "vector": {"norm": "BiasRMS", "norm_kwargs": {}, "scale": 1.0},
    "position": {"norm": "RowNorm", "norm_kwargs": {"normalized": True}, "scale": 1.0},
    "bias_table": {"norm": "ColNorm", "norm_kwargs": {}, "scale": 1.0},
}

_RULES = {nn.Embedding: "input", nn.Linear: "hidden", nn.Conv1d: "conv", nn.Conv2d: "conv"}

_LR_OF_ROLE = {"input": "input", "hidden": "hidden", "expert": "hidden", "conv": "hidden", "output": "output",
               "vector": "hidden", "position": "output", "bias_table": "hidden"}
_CONV_3D = (nn.Conv1d, nn.ConvTranspose1d)  # the 3-D weights that are not experts
_IN_OUT = (("nx", "nf"), ("in_features", "out_features"), ("in_dim", "out_dim"), ("input_dim", "output_dim"))
_ROLES_OF_RANK = {2: ("hidden", "input", "output", "position", "bias_table"), 3: ("expert", "conv"), 4: ("conv",)}


def _check_role(role, where: str):
    """A role, or (role, norm_kwargs) as ``roles=`` may give it: (role, own norm_kwargs or None)."""
    own = None
    if isinstance(role, tuple) and len(role) == 2:
        role, own = role
        if not isinstance(own, dict):
            raise TypeError(f"{where} = (role, norm_kwargs) needs a dict of norm_kwargs, got {type(own).__name__}")
    if not isinstance(role, str) or role not in ROLES:
        raise ValueError(f"{where} must be one of {ROLES} or (role, norm_kwargs), got {role!r}")
    return role, own


def _stored_in_out(mod: nn.Module, w: torch.Tensor):
    """True when ``mod`` stores its 2-D weight ``w`` (in, out), False when (out, in), None when it does not say."""
    if isinstance(mod, nn.Linear):
        return False
    if isinstance(mod, nn.Embedding) or (type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")):
        return True
    for a, b in _IN_OUT:
        d_in, d_out = getattr(mod, a, None), getattr(mod, b, None)
        if isinstance(d_in, int) and isinstance(d_out, int) and w.dim() == 2:
            if tuple(w.shape) == (d_out, d_in):  # (a square weight reads as nn.Linear's layout)
                return False
            if tuple(w.shape) == (d_in, d_out):
                return True
    return None


def _linear_like(mod: nn.Module, w) -> bool:
    """A module whose weight is a linear map it says the layout of (other than nn.Linear): hidden."""
    return not isinstance(mod, (nn.Linear, nn.Embedding)) and _stored_in_out(mod, w) is not None


def _fused_qkv(mod: nn.Module, w) -> dict | None:
    """The norm_kwargs that cut a fused q, k, v ``Conv1D`` weight (d, 3d), else None."""
    if (type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and w.dim() == 2
            and w.shape[1] == mod.nf == 3 * w.shape[0]):
        return {"transpose": True, "splits": [w.shape[0]] * 3}
    return None


def _own_kwargs(role: str, views: set) -> dict:
    """The norm_kwargs a param's layout adds to its role's defaults (``views``: how its modules store it)."""
    if role in ("hidden", "output") and views == {True}:
        return {"transpose": True}
    if role == "input" and views == {False}:
        return {"transpose": False}
    return {}


def assign(model: nn.Module, *, output: str | None = None, roles: dict | None = None) -> dict[str, tuple[str, dict]]:
    """(role, the param's own norm_kwargs) of every trainable parameter, by name (model.named_parameters()
    order); ``classify`` gives the roles alone. One ValueError lists every parameter no rule covers."""
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
    owners: dict[int, list] = {}  # id(param) -> [(module, attr, module name)]
    linears = []  # nn.Linear weights outside the repeated blocks (elements of an nn.ModuleList): output candidates
    stacked = {f"{mname}.{c}" if mname else c for mname, mod in model.named_modules()
               if isinstance(mod, nn.ModuleList) for c, _ in mod.named_children()}
    for mname, mod in model.named_modules():
        for attr, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mod, attr, mname))
            parts = mname.split(".")
            if isinstance(mod, nn.Linear) and attr == "weight" and not any(
                    ".".join(parts[:i]) in stacked for i in range(1, len(parts))):
                linears.append(p)
    out_id = id(every[output]) if output is not None else (id(linears[-1]) if linears else None)
    out_mods = [m for m, attr, _ in owners.get(out_id, ()) if attr == "weight"]
    tied = any(isinstance(m, nn.Embedding) for m in out_mods) and any(isinstance(m, nn.Linear) for m in out_mods)
    positions = tied and forced.get(out_id, ("output",))[0] == "output"

    def weights(p):
        return [(m, n) for m, attr, n in owners[id(p)] if attr == "weight"]

    def bias_table(name, p):
        if p.dim() != 2:
            return False
        mods = weights(p)
        if mods and all(isinstance(m, nn.Embedding) for m, _ in mods):
            return all("bias" in n.rsplit(".", 1)[-1] for _, n in mods)
        return not mods and "bias" in name.rsplit(".", 1)[-1]

    result, unknown = {}, []
    for name, p in named.items():
        views = {v for m, _ in weights(p) for v in [_stored_in_out(m, p)] if v is not None}
        if id(p) in forced:
            role, own = forced[id(p)]
            result[name] = role, own if own is not None else _own_kwargs(role, views)
        elif p.dim() <= 1:
            result[name] = "vector", {}
        elif id(p) == out_id:
            result[name] = "output", _own_kwargs("output", views)  # (tied: views {True, False}, no own)
        elif bias_table(name, p):
            result[name] = "bias_table", {}
        elif any(_fused_qkv(m, p) for m, _ in weights(p)):
            result[name] = "hidden", next(f for m, _ in weights(p) for f in [_fused_qkv(m, p)] if f)
        elif p.dim() == 3 and not any(isinstance(m, _CONV_3D) for m, _ in weights(p)):
            result[name] = "expert", {}
        else:
            kinds = {"hidden" if _linear_like(m, p) else
                     next((r for t, r in _RULES.items() if isinstance(m, t)), None) for m, _ in weights(p)}
            if len(kinds) != 1 or None in kinds:
                unknown.append((name, p))
                continue
            role = kinds.pop()
            if role == "input" and positions:
                role = "position"
            result[name] = role, _own_kwargs(role, views)
    if unknown:
        raise ValueError(_unclassified(unknown))
    return result


def _unclassified(unknown) -> str:
    """The one error for every parameter no rule covers, with the roles that fit each one's rank."""
    lines = []
    for name, p in unknown:
        fits = _ROLES_OF_RANK.get(p.dim())
        if fits is None:
            could = f"no role by rank; ('expert', {{'batch_dims': {p.dim() - 2}}}) orthogonalises each matrix"
        else:
            could = f"a role in {fits}"
            if p.dim() == 2:
                could += " (stored (d_in, d_out): ('hidden', {'transpose': True}))"
        lines.append(f"  parameter {name!r} (shape {tuple(p.shape)}): {could}")
    n = len(unknown)
    return (f"cannot classify {n} parameter{'s' if n > 1 else ''}: not the weight of exactly one kind of "
            f"nn.Embedding, nn.Linear, nn.Conv1d/2d, a module that says its layout (transformers' Conv1D, "
            f"in_features/out_features, ...), a 3-D expert weight or an attention-bias table; pass "
            f"roles={{name: role}} (or {{name: (role, norm_kwargs)}}) for each, or freeze it:\n" + "\n".join(lines))


def classify(model: nn.Module, *, output: str | None = None, roles: dict | None = None) -> dict[str, str]:
    """Role of every trainable parameter, by name (model.named_parameters() order).

    ``output``: name of the output weight (default: the weight of the nn.Linear registered last outside
    the blocks of an nn.ModuleList, so that a model without a head, as T5EncoderModel, has none). ``roles``: {name: role or (role, norm_kwargs)} for parameters to force, including
    those no rule covers (a 2-D nn.Parameter outside any module that says its layout, ...).
    Names may be any alias of a tied weight; results use named_parameters() names. A ValueError lists
    every parameter that no rule covers, with the roles that fit its rank.
    """
    return {name: role for name, (role, _) in assign(model, output=output, roles=roles).items()}


def param_groups(model: nn.Module, lr: float | None = None, *, ratio=LAYER_RATIO, output: str | None = None,
                 roles: dict | None = None, settings: dict | None = None) -> list[dict]:
    """Scion param groups, one per non-empty role (and per params' own norm_kwargs in it: a layout or a fused
    q, k, v projection's splits), each with "params", "param_names", "role", "norm", "norm_kwargs", "scale"
    and (when ``lr`` is given) "lr" = ``layer_lr(lr, ratio)`` of the role's layer.

    ``settings``: {role: {key: value}} replaces the defaults of a role (any Scion group
    key, e.g. {"hidden": {"norm_kwargs": {"steps": 6}}, "output": {"scale": 2.0}}); a param's own
    norm_kwargs are added to the role's. ``output`` and ``roles`` are passed to ``classify``. Frozen
    parameters are left out.
    """
    settings = dict(settings or {})
    for role, keys in settings.items():
        if role not in ROLES:
            raise ValueError(f"settings keys must be one of {ROLES}, got {role!r}")
        if not isinstance(keys, dict):
            raise TypeError(f"settings[{role!r}] must be a dict of Scion group keys, got {type(keys).__name__}")
        if "params" in keys or "param_names" in keys:
            raise ValueError(f"settings[{role!r}] cannot set 'params' or 'param_names'; use roles= to move parameters")
    lrs = layer_lr(lr, ratio) if lr is not None else None
    by_role: dict[str, list] = {}
    for name, (role, own) in assign(model, output=output, roles=roles).items():
        by_role.setdefault(role, []).append((name, own))
    params = dict(model.named_parameters())
    groups = []
    for role in ROLES:
        defaults = {**DEFAULTS[role], "norm_kwargs": dict(DEFAULTS[role]["norm_kwargs"])}  # callers may mutate
        group = {**defaults, **({"lr": lrs[_LR_OF_ROLE[role]]} if lrs else {}), **settings.get(role, {})}
        by_own: dict[str, tuple[dict, list]] = {}  # the params' own norm_kwargs -> (them, names)
        for name, own in by_role.get(role, []):
            by_own.setdefault(repr(own), (own, []))[1].append(name)
        for own, names in by_own.values():
            norm_kwargs = {**(group["norm_kwargs"] or {}), **own} if own else group["norm_kwargs"]
            try:
                norm = make_norm(group["norm"], norm_kwargs)
            except ValueError as e:
                if not own:
                    raise
                raise ValueError(f"{names} (role {role!r}) need norm_kwargs {own} for their layout, which norm "
                                 f"{group['norm']!r} does not take ({e}); give the role a norm that takes them "
                                 f"(settings={{{role!r}: {{'norm': ...}}}}) or the params their own kwargs "
                                 f"(roles={{name: ({role!r}, norm_kwargs)}})") from None
            for name in names:
                shape = params[name].shape
                norm.resolve(shape).check(shape, f"{name!r} (shape {tuple(shape)}, role {role!r})")
            groups.append({"params": [params[n] for n in names], "param_names": names, "role": role,
                           **group, "norm_kwargs": dict(norm_kwargs)})
    return groups


def output_weight(model: nn.Module, **classify_kwargs) -> tuple[str, torch.Tensor]:
    """(name, parameter) of the model's output layer weight, as ``classify`` finds it."""
    params = dict(model.named_parameters())
    for name, role in classify(model, **classify_kwargs).items():
        if role == "output":
            return name, params[name]
    raise ValueError("the model has no output layer (no nn.Linear weight and no output= given)")
