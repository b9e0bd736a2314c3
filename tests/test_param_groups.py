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
    assert roles["wpe.weight"] == "position"  # added to a tied token embedding: the output norm and lr
    assert roles["h.0.c_attn.weight"] == roles["h.1.mlp_proj.weight"] == "hidden"
    assert roles["h.0.ln_1.weight"] == roles["h.0.c_attn.bias"] == roles["ln_f.bias"] == "vector"
    assert "lm_head.weight" not in roles  # the same tensor as wte.weight
    groups = dk.param_groups(model, lr=0.08)
    g = by_role(groups)
    assert set(g) == {"position", "hidden", "output", "vector"}
    assert g["output"]["param_names"] == ["wte.weight"] and g["output"]["params"][0] is model.lm_head.weight
    assert (g["output"]["norm"], g["output"]["norm_kwargs"]) == ("RowNorm", {"normalized": True})
    assert (g["position"]["norm"], g["position"]["norm_kwargs"]) == ("RowNorm", {"normalized": True})
    assert (g["hidden"]["norm"], g["vector"]["norm"]) == ("Spectral", "BiasRMS")
    assert (g["position"]["lr"], g["hidden"]["lr"], g["output"]["lr"]) == (0.08, 0.01, 0.08)
    all_ids = [id(p) for grp in groups for p in grp["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())
    for grp in groups:
        assert len(grp["params"]) == len(grp["param_names"])


def test_tied_weight_forced_to_input_takes_the_positions_along():
    """Positions follow the tied weight: with it forced to the input role they are inputs too."""
    roles = classify(GPT2Like(), roles={"lm_head.weight": "input"})
    assert roles["wte.weight"] == roles["wpe.weight"] == "input"
    roles = classify(GPT2Like(), roles={"wte.weight": "output"})
    assert roles["wpe.weight"] == "position"


def test_groups_drive_scion_on_gpt2_like():
    model = GPT2Like(tied=False)
    roles = classify(model)
    assert roles["lm_head.weight"] == "output" and roles["wte.weight"] == roles["wpe.weight"] == "input"
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


class Encoder(nn.Module):
    """Blocks in an nn.ModuleList and no head (T5EncoderModel, LlamaModel): no output layer."""

    def __init__(self, head=False):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)) for _ in range(2))
        if head:
            self.head = nn.Linear(8, 3)


def test_the_last_linear_of_a_block_is_not_an_output():
    roles = classify(Encoder())
    assert "output" not in roles.values() and roles["blocks.1.1.weight"] == "hidden"
    with pytest.raises(ValueError, match="no output layer"):
        output_weight(Encoder())
    assert classify(Encoder(head=True))["head.weight"] == "output"
    assert classify(Encoder(), output="blocks.1.1.weight")["blocks.1.1.weight"] == "output"
    heads = nn.Module()
    heads.trunk, heads.heads = nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 2), nn.Linear(4, 3)])
    assert classify(heads)["heads.1.weight"] == "output"  # (an element of the list itself: a head)


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
    with pytest.raises(ValueError, match=r"cannot classify 1 parameter:.*\n  parameter 'mixing' \(shape \(6, 6\)\): "
                                         r"a role in \('hidden', 'input', 'output', 'position', 'bias_table'\)"):
        dk.param_groups(Custom(), lr=0.1)
    g = by_role(dk.param_groups(Custom(), lr=0.1, roles={"mixing": "hidden"}))
    assert sorted(g["hidden"]["param_names"]) == ["mixing", "proj.weight"]


def test_every_unclassifiable_parameter_in_one_error():
    model = Custom()
    model.gates = nn.Parameter(torch.randn(2, 3, 4))  # a raw 3-D parameter is taken for experts: not listed
    model.sub = nn.Module()
    model.sub.table = nn.Parameter(torch.randn(2, 3, 4, 5, 6))
    model.sub.kernel = nn.Parameter(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError) as info:
        dk.param_groups(model)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("cannot classify 3 parameters:") and "roles={name: role}" in lines[0]
    assert lines[1:] == [
        "  parameter 'mixing' (shape (6, 6)): a role in ('hidden', 'input', 'output', 'position', 'bias_table') "
        "(stored (d_in, d_out): ('hidden', {'transpose': True}))",
        "  parameter 'sub.table' (shape (2, 3, 4, 5, 6)): no role by rank; ('expert', {'batch_dims': 3}) "
        "orthogonalises each matrix",
        "  parameter 'sub.kernel' (shape (2, 3, 4, 5)): a role in ('conv',)"]
    roles = {"mixing": ("hidden", {"transpose": True}), "sub.table": ("expert", {"batch_dims": 3}),
             "sub.kernel": "conv"}
    groups = dk.param_groups(model, roles=roles)
    own = {tuple(g["param_names"]): (g["role"], g["norm_kwargs"]) for g in groups}
    assert own[("mixing",)] == ("hidden", {"transpose": True})
    assert own[("sub.table",)] == ("expert", {"batch_dims": 3})
    assert own[("gates",)] == ("expert", {"batch_dims": 1}) and own[("sub.kernel",)] == ("conv", {})
    opt = dk.Scion(groups)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


