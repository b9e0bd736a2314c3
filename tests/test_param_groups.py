import pytest
import torch
from torch import nn

import disco_kernels as dk
import oracle
from disco_kernels.models import NormEverywhereLM
from disco_kernels.param_groups import classify, output_weight
from tolerances import assert_close


class GPT2Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        q, k, v = self.c_attn(self.ln_1(x)).chunk(3, -1)
        x = x + self.c_proj(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.mlp_proj(nn.functional.gelu(self.c_fc(self.ln_2(x))))


class GPT2Like(nn.Module):
    """nanoGPT layout: wte tied to lm_head, learned positions, LayerNorms and biases."""

    def __init__(self, vocab=50, d=16, n_layers=2, tied=True):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(32, d)
        self.h = nn.ModuleList(GPT2Block(d) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def by_role(groups):
    return {g["role"]: g for g in groups}


def test_gpt2_like_with_tied_embeddings():
    model = GPT2Like()
    roles = classify(model)
    assert roles["wte.weight"] == "output"  # tied to lm_head
    assert roles["wpe.weight"] == "input"
    assert roles["h.0.c_attn.weight"] == roles["h.1.mlp_proj.weight"] == "hidden"
    assert roles["h.0.ln_1.weight"] == roles["h.0.c_attn.bias"] == roles["ln_f.bias"] == "vector"
    assert "lm_head.weight" not in roles  # the same tensor as wte.weight
    groups = dk.param_groups(model, lr=0.08)
    g = by_role(groups)
    assert set(g) == {"input", "hidden", "output", "vector"}
    assert g["output"]["param_names"] == ["wte.weight"] and g["output"]["params"][0] is model.lm_head.weight
    assert (g["output"]["norm"], g["output"]["norm_kwargs"]) == ("RowNorm", {"normalized": True})
    assert (g["input"]["norm"], g["input"]["norm_kwargs"]) == ("ColNorm", {"transpose": True})
    assert (g["hidden"]["norm"], g["vector"]["norm"]) == ("Spectral", "BiasRMS")
    assert (g["input"]["lr"], g["hidden"]["lr"], g["output"]["lr"]) == (0.08, 0.01, 0.08)
    all_ids = [id(p) for grp in groups for p in grp["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())
    for grp in groups:
        assert len(grp["params"]) == len(grp["param_names"])


def test_groups_drive_scion_on_gpt2_like():
    model = GPT2Like(tied=False)
    assert classify(model)["lm_head.weight"] == "output" and classify(model)["wte.weight"] == "input"
    opt = dk.Scion(dk.param_groups(model, lr=0.05), lr=0.05, unconstrained=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 50, (2, 9))
    nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(before)
    # output update: -lr times the RowNorm(normalized) LMO of the gradient (rows of norm 1/sqrt(d_in))
    grad = model.lm_head.weight.grad
    delta = model.lm_head.weight.detach() - before["lm_head.weight"]
    exact = -0.05 * oracle.rownorm(grad.double(), normalized=True)
    # the plain computation: the same step in fp32, p - lr u, and the difference taken back out of p
    plain = (before["lm_head.weight"] - 0.05 * oracle.rownorm(grad, normalized=True)) - before["lm_head.weight"]
    assert_close(delta, exact, plain)


def test_norm_everywhere_model_groups():
    model = NormEverywhereLM("tiny")
    g = by_role(dk.param_groups(model, lr=0.1))
    assert set(g) == {"input", "hidden", "output"}
    assert g["input"]["param_names"] == ["embed.weight"] and g["output"]["param_names"] == ["head.weight"]
    assert len(g["hidden"]["params"]) == 7 * model.cfg.n_layers
    assert output_weight(model) == ("head.weight", model.head.weight)


def test_conv_weights_get_spectral_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv1d(8, 8, 5), nn.Flatten(), nn.Linear(8, 4))
    g = by_role(dk.param_groups(model, lr=1.0))
    assert g["conv"]["norm"] == "SpectralConv" and g["conv"]["param_names"] == ["0.weight", "1.weight"]
    assert g["conv"]["lr"] == 1 / 8
    assert g["output"]["param_names"] == ["3.weight"]
    dk.Scion(list(g.values()))  # every param fits its group's norm


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.mixing = nn.Parameter(torch.randn(6, 6))
        self.head = nn.Linear(6, 3)


def test_unclassifiable_parameter_is_named_and_can_be_assigned():
    with pytest.raises(ValueError, match=r"cannot classify parameter 'mixing' \(shape \(6, 6\)\)"):
        dk.param_groups(Custom(), lr=0.1)
    g = by_role(dk.param_groups(Custom(), lr=0.1, roles={"mixing": "hidden"}))
    assert sorted(g["hidden"]["param_names"]) == ["mixing", "proj.weight"]


def test_overrides():
    model = GPT2Like(tied=False)
    groups = dk.param_groups(model, lr=0.2, ratio=(1, 0.5, 0.25), output="wte.weight", roles={"wpe.weight": "hidden"},
                             settings={"hidden": {"norm": "Auto", "scale": 2.0}, "vector": {"lr": 0.0}})
    g = by_role(groups)
    assert set(g) == {"hidden", "output", "vector"}
    assert g["output"]["param_names"] == ["wte.weight"]
    assert {"wpe.weight", "lm_head.weight"} <= set(g["hidden"]["param_names"])
    assert (g["hidden"]["norm"], g["hidden"]["scale"], g["hidden"]["lr"]) == ("Auto", 2.0, 0.1)
    assert g["output"]["lr"] == 0.05 and g["vector"]["lr"] == 0.0


def test_forced_role_must_fit_its_norm():
    with pytest.raises(ValueError, match=r"'h.0.ln_1.weight' \(shape \(16,\), role 'output'\)"):
        dk.param_groups(GPT2Like(), roles={"h.0.ln_1.weight": "output"})


def test_frozen_parameters_are_left_out_and_lr_is_optional():
    model = GPT2Like(tied=False)
    model.wpe.weight.requires_grad_(False)
    groups = dk.param_groups(model)
    names = [n for grp in groups for n in grp["param_names"]]
    assert "wpe.weight" not in names and "wte.weight" in names
    assert all("lr" not in grp for grp in groups)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"roles": {"nope": "hidden"}}, ValueError, "'nope'"),
    ({"roles": {"wte.weight": "middle"}}, ValueError, r"roles\['wte.weight'\]"),
    ({"output": "ln_f"}, ValueError, "output='ln_f'"),
    ({"settings": {"hiden": {}}}, ValueError, "settings keys"),
    ({"settings": {"hidden": 3}}, TypeError, r"settings\['hidden'\]"),
    ({"settings": {"hidden": {"params": []}}}, ValueError, "params"),
    ({"lr": 0.0}, ValueError, "lr"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dk.param_groups(GPT2Like(), **kwargs)


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        dk.param_groups([torch.zeros(3)])
