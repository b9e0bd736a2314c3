import math

import pytest
import torch
from torch import nn

import disco_kernels as dk
from disco_kernels.models import PRESETS, ModelConfig, NormEverywhereLM, rms_norm
import oracle
from tolerances import assert_close, bound


def test_presets():
    assert set(PRESETS) >= {"tiny", "proxy"}
    proxy = PRESETS["proxy"]
    assert (proxy.n_layers, proxy.dim, proxy.vocab_size, proxy.norm_eps) == (4, 256, 256, 1e-20)
    for name, cfg in PRESETS.items():
        assert NormEverywhereLM(name).cfg is cfg


def test_forward_shapes_and_initial_loss():
    model = NormEverywhereLM("tiny")
    tokens = torch.randint(0, 256, (3, 13))
    assert model(tokens).shape == (3, 13, 256)
    # logits = head(rms_norm(x)): rows of norm 1/sqrt(d) against inputs of norm sqrt(d) => |logit| <= 1,
    # so the loss is within 2 of ln(256)
    loss = model(tokens, torch.roll(tokens, 1, 1))
    assert loss.shape == () and abs(loss.item() - math.log(256)) <= 2
    logits = model(tokens)
    exact = torch.ones((), dtype=torch.float64)  # Cauchy-Schwarz, attained for a row parallel to its input
    plain = model.head.weight.float().norm(dim=1).max() * math.sqrt(model.cfg.dim)  # the bound in fp32
    assert logits.abs().max() <= 1 + bound(plain, exact, torch.float32)


def test_causal():
    model = NormEverywhereLM("tiny")
    a = torch.randint(0, 256, (2, 20))
    b = a.clone()
    b[:, 12:] = torch.randint(0, 256, (2, 8))
    la, lb = model(a), model(b)
    assert torch.equal(la[:, :12], lb[:, :12])  # the same operations on the same prefix
    assert not torch.allclose(la[:, 12:], lb[:, 12:])


def test_init_is_the_papers():
    """The paper's init, drawn as the reference norms draw it (embedding, output, then each block's
    q, k, v, o, gate, up, down), residual projections x 1/sqrt(2 n_layers); and the paper's norms of it:
    embedding and output norm 1, hidden RMS->RMS 1 (1/sqrt(2 n_layers) for residual projections)."""
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=2, max_seq_len=16)
    model = NormEverywhereLM(cfg)
    torch.manual_seed(4)
    model.reset_parameters()
    residual = set(model.residual_projections())
    assert len(residual) == 2 * 3
    torch.manual_seed(4)
    inits = [("embed.weight", "ColNorm", {"transpose": True}), ("head.weight", "RowNorm", {"normalized": True})]
    inits += [(f"blocks.{b}.{lin}.weight", "Spectral", {}) for b in range(3)
              for lin in ("q", "k", "v", "o", "gate", "up", "down")]
    params = dict(model.named_parameters())
    for name, norm, kwargs in inits:
        state = torch.get_rng_state()
        exact = oracle.init(norm, params[name].shape, **kwargs)
        torch.set_rng_state(state)
        plain = oracle.init(norm, params[name].shape, compute=torch.float32, **kwargs)
        factor = 1 / math.sqrt(2 * 3) if name in residual else 1.0
        assert_close(params[name].detach(), factor * exact, factor * plain, what=name)
        norm_of = {"embed.weight": lambda w: oracle.l1_to_rms(w.T), "head.weight": oracle.rms_to_inf}.get(
            name, oracle.rms_to_rms)
        assert_close(norm_of(params[name].detach()), torch.tensor(factor, dtype=torch.float64),
                     norm_of(factor * plain), torch.float32, what=f"norm of {name}")


def test_norm_everywhere_every_linear_sees_rms_one_and_no_gains():
    model = NormEverywhereLM("tiny")
    assert all(p.dim() == 2 for p in model.parameters())  # parameter-free RMSNorm, no biases
    rms = []
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.register_forward_pre_hook(lambda m, args: rms.append(args[0].pow(2).mean(-1).sqrt()))
    model(torch.randint(0, 256, (2, 9)))
    assert len(rms) == 7 * 2 + 1
    # a vector normalised in fp32 has RMS 1 up to a few roundings of its entries and of the rsqrt
    plain = rms_norm(torch.randn(64, model.cfg.dim), 1e-20).double().pow(2).mean(-1).sqrt()
    for r in rms:
        assert_close(r.double(), torch.ones_like(r, dtype=torch.float64), plain[: r.numel()].reshape(r.shape),
                     torch.float32)


def test_rms_norm():
    x = torch.randn(4, 33) * 1e-3

    def plain_rms_norm(x):  # x / sqrt(mean(x²) + eps) in x's dtype
        return x / (x.pow(2).mean(-1, keepdim=True) + 1e-20).sqrt()

    y = rms_norm(x, 1e-20)
    exact = plain_rms_norm(x.double())
    assert_close(y, exact, plain_rms_norm(x))
    assert torch.equal(rms_norm(torch.zeros(2, 8), 1e-20), torch.zeros(2, 8))
    yb = rms_norm(x.bfloat16(), 1e-20)
    assert yb.dtype == torch.bfloat16
    assert_close(yb, plain_rms_norm(x.bfloat16().double()), plain_rms_norm(x.bfloat16()))


def test_trains_with_scion():
    torch.manual_seed(3)
    model = NormEverywhereLM("tiny")
    opt = dk.Scion(dk.param_groups(model, lr=0.1), lr=0.1, unconstrained=True)
    x = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(10):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_bf16_forward_is_finite():
    model = NormEverywhereLM("tiny").to(torch.bfloat16)
    x = torch.randint(0, 256, (2, 16))
    assert torch.isfinite(model(x, x)).all()


@pytest.mark.parametrize("kwargs, field", [
    ({"dim": 30, "n_heads": 4}, "dim"),
    ({"dim": 36, "n_heads": 4}, "dim"),  # odd head size: no RoPE pairs
    ({"n_layers": 0}, "n_layers"),
    ({"vocab_size": 2.5}, "vocab_size"),
    ({"n_heads": True}, "n_heads"),
    ({"mlp_dim": -3}, "mlp_dim"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"rope_theta": -1.0}, "rope_theta"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="cfg must be .* 'huge'"):
        NormEverywhereLM("huge")
    with pytest.raises(TypeError, match="cfg"):
        NormEverywhereLM(3)
    model = NormEverywhereLM("tiny")
    with pytest.raises(ValueError, match=r"tokens must be \(batch, seq\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len 128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