class InOut(nn.Module):
    """A linear layer that says it stores its weight (in, out)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.weight = nn.Parameter(torch.randn(d_in, d_out))


class OutIn(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.input_dim, self.output_dim = d_in, d_out
        self.weight = nn.Parameter(torch.randn(d_out, d_in))


def test_modules_that_say_their_layout():
    model = nn.Module()
    model.up, model.down, model.sq = InOut(4, 12), OutIn(12, 4), InOut(5, 5)
    model.head = nn.Linear(4, 3)
    own = {tuple(g["param_names"]): (g["role"], g["norm_kwargs"]) for g in dk.param_groups(model)}
    assert own == {("up.weight",): ("hidden", {"transpose": True}), ("down.weight", "sq.weight"): ("hidden", {}),
                   ("head.weight",): ("output", {"normalized": True}), ("head.bias",): ("vector", {})}
    # forced roles keep the layout: an (in, out) output layer is RowNorm over its columns, a Linear input ColNorm
    own = {tuple(g["param_names"]): (g["role"], g["norm_kwargs"])
           for g in dk.param_groups(model, roles={"up.weight": "output", "head.weight": "input"})}
    assert own[("up.weight",)] == ("output", {"normalized": True, "transpose": True})
    assert own[("head.weight",)] == ("input", {"transpose": False})


def test_attention_bias_tables():
    """T5's relative_attention_bias (an nn.Embedding (buckets, heads)) and Swin's relative_position_bias_table
    (a 2-D parameter) are bias tables: each head's column to RMS 1, at the vectors' lr; not inputs."""
    model = nn.Module()
    model.relative_attention_bias = nn.Embedding(32, 4)
    model.relative_position_bias_table = nn.Parameter(torch.zeros(49, 3))
    model.embed = nn.Embedding(10, 8)
    g = by_role(dk.param_groups(model, lr=0.8))
    assert g["bias_table"]["param_names"] == ["relative_position_bias_table", "relative_attention_bias.weight"]
    assert (g["bias_table"]["norm"], g["bias_table"]["norm_kwargs"], g["bias_table"]["lr"]) == ("ColNorm", {}, 0.1)
    assert g["input"]["param_names"] == ["embed.weight"]
    grad = torch.randn(32, 4, dtype=torch.float64)
    u = dk.lmo.ColNorm().lmo(grad)
    assert torch.allclose(u.pow(2).mean(0), torch.ones(4, dtype=torch.float64))  # each head's biases: RMS 1


def test_overrides():
    model = GPT2Like(tied=False)
    groups = dk.param_groups(model, lr=0.2, ratio=(1, 0.5, 0.25), output="wte.weight",
                             roles={"wpe.weight": ("hidden", {})},  # (an embedding: "hidden" adds transpose=True)
                             settings={"hidden": {"norm": "Auto", "scale": 2.0}, "vector": {"lr": 0.0}})
    g = by_role(groups)
    assert set(g) == {"hidden", "output", "vector"}
    assert g["output"]["param_names"] == ["wte.weight"]
    assert {"wpe.weight", "lm_head.weight"} <= set(g["hidden"]["param_names"])
    assert (g["hidden"]["norm"], g["hidden"]["scale"], g["hidden"]["lr"]) == ("Auto", 2.0, 0.1)
    assert g["output"]["lr"] == 0.05 and g["vector"]["lr"] == 0.0


def test_layout_kwargs_a_replaced_norm_does_not_take_are_an_error():
    """An embedding stored (in, out) forced to "hidden" needs transpose=True, which Auto does not take."""
    with pytest.raises(ValueError, match=r"\['wpe.weight'\] \(role 'hidden'\) need norm_kwargs \{'transpose': True\}"
                                         r".*norm 'Auto' does not take"):
        dk.param_groups(GPT2Like(tied=False), roles={"wpe.weight": "hidden"}, settings={"hidden": {"norm": "Auto"}})
    g = dk.param_groups(GPT2Like(tied=False), roles={"wpe.weight": "hidden"})
    assert next(grp for grp in g if grp["param_names"] == ["wpe.weight"])["norm_kwargs"] == {"transpose": True}


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
    ({"roles": {"wte.weight": ("hidden", 3)}}, TypeError, r"roles\['wte.weight'\] = \(role, norm_kwargs\)"),
    ({"roles": {"wte.weight": ("nope", {})}}, ValueError, r"roles\['wte.weight'\]"),
    ({"roles": {"h.0.c_fc.weight": ("hidden", {"splits": [5]})}}, ValueError, r"'h.0.c_fc.weight'.*splits"),
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
